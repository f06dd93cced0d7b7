"""From "my hospital export" (CT folder + TotalSegmentator masks + CTSS table) to a checked weak dataset."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import lobe_phantom as lp
from nnunetv2_dram.cli import main as cli_main
from nnunetv2_dram.conversion.dataset_from_folder import build_weak_dataset
from nnunetv2_dram.weak_labels.format import load_weak_labels
from nnunetv2_dram.weak_labels.problems import WeakDatasetError

try:
    from nnunetv2_dram.weak_labels.checker import check_weak_dataset
except ImportError:  # written by another part of the project; the build then runs without it
    check_weak_dataset = None

CTSS_TABLE = ("Patient,LUL,LLL,RUL,RML,RLL,Comment\n"
              "c1,2,0,1,,3,\n"
              "c2,0,0,0,0,1,mild\n"
              "Patient 03,5,4,\"5-25\",0,2,\n")


def make_export(root: Path) -> dict[str, Path]:
    """A hospital-style export: odd case names, mixed TotalSegmentator output styles, a CTSS spreadsheet."""
    cts, regions = root / "cts", root / "totalseg"
    lp.write_ct(cts / "c1.nii.gz", seed=1)
    lp.write_ct(cts / "c2_0000.nii.gz", seed=2)  # already nnU-Net style
    lp.write_ct(cts / "Patient 03.nii.gz", seed=3)  # a space: must be sanitised
    lp.write_totalseg_folder(regions / "c1" / "segmentations")  # `TotalSegmentator -o totalseg/c1/segmentations`
    lp.write(lp.totalseg_v2_multilabel(), regions / "c2.nii.gz")  # `--ml` output
    lp.write_totalseg_folder(regions / "Patient 03")  # per-structure files directly in the case folder
    table = root / "ctss.csv"
    table.write_text(CTSS_TABLE, encoding="utf-8")
    return {"cts": cts, "regions": regions, "table": table}


def tree_hashes(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in paths:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def build(export, raw, **kw):
    kw.setdefault("log", None)
    return build_weak_dataset(export["cts"], export["regions"], export["table"], raw, 901, "Covid", target="ctss",
                              **kw)


def test_end_to_end_dataset_passes_checker_and_nnunet(tmp_path, nnunet_env):
    export = make_export(tmp_path / "export")
    before = tree_hashes(*export.values())
    raw = nnunet_env["nnUNet_raw"]
    report = build(export, raw)

    ds = raw / "Dataset901_Covid"
    assert report.dataset_dir == ds and ds.is_dir()
    assert report.cases == ["Patient_03", "c1", "c2"]
    assert report.renamed == {"CT 'Patient 03'": "Patient_03", "region map 'Patient 03'": "Patient_03",
                              "table 'Patient 03'": "Patient_03"}
    assert tree_hashes(*export.values()) == before  # inputs untouched
    assert [p.name for p in raw.iterdir()] == ["Dataset901_Covid"]  # no temp folders left behind

    dataset_json = json.loads((ds / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "CT"}
    assert dataset_json["labels"] == {"background": 0, "left_upper_lobe": 1, "left_lower_lobe": 2,
                                      "right_upper_lobe": 3, "right_middle_lobe": 4, "right_lower_lobe": 5}
    assert dataset_json["numTraining"] == 3 and dataset_json["file_ending"] == ".nii.gz"
    for case in report.cases:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(ds / "labelsTr" / f"{case}.nii.gz"))),
                                      lp.our_lobes())
        assert (ds / "imagesTr" / f"{case}_0000.nii.gz").is_file()
    # the copied CT is the user's file byte for byte
    assert tree_hashes(ds / "imagesTr" / "c1_0000.nii.gz").popitem()[1] == before[str(export["cts"] / "c1.nii.gz")]

    weak = load_weak_labels(ds / "weak_labels.json")
    assert weak.target == "ctss"
    assert sorted(weak.cases) == report.cases
    assert weak.cases["c1"][1].raw == 2 and 4 not in weak.cases["c1"]  # empty cell: no supervision
    assert (weak.cases["Patient_03"][3].low, weak.cases["Patient_03"][3].high) == (5.0, 25.0)

    if check_weak_dataset is not None:
        assert report.check_problems is not None
        errors = [p for p in check_weak_dataset(ds) if p.severity == "error"]
        assert errors == []
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(ds), num_processes=1)  # nnU-Net's own check raises on any problem


def test_refuses_to_overwrite_an_existing_dataset_id(tmp_path, nnunet_env):
    export = make_export(tmp_path / "export")
    raw = nnunet_env["nnUNet_raw"]
    other = raw / "Dataset901_Other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(WeakDatasetError, match="--overwrite"):
        build(export, raw)
    assert (other / "keep.txt").read_text() == "mine" and not (raw / "Dataset901_Covid").exists()

    build(export, raw, overwrite=True)
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset901_Covid"]  # same id, other name: replaced


def test_failed_build_leaves_nothing_and_keeps_the_old_dataset(tmp_path, nnunet_env):
    export = make_export(tmp_path / "export")
    raw = nnunet_env["nnUNet_raw"]
    build(export, raw)
    old = tree_hashes(raw / "Dataset901_Covid")
    # one case's masks on another grid: the whole build fails, naming the file
    lp.write(lp.totalseg_v2_multilabel(), export["regions"] / "c2.nii.gz", spacing=(1.0, 1.0, 1.0))
    with pytest.raises(WeakDatasetError, match="c2.nii.gz") as e:
        build(export, raw, overwrite=True)
    assert "spacing" in str(e.value)
    assert tree_hashes(raw / "Dataset901_Covid") == old
    assert [p.name for p in raw.iterdir()] == ["Dataset901_Covid"]


def test_unmatched_cases_are_errors_or_skipped(tmp_path, nnunet_env):
    export = make_export(tmp_path / "export")
    lp.write_ct(export["cts"] / "c4.nii.gz")  # no mask, no row
    with export["table"].open("a") as f:
        f.write("c5,1,1,1,1,1,\n")  # row without CT
    raw = nnunet_env["nnUNet_raw"]
    with pytest.raises(WeakDatasetError) as e:
        build(export, raw)
    message = str(e.value)
    assert "case 'c4'" in message and "no region map" in message
    assert "case 'c5'" in message and "table row has no CT" in message
    report = build(export, raw, skip_unmatched=True)
    assert report.cases == ["Patient_03", "c1", "c2"] and set(report.skipped) == {"c4", "c5"}


def test_nonzero_target_for_a_missing_lobe_is_an_error(tmp_path, nnunet_env):
    export = make_export(tmp_path / "export")
    os.remove(export["regions"] / "c1" / "segmentations" / "lung_middle_lobe_right.nii.gz")
    table = export["table"].read_text().replace("c1,2,0,1,,3,", "c1,2,0,1,3,3,")
    export["table"].write_text(table)
    with pytest.raises(WeakDatasetError, match="region 4") as e:
        build(export, nnunet_env["nnUNet_raw"])
    assert "case 'c1'" in str(e.value)
    # a zero target for the missing lobe is harmless: dropped with a warning
    export["table"].write_text(table.replace("c1,2,0,1,3,3,", "c1,2,0,1,0,3,"))
    report = build(export, nnunet_env["nnUNet_raw"])
    assert any(w.case == "c1" and w.region == 4 for w in report.warnings)


def test_masks_read_with_the_wrong_preset_are_refused(tmp_path, nnunet_env):
    export = make_export(tmp_path / "export")
    lp.write(lp.totalseg_v1_multilabel(), export["regions"] / "c2.nii.gz")  # a v1 file among v2 output
    with pytest.raises(WeakDatasetError) as e:
        build(export, nnunet_env["nnUNet_raw"])
    message = str(e.value)
    assert "case 'c2'" in message and "totalsegmentator_v1" in message and "left-lobe regions" in message
    assert not (nnunet_env["nnUNet_raw"] / "Dataset901_Covid").exists()


def test_sanitised_id_collision_is_refused(tmp_path, nnunet_env):
    export = make_export(tmp_path / "export")
    lp.write_ct(export["cts"] / "Patient_03.nii.gz")
    with pytest.raises(WeakDatasetError, match="both become 'Patient_03'"):
        build(export, nnunet_env["nnUNet_raw"])


def test_symlink_mode_and_other_input_format(tmp_path, nnunet_env):
    export = make_export(tmp_path / "export")
    nrrd = export["cts"] / "c2.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(export["cts"] / "c2_0000.nii.gz")), str(nrrd))
    os.remove(export["cts"] / "c2_0000.nii.gz")
    report = build(export, nnunet_env["nnUNet_raw"], image_mode="symlink")
    images = nnunet_env["nnUNet_raw"] / "Dataset901_Covid" / "imagesTr"
    assert (images / "c1_0000.nii.gz").is_symlink()
    assert not (images / "c2_0000.nii.gz").is_symlink() and report.converted_images == ["c2"]


def test_cli_three_commands(tmp_path, nnunet_env, capsys):
    """regions (folder of TotalSegmentator outputs) -> weak-labels -> convert, as a user would type them."""
    export = make_export(tmp_path / "export")
    regions = tmp_path / "regions"
    assert cli_main(["regions", "-i", str(export["regions"]), "-o", str(regions), "--ct", str(export["cts"]),
                     "--preset", "totalsegmentator_v2"]) == 0
    assert sorted(p.name for p in regions.iterdir()) == ["Patient 03.nii.gz", "c1.nii.gz", "c2.nii.gz"]
    weak_json = tmp_path / "weak_labels.json"
    assert cli_main(["weak-labels", "-i", str(export["table"]), "-o", str(weak_json), "--target", "ctss"]) == 0
    assert cli_main(["weak-labels", "-i", str(export["table"]), "-o", str(weak_json)]) == 1  # exists
    assert cli_main(["convert", "--images", str(export["cts"]), "--regions", str(regions), "--table", str(weak_json),
                     "-d", "902", "--name", "Mine", "--region-preset", "identity"]) == 0
    out = capsys.readouterr().out
    assert "nnUNetv2_train 902 3d_fullres all -tr DRAMTrainer" in out
    ds = nnunet_env["nnUNet_raw"] / "Dataset902_Mine"
    assert sorted(load_weak_labels(ds / "weak_labels.json").cases) == ["Patient_03", "c1", "c2"]
    assert cli_main(["convert", "--images", str(export["cts"]), "--regions", str(regions), "--table",
                     str(weak_json), "-d", "902", "--name", "Mine", "--region-preset", "identity"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    # the table validated against the new dataset
    assert cli_main(["weak-labels", "-i", str(export["table"]), "-o", str(tmp_path / "w2.json"), "--target", "ctss",
                     "-d", str(ds)]) == 0
