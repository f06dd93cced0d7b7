"""DenseRegressionNetwork and its refinement: full-resolution output, the dRAM untouched by the refinement's loss,
regions respected, settings restored from the checkpoint."""
import pytest
import torch
from torch import nn

from nnunetv2_dram.architectures.dram_network import DenseRegressionNetwork


def _network(dim: int, crf: dict | None = None, downsample: int = 1, iterations: int = 2) -> DenseRegressionNetwork:
    torch.manual_seed(0)
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    backbone = conv(1, 1, 3, padding=1)  # no encoder/decoder: the image alone guides the attention
    spacing = (2.0, 0.8, 0.8)[-dim:]
    refinement = {"attention": {"iterations": iterations}, "crf": crf, "downsample": downsample}
    return DenseRegressionNetwork(backbone, dim, spacing, image_channels=1, low_level_channels=None,
                                  refinement=refinement)


@pytest.mark.parametrize("shape", [(1, 1, 8, 18, 17), (2, 1, 19, 20)])
@pytest.mark.parametrize("downsample", [1, 2])
def test_refined_map_has_full_resolution_and_trains_only_the_refinement(shape, downsample):
    dim = len(shape) - 2
    net = _network(dim, crf={}, downsample=downsample)
    x = torch.randn(shape)
    out = net(x, return_all=True)
    assert out["refined"].shape == out["dram"][0].shape == (shape[0], 1, *shape[2:])
    assert torch.isfinite(out["refined"]).all()
    out["refined"].mean().backward()
    assert net.backbone.weight.grad is None  # the refinement reads the dRAM detached
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.refinement.parameters())


def test_the_crf_gets_the_spacing_of_the_grid_it_sees():
    net = _network(3, crf={}, downsample=2)
    seen = {}
    net.refinement.crf.register_forward_hook(lambda m, args, out: seen.update(spacing=args[2]))
    x = torch.randn(2, 1, 8, 18, 16)
    chunk_spacing = [(2.0, 0.8, 0.8), (2.5, 1.0, 1.0)]  # two chunks fitted with different zooms
    net(x, return_all=True, spacing=chunk_spacing)
    assert [tuple(round(v, 6) for v in row) for row in seen["spacing"]] == \
        [(4.0, 1.6, 1.6), (5.0, 2.0, 2.0)]  # and the coarse grid's voxels are twice as large


def test_nothing_outside_the_region_changes_the_refined_map_inside():
    net = _network(2, crf={})
    x = torch.randn(1, 1, 24, 24)
    region = torch.zeros(1, 1, 24, 24)
    region[..., 6:18, 5:20] = 1
    changed = x.clone()
    changed[region == 0] = 5.0  # a different image (so a different dRAM and guide) outside the region
    with torch.no_grad():
        dram = torch.randn(1, 1, 24, 24)
        a = net.refinement(dram, x, x, (1.0, 1.0), region)
        dram_changed = torch.where(region > 0, dram, torch.full_like(dram, 9.0))
        b = net.refinement(dram_changed, changed, changed, (1.0, 1.0), region)
        unmasked = net.refinement(dram, x, x, (1.0, 1.0))
    inside = region > 0
    assert torch.allclose(a[inside], b[inside], atol=1e-5)
    assert (a[inside] - unmasked[inside]).abs().max() > 1e-3  # the region does change the messages


def test_settings_are_restored_from_the_checkpoint_whatever_the_defaults_say():
    trained = _network(3, crf={"iterations": 3}, iterations=2)
    state = trained.state_dict()
    rebuilt = _network(3, crf={"iterations": 5}, iterations=1, downsample=2)
    rebuilt.load_state_dict(state)
    assert rebuilt.refinement.settings() == trained.refinement.settings()
    x = torch.randn(1, 1, 6, 12, 12)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained(x))
    with pytest.raises(RuntimeError, match="trainable CRF"):
        _network(3, crf=None).load_state_dict(state)


def test_the_predictor_gets_the_refined_map_as_two_channels():
    net = _network(2, crf=None)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        out = net(x)
        refined = net(x, return_all=True)["refined"]
    assert out.shape == (1, 2, 16, 16)
    assert torch.equal(out[:, 1:], refined) and torch.equal(out[:, :1], torch.zeros_like(refined))
