"""A short DRAMTrainer training on generated data clearly lowers the validation region-% error."""
import json

import numpy as np
import torch

from nnunetv2_dram.evaluation.region_report import region_report
from nnunetv2_dram.inference.region_inference import predict_case_by_regions
from nnunetv2_dram.training.region_chunks import ChunkSpec, build_region_samples, region_bboxes
from nnunetv2_dram.weak_labels.format import load_weak_labels


def _untrained_region_mae(ws, dataset, val_keys, monkeypatch):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_dram.training.dram_trainers import DRAMTrainer
    for k, v in ws.env.items():
        monkeypatch.setenv(k, v)
    pm = PlansManager(json.loads((ws.preprocessed / dataset / "nnUNetPlans_quick.json").read_text()))
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(0)
    net = DRAMTrainer.build_network_architecture(pm, cm, 1, 2, False)
    folder = ws.preprocessed / dataset / cm.data_identifier
    ds = infer_dataset_class(str(folder))(str(folder), list(val_keys))
    spec = ChunkSpec.from_configuration(cm.patch_size, cm.spacing, DRAMTrainer.margin_mm, DRAMTrainer.mask_outside)
    rows = {}
    for case in val_keys:
        data, seg, _, _ = ds.load_case(case)
        samples, _ = build_region_samples({case: region_bboxes(seg[:])}, None)
        pred = predict_case_by_regions(net, data, seg, samples, spec, torch.device("cpu"))
        rows[case] = {str(r): f * 100 for r, f in pred.fractions.items()}
    return region_report(rows, load_weak_labels(ws.raw / dataset / "weak_labels.json"))["mean_abs_error"]


def test_short_training_lowers_region_error(weak3d, monkeypatch):
    ws, dataset = weak3d
    # 300 iterations on 4 training cases; fold 0 holds out 2 cases (10 lobes), validated in full every epoch.
    # Seeded, at nnU-Net's learning rate 1e-2. With the linear hinge one of three seeds ended with a dead map (every
    # lobe ~0 %); with the log-domain continuation seeds 0/1/2 gave 0.32/0.35/0.59 x the untrained error, r
    # 0.97/0.93/0.62 (full-resolution refinement, docs/results.md); seed 0 with today's coarse refinement: 0.35x, r 0.97
    # DRAMTrainer_12epochs_25its: 12 epochs of 25 iterations, 5 validation iterations per epoch
    ws.run("nnUNetv2_train", dataset[7:10], "3d_fullres", "0", "-tr", "DRAMTrainer_12epochs_25its",
           "-p", "nnUNetPlans_quick", "-device", "cpu", NNUNETV2_DRAM_SEED=0)
    fold = ws.results / dataset / "DRAMTrainer_12epochs_25its__nnUNetPlans_quick__3d_fullres" / "fold_0"
    trained = json.loads((fold / "validation" / "region_fractions.json").read_text())
    val_keys = sorted(trained["cases"])
    untrained = _untrained_region_mae(ws, dataset, val_keys, monkeypatch)
    assert trained["n_regions"] >= 5
    # the untrained map predicts ~0 % everywhere (25.5 percentage points here)
    assert trained["mean_abs_error"] < 0.7 * untrained, (trained["mean_abs_error"], untrained)
    # and not by predicting one value for every lobe: the predictions follow the targets
    pairs = np.array([(r["predicted_percent"], np.mean(r["target"])) for c in trained["cases"].values()
                      for r in c.values() if "target" in r])
    assert np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1] > 0.6
    # the per-epoch log shows the validation error well below the untrained one (measured: 13.0 after the first 25
    # iterations, 9.6 on average over the last four epochs)
    log = "".join(p.read_text() for p in sorted(fold.glob("training_log_*.txt")))
    maes = [float(l.split(" val ")[1].split()[0]) for l in log.splitlines() if "Region-% MAE train" in l]
    assert len(maes) == 12 and np.mean(maes[-4:]) < 0.7 * untrained, (maes, untrained)
