"""Region pooling: the mean of a dense map inside a region mask.

This is the link between voxels and the weak label: the mean lesion probability over a lobe's voxels *is*
the lobe's predicted lesion fraction. Masks may be soft (values in [0, 1], e.g. after area-downsampling for
deep-supervision outputs); the mean is then weighted.

`pooled_log_fractions` gives log f and log(1 - f) from log-sigmoids (log-sum-exp over the region). A mean of
sigmoids whose every logit sits at -30 has a gradient of ~1e-13 per voxel: once a map is dead it stays dead. In the
log domain the gradient of log f is the softmax of the voxels' log-sigmoids, which sums to about 1 however far the
map has saturated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def region_mean(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Weighted mean of `values` (B, C, *S) over `mask` (B, 1, *S) -> (B, C). Empty masks give 0."""
    mask = mask.to(values.dtype)
    spatial = tuple(range(2, values.ndim))
    total = (values * mask).sum(spatial)
    weight = mask.sum(spatial)
    return total / weight.clamp_min(eps)


def resize_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """Region mask at another resolution as soft weights (area average keeps each region's share of a voxel)."""
    if tuple(mask.shape[2:]) == tuple(size):
        return mask
    mask = mask.float()
    if all(s_out <= s_in for s_out, s_in in zip(size, mask.shape[2:])):
        return F.adaptive_avg_pool3d(mask, size) if mask.ndim == 5 else F.adaptive_avg_pool2d(mask, size)
    mode = "trilinear" if mask.ndim == 5 else "bilinear"
    return F.interpolate(mask, size=size, mode=mode, align_corners=False)


def pooled_log_fractions(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log f, log(1 - f)) of the predicted region fraction f, each (B,), without saturating gradients."""
    z = logits.float()
    # outside voxels get a negligible weight instead of log(0) = -inf: no NaN for an empty mask, no effect otherwise
    log_w = torch.log(resize_mask(mask, z.shape[2:]).to(z.dtype).clamp_min(1e-30)).flatten(1)
    log_total = torch.logsumexp(log_w, 1)
    log_f = torch.logsumexp(F.logsigmoid(z).flatten(1) + log_w, 1) - log_total
    log_not_f = torch.logsumexp(F.logsigmoid(-z).flatten(1) + log_w, 1) - log_total
    return log_f, log_not_f


def pooled_fraction(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Predicted region fraction: mean of sigmoid(logits) over the region. (B, 1, *S) -> (B,)"""
    probs = torch.sigmoid(logits.float())
    return region_mean(probs, resize_mask(mask, probs.shape[2:]))[:, 0]
