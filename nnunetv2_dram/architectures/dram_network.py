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
    """dRAM: nnU-Net's segmentation network with one output channel (the dRAM logit), optionally followed by a
    refinement (architectures/dram_refinement.py) that computes a refined map of its own from the detached dRAM,
    the image, the backbone's first-stage features and (for a head that reads them) the decoder's last features,
    all detached."""

    def __init__(self, backbone: nn.Module, dim: int, spacing: Sequence[float], image_channels: int,
                 low_level_channels: int | None, refinement: dict | None = None):
        super().__init__()
        self.backbone = backbone
        self.dim = dim
        # kept on the host (not a buffer): the CRF builds its kernels from it, and reading a GPU tensor back every
        # step would make the CPU wait for the GPU
        self.spacing_mm = tuple(float(s) for s in spacing)
        if refinement is not None:
            from nnunetv2_dram.architectures.dram_refinement import DRAMRefinement, head_channels
            channels = image_channels + (low_level_channels or 0)
            self.refinement = DRAMRefinement(dim, channels, **refinement,
                                             head_channels=head_channels(refinement.get("head"), image_channels,
                                                                         channels))
        else:
            self.refinement = None
        self.output_map = "refined" if refinement is not None else "dram"  # what forward(x) gives the predictor

    @property
    def decoder(self):  # lets nnU-Net-style code toggle deep supervision
        return getattr(self.backbone, "decoder", None)

    def _backbone(self, x, decoder_features: bool = False):
        """(the backbone's output, its first-stage features, its decoder's last features if asked for)"""
        enc, dec = _split_encoder_decoder(self.backbone)
        if enc is None:
            if decoder_features:
                raise ValueError("the refinement's head needs an architecture with an encoder and a decoder")
            return self.backbone(x), None, None
        skips = enc(x)
        if not decoder_features:
            return dec(skips), skips[0], None
        # the full-resolution output layer's input is the decoder's last features, with or without deep supervision
        captured = []
        hook = dec.seg_layers[-1].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            out = dec(skips)
        finally:
            hook.remove()
        return out, skips[0], captured[-1]

    def forward(self, x: torch.Tensor, return_all: bool = False, spacing=None, region: torch.Tensor | None = None):
        """return_all: {"dram": [logits per deep-supervision scale], "refined": logits or None, "head": the refinement
        head's logits or None}; otherwise the
        two-channel tensor for nnU-Net's predictor. spacing: mm per axis of x's grid (default: the plan's), one row
        per sample where chunks were zoomed; region (B, 1, *S): the region the sample is about, if any."""
        head_inputs = None if self.refinement is None else self.refinement.head_inputs
        out, low, last = self._backbone(x, decoder_features=head_inputs == "decoder")
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        dram = outs[0]
        refined = head = None
        if self.refinement is not None:
            # the refinement reads the backbone's features and map but trains neither
            feats = x if low is None else torch.cat([x, low.detach().to(x.dtype)], dim=1)
            head_features = {None: None, "image": x, "encoder": feats,
                             "decoder": None if last is None else torch.cat([x, last.detach().to(x.dtype)], dim=1)
                             }[head_inputs]
            refined, head = self.refinement(dram.detach(), feats, x[:, :1],
                                            self.spacing_mm if spacing is None else spacing, region,
                                            head_features=head_features, return_head=True)
        if return_all:
            return {"dram": outs, "refined": refined, "head": head}
        return _two_channels(refined if refined is not None else dram)


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

    def forward(self, x: torch.Tensor, return_all: bool = False, spacing=None, region=None):
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
