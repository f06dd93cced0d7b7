"""IoU/Dice and region-% error: exact values on hand-built arrays and tiny NIfTI folders."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nnunetv2_dram.cli import main
from nnunetv2_dram.evaluation.metrics import (EvaluationError, detect_file_ending, evaluate_folders, format_table,
                                              interval_error, region_percent_errors, region_percentages,
                                              segmentation_scores)
from nnunetv2_dram.weak_labels.format import FORMAT, RegionTarget

SHAPE = (4, 8, 10)  # z, y, x as numpy sees it


def two_boxes():
    """Reference x in [0, 4), prediction x in [2, 6), over all z and y 0..3: 64 voxels each, 32 shared."""
    ref = np.zeros(SHAPE, dtype=np.uint8)
    pred = np.zeros(SHAPE, dtype=np.uint8)
    ref[:, :4, 0:4] = 1
    pred[:, :4, 2:6] = 1
    return ref, pred


def write(path, array, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)):
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)


def region_map():
    """Region 1: x < 5, region 2: x >= 5; y = 0 is background. 4*7*5 = 140 voxels per region."""
    regions = np.zeros(SHAPE, dtype=np.uint8)
    regions[:, 1:, :5] = 1
    regions[:, 1:, 5:] = 2
    return regions


# ---------------------------------------------------------------------------------------------------------------
# arrays

def test_two_overlapping_boxes():
    ref, pred = two_boxes()
    s = segmentation_scores(ref, pred)
    assert (s["TP"], s["FP"], s["FN"]) == (32, 32, 32)
    assert s["TN"] == ref.size - 96
    assert (s["n_ref"], s["n_pred"]) == (64, 64)
    assert s["IoU"] == pytest.approx(1 / 3)
    assert s["Dice"] == pytest.approx(0.5)


def test_label_arrays_count_only_value_one_as_lesion():
    ref, pred = two_boxes()
    pred[:, 6:, :] = 3  # a foreign label is background, not lesion
    assert segmentation_scores(ref, pred)["FP"] == 32
    assert segmentation_scores(ref.astype(bool), pred == 1)["IoU"] == pytest.approx(1 / 3)


def test_empty_cases():
    empty = np.zeros(SHAPE, dtype=bool)
    both = segmentation_scores(empty, empty)
    assert math.isnan(both["IoU"]) and math.isnan(both["Dice"])
    ref, _ = two_boxes()
    missed = segmentation_scores(ref, empty)
    assert (missed["IoU"], missed["Dice"], missed["FN"]) == (0.0, 0.0, 64)
    false_alarm = segmentation_scores(empty, ref)
    assert (false_alarm["IoU"], false_alarm["FP"]) == (0.0, 64)


def test_ignore_mask_excluded():
    ref, pred = two_boxes()
    ignore = np.zeros(SHAPE, dtype=bool)
    ignore[:, :, 4:6] = True  # hides every false positive
    s = segmentation_scores(ref, pred, ignore)
    assert (s["TP"], s["FP"], s["FN"], s["n_ignored"]) == (32, 0, 32, 4 * 8 * 2)
    assert s["IoU"] == pytest.approx(0.5)


def test_region_percentages():
    regions = region_map()
    lesion = np.zeros(SHAPE, dtype=bool)
    lesion[:, :, 3:8] = True  # x 3,4 in region 1; x 5,6,7 in region 2; y = 0 lies outside both
    p = region_percentages(lesion, regions)
    assert p == {1: pytest.approx(100 * 4 * 7 * 2 / 140), 2: pytest.approx(100 * 4 * 7 * 3 / 140)}  # 40 %, 60 %
    with_absent = region_percentages(lesion, regions, labels=[2, 5])
    assert with_absent[2] == pytest.approx(60.0) and math.isnan(with_absent[5])


def test_interval_errors():
    assert interval_error(37.5, RegionTarget(40.0, 60.0, "interval")) == pytest.approx(2.5)
    assert interval_error(70.0, RegionTarget(40.0, 60.0, "interval")) == pytest.approx(10.0)
    assert interval_error(45.0, RegionTarget(40.0, 60.0, "interval")) == 0.0
    assert interval_error(45.0, RegionTarget(50.0, 50.0, "percentage")) == pytest.approx(5.0)


def test_region_percent_errors():
    regions = region_map()
    lesion = np.zeros(SHAPE, dtype=bool)
    lesion[:, :, 3:8] = True  # 40 % in region 1, 60 % in region 2
    targets = {1: RegionTarget(50.0, 75.0, "ctss", 4), 2: RegionTarget(62.5, 62.5, "percentage", 62.5)}
    assert region_percent_errors(lesion, regions, targets) == {1: pytest.approx(10.0), 2: pytest.approx(2.5)}
    assert region_percent_errors(lesion, regions, {1: RegionTarget(25.0, 50.0, "ctss", 3)}) == {1: 0.0}
    with pytest.raises(EvaluationError, match=r"case 'c7'.*region 4"):
        region_percent_errors(lesion, regions, {4: RegionTarget(0.0, 0.0, "percentage", 0)}, case="c7")


# ---------------------------------------------------------------------------------------------------------------
# folders

@pytest.fixture
def folders(tmp_path):
    """case_a: the two boxes; case_b: both empty; case_c: perfect prediction."""
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref, pred = two_boxes()
    write(ref_dir / "case_a.nii.gz", ref)
    write(pred_dir / "case_a.nii.gz", pred)
    write(ref_dir / "case_b.nii.gz", np.zeros(SHAPE))
    write(pred_dir / "case_b.nii.gz", np.zeros(SHAPE))
    write(ref_dir / "case_c.nii.gz", ref)
    write(pred_dir / "case_c.nii.gz", ref)
    return ref_dir, pred_dir


def test_folders_per_case_and_mean(folders):
    ref_dir, pred_dir = folders
    result = evaluate_folders(ref_dir, pred_dir)
    assert result["file_ending"] == ".nii.gz"
    rows = {r["case"]: r for r in result["cases"]}
    assert rows["case_a"]["IoU"] == pytest.approx(1 / 3) and rows["case_a"]["Dice"] == pytest.approx(0.5)
    assert math.isnan(rows["case_b"]["IoU"])
    assert rows["case_c"]["Dice"] == 1.0
    assert result["mean"]["IoU"] == pytest.approx((1 / 3 + 1) / 2)  # case_b skipped
    assert result["mean"]["Dice"] == pytest.approx(0.75)
    assert (result["mean"]["n_cases"], result["mean"]["n_cases_both_empty"]) == (3, 1)


def test_folders_agree_with_nnunet_compute_metrics(folders):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    ref_dir, pred_dir = folders
    for row in evaluate_folders(ref_dir, pred_dir)["cases"]:
        theirs = compute_metrics(row["reference_file"], row["prediction_file"], SimpleITKIO(), [1])["metrics"][1]
        for key in ("TP", "FP", "FN", "TN"):
            assert row[key] == theirs[key]
        for key in ("IoU", "Dice"):
            assert row[key] == pytest.approx(theirs[key], nan_ok=True)


def test_missing_prediction_names_case(folders):
    ref_dir, pred_dir = folders
    (pred_dir / "case_c.nii.gz").unlink()
    with pytest.raises(EvaluationError, match="case_c"):
        evaluate_folders(ref_dir, pred_dir)
    result = evaluate_folders(ref_dir, pred_dir, allow_missing=True)
    assert [r["case"] for r in result["cases"]] == ["case_a", "case_b"]
    assert result["missing_predictions"] == ["case_c"]


@pytest.mark.parametrize("change", ["shape", "spacing", "origin"])
def test_geometry_mismatch_names_file(folders, change):
    ref_dir, pred_dir = folders
    ref, pred = two_boxes()
    if change == "shape":
        write(pred_dir / "case_a.nii.gz", pred[:, :, :8])
    elif change == "spacing":
        write(pred_dir / "case_a.nii.gz", pred, spacing=(1.0, 1.0, 3.0))
    else:
        write(pred_dir / "case_a.nii.gz", pred, origin=(5.0, 0.0, 0.0))
    with pytest.raises(EvaluationError, match=rf"pred.case_a\.nii\.gz: {change}"):
        evaluate_folders(ref_dir, pred_dir)


def test_ignore_label_excluded(tmp_path):
    ref, pred = two_boxes()
    pseudo = pred.copy()
    pseudo[:, :, 4:6] = 2  # the prediction's false positives declared "ignore"
    write(tmp_path / "ref" / "c.nii.gz", ref)
    write(tmp_path / "pred" / "c.nii.gz", pseudo)
    row = evaluate_folders(tmp_path / "ref", tmp_path / "pred", ignore_label=2)["cases"][0]
    assert (row["TP"], row["FP"], row["FN"]) == (32, 0, 32) and row["IoU"] == pytest.approx(0.5)
    assert "other_labels" not in row
    undeclared = evaluate_folders(tmp_path / "ref", tmp_path / "pred")["cases"][0]
    assert undeclared["IoU"] == pytest.approx(32 / 64) and undeclared["other_labels"] == [2]


def weak_file(path, cases):
    path.write_text(json.dumps({"format": FORMAT, "target": "percentage", "cases": cases}))
    return path


def test_region_mae_in_folders(folders, tmp_path):
    ref_dir, pred_dir = folders
    regions_dir = tmp_path / "regions"
    for case in ("case_a", "case_b", "case_c"):
        write(regions_dir / f"{case}.nii.gz", region_map())
    # case_a's prediction covers x 2..5, y 0..3: region 1 gets x 2..4, y 1..3 -> 36 of 140 voxels;
    # region 2 gets x 5, y 1..3 -> 12 of 140
    p1, p2 = 100 * 36 / 140, 100 * 12 / 140
    weak = weak_file(tmp_path / "weak_labels.json",
                     {"case_a": {"1": [30, 40], "2": 10.0}, "case_b": {"1": 0.0, "2": [1, 5]}})
    result = evaluate_folders(ref_dir, pred_dir, regions_dir=regions_dir, weak_labels=weak)
    rows = {r["case"]: r for r in result["cases"]}
    assert rows["case_a"]["regions"][1]["percent"] == pytest.approx(p1)
    assert rows["case_a"]["regions"][1]["error"] == pytest.approx(30 - p1)
    assert rows["case_a"]["regions"][2]["error"] == pytest.approx(10 - p2)
    assert rows["case_b"]["regions"][2]["error"] == pytest.approx(1.0)
    assert "regions" not in rows["case_c"]  # no weak targets for it
    errors = [30 - p1, 10 - p2, 0.0, 1.0]
    assert result["mean"]["region_percent_mae"] == pytest.approx(np.mean(errors))
    assert (result["mean"]["n_regions"], result["mean"]["n_cases_with_targets"]) == (4, 2)
    assert "region-% MAE" in format_table(result)


def test_region_target_missing_from_map_names_case(folders, tmp_path):
    ref_dir, pred_dir = folders
    write(tmp_path / "regions" / "case_a.nii.gz", region_map())
    weak = weak_file(tmp_path / "weak_labels.json", {"case_a": {"3": 5.0}})
    with pytest.raises(EvaluationError, match=r"case 'case_a'.*region 3"):
        evaluate_folders(ref_dir, pred_dir, regions_dir=tmp_path / "regions", weak_labels=weak)


def test_file_ending_detection(tmp_path):
    write(tmp_path / "a.nii.gz", np.zeros(SHAPE))
    (tmp_path / "dataset.json").write_text("{}")
    assert detect_file_ending(tmp_path) == ".nii.gz"
    write(tmp_path / "b.nrrd", np.zeros(SHAPE))
    with pytest.raises(EvaluationError, match="more than one file ending"):
        detect_file_ending(tmp_path)


def test_two_processes_give_the_same_rows(folders):
    ref_dir, pred_dir = folders
    one = evaluate_folders(ref_dir, pred_dir)
    two = evaluate_folders(ref_dir, pred_dir, num_processes=2)
    assert [(r["case"], r["TP"], r["FP"], r["FN"]) for r in one["cases"]] == \
           [(r["case"], r["TP"], r["FP"], r["FN"]) for r in two["cases"]]


# ---------------------------------------------------------------------------------------------------------------
# command line

def test_cli_prints_table_and_writes_json(folders, capsys):
    ref_dir, pred_dir = folders
    assert main(["evaluate", "-ref", str(ref_dir), "-pred", str(pred_dir)]) == 0
    out = capsys.readouterr().out
    assert "case_a" in out and "0.3333" in out and "0.5000" in out
    assert "mean (n=3)" in out and "0.6667" in out and "0.7500" in out
    assert "both empty" in out
    summary = json.loads((pred_dir / "summary_dram.json").read_text())  # strict JSON: NaN became null
    assert summary["mean"]["Dice"] == pytest.approx(0.75)
    assert [r["IoU"] for r in summary["cases"]][1] is None
    assert not list(ref_dir.glob("*.json"))


def test_cli_output_and_user_errors(folders, tmp_path, capsys):
    ref_dir, pred_dir = folders
    out_file = tmp_path / "results" / "eval.json"
    assert main(["evaluate", "-ref", str(ref_dir), "-pred", str(pred_dir), "-o", str(out_file)]) == 0
    assert json.loads(out_file.read_text())["mean"]["n_cases"] == 3
    capsys.readouterr()
    assert main(["evaluate", "-ref", str(ref_dir), "-pred", str(pred_dir), "-o", str(ref_dir / "x.json")]) == 1
    assert "reference folder" in capsys.readouterr().err
    (pred_dir / "case_b.nii.gz").unlink()
    assert main(["evaluate", "-ref", str(ref_dir), "-pred", str(pred_dir), "-o", str(out_file)]) == 1
    err = capsys.readouterr().err
    assert "case_b" in err and "Traceback" not in err
    assert main(["evaluate", "-ref", str(ref_dir), "-pred", str(pred_dir), "--allow-missing",
                 "--regions", str(ref_dir)]) == 1
    assert "--weak-labels" in capsys.readouterr().err
