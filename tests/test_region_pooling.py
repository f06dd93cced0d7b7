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


def test_pooled_log_fractions_are_the_logs_of_the_pooled_fraction():
    from nnunetv2_dram.building_blocks.region_pooling import pooled_log_fractions
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 1, 5, 6, 7, generator=g) * 4
    mask = (torch.rand(3, 1, 5, 6, 7, generator=g) > 0.5).float()
    mask[2] = torch.rand(1, 5, 6, 7, generator=g)  # soft weights
    log_f, log_not_f = pooled_log_fractions(logits, mask)
    f = pooled_fraction(logits, mask)
    assert torch.allclose(log_f.exp(), f, atol=1e-6) and torch.allclose(log_not_f.exp(), 1 - f, atol=1e-6)
    # a smaller deep-supervision map pools against the area-downsampled mask, like pooled_fraction
    small = logits[:, :, ::2, ::2, ::2]
    assert torch.allclose(pooled_log_fractions(small, mask)[0].exp(), pooled_fraction(small, mask), atol=1e-6)


def test_log_interval_loss_continues_the_hinge_and_revives_a_dead_map():
    from nnunetv2_dram.building_blocks.region_pooling import pooled_log_fractions
    interval = torch.tensor([[0.2, 0.3], [0.2, 0.3], [0.0, 0.0], [0.5, 0.5]])
    # near the interval it is the linear hinge to first order, never smaller, zero inside
    f = torch.tensor([0.199, 0.301, 0.001, 0.5])
    log_pred = (f.log(), (1 - f).log())
    safe = interval_regression_loss(f, interval, log_pred=log_pred).item()
    linear = interval_regression_loss(f, interval).item()
    assert safe == pytest.approx(linear, rel=1e-2) and safe >= linear
    far = torch.tensor([0.01])
    assert interval_regression_loss(far, interval[:1], log_pred=(far.log(), (1 - far).log())).item() > 0.19
    # a dead map (every logit near -40): the linear hinge's gradient has vanished, the log-domain one has not
    mask = torch.ones(1, 1, 6, 6, 6)
    for log_domain, expected in ((False, lambda g: g < 1e-12), (True, lambda g: g > 0.1)):
        logits = (torch.full((1, 1, 6, 6, 6), -40.0) + torch.randn(1, 1, 6, 6, 6)).requires_grad_()
        log_f, log_not_f = pooled_log_fractions(logits, mask)
        loss = interval_regression_loss(log_f.exp(), interval[:1], log_pred=(log_f, log_not_f) if log_domain else None)
        loss.backward()
        assert expected(logits.grad.abs().sum().item()), (log_domain, logits.grad.abs().sum().item())
        assert (logits.grad <= 0).all()  # descent raises the logits
    # and a saturated-positive map above its band is pushed down just the same
    logits = torch.full((1, 1, 6, 6, 6), 40.0, requires_grad=True)
    log_f, log_not_f = pooled_log_fractions(logits, mask)
    interval_regression_loss(log_f.exp(), interval[:1], log_pred=(log_f, log_not_f)).backward()
    assert logits.grad.abs().sum() > 0.1 and (logits.grad >= 0).all()
