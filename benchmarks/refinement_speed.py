"""Where DRAMTrainer's extra time goes: its refinement (architectures/dram_refinement.py), timed alone on one
batch-shaped input.

`iteration_speed.py` gives the whole training step; this script times the refinement module exactly as the trainers
build it (`<Trainer>.refinement_settings`, the same attention and CRF settings), forward only and forward + backward,
for each refinement the trainers train:

    DRAMTrainer                    the pointwise intensity head alone (no attention, no trainable CRF)
    DRAMTrainerWithAttention       the attention at the dRAM's full resolution plus the intensity head
    DRAMTrainerCoarseRefinement    the same on a 2x coarser grid, its map upsampled
    DRAMTrainerWithCRF             trainable dense CRF at full resolution plus the intensity head
    DRAMTrainerWithCRF/coarse      the same on the coarse grid (no trainer of its own)

For the refinements with a CRF, the attention (where there is one) and the CRF are also timed alone on the
refinement's grid. The input is
what the trainer feeds the refinement: the detached dRAM logits, the image plus the first-stage features
(1 + `--features` channels), the image as the CRF's guide and the region (lobe) mask, at the patch, batch and spacing
given; the backward reaches the refinement's own parameters only, as in training. Each row is run with every
implementation of the sums over neighbour offsets in `--offset-modes` (offset_windows.py: the per-offset loop, one
window view "stacked", and "compiled", the stacked sums through torch.compile while gradients are on; a forward
without gradients runs "compiled" as "auto", so compiled rows have no forward-only time). Minimum over `--repeats`
(CUDA synchronised); "torch ops" counts the operators one forward + backward dispatches, about the kernel launches on
a GPU.

    python benchmarks/refinement_speed.py --device cpu --shape 24 48 48 --threads 1
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
from types import SimpleNamespace

#: row name -> (trainer class name, changes to its refinement settings)
VARIANTS = {
    "DRAMTrainer": ("DRAMTrainer", {}),
    "DRAMTrainerWithAttention": ("DRAMTrainerWithAttention", {}),
    "DRAMTrainerCoarseRefinement": ("DRAMTrainerCoarseRefinement", {}),
    "DRAMTrainerWithCRF": ("DRAMTrainerWithCRF", {}),
    "DRAMTrainerWithCRF/coarse": ("DRAMTrainerWithCRF", {"downsample": 2}),
}


def trainer_class(name: str):
    from nnunetv2_dram.training import dram_trainers
    from nnunetv2_dram.training.variants import refinement
    return getattr(dram_trainers, name, None) or getattr(refinement, name)


def refinement_settings(variant: str, offset_mode: str, crf_iterations: int | None) -> dict:
    """The trainer's refinement settings (intensity sigma for z-scored input), with `offset_mode` everywhere and,
    when given, `crf_iterations` mean-field iterations."""
    name, changes = VARIANTS[variant]
    plans_manager = SimpleNamespace(foreground_intensity_properties_per_channel={})
    configuration_manager = SimpleNamespace(normalization_schemes=["ZScoreNormalization"])
    settings = trainer_class(name).refinement_settings(plans_manager, configuration_manager)
    settings = dict(settings, **changes)
    if settings["attention"] is not None:
        settings["attention"] = dict(settings["attention"], offset_mode=offset_mode)
    if settings["crf"] is not None:
        settings["crf"] = dict(settings["crf"], offset_mode=offset_mode)
        if crf_iterations is not None:
            settings["crf"]["iterations"] = crf_iterations
    return settings


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=1))


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
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    help="refinements to time (see above)")
    ap.add_argument("--offset-modes", nargs="+", default=["loop", "stacked"], choices=("loop", "stacked", "compiled"),
                    help="implementations of the sums over neighbour offsets (offset_windows.py) to time side by side")
    ap.add_argument("--crf-iterations", type=int, nargs="+", default=[None],
                    help="mean-field iterations of the CRF to time (default: the trainer's)")
    ap.add_argument("--no-region", action="store_true", help="no region mask (the trainers always pass one)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from nnunetv2_dram.architectures.dram_refinement import DRAMRefinement, _scaled_spacing, head_channels
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    shape = tuple(args.shape)
    image = torch.randn(args.batch, 1, *shape, device=device)
    low = torch.randn(args.batch, args.features, *shape, device=device)
    feats = torch.cat([image, low], 1)
    dram = torch.randn(args.batch, 1, *shape, device=device)  # detached, as the trainer passes it
    region = None
    if not args.no_region:  # a box over the central 80% of each axis, standing in for a lobe
        region = torch.zeros(args.batch, 1, *shape, device=device)
        region[(slice(None), slice(None), *(slice(s // 10, s - s // 10) for s in shape))] = 1
    spacing = tuple(args.spacing)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    header = {"device": name, "torch": torch.__version__, "python": platform.python_version(), "batch": args.batch,
              "shape": shape, "features": args.features, "spacing": spacing, "region": region is not None,
              "date": time.strftime("%Y-%m-%d")}
    rows = []
    for variant in args.variants:
        for mode in args.offset_modes:
            for crf_iterations in args.crf_iterations:
                settings = refinement_settings(variant, mode, crf_iterations)
                if settings["crf"] is None and crf_iterations != args.crf_iterations[0]:
                    continue  # no CRF: one row for all CRF lengths
                # the head reads the image, or the image and (standing in for the decoder's) the features
                channels = head_channels(settings.get("head"), 1, 1 + args.features)
                head_features = None if channels is None else (image if channels == 1 else feats)
                net = DRAMRefinement(3, 1 + args.features, **settings, head_channels=channels).to(device)
                k = net.downsample
                # the refinement's own grid, for its parts alone
                small = tuple(max(1, s // k) for s in shape)
                pool = (lambda t: F.adaptive_avg_pool3d(t, small)) if k > 1 else (lambda t: t)
                g_dram, g_feats, g_image = pool(dram), pool(feats), pool(image)
                g_region = None if region is None else (pool(region) > 0.5).float()
                g_spacing = _scaled_spacing(spacing, [s / m for s, m in zip(shape, small)]) if k > 1 else spacing

                def whole():
                    # what training back-propagates: the refined map and a head's logits where it has its own loss
                    refined, head = net(dram, feats, image, spacing, region, head_features=head_features,
                                        return_head=True)
                    return refined + head if head is not None and net.head_own_loss else refined

                def attention():
                    return net.attention(g_dram, g_feats, mask=g_region)

                def crf():
                    return net.crf(g_dram, g_image, g_spacing, g_region)

                parts = [("refinement", whole)]
                if net.crf is not None:  # the attention alone once per offset mode, the CRF per length
                    parts += [("  attention alone", attention)] if (crf_iterations == args.crf_iterations[0]
                                                                     and net.attention is not None) else []
                    parts += [("  CRF alone", crf)]
                for part, fn in parts:
                    def forward(fn=fn):
                        with torch.no_grad():
                            fn()

                    def backward(fn=fn):
                        fn().sum().backward()

                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    row = {"variant": variant, "part": part.strip(), "offset_mode": mode, "downsample": k,
                           "crf_iterations": None if net.crf is None else net.crf.iterations}
                    try:
                        row["forward_s"] = None if mode == "compiled" else \
                            round(timed(forward, device, args.repeats), 4)
                        row["forward_backward_s"] = round(timed(backward, device, args.repeats), 4)
                        row["ops_forward_backward"] = count_ops(backward)
                    except Exception as e:  # noqa: BLE001 -- e.g. out of memory: the other rows still count
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    if device.type == "cuda":
                        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
                    rows.append(row)
                    print(row, flush=True)
                    write_json(args.json, dict(header, rows=rows))  # kept if a deadline stops the script
                del net
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print(f"\n{name}; torch {torch.__version__}; batch {args.batch} x {shape}, {1 + args.features} feature channels, "
          f"spacing {spacing} mm, region {'none' if region is None else 'central 80% box'}")
    print(f"{'refinement':28s} {'part':17s} {'offsets':>8s} {'grid':>5s} {'CRF its':>7s} {'fwd s':>8s} "
          f"{'fwd+bwd s':>10s} {'torch ops':>10s}")
    for r in rows:
        its = "-" if r["crf_iterations"] is None else str(r["crf_iterations"])
        label = r["part"] if r["part"] == "refinement" else "  " + r["part"]
        head = f"{r['variant']:28s} {label:17s} {r['offset_mode']:>8s} {'/' + str(r['downsample']):>5s} {its:>7s}"
        if "error" in r:
            print(f"{head} {r['error'][:80]}")
            continue
        fwd = "-" if r["forward_s"] is None else f"{r['forward_s']:.4f}"
        print(f"{head} {fwd:>8s} {r['forward_backward_s']:10.4f} {r['ops_forward_backward']:10d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
