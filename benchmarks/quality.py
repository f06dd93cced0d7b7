"""The seed paper's comparison table for this implementation, on held-out generated data, repeated over seeds.

A column is one synthetic weak dataset, (mode, target, data seed): training cases with weak labels, test cases with
hidden references. On every column each arm is trained once per training seed:

  DRAMTrainer, DRAMTrainerNoRefine, CAMTrainer: the weak model -> its maps on the test cases (threshold 0.5, inside
      the regions) vs referenceTs -> pseudo labels of the training cases without and with the dense CRF vs
      referenceTr -> a stock nnU-Net trained on the CRF pseudo labels (the final network) -> its predictions of
      the test cases vs referenceTs
  full: a stock nnU-Net trained on referenceTr (fully supervised, the upper bound)
  --extra-trainers: more weak trainers, their raw/refined test maps and pseudo labels only (with --extra-finals,
      their final networks too)
  --ignore-band B: every arm with a final network also makes pseudo labels (dense CRF) whose voxels within B of
      their region's threshold are nnU-Net's `ignore` label, and trains a second final network on them
  --threshold T: every arm's pseudo labels with this threshold (nnunetv2_dram pseudolabels --threshold; default
      midpoint, as there), in a workspace of its own
  --final-iterations-factor F: the final networks and the fully supervised one train F x the weak models'
      iterations per epoch; a resumed workspace keeps its weak models and pseudo labels and trains only these

Every training goes through `nnUNetv2_train` with NNUNETV2_DRAM_SEED=<training seed>, which seeds network
initialisation, region sampling and augmentation; on the CPU augmentation runs in the training process
(nnUNet_n_proc_DA=0), so the same command on the same CPU machine gives the same numbers. Pseudo labels,
preprocessing, prediction and evaluation are deterministic. On a GPU (cuDNN autotuning, augmentation workers)
the seed fixes the initialisation, not the run.

Per (mode, target, data seed), and pooled over data seeds, every metric is reported as mean ± sd over the training
seeds with n, with the paired per-seed comparisons the goals are about: DRAMTrainer - DRAMTrainerNoRefine
(pseudo-label IoU without and with the CRF, final Dice and IoU), DRAMTrainer / CAMTrainer (pseudo-label IoU,
final IoU; goal 1.5) and final / fully supervised Dice of each arm (goal 0.95), each with the number of seeds it
won. --json writes one file holding every per-seed number and these statistics, rewritten after every row.

Workspace: <workspace>/<mode>_<target>_data<data seed>/data/ holds the weak and the fully supervised datasets and
their preprocessed data, shared by the training seeds; .../seed<seed>/ holds that training seed's nnU-Net folders
(the shared datasets linked in), its pseudo-label datasets and models, rows/<arm>.json (the arm's rows as they
finish) and logs/. A second call with the same workspace resumes: finished trainings and pseudo-label sets are
kept, everything after them is evaluated again. --parallel-arms runs each (training seed, arm) chain of a column
in a process of its own after the shared data are ready (one GPU, all arms at once).

    python benchmarks/quality.py --device cpu                      # one 3-D percentage run, ~18 min on 2 cores
    python benchmarks/quality.py --device cpu --seeds 0 1 2 --targets percentage ctss --json quality_cpu.json
    python benchmarks/quality.py --device cpu --seeds 0 1 --arms DRAMTrainer DRAMTrainerNoRefine   # one question
    python benchmarks/quality.py --device cuda --preset full --parallel-arms --train 24 --test 8
        --shape 32 96 96 --epochs 10 --iterations 200 --seeds 0 1      # (one line) the GPU quality3d run
    python benchmarks/quality.py --collect ...the same flags...    # JSON and tables from the workspace, no training
    python benchmarks/quality.py --summarize quality.json          # the tables of a JSON written before
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

WEAK_TRAINERS = ("DRAMTrainer", "DRAMTrainerNoRefine", "CAMTrainer")
FULL = "full"
ARMS = (*WEAK_TRAINERS, FULL)
MAX_EXTRA_TRAINERS = 6
# Dataset ids inside one column's nnU-Net folders (a column and each of its training seeds have folders of their
# own, so the ids repeat between columns): the weak dataset, the fully supervised one, and per weak trainer its
# pseudo labels without (id) and with (id + 1) the dense CRF; --extra-trainers take 808, 810, ... in their order.
WEAK_ID = 800
FULL_ID = 805
PSEUDO_IDS = {"DRAMTrainer": 801, "CAMTrainer": 803, "DRAMTrainerNoRefine": 806}
MAP_KINDS = {"CAMTrainer": [("CAMTrainer map", "final")],
             "DRAMTrainerNoRefine": [("DRAMTrainerNoRefine map", "final")],
             "DRAMTrainer": [("DRAMTrainer raw map", "dram"), ("DRAMTrainer refined map", "refined")]}
FULL_ROW = "fully supervised (referenceTr)"
NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
SHARED_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed")


def map_rows(trainer: str) -> list:
    return MAP_KINDS.get(trainer, [(f"{trainer} raw map", "dram"), (f"{trainer} refined map", "refined")])


def pseudo_row(trainer: str, crf: str) -> str:
    return f"{trainer} pseudo labels, CRF {crf}"


def final_row(trainer: str, band: float = 0.0) -> str:
    return f"final nnU-Net on {trainer} pseudo labels" + (f", ignore band {band:g}" if band > 0 else "")


def band_pseudo_row(trainer: str, band: float) -> str:
    return f"{pseudo_row(trainer, 'dense')}, ignore band {band:g} (ignored voxels not scored)"


# (name, kind, first row, second row, metric, goal): per training seed, first - second or first / second
COMPARISONS = (
    *[(f"DRAMTrainer - NoRefine: pseudo-label IoU, CRF {crf}", "difference", pseudo_row("DRAMTrainer", crf),
       pseudo_row("DRAMTrainerNoRefine", crf), "IoU", None) for crf in ("none", "dense")],
    *[(f"DRAMTrainer - NoRefine: final {m}", "difference", final_row("DRAMTrainer"),
       final_row("DRAMTrainerNoRefine"), m, None) for m in ("Dice", "IoU")],
    *[(f"DRAMTrainer / CAM: pseudo-label IoU, CRF {crf}", "ratio", pseudo_row("DRAMTrainer", crf),
       pseudo_row("CAMTrainer", crf), "IoU", 1.5) for crf in ("none", "dense")],
    ("DRAMTrainer / CAM: final IoU", "ratio", final_row("DRAMTrainer"), final_row("CAMTrainer"), "IoU", 1.5),
    *[(f"final on {t} / fully supervised: Dice", "ratio", final_row(t), FULL_ROW, "Dice", 0.95)
      for t in WEAK_TRAINERS],
)


# ------------------------------------------------------------------------------------------------ statistics
def _summary(values: list) -> dict:
    """mean, sample sd (None below two values) and n of the finite values."""
    v = [float(x) for x in values if x is not None and math.isfinite(x)]
    return {"mean": statistics.fmean(v) if v else None, "sd": statistics.stdev(v) if len(v) > 1 else None,
            "n": len(v)}


def _group(mode: str, target: str, data_seed, runs: list) -> dict:
    rows, metrics_of = {}, {}
    for run in runs:
        for row, values in run["rows"].items():
            names = metrics_of.setdefault(row, [])
            names += [m for m in values if m not in names]
    for row, names in metrics_of.items():
        rows[row] = {m: _summary([run["rows"].get(row, {}).get(m) for run in runs]) for m in names}
    comparisons = []
    for name, kind, first, second, metric, goal in COMPARISONS:
        values = []
        for run in runs:
            a = run["rows"].get(first, {}).get(metric)
            b = run["rows"].get(second, {}).get(metric)
            if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or (kind == "ratio" and b == 0):
                continue
            values.append({"data_seed": run["data_seed"], "seed": run["seed"],
                           "value": a - b if kind == "difference" else a / b})
        if not values:
            continue
        v = [x["value"] for x in values]
        comparisons.append({"name": name, "kind": kind, "first": first, "second": second, "metric": metric,
                            **_summary(v), "won": sum(x > (0 if kind == "difference" else 1) for x in v),
                            "goal": goal, "goal_met": None if goal is None else sum(x >= goal for x in v),
                            "values": values})
    return {"mode": mode, "target": target, "data_seed": data_seed,
            "runs": [{"data_seed": r["data_seed"], "seed": r["seed"]} for r in runs],
            "rows": rows, "comparisons": comparisons}


def paired_statistics(runs: list) -> list:
    """Per (mode, target, data seed), then pooled over the data seeds of a (mode, target) when there are several:
    every row's metrics as mean, sd and n over the runs (one run per training seed), and the paired comparisons of
    COMPARISONS over the runs that have both rows, with how many of them the first row won (difference > 0,
    ratio > 1) and met the goal (ratio >= goal). Pure: `runs` are dicts with mode, target, data_seed, seed and
    rows {row: {metric: value or None}}."""
    by_column: dict = {}
    for run in runs:
        by_column.setdefault((run["mode"], run["target"]), {}).setdefault(run["data_seed"], []).append(run)
    groups = []
    for (mode, target), by_data in by_column.items():
        for data_seed, column_runs in by_data.items():
            groups.append(_group(mode, target, data_seed, column_runs))
        if len(by_data) > 1:
            groups.append(_group(mode, target, "all", [r for rs in by_data.values() for r in rs]))
    return groups


def _cell(s: dict, sign: bool = False) -> str:
    if s is None or s["mean"] is None:
        return "—"
    mean = f"{s['mean']:+.3f}" if sign else f"{s['mean']:.3f}"
    return mean if s["sd"] is None else f"{mean} ± {s['sd']:.3f}"


def format_statistics(groups: list) -> str:
    lines = []
    for g in groups:
        seeds = " ".join(f"{r['seed']}" if g["data_seed"] != "all" else f"d{r['data_seed']}/s{r['seed']}"
                         for r in g["runs"])
        data = "all data seeds" if g["data_seed"] == "all" else f"data seed {g['data_seed']}"
        lines.append(f"\n{g['mode']} {g['target']}, {data}: mean ± sd over training seeds {seeds}")
        lines.append(f"{'row':54s} {'IoU':>16s} {'Dice':>16s} {'reg-%MAE':>16s} {'Dice/full':>16s}")
        n_runs = len(g["runs"])
        for row, m in g["rows"].items():
            n = max(s["n"] for s in m.values())
            lines.append(f"{row:54s} " + " ".join(f"{_cell(m.get(k)):>16s}" for k in (
                "IoU", "Dice", "region_mae", "ratio_to_fully_supervised_Dice")) + (f"  n={n}" if n != n_runs else ""))
        if g["comparisons"]:
            lines.append(f"{'paired, per training seed':54s} {'mean ± sd':>16s} {'won':>6s} {'goal met':>12s}")
        for c in g["comparisons"]:
            goal = "" if c["goal"] is None else f">={c['goal']:g}: {c['goal_met']}/{c['n']}"
            lines.append(f"{c['name']:54s} {_cell(c, sign=c['kind'] == 'difference'):>16s} "
                         f"{c['won']:>4d}/{c['n']:<2d} {goal:>12s}".rstrip())
    return "\n".join(lines)


def format_runs(runs: list) -> str:
    lines = []
    for run in runs:
        state = "" if run["complete"] else " (unfinished)"
        lines.append(f"\n{run['mode']} {run['target']} data seed {run['data_seed']} training seed {run['seed']}"
                     f"{state}")
        lines.append(f"{'row':55s} {'IoU':>6s} {'Dice':>6s} {'reg-%MAE':>9s} {'Dice/full':>9s}")
        for k, v in run["rows"].items():
            lines.append(f"{k:55s} " + " ".join(
                f"{v.get(m) if v.get(m) is not None else float('nan'):{w}.{d}f}"
                for m, w, d in (("IoU", 6, 3), ("Dice", 6, 3), ("region_mae", 9, 2),
                                ("ratio_to_fully_supervised_Dice", 9, 2))))
        for arm, error in run["errors"].items():
            lines.append(f"{arm} failed: {error}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ workspace
def column_root(args, column) -> Path:
    mode, target, data_seed = column
    return Path(args.workspace).resolve() / f"{mode}_{target}_data{data_seed}"


def seed_root(args, column, seed: int) -> Path:
    return column_root(args, column) / f"seed{seed}"


def final_tag(args) -> str:
    """'' at the weak models' training length; '.final_x<F>' when the final networks train F times as many
    iterations per epoch (--final-iterations-factor): their rows and predictions are then kept apart."""
    return "" if args.final_iterations_factor == 1 else f".final_x{args.final_iterations_factor}"


def rows_file(args, column, seed: int, arm: str) -> Path:
    return seed_root(args, column, seed) / "rows" / f"{arm}{final_tag(args)}.json"


def use_folders(root: Path) -> None:
    """Point nnU-Net's three folders at root/ (nnU-Net reads them from the environment whenever it needs them)."""
    for n in NNUNET_FOLDERS:
        (root / n).mkdir(parents=True, exist_ok=True)
        os.environ[n] = str(root / n)


def dataset_names(column) -> tuple[str, str]:
    """(weak dataset, fully supervised dataset) of a column."""
    from nnunetv2_dram.synthetic.dataset import dataset_folder_name
    mode, target, data_seed = column
    weak = dataset_folder_name(WEAK_ID, f"Q{mode}{target[:3]}d{data_seed}")
    return weak, f"Dataset{FULL_ID:03d}_{weak.split('_', 1)[1]}Full"


def arms_of(args) -> list:
    return [*args.arms, *args.extra_trainers]


def pseudo_id(args, trainer: str) -> int:
    """Dataset id of the trainer's pseudo labels without the CRF (+1: with the CRF) in a training seed's folders."""
    return PSEUDO_IDS[trainer] if trainer in PSEUDO_IDS else 808 + 2 * args.extra_trainers.index(trainer)


def band_pseudo_id(args, trainer: str) -> int:
    """Dataset id of the trainer's pseudo labels with --ignore-band (dense CRF) in a training seed's folders."""
    return 830 + [a for a in arms_of(args) if a != FULL].index(trainer)


def has_final(args, arm: str) -> bool:
    return arm in WEAK_TRAINERS or (args.extra_finals and arm != FULL)


def configuration_of(mode: str) -> str:
    return "2d" if mode == "2d" else "3d_fullres"


def _env_setup(args) -> None:
    from nnunetv2_dram.paths import ensure_ext_trainer_path
    ensure_ext_trainer_path()
    os.environ.setdefault("nnUNet_def_n_proc", str(args.processes))
    if args.device == "cpu":
        # augmentation in the training process, from the seeded global generators: a rerun repeats the batches
        os.environ["nnUNet_n_proc_DA"] = "0"
        # nnU-Net trains on every core of a CPU, and OpenMP's waiting threads spin: two trainings on the same cores
        # (--parallel-arms, or a second run alongside) then take the cores from each other (a weak model's epoch on
        # 2 cores: 24 s with passive waiting, 137 s spinning). One training alone runs as fast either way.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # every row is measured on held-out test cases; nnU-Net's own final validation of fold 'all' would predict the
    # training cases again
    os.environ["NNUNETV2_DRAM_SKIP_FINAL_VALIDATION"] = "1"
    # torch.compile takes minutes per network on a GPU before the first step (the weak trainers run eagerly anyway)
    os.environ.setdefault("nnUNet_compile", "f")


def _opts(dataset, new_id, trainer, args, configuration, processes=None):
    from nnunetv2_dram.pipeline.pipeline import PipelineOptions
    iterations = args.iterations_2d if configuration == "2d" else args.iterations
    return PipelineOptions(dataset=dataset, new_id=new_id, configuration=configuration, trainer=trainer,
                           preset=args.preset, epochs=args.epochs, iterations=iterations, device=args.device,
                           fold="all", num_processes=processes or args.processes, threshold=args.threshold)


def fully_supervised_dataset(dataset: str, new_id: int) -> str:
    """imagesTr + referenceTr as a plain nnU-Net lesion dataset (the upper bound's training data)."""
    from nnunetv2_dram.io_utils import atomic_dir, atomic_write_json
    raw = Path(os.environ["nnUNet_raw"])
    name = f"Dataset{new_id:03d}_{dataset.split('_', 1)[1]}Full"
    if (raw / name / "dataset.json").is_file():
        return name
    src = raw / dataset
    dj = json.loads((src / "dataset.json").read_text())
    with atomic_dir(raw / name) as tmp:
        shutil.copytree(src / "imagesTr", tmp / "imagesTr")
        shutil.copytree(src / "referenceTr", tmp / "labelsTr")
        atomic_write_json(tmp / "dataset.json", {"channel_names": dj["channel_names"],
                                                 "labels": {"background": 0, "lesion": 1},
                                                 "numTraining": dj["numTraining"], "file_ending": dj["file_ending"]})
    return name


def prepare_column(args, column, processes: int) -> None:
    """The column's shared data: the synthetic weak dataset and, with the full arm, the fully supervised dataset,
    both planned and preprocessed once for every training seed."""
    from nnunetv2_dram.pipeline import pipeline as P
    from nnunetv2_dram.synthetic.dataset import write_weak_dataset
    mode, target, data_seed = column
    configuration = configuration_of(mode)
    use_folders(column_root(args, column) / "data")
    weak, _ = dataset_names(column)
    raw = Path(os.environ["nnUNet_raw"])
    shape = (1, *args.shape[1:]) if mode == "2d" else tuple(args.shape)
    n_train, n_test = (args.train_2d, args.test_2d) if mode == "2d" else (args.train, args.test)
    if not (raw / weak / "dataset.json").is_file():
        write_weak_dataset(raw, WEAK_ID, name=weak.split("_", 1)[1], n_train=n_train, n_test=n_test, seed=data_seed,
                           shape=shape, target=target, mode=mode, num_processes=processes)
    P.plan_and_preprocess(_opts(weak, 0, "none", args, configuration, processes), weak)
    if FULL in args.arms:
        full = fully_supervised_dataset(weak, FULL_ID)
        P.plan_and_preprocess(_opts(weak, FULL_ID, "none", args, configuration, processes), full)


def prepare_seed(args, column, seed: int) -> None:
    """A training seed's nnU-Net folders with the column's shared datasets linked in (relative links: the
    workspace can move), then --retrain's deletions."""
    data, root = column_root(args, column) / "data", seed_root(args, column, seed)
    for n in SHARED_FOLDERS:
        (root / n).mkdir(parents=True, exist_ok=True)
        for name in dataset_names(column):
            src, dst = data / n / name, root / n / name
            if src.is_dir() and not dst.exists() and not dst.is_symlink():
                dst.symlink_to(os.path.relpath(src, dst.parent), target_is_directory=True)
    for arm in args.retrain:
        forget_arm(args, column, seed, arm)


def forget_arm(args, column, seed: int, arm: str) -> None:
    """Delete an arm's models, pseudo-label datasets, final network, rows and logs of one training seed, so that
    a resumed run trains and evaluates that arm afresh and keeps every other row (a code change that touches one
    trainer is then measured against the same references). The shared datasets are never touched."""
    root = seed_root(args, column, seed)
    weak, full = dataset_names(column)
    results = root / "nnUNet_results"
    if arm == FULL:
        doomed = [results / full]
    else:
        o = _opts(weak, 0, arm, args, configuration_of(column[0]))
        doomed = sorted((results / weak).glob(f"{o.trainer_name(arm)}__*"))
        for i in (pseudo_id(args, arm), pseudo_id(args, arm) + 1, band_pseudo_id(args, arm)):
            for n in NNUNET_FOLDERS:
                doomed += sorted((root / n).glob(f"Dataset{i:03d}_*"))
    doomed += [root / "logs" / arm, rows_file(args, column, seed, arm)]
    for path in doomed:
        if path.is_symlink() or not path.exists():
            continue
        print(f"--retrain {arm}: removing {path}", flush=True)
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# ------------------------------------------------------------------------------------------------ one arm
def map_scores(dataset: str, trainer: str, kind: str, opts) -> dict:
    """Threshold-0.5 map of a weak model on the test cases (inside their regions) vs referenceTs."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2_dram.evaluation.metrics import region_percentages, segmentation_scores
    from nnunetv2_dram.pseudo_labels.generate import (LoadedModel, PseudoLabelSettings, _preprocessed_case,
                                                      predict_probability)
    import torch
    raw = Path(os.environ["nnUNet_raw"])
    dj = json.loads((raw / dataset / "dataset.json").read_text())
    ending = dj["file_ending"]
    model = LoadedModel(PseudoLabelSettings(dataset=dataset, configuration=opts.configuration, fold="all",
                                            trainer=opts.trainer_name(trainer), plans=opts.plans),
                        torch.device(opts.device))
    cases = sorted(p.name[: -len(ending)] for p in (raw / dataset / "labelsTs").iterdir() if p.name.endswith(ending))
    rw = determine_reader_writer_from_dataset_json(dj, str(raw / dataset / "imagesTs" / f"{cases[0]}_0000{ending}"))()
    ious, dices, errs = [], [], []
    for case in cases:
        img = [str(raw / dataset / "imagesTs" / f"{case}_0000{ending}")]
        reg_file = str(raw / dataset / "labelsTs" / f"{case}{ending}")
        data, seg, props = _preprocessed_case(model, "none", case, img, reg_file, dj)
        prob, _ = predict_probability(model, data, seg, props, kind)
        regions = rw.read_seg(reg_file)[0][0]
        ref = rw.read_seg(str(raw / dataset / "referenceTs" / f"{case}{ending}"))[0][0] > 0
        pred = (prob > 0.5) & (regions > 0)
        s = segmentation_scores(ref, pred)
        ious.append(s["IoU"]), dices.append(s["Dice"])
        true_pct, pred_pct = region_percentages(ref, regions), region_percentages(pred, regions)
        errs += [abs(pred_pct[r] - true_pct[r]) for r in true_pct]
    return {"IoU": float(np.nanmean(ious)), "Dice": float(np.nanmean(dices)), "region_mae": float(np.mean(errs))}


class ArmRows:
    """An arm's rows and stage seconds for one training seed, rewritten atomically after every change. Rows of
    an earlier call stay until this call measures them again."""

    def __init__(self, path: Path, arm: str, on_change=lambda: None):
        self.path, self.on_change = path, on_change
        old = json.loads(path.read_text()) if path.is_file() else {}
        self.state = {"arm": arm, "rows": old.get("rows", {}), "seconds": old.get("seconds", {}),
                      "finished": False, "error": None}
        self.write()

    def write(self) -> None:
        from nnunetv2_dram.evaluation.metrics import to_json_compatible
        from nnunetv2_dram.io_utils import atomic_write_json
        atomic_write_json(self.path, to_json_compatible(self.state))
        self.on_change()

    def record(self, row: str, value: dict) -> None:
        self.state["rows"][row] = value
        self.write()

    def stage(self, name: str):
        rows = self

        class _Timer:
            def __enter__(self_):
                self_.t = time.time()

            def __exit__(self_, exc_type, *exc):
                if exc_type is None:  # a stage that was stopped has no duration
                    rows.state["seconds"][name] = round(time.time() - self_.t, 1)
                return False
        return _Timer()


def enter_seed(args, column, seed: int) -> None:
    """This process's nnU-Net folders and training seed: the seed's folders, NNUNETV2_DRAM_SEED for every
    nnUNetv2_train started from here."""
    from nnunetv2_dram.training.budget import SEED_VARIABLE
    use_folders(seed_root(args, column, seed))
    os.environ[SEED_VARIABLE] = str(seed)


def run_arm(args, column, seed: int, arm: str, on_change=lambda: None) -> None:
    """One arm's chain for one training seed, in this process; its rows go to rows/<arm>.json as they finish."""
    from nnunetv2_dram.evaluation.metrics import evaluate_folders
    from nnunetv2_dram.pipeline import pipeline as P
    enter_seed(args, column, seed)
    configuration = configuration_of(column[0])
    weak, full = dataset_names(column)
    raw, results = Path(os.environ["nnUNet_raw"]), Path(os.environ["nnUNet_results"])
    log_dir = seed_root(args, column, seed) / "logs" / arm
    log_dir.mkdir(parents=True, exist_ok=True)
    rows = ArmRows(rows_file(args, column, seed, arm), arm, on_change)

    def final_network(o, dataset: str, row: str) -> None:
        o = dataclasses.replace(o, iterations=o.iterations * args.final_iterations_factor, log_dir=str(log_dir))
        with rows.stage("final_preprocessing"):
            P.plan_and_preprocess(o, dataset)
        with rows.stage("final_training"):
            P.train(o, dataset, o.final_trainer)
        with rows.stage("prediction"):
            o.predictions = str(results / dataset / f"quality_predictions{final_tag(args)}")
            pred = P.predict(o, dataset)
            m = evaluate_folders(raw / weak / "referenceTs", pred)["mean"]
        rows.record(row, {"IoU": m["IoU"], "Dice": m["Dice"]})

    try:
        if arm == FULL:
            final_network(_opts(weak, FULL_ID, "none", args, configuration), full, FULL_ROW)
        else:
            o = _opts(weak, 0, arm, args, configuration)
            o.log_dir = str(log_dir)
            with rows.stage("weak_training"):
                P.train(o, weak, o.trainer_name(arm))
            with rows.stage("maps"):
                for row, kind in map_rows(arm):
                    rows.record(row, map_scores(weak, arm, kind, o))
            dense = None
            for crf, offset in (("none", 0), ("dense", 1)):
                o = _opts(weak, pseudo_id(args, arm) + offset, arm, args, configuration)
                o.crf = crf
                o.log_dir = str(log_dir) if args.qc else None  # the QC pictures go to <log dir>/qc
                with rows.stage(f"pseudo_labels_crf_{crf}"):
                    pseudo = P.pseudo_labels(o)
                    m = evaluate_folders(raw / weak / "referenceTr", raw / pseudo / "labelsTr")["mean"]
                rows.record(pseudo_row(arm, crf), {"IoU": m["IoU"], "Dice": m["Dice"]})
                dense = (o, pseudo)
            if has_final(args, arm):
                final_network(dense[0], dense[1], final_row(arm))
            if has_final(args, arm) and args.ignore_band > 0:
                o = _opts(weak, band_pseudo_id(args, arm), arm, args, configuration)
                o.crf, o.ignore_band = "dense", args.ignore_band
                with rows.stage("pseudo_labels_ignore_band"):
                    pseudo = P.pseudo_labels(o)
                    m = evaluate_folders(raw / weak / "referenceTr", raw / pseudo / "labelsTr", ignore_label=2)["mean"]
                rows.record(band_pseudo_row(arm, args.ignore_band), {"IoU": m["IoU"], "Dice": m["Dice"]})
                final_network(o, pseudo, final_row(arm, args.ignore_band))
        rows.state["finished"] = True
    except BaseException as e:
        rows.state["error"] = f"{type(e).__name__}: {e}"[:2000]
        raise
    finally:
        rows.write()


# ------------------------------------------------------------------------------------------------ collecting
def collect_run(args, column, seed: int) -> dict | None:
    """The run of (column, training seed) from its arms' rows files, rows in table order, with each final
    network's Dice relative to the fully supervised one; None before any arm has written rows."""
    arms = arms_of(args)
    states = {}
    for arm in arms:
        f = rows_file(args, column, seed, arm)
        if f.is_file():
            states[arm] = json.loads(f.read_text())
    if not states:
        return None
    found = {}
    for s in states.values():
        found.update(s["rows"])
    order = [r for a in arms if a != FULL for r, _ in map_rows(a)] + \
        [pseudo_row(a, crf) for a in arms if a != FULL for crf in ("none", "dense")] + \
        [band_pseudo_row(a, args.ignore_band) for a in arms if args.ignore_band > 0 and has_final(args, a)] + \
        [final_row(a) for a in arms if has_final(args, a)] + \
        [final_row(a, args.ignore_band) for a in arms if args.ignore_band > 0 and has_final(args, a)] + [FULL_ROW]
    rows = {r: dict(found[r]) for r in order if r in found}
    full_dice = rows.get(FULL_ROW, {}).get("Dice")
    for k, v in rows.items():
        if full_dice is not None and (k.startswith("final") or k == FULL_ROW):
            v["ratio_to_fully_supervised_Dice"] = v["Dice"] / full_dice if full_dice else None
    mode, target, data_seed = column
    return {"mode": mode, "target": target, "data_seed": data_seed, "seed": seed, "rows": rows,
            "complete": all(states.get(a, {}).get("finished") for a in arms),
            "errors": {a: s["error"] for a, s in states.items() if s.get("error")},
            "seconds": {a: s["seconds"] for a, s in states.items()},
            "folder": str(seed_root(args, column, seed))}


def collect_runs(args) -> list:
    runs = [collect_run(args, c, s) for c in columns_of(args) for s in args.seeds]
    return [r for r in runs if r is not None]


def columns_of(args) -> list:
    return [(m, t, d) for m in args.modes for t in args.targets for d in args.data_seeds]


def save_json(args, runs: list) -> None:
    if not args.json:
        return
    from nnunetv2_dram.evaluation.metrics import to_json_compatible
    from nnunetv2_dram.io_utils import atomic_write_json
    atomic_write_json(args.json, to_json_compatible({"args": {k: v for k, v in vars(args).items() if k != "chain"},
                                                     "runs": runs, "statistics": paired_statistics(runs)}))


# ------------------------------------------------------------------------------------------------ running
def _rows_snapshot(args, column) -> tuple:
    files = [rows_file(args, column, s, a) for s in args.seeds for a in arms_of(args)]
    return tuple(f.stat().st_mtime_ns if f.is_file() else 0 for f in files)


def run_parallel(args, column, save) -> list:
    """Every (training seed, arm) chain of a column in a process of its own (`--chain`), all at once; the one
    JSON is rewritten whenever a chain has written a row. Returns the chains that failed."""
    from nnunetv2_dram.io_utils import atomic_write_json
    chains = {}
    try:
        for seed in args.seeds:
            logs = seed_root(args, column, seed) / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            for arm in arms_of(args):
                spec = logs / f"{arm}.chain.json"
                atomic_write_json(spec, {"args": {k: v for k, v in vars(args).items() if k != "chain"},
                                         "column": list(column), "seed": seed, "arm": arm})
                log = open(logs / f"{arm}.log", "a")
                # a process group of its own: the chain and the nnU-Net programs it starts are stopped together
                proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--chain", str(spec)],
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                chains[(seed, arm)] = (proc, log)
                print(f"started {column} training seed {seed} {arm} (pid {proc.pid}, log {log.name})", flush=True)
        reported, failed, seen = set(), [], None
        while True:
            for key, (proc, log) in chains.items():
                if key not in reported and proc.poll() is not None:
                    reported.add(key)
                    print(f"finished {column} training seed {key[0]} {key[1]}: exit {proc.returncode}", flush=True)
                    if proc.returncode != 0:
                        failed.append((column, key[0], key[1], log.name))
                        print(Path(log.name).read_text()[-3000:], flush=True)
            snapshot = _rows_snapshot(args, column)
            if snapshot != seen:
                seen = snapshot
                save()
            if len(reported) == len(chains):
                return failed
            time.sleep(2)
    finally:
        for proc, log in chains.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 8  # within the GPU script's `timeout -k 15`
        for proc, log in chains.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()


def run_chain_process(spec_file: str) -> int:
    """The child of --parallel-arms: one arm's chain for one (column, training seed)."""
    spec = json.loads(Path(spec_file).read_text())
    args = argparse.Namespace(**spec["args"])
    _env_setup(args)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    run_arm(args, tuple(spec["column"]), spec["seed"], spec["arm"])
    return 0


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def parse_args(argv=None):
    from nnunetv2_dram.pseudo_labels.thresholds import DEFAULT_THRESHOLD
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--preset", default="quick", choices=("quick", "full"),
                    help="quick: the plugin's compact CPU plans; full: nnU-Net's default plans")
    ap.add_argument("--train", type=int, default=16)
    ap.add_argument("--test", type=int, default=6)
    ap.add_argument("--shape", type=int, nargs=3, default=(48, 128, 128))
    # A 2-D case is one slice: 16 of them hold fewer voxels than one 3-D case. With the 3-D counts even the fully
    # supervised 2-D network learned nothing in one of two runs of 480 iterations (docs/benchmarks.md), so 2-D runs
    # take their own counts.
    ap.add_argument("--train-2d", type=int, default=96, help="training cases (slices) of a 2-D run")
    ap.add_argument("--test-2d", type=int, default=24, help="test cases (slices) of a 2-D run")
    ap.add_argument("--iterations-2d", type=int, default=None,
                    help="iterations per epoch of a 2-D run (default: 4 x --iterations)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--modes", nargs="+", default=["3d"], choices=("3d", "2d"))
    ap.add_argument("--targets", nargs="+", default=["percentage"], choices=("percentage", "ctss"))
    ap.add_argument("--data-seeds", type=int, nargs="+", default=[0],
                    help="seeds of the synthetic datasets (one column of the table each)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="training seeds: every arm is trained once per seed on every column, with "
                         "NNUNETV2_DRAM_SEED=<seed> for every training")
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS,
                    help="what to train: the weak trainers (each with its final network) and/or 'full', the fully "
                         "supervised nnU-Net (default: all; none: only --extra-trainers)")
    ap.add_argument("--extra-trainers", nargs="*", default=[], metavar="TRAINER",
                    help=f"up to {MAX_EXTRA_TRAINERS} more weak trainers (e.g. the refinement variants of "
                         "nnunetv2_dram/training/variants/): their raw/refined test maps and pseudo labels, no final "
                         "network; a resumed call needs them in the same order (their pseudo-label dataset ids)")
    ap.add_argument("--extra-finals", action="store_true",
                    help="train a final network on every --extra-trainers' pseudo labels too")
    ap.add_argument("--final-iterations-factor", type=int, default=1, metavar="F",
                    help="the final networks and the fully supervised one train F times as many iterations per "
                         "epoch as the weak models; in a resumed workspace the weak models and pseudo labels are "
                         "kept, and these rows are kept apart from those of other factors")
    ap.add_argument("--threshold", default=DEFAULT_THRESHOLD,
                    help="pseudo-label threshold of every arm (nnunetv2_dram pseudolabels --threshold); a workspace "
                         "keeps the pseudo labels it has, so give another threshold a workspace of its own")
    ap.add_argument("--ignore-band", type=float, default=0.0,
                    help="also make pseudo labels whose voxels within this probability of their region's threshold "
                         "are nnU-Net's ignore label, and train a second final network on them (every arm that has "
                         "a final network)")
    ap.add_argument("--retrain", nargs="*", default=[], metavar="ARM",
                    help="in a resumed workspace: delete these arms' models, pseudo labels and final networks (of the "
                         "training seeds of this call) first, so only they are trained again (every other row is "
                         "kept); to resume such a call when it was cut short, leave the flag out")
    ap.add_argument("--parallel-arms", action="store_true",
                    help="after the shared data of a column are ready, run every (training seed, arm) chain in a "
                         "process of its own, all at once (one GPU for every arm)")
    ap.add_argument("--processes", type=int, default=2,
                    help="worker processes for data generation, preprocessing, pseudo labels and prediction (per "
                         "chain with --parallel-arms)")
    ap.add_argument("--qc", action="store_true", help="write the pseudo labels' QC pictures (seed folder's logs/)")
    ap.add_argument("--workspace", default="benchmark_workspace",
                    help="nnU-Net folders; a second call with the same workspace resumes (finished trainings and "
                         "pseudo-label sets are kept)")
    ap.add_argument("--json", default=None, help="one JSON with every per-seed number and the statistics")
    ap.add_argument("--collect", action="store_true",
                    help="train nothing: write --json and print the tables from the rows in the workspace (e.g. "
                         "after a call that was cut short)")
    ap.add_argument("--summarize", metavar="JSON", default=None, help="print the tables of a JSON and stop")
    ap.add_argument("--chain", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.iterations_2d = args.iterations_2d or 4 * args.iterations
    if args.final_iterations_factor < 1:
        ap.error(f"--final-iterations-factor {args.final_iterations_factor}: a whole number of at least 1")
    for flag, values in (("--seeds", args.seeds), ("--data-seeds", args.data_seeds), ("--arms", args.arms)):
        if len(set(values)) < len(values):
            ap.error(f"{flag} {' '.join(map(str, values))}: each value once")
    extra = args.extra_trainers
    if len(extra) > MAX_EXTRA_TRAINERS or len(set(extra)) < len(extra) or set(extra) & set(ARMS):
        ap.error(f"--extra-trainers: at most {MAX_EXTRA_TRAINERS} different weak trainers besides {', '.join(ARMS)}")
    unknown = set(args.retrain) - set(arms_of(args))
    if unknown:
        ap.error(f"--retrain {' '.join(sorted(unknown))}: not an arm of this run")
    from nnunetv2_dram.cli import UserError
    from nnunetv2_dram.commands.shared_flags import check_threshold
    try:
        check_threshold(args.threshold)  # refused here, not at the first pseudo-label step after the weak trainings
    except UserError as e:
        ap.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.chain:
        return run_chain_process(args.chain)
    if args.summarize:
        runs = json.loads(Path(args.summarize).read_text())["runs"]
        print(format_runs(runs))
        print(format_statistics(paired_statistics(runs)))
        return 0
    _env_setup(args)

    def save():
        save_json(args, collect_runs(args))

    if args.collect:
        save()
        runs = collect_runs(args)
        print(format_runs(runs))
        print(format_statistics(paired_statistics(runs)))
        return 0
    # `timeout` (a device call's limit) sends SIGTERM: the finally below still writes the JSON and stops the chains
    signal.signal(signal.SIGTERM, _exit_on_signal)
    failed = []
    try:
        for column in columns_of(args):
            chains = len(args.seeds) * len(arms_of(args)) if args.parallel_arms else 1
            # the shared data come first, with the cores that the chains then share
            prepare_column(args, column, processes=min(os.cpu_count() or 1, args.processes * chains))
            for seed in args.seeds:
                prepare_seed(args, column, seed)
            if args.parallel_arms:
                failed += run_parallel(args, column, save)
            else:
                for seed in args.seeds:
                    for arm in arms_of(args):
                        try:
                            run_arm(args, column, seed, arm, on_change=save)
                        except Exception:  # the other arms' rows are still worth having
                            traceback.print_exc()
                            failed.append((column, seed, arm, str(seed_root(args, column, seed) / "logs" / arm)))
            print(format_runs([r for r in (collect_run(args, column, s) for s in args.seeds) if r]), flush=True)
    finally:
        save()
    runs = collect_runs(args)
    print(format_statistics(paired_statistics(runs)))
    for column, seed, arm, log in failed:
        print(f"FAILED: {' '.join(map(str, column))} training seed {seed} {arm}; logs: {log}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
