"""Regression of a pooled fraction onto a weak target interval.

Every weak target is an interval [low, high] of the region's lesion fraction (SPEC §1): an exact percentage is a
zero-width interval, a CT severity score its band. The loss is zero inside the interval and grows linearly
outside it, so an exact target reduces to the absolute error |p - t| and a CTSS target only pushes a prediction
that left its band (the role of the authors' max(0, (p - lo)(p - hi)) hinge, but with a gradient that does
not vanish near narrow bands, which matters for the many 0 % lobes whose band is the single point 0).
"""
from __future__ import annotations

import torch


def interval_distance(pred: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """How far each prediction lies outside its interval (0 inside). All (B,)."""
    return torch.relu(low - pred) + torch.relu(pred - high)


def interval_regression_loss(pred: torch.Tensor, interval: torch.Tensor, weights: torch.Tensor | None = None,
                             band: float = 0.0) -> torch.Tensor:
    """Mean hinge distance of `pred` (B,) to `interval` (B, 2); `band` widens every interval by a tolerance
    (fraction units) so that label noise of a percent or so is not fitted."""
    low = (interval[:, 0] - band).clamp_min(0)
    high = (interval[:, 1] + band).clamp_max(1)
    d = interval_distance(pred.float(), low.float(), high.float())
    if weights is None:
        return d.mean()
    weights = weights.to(d.dtype)
    return (d * weights).sum() / weights.sum().clamp_min(1e-6)
