"""Self-training of the refined map on confident voxels of the (detached) raw dRAM.

The refinement modules (attention, CRF) get no voxel labels. Following the seed, the raw dRAM thresholded at 0.5
serves as their target, but only where it is confident, balanced between the two classes (lesion voxels are
rare), with soft bootstrapping (the target is mixed with the refined map's own prediction) so that
the refinement may overrule the dRAM where the image says otherwise. Regions whose weak target is exactly 0 %
get an all-background target: there the weak label is stronger than the map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def self_training_loss(refined_logits: torch.Tensor, dram_logits: torch.Tensor, mask: torch.Tensor,
                       interval: torch.Tensor, threshold: float = 0.5, confidence: float = 0.2,
                       bootstrap: float = 0.9) -> torch.Tensor:
    """refined_logits, dram_logits, mask: (B, 1, *S); interval: (B, 2) fractions."""
    with torch.no_grad():
        p = torch.sigmoid(dram_logits.float())
        target = (p > threshold).float()
        zero_region = (interval[:, 1] <= 0).view(-1, *([1] * (p.ndim - 1)))
        target = torch.where(zero_region, torch.zeros_like(target), target)
        confident = ((p - threshold).abs() > confidence) | zero_region
        valid = (mask > 0.5) & confident
        pos = (target > 0.5) & valid
        neg = (target <= 0.5) & valid
        n_pos, n_neg = pos.sum(), neg.sum()
        # each class carries half of the loss, whatever its voxel count; with one class absent, every valid voxel
        # the same (torch.where, not `if`: a Python branch on a GPU value would stall the CPU every step)
        balanced = pos.float() * (0.5 / n_pos.clamp_min(1)) + neg.float() * (0.5 / n_neg.clamp_min(1))
        uniform = valid.float() / valid.sum().clamp_min(1)
        weight = torch.where((n_pos > 0) & (n_neg > 0), balanced, uniform)
        q = torch.sigmoid(refined_logits.float()).detach()
        soft_target = bootstrap * target + (1 - bootstrap) * q
    loss = F.binary_cross_entropy_with_logits(refined_logits.float(), soft_target, reduction="none")
    return (loss * weight).sum()
