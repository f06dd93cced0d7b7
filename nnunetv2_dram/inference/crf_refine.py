"""One entry point for dense-CRF refinement of a foreground probability map at inference time.

Two backends share the physical parameters (millimetre kernels, intensity_sigma in image units, Potts weights on
symmetrically normalised kernels):

* "pydensecrf": the fully connected CRF (permutohedral lattice) on the CPU; needs the optional pydensecrf module.
* "torch": TrainableDenseCRF with fixed weights (local-window bilateral approximation, see its module docstring),
  no gradients, over overlapping tiles so memory stays bounded; runs on any torch device.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

BACKENDS = ("pydensecrf", "torch")
#: parameters both backends take, with their defaults.
DEFAULT_CRF_PARAMS = {
    "spatial_sigma_mm": 3.0,
    "bilateral_sigma_mm": 8.0,
    "intensity_sigma": 0.15,
    "w_spatial": 3.0,
    "w_bilateral": 5.0,
    "iterations": 5,
}
#: parameters only the torch backend takes (tiling and bilateral window).
TORCH_ONLY_PARAMS = ("window", "max_tile_voxels", "halo")
_PROB_CLIP = 1e-5  # as pydensecrf's unary_from_softmax, so both backends see the same unaries


def refine_probability(prob: np.ndarray, image: np.ndarray, spacing: Sequence[float], backend: str = "pydensecrf",
                       device: str = "cpu", mask: np.ndarray | None = None, memory_share: float = 1.0,
                       **crf_params) -> np.ndarray:
    """Refined foreground probability (float32, prob's shape) of a 2-D or 3-D map.

    prob: foreground probability. image: guidance intensities of the same shape (in the units of intensity_sigma).
    spacing: mm per axis in the arrays' axis order. mask: optional boolean array; outside voxels come back as 0 and
    pass no messages. crf_params: any of DEFAULT_CRF_PARAMS; with backend="torch" also window, halo and
    max_tile_voxels (default: sized from free GPU memory on CUDA, 2^22 voxels per tile on the CPU). memory_share:
    the part of that GPU default one call may take, for processes that share a GPU (1 / their number).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown CRF backend {backend!r}; choose one of {BACKENDS}")
    unknown = set(crf_params) - set(DEFAULT_CRF_PARAMS) - set(TORCH_ONLY_PARAMS)
    if unknown:
        raise TypeError(f"unknown CRF parameter(s) {sorted(unknown)}; known: "
                        f"{sorted(DEFAULT_CRF_PARAMS) + list(TORCH_ONLY_PARAMS)}")
    params = {**DEFAULT_CRF_PARAMS, **crf_params}
    if backend == "pydensecrf":
        torch_only = sorted(set(crf_params) & set(TORCH_ONLY_PARAMS))
        if torch_only:
            raise TypeError(f"parameter(s) {torch_only} only apply to backend='torch'")
        if str(device) != "cpu":
            raise ValueError(f"backend 'pydensecrf' runs on the CPU only; got device={device!r} "
                             f"(use backend='torch' for a GPU)")
        from nnunetv2_dram.inference.dense_crf_cpu import dense_crf_pydensecrf
        return dense_crf_pydensecrf(prob, image, spacing, mask=mask, clip=_PROB_CLIP, **params)
    return _refine_torch(prob, image, spacing, device, mask, params, memory_share)


def _refine_torch(prob, image, spacing, device, mask, params, memory_share: float = 1.0) -> np.ndarray:
    import torch

    from nnunetv2_dram.building_blocks.dense_crf import TrainableDenseCRF

    prob = np.asarray(prob, dtype=np.float32)
    image = np.asarray(image, dtype=np.float32)
    if prob.ndim not in (2, 3) or image.shape != prob.shape:
        raise ValueError(f"prob must be 2-D or 3-D and image of the same shape; got {prob.shape} and {image.shape}")
    if mask is not None and np.shape(mask) != prob.shape:
        raise ValueError(f"mask must have the shape of prob {prob.shape}; got {np.shape(mask)}")
    if not np.all(np.isfinite(prob)) or not np.all(np.isfinite(image)):
        raise ValueError("prob and image must be finite (no NaN/inf)")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != prob.ndim:
        raise ValueError(f"spacing must have {prob.ndim} entries (mm per axis); got {spacing}")
    max_tile_voxels = params.pop("max_tile_voxels", None)
    halo = params.pop("halo", None)
    crf = TrainableDenseCRF(prob.ndim, learnable=False, **params)
    device = torch.device(device)
    if max_tile_voxels is None:
        max_tile_voxels = _default_tile_voxels(crf, device, memory_share)

    clipped = np.clip(prob, _PROB_CLIP, 1.0 - _PROB_CLIP)
    logits = torch.from_numpy(np.log(clipped) - np.log1p(-clipped))[None, None]
    guide = torch.from_numpy(image)[None, None]
    mask_tensor = None if mask is None else torch.from_numpy(np.asarray(mask).astype(np.float32))[None, None]
    refined = crf.refine_large(logits, guide, spacing, mask_tensor, device=device, halo=halo,
                               max_tile_voxels=int(max_tile_voxels))
    return torch.sigmoid(refined)[0, 0].numpy().astype(np.float32)


def _default_tile_voxels(crf, device, memory_share: float = 1.0) -> int:
    """Voxels per tile: 2^22 (~1.2 GiB) on the CPU; on CUDA as many as ~40% (x memory_share) of the free memory
    holds."""
    import torch

    if device.type != "cuda":
        return 2 ** 22
    free_bytes, _ = torch.cuda.mem_get_info(device)
    stored_offsets = ((2 * crf.window + 1) ** crf.dim - 1) // 2
    bytes_per_voxel = 4 * (stored_offsets + 16)
    return max(2 ** 18, int(0.4 * memory_share * free_bytes / bytes_per_voxel))
