"""LocalAffinityAttention: shapes, gradients, near-identity start, feature-edge respect, borders, downsampling."""
from __future__ import annotations

import math

import pytest
import torch

from nnunetv2_dram.building_blocks.local_attention import LocalAffinityAttention, neighbourhood_offsets


@pytest.mark.parametrize("dim,shape", [(2, (12, 14)), (3, (6, 8, 7))])
@pytest.mark.parametrize("similarity", ["distance", "relu_dot"])
def test_shapes_finite_and_gradients_reach_map_and_every_parameter(dim, shape, similarity):
    torch.manual_seed(0)
    module = LocalAffinityAttention(in_channels=5, dim=dim, similarity=similarity, dilations=(1, 2), iterations=2)
    logits = torch.randn(2, 1, *shape, requires_grad=True)
    features = torch.randn(2, 5, *shape, requires_grad=True)
    refined = module(logits, features)
    assert refined.shape == logits.shape and torch.isfinite(refined).all()
    (refined * torch.randn_like(refined)).sum().backward()
    assert logits.grad.abs().sum() > 0 and features.grad.abs().sum() > 0
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_neighbourhoods():
    assert len(neighbourhood_offsets(3, 3, (1,))) == 27
    assert len(neighbourhood_offsets(2, 3, (1, 2))) == 17  # self + 8 + 8
    assert neighbourhood_offsets(3, 3, (1, 2))[0] == (0, 0, 0)
    assert len(neighbourhood_offsets(2, 1, (1,))) == 1


@pytest.mark.parametrize("dim,shape", [(2, (32, 32)), (3, (10, 16, 16))])
def test_starts_close_to_identity_on_a_smooth_map(dim, shape):
    torch.manual_seed(1)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    smooth = 4.0 * torch.sin(2 * math.pi * grids[-1] / 32) * torch.cos(2 * math.pi * grids[-2] / 40)
    logits = smooth[None, None]
    features = torch.randn(1, 8, *shape)
    module = LocalAffinityAttention(in_channels=8, dim=dim)
    with torch.no_grad():
        refined = module(logits, features)
    change = (refined - logits).abs()
    # the map varies along the last two axes only; a diagonal neighbour differs by at most both steps
    neighbour_step = smooth.diff(dim=-1).abs().max() + smooth.diff(dim=-2).abs().max()
    # a convex combination of neighbours blended half with the identity moves at most half a neighbour step
    assert change.max() <= 0.5 * neighbour_step + 1e-5
    assert change.mean() < 0.05 * (smooth.max() - smooth.min())


@pytest.mark.parametrize("dim,shape", [(2, (16, 16)), (3, (6, 12, 12))])
def test_affinity_respects_a_feature_edge(dim, shape):
    torch.manual_seed(2)
    features = torch.zeros(1, 4, *shape)
    half = shape[-1] // 2
    features[:, 0, ..., :half] = 2.0
    features[:, 1, ..., half:] = 2.0
    features += 0.01 * torch.randn_like(features)
    logits = torch.zeros(1, 1, *shape)
    logits[..., half - 1] = 6.0  # a line of lesion just left of the feature edge
    module = LocalAffinityAttention(in_channels=4, dim=dim, iterations=3)
    with torch.no_grad():
        refined = module(logits, features)
        weights = module.affinities(features)
    same_side = refined[..., half - 2]   # one voxel away, same features
    other_side = refined[..., half]      # one voxel away, across the edge
    assert torch.all(same_side > 2.0 * other_side)
    # weight of the neighbour across the edge is below that of the same-side neighbour for the edge voxels
    across = module.offsets.index((0,) * (dim - 1) + (1,))
    back = module.offsets.index((0,) * (dim - 1) + (-1,))
    assert torch.all(weights[:, across, ..., half - 1] < weights[:, back, ..., half - 1])


@pytest.mark.parametrize("dim,shape", [(2, (9, 11)), (3, (5, 6, 7))])
def test_padding_neighbours_get_no_weight(dim, shape):
    torch.manual_seed(3)
    module = LocalAffinityAttention(in_channels=3, dim=dim, dilations=(1, 3), iterations=3)
    features = torch.randn(1, 3, *shape)
    constant = torch.full((1, 1, *shape), -2.5)
    with torch.no_grad():
        refined = module(constant, features)
        weights = module.affinities(features)
    assert torch.allclose(refined, constant, atol=1e-5)
    assert torch.allclose(weights.sum(1), torch.ones(1, *shape), atol=1e-5)
    corner_index = (0, slice(None)) + (0,) * dim
    for k, offset in enumerate(module.offsets):
        if any(o < 0 for o in offset):
            assert weights[corner_index][k] == 0


@pytest.mark.parametrize("dim,shape", [(2, (17, 20)), (3, (9, 10, 11))])
def test_downsampled_refinement_keeps_fine_detail(dim, shape):
    torch.manual_seed(4)
    module = LocalAffinityAttention(in_channels=2, dim=dim, downsample=2)
    logits = torch.randn(1, 1, *shape, requires_grad=True)
    features = torch.randn(1, 2, *shape)
    refined = module(logits, features)
    assert refined.shape == logits.shape and torch.isfinite(refined).all()
    refined.sum().backward()
    assert logits.grad.abs().sum() > 0 and module.theta.weight.grad.abs().sum() > 0
    # the residual is smooth (upsampled from the coarse grid): the input's voxel-level detail survives
    with torch.no_grad():
        checker = torch.zeros(1, 1, *shape)
        checker[(0, 0) + tuple(slice(None, None, 2) for _ in range(dim))] = 1.0
        out = module(checker, features)
        direct = LocalAffinityAttention(in_channels=2, dim=dim, downsample=1)
        direct.load_state_dict(module.state_dict())
        smoothed = direct(checker, features)
    high_frequency = lambda x: (x - x.mean()).abs().mean()
    assert high_frequency(out - 0.0) > 0.9 * high_frequency(checker)
    assert high_frequency(out) > high_frequency(smoothed)


def test_bad_inputs_are_rejected():
    module = LocalAffinityAttention(in_channels=4, dim=3)
    with pytest.raises(ValueError, match="features must be"):
        module(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="logits must be"):
        module(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 4, 4, 4, 4))
    with pytest.raises(ValueError, match="kernel_size"):
        LocalAffinityAttention(in_channels=4, dim=3, kernel_size=2)
    with pytest.raises(ValueError, match="similarity"):
        LocalAffinityAttention(in_channels=4, dim=3, similarity="cosine")


def test_usable_under_autocast():
    """bf16 autocast on the CPU stands in for fp16 on CUDA: projections run in low precision, the softmax and
    the propagation in float32."""
    torch.manual_seed(5)
    module = LocalAffinityAttention(in_channels=4, dim=3, iterations=2)
    logits = torch.randn(1, 1, 6, 8, 8, requires_grad=True)
    features = torch.randn(1, 4, 6, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = module(logits, features)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    low.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (low - module(logits, features)).abs().max() < 0.05


# ------------------------------------------------------------------ the custom autograd functions behind the speed-up
def _plain_shift(x: torch.Tensor, offset) -> torch.Tensor:
    """result[..., i] = x[..., i + offset], zeros outside: the obvious (slow, plain-autograd) way."""
    pad = max(abs(o) for o in offset) if any(offset) else 0
    padded = torch.nn.functional.pad(x, [pad] * (2 * (x.ndim - 2)))
    index = tuple(slice(pad + o, pad + o + s) for o, s in zip(offset, x.shape[2:]))
    return padded[(slice(None), slice(None)) + index]


@pytest.mark.parametrize("dim,shape,dilations", [(2, (7, 6), (1, 2)), (3, (4, 5, 6), (1,)), (3, (5, 4, 5), (1, 2))])
def test_neighbour_functions_match_plain_autograd_and_pass_gradcheck(dim, shape, dilations):
    from nnunetv2_dram.building_blocks.local_attention import _NeighbourSquaredDistances, _NeighbourWeightedSum
    torch.manual_seed(3)
    offsets = neighbourhood_offsets(dim, 3, dilations)
    pad = max(dilations)
    e = torch.randn(2, 3, *shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, len(offsets), *shape, dtype=torch.float64, requires_grad=True)
    m = torch.randn(2, 1, *shape, dtype=torch.float64, requires_grad=True)
    inside = torch.ones((len(offsets),) + shape, dtype=torch.bool)
    for k, o in enumerate(offsets):  # neighbours outside the volume: the caller masks those distances
        inside[k] = _plain_shift(torch.ones(1, 1, *shape), o)[0, 0] > 0
    # distances: same values where the neighbour exists, same gradients through those entries
    fast = _NeighbourSquaredDistances.apply(e, offsets, pad)
    plain = torch.cat([(e - _plain_shift(e, o)).square().sum(1, keepdim=True) for o in offsets], 1)
    assert torch.allclose(fast[:, inside], plain[:, inside])
    g = torch.randn_like(fast) * inside
    assert torch.allclose(torch.autograd.grad((fast * g).sum(), e)[0], torch.autograd.grad((plain * g).sum(), e)[0])
    # weighted sum: identical, values and gradients
    fast_sum = _NeighbourWeightedSum.apply(w, m, offsets, pad)
    plain_sum = sum(w[:, k:k + 1] * _plain_shift(m, o) for k, o in enumerate(offsets))
    assert torch.allclose(fast_sum, plain_sum)
    g = torch.randn_like(fast_sum)
    for a, b in zip(torch.autograd.grad((fast_sum * g).sum(), [w, m]), torch.autograd.grad((plain_sum * g).sum(), [w, m])):
        assert torch.allclose(a, b)
    # and each backward is the exact derivative of its own forward (numerically checked)
    assert torch.autograd.gradcheck(lambda x: _NeighbourSquaredDistances.apply(x, offsets, pad), (e,))
    assert torch.autograd.gradcheck(lambda a, b: _NeighbourWeightedSum.apply(a, b, offsets, pad), (w, m))


def test_half_precision_features_do_not_overflow_the_distances():
    from nnunetv2_dram.building_blocks.local_attention import _NeighbourSquaredDistances
    e = (torch.randn(1, 8, 4, 5, 6) * 200).half().requires_grad_()  # squared sums ~1e6 > float16's 65504
    offsets = neighbourhood_offsets(3, 3, (1,))[1:]
    d = _NeighbourSquaredDistances.apply(e, offsets, 1)
    assert d.dtype == torch.float32 and torch.isfinite(d).all() and d.max() > 65504
    d.sum().backward()
    assert e.grad.dtype == torch.float16 and torch.isfinite(e.grad).all()
