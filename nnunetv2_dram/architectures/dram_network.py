"""Networks that produce a dense lesion map from nnU-Net's planned architecture.

Both wrappers speak two languages:
- `forward(x, return_all=True)` (training, our own inference): a dict of single-channel logit maps;
- `forward(x)` (nnU-Net's predictor, `nnUNetv2_predict`): a two-channel tensor [0, z] whose softmax is
  [1 - sigmoid(z), sigmoid(z)], so nnU-Net's sliding window, mirroring, probability export and resampling
  back to the original geometry all work unchanged on a {"background": 0, "lesion": 1} label set.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _two_channels(logit: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros_like(logit), logit], dim=1)


def _split_encoder_decoder(backbone: nn.Module):
    enc, dec = getattr(backbone, "encoder", None), getattr(backbone, "decoder", None)
    return (enc, dec) if enc is not None and dec is not None else (None, None)


class DenseRegressionNetwork(nn.Module):
    """dRAM: nnU-Net's segmentation network with one output channel (the dRAM logit), optionally refined by a
    local-affinity attention module over low-level features and a trainable dense CRF on the image."""

    def __init__(self, backbone: nn.Module, dim: int, spacing: Sequence[float], image_channels: int,
                 low_level_channels: int | None, refine: bool = True, attention_kwargs: dict | None = None,
                 crf_kwargs: dict | None = None, refine_downsample: int = 1):
        super().__init__()
        self.refine_downsample = int(refine_downsample)
        self.backbone = backbone
        self.dim = dim
        self.refine = refine
        # kept on the host (not a buffer): the CRF builds its kernels from it, and reading a GPU tensor back every
        # step would make the CPU wait for the GPU
        self.spacing_mm = tuple(float(s) for s in spacing)
        self.output_map = "refined" if refine else "dram"  # what forward(x) hands to nnU-Net's predictor
        if refine:
            from nnunetv2_dram.building_blocks.dense_crf import TrainableDenseCRF
            from nnunetv2_dram.building_blocks.local_attention import LocalAffinityAttention
            feat_channels = image_channels + (low_level_channels or 0)
            self.attention = LocalAffinityAttention(in_channels=feat_channels, dim=dim, **(attention_kwargs or {}))
            self.crf = TrainableDenseCRF(dim=dim, **(crf_kwargs or {}))
        else:
            self.attention = self.crf = None

    @property
    def decoder(self):  # lets nnU-Net-style code toggle deep supervision
        return getattr(self.backbone, "decoder", None)

    def _backbone(self, x):
        enc, dec = _split_encoder_decoder(self.backbone)
        if enc is None:
            return self.backbone(x), None
        skips = enc(x)
        return dec(skips), skips[0]

    def _refine(self, dram, feats, guide, spacing):
        """Attention then CRF; with refine_downsample > 1 both run on an average-pooled grid (that many times fewer
        voxels per axis) and only their correction is upsampled onto the full-resolution map, so the map keeps
        its own detail while the refinement costs a fraction."""
        k = self.refine_downsample
        if k <= 1:
            attended = self.attention(dram, feats)
            return attended, self.crf(attended, guide, spacing)
        mode = "trilinear" if dram.ndim == 5 else "bilinear"
        size = dram.shape[2:]
        small = [max(1, s // k) for s in size]
        down = lambda t: F.adaptive_avg_pool3d(t, small) if t.ndim == 5 else F.adaptive_avg_pool2d(t, small)  # noqa: E731
        up = lambda t: F.interpolate(t, size=size, mode=mode, align_corners=False)  # noqa: E731
        d_low = down(dram)
        factors = [s / m for s, m in zip(size, small)]  # mm per coarse voxel = mm per voxel x factor
        if torch.is_tensor(spacing):  # (batch, dim) per-sample spacing
            spacing_low = spacing * spacing.new_tensor(factors)
        else:
            spacing_low = [sp * f for sp, f in zip(spacing, factors)]
        att_low = self.attention(d_low, down(feats))
        ref_low = self.crf(att_low, down(guide), spacing_low)
        return dram + up(att_low - d_low), dram + up(ref_low - d_low)

    def forward(self, x: torch.Tensor, return_all: bool = False, spacing=None):
        out, low = self._backbone(x)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        dram = outs[0]
        attended = refined = None
        if self.refine:
            # the attention only reads the backbone's features: it must not reshape them to suit itself
            feats = x if low is None else torch.cat([x, low.detach().to(x.dtype)], dim=1)
            attended, refined = self._refine(dram, feats, x[:, :1], self.spacing_mm if spacing is None else spacing)
        if return_all:
            return {"dram": outs, "attended": attended, "refined": refined}
        final = refined if (refined is not None and self.output_map == "refined") else dram
        return _two_channels(final)


class ClassActivationNetwork(nn.Module):
    """CAM baseline: nnU-Net's encoder, its deepest features pooled inside the region and regressed by a 1×1
    convolution. The same convolution applied at every position is the class (regression) activation map,
    upsampled to the input size for prediction."""

    def __init__(self, backbone: nn.Module, deepest_channels: int, dim: int):
        super().__init__()
        enc, _ = _split_encoder_decoder(backbone)
        if enc is None:
            raise ValueError("CAMTrainer needs an architecture with an `encoder` (nnU-Net's U-Nets have one)")
        self.encoder = enc
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        self.head = conv(deepest_channels, 1, kernel_size=1)
        self.dim = dim
        self.output_map = "cam"

    @property
    def decoder(self):
        return None

    def forward(self, x: torch.Tensor, return_all: bool = False, spacing=None):
        skips = self.encoder(x)
        cam = self.head(skips[-1])
        if return_all:
            return {"cam": cam}
        mode = "trilinear" if self.dim == 3 else "bilinear"
        return _two_channels(F.interpolate(cam, size=x.shape[2:], mode=mode, align_corners=False))


def build_backbone(configuration_manager, num_input_channels: int, deep_supervision: bool) -> nn.Module:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    return get_network_from_plans(configuration_manager.network_arch_class_name,
                                  configuration_manager.network_arch_init_kwargs,
                                  configuration_manager.network_arch_init_kwargs_req_import,
                                  num_input_channels, 1, allow_init=True, deep_supervision=deep_supervision)


def features_per_stage(configuration_manager) -> list[int] | None:
    f = configuration_manager.network_arch_init_kwargs.get("features_per_stage")
    return list(f) if f is not None else None
