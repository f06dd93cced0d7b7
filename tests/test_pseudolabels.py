"""`nnunetv2_dram pseudolabels`: a standard nnU-Net dataset, safe to rerun, never touching the source."""
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

TRAINER = "DRAMTrainerNoRefine_1epochs_3its"  # a budget name: pseudolabels rebuilds the network from it


def _hash_tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(weak3d):
    ws, dataset = weak3d
    ws.run("nnUNetv2_train", dataset[7:10], "3d_fullres", "all", "-tr", TRAINER, "-p", "nnUNetPlans_quick",
           "-device", "cpu", NNUNETV2_DRAM_SKIP_FINAL_VALIDATION=1)
    return ws, dataset


def _cmd(dataset, new_id, *extra):
    return ["pseudolabels", "-d", dataset[7:10], "-c", "3d_fullres", "-f", "all", "-tr", TRAINER,
            "-p", "nnUNetPlans_quick", "-o", str(new_id), "-device", "cpu", "-np", "1", *map(str, extra)]


def test_pseudo_label_dataset_is_a_valid_nnunet_dataset(trained, tmp_path):
    ws, dataset = trained
    src = ws.raw / dataset
    before = _hash_tree(src)
    ws.run("nnunetv2_dram", *_cmd(dataset, 711, "--qc", tmp_path / "qc"))
    out = ws.raw / f"Dataset711_{dataset.split('_', 1)[1]}Pseudo"
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "lesion": 1}
    assert meta["nnunetv2_dram"]["trainer"] == TRAINER
    weak = json.loads((src / "weak_labels.json").read_text())["cases"]
    assert meta["numTraining"] == len(weak)
    for case, targets in weak.items():
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / f"{case}.nii.gz")))
        regions = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "labelsTr" / f"{case}.nii.gz")))
        assert set(np.unique(label)) <= {0, 1}
        assert not label[regions == 0].any(), "lesions only inside the regions"
        # the default threshold (midpoint; an exact percentage is its own midpoint): each region's pseudo-lesion share
        # lands on its weak target (to one voxel)
        for region, pct in targets.items():
            m = regions == int(region)
            assert abs(label[m].mean() * 100 - pct) <= 100 / m.sum() + 0.051
        assert (out / "imagesTr" / f"{case}_0000.nii.gz").read_bytes() == \
            (src / "imagesTr" / f"{case}_0000.nii.gz").read_bytes()
        assert (tmp_path / "qc" / f"{case}.png").stat().st_size > 1000
    assert not list(out.rglob(".*")), "no temporary or marker files left behind"
    # nnU-Net's own integrity check takes it as is
    ws.run("nnUNetv2_extract_fingerprint", "-d", 711, "-np", 1, "--verify_dataset_integrity", nnUNet_n_proc_DA=1)
    assert _hash_tree(src) == before, "the source dataset must not change"


def test_the_midpoint_threshold_is_taken_from_the_command_line(trained):
    """--threshold midpoint: with exact percentages the middle of each interval is the target itself; a threshold
    the command does not know is refused before any work, naming the choices."""
    ws, dataset = trained
    ws.run("nnunetv2_dram", *_cmd(dataset, 716, "--threshold", "midpoint", "--crf", "none"))
    out = ws.raw / f"Dataset716_{dataset.split('_', 1)[1]}Pseudo"
    assert json.loads((out / "dataset.json").read_text())["nnunetv2_dram"]["threshold"] == "midpoint"
    for case, targets in json.loads((ws.raw / dataset / "weak_labels.json").read_text())["cases"].items():
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / f"{case}.nii.gz")))
        regions = sitk.GetArrayFromImage(sitk.ReadImage(str(ws.raw / dataset / "labelsTr" / f"{case}.nii.gz")))
        for region, pct in targets.items():
            m = regions == int(region)
            assert abs(label[m].mean() * 100 - pct) <= 100 / m.sum() + 0.051
    refused = ws.run("nnunetv2_dram", *_cmd(dataset, 717, "--threshold", "middle"), check=False)
    assert refused.returncode != 0 and "midpoint" in refused.stderr + refused.stdout
    assert not list(ws.raw.glob("Dataset717_*"))


def test_existing_dataset_is_not_overwritten(trained, tmp_path):
    ws, dataset = trained
    ws.run("nnunetv2_dram", *_cmd(dataset, 712, "--crf", "none"))
    out = ws.raw / f"Dataset712_{dataset.split('_', 1)[1]}Pseudo"
    before = _hash_tree(out)
    proc = ws.run("nnunetv2_dram", *_cmd(dataset, 712, "--crf", "none"), check=False)
    assert proc.returncode == 1 and "already exists" in proc.stderr and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _hash_tree(out) == before
    ws.run("nnunetv2_dram", *_cmd(dataset, 712, "--crf", "none", "--ignore-band", "0.2", "--overwrite"))
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "lesion": 1, "ignore": 2}
    # the source's own id is refused
    proc = ws.run("nnunetv2_dram", *_cmd(dataset, int(dataset[7:10])), check=False)
    assert proc.returncode == 1 and "source dataset" in proc.stderr


def test_killed_run_resumes_to_identical_labels(trained):
    ws, dataset = trained
    name = dataset.split("_", 1)[1]
    ws.run("nnunetv2_dram", *_cmd(dataset, 713))  # reference: one uninterrupted run
    ref = ws.raw / f"Dataset713_{name}Pseudo" / "labelsTr"
    out = ws.raw / f"Dataset714_{name}Pseudo"
    exe = str(Path(sys.executable).parent / "nnunetv2_dram")
    proc = subprocess.Popen([exe, *_cmd(dataset, 714)], env=ws.environ(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and list((out / "labelsTr").glob("*.nii.gz")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list((out / "labelsTr").glob("*.nii.gz"))
    assert 0 < len(done) < len(list(ref.glob("*.nii.gz"))), "the kill should land mid-run"
    assert not (out / "dataset.json").exists()
    ws.run("nnunetv2_dram", *_cmd(dataset, 714))  # same command: resumes
    assert _hash_tree(out / "labelsTr") == _hash_tree(ref)
    assert (out / "dataset.json").is_file()


def test_split_over_parts(trained):
    ws, dataset = trained
    for part in (0, 1):
        ws.run("nnunetv2_dram", *_cmd(dataset, 715, "--crf", "none", "-num_parts", 2, "-part_id", part))
    out = ws.raw / f"Dataset715_{dataset.split('_', 1)[1]}Pseudo"
    assert (out / "dataset.json").is_file()
    assert len(list((out / "labelsTr").glob("*.nii.gz"))) == json.loads((out / "dataset.json").read_text())["numTraining"]
