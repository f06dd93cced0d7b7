"""Region maps from TotalSegmentator / lungmask output (tiny phantoms shaped like the tools' files)."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import SimpleITK as sitk

import lobe_phantom as lp
from nnunetv2_dram.commands.regions import PRESET_NAMES
from nnunetv2_dram.conversion.region_maps import (PRESETS, MissingDependencyError, convert_region_map, run_lungmask,
                                                  run_totalsegmentator)
from nnunetv2_dram.weak_labels.problems import WeakDatasetError


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture
def ct(tmp_path):
    return lp.write_ct(tmp_path / "ct.nii.gz")


def test_totalsegmentator_v2_multilabel_with_other_organs(tmp_path, ct):
    source = lp.write(lp.totalseg_v2_multilabel(), tmp_path / "ts_total_ml.nii.gz")
    report = convert_region_map(source, tmp_path / "out.nii.gz", preset="totalsegmentator_v2", reference_ct=ct)
    np.testing.assert_array_equal(read(tmp_path / "out.nii.gz"), lp.our_lobes())
    assert report.used == {10: 1, 11: 2, 12: 3, 13: 4, 14: 5}
    assert {5, 1, 51, 16, 43, 92, 116} == set(report.dropped)  # the organs, reported as dropped
    assert report.missing_regions == [] and report.warnings == [] and report.suspicious == []
    assert report.region_voxels == {v: int((lp.our_lobes() == v).sum()) for v in range(1, 6)}
    out = sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    assert out.GetPixelID() == sitk.sitkUInt8
    assert np.allclose(out.GetSpacing(), lp.SPACING) and np.allclose(out.GetOrigin(), lp.ORIGIN)


def test_totalsegmentator_v1_numbering(tmp_path, ct):
    source = lp.write(lp.totalseg_v1_multilabel(), tmp_path / "ts_v1.nii.gz")
    report = convert_region_map(source, tmp_path / "out.nii.gz", preset="totalsegmentator_v1", reference_ct=ct)
    np.testing.assert_array_equal(read(tmp_path / "out.nii.gz"), lp.our_lobes())
    assert report.used == {13: 1, 14: 2, 15: 3, 16: 4, 17: 5} and report.warnings == []


def test_v1_file_read_with_v2_preset_is_flagged(tmp_path, ct):
    source = lp.write(lp.totalseg_v1_multilabel(), tmp_path / "ts_v1.nii.gz")
    report = convert_region_map(source, tmp_path / "out.nii.gz", preset="totalsegmentator_v2", reference_ct=ct)
    text = "\n".join(str(w) for w in report.suspicious)
    assert "totalsegmentator_v1" in text  # the hint names the preset that fits
    assert "left-lobe regions" in text  # pancreas/adrenals landed on "left" lobes: sidedness check


def test_per_structure_folder(tmp_path, ct):
    folder = lp.write_totalseg_folder(tmp_path / "case1" / "segmentations")
    # the case folder itself is accepted: segmentations/ inside it is found
    report = convert_region_map(tmp_path / "case1", tmp_path / "out.nii.gz", preset="totalsegmentator_v2",
                                reference_ct=ct)
    np.testing.assert_array_equal(read(tmp_path / "out.nii.gz"), lp.our_lobes())
    assert report.kind == "per-structure folder"
    assert set(report.used) == set(lp.TS_NAMES.values())
    assert {"liver", "heart", "spleen"} == set(report.dropped)
    assert folder.is_dir() and len(list(folder.iterdir())) == 8  # input left alone


def test_per_structure_folder_without_lobes_names_expected_files(tmp_path):
    folder = tmp_path / "seg"
    lp.write(np.ones(lp.SHAPE, np.uint8), folder / "liver.nii.gz")
    with pytest.raises(WeakDatasetError, match="lung_upper_lobe_left") as e:
        convert_region_map(folder, tmp_path / "out.nii.gz", preset="totalsegmentator_v2")
    assert str(folder) in str(e.value)
    assert not (tmp_path / "out.nii.gz").exists()


def test_lungmask_ltrclobes(tmp_path, ct):
    # lungmask writes our numbering already (1 LUL .. 5 RLL) as uint8 on the CT's grid
    source = lp.write(lp.our_lobes(), tmp_path / "lungmask_ltrclobes.nii.gz")
    report = convert_region_map(source, tmp_path / "out.nii.gz", preset="lungmask_ltrclobes", reference_ct=ct)
    np.testing.assert_array_equal(read(tmp_path / "out.nii.gz"), lp.our_lobes())
    assert report.dropped == {} and report.warnings == []


def test_lungmask_file_in_ras_orientation_is_reoriented_losslessly(tmp_path, ct):
    """A label map saved by a nibabel-style tool in RAS (x and y flipped) on the same physical grid."""
    arr = lp.our_lobes()[:, ::-1, ::-1].copy()
    size_x, size_y = lp.SHAPE[2], lp.SHAPE[1]
    origin = (lp.ORIGIN[0] + (size_x - 1) * lp.SPACING[0], lp.ORIGIN[1] + (size_y - 1) * lp.SPACING[1], lp.ORIGIN[2])
    source = lp.write(arr, tmp_path / "ras.nii.gz", origin=origin, direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    report = convert_region_map(source, tmp_path / "out.nii.gz", preset="lungmask_ltrclobes", reference_ct=ct)
    assert report.reoriented and "LPS" in report.reoriented
    np.testing.assert_array_equal(read(tmp_path / "out.nii.gz"), lp.our_lobes())
    assert report.warnings == []


def test_custom_mapping_file_by_label_and_by_name(tmp_path, ct):
    arr = lp.our_lobes() * 10  # a tool numbering lobes 10, 20, 30, 40, 50 and 99 for something else
    arr[0, 0, 0] = 99
    source = lp.write(arr.astype(np.uint8), tmp_path / "other_tool.nii.gz")
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"10": 1, "20": "left_lower_lobe", "30": 3, "40": 4, "50": 5}))
    report = convert_region_map(source, tmp_path / "out.nii.gz", mapping=mapping, reference_ct=ct)
    np.testing.assert_array_equal(read(tmp_path / "out.nii.gz"), lp.our_lobes())
    assert report.dropped == {99: 1}

    folder = lp.write_totalseg_folder(tmp_path / "seg", with_other_structures=False)
    by_name = {"lung_upper_lobe_left": 1, "lung_lower_lobe_left": 2, "lung_upper_lobe_right": 3,
               "lung_middle_lobe_right": 4, "lung_lower_lobe_right.nii.gz": 5}
    convert_region_map(folder, tmp_path / "out2.nii.gz", mapping=by_name)
    np.testing.assert_array_equal(read(tmp_path / "out2.nii.gz"), lp.our_lobes())


def test_bad_mapping_target_is_reported(tmp_path):
    source = lp.write(lp.our_lobes(), tmp_path / "m.nii.gz")
    with pytest.raises(WeakDatasetError, match="left_upper_lob"):
        convert_region_map(source, tmp_path / "out.nii.gz", mapping={"1": "left_upper_lob"})


@pytest.mark.parametrize("change", ["shape", "spacing", "origin"])
def test_geometry_mismatch_names_the_file(tmp_path, ct, change):
    arr = lp.totalseg_v2_multilabel()
    geometry = {}
    if change == "shape":
        arr = arr[:, :, :12].copy()
    elif change == "spacing":
        geometry["spacing"] = (1.5, 1.25, 2.5)
    else:
        geometry["origin"] = (0.0, 5.0, 30.0)
    source = lp.write(arr, tmp_path / "case7_lobes.nii.gz", **geometry)
    with pytest.raises(WeakDatasetError) as e:
        convert_region_map(source, tmp_path / "out.nii.gz", preset="totalsegmentator_v2", reference_ct=ct)
    message = str(e.value)
    assert "case7_lobes.nii.gz" in message and change in message and str(ct) in message
    assert not (tmp_path / "out.nii.gz").exists()


def test_probability_map_is_refused(tmp_path):
    source = lp.write(np.full(lp.SHAPE, 0.4, np.float32), tmp_path / "prob.nii.gz")
    with pytest.raises(WeakDatasetError, match="non-integer"):
        convert_region_map(source, tmp_path / "out.nii.gz", preset="lungmask_ltrclobes")


def test_wrong_preset_with_no_lobe_labels_is_an_error(tmp_path):
    arr = lp.totalseg_v2_multilabel()
    arr[np.isin(arr, [10, 11, 12, 13, 14])] = 0  # organs only
    source = lp.write(arr, tmp_path / "ts.nii.gz")
    with pytest.raises(WeakDatasetError, match="no voxel maps to any region"):
        convert_region_map(source, tmp_path / "out.nii.gz", preset="totalsegmentator_v2")


@pytest.mark.parametrize("runner, module, package", [(run_lungmask, "lungmask", "pip install lungmask"),
                                                      (run_totalsegmentator, "totalsegmentator",
                                                       "pip install TotalSegmentator")])
def test_missing_tool_names_the_pip_package(tmp_path, ct, monkeypatch, runner, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import of it now fails, whether installed or not
    with pytest.raises(MissingDependencyError, match=package):
        runner(ct, tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()


def test_lungmask_runner_glue(tmp_path, ct, monkeypatch):
    """The lungmask call as its README documents it (LMInferer(modelname=...).apply(sitk image) -> array)."""
    calls = {}

    class LMInferer:
        def __init__(self, modelname="R231", **kwargs):
            calls["modelname"] = modelname

        def apply(self, image):
            calls["size"] = image.GetSize()
            return lp.our_lobes()

    fake = types.ModuleType("lungmask")
    fake.LMInferer = LMInferer
    monkeypatch.setitem(sys.modules, "lungmask", fake)
    report = run_lungmask(ct, tmp_path / "out.nii.gz", force_cpu=True)
    assert calls == {"modelname": "LTRCLobes", "size": sitk.ReadImage(str(ct)).GetSize()}
    np.testing.assert_array_equal(read(tmp_path / "out.nii.gz"), lp.our_lobes())
    assert report.mapping == "lungmask_ltrclobes"


def test_totalsegmentator_runner_glue(tmp_path, ct, monkeypatch):
    """TotalSegmentator's python API with ml=False writes <structure>.nii.gz files into the output folder."""
    calls = {}

    def totalsegmentator(input, output, ml=False, fast=False, task="total", roi_subset=None, quiet=False,
                         device="gpu"):
        calls.update(ml=ml, task=task, roi_subset=roi_subset, device=device)
        lp.write_totalseg_folder(lp.Path(output), with_other_structures=False)

    api = types.ModuleType("totalsegmentator.python_api")
    api.totalsegmentator = totalsegmentator
    package = types.ModuleType("totalsegmentator")
    package.python_api = api
    monkeypatch.setitem(sys.modules, "totalsegmentator", package)
    monkeypatch.setitem(sys.modules, "totalsegmentator.python_api", api)
    run_totalsegmentator(ct, tmp_path / "out.nii.gz", device="cpu")
    assert calls["ml"] is False and calls["task"] == "total" and calls["device"] == "cpu"
    assert sorted(calls["roi_subset"]) == sorted(lp.TS_NAMES.values())
    np.testing.assert_array_equal(read(tmp_path / "out.nii.gz"), lp.our_lobes())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp folder cleaned up


def test_output_may_not_overwrite_input(tmp_path):
    source = lp.write(lp.our_lobes(), tmp_path / "m.nii.gz")
    with pytest.raises(WeakDatasetError, match="overwrite the input"):
        convert_region_map(source, source, preset="identity")


def test_command_lists_every_preset():
    assert set(PRESET_NAMES) == set(PRESETS)  # the CLI keeps its own light list; it must not drift
