"""The dRAM's refinement: a map of its own, computed from the detached dRAM.

    refined = CRF( attention( dRAM + head(decoder features, image), features ), image )

(the head and the CRF only where they are switched on; with `combine="replace"` the head's logits replace the dRAM's
instead of being added to them).

The head (building_blocks/voxel_head.py) is a small per-voxel classifier on the decoder's last features and the
image: it scores voxels by what they look like, learnt across the training cases. The attention propagates the
logits between feature-similar neighbours (building_blocks/local_attention.py);
the trainable dense CRF (building_blocks/dense_crf.py) smooths the result along the image. Both pass messages only
inside the region (lobe) the sample is about when a region mask is given, and the CRF's kernels are in millimetres
of the grid it actually sees (the trainer passes the plan spacing divided by the chunk's zoom).

The inputs are *detached* (the dRAM, the features, the head's features): the refinement's per-voxel self-training
loss (losses/self_training.py) trains the refinement only, and the dRAM learns from its region regression alone,
exactly as without a refinement.

`downsample` > 1 runs the refinement on an average-pooled grid and upsamples the refined map (it then cannot move
an edge by less than that many voxels); 1, the default, refines at the dRAM's full resolution.

Every setting is stored with the weights (`get_extra_state`), so a checkpoint restores the refinement it was
trained with, whatever the code's defaults or the environment say when it is loaded.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_dram.building_blocks.dense_crf import TrainableDenseCRF
from nnunetv2_dram.building_blocks.local_attention import LocalAffinityAttention
from nnunetv2_dram.building_blocks.voxel_head import VoxelClassifierHead

_ATTENTION_CONFIGURABLE = ("kernel_size", "dilations", "iterations", "downsample", "offset_mode")
_ATTENTION_SHAPING = ("proj_channels", "similarity", "in_channels", "learn_mix")
HEAD_COMBINE = ("add", "replace")
_CRF_CONFIGURABLE = ("iterations", "spatial_sigma_mm", "bilateral_sigma_mm", "intensity_sigma", "window",
                     "bilateral_reach_sigmas", "offset_mode")


class DRAMRefinement(nn.Module):
    """Classifier head and attention (each optional, and a trainable CRF) from the dRAM's logits to the refined
    map's logits."""

    def __init__(self, dim: int, feature_channels: int, attention: dict | None = None, crf: dict | None = None,
                 downsample: int = 1, head: dict | None = None, head_channels: int | None = None):
        super().__init__()
        if downsample < 1:
            raise ValueError(f"downsample must be >= 1, got {downsample}")
        self.dim = dim
        self.downsample = int(downsample)
        self.attention = LocalAffinityAttention(in_channels=feature_channels, dim=dim, **(attention or {}))
        self.head = None
        self.head_combine = None
        if head is not None:
            head = dict(head)
            self.head_combine = head.pop("combine", "add")
            if self.head_combine not in HEAD_COMBINE:
                raise ValueError(f"head combine must be one of {HEAD_COMBINE}, got {self.head_combine!r}")
            if not head_channels:
                raise ValueError("a refinement head needs head_channels (decoder features + image channels)")
            # added to the dRAM it starts as the identity; replacing it, it must start from something
            self.head = VoxelClassifierHead(dim, head_channels, zero_init=self.head_combine == "add", **head)
        # built only when used: a parameter without a gradient stops DDP
        self.crf = TrainableDenseCRF(dim=dim, **crf) if crf is not None else None

    # ------------------------------------------------------------------------------------------------ settings
    def settings(self) -> dict:
        head = None if self.head is None else {"combine": self.head_combine, "in_channels": self.head.in_channels,
                                               "hidden_channels": self.head.hidden_channels, "depth": self.head.depth,
                                               "kernel_size": self.head.kernel_size}
        return {"downsample": self.downsample, "attention": self.attention.settings(),
                "crf": None if self.crf is None else self.crf.settings(), "head": head}

    def get_extra_state(self) -> dict:
        return {"settings": self.settings()}

    def set_extra_state(self, state: dict) -> None:
        """Restore the stored settings in place (the parameters are loaded after this, into the same modules)."""
        stored = state["settings"]
        if (stored["crf"] is None) != (self.crf is None):
            raise RuntimeError(f"the checkpoint's refinement {'has' if stored['crf'] else 'has no'} trainable CRF, "
                               f"this network {'has' if self.crf is not None else 'has none'}: load it with the "
                               f"trainer it was trained with")
        if stored.get("head") is None and self.head is not None:
            # a model trained without the head (or before there was one) predicts as it was trained: the head is
            # dropped before the weights are loaded, so its parameters are neither expected nor missing
            self.head = self.head_combine = None
        if stored.get("head") != self.settings()["head"]:
            raise RuntimeError(f"the checkpoint's refinement head is {stored.get('head')!r}, this network's "
                               f"{self.settings()['head']!r}: load it with the trainer it was trained with")
        attention = stored["attention"]
        for key in _ATTENTION_SHAPING:
            if attention[key] != self.attention.settings()[key]:
                raise RuntimeError(f"the checkpoint's attention has {key}={attention[key]!r}, this network "
                                   f"{self.attention.settings()[key]!r}: load it with the trainer it was trained with")
        self.downsample = int(stored["downsample"])
        self.attention.configure(**{k: attention[k] for k in _ATTENTION_CONFIGURABLE})
        if not self.attention.learn_mix:
            self.attention.fixed_mix = float(attention["fixed_mix"])
        if self.crf is not None:
            self.crf.configure(**{k: stored["crf"][k] for k in _CRF_CONFIGURABLE})
            self.crf.max_kernel_weight = float(stored["crf"]["max_kernel_weight"])

    def extra_repr(self) -> str:
        return (f"downsample={self.downsample}, crf={'on' if self.crf is not None else 'off'}, "
                f"head={self.head_combine or 'off'}")

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, dram_logits: torch.Tensor, features: torch.Tensor, guide: torch.Tensor, spacing,
                region: torch.Tensor | None = None, head_features: torch.Tensor | None = None) -> torch.Tensor:
        """Refined logits (B, 1, *S).

        dram_logits (B, 1, *S): the dRAM (detach it first where the refinement must not train it). features
        (B, C, *S): what the attention's affinities are computed from. guide (B, 1, *S): the image for the CRF.
        spacing: mm per spatial axis of this grid, `dim` floats or one row per sample. region (B, 1, *S), optional:
        messages stay on their side of its border, and the CRF sets everything outside it to background.
        head_features (B, head_channels, *S): what the head classifies (needed when there is a head).
        """
        if self.head is not None:
            if head_features is None:
                raise ValueError("this refinement has a head: pass head_features")
            scores = self.head(head_features).float()
            dram_logits = dram_logits.float() + scores if self.head_combine == "add" else scores
        k = self.downsample
        size = tuple(dram_logits.shape[2:])
        if k > 1:
            small = tuple(max(1, s // k) for s in size)
            pool = F.adaptive_avg_pool3d if self.dim == 3 else F.adaptive_avg_pool2d
            factors = [s / m for s, m in zip(size, small)]
            dram_logits, features, guide = pool(dram_logits, small), pool(features, small), pool(guide, small)
            region = None if region is None else (pool(region.float(), small) > 0.5).float()
            spacing = _scaled_spacing(spacing, factors)
        refined = self.attention(dram_logits, features, mask=region)
        if self.crf is not None:
            refined = self.crf(refined, guide, spacing, region)
        if k > 1:
            mode = "trilinear" if self.dim == 3 else "bilinear"
            refined = F.interpolate(refined, size=size, mode=mode, align_corners=False)
        return refined


def _scaled_spacing(spacing, factors: Sequence[float]):
    """Spacing of a grid whose voxels are `factors` times larger per axis (one row or one row per sample)."""
    if torch.is_tensor(spacing):
        return spacing * spacing.new_tensor(factors)
    rows = [spacing] if not isinstance(spacing[0], (list, tuple)) else spacing
    scaled = [tuple(float(v) * f for v, f in zip(row, factors)) for row in rows]
    return scaled[0] if not isinstance(spacing[0], (list, tuple)) else scaled
