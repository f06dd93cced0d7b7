"""benchmarks/quality.py: the paired statistics on hand-made numbers, and seeded runs that repeat on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import quality  # noqa: E402

DRAM, NOREF, CAM = "DRAMTrainer", "DRAMTrainerNoRefine", "CAMTrainer"


def _run(seed, data_seed=0, mode="3d", *, dram_none, noref_none, dram_dense, cam_dense, finals=None, full=None):
    rows = {quality.pseudo_row(DRAM, "none"): {"IoU": dram_none, "Dice": 0.5},
            quality.pseudo_row(NOREF, "none"): {"IoU": noref_none, "Dice": 0.5},
            quality.pseudo_row(DRAM, "dense"): {"IoU": dram_dense, "Dice": 0.5},
            quality.pseudo_row(CAM, "dense"): {"IoU": cam_dense, "Dice": 0.5}}
    for trainer, (iou, dice) in (finals or {}).items():
        rows[quality.final_row(trainer)] = {"IoU": iou, "Dice": dice}
    if full is not None:
        rows[quality.FULL_ROW] = {"IoU": full - 0.1, "Dice": full}
    return {"mode": mode, "target": "percentage", "data_seed": data_seed, "seed": seed, "rows": rows}


def _comparison(group, name):
    found = [c for c in group["comparisons"] if c["name"] == name]
    return found[0] if found else None


def test_paired_statistics_on_hand_made_numbers():
    runs = [
        _run(0, dram_none=0.40, noref_none=0.30, dram_dense=0.50, cam_dense=0.25,
             finals={DRAM: (0.60, 0.80), NOREF: (0.50, 0.70), CAM: (0.40, 0.60)}, full=0.85),
        _run(1, dram_none=0.25, noref_none=0.30, dram_dense=0.40, cam_dense=0.32,
             finals={DRAM: (0.55, 0.72), NOREF: (0.60, 0.75), CAM: (0.30, 0.50)}, full=0.80),
        # a run cut short before its final networks: it counts where it has both rows, nowhere else
        _run(2, dram_none=0.32, noref_none=0.30, dram_dense=0.30, cam_dense=0.30),
        _run(0, data_seed=1, dram_none=0.10, noref_none=0.20, dram_dense=0.20, cam_dense=0.10),
        _run(0, mode="2d", dram_none=0.10, noref_none=0.10, dram_dense=0.20, cam_dense=float("nan")),
    ]
    groups = quality.paired_statistics(runs)
    assert [(g["mode"], g["data_seed"]) for g in groups] == [("3d", 0), ("3d", 1), ("3d", "all"), ("2d", 0)]
    g = groups[0]
    assert [r["seed"] for r in g["runs"]] == [0, 1, 2]

    row = g["rows"][quality.pseudo_row(DRAM, "none")]["IoU"]
    assert row["n"] == 3 and row["mean"] == pytest.approx(0.97 / 3)
    assert row["sd"] == pytest.approx(0.0750555, abs=1e-6)  # sample sd of 0.40, 0.25, 0.32
    assert g["rows"][quality.final_row(DRAM)]["Dice"] == {"mean": pytest.approx(0.76), "sd": pytest.approx(0.0565685),
                                                          "n": 2}

    diff = _comparison(g, "DRAMTrainer - NoRefine: pseudo-label IoU, CRF none")
    assert [v["value"] for v in diff["values"]] == pytest.approx([0.10, -0.05, 0.02])
    assert diff["mean"] == pytest.approx(0.07 / 3) and diff["sd"] == pytest.approx(0.0750555, abs=1e-6)
    assert (diff["n"], diff["won"], diff["goal"], diff["goal_met"]) == (3, 2, None, None)

    ratio = _comparison(g, "DRAMTrainer / CAM: pseudo-label IoU, CRF dense")
    assert [v["value"] for v in ratio["values"]] == pytest.approx([2.0, 1.25, 1.0])
    assert (ratio["n"], ratio["won"], ratio["goal_met"]) == (3, 2, 1)  # 1.0 is no win; only 2.0 reaches 1.5

    final = _comparison(g, "final on DRAMTrainer / fully supervised: Dice")
    assert [(v["seed"], v["value"]) for v in final["values"]] == [(0, pytest.approx(0.80 / 0.85)),
                                                                   (1, pytest.approx(0.72 / 0.80))]
    assert (final["n"], final["won"], final["goal_met"]) == (2, 0, 0)
    noref_final = _comparison(g, "DRAMTrainer - NoRefine: final Dice")
    assert [v["value"] for v in noref_final["values"]] == pytest.approx([0.10, -0.03])
    assert noref_final["won"] == 1

    # a data seed with one training seed: a mean, no sd
    one = _comparison(groups[1], "DRAMTrainer - NoRefine: pseudo-label IoU, CRF none")
    assert (one["n"], one["mean"], one["sd"], one["won"]) == (1, pytest.approx(-0.10), None, 0)
    # pooled over the two data seeds of 3-D percentage: all four runs
    pooled = _comparison(groups[2], "DRAMTrainer - NoRefine: pseudo-label IoU, CRF none")
    assert [(v["data_seed"], v["seed"]) for v in pooled["values"]] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert pooled["n"] == 4 and pooled["won"] == 2
    # a NaN (an empty reference) is left out, not counted as a loss; no comparison without numbers
    assert _comparison(groups[3], "DRAMTrainer / CAM: pseudo-label IoU, CRF dense") is None
    assert groups[3]["rows"][quality.pseudo_row(CAM, "dense")]["IoU"] == {"mean": None, "sd": None, "n": 0}

    table = quality.format_statistics(groups)
    assert "3d percentage, data seed 0: mean ± sd over training seeds 0 1 2" in table
    assert "+0.023 ± 0.075" in table and "2/3" in table


def test_retrain_refuses_an_arm_outside_the_run():
    with pytest.raises(SystemExit):
        quality.parse_args(["--arms", "DRAMTrainer", "--retrain", "CAMTrainer"])


def test_unknown_threshold_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit):
        quality.parse_args(["--threshold", "medium"])
    assert "calibrated, midpoint, otsu or a number" in capsys.readouterr().err
    assert quality.parse_args(["--threshold", "midpoint"]).threshold == "midpoint"
    assert quality.parse_args(["--threshold", "0.4"]).threshold == "0.4"


def _quality(workspace: Path, *flags) -> dict:
    """One real quality.py call at toy size on the CPU; returns its JSON."""
    env = dict(os.environ)
    from nnunetv2_dram.training.budget import TRAINER_VARIABLES
    for k in (*TRAINER_VARIABLES, "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    out = workspace.parent / f"{workspace.name}.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--device", "cpu", "--train", "4", "--test", "2",
           "--shape", "16", "48", "48", "--epochs", "1", "--iterations", "2", "--arms", "DRAMTrainer",
           "--processes", "1", "--workspace", str(workspace), "--json", str(out), *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def _weights(seed_folder: str) -> dict:
    """Every trained network of a training seed's folder: {path below nnUNet_results: state dict}."""
    import torch
    results = Path(seed_folder) / "nnUNet_results"
    return {str(p.relative_to(results)): torch.load(p, map_location="cpu", weights_only=False)["network_weights"]
            for p in sorted(results.rglob("checkpoint_final.pth"))}


def _checkpoint_times(seed_folder: str) -> dict:
    results = Path(seed_folder) / "nnUNet_results"
    return {str(p.relative_to(results)): p.stat().st_mtime_ns for p in results.rglob("checkpoint_final.pth")}


def _same_weights(a, b) -> bool:
    """Equal tensors under equal keys, through nested dicts ({checkpoint: state dict}, a module's extra state)."""
    import torch
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_weights(a[k], b[k]) for k in a)
    return a == b


def _rounded(run: dict) -> dict:
    return {row: {m: None if v is None else round(v, 3) for m, v in values.items()}
            for row, values in run["rows"].items()}


def test_same_training_seed_repeats_and_another_seed_differs(tmp_path):
    """Seeds 0 and 1 as parallel chains, then seed 0 trained again in order after --retrain has deleted its models,
    pseudo labels and final network: seed 0 gives the same numbers and the same weights both times (the seed reaches
    every training, and pseudo labels, preprocessing and prediction are deterministic); seed 1 trains other weights."""
    workspace = tmp_path / "ws"
    first = _quality(workspace, "--seeds", "0", "1", "--parallel-arms")
    by_seed = {r["seed"]: r for r in first["runs"]}
    assert sorted(by_seed) == [0, 1] and all(r["complete"] for r in first["runs"])
    w0, w1 = _weights(by_seed[0]["folder"]), _weights(by_seed[1]["folder"])
    assert len(w0) == 2  # the weak model and the final network
    assert w0.keys() == w1.keys()
    for key in w0:  # each of the two trainings depends on the seed
        assert not _same_weights({key: w0[key]}, {key: w1[key]})
    stats = first["statistics"][0]
    trained_first = _checkpoint_times(by_seed[0]["folder"])
    assert [r["seed"] for r in stats["runs"]] == [0, 1]
    assert stats["rows"]["DRAMTrainer raw map"]["IoU"]["n"] == 2

    again = _quality(workspace, "--seeds", "0", "--retrain", "DRAMTrainer")
    assert [r["seed"] for r in again["runs"]] == [0]
    rows = _rounded(again["runs"][0])
    assert set(rows) == {"DRAMTrainer raw map", "DRAMTrainer refined map", "DRAMTrainer pseudo labels, CRF none",
                         "DRAMTrainer pseudo labels, CRF dense", "final nnU-Net on DRAMTrainer pseudo labels"}
    assert rows == _rounded(by_seed[0])
    retrained = _checkpoint_times(again["runs"][0]["folder"])
    assert retrained.keys() == trained_first.keys()
    assert all(retrained[k] != trained_first[k] for k in retrained)  # trained anew, not found
    assert _same_weights(_weights(again["runs"][0]["folder"]), w0)


def test_extra_trainer_final_networks_and_ignore_band(tmp_path):
    """--arms with no arm, an extra trainer with --extra-finals and --ignore-band: the extra trainer gets pseudo labels
    with nnU-Net's ignore label (2) near each region's threshold, and a final network on each of its two dense-CRF
    pseudo-label sets."""
    result = _quality(tmp_path / "ws", "--arms", "--extra-trainers", "DRAMTrainerWithAttention", "--extra-finals",
                      "--ignore-band", "0.4")
    run = result["runs"][0]
    assert run["complete"], run["errors"]
    trainer = "DRAMTrainerWithAttention"
    assert list(run["rows"]) == [f"{trainer} raw map", f"{trainer} refined map",
                                 quality.pseudo_row(trainer, "none"), quality.pseudo_row(trainer, "dense"),
                                 quality.band_pseudo_row(trainer, 0.4), quality.final_row(trainer),
                                 quality.final_row(trainer, 0.4)]
    assert len(_weights(run["folder"])) == 3  # the weak model and two final networks
    root = Path(run["folder"]) / "nnUNet_raw"
    band = json.loads(next(root.glob("Dataset830_*/dataset.json")).read_text())
    assert band["labels"]["ignore"] == 2 and band["nnunetv2_dram"]["ignore_band"] == 0.4
    assert "ignore" not in json.loads(next(root.glob("Dataset809_*/dataset.json")).read_text())["labels"]
    import SimpleITK as sitk
    import numpy as np
    labels = np.concatenate([sitk.GetArrayFromImage(sitk.ReadImage(str(f))).ravel()
                             for f in sorted(root.glob("Dataset830_*/labelsTr/*.nii.gz"))])
    assert (labels == 2).any()


def test_final_iterations_factor_keeps_the_weak_models_and_its_rows_apart(tmp_path):
    """A second call on a finished workspace with --final-iterations-factor 2: the weak model and the first final
    network are kept (not trained again), one final network of twice the iterations per epoch is trained, and its
    rows go to a rows file of their own, so the first call's table is unchanged."""
    workspace = tmp_path / "ws"
    first = _quality(workspace)
    folder = first["runs"][0]["folder"]
    trained_first = _checkpoint_times(folder)
    assert len(trained_first) == 2
    second = _quality(workspace, "--final-iterations-factor", "2")
    assert second["args"]["final_iterations_factor"] == 2
    trained = _checkpoint_times(folder)
    assert {k: trained[k] for k in trained_first} == trained_first
    new = sorted(set(trained) - set(trained_first))
    assert len(new) == 1 and "/nnUNetTrainer_1epochs_4its__" in new[0], new
    rows = Path(folder) / "rows"
    assert sorted(p.name for p in rows.iterdir()) == ["DRAMTrainer.final_x2.json", "DRAMTrainer.json"]
    first_rows, second_rows = _rounded(first["runs"][0]), _rounded(second["runs"][0])
    final = quality.final_row("DRAMTrainer")
    assert set(first_rows) == set(second_rows)
    assert {k: v for k, v in first_rows.items() if k != final} == {k: v for k, v in second_rows.items() if k != final}
    again = quality.collect_run(quality.parse_args(["--arms", "DRAMTrainer", "--workspace", str(workspace)]),
                                ("3d", "percentage", 0), 0)
    assert _rounded(again) == first_rows
    with pytest.raises(SystemExit):
        quality.parse_args(["--final-iterations-factor", "0"])
