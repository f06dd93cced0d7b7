"""The seed paper's comparison table for this implementation, on held-out generated data.

For every (mode, target, seed): one synthetic weak dataset (training cases with weak labels, test cases with
hidden references), the same training cases for every row, the same test cases for every evaluation:

  maps on the test cases (threshold 0.5, inside the regions), vs referenceTs:
    CAMTrainer map | DRAMTrainerNoRefine map | DRAMTrainer raw map | DRAMTrainer refined map
  pseudo labels on the training cases, vs referenceTr:
    CAM / DRAMTrainer / DRAMTrainerNoRefine, without and with the dense CRF (calibrated thresholds)
  final stock nnU-Net on the test cases, vs referenceTs:
    trained on DRAMTrainer pseudo labels | on CAM pseudo labels | on DRAMTrainerNoRefine pseudo labels (does the
    trained refinement pay?) | on referenceTr (fully supervised, upper bound)

Columns: IoU, Dice, region-% MAE (percentage points; test-case targets computed from the hidden references), and
for the final rows the ratio of Dice to the fully supervised Dice. Every training goes through `nnUNetv2_train`.

    python benchmarks/quality.py --device cpu                      # one 3-D percentage run, ~25 min on 2 cores
    python benchmarks/quality.py --device cuda --preset full --train 40 --test 10 --shape 96 192 192 \
        --epochs 50 --iterations 100 --modes 3d 2d --targets percentage ctss --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

WEAK_TRAINERS = ("CAMTrainer", "DRAMTrainerNoRefine", "DRAMTrainer")
MAP_ROWS = [("CAMTrainer map", "CAMTrainer", "final"), ("DRAMTrainerNoRefine map", "DRAMTrainerNoRefine", "final"),
            ("DRAMTrainer raw map", "DRAMTrainer", "dram"), ("DRAMTrainer refined map", "DRAMTrainer", "refined")]


def _env_setup(ws: Path):
    for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (ws / n).mkdir(parents=True, exist_ok=True)
        os.environ[n] = str(ws / n)
    from nnunetv2_dram.paths import ensure_ext_trainer_path
    ensure_ext_trainer_path()
    os.environ.setdefault("nnUNet_def_n_proc", "2")


def _opts(dataset, new_id, trainer, args, configuration):
    from nnunetv2_dram.pipeline.pipeline import PipelineOptions
    iterations = args.iterations_2d if configuration == "2d" else args.iterations
    return PipelineOptions(dataset=dataset, new_id=new_id, configuration=configuration, trainer=trainer,
                           preset=args.preset, epochs=args.epochs, iterations=iterations, device=args.device,
                           fold="all", num_processes=args.processes)


def test_map_scores(dataset: str, trainer: str, kind: str, opts) -> dict:
    """Threshold-0.5 map of a weak model on the test cases (inside their regions) vs referenceTs."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2_dram.evaluation.metrics import region_percentages, segmentation_scores
    from nnunetv2_dram.pseudo_labels.generate import (LoadedModel, PseudoLabelSettings, _preprocessed_case,
                                                      predict_probability)
    import torch
    raw = Path(os.environ["nnUNet_raw"]) / dataset
    dj = json.loads((raw / "dataset.json").read_text())
    ending = dj["file_ending"]
    model = LoadedModel(PseudoLabelSettings(dataset=dataset, configuration=opts.configuration, fold="all",
                                            trainer=trainer, plans=opts.plans), torch.device(opts.device))
    cases = sorted(p.name[: -len(ending)] for p in (raw / "labelsTs").iterdir() if p.name.endswith(ending))
    rw = determine_reader_writer_from_dataset_json(dj, str(raw / "imagesTs" / f"{cases[0]}_0000{ending}"))()
    ious, dices, errs = [], [], []
    for case in cases:
        img = [str(raw / "imagesTs" / f"{case}_0000{ending}")]
        reg_file = str(raw / "labelsTs" / f"{case}{ending}")
        data, seg, props = _preprocessed_case(model, "none", case, img, reg_file, dj)
        prob, _ = predict_probability(model, data, seg, props, kind)
        regions = rw.read_seg(reg_file)[0][0]
        ref = rw.read_seg(str(raw / "referenceTs" / f"{case}{ending}"))[0][0] > 0
        pred = (prob > 0.5) & (regions > 0)
        s = segmentation_scores(ref, pred)
        ious.append(s["IoU"]), dices.append(s["Dice"])
        true_pct, pred_pct = region_percentages(ref, regions), region_percentages(pred, regions)
        errs += [abs(pred_pct[r] - true_pct[r]) for r in true_pct]
    return {"IoU": float(np.nanmean(ious)), "Dice": float(np.nanmean(dices)), "region_mae": float(np.mean(errs))}


def fully_supervised_dataset(dataset: str, new_id: int) -> str:
    """imagesTr + referenceTr as a plain nnU-Net lesion dataset (the upper bound's training data)."""
    raw = Path(os.environ["nnUNet_raw"])
    name = f"Dataset{new_id:03d}_{dataset.split('_', 1)[1]}Full"
    out = raw / name
    if (out / "dataset.json").is_file():
        return name
    src = raw / dataset
    dj = json.loads((src / "dataset.json").read_text())
    shutil.copytree(src / "imagesTr", out / "imagesTr")
    shutil.copytree(src / "referenceTr", out / "labelsTr")
    (out / "dataset.json").write_text(json.dumps({"channel_names": dj["channel_names"],
                                                  "labels": {"background": 0, "lesion": 1},
                                                  "numTraining": dj["numTraining"], "file_ending": dj["file_ending"]}))
    return name


def forget_trainer(dataset: str, trainer: str, pseudo_ids: list) -> None:
    """Delete a weak trainer's models, its pseudo-label datasets and the final networks trained on them from the
    workspace, so that a resumed run trains and evaluates that trainer afresh and keeps every other row (a code
    change that touches one trainer is then measured against the same references)."""
    results = Path(os.environ["nnUNet_results"])
    doomed = sorted((results / dataset).glob(f"{trainer}__*"))
    for i in pseudo_ids:
        for n in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
            doomed += sorted(Path(os.environ[n]).glob(f"Dataset{i:03d}_*"))
        doomed += [results / f"quality_logs_{i}"]
    for path in doomed:
        if path.is_dir():
            print(f"--retrain {trainer}: removing {path}", flush=True)
            shutil.rmtree(path)


def one_run(args, mode: str, target: str, seed: int, base_id: int, on_row=lambda run: None) -> dict:
    """One column of the table; `on_row(partial run)` after every row, so a run cut short (a device call's
    time limit) still leaves the rows it finished."""
    from nnunetv2_dram.evaluation.metrics import evaluate_folders
    from nnunetv2_dram.pipeline import pipeline as P
    from nnunetv2_dram.synthetic.dataset import dataset_folder_name, write_weak_dataset
    configuration = "2d" if mode == "2d" else "3d_fullres"
    name = f"Q{mode}{target[:3]}s{seed}"
    dataset = dataset_folder_name(base_id, name)
    raw = Path(os.environ["nnUNet_raw"])
    shape = (1, *args.shape[1:]) if mode == "2d" else tuple(args.shape)
    n_train, n_test = (args.train_2d, args.test_2d) if mode == "2d" else (args.train, args.test)
    if not (raw / dataset / "dataset.json").is_file():
        write_weak_dataset(raw, base_id, name=name, n_train=n_train, n_test=n_test, seed=seed, shape=shape,
                           target=target, mode=mode, num_processes=args.processes)
    t0 = time.time()
    rows = {}

    def record(key, value):
        rows[key] = value
        on_row({"mode": mode, "target": target, "seed": seed, "rows": rows, "partial": True,
                "minutes": round((time.time() - t0) / 60, 1)})
    opts = _opts(dataset, 0, "DRAMTrainer", args, configuration)
    P.plan_and_preprocess(opts, dataset)
    weak = list(WEAK_TRAINERS) + list(args.extra_trainers)
    # dataset ids: base+1/2 DRAMTrainer pseudo labels, +3/4 CAM, +5 fully supervised, +6/7 NoRefine (does the
    # refinement pay for its cost in the labels that matter?), +8/9, +10/11 extra trainers
    pseudo_sources = [("DRAMTrainer", 1), ("CAMTrainer", 3), ("DRAMTrainerNoRefine", 6)] + [(t, 8 + 2 * i)
                                                                for i, t in enumerate(args.extra_trainers)]
    for trainer, offset in pseudo_sources:
        if trainer in args.retrain:
            forget_trainer(dataset, trainer, [base_id + offset, base_id + offset + 1])
    map_rows = MAP_ROWS + [(f"{t} {kind} map", t, kind) for t in args.extra_trainers for kind in ("raw", "refined")]
    for trainer in weak:
        P.train(_opts(dataset, 0, trainer, args, configuration), dataset, trainer)
    for row, trainer, kind in map_rows:
        record(row, test_map_scores(dataset, trainer, "dram" if kind == "raw" else kind, opts))
    finals = {}
    for trainer, offset in pseudo_sources:
        for crf, extra in (("none", 0), ("dense", 1)):
            o = _opts(dataset, base_id + offset + extra, trainer, args, configuration)
            o.crf = crf
            o.log_dir = str(Path(os.environ["nnUNet_results"]) / f"quality_logs_{base_id + offset + extra}")
            Path(o.log_dir).mkdir(parents=True, exist_ok=True)
            pseudo = P.pseudo_labels(o)
            m = evaluate_folders(raw / dataset / "referenceTr", raw / pseudo / "labelsTr")["mean"]
            record(f"{trainer} pseudo labels, CRF {crf}", {"IoU": m["IoU"], "Dice": m["Dice"]})
            if crf == "dense" and trainer in ("DRAMTrainer", "CAMTrainer", "DRAMTrainerNoRefine"):
                finals[trainer] = (o, pseudo)
    full = fully_supervised_dataset(dataset, base_id + 5)
    finals["fully supervised (referenceTr)"] = (_opts(dataset, base_id + 5, "none", args, configuration), full)
    for label, (o, ds) in finals.items():
        P.plan_and_preprocess(o, ds)
        P.train(o, ds, o.final_trainer)
        o.predictions = str(Path(os.environ["nnUNet_results"]) / ds / "quality_predictions")
        pred = P.predict(o, ds)
        m = evaluate_folders(raw / dataset / "referenceTs", pred)["mean"]
        key = label if label.startswith("fully") else f"final nnU-Net on {label} pseudo labels"
        record(key, {"IoU": m["IoU"], "Dice": m["Dice"]})
    full_dice = rows["fully supervised (referenceTr)"]["Dice"]
    for k, v in rows.items():
        if k.startswith("final") or k.startswith("fully"):
            v["ratio_to_fully_supervised_Dice"] = v["Dice"] / full_dice if full_dice else float("nan")
    return {"mode": mode, "target": target, "seed": seed, "rows": rows, "minutes": round((time.time() - t0) / 60, 1)}


def format_runs(runs: list) -> str:
    lines = []
    for run in runs:
        lines.append(f"\n{run['mode']} {run['target']} seed {run['seed']} ({run['minutes']} min)")
        lines.append(f"{'row':55s} {'IoU':>6s} {'Dice':>6s} {'reg-%MAE':>9s} {'Dice/full':>9s}")
        for k, v in run["rows"].items():
            lines.append(f"{k:55s} {v['IoU']:6.3f} {v['Dice']:6.3f} {v.get('region_mae', float('nan')):9.2f} "
                         f"{v.get('ratio_to_fully_supervised_Dice', float('nan')):9.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--preset", default="quick", choices=("quick", "full"))
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
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=25)
    ap.add_argument("--modes", nargs="+", default=["3d"], choices=("3d", "2d"))
    ap.add_argument("--targets", nargs="+", default=["percentage"], choices=("percentage", "ctss"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--extra-trainers", nargs="*", default=[],
                    choices=("DRAMTrainerFullRefine", "DRAMTrainerCoarseRefine", "DRAMTrainerSelfTraining",
                             "DRAMTrainerBalancedLoss"),
                    help="more weak trainers: their raw/refined test maps and pseudo labels (no final network)")
    ap.add_argument("--retrain", nargs="*", default=[], metavar="TRAINER",
                    help="in a resumed workspace: delete these weak trainers' models, pseudo labels and final "
                         "networks first, so only they are trained again (every other row is kept); to resume such a "
                         "call when it was cut short, leave the flag out")
    ap.add_argument("--processes", type=int, default=2,
                    help="worker processes for data generation, preprocessing and pseudo labels")
    ap.add_argument("--workspace", default="benchmark_workspace",
                    help="nnU-Net folders; a second call with the same workspace resumes (finished trainings and "
                         "pseudo-label sets are kept)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.iterations_2d = args.iterations_2d or 4 * args.iterations
    unknown = set(args.retrain) - {*WEAK_TRAINERS, *args.extra_trainers}
    if unknown:
        raise SystemExit(f"--retrain {' '.join(sorted(unknown))}: not a weak trainer of this run")
    if len(args.extra_trainers) > 2:
        raise SystemExit("at most two --extra-trainers (each run reserves 20 dataset ids)")
    _env_setup(Path(args.workspace).resolve())
    from nnunetv2_dram.io_utils import atomic_write_text
    runs = []
    base = 800

    def save(partial=None):
        if args.json:
            atomic_write_text(args.json, json.dumps({"args": vars(args), "runs": runs + ([partial] if partial else [])},
                                                    indent=1, default=float))

    for mode in args.modes:
        for target in args.targets:
            for seed in args.seeds:
                runs.append(one_run(args, mode, target, seed, base, on_row=save))
                base += 20
                print(format_runs(runs[-1:]), flush=True)
                save()
    print(format_runs(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
