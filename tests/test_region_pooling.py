import math

import pytest
import torch

from nnunetv2_dram.building_blocks.region_pooling import pooled_fraction, region_mean, resize_mask
from nnunetv2_dram.losses.interval_regression import interval_distance, interval_regression_loss


def test_region_mean_is_exact_mean_inside_mask():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(2, 1, 6, 7, 8, generator=g)
    m = (torch.rand(2, 1, 6, 7, 8, generator=g) > 0.6).float()
    got = region_mean(v, m)[:, 0]
    for b in range(2):
        assert got[b].item() == pytest.approx(v[b][m[b] > 0].mean().item(), abs=1e-6)


def test_pooled_fraction_equals_lesion_fraction_for_a_saturated_map():
    # a map that is +inf on 30 lesion voxels and -inf elsewhere pools to exactly the lesion fraction
    m = torch.zeros(1, 1, 10, 10)
    m[0, 0, 2:8, 2:7] = 1  # 30 voxels region
    logits = torch.full((1, 1, 10, 10), -50.0)
    logits[0, 0, 2:5, 2:7] = 50.0  # 15 lesion voxels inside
    logits[0, 0, 9, 9] = 50.0  # outside the region: must not count
    assert pooled_fraction(logits, m).item() == pytest.approx(0.5, abs=1e-6)


def test_empty_region_pools_to_zero_not_nan():
    assert region_mean(torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)).item() == 0.0


def test_resize_mask_keeps_the_region_share():
    m = torch.zeros(1, 1, 8, 8, 8)
    m[..., :4, :, :] = 1
    small = resize_mask(m, (2, 2, 2))
    assert small.mean().item() == pytest.approx(0.5)


def test_interval_hinge_zero_inside_linear_outside():
    pred = torch.tensor([0.10, 0.30, 0.02, 0.0, 0.5])
    interval = torch.tensor([[0.05, 0.25], [0.05, 0.25], [0.05, 0.25], [0.0, 0.0], [0.5, 0.5]])
    d = interval_distance(pred, interval[:, 0], interval[:, 1])
    assert d.tolist() == pytest.approx([0.0, 0.05, 0.03, 0.0, 0.0], abs=1e-7)
    assert interval_regression_loss(pred, interval).item() == pytest.approx(0.08 / 5, abs=1e-7)
    # an exact target is the absolute error
    assert interval_regression_loss(torch.tensor([0.3]), torch.tensor([[0.1, 0.1]])).item() == pytest.approx(0.2)
    # a tolerance band widens the interval
    assert interval_regression_loss(torch.tensor([0.3]), torch.tensor([[0.1, 0.1]]), band=0.05).item() == \
        pytest.approx(0.15)


def test_interval_loss_gradient_pushes_toward_the_interval():
    pred = torch.tensor([0.6, 0.01], requires_grad=True)
    interval_regression_loss(pred, torch.tensor([[0.25, 0.5], [0.05, 0.25]])).backward()
    assert pred.grad[0] > 0 and pred.grad[1] < 0  # descend: first goes down, second up
    assert not math.isnan(pred.grad.sum().item())
