"""The weak-dataset checker and `nnunetv2_dram check`: every mistake is reported, named, and nothing is written."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_dram.cli import main
from nnunetv2_dram.weak_labels.checker import check_setup, check_weak_dataset, resolve_raw_dataset_dir

LOBES = {"background": 0, "left_upper_lobe": 1, "left_lower_lobe": 2, "right_upper_lobe": 3,
         "right_middle_lobe": 4, "right_lower_lobe": 5}
LUNGS = {"background": 0, "left_lung": 1, "right_lung": 2}
CASES = ("case_001", "case_002", "case_003")
SHAPE = (8, 16, 16)  # z, y, x
SPACING = (0.8, 0.8, 2.5)  # x, y, z (SimpleITK order)
ORIGIN = (-10.0, -20.0, 30.0)
PERCENTAGES = {"1": 12.5, "2": 0.0, "3": 40.0, "4": [5, 25], "5": 0.0}


# ------------------------------------------------------------------------------------------- dataset builders

def lobe_map(shape=SHAPE) -> np.ndarray:
    """Five lobe-like blocks; a one-voxel background rim so that 0 occurs too."""
    z, y, x = np.indices(shape)
    half = shape[2] // 2
    regions = np.where(x < half, np.where(z < shape[0] // 2, 1, 2),
                       np.where(z < shape[0] * 3 // 8, 3, np.where(z < shape[0] * 5 // 8, 4, 5)))
    regions[:, 0, :] = 0
    return regions.astype(np.uint8)


def lung_map_2d(shape=(16, 16)) -> np.ndarray:
    regions = np.zeros(shape, np.uint8)
    regions[2:-2, 1:shape[1] // 2 - 1] = 1
    regions[2:-2, shape[1] // 2 + 1:-1] = 2
    return regions


def write_image(array: np.ndarray, path: Path, spacing=SPACING, origin=ORIGIN, direction=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".png"):
        from skimage import io
        io.imsave(str(path), array.astype(np.uint8), check_contrast=False)
        return
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: array.ndim])
    image.SetOrigin(origin[: array.ndim])
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path), True)


def write_weak_dataset(root: Path, *, ending: str = ".nii.gz", target: str = "percentage", cases=CASES,
                       values: dict | None = None, channels: int = 1, two_d: bool = False,
                       references: bool = False, test_cases=()) -> Path:
    """A small valid weak dataset (3-D lobes or 2-D lungs) with the given file ending."""
    rng = np.random.default_rng(0)
    labels = LUNGS if two_d else LOBES
    region_map = lung_map_2d() if two_d else lobe_map()
    if values is None:
        values = {"1": 20.0, "2": [0, 5]} if two_d else dict(PERCENTAGES)
    for folder, names, with_map in (("imagesTr", cases, "labelsTr"), ("imagesTs", test_cases, "labelsTs")):
        for case in names:
            for c in range(channels):
                intensity = rng.integers(0, 255, region_map.shape) if ending == ".png" else \
                    rng.normal(-500, 300, region_map.shape).astype(np.float32)
                write_image(intensity, root / folder / f"{case}_{c:04d}{ending}")
            write_image(region_map, root / with_map / f"{case}{ending}")
            if references:
                lesion = (region_map == 1).astype(np.uint8)
                write_image(lesion, root / folder.replace("images", "reference") / f"{case}{ending}")
    dataset_json = {"channel_names": {str(c): f"CT{c}" if c else "CT" for c in range(channels)}, "labels": labels,
                    "numTraining": len(cases), "file_ending": ending, "name": root.name}
    (root / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    weak = {"format": "nnunetv2_dram.weak_labels/1", "target": target, "cases": {c: dict(values) for c in cases}}
    (root / "weak_labels.json").write_text(json.dumps(weak, indent=1))
    return root


def edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj, indent=1))


def edit_weak(root: Path, change) -> None:
    edit_json(root / "weak_labels.json", change)


def rewrite_map(root: Path, case: str, change_array=None, **geometry) -> None:
    """Rewrite labelsTr/<case> with a changed array and/or changed spacing/origin/direction."""
    path = root / "labelsTr" / f"{case}.nii.gz"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    if change_array is not None:
        array = change_array(array)
    write_image(array, path, **geometry)


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_check(capsys, root: Path, *extra: str) -> tuple[int, str]:
    code = main(["check", "-d", str(root), "--no-setup", *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# ---------------------------------------------------------------------------------------- broken datasets

def _set(mapping_path, key, value):
    def change(obj):
        target = obj
        for k in mapping_path:
            target = target[k]
        target[key] = value
    return change


def _write_text(relative: str, text: str):
    return lambda root: (root / relative).write_text(text)


def _delete(relative: str):
    return lambda root: (root / relative).unlink()


def _weak(change):
    return lambda root: edit_weak(root, change)


def _no_background(root):
    edit_json(root / "dataset.json", lambda d: d["labels"].pop("background"))


def _nan_value(root):
    text = (root / "weak_labels.json").read_text()
    obj = json.loads(text)
    obj["cases"]["case_001"]["1"] = "__NAN__"
    (root / "weak_labels.json").write_text(json.dumps(obj).replace('"__NAN__"', "NaN"))


def _ctss(value):
    def change(obj):
        obj["target"] = "ctss"
        for case in obj["cases"].values():
            case.update({"1": 1, "2": 0, "3": 3, "4": 2, "5": 0})
        obj["cases"]["case_002"]["2"] = value
    return change


def _region_absent_from_map(root):
    rewrite_map(root, "case_002", lambda a: np.where(a == 4, 5, a).astype(np.uint8))


def _undeclared_value(root):
    def change(a):
        a = a.copy()
        a[0, 0, :3] = 9
        return a
    rewrite_map(root, "case_003", change)


def _non_integer_map(root):
    rewrite_map(root, "case_001", lambda a: a.astype(np.float32) * 1.5)


def _shape_mismatch(root):
    rewrite_map(root, "case_002", lambda a: a[:, :, :-2].copy())


def _reference_value_2(root):
    path = root / "referenceTr" / "case_001.nii.gz"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    array[2, 5, 5] = 2
    write_image(array, path)


def _two_channels_one_missing(root):
    for p in list((root / "imagesTr").iterdir()):
        p.unlink()
    for p in list((root / "labelsTr").iterdir()):
        p.unlink()
    write_weak_dataset(root, channels=2, references=True, test_cases=("test_001",))
    (root / "imagesTr" / "case_002_0001.nii.gz").unlink()


def _corrupt_image(root):
    (root / "imagesTr" / "case_001_0000.nii.gz").write_bytes(b"\x1f\x8b this is not an image")


def _orphan_map(root):
    write_image(lobe_map(), root / "labelsTr" / "case_004.nii.gz")


def _orphan_test_map(root):
    write_image(lobe_map(), root / "labelsTs" / "test_009.nii.gz")


def _badly_named_image(root):
    (root / "imagesTr" / "case_001_0000.nii.gz").rename(root / "imagesTr" / "case_001.nii.gz")


# (id, breaker, texts the output must contain: the file, the case, the region and the cause)
# Each mistake must be reported once, not echoed by every check that depends on it: the error count is exact.
ERROR_COUNTS = {"badly_named_image": 5}  # the misnamed file, its orphan map/target/reference and numTraining
BROKEN = [
    ("missing_dataset_json", _delete("dataset.json"), ["dataset.json", "file not found"]),
    ("invalid_json", _write_text("dataset.json", '{"labels": {"background": 0,'), ["dataset.json", "not valid JSON"]),
    ("labels_without_background", _no_background, ["dataset.json", '"background": 0']),
    ("region_label_not_integer", lambda r: edit_json(r / "dataset.json", _set(["labels"], "right_lower_lobe", "5")),
     ["dataset.json", "right_lower_lobe", "integer"]),
    ("numTraining_wrong", lambda r: edit_json(r / "dataset.json", _set([], "numTraining", 7)),
     ["dataset.json", "'numTraining' is 7", "3 training case"]),
    ("missing_weak_labels", _delete("weak_labels.json"), ["weak_labels.json", "file not found"]),
    ("wrong_format", _weak(_set([], "format", "weak/0")), ["weak_labels.json", "'format'", "weak/0"]),
    ("unknown_target", _weak(_set([], "target", "volume")), ["weak_labels.json", "'target'", "volume"]),
    ("percentage_out_of_range", _weak(_set(["cases", "case_002"], "3", 140)),
     ["weak_labels.json", "case 'case_002'", "region 3", "out of range"]),
    ("nan_value", _nan_value, ["weak_labels.json", "case 'case_001'", "region 1", "NaN"]),
    ("ctss_6", _weak(_ctss(6)), ["weak_labels.json", "case 'case_002'", "region 2", "integer 0..5"]),
    ("ctss_2.5", _weak(_ctss(2.5)), ["weak_labels.json", "case 'case_002'", "region 2", "integer 0..5"]),
    ("interval_reversed", _weak(_set(["cases", "case_003"], "4", [30, 10])),
     ["weak_labels.json", "case 'case_003'", "region 4", "[30, 10]"]),
    ("unknown_case", _weak(_set(["cases"], "case_999", {"1": 3.0})),
     ["weak_labels.json", "case 'case_999'", "unknown case"]),
    ("case_id_escapes", _weak(_set(["cases"], "../case_001", {"1": 3.0})),
     ["weak_labels.json", "../case_001", "path separator"]),
    ("training_case_without_entry", _weak(lambda o: o["cases"].pop("case_003")),
     ["weak_labels.json", "case 'case_003'", "no entry"]),
    ("region_not_in_labels", _weak(_set(["cases", "case_001"], "7", 3.0)),
     ["weak_labels.json", "case 'case_001'", "region 7", "not a label in dataset.json"]),
    ("region_absent_from_map", _region_absent_from_map,
     ["weak_labels.json", "case 'case_002'", "region 4", "no voxel", "case_002.nii.gz"]),
    ("map_with_undeclared_value", _undeclared_value, ["labelsTr/case_003.nii.gz", "case 'case_003'", "9 (3 voxels)"]),
    ("map_with_non_integer_values", _non_integer_map, ["labelsTr/case_001.nii.gz", "case 'case_001'", "non-integer"]),
    ("spacing_mismatch", lambda r: rewrite_map(r, "case_001", spacing=(0.8, 0.8, 5.0)),
     ["labelsTr/case_001.nii.gz", "case 'case_001'", "spacing (2.5, 0.8, 0.8) vs (5, 0.8, 0.8)"]),
    ("origin_mismatch", lambda r: rewrite_map(r, "case_003", origin=(-10.0, -20.0, 31.0)),
     ["labelsTr/case_003.nii.gz", "case 'case_003'", "origin (-10, -20, 30) vs (-10, -20, 31)"]),
    ("direction_mismatch", lambda r: rewrite_map(r, "case_001", direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1)),
     ["labelsTr/case_001.nii.gz", "case 'case_001'", "direction"]),
    ("shape_mismatch", _shape_mismatch,
     ["labelsTr/case_002.nii.gz", "case 'case_002'", "shape (8, 16, 16) vs (8, 16, 14)"]),
    ("missing_channel_file", _two_channels_one_missing,
     ["imagesTr", "case 'case_002'", "case_002_0001.nii.gz not found"]),
    ("corrupt_image", _corrupt_image, ["imagesTr/case_001_0000.nii.gz", "case 'case_001'", "cannot be read"]),
    ("badly_named_image", _badly_named_image,
     ["imagesTr/case_001.nii.gz", "CASE_XXXX", "rename it to case_001_0000.nii.gz"]),
    ("missing_region_map", _delete("labelsTr/case_002.nii.gz"),
     ["labelsTr/case_002.nii.gz", "case 'case_002'", "no region map"]),
    ("orphan_region_map", _orphan_map, ["labelsTr/case_004.nii.gz", "case 'case_004'", "no image"]),
    ("orphan_test_map", _orphan_test_map, ["labelsTs/test_009.nii.gz", "case 'test_009'", "no image"]),
    ("reference_with_value_2", _reference_value_2,
     ["referenceTr/case_001.nii.gz", "case 'case_001'", "binary", "[2]"]),
]


@pytest.mark.parametrize("ident, breaker, expected", [pytest.param(i, b, e, id=i) for i, b, e in BROKEN])
def test_broken_dataset_is_reported(tmp_path, capsys, ident, breaker, expected):
    root = write_weak_dataset(tmp_path / "Dataset901_Weak", references=True, test_cases=("test_001",))
    breaker(root)
    before = tree_hashes(root)
    code, out = run_check(capsys, root)
    assert code == 1, out
    for text in expected:
        assert text in out, f"{text!r} missing from:\n{out}"
    assert "Traceback" not in out
    assert f"check FAILED: {ERROR_COUNTS.get(ident, 1)} error(s)" in out, out
    assert tree_hashes(root) == before  # nothing written, nothing changed


def test_catalogue_is_distinct():
    assert len(BROKEN) >= 15
    assert len({i for i, _, _ in BROKEN}) == len(BROKEN)


# ------------------------------------------------------------------------------------------ valid datasets

def test_clean_dataset_passes(tmp_path, capsys):
    root = write_weak_dataset(tmp_path / "Dataset901_Weak", references=True, test_cases=("test_001", "test_002"))
    before = tree_hashes(root)
    code, out = run_check(capsys, root)
    assert code == 0, out
    assert "check OK: 0 error(s), 0 warning(s) (3 training case(s), 2 test case(s), 5 reference mask(s))" in out
    assert tree_hashes(root) == before
    assert check_weak_dataset(root) == []


@pytest.mark.parametrize("ending", [".mha", ".nrrd"])
def test_other_file_endings_pass(tmp_path, capsys, ending):
    root = write_weak_dataset(tmp_path / "Dataset902_Weak", ending=ending, references=True)
    code, out = run_check(capsys, root)
    assert code == 0, out
    # the checker really reads these files: a broken map in that format is found
    path = root / "labelsTr" / f"case_002{ending}"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    array[array == 3] = 0
    write_image(array, path)
    problems = check_weak_dataset(root)
    assert [(p.case, p.region) for p in problems if p.severity == "error"] == [("case_002", 3)]


@pytest.mark.parametrize("ending", [".nii.gz", ".png"])
def test_2d_dataset_passes(tmp_path, capsys, ending):
    root = write_weak_dataset(tmp_path / "Dataset903_Weak2D", ending=ending, two_d=True)
    code, out = run_check(capsys, root)
    assert code == 0, out
    assert "3 training case(s)" in out


def test_ctss_and_interval_datasets_pass(tmp_path, capsys):
    ctss = write_weak_dataset(tmp_path / "Dataset904_Ctss", target="ctss",
                              values={"1": 1, "2": 0, "3": 5, "4": 2, "5": [10, 30]})
    assert run_check(capsys, ctss)[0] == 0
    intervals = write_weak_dataset(tmp_path / "Dataset905_Interval",
                                   values={"1": [0, 5], "2": [5.5, 25], "3": [25, 50], "4": [50, 75], "5": [75, 100]})
    assert run_check(capsys, intervals)[0] == 0


def test_regions_without_target_are_not_errors(tmp_path, capsys):
    root = write_weak_dataset(tmp_path / "Dataset906_Partial", values={"1": 10.0, "3": 0.0})
    edit_weak(root, _set(["cases"], "case_002", {}))
    code, out = run_check(capsys, root)
    assert code == 0, out
    assert "WARNING: weak_labels.json case 'case_002': no region of this case has a weak target" in out
    assert "INFO: weak_labels.json: 11 region(s) in 3 case(s) have no weak target" in out
    code, out = run_check(capsys, root, "--quiet")
    assert code == 0 and "WARNING" not in out and "check OK: 0 error(s), 1 warning(s)" in out


def test_several_problems_are_all_listed(tmp_path, capsys):
    root = write_weak_dataset(tmp_path / "Dataset907_Many", references=True)
    edit_weak(root, _set(["cases", "case_001"], "2", -3))
    edit_weak(root, lambda o: o["cases"].pop("case_003"))
    rewrite_map(root, "case_002", origin=(0.0, 0.0, 0.0))
    _reference_value_2(root)
    edit_json(root / "dataset.json", _set([], "numTraining", 4))
    code, out = run_check(capsys, root)
    assert code == 1
    for text in ["case 'case_001' region 2: percentage -3", "case 'case_003': training case has no entry",
                 "labelsTr/case_002.nii.gz case 'case_002': region map does not match the image",
                 "referenceTr/case_001.nii.gz case 'case_001': reference mask must be binary",
                 "'numTraining' is 4"]:
        assert text in out, out
    assert "check FAILED: 5 error(s)" in out


def test_errors_are_printed_before_warnings(tmp_path, capsys):
    root = write_weak_dataset(tmp_path / "Dataset908_Order")
    (root / "imagesTr" / "notes.txt").write_text("not an image")
    edit_weak(root, _set(["cases", "case_003"], "4", 101))
    code, out = run_check(capsys, root)
    assert code == 1
    assert 0 <= out.index("ERROR") < out.index("WARNING: imagesTr: 1 entr(y/ies) without the file ending")


def test_verify_images_false_does_not_read_images(tmp_path):
    root = write_weak_dataset(tmp_path / "Dataset909_Fast")
    _corrupt_image(root)
    assert any("cannot be read" in p.message for p in check_weak_dataset(root))
    assert not any("cannot be read" in p.message for p in check_weak_dataset(root, verify_images=False))


# ------------------------------------------------------------------------------------ resolving the dataset

def test_dataset_is_found_by_id_and_name(nnunet_env, capsys):
    root = write_weak_dataset(nnunet_env["nnUNet_raw"] / "Dataset910_Lobes")
    assert resolve_raw_dataset_dir(910) == root
    assert resolve_raw_dataset_dir("910") == root
    assert resolve_raw_dataset_dir("Dataset910_Lobes") == root
    assert resolve_raw_dataset_dir(root) == root
    assert main(["check", "-d", "910", "--no-setup"]) == 0
    capsys.readouterr()
    assert main(["check", "-d", "911", "--no-setup"]) == 1
    out = capsys.readouterr().out
    assert "no dataset with the ID 911" in out and "Traceback" not in out


def test_unset_nnunet_raw_is_reported_for_an_id(monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert main(["check", "-d", "910", "--no-setup"]) == 1
    out = capsys.readouterr().out
    assert "nnUNet_raw is not set" in out and "Traceback" not in out


# ---------------------------------------------------------------------------------------------- the set-up

@pytest.fixture
def no_crf(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)


def test_check_setup_reports_unset_variables_and_missing_crf(nnunet_env, monkeypatch, no_crf):
    for name in ("nnUNet_raw", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.delenv(name)
    problems = check_setup()
    errors = [str(p) for p in problems if p.severity == "error"]
    assert any("nnUNet_raw is not set" in e for e in errors)
    assert any("nnUNet_results is not set" in e for e in errors)
    assert not any("nnUNet_preprocessed" in e for e in errors)
    assert any("nnUNet_extTrainer is not set" in e and "nnunetv2_dram trainers-path" in e for e in errors)
    # without nnUNet_extTrainer nnU-Net cannot see the trainers
    for trainer in ("DRAMTrainer", "DRAMTrainerNoRefine", "CAMTrainer"):
        assert any(f"cannot find the trainer {trainer} " in e for e in errors)
    crf = [p for p in problems if "pydensecrf" in p.message]
    assert len(crf) == 1 and crf[0].severity == "warning" and "pip install pydensecrf2==1.1" in crf[0].hint


FAKE_TRAINERS = '''
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class DRAMTrainer(nnUNetTrainer):
    pass


class DRAMTrainerNoRefine(nnUNetTrainer):
    pass


class CAMTrainer(nnUNetTrainer):
    pass
'''


def test_check_setup_finds_trainers_through_nnunet(nnunet_env, monkeypatch, tmp_path):
    from nnunetv2_dram.paths import trainers_path
    extra = tmp_path / "more_trainers"
    extra.mkdir()
    (extra / "fake_dram_trainers_for_check.py").write_text(FAKE_TRAINERS)
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([str(extra), str(trainers_path())]))
    problems = check_setup()
    assert [p for p in problems if p.severity == "error"] == [], problems


def test_check_setup_wrong_ext_trainer_folder(nnunet_env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("nnUNet_extTrainer", str(tmp_path))
    root = write_weak_dataset(nnunet_env["nnUNet_raw"] / "Dataset912_Lobes")
    code = main(["check", "-d", str(root)])
    out = capsys.readouterr().out
    assert code == 1
    assert f"nnUNet_extTrainer={tmp_path} does not contain" in out
    assert "cannot find the trainer DRAMTrainer" in out and "Traceback" not in out


def test_nonexistent_nnunet_folders(nnunet_env, monkeypatch, tmp_path):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "no_raw"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "no_results"))
    problems = {p.message: p.severity for p in check_setup()}
    assert problems[f"nnUNet_raw={tmp_path / 'no_raw'} does not exist"] == "error"
    assert problems[f"nnUNet_results={tmp_path / 'no_results'} does not exist"] == "warning"  # nnU-Net creates it


# ------------------------------------------------------------------------------------- less common layouts

def test_explicit_file_list_in_dataset_json(tmp_path):
    """nnU-Net's alternative layout: dataset.json lists every case's files under 'dataset'."""
    root = write_weak_dataset(tmp_path / "Dataset913_Listed")
    entries = {c: {"images": [f"imagesTr/{c}_0000.nii.gz"], "label": f"labelsTr/{c}.nii.gz"} for c in CASES}
    edit_json(root / "dataset.json", _set([], "dataset", entries))
    assert check_weak_dataset(root) == []
    (root / "labelsTr" / "case_002.nii.gz").unlink()
    problems = check_weak_dataset(root)
    assert [(p.file, p.case, p.message) for p in problems] == \
        [("labelsTr/case_002.nii.gz", "case_002", "region map not found")]


def test_ignore_label_is_a_declared_value_but_not_a_region(tmp_path):
    root = write_weak_dataset(tmp_path / "Dataset914_Ignore")
    edit_json(root / "dataset.json", _set(["labels"], "ignore", 6))
    rewrite_map(root, "case_001", lambda a: np.where(a == 0, 6, a).astype(np.uint8))
    assert check_weak_dataset(root) == []
    edit_weak(root, _set(["cases", "case_001"], "6", 1.0))
    problems = check_weak_dataset(root)
    assert [(p.case, p.region) for p in problems] == [("case_001", 6)]
    assert "'ignore' label" in problems[0].message


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    root = write_weak_dataset(tmp_path / "Dataset915_Progress")
    assert check_weak_dataset(root, progress=True) == []
    captured = capsys.readouterr()
    assert "checking cases" in captured.err and captured.out == ""
