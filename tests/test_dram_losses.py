"""How DRAMTrainer's losses reach the dRAM: the refined map is the dRAM plus a correction, so its regression loss
trains the dRAM as well. DRAMTrainerBalancedLoss weights the two losses half each."""
import pytest
import torch

from nnunetv2_dram.training.dram_trainers import DRAMTrainer, DRAMTrainerBalancedLoss, DRAMTrainerNoRefine


def _bare(cls):
    trainer = object.__new__(cls)  # compute_loss needs only these attributes, not a dataset
    trainer.is_ddp = False
    trainer.current_epoch, trainer.num_epochs = 0, 10
    return trainer


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    dram = torch.randn(2, 1, 8, 8, 8, generator=g, requires_grad=True)
    coarse = torch.randn(2, 1, 4, 4, 4, generator=g)
    mask = torch.zeros(2, 1, 8, 8, 8)
    mask[:, :, 1:7, 2:6, 1:7] = 1
    interval = torch.tensor([[0.30, 0.40], [0.02, 0.05]])  # the untrained map (~0.5) is above both intervals
    return dram, coarse, mask, interval


def _dram_gradient(cls, refine: bool):
    dram, coarse, mask, interval = _batch()
    outputs = {"dram": [dram, coarse.requires_grad_()]}
    if refine:
        outputs["refined"] = dram + 0.1 * torch.tanh(dram)  # the dRAM plus a small correction, as the network builds it
    loss, pred = _bare(cls).compute_loss(outputs, mask, interval)
    loss.backward()
    return loss.detach(), pred.detach(), dram.grad


def test_refined_loss_reaches_the_dram_and_balanced_weights_restore_norefines_gradient_scale():
    _, _, g_norefine = _dram_gradient(DRAMTrainerNoRefine, refine=False)
    loss_full, pred_full, g_full = _dram_gradient(DRAMTrainer, refine=True)
    loss_bal, pred_bal, g_bal = _dram_gradient(DRAMTrainerBalancedLoss, refine=True)
    ratio_full = (g_full.norm() / g_norefine.norm()).item()
    ratio_bal = (g_bal.norm() / g_norefine.norm()).item()
    assert ratio_full > 1.8, ratio_full  # about twice: both losses pull the dRAM the same way
    assert ratio_bal == pytest.approx(ratio_full / 2, rel=1e-5)
    assert 0.85 < ratio_bal < 1.25, ratio_bal
    assert torch.allclose(loss_bal, loss_full / 2) and torch.equal(pred_bal, pred_full)
