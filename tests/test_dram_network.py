"""DenseRegressionNetwork's refinement on a coarser grid (DRAMTrainer's default): shapes, spacing, gradients."""
import pytest
import torch
from torch import nn

from nnunetv2_dram.architectures.dram_network import DenseRegressionNetwork


def _network(dim: int, refine_downsample: int) -> DenseRegressionNetwork:
    torch.manual_seed(0)
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    backbone = conv(1, 1, 3, padding=1)  # no encoder/decoder: the image alone guides the attention
    spacing = (2.0, 0.8, 0.8)[-dim:]
    return DenseRegressionNetwork(backbone, dim, spacing, image_channels=1, low_level_channels=None,
                                  refine_downsample=refine_downsample)


@pytest.mark.parametrize("shape", [(1, 1, 8, 18, 17), (2, 1, 19, 20)])
def test_coarse_refinement_runs_on_the_coarse_grid_and_returns_full_resolution(shape):
    dim = len(shape) - 2
    net = _network(dim, refine_downsample=2)
    seen = {}
    net.crf.register_forward_hook(lambda m, args, out: seen.update(shape=tuple(args[0].shape[2:]), spacing=args[2]))
    x = torch.randn(shape, requires_grad=True)
    out = net(x, return_all=True)
    assert seen["shape"] == tuple(s // 2 for s in shape[2:])
    # the CRF's kernels are in mm: the coarse grid's voxels are proportionally larger
    expected = [sp * s / (s // 2) for sp, s in zip((2.0, 0.8, 0.8)[-dim:], shape[2:])]
    assert [float(v) for v in torch.as_tensor(seen["spacing"]).flatten()[:dim]] == pytest.approx(expected)
    for key in ("attended", "refined"):
        assert out[key].shape == out["dram"][0].shape == (shape[0], 1, *shape[2:])
        assert torch.isfinite(out[key]).all()
    out["refined"].mean().backward()
    assert net.backbone.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.crf.parameters() if p.requires_grad)


def test_coarse_and_full_refinement_differ_only_by_a_smooth_correction():
    x = torch.randn(1, 1, 8, 16, 16)
    full, coarse = _network(3, 1), _network(3, 2)
    coarse.load_state_dict(full.state_dict())
    with torch.no_grad():
        a, b = full(x, return_all=True), coarse(x, return_all=True)
    assert torch.equal(a["dram"][0], b["dram"][0])
    assert not torch.allclose(a["refined"], b["refined"])
    # the coarse path adds an upsampled correction: its voxel-to-voxel changes are smaller than the full path's
    def roughness(t):
        return (t[..., 1:] - t[..., :-1]).abs().mean()
    dram = b["dram"][0]
    assert roughness(b["refined"] - dram) < roughness(a["refined"] - dram)
