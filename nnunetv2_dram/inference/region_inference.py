"""Run a trained dRAM/CAM network the way it was trained: region by region, each region fitted into a chunk.

The chunk maps are pasted back into the case's preprocessed grid (inside each region only), which is what
nnU-Net's own export then resamples to the original image geometry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from nnunetv2_dram.building_blocks.region_pooling import region_mean
from nnunetv2_dram.training.region_chunks import ChunkSpec, RegionSample, extract_chunk, paste_chunk

def lesion_logits(network, x: torch.Tensor, kind: str = "final", spacing=None, region: torch.Tensor | None = None,
                  without_voxelwise_head: bool = False) -> torch.Tensor:
    """Full-resolution single-channel lesion logits of a DenseRegressionNetwork or ClassActivationNetwork; spacing
    (mm per axis of x's grid, one row per sample) and region (B, 1, *S) go to the refinement, as in training.
    without_voxelwise_head: the refined map less its voxelwise head's logits (the caller adds them on a finer grid)."""
    out = network(x, return_all=True, spacing=spacing, region=region)
    if "cam" in out:
        mode = "trilinear" if x.ndim == 5 else "bilinear"
        return torch.nn.functional.interpolate(out["cam"], size=x.shape[2:], mode=mode, align_corners=False)
    if kind in ("final", "refined") and out.get("refined") is not None:
        if without_voxelwise_head:
            return out["refined"] - out["head"]
        return out["refined"]
    if kind == "refined":
        raise ValueError("this network has no refinement modules (trained with DRAMTrainerNoRefine?)")
    return out["dram"][0]


@dataclass
class CasePrediction:
    probability: np.ndarray  # lesion probability in the case's grid (network axes), 0 outside the regions
    fractions: dict = field(default_factory=dict)  # region -> pooled predicted fraction (as trained)


@torch.no_grad()
def predict_case_by_regions(network, data, seg, samples: Sequence[RegionSample], spec: ChunkSpec,
                            device: torch.device, kind: str = "final", mirror_axes: Sequence[int] = (),
                            batch_size: int = 2) -> CasePrediction:
    """data (C, Z, Y, X), seg (1, Z, Y, X) preprocessed arrays of one case; samples: its regions.

    A refinement whose head is voxelwise (DRAMRefinement.voxelwise_head) gets its head evaluated on the case's grid
    instead of the chunks': the chunks are zoomed to fit the patch, so a map computed on them is coarser than the
    case; the head needs only each voxel's intensities and adds them at the case's own resolution."""
    network.eval()
    refinement = getattr(network, "refinement", None)
    voxelwise = kind in ("final", "refined") and refinement is not None and refinement.voxelwise_head
    seg_np = np.asarray(seg[:])
    two_d = len(spec.chunk_size) == 2
    grid = seg_np[0, 0] if two_d else seg_np[0]
    prob = np.zeros(grid.shape, dtype=np.float32)
    fractions = {}
    samples = list(samples)
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        chunks = [extract_chunk(data, seg_np, s, spec) for s in batch]
        x = torch.stack([c[0] for c in chunks]).to(device)
        m = torch.stack([c[1] for c in chunks]).to(device)
        spacing = [spec.chunk_spacing(c[2]) for c in chunks] if spec.spacing is not None else None
        dev_ctx = torch.autocast(device.type, enabled=True) if device.type == "cuda" else _null()
        with dev_ctx:
            logits = lesion_logits(network, x, kind, spacing, m, voxelwise).float()
            if mirror_axes:  # test-time mirroring, as nnU-Net's predictor does
                n = 1
                for axis in mirror_axes:
                    d = [axis + 2]
                    logits = logits + lesion_logits(network, x.flip(d), kind, spacing, m.flip(d),
                                                    voxelwise).float().flip(d)
                    n += 1
                logits = logits / n
        p = torch.sigmoid(logits)
        pooled = region_mean(p, m)[:, 0].cpu().numpy()
        for s, (img, reg, placement, _), pm, frac in zip(batch, chunks, p.cpu(), pooled):
            fractions[s.region] = float(frac)
            paste_chunk(pm, placement, grid == s.region, prob)
    if voxelwise:
        image = torch.from_numpy(np.asarray(data[:], dtype=np.float32)).to(device)
        head = refinement.voxelwise_head_logits(image[:, 0] if two_d else image)
        base = torch.logit(torch.from_numpy(prob).to(device).clamp(1e-6, 1 - 1e-6))
        prob = np.where(grid > 0, torch.sigmoid(base + head).cpu().numpy(), 0).astype(np.float32)
        fractions = {r: float(prob[grid == r].mean()) for r in fractions}
    return CasePrediction(prob, fractions)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def fill_outside_regions(prob: np.ndarray, inside: np.ndarray, spacing=None) -> np.ndarray:
    """`prob` with every voxel outside the regions set to the value of the nearest region voxel.

    Maps are 0 outside the regions. Resampled to another grid as they are, every region voxel next to the border
    would be averaged with those zeros and damped: sub-pleural lesions would fade. Extended outwards first, a
    region voxel keeps its own value; the caller masks the outside again on the new grid."""
    from scipy import ndimage
    inside = np.asarray(inside, dtype=bool)
    if inside.all() or not inside.any():
        return prob
    sampling = None
    if spacing is not None:  # mm per axis; a single-slice axis in front of a 2-D spacing counts as 1 mm
        sampling = [1.0] * max(0, inside.ndim - len(spacing)) + [float(s) for s in spacing][-inside.ndim:]
    nearest = ndimage.distance_transform_edt(~inside, sampling=sampling, return_distances=False, return_indices=True)
    return prob[tuple(nearest)]

