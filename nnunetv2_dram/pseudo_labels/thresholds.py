"""From a lesion probability map to a binary pseudo label.

Four ways, all restricted to the regions (lesions outside the lungs do not exist):
- `midpoint` (default): per region, the weak label sets the lesion volume: the k most probable voxels, k being the
  middle of the target interval × the region's voxel count (the count of an exact percentage; nothing in a 0 %
  region). This is the one place where the weak labels of the training cases are used again, and it removes the
  map's calibration error (the regression only fits the mean, not the threshold). For interval targets such as
  CTSS it does not trust the map: the interval loss stops pulling a region's mean once it is inside the interval,
  and the map reaches the interval from below, so on the synthetic CTs the map's own share was 0.77-0.89x the true
  lesion volume, while the middle of the CTSS bands was 1.04x. It assumes a region's lesion fraction lies near the
  middle of its interval on average.
- `calibrated`: per region, the map at 0.5 is kept where its region fraction already lies inside the region's
  target interval; otherwise the k most probable voxels are taken, k being the interval's nearest bound × the
  region's voxel count. With exact percentages the same as `midpoint`; with intervals, the map's own estimate
  inside them (close to the lower bound, see above).
- `otsu`: Otsu's threshold over all region voxels (the authors' choice).
- a fixed number, e.g. 0.5.
An optional uncertainty band marks voxels whose probability is close to their region's effective threshold
as nnU-Net's `ignore` label, so the final network is not trained on the least certain decisions.
"""
from __future__ import annotations

import numpy as np

from nnunetv2_dram.weak_labels.format import RegionTarget

#: the rule of every command and option that makes pseudo labels, unless told otherwise
DEFAULT_THRESHOLD = "midpoint"

LESION, IGNORE = 1, 2


def _top_k(p: np.ndarray, k: int, tie_break: np.ndarray | None = None) -> np.ndarray:
    sel = np.zeros(p.shape, dtype=bool)
    if k > 0:
        # highest p first; among equal p the higher tie_break, then the position (deterministic either way): a CRF
        # saturates many voxels at exactly the same value, and raster order would then pick the top slices first
        keys = (-p,) if tie_break is None else (-np.asarray(tie_break), -p)
        order = np.lexsort(keys)
        sel[order[:k]] = True
    return sel


def threshold_region(p: np.ndarray, target: RegionTarget | None, default: float = 0.5,
                     tie_break: np.ndarray | None = None, midpoint: bool = False) -> tuple[np.ndarray, float]:
    """Binary selection of one region's voxels (1-D probabilities) and the effective threshold used. tie_break
    (same shape): decides between voxels of equal p in the top-k selection (e.g. the map before a CRF). midpoint:
    the count is always the middle of the target interval, not the map at `default` where that fits."""
    n = p.size
    if n == 0:
        return np.zeros(0, dtype=bool), default
    if target is None:
        return p > default, default
    low, high = target.fraction_interval
    if midpoint:
        share = 0.5 * (low + high)
    else:
        sel = p > default
        share = float(sel.mean())
        if low <= share <= high:
            return sel, default
        share = min(max(share, low), high)
    k = int(round(share * n))
    sel = _top_k(p, k, tie_break)
    if k == 0:
        return sel, 1.0
    return sel, float(p[sel].min())


def pseudo_label(prob: np.ndarray, regions: np.ndarray, method: str | float = DEFAULT_THRESHOLD,
                 targets: dict[int, RegionTarget] | None = None, ignore_band: float = 0.0,
                 tie_break: np.ndarray | None = None) -> np.ndarray:
    """uint8 label map (0 background, 1 lesion, 2 ignore) of the same shape as `prob`; tie_break (same shape, e.g.
    the map before the CRF) orders voxels of equal probability in the calibrated selection."""
    targets = targets or {}
    out = np.zeros(prob.shape, dtype=np.uint8)
    labels = [int(r) for r in np.unique(regions) if r > 0]
    if method == "otsu":
        from skimage.filters import threshold_otsu
        inside = prob[regions > 0]
        fixed = float(threshold_otsu(inside)) if inside.size and inside.min() < inside.max() else 0.5
    elif method in ("calibrated", "midpoint"):
        fixed = None
    else:
        fixed = float(method)
    for r in labels:
        m = regions == r
        p = prob[m]
        if fixed is None:
            sel, thr = threshold_region(p, targets.get(r), tie_break=None if tie_break is None else tie_break[m],
                                        midpoint=method == "midpoint")
        else:
            sel, thr = p > fixed, fixed
        lab = sel.astype(np.uint8)
        t = targets.get(r)
        certain_empty = t is not None and t.high <= 0
        if ignore_band > 0 and not certain_empty:
            lab[np.abs(p - thr) < ignore_band] = IGNORE
        out[m] = lab
    return out
