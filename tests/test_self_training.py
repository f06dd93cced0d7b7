"""Self-training targets and loss: calibrated like the pseudo labels, inside the region only, class-balanced per
sample, bootstrapped, empty for 0 % regions."""
import torch
import torch.nn.functional as F

from nnunetv2_dram.losses.self_training import calibrated_targets, self_training_loss


def _map(values):
    return torch.tensor(values, dtype=torch.float32).view(1, 1, -1)


def test_the_dram_at_one_half_is_kept_where_its_fraction_fits_the_interval():
    dram = _map([4.0, 1.0, -1.0, -4.0])  # 2 of 4 above 0.5
    target = calibrated_targets(dram, torch.ones_like(dram), torch.tensor([[0.25, 0.75]]))
    assert target.flatten().tolist() == [True, True, False, False]


def test_otherwise_the_most_probable_voxels_up_to_the_nearest_bound():
    dram = _map([4.0, 1.0, -1.0, -4.0, -2.0, 3.0, -3.0, 0.5])
    mask = torch.ones_like(dram)
    too_many = calibrated_targets(dram, mask, torch.tensor([[0.0, 0.25]]))  # 4 above 0.5, at most 2 allowed
    assert too_many.flatten().tolist() == [True, False, False, False, False, True, False, False]
    too_few = calibrated_targets(dram, mask, torch.tensor([[0.75, 1.0]]))  # at least 6
    assert too_few.sum() == 6 and not too_few.flatten()[6] and not too_few.flatten()[3]


def test_nothing_outside_the_region_and_nothing_in_a_zero_region():
    dram = _map([4.0, 4.0, 4.0, -4.0])
    mask = _map([1, 1, 0, 1])
    target = calibrated_targets(dram, mask, torch.tensor([[0.0, 1.0]]))
    assert target.flatten().tolist() == [True, True, False, False]
    assert not calibrated_targets(dram, mask, torch.tensor([[0.0, 0.0]])).any()


def test_samples_are_calibrated_separately():
    dram = torch.stack([_map([3.0, 2.0, 1.0, -1.0]), _map([3.0, 2.0, 1.0, -1.0])])[:, 0]
    target = calibrated_targets(dram, torch.ones_like(dram), torch.tensor([[0.0, 0.25], [1.0, 1.0]]))
    assert target[0].sum() == 1 and target[1].sum() == 4


def _expected(refined, target, weight, bootstrap=0.8):
    soft = bootstrap * target + (1 - bootstrap) * torch.sigmoid(refined)
    return (F.binary_cross_entropy_with_logits(refined, soft, reduction="none") * weight).sum()


def test_both_classes_carry_half_of_each_samples_loss_and_outside_voxels_none():
    dram = _map([4.0, 4.0, -4.0, -4.0, -4.0, -4.0, 4.0])
    mask = _map([1, 1, 1, 1, 1, 1, 0])  # the last voxel lies outside the region
    refined = torch.linspace(-1, 1, 7).view(1, 1, 7)
    interval = torch.tensor([[0.1, 0.5]])  # 2 of 6 region voxels: inside the interval
    weight = _map([0.25, 0.25, 0.125, 0.125, 0.125, 0.125, 0.0])
    loss = self_training_loss(refined, dram, mask, interval)
    torch.testing.assert_close(loss, _expected(refined, (dram > 0).float(), weight))
    # a batch of two copies: the mean over samples
    two = self_training_loss(refined.repeat(2, 1, 1), dram.repeat(2, 1, 1), mask.repeat(2, 1, 1), interval.repeat(2, 1))
    torch.testing.assert_close(two, loss)


def test_zero_percent_region_pushes_every_voxel_towards_background():
    dram = _map([4.0, 0.1, -4.0])
    refined = torch.zeros(1, 1, 3, requires_grad=True)
    loss = self_training_loss(refined, dram, torch.ones_like(dram), torch.tensor([[0.0, 0.0]]))
    torch.testing.assert_close(loss, _expected(refined.detach(), torch.zeros(1, 1, 3), torch.full((1, 1, 3), 1 / 3)))
    loss.backward()
    assert (refined.grad > 0).all()


def test_the_loss_never_reaches_the_dram():
    dram = _map([4.0, 0.1, -4.0]).requires_grad_()
    refined = torch.zeros(1, 1, 3, requires_grad=True)
    self_training_loss(refined, dram, torch.ones_like(dram), torch.tensor([[0.2, 0.5]])).backward()
    assert dram.grad is None and refined.grad.abs().sum() > 0


def test_targets_computed_once_give_the_same_loss():
    """DRAMTrainer computes the targets once for the refined map and the head: the same loss to the last bit."""
    from nnunetv2_dram.losses.self_training import self_training_targets
    g = torch.Generator().manual_seed(3)
    dram, refined = torch.randn(2, 1, 6, 8, 8, generator=g), torch.randn(2, 1, 6, 8, 8, generator=g)
    mask = (torch.rand(2, 1, 6, 8, 8, generator=g) > 0.3).float()
    interval = torch.tensor([[0.2, 0.3], [0.0, 0.0]])
    once = self_training_targets(dram, mask, interval)
    assert torch.equal(self_training_loss(refined, None, None, None, targets=once),
                       self_training_loss(refined, dram, mask, interval))
