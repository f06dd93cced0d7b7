"""The dRAM's refinement: a map of its own, computed from the detached dRAM.

    refined = w * CRF( attention( dRAM, features ), image ) + head(image)        (DRAMTrainer: 0.5 * dRAM + head(image))

The head (building_blocks/voxel_head.py) is a small per-voxel classifier; what it reads (`inputs`: the image alone,
the image and the first-stage features, or the image and the decoder's last features) and where its logits go
(`combine`: "add_after" the attention as above, "add" to the dRAM's before the attention, or "replace" them) are
settings. With `own_loss` it is trained by a self-training loss of its own and enters the refined map detached;
otherwise it is trained through the refined map. DRAMTrainer's head is pointwise on the image, without normalisation
(a fixed function of a voxel's intensity: an appearance model of the dRAM's lesion voxels), added to the dRAM's
logits (after the attention, where there is one) and trained by its own loss; such a `voxelwise_head` can be
evaluated on any grid, and region inference adds it on the case's own grid, finer than the zoomed chunks the rest of
the refinement sees.

The head's `dram_weight` w (1 if not given) scales what a head added after the attention is added to: below 1, the
head's per-voxel score decides more of the ranking inside a region (DRAMTrainer: 0.5; DRAMTrainerFullDRAMWeight: 1).

The attention propagates the dRAM's logits between feature-similar neighbours (building_blocks/local_attention.py);
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
#: where the head's logits go: added to the dRAM's before the attention, replacing them, or added to the attention's
#: output (so that the attention does not average the head's per-voxel scores with their neighbours')
HEAD_COMBINE = ("add", "replace", "add_after")
#: what the head reads: the image alone, the image and the backbone's first-stage features (local appearance), or the
#: image and the decoder's last features (what the dRAM itself is computed from)
HEAD_INPUTS = ("image", "encoder", "decoder")
#: what a head setting is when it is not given, also in checkpoints written before the setting existed (their head
#: read the decoder's features, was trained through the refined map and had instance norm)
HEAD_DEFAULTS = {"combine": "add", "inputs": "decoder", "own_loss": False, "norm": True, "dram_weight": 1.0}
_CRF_CONFIGURABLE = ("iterations", "spatial_sigma_mm", "bilateral_sigma_mm", "intensity_sigma", "window",
                     "bilateral_reach_sigmas", "offset_mode")


class DRAMRefinement(nn.Module):
    """Classifier head and attention (each optional, and a trainable CRF) from the dRAM's logits to the refined
    map's logits."""

    def __init__(self, dim: int, feature_channels: int, attention: dict | None, crf: dict | None = None,
                 downsample: int = 1, head: dict | None = None, head_channels: int | None = None):
        super().__init__()
        if downsample < 1:
            raise ValueError(f"downsample must be >= 1, got {downsample}")
        self.dim = dim
        self.downsample = int(downsample)
        # None: no attention (the refined map is the dRAM plus the head)
        self.attention = None if attention is None else LocalAffinityAttention(in_channels=feature_channels, dim=dim,
                                                                                **attention)
        self._set_head(head, head_channels)
        # built only when used: a parameter without a gradient stops DDP
        self.crf = TrainableDenseCRF(dim=dim, **crf) if crf is not None else None

    def _set_head(self, head: dict | None, head_channels: int | None) -> None:
        self.head = None
        self.head_combine = self.head_inputs = None
        self.head_own_loss = False
        self.head_dram_weight = 1.0
        if head is None:
            return
        head = {**HEAD_DEFAULTS, **head}
        self.head_combine = head.pop("combine")
        self.head_inputs = head.pop("inputs")
        self.head_own_loss = bool(head.pop("own_loss"))
        self.head_dram_weight = float(head.pop("dram_weight"))
        if self.head_dram_weight <= 0 or (self.head_dram_weight != 1.0 and self.head_combine != "add_after"):
            raise ValueError(f"head dram_weight must be > 0, and other than 1 only with combine 'add_after', got "
                             f"{self.head_dram_weight} with {self.head_combine!r}")
        if self.head_combine not in HEAD_COMBINE:
            raise ValueError(f"head combine must be one of {HEAD_COMBINE}, got {self.head_combine!r}")
        if self.head_inputs not in HEAD_INPUTS:
            raise ValueError(f"head inputs must be one of {HEAD_INPUTS}, got {self.head_inputs!r}")
        if not head_channels:
            raise ValueError("a refinement head needs head_channels (the channels of what it reads)")
        head.pop("in_channels", None)  # what the network passes as head_channels
        # added to a map it starts as the identity; replacing the dRAM, it must start from something
        self.head = VoxelClassifierHead(self.dim, head_channels, zero_init=self.head_combine != "replace", **head)

    # ------------------------------------------------------------------------------------------------ settings
    def settings(self) -> dict:
        head = None if self.head is None else {"combine": self.head_combine, "inputs": self.head_inputs,
                                               "own_loss": self.head_own_loss, "in_channels": self.head.in_channels,
                                               "hidden_channels": self.head.hidden_channels, "depth": self.head.depth,
                                               "kernel_size": self.head.kernel_size, "norm": self.head.norm,
                                               "dram_weight": self.head_dram_weight}
        return {"downsample": self.downsample,
                "attention": None if self.attention is None else self.attention.settings(),
                "crf": None if self.crf is None else self.crf.settings(), "head": head}

    def get_extra_state(self) -> dict:
        return {"settings": self.settings()}

    def set_extra_state(self, state: dict) -> None:
        """Restore the stored settings in place (the parameters are loaded after this, into the same modules)."""
        stored = state["settings"]
        if stored.get("head") is not None:
            stored = {**stored, "head": {**HEAD_DEFAULTS, **stored["head"]}}
        if (stored["crf"] is None) != (self.crf is None):
            raise RuntimeError(f"the checkpoint's refinement {'has' if stored['crf'] else 'has no'} trainable CRF, "
                               f"this network {'has' if self.crf is not None else 'has none'}: load it with the "
                               f"trainer it was trained with")
        if stored.get("head") != self.settings()["head"]:
            # the head the model was trained with (none, or another one, as in models of earlier versions) is
            # rebuilt before the weights are loaded into it, so the model predicts as it was trained
            device = next(self.parameters(), torch.empty(0)).device
            head = stored.get("head")
            self._set_head(head, None if head is None else head["in_channels"])
            if self.head is not None:
                self.head.to(device)
        attention = stored["attention"]
        if attention is None:
            self.attention = None
        elif self.attention is None or any(attention[k] != self.attention.settings()[k] for k in _ATTENTION_SHAPING):
            # likewise the attention (models of version 0.4.0 and earlier have one, today's DRAMTrainer builds none)
            device = next(self.parameters(), torch.empty(0)).device
            self.attention = LocalAffinityAttention(dim=self.dim, **{k: attention[k] for k in _ATTENTION_SHAPING},
                                                    **{k: attention[k] for k in _ATTENTION_CONFIGURABLE}).to(device)
        # parameters in the order __init__ registers them, which is the order of a checkpoint's optimiser state
        for name in ("attention", "head", "crf"):
            if name in self._modules:
                self._modules[name] = self._modules.pop(name)
        self.downsample = int(stored["downsample"])
        if attention is not None:
            self.attention.configure(**{k: attention[k] for k in _ATTENTION_CONFIGURABLE})
            if not self.attention.learn_mix:
                self.attention.fixed_mix = float(attention["fixed_mix"])
        if self.crf is not None:
            self.crf.configure(**{k: stored["crf"][k] for k in _CRF_CONFIGURABLE})
            self.crf.max_kernel_weight = float(stored["crf"]["max_kernel_weight"])

    @property
    def voxelwise_head(self) -> bool:
        """The head is a function of each voxel's intensities alone, added after the attention: it can be evaluated
        on any grid of the image, and the refined map there is the rest of the refinement (interpolated) plus the
        head's logits (region_inference does so on the case's own grid)."""
        return (self.head is not None and self.head_inputs == "image" and self.head.kernel_size == 1
                and not self.head.norm and self.head_combine == "add_after")

    @torch.no_grad()
    def voxelwise_head_logits(self, image: torch.Tensor, slab: int = 8) -> torch.Tensor:
        """The voxelwise head on an image (C, *S) of any size, a few rows of the first axis at a time (the head is
        pointwise, so any split gives the same logits) -> (*S) logits."""
        out = torch.empty(image.shape[1:], dtype=torch.float32, device=image.device)
        for z in range(0, image.shape[1], slab):
            out[z:z + slab] = self.head(image[None, :, z:z + slab].float())[0, 0].float()
        return out

    def extra_repr(self) -> str:
        return (f"downsample={self.downsample}, attention={'on' if self.attention is not None else 'off'}, "
                f"crf={'on' if self.crf is not None else 'off'}, head={self.head_combine or 'off'}"
                f"{'' if self.head is None else f' on {self.head_inputs}'}")

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, dram_logits: torch.Tensor, features: torch.Tensor, guide: torch.Tensor, spacing,
                region: torch.Tensor | None = None, head_features: torch.Tensor | None = None,
                return_head: bool = False):
        """Refined logits (B, 1, *S); with return_head, (refined logits, the head's logits or None).

        dram_logits (B, 1, *S): the dRAM (detach it first where the refinement must not train it). features
        (B, C, *S): what the attention's affinities are computed from. guide (B, 1, *S): the image for the CRF.
        spacing: mm per spatial axis of this grid, `dim` floats or one row per sample. region (B, 1, *S), optional:
        messages stay on their side of its border, and the CRF sets everything outside it to background.
        head_features (B, head_channels, *S): what the head classifies (needed when there is a head).
        """
        head_logits = None
        if self.head is not None:
            if head_features is None:
                raise ValueError("this refinement has a head: pass head_features")
            head_logits = self.head(head_features).float()
            # a head with a loss of its own enters the refined map as a fixed input: trained through the refined map,
            # whose target is the dRAM's own threshold, it would learn only what the dRAM does not already say
            scores = head_logits.detach() if self.head_own_loss else head_logits
            if self.head_combine == "add":
                dram_logits = dram_logits.float() + scores
            elif self.head_combine == "replace":
                dram_logits = scores
        k = self.downsample
        size = tuple(dram_logits.shape[2:])
        if k > 1:
            small = tuple(max(1, s // k) for s in size)
            pool = F.adaptive_avg_pool3d if self.dim == 3 else F.adaptive_avg_pool2d
            factors = [s / m for s, m in zip(size, small)]
            dram_logits, features, guide = pool(dram_logits, small), pool(features, small), pool(guide, small)
            region = None if region is None else (pool(region.float(), small) > 0.5).float()
            spacing = _scaled_spacing(spacing, factors)
        refined = dram_logits if self.attention is None else self.attention(dram_logits, features, mask=region)
        if self.crf is not None:
            refined = self.crf(refined, guide, spacing, region)
        if k > 1:
            mode = "trilinear" if self.dim == 3 else "bilinear"
            refined = F.interpolate(refined, size=size, mode=mode, align_corners=False)
        if self.head_combine == "add_after":
            # dram_weight < 1 tempers the dRAM's logits before the head's score is added: the region regression
            # leaves them far larger in magnitude than a calibrated classifier's, so at full weight they outvote the
            # head's per-voxel evidence, which is what can place an edge at the case's own resolution
            refined = self.head_dram_weight * refined.float() + scores
        return (refined, head_logits) if return_head else refined


def head_channels(head: dict | None, image_channels: int, feature_channels: int) -> int | None:
    """Input channels of a head with these settings: the image's, or the image's plus the features' (first-stage or
    the decoder's last ones: nnU-Net's U-Nets end their decoder with as many features as their first stage has)."""
    if head is None:
        return None
    return image_channels if {**HEAD_DEFAULTS, **head}["inputs"] == "image" else feature_channels


def _scaled_spacing(spacing, factors: Sequence[float]):
    """Spacing of a grid whose voxels are `factors` times larger per axis (one row or one row per sample)."""
    if torch.is_tensor(spacing):
        return spacing * spacing.new_tensor(factors)
    rows = [spacing] if not isinstance(spacing[0], (list, tuple)) else spacing
    scaled = [tuple(float(v) * f for v, f in zip(row, factors)) for row in rows]
    return scaled[0] if not isinstance(spacing[0], (list, tuple)) else scaled
