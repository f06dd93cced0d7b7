"""TrainableDenseCRF: energy descent, gradients, millimetre kernels, denoising, mask, tiling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunetv2_dram.building_blocks.dense_crf import (OUTSIDE_MASK_LOGIT, TrainableDenseCRF, crf_energy,
                                                     psd_gaussian_taps)


def _blob_case(shape, seed, noise=1.5, radius2=0.35):
    """A sphere/disc lesion: a clean guide image and noisy unary logits."""
    generator = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    blob = (sum(g ** 2 for g in grids) < radius2).float()
    guide = (0.6 * blob + 0.05 * torch.randn(shape, generator=generator))[None, None]
    logits = ((2 * blob - 1) * 1.0 + noise * torch.randn(shape, generator=generator))[None, None]
    return blob.bool(), guide, logits


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize("dim,shape", [(2, (40, 36)), (3, (12, 20, 18))])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mean_field_steps_never_increase_the_free_energy(dim, shape, seed):
    torch.manual_seed(seed)
    crf = TrainableDenseCRF(dim, iterations=0, spatial_sigma_mm=2.0, bilateral_sigma_mm=4.0, intensity_sigma=0.3)
    logits = 2.0 * torch.randn(2, 1, *shape)
    guide = torch.rand(2, 1, *shape)
    spacing = [1.5] + [1.0] * (dim - 1)
    with torch.no_grad():
        energies = [crf.energy(torch.sigmoid(logits), logits, guide, spacing)]
        for iterations in range(1, 7):
            crf.iterations = iterations
            refined = crf(logits, guide, spacing)
            energies.append(crf.energy(torch.sigmoid(refined), logits, guide, spacing))
    energies = torch.stack(energies)  # (steps, B)
    assert torch.all(energies[-1] < energies[0] - 1.0)
    # PSD kernels + Potts make every parallel step a concave-convex step (monotone up to float rounding)
    steps = energies[1:] - energies[:-1]
    assert torch.all(steps <= 1e-4 * energies.abs().max())


def test_crf_energy_function_matches_method_and_prefers_the_fixed_point():
    torch.manual_seed(3)
    logits, guide = torch.randn(1, 1, 24, 24), torch.rand(1, 1, 24, 24)
    crf = TrainableDenseCRF(2, iterations=8)
    with torch.no_grad():
        q_star = torch.sigmoid(crf(logits, guide, (1.0, 1.0)))
        by_function = crf_energy(q_star, logits, guide, (1.0, 1.0), crf=crf)
        by_method = crf.energy(q_star, logits, guide, (1.0, 1.0))
        fresh = crf_energy(q_star, logits, guide, (1.0, 1.0), iterations=8)
        perturbed = crf.energy((q_star + 0.2 * torch.rand_like(q_star)).clamp(0, 1), logits, guide, (1.0, 1.0))
    assert torch.allclose(by_function, by_method) and torch.allclose(by_function, fresh)
    assert float(by_method) < float(perturbed)


@pytest.mark.parametrize("dim,shape", [(2, (10, 12)), (3, (5, 6, 7))])
def test_custom_backward_matches_numerical_gradient(dim, shape):
    torch.manual_seed(0)
    crf = TrainableDenseCRF(dim, iterations=2, spatial_sigma_mm=1.5, bilateral_sigma_mm=2.5, intensity_sigma=0.4)
    crf.double()
    logits = torch.randn(1, 1, *shape, dtype=torch.float64, requires_grad=True)
    guide = torch.rand(1, 1, *shape, dtype=torch.float64)
    mask = torch.ones(1, 1, *shape, dtype=torch.float64)
    mask[..., 0] = 0
    spacing = [1.0, 0.8, 1.3][:dim]
    assert torch.autograd.gradcheck(lambda z: crf(z, guide, spacing, mask), (logits,), eps=1e-6, atol=1e-6)
    weights = crf.raw_kernel_weights.detach().clone().requires_grad_(True)
    # gradcheck perturbs the tensors it is given in place; route them through the module's parameter
    def wrapped(raw):
        original = crf.raw_kernel_weights
        del crf.raw_kernel_weights
        crf.raw_kernel_weights = raw
        try:
            return crf(logits.detach(), guide, spacing)
        finally:
            del crf.raw_kernel_weights
            crf.raw_kernel_weights = original
    assert torch.autograd.gradcheck(wrapped, (weights,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dim,shape", [(2, (20, 22)), (3, (8, 12, 10))])
def test_gradients_reach_logits_and_all_parameters(dim, shape):
    torch.manual_seed(0)
    crf = TrainableDenseCRF(dim, iterations=3)
    logits = torch.randn(2, 1, *shape, requires_grad=True)
    guide = torch.rand(2, 2, *shape)  # two guide channels
    refined = crf(logits, guide, [2.0] + [1.0] * (dim - 1))
    assert refined.shape == logits.shape and torch.isfinite(refined).all()
    (torch.sigmoid(refined) * torch.rand_like(refined)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    names = dict(crf.named_parameters())
    assert set(names) == {"raw_kernel_weights"}  # the compatibility is Potts, not learnt
    assert torch.all(names["raw_kernel_weights"].grad.abs() > 0)
    assert torch.allclose(crf.kernel_weights, torch.tensor([0.5, 0.5]))


def test_learnable_weights_stay_below_their_bound():
    crf = TrainableDenseCRF(3, w_spatial=0.2, w_bilateral=0.9, max_kernel_weight=1.0)
    with torch.no_grad():
        crf.raw_kernel_weights.fill_(50.0)
    assert torch.all(crf.kernel_weights <= 1.0)
    with pytest.raises(ValueError, match="max_kernel_weight"):
        TrainableDenseCRF(3, w_spatial=3.0, w_bilateral=5.0)
    assert "compatibility" not in crf.state_dict()


def _small_lesion(dim, spacing, radius_mm=5.0, p_lesion=0.7, p_background=0.2):
    shape = (96, 96) if dim == 2 else (24, 72, 72)
    grids = torch.meshgrid(*[(torch.arange(s) - s // 2) * sp for s, sp in zip(shape, spacing)], indexing="ij")
    lesion = sum(g ** 2 for g in grids) <= radius_mm ** 2
    logits = torch.logit(torch.where(lesion, torch.tensor(p_lesion), torch.tensor(p_background)))
    return lesion, logits[None, None], torch.zeros(1, 1, *shape)


@pytest.mark.parametrize("dim,spacing", [(2, (0.7, 0.7)), (3, (1.5, 0.8, 0.8)), (3, (2.5, 1.5, 1.5))])
def test_default_crf_keeps_a_small_lesion_on_a_flat_image(dim, spacing):
    """A 5 mm-radius lesion with a moderately confident unary survives the trainable CRF at its default settings; at
    densecrf's photograph weights (3, 5) it would vanish."""
    lesion, logits, flat = _small_lesion(dim, spacing)
    with torch.no_grad():
        refined = TrainableDenseCRF(dim)(logits, flat, spacing)
        strong = TrainableDenseCRF(dim, learnable=False, w_spatial=3.0, w_bilateral=5.0)(logits, flat, spacing)
    kept = float(((refined[0, 0] > 0) & lesion).sum() / lesion.sum())
    assert kept >= 0.9
    assert int(((refined[0, 0] > 0) & ~lesion).sum()) == 0
    assert int(((strong[0, 0] > 0) & lesion).sum()) == 0  # the test can tell an eroding CRF apart


def test_fixed_weights_have_no_parameters():
    crf = TrainableDenseCRF(3, learnable=False, w_spatial=2.0, w_bilateral=4.0)
    assert list(crf.parameters()) == []
    assert torch.allclose(crf.kernel_weights, torch.tensor([2.0, 4.0]))


def test_spatial_profiles_are_positive_semidefinite():
    for sigma_vox in (0.4, 1.0, 1.5, 3.0, 5.0):
        radius = int(np.ceil(3 * sigma_vox))
        taps = psd_gaussian_taps(np.arange(-radius, radius + 1) * 1.0, sigma_vox)
        omega = np.linspace(0, np.pi, 20001)
        symbol = (taps[None, :] * np.cos(omega[:, None] * np.arange(-radius, radius + 1)[None, :])).sum(1)
        assert symbol.min() >= -1e-12
        assert abs(taps[radius] - 1.0) < 0.02  # only a tiny centre correction


def test_anisotropic_spacing_changes_the_result_like_a_millimetre_kernel():
    blob, guide, logits = _blob_case((16, 32, 32), seed=0)
    crf = TrainableDenseCRF(3, iterations=3)
    with torch.no_grad():
        iso = crf(logits, guide, (1.0, 1.0, 1.0))
        aniso = crf(logits, guide, (4.0, 1.0, 1.0))
        # an image made of 4 copies of every slice at 1 mm is the same physical volume as 4 mm slices
        thin = crf(logits.repeat_interleave(4, 2), guide.repeat_interleave(4, 2), (1.0, 1.0, 1.0))
    assert (torch.sigmoid(iso) - torch.sigmoid(aniso)).abs().max() > 0.05
    as_thick = thin[:, :, 1::4]
    assert (torch.sigmoid(as_thick) - torch.sigmoid(aniso)).abs().mean() < \
        0.5 * (torch.sigmoid(iso) - torch.sigmoid(aniso)).abs().mean()


def test_kernel_radius_follows_millimetres():
    crf = TrainableDenseCRF(3, spatial_sigma_mm=3.0, bilateral_sigma_mm=8.0, window=2)
    # bilateral reach 1.5 * 8 mm = 12 mm dominates: 2.4 -> 2 voxels at 5 mm (two taps, stride 1), 24 at 0.5 mm
    # (stride 12), 12 at 1 mm (stride 6); the spatial kernel's 3 * 3 mm is 2, 18 and 9 voxels
    assert crf.receptive_radius((5.0, 0.5, 1.0)) == [2, 24, 12]


@pytest.mark.parametrize("dim,shape", [(2, (48, 48)), (3, (16, 28, 28))])
def test_noisy_blob_is_cleaned_up(dim, shape):
    blob, guide, logits = _blob_case(shape, seed=4)
    # the weights of the pseudo-label CRF (fixed, strong): the trainable defaults are deliberately mild
    crf = TrainableDenseCRF(dim, iterations=5, spatial_sigma_mm=2.0, bilateral_sigma_mm=5.0, learnable=False,
                            w_spatial=3.0, w_bilateral=5.0)
    with torch.no_grad():
        refined = crf(logits, guide, [1.0] * dim)
    before = _dice(logits[0, 0] > 0, blob)
    after = _dice(refined[0, 0] > 0, blob)
    assert before < 0.8 and after > before + 0.1 and after > 0.9


def test_mask_clamps_outside_and_outside_voxels_send_no_messages():
    blob, guide, logits = _blob_case((10, 24, 24), seed=5)
    mask = torch.zeros(1, 1, 10, 24, 24)
    mask[..., 4:20, 4:20] = 1
    crf = TrainableDenseCRF(3, iterations=4, spatial_sigma_mm=2.0, bilateral_sigma_mm=4.0)
    with torch.no_grad():
        refined = crf(logits, guide, (1.0, 1.0, 1.0), mask)
        changed_outside = logits.clone()
        changed_outside[mask == 0] = 10.0
        guide_changed = guide.clone()
        guide_changed[mask == 0] = -3.0
        refined2 = crf(changed_outside, guide_changed, (1.0, 1.0, 1.0), mask)
        unmasked = crf(logits, guide, (1.0, 1.0, 1.0))
    assert torch.all(refined[mask == 0] == OUTSIDE_MASK_LOGIT)
    assert torch.allclose(refined[mask == 1], refined2[mask == 1], atol=1e-5)
    assert (refined[mask == 1] - unmasked[mask == 1]).abs().max() > 1e-3  # the mask does change messages


def test_per_sample_spacing_tensor_matches_separate_calls():
    torch.manual_seed(6)
    logits, guide = torch.randn(2, 1, 6, 16, 16), torch.rand(2, 1, 6, 16, 16)
    spacing = torch.tensor([[3.0, 1.0, 1.0], [1.0, 0.7, 0.7]])
    crf = TrainableDenseCRF(3, iterations=2)
    with torch.no_grad():
        both = crf(logits, guide, spacing)
        first = crf(logits[:1], guide[:1], spacing[0].tolist())
        second = crf(logits[1:], guide[1:], spacing[1])
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-6)


def test_half_precision_kernel_storage_is_close():
    blob, guide, logits = _blob_case((10, 20, 20), seed=7)
    with torch.no_grad():
        full = TrainableDenseCRF(3)(logits, guide, (1.0, 1.0, 1.0))
        half = TrainableDenseCRF(3, kernel_dtype=torch.float16)(logits, guide, (1.0, 1.0, 1.0))
        fp16_in = TrainableDenseCRF(3)(logits.half(), guide.half(), (1.0, 1.0, 1.0))
        rounded_in = TrainableDenseCRF(3)(logits.half().float(), guide.half().float(), (1.0, 1.0, 1.0))
    assert (torch.sigmoid(full) - torch.sigmoid(half)).abs().max() < 5e-3
    # fp16 in, fp16 out, float32 inside: only the output rounding differs from a float32 run on the same inputs
    assert fp16_in.dtype == torch.float16
    assert (torch.sigmoid(rounded_in) - torch.sigmoid(fp16_in.float())).abs().max() < 1e-3


def test_refine_large_matches_direct_call():
    """Tile-border effect on this case (5 iterations, max |marginal difference|): halo of 1 message radius 0.03,
    1.5 radii 5e-3, 2 radii (the default) 9e-5, 3 radii 0; asserted: default < 1e-3, (iterations + 1) radii exact."""
    blob, guide, logits = _blob_case((24, 40, 40), seed=8)
    spacing = (2.0, 1.0, 1.0)
    crf = TrainableDenseCRF(3, iterations=5, spatial_sigma_mm=3.0, bilateral_sigma_mm=6.0)
    mask = torch.ones_like(logits)
    mask[..., :3, :] = 0
    with torch.no_grad():
        direct = crf(logits, guide, spacing, mask)
        tiled = crf.refine_large(logits, guide, spacing, mask, tile_shape=(12, 20, 20))
        exact = crf.refine_large(logits, guide, spacing, mask, tile_shape=(12, 20, 20),
                                 halo=[6 * r for r in crf.receptive_radius(spacing)])
        too_small = crf.refine_large(logits, guide, spacing, mask, tile_shape=(12, 20, 20), halo=2)
    error = (torch.sigmoid(tiled) - torch.sigmoid(direct)).abs()
    assert error.max() < 1e-3
    assert (torch.sigmoid(exact) - torch.sigmoid(direct)).abs().max() < 1e-5
    assert (torch.sigmoid(too_small) - torch.sigmoid(direct)).abs().max() > 10 * error.max()


def test_refine_large_default_tiles_respect_the_voxel_budget():
    blob, guide, logits = _blob_case((12, 30, 30), seed=9)
    crf = TrainableDenseCRF(3, iterations=2, spatial_sigma_mm=1.0, bilateral_sigma_mm=2.0)
    calls = []
    original_forward = crf.forward

    def counting_forward(z, *args, **kwargs):
        calls.append(z.numel())
        return original_forward(z, *args, **kwargs)
    crf.forward = counting_forward
    with torch.no_grad():
        out = crf.refine_large(logits, guide, (1.0, 1.0, 1.0), max_tile_voxels=4000, halo=2)
        tile_sizes = list(calls)
        direct = crf(logits, guide, (1.0, 1.0, 1.0))
    assert 1 < len(tile_sizes) <= 27 and max(tile_sizes) <= 4000
    # halo 2 < the message radius (4): only roughly equal; accuracy vs halo is test_refine_large_matches_direct_call
    assert out.shape == logits.shape and (torch.sigmoid(out) - torch.sigmoid(direct)).abs().mean() < 0.01
    with pytest.raises(ValueError, match="max_tile_voxels"):
        crf.refine_large(logits, guide, (1.0, 1.0, 1.0), max_tile_voxels=4000, halo=8)


def test_bad_inputs_are_rejected_with_clear_messages():
    crf = TrainableDenseCRF(3)
    z, g = torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="spacing"):
        crf(z, g, (1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        crf(z, g, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="logits must be"):
        crf(torch.zeros(1, 1, 4, 4), g, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="guide must be"):
        crf(z, torch.zeros(1, 1, 4, 4, 5), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="dim must be"):
        TrainableDenseCRF(4)


def test_autocast_inputs_run_in_float32():
    blob, guide, logits = _blob_case((8, 16, 16), seed=10)
    crf = TrainableDenseCRF(3, iterations=2)
    logits.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        refined = crf(logits, guide, (1.0, 1.0, 1.0))
    assert refined.dtype == torch.float32
    refined.sum().backward()
    assert torch.isfinite(logits.grad).all() and crf.raw_kernel_weights.grad is not None
    with torch.no_grad():
        assert torch.allclose(refined, crf(logits, guide, (1.0, 1.0, 1.0)))
