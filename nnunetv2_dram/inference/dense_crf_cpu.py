"""Fully connected binary CRF on the CPU through pydensecrf (Kraehenbuehl & Koltun's permutohedral densecrf).

Same physical parameters as the torch CRF (nnunetv2_dram.building_blocks.dense_crf): kernel widths in millimetres
become per-axis feature scalings sdims = sigma_mm / spacing_mm, `intensity_sigma` is in the image's units, and the
Potts weights `w_spatial` / `w_bilateral` act on symmetrically normalised kernels (densecrf's default
NORMALIZE_SYMMETRIC), which is the normalisation the torch CRF reproduces. pydensecrf's utilities build features for
any number of dimensions, so 2-D slices and 3-D volumes go through the same code.

A mask is honoured exactly: only voxels inside it become CRF nodes (their feature columns), so outside voxels neither
send nor receive messages, and they come back as background (probability 0). This also makes lung-masked CT volumes
several times cheaper.

Memory: the feature arrays are float32 (dim + dim + 1 rows per voxel) plus densecrf's lattice, roughly 60-100 bytes
per voxel; a 300 x 512 x 512 CT without a mask needs several GB.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

INSTALL_HINT = ('the CPU dense CRF needs the pydensecrf module: pip install pydensecrf2==1.1 '
                '(or pip install "nnunetv2_dram[crf]"). The original pydensecrf 1.0rc3 on PyPI does not build '
                'under Cython 3; pydensecrf2 is a maintained build that imports as `pydensecrf`. '
                'Alternatively use the torch backend (backend="torch").')


def import_pydensecrf():
    """(densecrf module, utils module), or ImportError with the install hint."""
    try:
        import pydensecrf.densecrf as densecrf
        import pydensecrf.utils as utils
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return densecrf, utils


def _check_inputs(prob: np.ndarray, image: np.ndarray, spacing, mask) -> tuple[float, ...]:
    if prob.ndim not in (2, 3):
        raise ValueError(f"prob must be a 2-D or 3-D array; got shape {prob.shape}")
    if image.shape != prob.shape:
        raise ValueError(f"image must have the shape of prob {prob.shape}; got {image.shape}")
    if mask is not None and np.shape(mask) != prob.shape:
        raise ValueError(f"mask must have the shape of prob {prob.shape}; got {np.shape(mask)}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != prob.ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing must be {prob.ndim} positive floats (mm per axis, in the array's axis order); "
                         f"got {spacing}")
    if not np.all(np.isfinite(prob)) or not np.all(np.isfinite(image)):
        raise ValueError("prob and image must be finite (no NaN/inf)")
    return spacing


def dense_crf_pydensecrf(prob: np.ndarray, image: np.ndarray, spacing: Sequence[float],
                         spatial_sigma_mm: float = 3.0, bilateral_sigma_mm: float = 8.0, intensity_sigma: float = 0.15,
                         w_spatial: float = 3.0, w_bilateral: float = 5.0, iterations: int = 5,
                         mask: np.ndarray | None = None, clip: float = 1e-5) -> np.ndarray:
    """Refined foreground probability (float32, prob's shape) from a fully connected mean-field CRF.

    prob: foreground probability per voxel (2-D or 3-D). image: guidance intensities, same shape, in the units of
    `intensity_sigma`. spacing: mm per axis in the arrays' axis order. mask: optional boolean array; outside voxels
    are returned as 0 and take no part. clip: probabilities are clipped to [clip, 1] before -log (as pydensecrf's
    unary_from_softmax does).
    """
    prob = np.asarray(prob, dtype=np.float32)
    image = np.asarray(image, dtype=np.float32)
    spacing = _check_inputs(prob, image, spacing, mask)
    for name, value in (("spatial_sigma_mm", spatial_sigma_mm), ("bilateral_sigma_mm", bilateral_sigma_mm),
                        ("intensity_sigma", intensity_sigma)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive finite number, got {value}")
    if w_spatial < 0 or w_bilateral < 0 or iterations < 0:
        raise ValueError("w_spatial, w_bilateral and iterations must be >= 0")
    densecrf, utils = import_pydensecrf()

    inside = np.ones(prob.shape, dtype=bool) if mask is None else np.asarray(mask).astype(bool)
    flat_inside = inside.ravel()
    n_nodes = int(flat_inside.sum())
    result = np.zeros(prob.shape, dtype=np.float32)
    if n_nodes == 0:
        return result

    foreground = np.clip(prob, 0.0, 1.0).ravel()[flat_inside]
    softmax = np.stack([1.0 - foreground, foreground]).astype(np.float32)
    crf = densecrf.DenseCRF(n_nodes, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(utils.unary_from_softmax(softmax, clip=clip)))

    def node_columns(features: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(features if mask is None else features[:, flat_inside], dtype=np.float32)

    if w_spatial > 0:
        spatial_scale = [spatial_sigma_mm / s for s in spacing]
        crf.addPairwiseEnergy(node_columns(utils.create_pairwise_gaussian(spatial_scale, prob.shape)),
                              compat=float(w_spatial))
    if w_bilateral > 0:
        bilateral_scale = [bilateral_sigma_mm / s for s in spacing]
        features = utils.create_pairwise_bilateral(bilateral_scale, (float(intensity_sigma),), image, chdim=-1)
        crf.addPairwiseEnergy(node_columns(features), compat=float(w_bilateral))

    marginals = np.array(crf.inference(int(iterations)), dtype=np.float32)
    result.ravel()[flat_inside] = marginals[1]
    return result
