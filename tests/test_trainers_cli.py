"""The real nnU-Net CLI trains the plugin's trainers on generated weak datasets (3d_fullres and 2d), writes
checkpoints, continues with --c, and nnUNetv2_predict writes lesion masks with the trained model. Short runs use
the trainers' budget names, `<Trainer>_1epochs_2its`."""
import json
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import edited_weak_labels

SHORT = "_1epochs_2its"  # 1 epoch of 2 iterations, 2 validation iterations


def _train(ws, dataset, configuration, trainer, fold="0", *extra, check=True, **env):
    return ws.run("nnUNetv2_train", dataset[7:10], configuration, fold, "-tr", trainer, "-p", "nnUNetPlans_quick",
                  "-device", "cpu", *extra, check=check, **env)


def _fold_dir(ws, dataset, trainer, configuration, fold="0"):
    return ws.results / dataset / f"{trainer}__nnUNetPlans_quick__{configuration}" / f"fold_{fold}"


def _epochs_in_log(fold_dir):
    text = "".join(p.read_text() for p in sorted(fold_dir.glob("training_log_*.txt")))
    return [int(e) for e in re.findall(r": Epoch (\d+) *\n", text)], text


def test_dram_trainer_3d_trains_continues_and_predicts(weak3d, tmp_path):
    ws, dataset = weak3d
    # fold 1: other tests train DRAMTrainer on fold 0 and fold all of the same session workspace
    trainer = "DRAMTrainer" + SHORT
    _train(ws, dataset, "3d_fullres", trainer, "1")
    fold = _fold_dir(ws, dataset, trainer, "3d_fullres", "1")
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "progress.png").is_file()
    assert not _fold_dir(ws, dataset, "DRAMTrainer", "3d_fullres", "1").exists(), "a short run has its own folder"
    epochs, log = _epochs_in_log(fold)
    assert epochs == [0]
    assert "Region-% MAE train" in log and "validation regions" in log
    assert "DRAMTrainer_1epochs_2its: 1 epochs of 2 iterations, 2 validation iterations per epoch" in log
    report = json.loads((fold / "validation" / "region_fractions.json").read_text())
    assert report["n_regions"] > 0 and np.isfinite(report["mean_abs_error"])
    # the model folder's dataset.json is the lesion label set nnUNetv2_predict will use
    assert json.loads((fold.parent / "dataset.json").read_text())["labels"] == {"background": 0, "lesion": 1}

    # --c continues an interrupted run of the same name: a 2-epoch run stopped after its first epoch (the
    # 1-epoch run's folder, its final checkpoint as the latest one) trains only epoch 1
    longer = _fold_dir(ws, dataset, "DRAMTrainer_2epochs_2its", "3d_fullres", "1")
    shutil.copytree(fold, longer, ignore=shutil.ignore_patterns("validation"))
    (longer / "checkpoint_final.pth").rename(longer / "checkpoint_latest.pth")
    _train(ws, dataset, "3d_fullres", "DRAMTrainer_2epochs_2its", "1", "--c")
    epochs, _ = _epochs_in_log(longer)
    assert epochs == [0, 1] and (longer / "checkpoint_final.pth").is_file()

    # plain nnUNetv2_predict on whole images writes lesion masks (0/1) in the images' geometry
    out = tmp_path / "pred"
    images = ws.raw / dataset / "imagesTs"
    ws.run("nnUNetv2_predict", "-i", images, "-o", out, "-d", dataset[7:10], "-c", "3d_fullres", "-f", "1",
           "-tr", trainer, "-p", "nnUNetPlans_quick", "-device", "cpu", "--disable_tta", "--save_probabilities",
           "-npp", 1, "-nps", 1)
    for img in images.glob("*_0000.nii.gz"):
        case = img.name[: -len("_0000.nii.gz")]
        seg = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        ref = sitk.ReadImage(str(img))
        assert seg.GetSize() == ref.GetSize() and np.allclose(seg.GetSpacing(), ref.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1}
        probs = np.load(out / f"{case}.npz")["probabilities"]
        assert probs.shape[0] == 2 and np.allclose(probs.sum(0), 1, atol=1e-3)


@pytest.mark.parametrize("trainer", ["CAMTrainer", "DRAMTrainerNoRefine"])
def test_other_trainers_3d(weak3d, trainer):
    ws, dataset = weak3d
    _train(ws, dataset, "3d_fullres", trainer + SHORT, NNUNETV2_DRAM_SKIP_FINAL_VALIDATION=1)
    fold = _fold_dir(ws, dataset, trainer + SHORT, "3d_fullres")
    assert (fold / "checkpoint_final.pth").is_file()
    assert "Region-% MAE" in _epochs_in_log(fold)[1]


@pytest.mark.parametrize("trainer", ["DRAMTrainer", "CAMTrainer"])
def test_trainers_2d(weak2d, trainer):
    ws, dataset = weak2d
    _train(ws, dataset, "2d", trainer + SHORT)
    fold = _fold_dir(ws, dataset, trainer + SHORT, "2d")
    assert (fold / "checkpoint_final.pth").is_file()
    _, log = _epochs_in_log(fold)
    assert "CTSS accuracy" in log  # ctss targets: severity-band accuracy is logged
    assert "Validation region-% MAE" in log


def test_bad_weak_labels_stop_training_with_a_clear_message(weak3d, tmp_path):
    ws, dataset = weak3d

    def add_unknown_region(cases):
        case = sorted(cases)[0]
        cases[case]["9"] = 5.0  # a region the dataset does not have
        return case

    with edited_weak_labels(ws, dataset, add_unknown_region) as case:
        proc = _train(ws, dataset, "3d_fullres", "DRAMTrainerNoRefine" + SHORT, "1", check=False)
    assert proc.returncode != 0
    assert f"case '{case}' region 9" in proc.stdout + proc.stderr
