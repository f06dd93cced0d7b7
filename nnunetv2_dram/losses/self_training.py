"""Per-voxel self-training of the refined map on the thresholded, detached dRAM inside the region.

The refinement (classifier head, attention, optionally a CRF) gets no voxel labels. Its target is the dRAM itself,
thresholded: inside the region, the voxels that the dRAM ranks highest become lesion, as many as the region's weak
label allows (`calibrated_targets`), the rest background; outside the region there is no target at all. A region
whose weak target is 0 % (CTSS 0) has no lesion voxel. The dRAM is detached: this loss trains the refinement only,
the dRAM learns from its region regression alone.

Three things keep the refinement from merely copying the dRAM's mistakes:
- class balance: in every sample the lesion and the background voxels carry half of that sample's loss each
  (lesion voxels are rare; without balance the refinement would learn to erase them);
- soft bootstrapping (Reed et al. 2015): the target is mixed with the refined map's own (detached) prediction,
  target = beta * dRAM label + (1 - beta) * q, so where the refinement is confident and the image supports it, it
  may overrule the dRAM's label;
- the classifier head does not see the dRAM: it must predict the label from the image (DRAMTrainer: each voxel's
  intensity), with one set of weights for every voxel of every case, so it learns what the dRAM's lesion voxels
  look like and scores by that also the voxels (and lesions) the dRAM missed. It gets this loss on its own logits:
  through the refined map, whose target is a threshold of the dRAM itself, it would learn next to nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def calibrated_targets(dram_logits: torch.Tensor, mask: torch.Tensor, interval: torch.Tensor,
                       threshold: float = 0.5) -> torch.Tensor:
    """Binary targets (B, 1, *S) from the dRAM: per sample, the dRAM at `threshold` inside the region where the
    region's lesion fraction then lies in its weak interval; otherwise the k most probable region voxels, k being the
    interval's nearest bound times the region's voxel count (the pseudo labels' calibrated threshold, on the chunk).
    Nothing outside the region, nothing in a region whose interval is [0, 0]. No host synchronisation."""
    p = torch.sigmoid(dram_logits.float())
    inside = mask > 0.5
    batch = p.shape[0]
    flat_p = torch.where(inside, p, torch.full_like(p, -1.0)).reshape(batch, -1)
    n = inside.reshape(batch, -1).sum(1)
    above = ((flat_p > threshold)).sum(1)
    low = interval[:, 0].to(p.dtype).clamp(0, 1)
    high = interval[:, 1].to(p.dtype).clamp(0, 1)
    fraction = above.to(p.dtype) / n.clamp_min(1).to(p.dtype)
    k = torch.round(torch.minimum(torch.maximum(fraction, low), high) * n.to(p.dtype)).long()
    ranked = flat_p.sort(dim=1, descending=True).values
    kth = ranked.gather(1, (k - 1).clamp_min(0)[:, None])[:, 0]
    cut = torch.where(k > 0, kth, torch.full_like(kth, 2.0))  # k = 0: nothing is lesion
    return ((flat_p >= cut[:, None]) & (flat_p >= 0)).reshape(p.shape)


@torch.no_grad()
def self_training_targets(dram_logits: torch.Tensor, mask: torch.Tensor,
                          interval: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(binary target, per-voxel weight) of the self-training loss, from the detached dRAM: `calibrated_targets`, and
    weights giving lesion and background voxels of the region half of each sample's loss each (with one class
    absent, every region voxel the same). Depends on the dRAM only, so one computation serves every map trained
    against it."""
    inside = (mask > 0.5).float()
    target = calibrated_targets(dram_logits.detach(), mask, interval).float()
    pos, neg = target * inside, (1 - target) * inside
    dims = tuple(range(1, target.ndim))
    n_pos = pos.sum(dims, keepdim=True)
    n_neg = neg.sum(dims, keepdim=True)
    n_inside = inside.sum(dims, keepdim=True)
    balanced = pos * (0.5 / n_pos.clamp_min(1)) + neg * (0.5 / n_neg.clamp_min(1))
    uniform = inside / n_inside.clamp_min(1)
    return target, torch.where((n_pos > 0) & (n_neg > 0), balanced, uniform)


def self_training_loss(refined_logits: torch.Tensor, dram_logits: torch.Tensor | None, mask: torch.Tensor | None,
                       interval: torch.Tensor | None, bootstrap: float = 0.8,
                       targets: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Class-balanced, bootstrapped cross-entropy of the refined map against `calibrated_targets` of the detached
    dRAM. refined_logits, dram_logits, mask: (B, 1, *S); interval: (B, 2) lesion fractions. `targets`: what
    `self_training_targets` returned for them (then dRAM, mask and interval are not read). Mean over the batch."""
    target, weight = self_training_targets(dram_logits, mask, interval) if targets is None else targets
    with torch.no_grad():
        q = torch.sigmoid(refined_logits.detach().float())
        soft_target = bootstrap * target + (1 - bootstrap) * q
    loss = F.binary_cross_entropy_with_logits(refined_logits.float(), soft_target, reduction="none")
    return (loss * weight).sum() / refined_logits.shape[0]
