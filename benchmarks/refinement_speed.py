"""Where DRAMTrainer's extra time goes: the refinement's parts, timed alone on one batch-shaped input.

DRAMTrainer = nnU-Net's network + attention + dense CRF. `iteration_speed.py` gives the whole step; this script
splits the refinement: the attention module and the trainable CRF, each forward only and forward + backward, at full
resolution (DRAMTrainerFullRefine) and on DRAMTrainer's 2x coarser grid, with the modules exactly as the trainers build them
(`DenseRegressionNetwork._refine` with the default attention and CRF settings). The input is what the trainer
feeds them: a dRAM logit map, the image plus the first-stage features (1 + features channels) and the image as the
CRF's guide, at the patch, batch and spacing given. Minimum over `--repeats` (CUDA synchronised). Each part is run
with both implementations of the sums over neighbour offsets (`--offset-modes`: the per-offset loop, the CPU
default, and one window view, the CUDA default; offset_windows.py); "torch ops" counts the operators one forward +
backward dispatches, about the kernel launches on a GPU.

    python benchmarks/refinement_speed.py --device cpu --shape 48 80 80 --threads 1
    python benchmarks/refinement_speed.py --device cuda --shape 96 160 160 --features 32     # nnU-Net's plans

Prints a table; --json writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def timed(fn, device, repeats: int) -> float:
    import torch
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def count_ops(fn) -> int:
    """torch operators dispatched by one call of fn, forward and backward: on a GPU about one kernel launch each,
    which is what bounds a small refinement there."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--shape", type=int, nargs=3, default=(48, 80, 80), help="patch (z, y, x)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--features", type=int, default=32, help="first-stage feature channels of the U-Net")
    ap.add_argument("--spacing", type=float, nargs=3, default=(2.0, 0.8, 0.8), help="mm per voxel (z, y, x)")
    ap.add_argument("--downsample", type=int, nargs="+", default=[1, 2],
                    help="refine_downsample values to time (1: DRAMTrainerFullRefine, 2: DRAMTrainer)")
    ap.add_argument("--offset-modes", nargs="+", default=["loop", "stacked"], choices=("loop", "stacked", "compiled"),
                    help="implementations of the sums over neighbour offsets (offset_windows.py) to time side by side")
    ap.add_argument("--crf-iterations", type=int, nargs="+", default=[5],
                    help="mean-field iterations of the CRF to time (5: the trainers' default)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    from torch import nn
    from nnunetv2_dram.architectures.dram_network import DenseRegressionNetwork
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    shape = tuple(args.shape)
    image = torch.randn(args.batch, 1, *shape, device=device)
    low = torch.randn(args.batch, args.features, *shape, device=device)
    feats = torch.cat([image, low], 1)
    rows = []
    for mode, k, iters in [(mode, k, i) for mode in args.offset_modes for k in args.downsample
                           for i in args.crf_iterations]:
        net = DenseRegressionNetwork(nn.Identity(), 3, args.spacing, 1, args.features, refine=True,
                                     refine_downsample=k, attention_kwargs={"offset_mode": mode},
                                     crf_kwargs={"offset_mode": mode, "iterations": iters}).to(device)
        spacing = net.spacing_mm
        dram = torch.randn(args.batch, 1, *shape, device=device, requires_grad=True)

        def attention_forward():
            with torch.no_grad():
                net.attention(dram, feats)

        def attention_backward():
            net.attention(dram, feats).sum().backward()

        def crf_forward():
            with torch.no_grad():
                net.crf(dram, image, spacing)

        def crf_backward():
            net.crf(dram, image, spacing).sum().backward()

        def refine_backward():
            attended, refined = net._refine(dram, feats, image, spacing)
            (attended.sum() + refined.sum()).backward()

        parts = [("attention", attention_forward, attention_backward), ("dense CRF", crf_forward, crf_backward),
                 ("attention + CRF (as trained)", None, refine_backward)]
        if mode == "compiled":  # compiled only with gradients on: a forward without them runs as "auto"
            parts = [(name, None, backward) for name, _, backward in parts]
        for name, forward, backward in parts:
            if (k > 1 or iters != args.crf_iterations[0]) and name != "attention + CRF (as trained)":
                continue  # the coarse grid and other CRF lengths only matter for the combined path
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            row = {"part": name, "offset_mode": mode, "refine_downsample": k, "crf_iterations": iters,
                   "forward_s": round(timed(forward, device, args.repeats), 4) if forward else None,
                   "forward_backward_s": round(timed(backward, device, args.repeats), 4),
                   "ops_forward_backward": count_ops(backward)}
            if device.type == "cuda":
                row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
            rows.append(row)
            print(row, flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\n{name}; torch {torch.__version__}; batch {args.batch} x {shape}, {1 + args.features} feature channels")
    print(f"{'part':30s} {'offsets':>8s} {'grid':>5s} {'CRF its':>7s} {'fwd s':>8s} {'fwd+bwd s':>10s} "
          f"{'torch ops':>10s}")
    for r in rows:
        fwd = "-" if r["forward_s"] is None else f"{r['forward_s']:.4f}"
        print(f"{r['part']:30s} {r['offset_mode']:>8s} {'/' + str(r['refine_downsample']):>5s} "
              f"{r['crf_iterations']:7d} {fwd:>8s} "
              f"{r['forward_backward_s']:10.4f} {r['ops_forward_backward']:10d}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "python":
                                               platform.python_version(), "batch": args.batch, "shape": shape,
                                               "features": args.features, "spacing": args.spacing, "rows": rows,
                                               "date": time.strftime("%Y-%m-%d")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
