"""CPU fully connected CRF (pydensecrf) and the refine_probability entry point."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from nnunetv2_dram.inference.crf_refine import refine_probability
from nnunetv2_dram.inference.dense_crf_cpu import dense_crf_pydensecrf


def _noisy_blob(shape, seed, spacing=None):
    """Ellipsoid lesion (round in mm when spacing is given), a clean guide image, a noisy probability map."""
    rng = np.random.default_rng(seed)
    spacing = spacing or (1.0,) * len(shape)
    axes = [(np.arange(s) - (s - 1) / 2) * sp for s, sp in zip(shape, spacing)]
    grids = np.meshgrid(*axes, indexing="ij")
    radius = 0.35 * min(s * sp for s, sp in zip(shape, spacing))
    blob = sum(g ** 2 for g in grids) < radius ** 2
    image = (0.6 * blob + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    prob = np.clip(0.15 + 0.7 * blob + 0.4 * rng.standard_normal(shape), 0.0, 1.0).astype(np.float32)
    return blob, image, prob


def _dice(a, b) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _iou(a, b) -> float:
    return float((a & b).sum() / (a | b).sum())


needs_pydensecrf = pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None,
                                      reason='pydensecrf not installed (pip install "nnunetv2_dram[crf]")')


@needs_pydensecrf
@pytest.mark.parametrize("shape,spacing", [((48, 48), (1.0, 1.0)), ((16, 32, 32), (2.0, 1.0, 1.0))])
def test_pydensecrf_cleans_a_noisy_blob(shape, spacing):
    blob, image, prob = _noisy_blob(shape, seed=0, spacing=spacing)
    refined = dense_crf_pydensecrf(prob, image, spacing)
    assert refined.shape == prob.shape and refined.dtype == np.float32
    assert np.all((refined >= 0) & (refined <= 1))
    before, after = _dice(prob > 0.5, blob), _dice(refined > 0.5, blob)
    assert before < 0.8 and after > 0.9


@needs_pydensecrf
def test_anisotropic_spacing_is_used_in_millimetres():
    spacing = (4.0, 1.0, 1.0)
    blob, image, prob = _noisy_blob((12, 40, 40), seed=1, spacing=spacing)
    aniso = dense_crf_pydensecrf(prob, image, spacing)
    iso = dense_crf_pydensecrf(prob, image, (1.0, 1.0, 1.0))
    assert _dice(aniso > 0.5, blob) > 0.9
    assert np.abs(aniso - iso).max() > 0.05
    # 4 copies of each slice at 1 mm describe the same physical volume as 4 mm slices
    thin = dense_crf_pydensecrf(np.repeat(prob, 4, 0), np.repeat(image, 4, 0), (1.0, 1.0, 1.0))[1::4]
    assert np.abs(thin - aniso).mean() < 0.5 * np.abs(iso - aniso).mean()


@needs_pydensecrf
def test_mask_excludes_outside_voxels():
    spacing = (3.0, 1.0, 1.0)
    blob, image, prob = _noisy_blob((10, 32, 32), seed=2, spacing=spacing)
    mask = np.zeros(prob.shape, bool)
    mask[:, 4:28, 4:20] = True
    refined = dense_crf_pydensecrf(prob, image, spacing, mask=mask)
    assert np.all(refined[~mask] == 0)
    # outside voxels pass no messages: changing them leaves the inside untouched
    prob2, image2 = prob.copy(), image.copy()
    prob2[~mask], image2[~mask] = 1.0, 5.0
    refined2 = dense_crf_pydensecrf(prob2, image2, spacing, mask=mask)
    assert np.allclose(refined[mask], refined2[mask], atol=1e-5)
    assert _dice(refined[mask] > 0.5, blob[mask]) > 0.85
    assert np.all(dense_crf_pydensecrf(prob, image, spacing, mask=np.zeros_like(mask)) == 0)


def test_missing_pydensecrf_gives_an_actionable_error(monkeypatch):
    # a None entry in sys.modules makes `import pydensecrf.densecrf` raise ImportError
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.utils", None)
    blob, image, prob = _noisy_blob((8, 8), seed=3)
    with pytest.raises(ImportError, match=r"pip install pydensecrf2==1\.1") as info:
        refine_probability(prob, image, (1.0, 1.0), backend="pydensecrf")
    assert "nnunetv2_dram[crf]" in str(info.value) and "Cython 3" in str(info.value)
    # the torch backend does not need it
    refined = refine_probability(prob, image, (1.0, 1.0), backend="torch")
    assert refined.shape == prob.shape


@needs_pydensecrf
@pytest.mark.parametrize("shape,spacing", [((64, 64), (1.0, 1.0)), ((16, 40, 40), (2.0, 1.0, 1.0))])
def test_torch_and_pydensecrf_backends_agree(shape, spacing):
    blob, image, prob = _noisy_blob(shape, seed=4, spacing=spacing)
    params = dict(spatial_sigma_mm=3.0, bilateral_sigma_mm=6.0, intensity_sigma=0.15, iterations=5)
    fully_connected = refine_probability(prob, image, spacing, backend="pydensecrf", **params)
    local_window = refine_probability(prob, image, spacing, backend="torch", device="cpu", **params)
    assert _iou(fully_connected > 0.5, local_window > 0.5) > 0.8
    assert _dice(local_window > 0.5, blob) > _dice(prob > 0.5, blob) + 0.1


def test_refine_probability_validates_its_arguments():
    blob, image, prob = _noisy_blob((8, 8), seed=5)
    with pytest.raises(ValueError, match="backend"):
        refine_probability(prob, image, (1.0, 1.0), backend="permutohedral")
    with pytest.raises(TypeError, match="unknown CRF parameter"):
        refine_probability(prob, image, (1.0, 1.0), sigma=3)
    with pytest.raises(TypeError, match="only apply to backend='torch'"):
        refine_probability(prob, image, (1.0, 1.0), backend="pydensecrf", window=2)
    with pytest.raises(ValueError, match="CPU only"):
        refine_probability(prob, image, (1.0, 1.0), backend="pydensecrf", device="cuda")
    with pytest.raises(ValueError, match="spacing"):
        refine_probability(prob, image, (1.0, 1.0, 1.0), backend="pydensecrf")
    with pytest.raises(ValueError, match="shape"):
        refine_probability(prob, image[:4], (1.0, 1.0), backend="torch")


def test_pseudo_label_crf_runs_on_the_maps_device(monkeypatch):
    """auto = the torch CRF on the GPU when the maps are made on one (it used to run the torch CRF on the CPU
    there), else pydensecrf when installed, else torch on the CPU; an explicit backend is kept."""
    from nnunetv2_dram.pseudo_labels.generate import crf_backend_and_device
    assert crf_backend_and_device("auto", "cuda") == ("torch", "cuda")
    assert crf_backend_and_device("auto", "cuda:1") == ("torch", "cuda:1")
    assert crf_backend_and_device("torch", "cuda") == ("torch", "cuda")
    assert crf_backend_and_device("torch", "cpu") == ("torch", "cpu")
    assert crf_backend_and_device("pydensecrf", "cuda") == ("pydensecrf", "cpu")
    if importlib.util.find_spec("pydensecrf") is not None:
        assert crf_backend_and_device("auto", "cpu") == ("pydensecrf", "cpu")
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    assert crf_backend_and_device("auto", "cpu") == ("torch", "cpu")
