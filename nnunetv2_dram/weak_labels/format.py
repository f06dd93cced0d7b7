"""The weak-label sidecar file `weak_labels.json` (docs/reference.md, "weak_labels.json"): reading, validating, writing.

Every target becomes an interval [low, high] in percent of the region's volume: an exact percentage is a
zero-width interval, a CT severity score (CTSS) is its band, and an explicit [low, high] stays as given.
Training works on fractions (percent / 100).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from nnunetv2_dram.weak_labels.problems import Problem, WeakDatasetError

FORMAT = "nnunetv2_dram.weak_labels/1"
FILENAME = "weak_labels.json"
TARGETS = ("percentage", "ctss")

#: Lower bound of CTSS 1 in percent. Clinically CTSS 1 is (0, 5] %: some lesion, however little. An interval loss
#: and a calibrated threshold cannot tell (0, 5] from [0, 5], which would let a CTSS-1 lobe end up with no lesion at
#: all, so the band starts just above 0: 0.1 % of the lobe (about 1-2 ml of a lobe of 1-1.5 l).
CTSS1_MIN_PERCENT = 0.1
# CTSS band per score, in percent. Score 0 means no lesion at all; the lower bound of 2..5 is exclusive in the
# clinical definition, which an interval loss cannot tell from inclusive, so it is stored as is.
CTSS_BANDS = {0: (0.0, 0.0), 1: (CTSS1_MIN_PERCENT, 5.0), 2: (5.0, 25.0), 3: (25.0, 50.0), 4: (50.0, 75.0),
              5: (75.0, 100.0)}


def percent_to_ctss(percent: float) -> int:
    """The CT severity score whose band holds `percent` (0 only for exactly 0 %)."""
    if percent <= 0:
        return 0
    for score in (1, 2, 3, 4, 5):
        if percent <= CTSS_BANDS[score][1]:
            return score
    return 5


@dataclass(frozen=True)
class RegionTarget:
    """The weak target of one region of one case, as an interval in percent."""
    low: float
    high: float
    source: str  # "percentage", "ctss" or "interval"
    raw: object = None  # the value as written in the file

    @property
    def is_exact(self) -> bool:
        return self.low == self.high

    @property
    def fraction_interval(self) -> tuple[float, float]:
        return self.low / 100.0, self.high / 100.0

    @property
    def midpoint(self) -> float:
        return 0.5 * (self.low + self.high)

    @property
    def ctss_bin(self) -> int:
        """Severity bin used to balance sampling: the CTSS of the interval's midpoint (0 only for [0, 0])."""
        if self.source == "ctss" and isinstance(self.raw, int):
            return int(self.raw)
        return 0 if self.high <= 0 else percent_to_ctss(max(self.midpoint, 1e-6))

    def contains(self, percent: float, tolerance: float = 0.0) -> bool:
        return self.low - tolerance <= percent <= self.high + tolerance

    def to_json(self):
        return self.raw if self.raw is not None else ([self.low, self.high] if not self.is_exact else self.low)


@dataclass
class WeakLabels:
    target: str
    cases: dict[str, dict[int, RegionTarget]]
    path: str | None = None

    def regions_of(self, case: str) -> dict[int, RegionTarget]:
        return self.cases.get(case, {})

    def to_json(self) -> dict:
        return {"format": FORMAT, "target": self.target,
                "cases": {c: {str(r): t.to_json() for r, t in sorted(regions.items())}
                          for c, regions in sorted(self.cases.items())}}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_region_value(value, target: str) -> tuple[RegionTarget | None, str | None]:
    """(target, None) or (None, what is wrong)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or not all(_is_number(v) for v in value):
            return None, f"an interval must be two numbers [low, high] in percent, got {json.dumps(value)}"
        low, high = float(value[0]), float(value[1])
        if any(math.isnan(v) or math.isinf(v) for v in (low, high)):
            return None, f"interval {json.dumps(value)} contains NaN or infinity"
        if not (0 <= low <= high <= 100):
            return None, f"interval {json.dumps(value)} must satisfy 0 <= low <= high <= 100"
        # keep it an interval when written back, even a zero-width one: a bare number would mean a CTSS
        # score in a "ctss" file
        return RegionTarget(low, high, "interval", [low, high]), None
    if not _is_number(value):
        return None, f"value {json.dumps(value)} is neither a number nor an interval [low, high]"
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        return None, "value is NaN or infinity"
    if target == "percentage":
        if not 0 <= v <= 100:
            return None, f"percentage {value} is out of range [0, 100]"
        return RegionTarget(v, v, "percentage", value), None
    # ctss
    if v != int(v) or int(v) not in CTSS_BANDS:
        return None, f"CT severity score {value} must be an integer 0..5"
    low, high = CTSS_BANDS[int(v)]
    return RegionTarget(low, high, "ctss", int(v)), None


def parse_weak_labels(obj, source: str = FILENAME) -> tuple[WeakLabels | None, list[Problem]]:
    """Validate the file's content on its own (no images needed). Returns every problem found."""
    problems: list[Problem] = []
    if not isinstance(obj, Mapping):
        return None, [Problem("the file must hold a JSON object with 'format', 'target' and 'cases'", file=source)]
    fmt = obj.get("format")
    if fmt != FORMAT:
        problems.append(Problem(f"'format' is {json.dumps(fmt)}, expected \"{FORMAT}\"", file=source,
                                hint=f'add "format": "{FORMAT}"'))
    target = obj.get("target")
    if target not in TARGETS:
        problems.append(Problem(f"'target' is {json.dumps(target)}, expected one of {list(TARGETS)}", file=source))
        target = "percentage"
    unknown = set(obj) - {"format", "target", "cases", "description"}
    if unknown:
        problems.append(Problem(f"unknown top-level key(s) {sorted(unknown)}", file=source, severity="warning"))
    cases_in = obj.get("cases")
    if not isinstance(cases_in, Mapping):
        problems.append(Problem("'cases' must be an object {case_id: {region_label: value}}", file=source))
        return None, problems
    cases: dict[str, dict[int, RegionTarget]] = {}
    for case, regions in cases_in.items():
        bad_id = case_id_problem(case)
        if bad_id:
            problems.append(Problem(bad_id, file=source, case=case, hint="use plain nnU-Net case identifiers"))
            continue
        if not isinstance(regions, Mapping):
            problems.append(Problem("entry must be an object {region_label: value}", file=source, case=case))
            continue
        parsed: dict[int, RegionTarget] = {}
        for key, value in regions.items():
            try:
                label = int(key)
                if str(label) != str(key).strip() or label <= 0:
                    raise ValueError
            except (TypeError, ValueError):
                problems.append(Problem(f"region key {json.dumps(key)} is not a positive integer label value",
                                        file=source, case=case, hint="keys are the region label values as strings, e.g. \"1\""))
                continue
            t, err = parse_region_value(value, target)
            if err:
                problems.append(Problem(err, file=source, case=case, region=label))
            else:
                parsed[label] = t
        cases[case] = parsed
    return WeakLabels(target=target, cases=cases, path=source), problems


def case_id_problem(case) -> str | None:
    """Why `case` cannot be a case identifier (None if it can). Refuses ids that would escape a folder."""
    if not isinstance(case, str) or not case:
        return "case identifier must be a non-empty string"
    if case in (".", "..") or any(c in case for c in ("/", "\\", "\0", ":")) or case != case.strip():
        return f"case identifier {json.dumps(case)} contains a path separator, '..' or other characters " \
               f"that would escape the dataset folder"
    return None


def read_weak_labels(path: str | os.PathLike) -> tuple[WeakLabels | None, list[Problem]]:
    path = Path(path)
    if not path.is_file():
        return None, [Problem("file not found", file=str(path),
                              hint=f"put the weak targets in {FILENAME} next to dataset.json (format: "
                                   f"docs/reference.md, \"weak_labels.json\")")]
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, [Problem(f"not valid JSON ({e})", file=str(path))]
    return parse_weak_labels(obj, source=str(path))


def load_weak_labels(path: str | os.PathLike) -> WeakLabels:
    """Read and validate; raise WeakDatasetError listing every error."""
    weak, problems = read_weak_labels(path)
    errors = [p for p in problems if p.severity == "error"]
    if errors or weak is None:
        raise WeakDatasetError(problems, title=f"invalid {path}")
    return weak


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary name in the same folder, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_weak_labels(weak: WeakLabels | dict, path: str | os.PathLike) -> None:
    obj = weak.to_json() if isinstance(weak, WeakLabels) else weak
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")
