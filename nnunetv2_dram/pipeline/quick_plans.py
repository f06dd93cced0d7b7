"""The `quick` preset: a compact copy of nnU-Net's plans, written as its own plans identifier.

It keeps everything nnU-Net planned for the data (spacing, normalisation, resampling, transposition) and only
shrinks the network (fewer stages and features) and the patch (a voxel budget, aspect kept, each axis a multiple
of the network's total stride), so the whole chain runs on a CPU in minutes. Because it is a plans file like any
other, every nnU-Net command takes it with `-p nnUNetPlans_quick`.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

QUICK_SUFFIX = "_quick"
QUICK_PLANS = "nnUNetPlans" + QUICK_SUFFIX  # the compact copy of nnU-Net's default plans
QUICK_SETTINGS = {
    # configuration: (voxel budget of the patch, features per stage, batch size)
    "3d_fullres": (32 * 48 * 48, (16, 32, 64, 128), 2),
    "2d": (128 * 128, (16, 32, 64, 128, 128), 4),
}


def _strides_for(patch, n_stages):
    """Pool by 2 along an axis while it stays >= 8 voxels and pools remain (nnU-Net-like, simplified)."""
    strides = [[1] * len(patch)]
    size = list(patch)
    for _ in range(n_stages - 1):
        s = [2 if sz // 2 >= 4 else 1 for sz in size]
        size = [sz // st for sz, st in zip(size, s)]
        strides.append(s)
    return strides


def compact_patch(patch, budget: int, n_pool: int) -> list[int]:
    factor = min(1.0, (budget / math.prod(patch)) ** (1 / len(patch)))
    div = 2 ** n_pool
    return [max(div, int(round(p * factor / div)) * div) for p in patch]


def quick_configuration(cfg: dict, name: str, plans_name: str) -> dict:
    budget, features, batch = QUICK_SETTINGS["2d" if len(cfg["patch_size"]) == 2 else "3d_fullres"]
    n_stages = len(features)
    cfg = copy.deepcopy(cfg)
    patch = compact_patch(cfg["patch_size"], budget, n_stages - 1)
    arch = cfg["architecture"]["arch_kwargs"]
    dim = len(patch)
    arch["n_stages"] = n_stages
    arch["features_per_stage"] = list(features)
    arch["kernel_sizes"] = [[3] * dim for _ in range(n_stages)]
    arch["strides"] = _strides_for(patch, n_stages)
    for key in ("n_conv_per_stage", "n_blocks_per_stage"):
        if key in arch:
            arch[key] = [2] * n_stages if key == "n_conv_per_stage" else [1] * n_stages
    if "n_conv_per_stage_decoder" in arch:
        arch["n_conv_per_stage_decoder"] = [1] * (n_stages - 1)
    cfg["patch_size"] = patch
    cfg["batch_size"] = batch
    cfg["data_identifier"] = f"{plans_name}_{name}"
    return cfg


def write_quick_plans(preprocessed_dataset_dir: str | Path, source: str = "nnUNetPlans",
                      target: str = QUICK_PLANS) -> Path:
    """<source>.json -> <target>.json in the same folder (written atomically); by default nnUNetPlans.json ->
    nnUNetPlans_quick.json. Any planner's plans work whose architecture has nnU-Net's U-Net keyword arguments
    (plain or residual encoder)."""
    from nnunetv2_dram.io_utils import atomic_write_json
    folder = Path(preprocessed_dataset_dir)
    plans = json.loads((folder / f"{source}.json").read_text())
    plans["plans_name"] = target
    configs = plans["configurations"]
    for name, cfg in list(configs.items()):
        if "architecture" in cfg and "patch_size" in cfg:
            configs[name] = quick_configuration(cfg, name, target)
    out = folder / f"{target}.json"
    atomic_write_json(out, plans)
    return out
