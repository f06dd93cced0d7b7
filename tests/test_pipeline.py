"""`nnunetv2_dram pipeline` end to end through the real nnU-Net commands, and `demo` argument handling."""
import hashlib
import json
import shlex

import numpy as np
import SimpleITK as sitk

from conftest import edited_weak_labels


def _hash_tree(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _predict_command(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    i = lines.index("predict new images with the final model:")
    return shlex.split(next(line for line in lines[i + 1:] if "nnUNetv2_predict" in line))


def test_pipeline_end_to_end_restricted_to_regions_and_resume(weak3d, tmp_path):
    ws, dataset = weak3d
    src = ws.raw / dataset
    source_before = _hash_tree(src)
    preds = tmp_path / "predictions"
    args = ["pipeline", "-d", dataset[7:10], "-o", 721, "--preset", "quick", "--epochs", 1, "--iterations", 2,
            "-device", "cpu", "-np", 1, "--predictions", preds, "--restrict-to-regions"]
    proc = ws.run("nnunetv2_dram", *args)
    assert "final nnU-Net vs referenceTs: IoU" in proc.stdout
    assert "final nnU-Net inside the regions vs referenceTs: IoU" in proc.stdout
    pseudo = f"Dataset721_{dataset.split('_', 1)[1]}Pseudo"
    summary = json.loads((ws.results / pseudo / "pipeline_logs" / "pipeline_summary.json").read_text())
    assert summary["pseudo_dataset"] == pseudo
    m = summary["metrics"]
    for key in ("pseudo_labels_vs_referenceTr", "final_model_vs_referenceTs", "final_model_in_regions_vs_referenceTs"):
        assert 0.0 <= m[key]["IoU"] <= 1.0 and 0.0 <= m[key]["Dice"] <= 1.0
    # every stage trained under its budget name, in its own results folder
    weak = ws.results / dataset / "DRAMTrainer_1epochs_2its__nnUNetPlans_quick__3d_fullres" / "fold_all"
    final = ws.results / pseudo / "nnUNetTrainer_1epochs_2its__nnUNetPlans_quick__3d_fullres" / "fold_all"
    assert (weak / "checkpoint_final.pth").is_file() and (final / "checkpoint_final.pth").is_file()
    assert summary["final_model"] == str(final.parent)
    made_with = json.loads((ws.raw / pseudo / "dataset.json").read_text())["nnunetv2_dram"]
    assert made_with["trainer"] == "DRAMTrainer_1epochs_2its" and made_with["plans"] == "nnUNetPlans_quick"
    # predictions of every test image, in its geometry, by a stock nnU-Net model; the restricted copy has no
    # foreground outside the test case's region map
    inside = preds.with_name("predictions_in_regions")
    assert summary["predictions_in_regions"] == str(inside)
    for img in (src / "imagesTs").glob("*_0000.nii.gz"):
        name = img.name.replace("_0000", "")
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(preds / name)))
        assert seg.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(img))).shape
        assert set(np.unique(seg)) <= {0, 1}
        regions = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "labelsTs" / name)))
        restricted = sitk.GetArrayFromImage(sitk.ReadImage(str(inside / name)))
        assert not restricted[regions == 0].any()
        assert np.array_equal(restricted[regions > 0], seg[regions > 0])
    assert _hash_tree(src) == source_before, "the source dataset must not change"

    # the printed nnUNetv2_predict command reproduces the pipeline's predictions with the final model
    cmd = _predict_command(proc.stdout)
    assert cmd[0] == "nnUNetv2_predict"
    assert [cmd[cmd.index(f) + 1] for f in ("-d", "-c", "-f", "-tr", "-p")] == \
        ["721", "3d_fullres", "all", "nnUNetTrainer_1epochs_2its", "nnUNetPlans_quick"]
    again_dir = tmp_path / "again"
    cmd = [str(src / "imagesTs") if a == "INPUT_FOLDER" else str(again_dir) if a == "OUTPUT_FOLDER" else a
           for a in cmd]
    ws.run(cmd[0], *cmd[1:], "-device", "cpu", "-npp", 1, "-nps", 1)
    for p in preds.glob("*.nii.gz"):
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(p))),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(again_dir / p.name))))

    # the same command again resumes: every stage finds its result and skips
    again = ws.run("nnunetv2_dram", *args)
    assert again.stdout.count("skipping") >= 5
    assert "nnUNetv2_train" not in again.stdout


def test_pipeline_with_a_planner_uses_its_plans_in_every_stage(weak2d, tmp_path):
    ws, dataset = weak2d
    proc = ws.run("nnunetv2_dram", "pipeline", "-d", dataset[7:10], "-o", 725, "-c", "2d", "--preset", "quick",
                  "-pl", "nnUNetPlannerResEncM", "--epochs", 1, "--iterations", 2, "-device", "cpu", "-np", 1,
                  "--crf", "none", "--predictions", tmp_path / "pred")
    plans = "nnUNetResEncUNetMPlans_quick"
    pre = ws.preprocessed / dataset
    assert json.loads((pre / "nnUNetResEncUNetMPlans.json").read_text())["experiment_planner_used"] == \
        "nnUNetPlannerResEncM"
    assert json.loads((pre / f"{plans}.json").read_text())["configurations"]["2d"]["architecture"][
        "network_class_name"].endswith("ResidualEncoderUNet")
    pseudo = f"Dataset725_{dataset.split('_', 1)[1]}Pseudo"
    assert (ws.results / dataset / f"DRAMTrainer_1epochs_2its__{plans}__2d" / "fold_all" /
            "checkpoint_final.pth").is_file()
    assert json.loads((ws.raw / pseudo / "dataset.json").read_text())["nnunetv2_dram"]["plans"] == plans
    assert (ws.preprocessed / pseudo / f"{plans}.json").is_file()
    assert (ws.results / pseudo / f"nnUNetTrainer_1epochs_2its__{plans}__2d" / "fold_all" /
            "checkpoint_final.pth").is_file()
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == len(list((ws.raw / dataset / "imagesTs").iterdir()))
    cmd = _predict_command(proc.stdout)
    assert cmd[cmd.index("-p") + 1] == plans and cmd[cmd.index("-tr") + 1] == "nnUNetTrainer_1epochs_2its"


def test_pipeline_refuses_a_broken_dataset_before_any_work(weak3d):
    ws, dataset = weak3d

    def out_of_range(cases):
        case = sorted(cases)[0]
        cases[case]["1"] = 140
        return case

    with edited_weak_labels(ws, dataset, out_of_range) as case:
        proc = ws.run("nnunetv2_dram", "pipeline", "-d", dataset[7:10], "-o", 722, "--preset", "quick",
                      "-device", "cpu", check=False)
    assert proc.returncode == 1
    assert f"case '{case}' region 1" in proc.stderr and "out of range" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(ws.raw.glob("Dataset722_*"))
