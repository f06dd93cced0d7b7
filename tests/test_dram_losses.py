"""DRAMTrainer's losses: the dRAM learns from its region regression once, exactly as in DRAMTrainerNoRefine; the
refinement learns from the self-training loss alone."""
import torch
from torch import nn

from nnunetv2_dram.architectures.dram_network import DenseRegressionNetwork
from nnunetv2_dram.training.dram_trainers import DRAMTrainer, DRAMTrainerNoRefine


def _bare(cls):
    trainer = object.__new__(cls)  # compute_loss needs only these attributes (and the network), not a dataset
    trainer.is_ddp = False
    trainer.current_epoch, trainer.num_epochs = 0, 10
    return trainer


def _network(refine: bool) -> DenseRegressionNetwork:
    torch.manual_seed(0)
    backbone = nn.Conv3d(1, 1, 3, padding=1)
    refinement = {"attention": {}, "crf": {}, "downsample": 1} if refine else None
    return DenseRegressionNetwork(backbone, 3, (2.0, 1.0, 1.0), 1, None, refinement=refinement)


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 10, 10, generator=g)
    mask = torch.zeros(2, 1, 8, 10, 10)
    mask[:, :, 1:7, 2:8, 1:9] = 1
    interval = torch.tensor([[0.30, 0.40], [0.0, 0.0]])
    return x, mask, interval


def _step(cls, refine: bool):
    net = _network(refine)
    x, mask, interval = _batch()
    outputs = net(x, return_all=True, region=mask)
    trainer = _bare(cls)
    trainer.network = net
    loss, pred = trainer.compute_loss(outputs, mask, interval)
    loss.backward()
    return net, loss.detach(), pred.detach()


def test_the_dram_gets_the_regression_gradient_once():
    plain, loss_plain, pred_plain = _step(DRAMTrainerNoRefine, refine=False)
    refined, loss_refined, pred_refined = _step(DRAMTrainer, refine=True)
    # same backbone, same batch: the backbone's gradient is NoRefine's to the last bit
    assert torch.equal(plain.backbone.weight.grad, refined.backbone.weight.grad)
    assert torch.equal(plain.backbone.bias.grad, refined.backbone.bias.grad)
    assert torch.equal(pred_plain, pred_refined)  # the pooled fraction that is logged is the dRAM's
    assert loss_refined > loss_plain  # plus the self-training term ...
    for name, p in refined.refinement.named_parameters():  # ... which trains every refinement parameter
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradient_clipping_keeps_the_refinement_apart():
    trainer = _bare(DRAMTrainer)
    trainer.network = _network(refine=True)
    groups = trainer._gradient_groups()
    assert len(groups) == 2
    assert {id(p) for p in groups[1]} == {id(p) for p in trainer.network.refinement.parameters()}
    assert {id(p) for p in groups[0]} == {id(p) for p in trainer.network.backbone.parameters()}
    trainer.network = _network(refine=False)
    assert len(trainer._gradient_groups()) == 1
