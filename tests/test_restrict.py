"""`nnunetv2_dram restrict`: predictions with every voxel outside the region maps set to background."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_dram.pipeline.region_restriction import RestrictionError, restrict_predictions


def _write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _hash_tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cases(tmp_path: Path, ending: str, n: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    pred_dir, region_dir = tmp_path / "pred", tmp_path / "regions"
    expected = {}
    for i in range(n):
        pred = (rng.random((6, 12, 10)) > 0.5).astype(np.uint8)
        regions = np.zeros((6, 12, 10), np.uint8)
        regions[1:5, 2:10, 2:5] = 1  # a "left lung" and a "right lung"
        regions[1:5, 2:10, 6:9] = 2
        _write(pred_dir / f"case_{i}{ending}", pred)
        _write(region_dir / f"case_{i}{ending}", regions)
        expected[f"case_{i}"] = np.where(regions > 0, pred, 0)
    return pred_dir, region_dir, expected


@pytest.mark.parametrize("ending", [".nii.gz", ".mha"])
def test_voxels_outside_the_regions_become_background(tmp_path, ending):
    pred_dir, region_dir, expected = _cases(tmp_path, ending)
    before = {**_hash_tree(pred_dir), **{f"r/{k}": v for k, v in _hash_tree(region_dir).items()}}
    out = tmp_path / "out"
    proc = subprocess.run([str(Path(sys.executable).parent / "nnunetv2_dram"), "restrict", "-i", str(pred_dir),
                           "-r", str(region_dir), "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "3 case(s) written" in proc.stdout
    for case, want in expected.items():
        got = sitk.ReadImage(str(out / f"{case}{ending}"))
        assert np.array_equal(sitk.GetArrayFromImage(got), want)
        assert got.GetSpacing() == (1.0, 1.0, 2.0)
    summary = json.loads((out / "restriction.json").read_text())
    assert summary["cases"]["case_0"]["foreground_voxels_in_regions"] == int(expected["case_0"].sum())
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary files left behind"
    after = {**_hash_tree(pred_dir), **{f"r/{k}": v for k, v in _hash_tree(region_dir).items()}}
    assert after == before, "the inputs are only read"


def test_predictions_folder_of_nnunet_gives_the_file_ending(tmp_path):
    # nnUNetv2_predict writes dataset.json next to its predictions; other files in the folder are left alone
    pred_dir, region_dir, expected = _cases(tmp_path, ".nrrd", n=1)
    (pred_dir / "dataset.json").write_text(json.dumps({"file_ending": ".nrrd"}))
    np.savez(pred_dir / "case_0.npz", probabilities=np.zeros(3))
    restrict_predictions(pred_dir, region_dir, tmp_path / "out", log=None)
    assert np.array_equal(_read(tmp_path / "out" / "case_0.nrrd"), expected["case_0"])


@pytest.mark.parametrize("problem", ["shape", "spacing", "missing"])
def test_bad_pairs_stop_before_anything_is_written(tmp_path, problem):
    pred_dir, region_dir, _ = _cases(tmp_path, ".nii.gz")
    bad = region_dir / "case_2.nii.gz"
    if problem == "shape":
        _write(bad, np.ones((6, 12, 11)))
    elif problem == "spacing":
        _write(bad, np.ones((6, 12, 10)), spacing=(1.0, 1.0, 3.0))
    else:
        bad.unlink()
    out = tmp_path / "out"
    proc = subprocess.run([str(Path(sys.executable).parent / "nnunetv2_dram"), "restrict", "-i", str(pred_dir),
                           "-r", str(region_dir), "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    message = proc.stderr
    assert "case case_2" in message and str(bad) in message and str(pred_dir / "case_2.nii.gz") in message
    if problem != "missing":
        assert problem in message
    assert not out.exists() or not any(out.iterdir()), "nothing is written when one pair is wrong"


def test_output_inside_an_input_folder_is_refused(tmp_path):
    pred_dir, region_dir, _ = _cases(tmp_path, ".nii.gz", n=1)
    for out in (pred_dir, region_dir / "restricted"):
        with pytest.raises(RestrictionError, match="lies in the input folder"):
            restrict_predictions(pred_dir, region_dir, out, log=None)
    assert sorted(p.name for p in region_dir.iterdir()) == ["case_0.nii.gz"]
