"""Time the dense-CRF backends on one synthetic volume: pydensecrf (CPU) vs the torch CRF on CPU and, if present, CUDA.

Same volume, same physical parameters, same number of mean-field iterations for every backend; the torch runs go
through refine_probability (tiled, no gradients), exactly what inference uses. Prints a table of seconds, the ratio
to pydensecrf and the agreement (IoU of the thresholded maps) with pydensecrf; --json PATH writes the same numbers.

    python benchmarks/crf_speed.py                       # small default, well under a minute on 2 CPU cores
    python benchmarks/crf_speed.py --size 128 256 256
    python benchmarks/crf_speed.py --size 300 512 512 --skip pydensecrf-cpu   # full CT (pydensecrf needs ~10+ GB)
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np


def synthetic_case(shape, spacing, seed=0):
    """A few ellipsoidal 'lesions' in a noisy image and a noisy probability map around them."""
    rng = np.random.default_rng(seed)
    extent_mm = [s * sp for s, sp in zip(shape, spacing)]
    axes = [(np.arange(s) + 0.5) * sp for s, sp in zip(shape, spacing)]
    grids = np.meshgrid(*axes, indexing="ij", sparse=True)
    lesions = np.zeros(shape, dtype=bool)
    for _ in range(6):
        centre = [rng.uniform(0.2, 0.8) * e for e in extent_mm]
        radius = rng.uniform(0.05, 0.12) * min(extent_mm)
        lesions |= sum((g - c) ** 2 for g, c in zip(grids, centre)) < radius ** 2
    image = (0.6 * lesions + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    prob = np.clip(0.15 + 0.7 * lesions + 0.3 * rng.standard_normal(shape), 0, 1).astype(np.float32)
    return lesions, image, prob


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return round(float(2 * (a & b).sum() / max(1, a.sum() + b.sum())), 4)


def _timed(fn, repeats, synchronize=None):
    """(result, fastest wall time over `repeats` runs)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out = fn()
        if synchronize is not None:
            synchronize()
        best = min(best, time.perf_counter() - start)
    return out, best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs="+", default=[48, 96, 96], help="2 or 3 axis lengths (voxels)")
    parser.add_argument("--spacing", type=float, nargs="+", default=None,
                        help="mm per axis (default 2.0 then 0.8 per in-plane axis for 3-D, 0.8 for 2-D)")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: a per-core comparison, pydensecrf is single-threaded; "
                             "on a shared machine more threads also make timings erratic)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per backend; the fastest is reported (a busy "
                                                                   "machine only ever slows a run down)")
    parser.add_argument("--window", type=int, default=None, help="torch bilateral window (default: the CRF's)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["pydensecrf-cpu", "torch-cpu", "torch-cuda"])
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)

    import torch

    from nnunetv2_dram.inference.crf_refine import DEFAULT_CRF_PARAMS, refine_probability

    shape = tuple(args.size)
    if len(shape) not in (2, 3):
        parser.error("--size takes 2 or 3 numbers")
    spacing = tuple(args.spacing) if args.spacing else ((2.0, 0.8, 0.8) if len(shape) == 3 else (0.8, 0.8))
    if len(spacing) != len(shape):
        parser.error("--spacing needs one value per axis of --size")
    if args.threads:
        torch.set_num_threads(args.threads)
    params = {**DEFAULT_CRF_PARAMS, "iterations": args.iterations}
    torch_params = dict(params, **({"window": args.window} if args.window else {}))
    lesions, image, prob = synthetic_case(shape, spacing)

    runs = []
    if "pydensecrf-cpu" not in args.skip:
        try:
            out, seconds = _timed(lambda: refine_probability(prob, image, spacing, backend="pydensecrf", **params),
                                  args.repeats)
            runs.append(("pydensecrf", "cpu", seconds, out))
        except ImportError as error:
            print(f"pydensecrf skipped: {error}", file=sys.stderr)
    if "torch-cpu" not in args.skip:
        out, seconds = _timed(lambda: refine_probability(prob, image, spacing, backend="torch", device="cpu",
                                                         **torch_params), args.repeats)
        runs.append(("torch", "cpu", seconds, out))
    if "torch-cuda" not in args.skip and torch.cuda.is_available():
        def on_gpu():
            return refine_probability(prob, image, spacing, backend="torch", device="cuda", **torch_params)
        warm_shape = tuple(min(s, 32) for s in shape)
        refine_probability(prob[tuple(slice(0, s) for s in warm_shape)],
                           image[tuple(slice(0, s) for s in warm_shape)], spacing, backend="torch", device="cuda",
                           **torch_params)  # CUDA context and kernels, not part of the timing
        torch.cuda.synchronize()
        out, seconds = _timed(on_gpu, args.repeats, torch.cuda.synchronize)
        runs.append(("torch", "cuda", seconds, out))

    reference = next((r for r in runs if r[0] == "pydensecrf"), None)
    rows = []
    for backend, device, seconds, out in runs:
        foreground = out > 0.5
        row = {"backend": backend, "device": device, "seconds": round(seconds, 4),
               "dice_to_truth": _dice(foreground, lesions)}
        if reference is not None:
            ref = reference[3] > 0.5
            row["speed_vs_pydensecrf"] = round(reference[2] / seconds, 3)
            row["iou_vs_pydensecrf"] = round(float((ref & foreground).sum() / max(1, (ref | foreground).sum())), 4)
        rows.append(row)

    device_names = {"cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        device_names["cuda"] = torch.cuda.get_device_name()
    result = {"shape": list(shape), "voxels": int(np.prod(shape)), "spacing_mm": list(spacing), "params": params,
              "torch_window": args.window, "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
              "devices": device_names,
              "dice_of_input": _dice(prob > 0.5, lesions),
              "runs": rows}

    print(f"volume {shape} = {result['voxels']:,} voxels, spacing {spacing} mm, {args.iterations} iterations, "
          f"torch threads {result['torch_threads']}, best of {args.repeats}; "
          f"Dice of the noisy input {result['dice_of_input']}")
    header = f"{'backend':<11}{'device':<7}{'seconds':>10}{'x pydensecrf':>14}{'IoU vs pyd.':>13}{'Dice':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        speed = row.get("speed_vs_pydensecrf", float("nan"))
        iou = row.get("iou_vs_pydensecrf", float("nan"))
        print(f"{row['backend']:<11}{row['device']:<7}{row['seconds']:>10.3f}{speed:>14.3f}{iou:>13.4f}"
              f"{row['dice_to_truth']:>8.4f}")
    print("(x pydensecrf > 1 means faster than pydensecrf)")
    if args.json is not None:
        from nnunetv2_dram.io_utils import atomic_write_json
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
