"""Time per training iteration of the weak trainers against stock nnU-Net, side by side, through `nnUNetv2_train`.

All trainers run on the same generated dataset, plans, configuration and device, with the same batch size and
patch (nnU-Net's plans: equal voxels per batch). The stock row is nnUNetTrainerBudget, which is nnUNetTrainer with
the epoch/iteration budget taken from the environment. Each trainer trains `--epochs` epochs of `--iterations`
iterations (one validation iteration per epoch); epoch 0 is dropped (start-up, cudnn autotuning, torch.compile),
the rest give seconds per iteration. Peak GPU memory comes from the training log (CUDA only).

    python benchmarks/iteration_speed.py --device cpu                       # quick plans, about 5 minutes here
    python benchmarks/iteration_speed.py --device cuda --plans full --shape 96 192 192 --iterations 50

Prints a table and writes JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

TRAINERS = ["nnUNetTrainerBudget", "DRAMTrainer", "DRAMTrainerNoRefine", "CAMTrainer"]


def prepare(workspace: Path, dataset_id: int, shape, n_cases: int, plans: str, configuration: str) -> str:
    from nnunetv2_dram.pipeline.pipeline import PipelineOptions, plan_and_preprocess
    from nnunetv2_dram.synthetic.dataset import dataset_folder_name, write_weak_dataset
    name = dataset_folder_name(dataset_id, "SpeedBench")
    if not (workspace / "nnUNet_raw" / name / "dataset.json").is_file():
        write_weak_dataset(workspace / "nnUNet_raw", dataset_id, name="SpeedBench", n_train=n_cases, n_test=0,
                           shape=tuple(shape), num_processes=2, mode="2d" if configuration == "2d" else "3d")
    plan_and_preprocess(PipelineOptions(dataset=name, new_id=0, configuration=configuration, preset=plans,
                                        num_processes=2), name)
    return name


def epoch_stats(log_text: str):
    times = [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", log_text)]
    mem = [float(m) for m in re.findall(r"Peak GPU memory: ([0-9.]+) GiB", log_text)]
    return times, mem


def run_trainer(trainer: str, dataset: str, configuration: str, plans_name: str, device: str, epochs: int,
                iterations: int, env: dict) -> dict:
    from nnunetv2_dram.pipeline.nnunet_commands import program_command
    results = Path(env["nnUNet_results"]) / dataset / f"{trainer}__{plans_name}__{configuration}" / "fold_0"
    if results.exists():
        import shutil
        shutil.rmtree(results)
    run_env = dict(env, NNUNETV2_DRAM_EPOCHS=str(epochs), NNUNETV2_DRAM_ITERATIONS=str(iterations),
                   NNUNETV2_DRAM_VAL_ITERATIONS="1", NNUNETV2_DRAM_SKIP_FINAL_VALIDATION="1")
    t0 = time.time()
    proc = subprocess.run([*program_command("nnUNetv2_train"), dataset[7:10], configuration, "0", "-tr", trainer,
                           "-p", plans_name, "-device", device], env=run_env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{trainer} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    log = "".join(p.read_text() for p in sorted(results.glob("training_log_*.txt")))
    times, mem = epoch_stats(log)
    steady = times[1:] if len(times) > 1 else times
    per_iter = sum(steady) / len(steady) / (iterations + 1)  # +1: the validation iteration
    return {"trainer": trainer, "seconds_per_iteration": round(per_iter, 4), "epoch_times": times,
            "peak_gpu_gib": max(mem) if mem else None, "wall_seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--plans", default="quick", choices=("quick", "full"))
    ap.add_argument("--configuration", default="3d_fullres")
    ap.add_argument("--shape", type=int, nargs=3, default=(48, 128, 128))
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--trainers", nargs="+", default=TRAINERS)
    ap.add_argument("--workspace", default="benchmark_workspace")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    ws = Path(args.workspace).resolve()
    for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (ws / n).mkdir(parents=True, exist_ok=True)
        os.environ[n] = str(ws / n)
    from nnunetv2_dram.paths import ensure_ext_trainer_path
    ensure_ext_trainer_path()
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    if os.environ.get("nnUNet_n_proc_DA") == "0":
        os.environ["nnUNet_n_proc_DA"] = "1"
    plans_name = "nnUNetPlans_quick" if args.plans == "quick" else "nnUNetPlans"
    dataset = prepare(ws, 960, args.shape, args.cases, args.plans, args.configuration)
    plans = json.loads((ws / "nnUNet_preprocessed" / dataset / f"{plans_name}.json").read_text())
    cfg = plans["configurations"][args.configuration]
    rows = []
    for trainer in args.trainers:
        print(f"timing {trainer} ...", flush=True)
        rows.append(run_trainer(trainer, dataset, args.configuration, plans_name, args.device, args.epochs,
                                args.iterations, dict(os.environ)))
    base = next((r for r in rows if r["trainer"] == "nnUNetTrainerBudget"), rows[0])
    for r in rows:
        r["ratio_to_nnUNetTrainer"] = round(r["seconds_per_iteration"] / base["seconds_per_iteration"], 3)
    device = "cpu: " + platform.processor() if args.device == "cpu" else "cuda"
    if args.device == "cuda":
        import torch
        device = torch.cuda.get_device_name()
    print(f"\n{device}; plans {plans_name} {args.configuration}: patch {cfg['patch_size']}, batch "
          f"{cfg['batch_size']}, features {cfg['architecture']['arch_kwargs']['features_per_stage']}; "
          f"{args.epochs - 1} timed epochs of {args.iterations} iterations")
    print(f"{'trainer':22s} {'s/iter':>8s} {'ratio':>7s} {'peak GiB':>9s}")
    for r in rows:
        print(f"{r['trainer']:22s} {r['seconds_per_iteration']:8.3f} {r['ratio_to_nnUNetTrainer']:7.2f} "
              f"{(r['peak_gpu_gib'] or float('nan')):9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "plans": plans_name, "configuration":
                                               args.configuration, "patch_size": cfg["patch_size"],
                                               "batch_size": cfg["batch_size"], "rows": rows,
                                               "date": time.strftime("%Y-%m-%d")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
