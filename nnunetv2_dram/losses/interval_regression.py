"""Regression of a pooled fraction onto a weak target interval.

Every weak target is an interval [low, high] of the region's lesion fraction (docs/reference.md, "weak_labels.json"): an exact percentage is a
zero-width interval, a CT severity score its band. The loss is zero inside the interval and grows linearly
outside it, so an exact target reduces to the absolute error |p - t| and a CTSS target only pushes a prediction
that left its band (the role of the authors' max(0, (p - lo)(p - hi)) hinge, but with a gradient that does
not vanish near narrow bands, which matters for the many 0 % lobes whose band is the single point 0).

Saturation. A pooled fraction f is a mean of sigmoids; when a map goes dead (every logit far below 0, which nnU-Net's
learning rate caused in one of three seeds on small data) the linear hinge's gradient w.r.t. the logits vanishes
with the sigmoid's and the map never recovers. Given log f and log(1 - f) (`pooled_log_fractions`), the loss
continues the hinge in the log domain instead:

    below the interval:  low * log(low / f)                   above it:  (1 - high) * log((1 - high) / (1 - f))

Both are zero at the interval's edge with slope -1 / +1 there, i.e. the linear hinge to first order (the same loss
near the target, never smaller: low * log(low / f) >= low - f), but their gradient w.r.t. the logits no longer
vanishes when f -> 0 or f -> 1: it is low (or 1 - high) times a softmax over the region's voxels.
"""
from __future__ import annotations

import torch


def interval_distance(pred: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """How far each prediction lies outside its interval (0 inside). All (B,)."""
    return torch.relu(low - pred) + torch.relu(pred - high)


def log_interval_distance(log_pred: torch.Tensor, log_not_pred: torch.Tensor, low: torch.Tensor,
                          high: torch.Tensor) -> torch.Tensor:
    """The log-domain continuation of `interval_distance` (module docstring) from log f and log(1 - f). All (B,)."""
    log_pred, log_not_pred = log_pred.clamp_min(-1e4), log_not_pred.clamp_min(-1e4)  # 0 * inf must not be NaN
    below = low * torch.relu(torch.log(low.clamp_min(1e-12)) - log_pred)
    above = (1 - high) * torch.relu(torch.log((1 - high).clamp_min(1e-12)) - log_not_pred)
    return below + above


def interval_regression_loss(pred: torch.Tensor, interval: torch.Tensor, weights: torch.Tensor | None = None,
                             band: float = 0.0, log_pred: tuple[torch.Tensor, torch.Tensor] | None = None
                             ) -> torch.Tensor:
    """Mean hinge distance of `pred` (B,) to `interval` (B, 2); `band` widens every interval by a tolerance
    (fraction units) so that label noise of a percent or so is not fitted. With `log_pred` = (log f, log(1 - f)) the
    hinge is continued in the log domain (module docstring) and `pred` is not used."""
    low = (interval[:, 0] - band).clamp_min(0).float()
    high = (interval[:, 1] + band).clamp_max(1).float()
    if log_pred is None:
        d = interval_distance(pred.float(), low, high)
    else:
        d = log_interval_distance(log_pred[0].float(), log_pred[1].float(), low, high)
    if weights is None:
        return d.mean()
    weights = weights.to(d.dtype)
    return (d * weights).sum() / weights.sum().clamp_min(1e-6)
