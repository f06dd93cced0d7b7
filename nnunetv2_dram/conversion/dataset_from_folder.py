"""A weak nnU-Net raw dataset (docs/reference.md, "Weak dataset") from a folder of CTs, a folder of lobe masks and a table of weak targets.

Cases are matched by file name: `CASE.nii.gz` (or nnU-Net style `CASE_0000.nii.gz`) in the CT folder, `CASE.<ext>`
(a multi-label map) or `CASE/` (a TotalSegmentator per-structure folder) in the regions folder, and the row of
case `CASE` in the table. Identifiers are made file-name safe the same way everywhere, so "Patient 01" in the
table meets "Patient 01.nii.gz" on disk as `Patient_01`.

The dataset is assembled under a temporary name next to its final place, checked, and only then renamed into
place: an interrupted or failing run leaves no half dataset, and the input folders are only ever read.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from nnunetv2_dram.conversion.region_maps import (IMAGE_SUFFIXES, LOBE_LABELS, RegionMapReport,
                                                  convert_region_map, resolve_mapping)
from nnunetv2_dram.conversion.weak_label_table import WeakLabelTable, read_weak_labels_source, sanitize_all
from nnunetv2_dram.io_utils import atomic_dir, atomic_write_json, split_suffix
from nnunetv2_dram.weak_labels.format import FILENAME as WEAK_LABELS_FILENAME
from nnunetv2_dram.weak_labels.format import parse_weak_labels
from nnunetv2_dram.weak_labels.problems import Problem, WeakDatasetError

# Endings nnU-Net reads with its SimpleITK reader and that SimpleITK writes as one file (region maps are written).
FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")
IMAGE_MODES = ("copy", "symlink")
_CHANNEL_SUFFIX = re.compile(r"_0000$")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass
class DatasetBuildReport:
    dataset_dir: Path
    dataset_name: str
    cases: list = field(default_factory=list)
    renamed: dict = field(default_factory=dict)  # "where: raw id" -> safe id
    skipped: dict = field(default_factory=dict)  # safe id -> why it was left out
    region_reports: dict = field(default_factory=dict)  # case -> RegionMapReport
    table_report: object = None
    converted_images: list = field(default_factory=list)  # cases whose CT was rewritten in the dataset's ending
    warnings: list = field(default_factory=list)
    check_problems: list | None = None  # None: the checker was not available

    @property
    def check_errors(self) -> list:
        return [p for p in (self.check_problems or []) if p.severity == "error"]


def _stem(path: Path) -> str:
    return split_suffix(path.name)[0] if path.is_file() else path.name


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(IMAGE_SUFFIXES)


def discover_cts(folder: Path) -> dict[str, Path]:
    """raw case id -> CT file (a trailing nnU-Net channel suffix _0000 is not part of the id)."""
    found: dict[str, Path] = {}
    problems = []
    for path in sorted(folder.iterdir()):
        if not _is_image(path):
            continue
        raw = _CHANNEL_SUFFIX.sub("", _stem(path))
        if raw in found:
            problems.append(Problem(f"two CT files for case {raw!r}: {found[raw].name} and {path.name}",
                                    file=str(folder), hint="keep one file per case"))
        found[raw] = path
    if problems:
        raise WeakDatasetError(problems, title="ambiguous CT folder")
    return found


def discover_region_inputs(folder: Path, subfolders_only: bool = False) -> dict[str, Path]:
    """raw case id -> multi-label file or per-structure folder."""
    found: dict[str, Path] = {}
    problems = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if not (path.is_dir() or (not subfolders_only and _is_image(path))):
            continue
        raw = _stem(path)
        if raw in found:
            problems.append(Problem(f"two region inputs for case {raw!r}: {found[raw].name} and {path.name}",
                                    file=str(folder), hint="keep one region map (file or folder) per case"))
        found[raw] = path
    if problems:
        raise WeakDatasetError(problems, title="ambiguous regions folder")
    return found


def _existing_datasets(root: Path, dataset_id: int) -> list[Path]:
    prefix = f"Dataset{dataset_id:03d}_"
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix)) if root.is_dir() else []


def _place_image(source: Path, target: Path, image_mode: str) -> bool:
    """Copy/link the CT if its format is the dataset's, else rewrite it. Returns True when rewritten."""
    stem, suffix = split_suffix(source.name)
    target_suffix = split_suffix(target.name)[1]
    if suffix.lower() == target_suffix and suffix.lower() not in (".mhd", ".nhdr"):  # headers with sidecar data
        if image_mode == "symlink":
            os.symlink(source.resolve(), target)
        else:
            shutil.copyfile(source, target)
        return False
    import SimpleITK as sitk
    sitk.WriteImage(sitk.ReadImage(str(source)), str(target), True)
    return True


def _is_zero_target(value) -> bool:
    if isinstance(value, list):
        return value[0] == 0 and value[1] == 0
    return value == 0


def build_weak_dataset(ct_folder: str | os.PathLike, regions_folder: str | os.PathLike,
                       table: str | os.PathLike | WeakLabelTable, raw_root: str | os.PathLike | None,
                       dataset_id: int, name: str, file_ending: str = ".nii.gz",
                       region_preset: str | None = "totalsegmentator_v2", image_mode: str = "copy", *,
                       mapping: str | os.PathLike | Mapping | None = None, target: str = "percentage",
                       case_column: str | None = None, table_preset: str | None = "lobes",
                       columns: Iterable[str] | Mapping | None = None, overwrite: bool = False,
                       skip_unmatched: bool = False, check: bool = True, accept_suspicious_regions: bool = False,
                       log: Callable[[str], None] | None = print) -> DatasetBuildReport:
    """Build `<raw_root>/Dataset<ID>_<name>` from CTs, region maps and a weak-target table.

    table: a CSV/TSV (read with `target`, `case_column`, `table_preset`, `columns`), an existing weak_labels.json,
    or a `WeakLabelTable`. image_mode: "copy" or "symlink" (CTs already in the dataset's format; others are
    rewritten). Refuses an existing dataset id unless `overwrite`. Unmatched cases are errors unless
    `skip_unmatched`. Region maps that look like the wrong preset (lobes on the wrong side, the labels of
    another tool's numbering) are errors unless `accept_suspicious_regions`. With `check`, the project's checker
    runs on the assembled dataset before it is put in place; its errors stop the build. Raises WeakDatasetError
    listing every problem.
    """
    say = log or (lambda _msg: None)
    ct_folder, regions_folder = Path(ct_folder), Path(regions_folder)
    if raw_root is None:
        raw_root = os.environ.get("nnUNet_raw")
        if not raw_root:
            raise WeakDatasetError([Problem("nnUNet_raw is not set and no output raw folder was given",
                                            hint="export nnUNet_raw=/path/to/nnUNet_raw")], title="no output folder")
    raw_root = Path(raw_root)
    problems: list[Problem] = []
    if not isinstance(dataset_id, int) or isinstance(dataset_id, bool) or not 1 <= dataset_id <= 999:
        problems.append(Problem(f"dataset id {dataset_id!r} must be an integer 1..999 (nnU-Net ids have three digits)"))
    if not _DATASET_NAME.match(str(name)):
        problems.append(Problem(f"dataset name {name!r} may hold only letters, digits, '_' and '-'"))
    if file_ending not in FILE_ENDINGS:
        problems.append(Problem(f"file ending {file_ending!r} is not one of {list(FILE_ENDINGS)}"))
    if image_mode not in IMAGE_MODES:
        problems.append(Problem(f"image mode {image_mode!r} must be one of {list(IMAGE_MODES)}"))
    for folder, what in ((ct_folder, "CT folder"), (regions_folder, "regions folder")):
        if not folder.is_dir():
            problems.append(Problem(f"{what} not found", file=str(folder)))
    if problems:
        raise WeakDatasetError(problems, title="cannot build the dataset")
    dataset_name = f"Dataset{dataset_id:03d}_{name}"
    final_dir = raw_root / dataset_name
    existing = _existing_datasets(raw_root, dataset_id)
    if existing and not overwrite:
        names = ", ".join(p.name for p in existing)
        raise WeakDatasetError([Problem(f"dataset id {dataset_id} exists already: {names}", file=str(raw_root),
                                        hint="pick another id (-d) or pass --overwrite")],
                               title="refused")
    for folder in (ct_folder.resolve(), regions_folder.resolve()):
        if any(folder == p.resolve() or p.resolve() in folder.parents for p in [final_dir, *existing]):
            raise WeakDatasetError([Problem("an input folder lies inside the dataset to be written",
                                            file=str(folder), hint="copy the inputs elsewhere first")],
                                   title="refused")

    resolve_mapping(region_preset, mapping)  # fail on a bad preset/mapping before any work
    report = DatasetBuildReport(dataset_dir=final_dir, dataset_name=dataset_name)

    # --- what is there
    cts = discover_cts(ct_folder)
    regions = discover_region_inputs(regions_folder, subfolders_only=ct_folder.resolve() == regions_folder.resolve())
    if not cts:
        raise WeakDatasetError([Problem(f"no CT files ({', '.join(IMAGE_SUFFIXES)})", file=str(ct_folder))],
                               title="cannot build the dataset")
    weak_table = table if isinstance(table, WeakLabelTable) else read_weak_labels_source(
        table, target=target, case_column=case_column, preset=table_preset, columns=columns)
    report.table_report = weak_table.report
    report.warnings.extend(weak_table.report.warnings)
    ct_ids, p1 = sanitize_all(cts, str(ct_folder))
    region_ids, p2 = sanitize_all(regions, str(regions_folder))
    if p1 or p2:
        raise WeakDatasetError(p1 + p2, title="case identifiers")
    for where, ids in (("CT", ct_ids), ("region map", region_ids)):
        for raw, safe in ids.items():
            if raw != safe:
                report.renamed[f"{where} {raw!r}"] = safe
    for raw, safe in weak_table.report.renamed.items():
        report.renamed[f"table {raw!r}"] = safe
    ct_by_case = {safe: cts[raw] for raw, safe in ct_ids.items()}
    region_by_case = {safe: regions[raw] for raw, safe in region_ids.items()}
    targets = weak_table.json["cases"]

    # --- matching
    unmatched: list[Problem] = []
    for case in sorted(ct_by_case):
        if case not in region_by_case:
            unmatched.append(Problem("CT has no region map", file=str(ct_by_case[case]), case=case,
                                     hint=f"add {case}{file_ending} or {case}/ to {regions_folder}"))
        elif case not in targets:
            unmatched.append(Problem("CT has no row in the table", file=str(ct_by_case[case]), case=case,
                                     hint="add a row (empty cells are allowed) or remove the CT"))
    for case in sorted(set(targets) - set(ct_by_case)):
        unmatched.append(Problem(f"table row has no CT (table id {weak_table.raw_ids.get(case, case)!r})",
                                 file=weak_table.report.path, case=case,
                                 hint=f"name the CT {case}.nii.gz, or fix the id in the table"))
    for case in sorted(set(region_by_case) - set(ct_by_case)):
        report.warnings.append(Problem("region map has no CT; ignored", file=str(region_by_case[case]), case=case,
                                       severity="warning"))
    if unmatched and not skip_unmatched:
        raise WeakDatasetError(unmatched, title="cases do not match (pass --skip-unmatched to leave them out)")
    for p in unmatched:
        report.skipped[p.case] = p.message
        report.warnings.append(Problem(p.message + "; left out", file=p.file, case=p.case, severity="warning"))
    cases = sorted(set(ct_by_case) & set(region_by_case) & set(targets))
    if not cases:
        raise WeakDatasetError([Problem("no case has a CT, a region map and a table row",
                                        hint="check that the three use the same case names")],
                               title="cannot build the dataset")
    label_values = {v for v in LOBE_LABELS.values() if v}
    bad_regions = [Problem(f"table has a target for region {r}, which is not one of {sorted(label_values)}",
                           file=weak_table.report.path, case=c, region=r)
                   for c in cases for r in map(int, targets[c]) if r not in label_values]
    if bad_regions:
        raise WeakDatasetError(bad_regions, title="invalid targets")

    # --- build under a temporary name
    for p in existing:
        say(f"[convert] --overwrite: {p} will be replaced")
    asides: list[Path] = []
    try:
        with atomic_dir(final_dir) as tmp:
            (tmp / "imagesTr").mkdir()
            (tmp / "labelsTr").mkdir()
            problems = []
            weak_cases: dict[str, dict] = {}
            for n, case in enumerate(cases, 1):
                say(f"[convert] {n}/{len(cases)} {case}")
                ct = ct_by_case[case]
                try:
                    region_report: RegionMapReport = convert_region_map(
                        region_by_case[case], tmp / "labelsTr" / f"{case}{file_ending}", preset=region_preset,
                        mapping=mapping, reference_ct=ct)
                except WeakDatasetError as e:
                    problems.extend(_with_case(p, case) for p in e.problems)
                    continue
                report.region_reports[case] = region_report
                report.warnings.extend(_with_case(w, case) for w in region_report.warnings)
                for p in region_report.suspicious:
                    if accept_suspicious_regions:
                        report.warnings.append(_with_case(p, case))
                    else:
                        problems.append(dataclasses.replace(_with_case(p, case), severity="error",
                                                            hint=(p.hint or "") + " (or pass "
                                                                 "--accept-suspicious-regions)"))
                if _place_image(ct, tmp / "imagesTr" / f"{case}_0000{file_ending}", image_mode):
                    report.converted_images.append(case)
                entry = {}
                for region, value in targets[case].items():
                    if region_report.region_voxels.get(int(region), 0) > 0:
                        entry[region] = value
                    elif _is_zero_target(value):
                        report.warnings.append(Problem("target 0 for a region with no voxel in the region map; "
                                                       "dropped", file=weak_table.report.path, case=case,
                                                       region=int(region), severity="warning"))
                    else:
                        problems.append(Problem(f"target {value} for a region with no voxel in the region map "
                                                f"{region_by_case[case].name}", file=weak_table.report.path,
                                                case=case, region=int(region),
                                                hint="check --region-preset, or the mask of this case"))
                weak_cases[case] = entry
            if problems:
                raise WeakDatasetError(problems, title="cannot build the dataset")

            weak_json = {"format": weak_table.json["format"], "target": weak_table.json["target"],
                         "cases": weak_cases}
            _, weak_problems = parse_weak_labels(weak_json, source=WEAK_LABELS_FILENAME)
            if any(p.severity == "error" for p in weak_problems):
                raise WeakDatasetError(weak_problems, title="invalid weak labels")
            atomic_write_json(tmp / WEAK_LABELS_FILENAME, weak_json)
            from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
            generate_dataset_json(str(tmp), {"0": "CT"}, dict(LOBE_LABELS), len(cases), file_ending,
                                  dataset_name=dataset_name,
                                  description=f"weak dataset: region maps from "
                                              f"{region_preset if mapping is None else str(mapping)}, "
                                              f"{weak_json['target']} targets from {weak_table.report.path}",
                                  license="unknown: set this before sharing the dataset",
                                  converted_by="nnunetv2_dram convert")
            report.cases = cases
            if check:
                report.check_problems = _run_checker(tmp, say)
                if report.check_errors:
                    raise WeakDatasetError(report.check_problems, title="the assembled dataset fails the checker; "
                                                                        "nothing was written")
            for p in existing:  # last step before the rename: move the old dataset out of the way
                aside = Path(tempfile.mkdtemp(prefix=f".{p.name}.old.", dir=raw_root))
                os.replace(p, aside / p.name)
                asides.append(aside)
    except BaseException:
        for aside in asides:  # put the old dataset back
            for child in aside.iterdir():
                if not (raw_root / child.name).exists():
                    os.replace(child, raw_root / child.name)
            shutil.rmtree(aside, ignore_errors=True)
        raise
    for aside in asides:
        shutil.rmtree(aside, ignore_errors=True)
    _warn_stale_nnunet_folders(dataset_id, dataset_name, report)
    say(f"[convert] wrote {final_dir} ({len(cases)} case(s))")
    return report


def _with_case(problem: Problem, case: str) -> Problem:
    return problem if problem.case is not None else dataclasses.replace(problem, case=case)


def _run_checker(dataset_dir: Path, say) -> list[Problem] | None:
    try:
        from nnunetv2_dram.weak_labels.checker import check_weak_dataset
    except ImportError as e:
        if e.name and e.name.startswith("nnunetv2_dram.weak_labels.checker"):
            say("[convert] dataset checker not available; skipped")
            return None
        raise
    return check_weak_dataset(dataset_dir)


def _warn_stale_nnunet_folders(dataset_id: int, dataset_name: str, report: DatasetBuildReport) -> None:
    prefix = f"Dataset{dataset_id:03d}_"
    for variable in ("nnUNet_preprocessed", "nnUNet_results"):
        root = os.environ.get(variable)
        if not root or not Path(root).is_dir():
            continue
        for p in sorted(Path(root).iterdir()):
            if p.is_dir() and p.name.startswith(prefix):
                if p.name == dataset_name:
                    report.warnings.append(Problem(f"{variable} holds data of an earlier {dataset_name}", file=str(p),
                                                   severity="warning",
                                                   hint="rerun nnUNetv2_plan_and_preprocess before training"))
                else:
                    report.warnings.append(Problem(f"{variable} holds another dataset with id {dataset_id}",
                                                   file=str(p), severity="warning",
                                                   hint="nnU-Net refuses ids with two names; remove it or pick "
                                                        "another id"))
