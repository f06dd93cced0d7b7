"""weak_labels.json from a spreadsheet export: one row per case, one column per region.

Cells hold percentages ("12.5", "12.5 %", "12,5" with a decimal comma), CT severity scores (0..5), or percent
intervals ("5-25", "5–25", "[5, 25]", "5 to 25"); an empty cell (or NA, n/a, -) gives that region no supervision.
Columns are matched to regions by a preset (`lobes`: LUL, "left upper lobe", left_upper_lobe, CTSS_LUL, LUL (%),
...) or by explicit NAME=LABEL pairs. Case identifiers are made safe for file names (see `sanitize_case_id`).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from nnunetv2_dram.conversion.region_maps import LOBE_LABELS
from nnunetv2_dram.weak_labels.format import CTSS_BANDS, FORMAT, TARGETS, WeakLabels, parse_weak_labels
from nnunetv2_dram.weak_labels.problems import Problem, WeakDatasetError

# ---------------------------------------------------------------------------------------------------------------
# case identifiers

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sanitize_case_id(raw: str) -> str:
    """A case identifier safe as a file name on every system: letters, digits, '_' and '-' only.

    Runs of other characters (spaces, path separators, dots, umlauts, ...) become one '_'. Raises ValueError
    when nothing usable is left.
    """
    text = str(raw).strip()
    safe = _UNSAFE.sub("_", text).strip("_")
    if not safe:
        raise ValueError(f"case identifier {raw!r} has no letters or digits")
    return safe


def sanitize_all(raw_ids: Iterable[str], what: str) -> tuple[dict[str, str], list[Problem]]:
    """raw -> safe for every id; problems for ids that are empty or collide after sanitising."""
    mapping: dict[str, str] = {}
    owners: dict[str, str] = {}
    problems: list[Problem] = []
    for raw in raw_ids:
        try:
            safe = sanitize_case_id(raw)
        except ValueError as e:
            problems.append(Problem(str(e), file=what))
            continue
        if safe in owners and owners[safe] != raw:
            problems.append(Problem(f"case identifiers {owners[safe]!r} and {raw!r} both become {safe!r}",
                                    file=what, hint="rename one of them"))
            continue
        owners[safe] = raw
        mapping[raw] = safe
    return mapping, problems


# ---------------------------------------------------------------------------------------------------------------
# column names -> regions

_CASE_COLUMN_NAMES = ("case", "case id", "caseid", "case identifier", "case name", "id", "patient", "patient id",
                      "patientid", "pid", "subject", "subject id", "identifier", "scan", "scan id", "study",
                      "study id", "accession", "accession number", "image", "filename", "file", "name")
_LOBE_ABBREVIATIONS = {"lul": 1, "lll": 2, "rul": 3, "rml": 4, "rll": 5}
_SIDES = {"left": "L", "l": "L", "lt": "L", "sinister": "L", "right": "R", "r": "R", "rt": "R", "dexter": "R"}
_LEVELS = {"upper": "U", "superior": "U", "up": "U", "sup": "U", "middle": "M", "mid": "M",
           "lower": "D", "inferior": "D", "low": "D", "inf": "D"}
_LOBE_BY_SIDE_LEVEL = {("L", "U"): 1, ("L", "D"): 2, ("R", "U"): 3, ("R", "M"): 4, ("R", "D"): 5}


def _words(header: str) -> list[str]:
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", str(header))  # camelCase -> camel Case
    return re.findall(r"[a-z]+", text.lower())


def _normalized(header: str) -> str:
    return " ".join(_words(header))


def match_lobe_column(header: str) -> int | None:
    """Our lobe label for a column name, or None. Extra words (CTSS, score, %, percent, lobe, lung) are ignored."""
    words = _words(header)
    abbreviations = {_LOBE_ABBREVIATIONS[w] for w in words if w in _LOBE_ABBREVIATIONS}
    if len(abbreviations) == 1:
        return abbreviations.pop()
    if abbreviations:
        return None
    sides = {_SIDES[w] for w in words if w in _SIDES}
    levels = {_LEVELS[w] for w in words if w in _LEVELS}
    if len(sides) == 1 and len(levels) == 1:
        return _LOBE_BY_SIDE_LEVEL.get((sides.pop(), levels.pop()))
    return None


COLUMN_PRESETS = {"lobes": match_lobe_column}


def parse_column_flags(flags: Iterable[str] | Mapping[str, object] | None,
                       labels: Mapping[str, int] = LOBE_LABELS) -> dict[str, int]:
    """["LUL=1", "Right middle=right_middle_lobe"] (or a dict) -> {column name: label value}."""
    if not flags:
        return {}
    items = flags.items() if isinstance(flags, Mapping) else []
    if not isinstance(flags, Mapping):
        items = []
        for flag in flags:
            name, sep, value = str(flag).rpartition("=")
            if not sep or not name.strip() or not value.strip():
                raise WeakDatasetError([Problem(f"--column {flag!r} must look like NAME=LABEL, e.g. LUL=1 or "
                                                f"LUL=left_upper_lobe")], title="invalid column flag")
            items.append((name.strip(), value.strip()))
    out = {}
    valid = {v for v in labels.values() if v}
    for name, value in items:
        if isinstance(value, str) and value in labels:
            label = labels[value]
        else:
            try:
                label = int(value)
            except (TypeError, ValueError):
                label = None
        if label not in valid:
            raise WeakDatasetError([Problem(f"--column {name}={value}: {value!r} is not a region; use one of "
                                            f"{sorted(valid)} or {sorted(k for k, v in labels.items() if v)}")],
                                   title="invalid column flag")
        out[name] = label
    return out


# ---------------------------------------------------------------------------------------------------------------
# cells

_MISSING = {"", "na", "n/a", "nan", "none", "null", "-", "--", "\u2013", "\u2014", ".", "?", "nd", "n.d."}
_NUMBER = r"[0-9]+(?:[.,][0-9]+)?"
_INTERVAL = re.compile(rf"^\[?\s*({_NUMBER})\s*%?\s*(?:-|\u2013|\u2014|\.\.|to)\s*({_NUMBER})\s*%?\s*\]?$",
                       re.IGNORECASE)
_BRACKET_INTERVAL = re.compile(rf"^\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]$")
_PLAIN = re.compile(rf"^([+-]?(?:{_NUMBER}|[0-9]*\.[0-9]+))\s*(%)?$")


def _to_float(text: str) -> float:
    return float(text.replace(",", "."))


def parse_cell(text: str, target: str, decimal_comma: bool = False):
    """(value for weak_labels.json, None) or (None, what is wrong); value None = no supervision.

    Percent intervals become [low, high]; with target "ctss" a plain number must be an integer score.
    `decimal_comma`: "12,5" means 12.5 (';'-separated exports); otherwise a bare "5,25" is refused as ambiguous.
    """
    cell = str(text).strip()
    if cell.lower() in _MISSING:
        return None, None
    if not decimal_comma and re.fullmatch(r"[0-9]+,[0-9]+\s*%?", cell):
        return None, f"{cell!r} is ambiguous: write 5.25 for a number or 5-25 for an interval"
    m = _BRACKET_INTERVAL.match(cell) or _INTERVAL.match(cell)
    if m:
        low, high = _to_float(m.group(1)), _to_float(m.group(2))
        if low > high:
            return None, f"interval {cell!r} has low > high"
        if not 0 <= low <= high <= 100:
            return None, f"interval {cell!r} must lie within 0..100 %"
        return [low, high], None  # kept as a pair even when low == high: a bare number would read as a CTSS
    m = _PLAIN.match(cell)
    if not m:
        return None, (f"{cell!r} is not a number, a CT severity score or a percent interval like '5-25'")
    value = _to_float(m.group(1))
    if target == "ctss":
        if m.group(2):
            return None, f"{cell!r} is a percentage but the table's target is CTSS (use --target percentage)"
        if value != int(value) or int(value) not in CTSS_BANDS:
            return None, f"CT severity score {cell!r} must be an integer 0..5"
        return int(value), None
    if not 0 <= value <= 100:
        return None, f"percentage {cell!r} is out of range 0..100"
    return (int(value) if value == int(value) and "." not in cell and "," not in cell else value), None


# ---------------------------------------------------------------------------------------------------------------
# the table


@dataclass
class TableReport:
    path: str
    delimiter: str
    target: str
    case_column: str
    columns: dict = field(default_factory=dict)  # column name -> region label
    ignored_columns: list = field(default_factory=list)
    n_cases: int = 0
    empty_cells: dict = field(default_factory=dict)  # column name -> count
    renamed: dict = field(default_factory=dict)  # raw case id -> sanitised id
    warnings: list = field(default_factory=list)

    def summary(self) -> str:
        cols = ", ".join(f"{c}->{r}" for c, r in self.columns.items())
        text = (f"{self.path}: {self.n_cases} case(s), target {self.target}, case column {self.case_column!r}, "
                f"regions {cols}")
        if self.ignored_columns:
            text += f"; ignored column(s) {self.ignored_columns}"
        if any(self.empty_cells.values()):
            text += "; empty cells (no supervision): " + ", ".join(f"{c}: {n}" for c, n in self.empty_cells.items()
                                                                    if n)
        return text


@dataclass
class WeakLabelTable:
    weak_labels: WeakLabels
    json: dict  # the weak_labels.json content
    report: TableReport
    raw_ids: dict  # sanitised case id -> id as written in the table


def _read_text(path: Path) -> tuple[str, str | None]:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        # spreadsheet programs on Windows often save CSV in the legacy code page
        return data.decode("cp1252", errors="replace"), "file is not UTF-8; read it as Windows-1252 (cp1252)"


def _sniff_delimiter(text: str, path: Path) -> str:
    sample = "\n".join(text.splitlines()[:50])
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        first = text.splitlines()[0] if text.strip() else ""
        if path.suffix.lower() in (".tsv", ".tab") or "\t" in first:
            return "\t"
        return ";" if first.count(";") > first.count(",") else ","


def _find_case_column(header: list[str], case_column: str | None, region_columns: set[str], path: str):
    if case_column is not None:
        for name in header:
            if name == case_column:
                return name, None
        for name in header:
            if name.strip().lower() == case_column.strip().lower():
                return name, None
        raise WeakDatasetError([Problem(f"case column {case_column!r} not found; columns are {header}", file=path)],
                               title="invalid table")
    for candidate in _CASE_COLUMN_NAMES:
        for name in header:
            if _normalized(name) == candidate and name not in region_columns:
                return name, None
    first = header[0]
    if first in region_columns:
        raise WeakDatasetError([Problem(f"no case-identifier column found among {header}", file=path,
                                        hint="name it 'case' or pass --case-column")], title="invalid table")
    return first, Problem(f"no column named like a case identifier; using the first column {first!r}", file=path,
                          severity="warning", hint="pass --case-column to choose another")


def read_weak_label_table(path: str | os.PathLike, target: str | None = "percentage",
                          case_column: str | None = None, preset: str | None = "lobes",
                          columns: Iterable[str] | Mapping | None = None,
                          labels: Mapping[str, int] = LOBE_LABELS) -> WeakLabelTable:
    """Read a CSV/TSV table into weak labels (validated with the weak_labels.json parser).

    target None (not given on the command line): plain numbers are percentages, except that a table whose plain
    numbers are all integers 0..5 (not all 0, none written with '%') is refused, naming the file: such a table
    looks like CT severity scores, and reading scores as percentages would train on targets 5-20x too small.
    Raises WeakDatasetError listing every problem, each naming the row (line number in the file), case, column
    and value.
    """
    path = Path(path)
    where = str(path)
    target_given = target is not None
    if target is None:
        target = "percentage"
    if target not in TARGETS:
        raise WeakDatasetError([Problem(f"target {target!r} must be one of {list(TARGETS)}")], title="invalid table")
    if preset not in (None, "none") and preset not in COLUMN_PRESETS:
        raise WeakDatasetError([Problem(f"unknown column preset {preset!r}; use one of {sorted(COLUMN_PRESETS)} "
                                        f"or 'none' with --column flags")], title="invalid table")
    if not path.is_file():
        raise WeakDatasetError([Problem("table not found", file=where)], title="invalid table")
    text, encoding_note = _read_text(path)
    if not text.strip():
        raise WeakDatasetError([Problem("table is empty", file=where)], title="invalid table")
    delimiter = _sniff_delimiter(text, path)
    rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    header_index = next(i for i, r in enumerate(rows) if any(c.strip() for c in r))
    header = [c.strip() for c in rows[header_index]]
    if len(set(header)) != len(header):
        dupes = sorted({h for h in header if header.count(h) > 1})
        raise WeakDatasetError([Problem(f"duplicate column name(s) {dupes}", file=where)], title="invalid table")

    explicit = parse_column_flags(columns, labels)
    column_regions: dict[str, int] = {}
    problems: list[Problem] = []
    for name, label in explicit.items():
        found = name if name in header else next((h for h in header if h.lower() == name.lower()), None)
        if found is None:
            problems.append(Problem(f"--column {name}={label}: no column {name!r}; columns are {header}", file=where))
        else:
            column_regions[found] = label
    matcher = COLUMN_PRESETS.get(preset) if preset not in (None, "none") else None
    if matcher is not None:
        claimed = set(column_regions.values())  # an explicit flag wins over the preset's guess for its region
        for name in header:
            if name not in column_regions and name != case_column:
                label = matcher(name)
                if label is not None and label not in claimed:
                    column_regions[name] = label
    case_col, case_note = _find_case_column(header, case_column, set(column_regions), where)
    column_regions.pop(case_col, None)
    by_region: dict[int, list[str]] = {}
    for name, label in column_regions.items():
        by_region.setdefault(label, []).append(name)
    for label, names in sorted(by_region.items()):
        if len(names) > 1:
            problems.append(Problem(f"columns {names} all map to region {label}", file=where, region=label,
                                    hint="choose one with --column NAME=LABEL"))
    if problems:
        raise WeakDatasetError(problems, title=f"invalid table {where}")
    if not column_regions:
        raise WeakDatasetError([Problem(f"no column maps to a region (columns: {header})", file=where,
                                        hint="name columns like LUL/LLL/RUL/RML/RLL or pass --column NAME=LABEL")],
                               title="invalid table")

    report = TableReport(path=where, delimiter=delimiter, target=target, case_column=case_col,
                         columns=dict(sorted(column_regions.items(), key=lambda kv: kv[1])),
                         ignored_columns=[h for h in header if h not in column_regions and h != case_col],
                         empty_cells={name: 0 for name in column_regions})
    if encoding_note:
        report.warnings.append(Problem(encoding_note, file=where, severity="warning"))
    if case_note:
        report.warnings.append(case_note)
    if report.ignored_columns:
        report.warnings.append(Problem(f"column(s) {report.ignored_columns} match no region and are ignored",
                                       file=where, severity="warning",
                                       hint="map one with --column NAME=LABEL if it holds a region's target"))

    col_index = {name: header.index(name) for name in header}
    cases: dict[str, dict[str, object]] = {}
    raw_ids: dict[str, str] = {}
    first_row: dict[str, int] = {}
    numbers: list[float] = []
    score_like: list[bool] = []  # per plain number: an integer 0..5 written without '%'
    for i, row in enumerate(rows[header_index + 1:], start=header_index + 2):
        if not any(c.strip() for c in row):
            continue
        if len(row) > len(header) and any(c.strip() for c in row[len(header):]):
            problems.append(Problem(f"row {i} has {len(row)} cells but the header has {len(header)}", file=where,
                                    hint=f"check for an unquoted delimiter {delimiter!r} inside a cell"))
            continue
        cells = row + [""] * (len(header) - len(row))
        raw_case = cells[col_index[case_col]].strip()
        if raw_case.startswith("#"):
            continue
        if not raw_case:
            problems.append(Problem(f"row {i}: empty case identifier in column {case_col!r}", file=where))
            continue
        try:
            case = sanitize_case_id(raw_case)
        except ValueError as e:
            problems.append(Problem(f"row {i}: {e}", file=where))
            continue
        if case in cases:
            problems.append(Problem(f"row {i}: case appears again (first in row {first_row[case]}"
                                    + (f", as {raw_ids[case]!r}" if raw_ids[case] != raw_case else "") + ")",
                                    file=where, case=raw_case, hint="keep one row per case"))
            continue
        first_row[case] = i
        raw_ids[case] = raw_case
        if case != raw_case:
            report.renamed[raw_case] = case
        entry: dict[str, object] = {}
        for name, label in column_regions.items():
            cell = cells[col_index[name]]
            value, err = parse_cell(cell, target, decimal_comma=delimiter == ";")
            if err:
                problems.append(Problem(f"row {i}, column {name!r}: {err}", file=where, case=raw_case, region=label))
            elif value is None:
                report.empty_cells[name] += 1
            else:
                entry[str(label)] = value
                if not isinstance(value, list):
                    numbers.append(float(value))
                    score_like.append(isinstance(value, int) and 0 <= value <= 5 and "%" not in cell)
        cases[case] = entry
    if problems:
        raise WeakDatasetError(problems, title=f"invalid table {where}")
    if not cases:
        raise WeakDatasetError([Problem("table has a header but no case rows", file=where)], title="invalid table")

    if not target_given and score_like and all(score_like) and any(numbers):
        raise WeakDatasetError([Problem(
            "every value is an integer 0..5, which looks like CT severity scores (CTSS), not lesion percentages",
            file=where, hint="say what the numbers are: --target ctss for scores, --target percentage for percent")],
            title=f"ambiguous table {where}")
    obj = {"format": FORMAT, "target": target, "cases": cases}
    weak, parse_problems = parse_weak_labels(obj, source=where)
    errors = [p for p in parse_problems if p.severity == "error"]
    if errors or weak is None:
        raise WeakDatasetError(parse_problems, title=f"invalid table {where}")
    report.n_cases = len(cases)
    if target == "percentage" and numbers and max(numbers) <= 1.0 and any(0 < v < 1 for v in numbers):
        report.warnings.append(Problem("every percentage is <= 1: are these fractions? weak_labels.json holds "
                                       "percent (0..100)", file=where, severity="warning",
                                       hint="multiply the column by 100"))
    if (target == "percentage" and len(numbers) >= 5 and all(v == int(v) and 0 <= v <= 5 for v in numbers)):
        report.warnings.append(Problem("every value is an integer 0..5: is this a CT severity score table?",
                                       file=where, severity="warning", hint="pass --target ctss if so"))
    return WeakLabelTable(weak_labels=weak, json=obj, report=report, raw_ids=raw_ids)


def read_weak_labels_source(path: str | os.PathLike, **table_options) -> WeakLabelTable:
    """A CSV/TSV table, or an existing weak_labels.json (its case ids must already be safe)."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        return read_weak_label_table(path, **table_options)
    from nnunetv2_dram.weak_labels.format import read_weak_labels
    weak, problems = read_weak_labels(path)
    errors = [p for p in problems if p.severity == "error"]
    if errors or weak is None:
        raise WeakDatasetError(problems, title=f"invalid {path}")
    obj = json.loads(path.read_text(encoding="utf-8"))
    report = TableReport(path=str(path), delimiter="", target=weak.target, case_column="(json keys)",
                         n_cases=len(weak.cases), warnings=[p for p in problems if p.severity != "error"])
    bad = {c: sanitize_case_id(c) for c in weak.cases if sanitize_case_id(c) != c}
    if bad:
        raise WeakDatasetError([Problem(f"case identifier {c!r} is not file-name safe (would be {s!r})",
                                        file=str(path), case=c) for c, s in bad.items()], title=f"invalid {path}")
    return WeakLabelTable(weak_labels=weak, json=obj, report=report, raw_ids={c: c for c in weak.cases})


def validate_against_dataset(weak: WeakLabels, dataset_dir: str | os.PathLike) -> list[Problem]:
    """Do the table's cases and regions fit an existing raw dataset (dataset.json labels, labelsTr cases)?"""
    dataset_dir = Path(dataset_dir)
    problems: list[Problem] = []
    dj_path = dataset_dir / "dataset.json"
    if not dj_path.is_file():
        return [Problem("dataset.json not found", file=str(dj_path))]
    try:
        dataset_json = json.loads(dj_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return [Problem(f"not valid JSON ({e})", file=str(dj_path))]
    region_values = set()
    for name, value in (dataset_json.get("labels") or {}).items():
        if isinstance(value, int) and value > 0 and name != "ignore":
            region_values.add(value)
    ending = dataset_json.get("file_ending", ".nii.gz")
    labels_dir = dataset_dir / "labelsTr"
    dataset_cases = {p.name[: -len(ending)] for p in labels_dir.glob(f"*{ending}")} if labels_dir.is_dir() else set()
    for case, regions in sorted(weak.cases.items()):
        if dataset_cases and case not in dataset_cases:
            problems.append(Problem(f"case is not in {labels_dir}", file=weak.path, case=case))
        for region in sorted(regions):
            if region not in region_values:
                problems.append(Problem(f"region {region} is not a label of dataset.json ({sorted(region_values)})",
                                        file=weak.path, case=case, region=region))
    for case in sorted(dataset_cases - set(weak.cases)):
        problems.append(Problem("training case has no row in the table", file=weak.path, case=case,
                                hint="every training case needs weak targets (docs/reference.md, \"weak_labels.json\")"))
    return problems
