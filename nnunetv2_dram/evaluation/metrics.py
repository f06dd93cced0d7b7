"""IoU / Dice of binary lesion segmentations, and the region-% error of a prediction against weak targets.

Conventions (they are also written into every result, under "conventions"):
- lesion = voxels whose value is 1 (``LESION_LABEL``), as in nnU-Net's per-label evaluation; any other value
  counts as background and is listed per case under "other_labels" so it does not pass unnoticed.
- ``ignore_label``: voxels carrying it in the reference *or* the prediction are left out of TP/FP/FN/TN (nnU-Net
  only looks at the reference; our pseudo labels, evaluated as predictions, carry it too).
- reference and prediction both empty: IoU = Dice = NaN, as nnU-Net does; means skip NaN cases.
- region % = lesion voxels inside the region / all voxels of the region × 100. Ignore voxels count as not lesion
  there, because a weak target refers to the whole region.
- region-% error = distance of that percentage to the weak target interval [low, high] (0 inside it; an exact
  target is a zero-width interval, so the error is the absolute difference). The MAE is pooled over every
  (case, region) pair that has a target.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from nnunetv2_dram.weak_labels.format import RegionTarget, WeakLabels

LESION_LABEL = 1

CONVENTIONS = {
    "lesion": f"voxels with value {LESION_LABEL}; other values count as background",
    "ignore_label": "voxels with the ignore label in reference or prediction are excluded from IoU/Dice",
    "empty": "IoU and Dice are NaN (null in JSON) when reference and prediction are both empty; "
             "means skip them",
    "region_percent": "lesion voxels in region / region voxels x 100; ignore voxels count as not lesion",
    "region_percent_error": "distance to the weak target interval [low, high] in percentage points "
                            "(0 inside); MAE pooled over all (case, region) pairs with a target",
}


class EvaluationError(ValueError):
    """Input that cannot be evaluated (missing file, mismatching geometry, ...); the message says which."""


# ----------------------------------------------------------------------------------------------------------------
# array metrics

def _as_lesion_mask(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    return array if array.dtype == bool else array == LESION_LABEL


def segmentation_scores(reference: np.ndarray, prediction: np.ndarray,
                        ignore_mask: np.ndarray | None = None) -> dict:
    """IoU, Dice, TP/FP/FN/TN and voxel volumes of one binary segmentation.

    Boolean arrays are taken as lesion masks; label arrays mean lesion = (value == 1). Voxels where
    `ignore_mask` is True are left out of every count. Both empty -> IoU = Dice = NaN.
    """
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    ref = _as_lesion_mask(reference)
    pred = _as_lesion_mask(prediction)
    if ref.shape != pred.shape:
        raise EvaluationError(f"reference shape {ref.shape} != prediction shape {pred.shape}")
    if ignore_mask is not None:
        ignore_mask = np.asarray(ignore_mask, dtype=bool)
        if ignore_mask.shape != ref.shape:
            raise EvaluationError(f"ignore mask shape {ignore_mask.shape} != segmentation shape {ref.shape}")
    tp, fp, fn, tn = (int(v) for v in compute_tp_fp_fn_tn(ref, pred, ignore_mask))
    if tp + fp + fn == 0:
        iou = dice = math.nan
    else:
        iou = tp / (tp + fp + fn)
        dice = 2 * tp / (2 * tp + fp + fn)
    return {"IoU": iou, "Dice": dice, "TP": tp, "FP": fp, "FN": fn, "TN": tn,
            "n_ref": tp + fn, "n_pred": tp + fp,
            "n_ignored": int(ignore_mask.sum()) if ignore_mask is not None else 0}


def region_percentages(mask: np.ndarray, regions: np.ndarray,
                       labels: Iterable[int] | None = None) -> dict[int, float]:
    """{region label: lesion voxels in region / region voxels × 100}; NaN for a label absent from `regions`.

    `labels` defaults to every non-zero value in `regions`.
    """
    mask = _as_lesion_mask(mask)
    regions = np.asarray(regions)
    if mask.shape != regions.shape:
        raise EvaluationError(f"mask shape {mask.shape} != region map shape {regions.shape}")
    region_ids = regions.astype(np.int64, copy=False).ravel()
    if region_ids.size and region_ids.min() < 0:
        raise EvaluationError(f"region map holds negative value {int(region_ids.min())}; labels must be >= 0")
    size = int(region_ids.max()) + 1 if region_ids.size else 1
    region_voxels = np.bincount(region_ids, minlength=size)
    lesion_voxels = np.bincount(region_ids, weights=mask.ravel().astype(np.float64), minlength=size)
    if labels is None:
        labels = [int(v) for v in np.flatnonzero(region_voxels) if v != 0]
    out = {}
    for label in labels:
        label = int(label)
        n = int(region_voxels[label]) if 0 <= label < size else 0
        out[label] = 100.0 * float(lesion_voxels[label]) / n if n else math.nan
    return out


def interval_error(percent: float, target: RegionTarget) -> float:
    """Distance of `percent` to [target.low, target.high]: 0 inside, else to the nearest bound."""
    if percent < target.low:
        return target.low - percent
    if percent > target.high:
        return percent - target.high
    return 0.0


def region_percent_errors(pred_mask: np.ndarray, regions: np.ndarray,
                          weak_labels_for_case: Mapping[int, RegionTarget], case: str | None = None
                          ) -> dict[int, float]:
    """{region label: error in percentage points} for every region with a weak target.

    A target for a region that is absent from the map is an error naming the region (and `case` if given).
    """
    percents = region_percentages(pred_mask, regions, labels=[int(r) for r in weak_labels_for_case])
    errors = {}
    for label, target in weak_labels_for_case.items():
        p = percents[int(label)]
        if math.isnan(p):
            where = f"case '{case}': " if case is not None else ""
            raise EvaluationError(f"{where}region {label} has a weak target but no voxels in the region map")
        errors[int(label)] = interval_error(p, target)
    return errors


# ----------------------------------------------------------------------------------------------------------------
# folders

def supported_file_endings() -> list[str]:
    """Every file ending one of nnU-Net's readers takes, longest first (so '.nii.gz' wins over '.gz')."""
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES
    endings = {e.lower() for rw in LIST_OF_IO_CLASSES for e in rw.supported_file_endings}
    return sorted(endings, key=len, reverse=True)


def _visible_files(folder: Path) -> list[str]:
    # hidden names are skipped: our atomic writers use them for files still being written
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))


def detect_file_ending(folder: str | os.PathLike) -> str:
    """The one image file ending used in `folder`, e.g. '.nii.gz'."""
    folder = Path(folder)
    endings = supported_file_endings()
    found: dict[str, int] = {}
    for name in _visible_files(folder):
        for e in endings:
            if name.lower().endswith(e):
                found[name[-len(e):]] = found.get(name[-len(e):], 0) + 1
                break
    if not found:
        raise EvaluationError(f"{folder}: no segmentation files with an ending nnU-Net can read "
                              f"({', '.join(sorted(endings))})")
    if len(found) > 1:
        listing = ", ".join(f"{e} ({n} files)" for e, n in sorted(found.items()))
        raise EvaluationError(f"{folder}: more than one file ending ({listing}); say which with file_ending "
                              f"(--file-ending on the command line)")
    return next(iter(found))


def _case_files(folder: Path, file_ending: str) -> dict[str, Path]:
    return {name[: -len(file_ending)]: folder / name for name in _visible_files(folder)
            if name.endswith(file_ending) and len(name) > len(file_ending)}


def _read(reader_writer, path: Path) -> tuple[np.ndarray, dict]:
    try:
        return reader_writer.read_seg(str(path))
    except Exception as e:  # readers raise anything from RuntimeError to AssertionError
        raise EvaluationError(f"{path}: cannot be read by {type(reader_writer).__name__} ({e})") from e


def _check_same_geometry(array: np.ndarray, props: dict, path: Path,
                         ref_array: np.ndarray, ref_props: dict, ref_path: Path) -> None:
    """Same tests as nnU-Net's dataset verification: shape, spacing, then origin/direction or affine."""
    def mismatch(what, a, b):
        return EvaluationError(f"{path}: {what} {a} does not match {b} of {ref_path}; "
                               f"predictions and region maps must have the reference's geometry")
    if array.shape != ref_array.shape:
        raise mismatch("shape", tuple(array.shape[1:]), tuple(ref_array.shape[1:]))
    if "spacing" in props and "spacing" in ref_props and not np.allclose(props["spacing"], ref_props["spacing"]):
        raise mismatch("spacing", tuple(props["spacing"]), tuple(ref_props["spacing"]))
    if "sitk_stuff" in props and "sitk_stuff" in ref_props:
        for key in ("origin", "direction"):
            a, b = props["sitk_stuff"][key], ref_props["sitk_stuff"][key]
            if not np.allclose(a, b):
                raise mismatch(key, tuple(a), tuple(b))
    if "nibabel_stuff" in props and "nibabel_stuff" in ref_props:
        a, b = props["nibabel_stuff"]["original_affine"], ref_props["nibabel_stuff"]["original_affine"]
        if not np.allclose(a, b):
            raise mismatch("affine", np.asarray(a).tolist(), np.asarray(b).tolist())


def evaluate_case(case: str, reference_file: str | os.PathLike, prediction_file: str | os.PathLike,
                  reader_writer, ignore_label: int | None = None, regions_file: str | os.PathLike | None = None,
                  targets: Mapping[int, RegionTarget] | None = None) -> dict:
    """One row of `evaluate_folders`. Region errors only when both `regions_file` and `targets` are given."""
    reference_file, prediction_file = Path(reference_file), Path(prediction_file)
    ref, ref_props = _read(reader_writer, reference_file)
    pred, pred_props = _read(reader_writer, prediction_file)
    _check_same_geometry(pred, pred_props, prediction_file, ref, ref_props, reference_file)
    ignore_mask = None
    if ignore_label is not None:
        ignore_mask = (ref == ignore_label) | (pred == ignore_label)
    row = {"case": case, "reference_file": str(reference_file), "prediction_file": str(prediction_file)}
    row.update(segmentation_scores(ref == LESION_LABEL, pred == LESION_LABEL, ignore_mask))
    known = {0, LESION_LABEL} | ({ignore_label} if ignore_label is not None else set())
    other = sorted({float(v) for v in np.unique(pred)} - known)
    if other:
        row["other_labels"] = [int(v) if float(v).is_integer() else v for v in other]
    if regions_file is not None and targets:
        regions_file = Path(regions_file)
        regions, region_props = _read(reader_writer, regions_file)
        _check_same_geometry(regions, region_props, regions_file, ref, ref_props, reference_file)
        lesion = pred == LESION_LABEL
        percents = region_percentages(lesion, regions, labels=list(targets))
        errors = region_percent_errors(lesion, regions, targets, case=case)
        row["regions_file"] = str(regions_file)
        row["regions"] = {int(r): {"percent": percents[int(r)], "target": [t.low, t.high],
                                   "error": errors[int(r)]} for r, t in sorted(targets.items())}
        row["region_percent_mae"] = float(np.mean(list(errors.values())))
    return row


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def evaluate_folders(ref_dir: str | os.PathLike, pred_dir: str | os.PathLike, file_ending: str | None = None,
                     regions_dir: str | os.PathLike | None = None, weak_labels: str | os.PathLike | WeakLabels | None = None,
                     num_processes: int = 1, ignore_label: int | None = None, allow_missing: bool = False) -> dict:
    """Evaluate every reference case in `ref_dir` against the file of the same case id in `pred_dir`.

    Returns {"cases": [row, ...], "mean": {...}, "missing_predictions": [...], "unmatched_predictions": [...],
    "file_ending", "ignore_label", "conventions"}. Region-% errors need both `regions_dir` (region maps named
    like the references) and `weak_labels`.
    """
    ref_dir, pred_dir = Path(ref_dir), Path(pred_dir)
    for what, folder in (("reference", ref_dir), ("prediction", pred_dir), ("region", regions_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise EvaluationError(f"{what} folder {folder} does not exist")
    if (regions_dir is None) != (weak_labels is None):
        raise EvaluationError("region-% errors need both the region maps folder and the weak labels file")
    if isinstance(weak_labels, (str, os.PathLike)):
        from nnunetv2_dram.weak_labels.format import load_weak_labels
        from nnunetv2_dram.weak_labels.problems import WeakDatasetError
        try:
            weak_labels = load_weak_labels(weak_labels)
        except WeakDatasetError as e:
            raise EvaluationError(str(e)) from e

    if file_ending is None:
        file_ending = detect_file_ending(ref_dir)
    references = _case_files(ref_dir, file_ending)
    if not references:
        raise EvaluationError(f"{ref_dir}: no reference files ending in {file_ending}")
    predictions = _case_files(pred_dir, file_ending)
    missing = sorted(set(references) - set(predictions))
    if missing and not allow_missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise EvaluationError(f"{pred_dir}: no prediction for case(s) {shown} (expected "
                              f"{pred_dir / (missing[0] + file_ending)}); predict them, or allow missing cases")
    cases = [c for c in sorted(references) if c in predictions]
    if not cases:
        raise EvaluationError(f"{pred_dir}: none of the {len(references)} reference cases has a prediction")

    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending
    try:
        reader_writer = determine_reader_writer_from_file_ending(file_ending, str(references[cases[0]]),
                                                                 verbose=False)()
    except RuntimeError as e:
        raise EvaluationError(f"{references[cases[0]]}: no nnU-Net reader takes it ({e})") from e

    jobs = []
    for case in cases:
        targets = weak_labels.regions_of(case) if weak_labels is not None else {}
        regions_file = None
        if targets:
            regions_file = Path(regions_dir) / (case + file_ending)
            if not regions_file.is_file():
                raise EvaluationError(f"case '{case}' has weak targets but no region map {regions_file}")
        jobs.append((case, references[case], predictions[case], reader_writer, ignore_label, regions_file,
                     targets or None))
    if num_processes > 1 and len(jobs) > 1:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            rows = pool.starmap(evaluate_case, jobs)
    else:
        rows = [evaluate_case(*job) for job in jobs]

    region_errors = [r["error"] for row in rows for r in row.get("regions", {}).values()]
    mean = {"IoU": _finite_mean([r["IoU"] for r in rows]), "Dice": _finite_mean([r["Dice"] for r in rows]),
            "n_cases": len(rows), "n_cases_both_empty": sum(math.isnan(r["IoU"]) for r in rows)}
    if weak_labels is not None:
        mean["region_percent_mae"] = float(np.mean(region_errors)) if region_errors else math.nan
        mean["n_regions"] = len(region_errors)
        mean["n_cases_with_targets"] = sum("regions" in r for r in rows)
    return {"reference_folder": str(ref_dir), "prediction_folder": str(pred_dir), "file_ending": file_ending,
            "ignore_label": ignore_label, "cases": rows, "mean": mean, "missing_predictions": missing,
            "unmatched_predictions": sorted(set(predictions) - set(references)), "conventions": CONVENTIONS}


def to_json_compatible(obj):
    """NaN -> None (JSON has no NaN), int dict keys -> str, numpy scalars -> Python."""
    if isinstance(obj, Mapping):
        return {str(k): to_json_compatible(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_compatible(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def format_table(result: dict) -> str:
    """Fixed-width table: case, IoU, Dice[, region-% MAE], then a mean row and the notes a reader needs."""
    with_regions = "region_percent_mae" in result["mean"]

    def num(v, width):
        return f"{'n/a' if v is None or math.isnan(v) else f'{v:.4f}':>{width}}"

    rows = result["cases"]
    mean = result["mean"]
    case_width = max([len("case"), len(f"mean (n={mean['n_cases']})")] + [len(r["case"]) for r in rows])
    header = f"{'case':<{case_width}}  {'IoU':>8}  {'Dice':>8}" + (f"  {'region-% MAE':>12}" if with_regions else "")
    lines = [header, "-" * len(header)]
    for r in rows:
        line = f"{r['case']:<{case_width}}  {num(r['IoU'], 8)}  {num(r['Dice'], 8)}"
        if with_regions:
            line += f"  {num(r.get('region_percent_mae'), 12)}"
        lines.append(line)
    lines.append("-" * len(header))
    line = f"{'mean (n=' + str(mean['n_cases']) + ')':<{case_width}}  {num(mean['IoU'], 8)}  {num(mean['Dice'], 8)}"
    if with_regions:
        line += f"  {num(mean['region_percent_mae'], 12)}"
    lines.append(line)
    if mean["n_cases_both_empty"]:
        lines.append(f"n/a: reference and prediction both empty (IoU/Dice undefined); "
                     f"{mean['n_cases_both_empty']} such case(s) skipped in the mean")
    if with_regions:
        lines.append(f"region-% MAE in percentage points to the weak target interval, pooled over "
                     f"{mean['n_regions']} region(s) of {mean['n_cases_with_targets']} case(s)")
    if result.get("ignore_label") is not None:
        lines.append(f"voxels labelled {result['ignore_label']} (ignore) excluded from IoU/Dice")
    others = [r["case"] for r in rows if r.get("other_labels")]
    if others:
        lines.append(f"warning: predictions of {', '.join(others)} hold values other than 0/{LESION_LABEL}; "
                     f"counted as background")
    if result.get("missing_predictions"):
        lines.append(f"missing predictions (skipped): {', '.join(result['missing_predictions'])}")
    return "\n".join(lines)
