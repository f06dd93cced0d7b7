"""Time per training iteration of the weak trainers against stock nnU-Net, side by side, through `nnUNetv2_train`.

All trainers run on the same generated dataset, plans, configuration and device, with the same batch size and
patch (nnU-Net's plans: equal voxels per batch). The stock row is nnUNetTrainerBudget, which is nnUNetTrainer with
the epoch/iteration budget taken from the environment. Each trainer trains `--epochs` epochs of `--iterations`
iterations (one validation iteration per epoch); epoch 0 is dropped (start-up, cudnn autotuning, torch.compile),
the rest give seconds per iteration. Peak GPU memory comes from the training log (CUDA only).

That loop time includes waiting for nnU-Net's augmentation workers, which on a GPU can dominate and varies from
run to run (H200: the same stock trainer gave 0.076 and 0.159 s per iteration in two calls). So the script also
times the step alone ("steps" mode): each trainer is built in this process exactly as nnUNetv2_train builds it,
two batches are drawn from its own data loader, and `train_step` (forward, loss, backward, optimizer) runs
`--steps` times on them after `--warmup` steps, with CUDA synchronised: the compute cost at equal voxels per batch.

A trainer given as `NAME+MODE` (e.g. `DRAMTrainer+compiled`) is NAME with NNUNETV2_DRAM_REFINE_OFFSETS=MODE: the
refinement's neighbour sums implemented another way (offset_windows.py), timed side by side with the default.

`--profile-steps N` profiles N more steps per trainer (torch.profiler) and reports the GPU's busy time per step next
to the wall time: whether a step waits for kernels or for the CPU to launch them.

    python benchmarks/iteration_speed.py --device cpu                       # quick plans, about 5 minutes here
    python benchmarks/iteration_speed.py --device cuda --plans full --shape 96 192 192 --iterations 50

Prints a table and writes JSON with --json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

TRAINERS = ["nnUNetTrainerBudget", "DRAMTrainer", "DRAMTrainerFullRefine", "DRAMTrainerNoRefine", "CAMTrainer"]


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


@contextlib.contextmanager
def refine_offsets(mode: str | None):
    """NNUNETV2_DRAM_REFINE_OFFSETS=mode for the trainers built or started inside (unchanged when mode is None)."""
    from nnunetv2_dram.training.budget import REFINE_OFFSETS_VARIABLE
    before = os.environ.get(REFINE_OFFSETS_VARIABLE)
    if mode is not None:
        os.environ[REFINE_OFFSETS_VARIABLE] = mode
    try:
        yield
    finally:
        os.environ.pop(REFINE_OFFSETS_VARIABLE, None)
        if before is not None:
            os.environ[REFINE_OFFSETS_VARIABLE] = before


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


def gpu_busy_per_step(trainer, batches, steps: int, table_path: Path | None) -> float | None:
    """Seconds of GPU kernel time per train_step (torch.profiler), or None when the profiler fails."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(steps):
                trainer.train_step(batches[i % 2])
            torch.cuda.synchronize()
        averages = prof.key_averages()
        busy_us = sum(getattr(e, "self_device_time_total", 0) for e in averages if e.device_type == DeviceType.CUDA)
        if table_path is not None:
            table_path.write_text(averages.table(sort_by="self_device_time_total", row_limit=30))
        return busy_us / 1e6 / steps
    except Exception as e:  # noqa: BLE001 -- the timing stands without the profile
        print(f"profiler failed: {type(e).__name__}: {e}", flush=True)
        return None


def time_train_steps(trainer_name: str, dataset: str, configuration: str, plans_name: str, device: str,
                     steps: int, warmup: int, profile_steps: int = 0, profile_table: Path | None = None) -> dict:
    """Seconds per train_step on fixed batches (no data-loading wait), in this process; with profile_steps, also the
    GPU's busy seconds per step (and the profiler's top operators in `profile_table`)."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    dev = torch.device(device)
    trainer = get_trainer_from_args(dataset, configuration, 0, trainer_name, plans_name, device=dev)
    trainer.on_train_start()
    try:
        batches = [next(trainer.dataloader_train) for _ in range(2)]
        trainer.network.train()
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        for i in range(warmup):
            trainer.train_step(batches[i % 2])
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for i in range(steps):
            trainer.train_step(batches[i % 2])
        sync()
        per_step = (time.perf_counter() - t0) / steps
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else None
        busy = gpu_busy_per_step(trainer, batches, profile_steps, profile_table) \
            if profile_steps > 0 and dev.type == "cuda" else None
    finally:
        for loader in (trainer.dataloader_train, trainer.dataloader_val):
            if hasattr(loader, "_finish"):
                loader._finish()
    del trainer
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    out = {"seconds_per_step": round(per_step, 4), "step_peak_gpu_gib": round(peak, 2) if peak else None}
    if busy is not None:
        out["gpu_busy_seconds_per_step"] = round(busy, 4)
    return out


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
    ap.add_argument("--mode", default="both", choices=("loop", "steps", "both"),
                    help="loop: nnUNetv2_train epochs; steps: train_step alone on fixed batches; both")
    ap.add_argument("--steps", type=int, default=20, help="timed train steps per trainer (steps mode)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (cudnn autotuning, allocator)")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="CUDA: profile this many more steps per trainer; GPU busy seconds per step, top-op tables")
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
    os.environ.setdefault("nnUNet_compile", "f")  # compile time is not iteration time; weak trainers run eagerly
    rows = []
    for spec in args.trainers:
        trainer, _, offsets = spec.partition("+")
        row = {"trainer": trainer}
        with refine_offsets(offsets or None):
            if args.mode in ("loop", "both"):
                print(f"timing {spec} through nnUNetv2_train ...", flush=True)
                row.update(run_trainer(trainer, dataset, args.configuration, plans_name, args.device, args.epochs,
                                       args.iterations, dict(os.environ)))
            if args.mode in ("steps", "both"):
                print(f"timing {spec} train_step ...", flush=True)
                table = Path(args.json).parent / f"profile_{spec.replace('+', '_')}.table" if args.json else None
                row.update(time_train_steps(trainer, dataset, args.configuration, plans_name, args.device,
                                            args.steps, args.warmup, args.profile_steps, table))
        row["trainer"] = spec
        rows.append(row)
    base = next((r for r in rows if r["trainer"] == "nnUNetTrainerBudget"), rows[0])
    for key, ratio in (("seconds_per_iteration", "ratio_to_nnUNetTrainer"),
                       ("seconds_per_step", "step_ratio_to_nnUNetTrainer")):
        for r in rows:
            if key in r and key in base:
                r[ratio] = round(r[key] / base[key], 3)
    device = "cpu: " + platform.processor() if args.device == "cpu" else "cuda"
    if args.device == "cuda":
        import torch
        device = torch.cuda.get_device_name()
    print(f"\n{device}; plans {plans_name} {args.configuration}: patch {cfg['patch_size']}, batch "
          f"{cfg['batch_size']}, features {cfg['architecture']['arch_kwargs']['features_per_stage']}; "
          f"{args.epochs - 1} timed epochs of {args.iterations} iterations")
    nan = float("nan")
    print(f"{'trainer':24s} {'loop s/it':>9s} {'ratio':>6s} {'step s':>7s} {'ratio':>6s} {'peak GiB':>9s} "
          f"{'GPU busy s':>10s}")
    for r in rows:
        peak = r.get("peak_gpu_gib") or r.get("step_peak_gpu_gib") or nan
        print(f"{r['trainer']:24s} {r.get('seconds_per_iteration', nan):9.3f} {r.get('ratio_to_nnUNetTrainer', nan):6.2f} "
              f"{r.get('seconds_per_step', nan):7.3f} {r.get('step_ratio_to_nnUNetTrainer', nan):6.2f} {peak:9.2f} "
              f"{r.get('gpu_busy_seconds_per_step', nan):10.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "plans": plans_name, "configuration":
                                               args.configuration, "patch_size": cfg["patch_size"],
                                               "batch_size": cfg["batch_size"], "rows": rows,
                                               "date": time.strftime("%Y-%m-%d")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
