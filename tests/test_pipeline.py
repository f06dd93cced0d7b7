"""`nnunetv2_dram pipeline` end to end through the real nnU-Net commands, and `demo` argument handling."""
import json

import numpy as np
import SimpleITK as sitk

from conftest import edited_weak_labels


def test_pipeline_end_to_end_and_resume(weak3d, tmp_path):
    ws, dataset = weak3d
    preds = tmp_path / "predictions"
    args = ["pipeline", "-d", dataset[7:10], "-o", 721, "--preset", "quick", "--epochs", 1, "--iterations", 2,
            "-device", "cpu", "-np", 1, "--predictions", preds]
    proc = ws.run("nnunetv2_dram", *args)
    assert "final nnU-Net vs referenceTs: IoU" in proc.stdout
    pseudo = f"Dataset721_{dataset.split('_', 1)[1]}Pseudo"
    summary = json.loads((ws.results / pseudo / "pipeline_logs" / "pipeline_summary.json").read_text())
    assert summary["pseudo_dataset"] == pseudo
    m = summary["metrics"]
    for key in ("pseudo_labels_vs_referenceTr", "final_model_vs_referenceTs"):
        assert 0.0 <= m[key]["IoU"] <= 1.0 and 0.0 <= m[key]["Dice"] <= 1.0
    # predictions of every test image, in its geometry, by a stock nnU-Net model
    final = ws.results / pseudo / "nnUNetTrainerBudget__nnUNetPlans_quick__3d_fullres" / "fold_all"
    assert (final / "checkpoint_final.pth").is_file()
    for img in (ws.raw / dataset / "imagesTs").glob("*_0000.nii.gz"):
        seg = sitk.ReadImage(str(preds / img.name.replace("_0000", "")))
        assert seg.GetSize() == sitk.ReadImage(str(img)).GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1}
    # the same command again resumes: every stage finds its result and skips
    again = ws.run("nnunetv2_dram", *args)
    assert again.stdout.count("skipping") >= 5
    assert "nnUNetv2_train" not in again.stdout


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
