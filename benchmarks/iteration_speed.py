"""Time per training iteration of the weak trainers against stock nnU-Net, side by side, through `nnUNetv2_train`.

All trainers run on the same generated dataset, plans, configuration and device, with the same batch size and
patch (nnU-Net's plans: equal voxels per batch). A row names a trainer class; the script trains it under its budget
name `<Trainer>_<E>epochs_<I>its` (`--epochs`, `--iterations`; training/budget.py), so the stock row is nnU-Net's
own `nnUNetTrainer` as `nnUNetTrainer_<E>epochs_<I>its`, and every ratio in the output is against that row. Each
epoch has max(2, I // 5) validation iterations, as the budget name sets; epoch 0 is dropped (start-up, cudnn
autotuning, torch.compile), and the rest give seconds per iteration, validation iterations counted like training
ones. Peak GPU memory comes from the training log (CUDA only).

That loop time includes waiting for nnU-Net's augmentation workers, which on a GPU can dominate and varies from
run to run. So the script also times the step alone ("steps" mode): each trainer is built in this process exactly
as nnUNetv2_train builds it, two batches are drawn from its own data loader, and `train_step` (forward, loss,
backward, optimizer) runs `--steps` times on them after `--warmup` steps, with CUDA synchronised: the compute cost
at equal voxels per batch.

A row may carry settings after the class name:
    NAME+MODE        NAME with NNUNETV2_DRAM_REFINE_OFFSETS=MODE (loop | stacked | compiled | auto): the
                     refinement's neighbour sums implemented another way (offset_windows.py)
    NAME@VAR=VALUE   NAME with the environment variable VAR set to VALUE (repeatable: NAME@A=1@B=2), e.g.
                     `DRAMTrainer@nnUNet_compile=t`
The training length is the trainer's name only: the retired NNUNETV2_DRAM_EPOCHS / _ITERATIONS / _VAL_ITERATIONS
are refused, in the environment and in a row.

`--profile-steps N` profiles N more steps per trainer (torch.profiler) and reports the GPU's busy time per step next
to the wall time: whether a step waits for kernels or for the CPU to launch them.

    python benchmarks/iteration_speed.py --device cpu                       # quick plans, several minutes on a CPU
    python benchmarks/iteration_speed.py --device cuda --plans full --shape 96 192 192 --iterations 50
    python benchmarks/iteration_speed.py --device cuda --plans full --mode steps \
        --trainers nnUNetTrainer DRAMTrainer DRAMTrainer+compiled DRAMTrainerWithCRF

Prints a table and writes JSON with --json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

TRAINERS = ["nnUNetTrainer", "DRAMTrainer", "DRAMTrainerNoRefine", "DRAMTrainerCoarseRefinement", "DRAMTrainerWithCRF",
            "CAMTrainer"]
#: the rows every ratio is taken against (the first one found; else the first row)
STOCK_TRAINERS = ("nnUNetTrainer", "nnUNetTrainerBudget")


def prepare(workspace: Path, dataset_id: int, shape, n_cases: int, plans: str, configuration: str) -> str:
    from nnunetv2_dram.pipeline.pipeline import PipelineOptions, plan_and_preprocess
    from nnunetv2_dram.synthetic.dataset import dataset_folder_name, write_weak_dataset
    name = dataset_folder_name(dataset_id, "SpeedBench")
    processes = max(1, int(os.environ.get("nnUNet_def_n_proc", "2")))
    if not (workspace / "nnUNet_raw" / name / "dataset.json").is_file():
        write_weak_dataset(workspace / "nnUNet_raw", dataset_id, name="SpeedBench", n_train=n_cases, n_test=0,
                           shape=tuple(shape), num_processes=processes, mode="2d" if configuration == "2d" else "3d")
    plan_and_preprocess(PipelineOptions(dataset=name, new_id=0, configuration=configuration, preset=plans,
                                        num_processes=processes), name)
    return name


def parse_row(spec: str) -> tuple[str, dict[str, str]]:
    """'DRAMTrainer+compiled@nnUNet_compile=t' -> ('DRAMTrainer', {'NNUNETV2_DRAM_REFINE_OFFSETS': 'compiled',
    'nnUNet_compile': 't'}): the trainer class and the environment its row runs with."""
    from nnunetv2_dram.building_blocks.offset_windows import OFFSET_MODES
    from nnunetv2_dram.training.budget import REFINE_OFFSETS_VARIABLE, RETIRED_BUDGET_VARIABLES
    head, *assignments = spec.split("@")
    trainer, plus, offsets = head.partition("+")
    env = {}
    if plus:
        if offsets not in OFFSET_MODES:
            raise SystemExit(f"row {spec!r}: offset mode {offsets!r} is not one of {', '.join(OFFSET_MODES)}")
        env[REFINE_OFFSETS_VARIABLE] = offsets
    for assignment in assignments:
        var, eq, value = assignment.partition("=")
        if not eq or not var:
            raise SystemExit(f"row {spec!r}: {assignment!r} is not VAR=VALUE")
        if var in RETIRED_BUDGET_VARIABLES:
            raise SystemExit(f"row {spec!r}: {var} no longer sets the training length (--epochs and --iterations "
                             f"name the trainer)")
        env[var] = value
    if not trainer:
        raise SystemExit(f"row {spec!r} names no trainer")
    return trainer, env


@contextlib.contextmanager
def row_environment(settings: dict[str, str]):
    """os.environ with `settings` for the trainers built or started inside; restored afterwards."""
    before = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def epoch_stats(log_text: str):
    times = [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", log_text)]
    mem = [float(m) for m in re.findall(r"Peak GPU memory: ([0-9.]+) GiB", log_text)]
    return times, mem


def run_trainer(trainer: str, dataset: str, configuration: str, plans_name: str, device: str, epochs: int,
                iterations: int, env: dict) -> dict:
    """nnUNetv2_train of `trainer` (a budget name: `<Trainer>_<epochs>epochs_<iterations>its`) from scratch."""
    from nnunetv2_dram.pipeline.nnunet_commands import program_command
    from nnunetv2_dram.training.budget import SKIP_FINAL_VALIDATION_VARIABLE, validation_iterations
    results = Path(env["nnUNet_results"]) / dataset / f"{trainer}__{plans_name}__{configuration}" / "fold_0"
    if results.exists():
        import shutil
        shutil.rmtree(results)
    run_env = dict(env, **{SKIP_FINAL_VALIDATION_VARIABLE: "1"})
    t0 = time.time()
    proc = subprocess.run([*program_command("nnUNetv2_train"), dataset[7:10], configuration, "0", "-tr", trainer,
                           "-p", plans_name, "-device", device], env=run_env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{trainer} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    log = "".join(p.read_text() for p in sorted(results.glob("training_log_*.txt")))
    times, mem = epoch_stats(log)
    if len(times) != epochs:
        raise RuntimeError(f"{trainer}: {len(times)} epoch times in its log, expected {epochs}")
    steady = times[1:] if len(times) > 1 else times
    per_iter = sum(steady) / len(steady) / (iterations + validation_iterations(iterations))
    return {"budget_trainer": trainer, "seconds_per_iteration": round(per_iter, 4), "epoch_times": times,
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
        # train_step ends by copying the loss to the host, so each step is finished when it returns
        t0 = time.perf_counter()
        ends = []
        for i in range(steps):
            trainer.train_step(batches[i % 2])
            ends.append(time.perf_counter())
        sync()
        per_step = (time.perf_counter() - t0) / steps
        each = [round(b - a, 4) for a, b in zip([t0] + ends[:-1], ends)]
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
    out = {"seconds_per_step": round(per_step, 4), "step_seconds": each,
           "step_peak_gpu_gib": round(peak, 2) if peak else None}
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

    from nnunetv2_dram.training.budget import (RETIRED_BUDGET_VARIABLES, budget_trainer_name,
                                               validation_iterations)
    retired = [v for v in RETIRED_BUDGET_VARIABLES if os.environ.get(v) not in (None, "")]
    if retired:
        ap.error(f"{', '.join(retired)} set: the training length is part of the trainer's name (--epochs and "
                 f"--iterations give <Trainer>_<E>epochs_<I>its); unset {'it' if len(retired) == 1 else 'them'}")
    for spec in args.trainers:
        parse_row(spec)  # a mistyped row stops here, before any data is made
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
    device = "cpu: " + (platform.processor() or platform.machine()) if args.device == "cpu" else "cuda"
    if args.device == "cuda":
        import torch
        device = torch.cuda.get_device_name()
    header = {"device": device, "plans": plans_name, "configuration": args.configuration,
              "patch_size": cfg["patch_size"], "batch_size": cfg["batch_size"],
              "features_per_stage": cfg["architecture"]["arch_kwargs"]["features_per_stage"], "mode": args.mode,
              "epochs": args.epochs, "iterations": args.iterations,
              "validation_iterations": validation_iterations(args.iterations), "steps": args.steps,
              "warmup": args.warmup, "date": time.strftime("%Y-%m-%d")}
    # SIGTERM (a deadline's `timeout`) stops the row in progress; the finished rows are still reported
    signal.signal(signal.SIGTERM, _stop)
    rows = []
    for i, spec in enumerate(args.trainers):
        trainer, settings = parse_row(spec)
        name = budget_trainer_name(trainer, args.epochs, args.iterations)
        row = {"trainer": spec, "base_trainer": trainer, "budget_trainer": name, "environment": settings}
        try:
            with row_environment(settings):
                if args.mode in ("loop", "both"):
                    print(f"timing {spec} through nnUNetv2_train -tr {name} ...", flush=True)
                    row.update(run_trainer(name, dataset, args.configuration, plans_name, args.device, args.epochs,
                                           args.iterations, dict(os.environ)))
                if args.mode in ("steps", "both"):
                    print(f"timing {spec} train_step ({name}) ...", flush=True)
                    table = Path(args.json).parent / f"profile_{re.sub(r'[^A-Za-z0-9_.-]', '_', spec)}.table" \
                        if args.json else None
                    row.update(time_train_steps(name, dataset, args.configuration, plans_name, args.device,
                                                args.steps, args.warmup, args.profile_steps, table))
        except Stopped:
            print(f"stopped during {spec}; not started: {' '.join(args.trainers[i + 1:]) or '-'}", flush=True)
            rows.append(dict(row, error="stopped (deadline)"))
            rows += [{"trainer": s_, "error": "not started (deadline)"} for s_ in args.trainers[i + 1:]]
            break
        except Exception as e:  # noqa: BLE001 -- one failing row must not cost the others' numbers
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
        rows.append(row)
        report(header, rows, args.json)
    report(header, rows, args.json, table=True)
    return 0 if rows and not any("error" in r for r in rows) else 1


class Stopped(Exception):
    """SIGTERM arrived: the deadline of the call that runs this script."""


_MAIN_PID = os.getpid()


def _stop(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if os.getpid() != _MAIN_PID:  # a forked data-loading worker inherits the handler: it just ends
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Stopped()


def report(header: dict, rows: list[dict], json_path: str | None, table: bool = False) -> None:
    """Ratios to the stock nnUNetTrainer row (the first one without settings), the JSON and, with table, the table."""
    timed_rows = [r for r in rows if "error" not in r]
    base = next((r for r in timed_rows if r["base_trainer"] in STOCK_TRAINERS and not r["environment"]),
                timed_rows[0] if timed_rows else None)
    for key, ratio in (("seconds_per_iteration", "ratio_to_nnUNetTrainer"),
                       ("seconds_per_step", "step_ratio_to_nnUNetTrainer")):
        for r in timed_rows:
            if base is not None and key in r and key in base:
                r[ratio] = round(r[key] / base[key], 3)
    if json_path:
        Path(json_path).write_text(json.dumps(dict(header, baseline=base["trainer"] if base else None, rows=rows),
                                              indent=1))
    if not table:
        return
    h = header
    loop = f"; loop: {h['epochs'] - 1} timed epochs of {h['iterations']} + {h['validation_iterations']} " \
        f"validation iterations" if h["mode"] != "steps" else ""
    steps = f"; steps: {h['steps']} after {h['warmup']} warm-up" if h["mode"] != "loop" else ""
    print(f"\n{h['device']}; plans {h['plans']} {h['configuration']}: patch {h['patch_size']}, batch "
          f"{h['batch_size']}, features {h['features_per_stage']}{loop}{steps}; "
          f"ratios to {base['trainer'] if base else '-'}")
    nan = float("nan")
    print(f"{'trainer':32s} {'loop s/it':>9s} {'ratio':>6s} {'step s':>7s} {'ratio':>6s} {'peak GiB':>9s} "
          f"{'GPU busy s':>10s}")
    for r in rows:
        if "error" in r:
            print(f"{r['trainer']:32s} {(r['error'].strip().splitlines() or ['?'])[-1][:100]}")
            continue
        peak = r.get("peak_gpu_gib") or r.get("step_peak_gpu_gib") or nan
        print(f"{r['trainer']:32s} {r.get('seconds_per_iteration', nan):9.3f} "
              f"{r.get('ratio_to_nnUNetTrainer', nan):6.2f} {r.get('seconds_per_step', nan):7.3f} "
              f"{r.get('step_ratio_to_nnUNetTrainer', nan):6.2f} {peak:9.2f} "
              f"{r.get('gpu_busy_seconds_per_step', nan):10.4f}")

if __name__ == "__main__":
    sys.exit(main())
