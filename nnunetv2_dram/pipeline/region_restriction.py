"""Predictions restricted to region maps: every voxel outside the regions (lobes, lungs) becomes background.

nnUNetv2_predict segments whole images, so the final network also marks lesions outside the lungs. With the
region maps of the same cases (e.g. labelsTs of the weak dataset), every prediction voxel whose region label is 0
is set to 0. Files are paired by case id (`CASE<file_ending>` in both folders) and read and written with
nnU-Net's reader/writer for the file ending. Every pair is checked first (region map present, same shape,
spacing, origin/direction or affine); a problem stops before anything is written. Each output is written under
a temporary name and renamed into place; the input folders are only read.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUMMARY_FILE = "restriction.json"


class RestrictionError(Exception):
    pass


@dataclass
class RestrictionCase:
    case: str
    prediction: Path
    regions: Path
    output: Path


def _inside_or_same(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _prediction_file_ending(pred_dir: Path) -> str:
    """nnUNetv2_predict writes its dataset.json (with `file_ending`) next to the predictions; else detected."""
    from nnunetv2_dram.evaluation.metrics import EvaluationError, detect_file_ending
    dataset_json = pred_dir / "dataset.json"
    if dataset_json.is_file():
        try:
            ending = json.loads(dataset_json.read_text()).get("file_ending")
        except (json.JSONDecodeError, UnicodeDecodeError):
            ending = None
        if isinstance(ending, str) and ending:
            return ending
    try:
        return detect_file_ending(pred_dir)
    except EvaluationError as e:
        raise RestrictionError(str(e)) from None


def _reader_writer(pred_dir: Path, file_ending: str, example: Path):
    from nnunetv2.imageio.reader_writer_registry import (determine_reader_writer_from_file_ending,
                                                         recursive_find_reader_writer_by_name)
    dataset_json = pred_dir / "dataset.json"
    override = None
    if dataset_json.is_file():
        try:
            override = json.loads(dataset_json.read_text()).get("overwrite_image_reader_writer")
        except (json.JSONDecodeError, UnicodeDecodeError):
            override = None
    if override:
        return recursive_find_reader_writer_by_name(override)()
    return determine_reader_writer_from_file_ending(file_ending, str(example), verbose=False)()


def plan_restriction(pred_dir: str | os.PathLike, region_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     file_ending: str | None = None) -> tuple[str, list[RestrictionCase]]:
    """(file ending, one entry per prediction); entries whose region map is missing included."""
    from nnunetv2_dram.evaluation.metrics import _case_files
    pred_dir, region_dir, out_dir = Path(pred_dir), Path(region_dir), Path(out_dir)
    for folder, flag in ((pred_dir, "-i"), (region_dir, "-r")):
        if not folder.is_dir():
            raise RestrictionError(f"{flag} {folder}: no such folder")
    for folder, flag in ((pred_dir, "-i"), (region_dir, "-r")):
        if _inside_or_same(out_dir, folder):
            raise RestrictionError(f"-o {out_dir} lies in the input folder {folder} ({flag}); the inputs are only "
                                   f"read, so give -o a folder elsewhere")
    ending = file_ending or _prediction_file_ending(pred_dir)
    predictions = _case_files(pred_dir, ending)
    if not predictions:
        raise RestrictionError(f"{pred_dir}: no predictions ending in {ending}")
    return ending, [RestrictionCase(case, path, region_dir / f"{case}{ending}", out_dir / f"{case}{ending}")
                    for case, path in sorted(predictions.items())]


def _geometry_mismatch(pred, pred_props: dict, regions, region_props: dict) -> str | None:
    """What differs between prediction and region map (shape, spacing, origin/direction or affine), else None."""
    if pred.shape != regions.shape:
        return f"shape {tuple(regions.shape[1:])} vs {tuple(pred.shape[1:])}"
    pairs = [("spacing", pred_props.get("spacing"), region_props.get("spacing"))]
    if "sitk_stuff" in pred_props and "sitk_stuff" in region_props:
        pairs += [(k, pred_props["sitk_stuff"][k], region_props["sitk_stuff"][k]) for k in ("origin", "direction")]
    if "nibabel_stuff" in pred_props and "nibabel_stuff" in region_props:
        pairs.append(("affine", pred_props["nibabel_stuff"]["original_affine"],
                      region_props["nibabel_stuff"]["original_affine"]))
    for what, a, b in pairs:
        if a is not None and b is not None and not np.allclose(np.asarray(a, float), np.asarray(b, float),
                                                               rtol=1e-4, atol=1e-4):
            return f"{what} {np.asarray(b).tolist()} vs {np.asarray(a).tolist()}"
    return None


def _read_pair(reader_writer, item: RestrictionCase):
    arrays = []
    for path in (item.prediction, item.regions):
        try:
            arrays.append(reader_writer.read_seg(str(path)))
        except Exception as e:  # nnU-Net's readers raise anything from RuntimeError to AssertionError
            raise RestrictionError(f"case {item.case}: {path} cannot be read by {type(reader_writer).__name__} "
                                   f"({e})") from None
    (pred, pred_props), (regions, region_props) = arrays
    mismatch = _geometry_mismatch(pred, pred_props, regions, region_props)
    if mismatch:
        raise RestrictionError(f"case {item.case}: the region map {item.regions} does not lie on the grid of the "
                               f"prediction {item.prediction}: {mismatch}")
    return pred, pred_props, regions


def restrict_predictions(pred_dir: str | os.PathLike, region_dir: str | os.PathLike, out_dir: str | os.PathLike,
                         file_ending: str | None = None, log=print) -> dict:
    """Write every prediction of `pred_dir`, with the voxels outside its region map set to 0, into `out_dir`.

    Returns (and writes as `out_dir`/restriction.json) per case the foreground voxels before and after.
    """
    ending, cases = plan_restriction(pred_dir, region_dir, out_dir, file_ending)
    reader_writer = _reader_writer(Path(pred_dir), ending, cases[0].prediction)
    problems = []
    for item in cases:  # every pair is checked before the first file is written
        if not item.regions.is_file():
            problems.append(f"case {item.case}: no region map {item.regions} for the prediction {item.prediction}")
            continue
        try:
            _read_pair(reader_writer, item)
        except RestrictionError as e:
            problems.append(str(e))
    if problems:
        raise RestrictionError("\n".join(problems))
    from nnunetv2_dram.io_utils import atomic_path, atomic_write_json
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_case = {}
    for item in cases:
        pred, props, regions = _read_pair(reader_writer, item)
        restricted = np.where(regions > 0, pred, 0).astype(pred.dtype, copy=False)
        with atomic_path(item.output) as tmp:
            reader_writer.write_seg(restricted[0], str(tmp), props)
        before, after = int(np.count_nonzero(pred)), int(np.count_nonzero(restricted))
        per_case[item.case] = {"foreground_voxels": before, "foreground_voxels_in_regions": after}
        if log:
            log(f"{item.case}: {before - after} of {before} foreground voxel(s) lay outside the regions")
    summary = {"predictions": str(pred_dir), "regions": str(region_dir), "file_ending": ending, "cases": per_case}
    atomic_write_json(out_dir / SUMMARY_FILE, summary)
    return summary
