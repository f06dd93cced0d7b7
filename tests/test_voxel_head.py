"""The refinement's per-voxel classifier head: it learns from the thresholded dRAM what lesions look like, reads the
decoder's last features without training the backbone, starts as the identity when added, and is stored with the
checkpoint."""
import pytest
import torch
from scipy import ndimage
from torch import nn

from nnunetv2_dram.architectures.dram_network import DenseRegressionNetwork
from nnunetv2_dram.architectures.dram_refinement import DRAMRefinement
from nnunetv2_dram.losses.self_training import calibrated_targets, self_training_loss
from nnunetv2_dram.training.dram_trainers import DRAMTrainer

from test_dram_refinement import _iou


def _one_lesion_missed(n: int = 64):
    """Two bright lesions on a noisy image; the dRAM is a blurred copy of the first one only, the weak label the
    fraction of both."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    seen = ((yy - 20).abs() < 8) & ((xx - 20).abs() < 10)
    truth = seen | (((yy - 46) ** 2 + (xx - 44) ** 2) < 40)
    image = (truth.float() + 0.15 * torch.randn(n, n, generator=g))[None, None]
    blurred = torch.from_numpy(ndimage.gaussian_filter(seen.float().numpy(), 3.0)).float()
    dram = torch.logit(blurred.clamp(0.02, 0.98) * 0.9 + 0.05)[None, None]
    region = torch.zeros(1, 1, n, n)
    region[..., 4:-4, 4:-4] = 1
    fraction = float(truth[region[0, 0] > 0].float().mean())
    return truth, image, dram, region, torch.tensor([[fraction, fraction]])


def _self_trained_iou(head: dict | None) -> float:
    truth, image, dram, region, interval = _one_lesion_missed()
    torch.manual_seed(0)
    refinement = DRAMRefinement(2, 1, DRAMTrainer.attention_settings, head=head, head_channels=1 if head else None)
    optimizer = torch.optim.Adam(refinement.parameters(), lr=0.05)

    def refined():
        return refinement(dram, image, image, (1.0, 1.0), region, head_features=image if head else None)

    for _ in range(40):
        loss = self_training_loss(refined(), dram, region, interval)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return _iou(calibrated_targets(refined().detach(), region, interval)[0, 0], truth)


@pytest.mark.parametrize("combine, gain", [("add", 0.04), ("replace", 0.2)])
def test_self_training_teaches_the_head_what_a_lesion_the_dram_missed_looks_like(combine, gain):
    """The attention only moves the dRAM's own lesion along the image; the head learns from it what lesions look
    like and finds the second one, which the dRAM missed, far from the first."""
    attention_only = _self_trained_iou(None)
    with_head = _self_trained_iou({"combine": combine})
    assert with_head > attention_only + gain, (attention_only, with_head)


def _unet(dim: int, deep_supervision: bool):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
    return PlainConvUNet(1, 3, (4, 8, 16), conv, 3, (1, 2, 2), (2, 2, 2), 1, (2, 2), conv_bias=True, norm_op=norm,
                         norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU, deep_supervision=deep_supervision)


def _network(dim: int, head: dict | None, deep_supervision: bool = True) -> DenseRegressionNetwork:
    torch.manual_seed(0)
    backbone = _unet(dim, deep_supervision)
    refinement = {"attention": {"iterations": 2}, "crf": None, "downsample": 1, "head": head}
    return DenseRegressionNetwork(backbone, dim, (1.0,) * dim, image_channels=1, low_level_channels=4,
                                  refinement=refinement)


@pytest.mark.parametrize("shape", [(2, 1, 8, 16, 16), (2, 1, 16, 16)])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_the_head_reads_the_decoder_without_training_it_and_starts_as_the_identity(shape, deep_supervision):
    dim = len(shape) - 2
    x = torch.randn(shape)
    with_head = _network(dim, {"combine": "add"}, deep_supervision)
    without = _network(dim, None, deep_supervision)
    without.load_state_dict({k: v for k, v in with_head.state_dict().items() if "refinement.head" not in k
                             and not k.endswith("_extra_state")}, strict=False)
    out = with_head(x, return_all=True)
    with torch.no_grad():
        assert torch.allclose(out["refined"], without(x, return_all=True)["refined"], atol=1e-6)
    out["refined"].mean().backward()
    assert all(p.grad is None for p in with_head.backbone.parameters())
    assert with_head.refinement.head.out.weight.grad.abs().sum() > 0


def test_the_head_is_stored_with_the_checkpoint():
    trained = _network(2, {"combine": "replace"})
    state = trained.state_dict()
    assert trained.refinement.settings()["head"] == {"combine": "replace", "in_channels": 5, "hidden_channels": 16,
                                                     "depth": 1, "kernel_size": 3}
    rebuilt = _network(2, {"combine": "replace"})
    rebuilt.load_state_dict(state)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained(x))
    for other in (None, {"combine": "add"}):
        with pytest.raises(RuntimeError, match="head"):
            _network(2, other).load_state_dict(state)


def test_a_model_trained_without_the_head_loads_and_predicts_as_it_was_trained():
    trained = _network(2, None)
    rebuilt = _network(2, {"combine": "add"})
    rebuilt.load_state_dict(trained.state_dict())
    assert rebuilt.refinement.head is None and rebuilt.refinement.settings() == trained.refinement.settings()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained(x))
