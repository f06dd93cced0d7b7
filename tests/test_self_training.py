"""Self-training loss: class-balanced on confident voxels, uniform when one class is absent."""
import torch
import torch.nn.functional as F

from nnunetv2_dram.losses.self_training import self_training_loss


def _expected(refined, target, weight, bootstrap=0.9):
    soft = bootstrap * target + (1 - bootstrap) * torch.sigmoid(refined)
    return (F.binary_cross_entropy_with_logits(refined, soft, reduction="none") * weight).sum()


def test_both_classes_carry_half_of_the_loss():
    dram = torch.tensor([4.0, 4.0, -4.0, -4.0, -4.0, -4.0, 0.1]).view(1, 1, 7)  # 2 lesion, 4 background, 1 unsure
    refined = torch.linspace(-1, 1, 7).view(1, 1, 7)
    mask = torch.ones_like(dram)
    target = (dram > 0).float()
    weight = torch.tensor([0.25, 0.25, 0.125, 0.125, 0.125, 0.125, 0.0]).view(1, 1, 7)
    loss = self_training_loss(refined, dram, mask, torch.tensor([[0.1, 0.5]]))
    torch.testing.assert_close(loss, _expected(refined, target, weight))


def test_one_class_absent_weights_every_confident_voxel_alike():
    dram = torch.tensor([-4.0, -4.0, -4.0, 0.1]).view(1, 1, 4)
    refined = torch.tensor([0.5, -0.5, 1.0, 2.0]).view(1, 1, 4)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0]).view(1, 1, 4)  # third voxel outside the region
    weight = torch.tensor([0.5, 0.5, 0.0, 0.0]).view(1, 1, 4)
    loss = self_training_loss(refined, dram, mask, torch.tensor([[0.1, 0.5]]))
    torch.testing.assert_close(loss, _expected(refined, torch.zeros_like(dram), weight))


def test_zero_percent_region_gets_an_all_background_target_even_where_the_map_says_lesion():
    dram = torch.tensor([4.0, 0.1, -4.0]).view(1, 1, 3)
    refined = torch.zeros(1, 1, 3, requires_grad=True)
    loss = self_training_loss(refined, dram, torch.ones_like(dram), torch.tensor([[0.0, 0.0]]))
    torch.testing.assert_close(loss, _expected(refined.detach(), torch.zeros(1, 1, 3), torch.full((1, 1, 3), 1 / 3)))
    loss.backward()
    assert (refined.grad > 0).all()  # every voxel pushed towards background
