"""Every neighbour of a regular grid of offsets as one strided view, so that a sum over offsets is one kernel.

The dense CRF and the attention sum over a window of neighbour offsets. Looping over the offsets issues a few small
kernels per offset (thousands of torch operators per forward + backward of attention + CRF as the trainers run them):
cheap on a CPU, where the loop's in-place accumulation keeps memory at O(voxels), but on a GPU such a loop is bound by
kernel launches rather than arithmetic. When the offsets form a grid -- per axis k * stride for k = -n..n --
`window_view` returns all neighbours at once as a view of the padded tensor (no copy):

    view[b, c, *i, *t] = padded[b, c, *(pad + i + (t - n) * stride)]

so a weighted sum over the window is one multiply and one reduction, whatever the number of offsets, at the price of
a (window size x voxels) temporary. `OFFSET_MODES` picks the implementation: "loop" (low memory), "stacked" (few
kernels), "auto" (stacked for CUDA tensors of at most STACKED_MAX_VOXELS voxels, the loop otherwise), "compiled"
(while gradients are on, i.e. in training: the stacked sums through `torch.compile`, which fuses each multiply with
its reduction so the window temporaries are never written; otherwise "auto").

Where each wins (benchmarks/refinement_speed.py, attention + CRF forward + backward, batch 2, on a data-centre GPU):
at 2 x 48x80x80 = 0.6 M voxels the stacked sums took about a third of the loop's time; at 2 x 96x160x160 = 4.9 M
voxels, where the temporaries' memory traffic dominates, they took longer than the loop. STACKED_MAX_VOXELS sits
between the two, below the 2^21-voxel tiles of `TrainableDenseCRF.refine_large`, whose tiles therefore take the
loop. On the CPU the loop is faster at every size. With the stacked views the sums are no longer launch-bound:
replayed as one CUDA graph they take about the same time, and the profiler puts it in the multiply-and-sum over the
window temporaries, i.e. memory traffic.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

OFFSET_MODES = ("auto", "loop", "stacked", "compiled")
STACKED_MAX_VOXELS = 2 ** 20  # batch x spatial voxels up to which "auto" stacks on CUDA


def check_offset_mode(mode: str) -> str:
    if mode not in OFFSET_MODES:
        raise ValueError(f"offset_mode must be one of {OFFSET_MODES}, got {mode!r}")
    return mode


def use_compiled(mode: str) -> bool:
    """Whether `mode` asks for the compiled stacked sums now: only while gradients are on, because training sees one
    grid shape, while inference (validation, tiles of `refine_large`) sees many and would recompile for each."""
    return mode == "compiled" and torch.is_grad_enabled()


def use_stacked(mode: str, tensor: torch.Tensor) -> bool:
    """Whether the stacked (one-view) implementation serves `tensor` (B, C, *S) under `mode`."""
    if use_compiled(mode) or mode == "stacked":
        return True
    if mode == "loop":
        return False
    return tensor.is_cuda and tensor.numel() // max(1, tensor.shape[1]) <= STACKED_MAX_VOXELS


_COMPILED: dict = {}


def compiled(fn):
    """`fn` through torch.compile (static shapes), one compiled function per `fn` for the process. Inductor turns a
    multiply-and-sum over a window view into one reduction kernel that reads the neighbours in place: on a GPU the
    eager version's time is the memory traffic of the (window size x voxels) temporaries (offset_windows docstring)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def window_view(padded: torch.Tensor, pads: Sequence[int], taps: Sequence[int], strides: Sequence[int]
                ) -> torch.Tensor:
    """(B, C, *(S + 2 * pads)) -> view (B, C, *S, *(2 * taps + 1)) of the offsets (k - taps) * stride per axis.

    Needs pads[a] >= taps[a] * strides[a]; the window axes come last, in the order of the spatial axes.
    """
    view = padded
    for axis, (pad, n, stride) in enumerate(zip(pads, taps, strides)):
        reach = n * stride
        if reach > pad:
            raise ValueError(f"axis {axis}: window reach {reach} exceeds the padding {pad}")
        size = padded.shape[2 + axis] - 2 * pad
        view = view.narrow(2 + axis, pad - reach, size + 2 * reach).unfold(2 + axis, 2 * reach + 1, 1)
        if stride > 1:
            view = view[..., ::stride]
    return view


def pad_spatial(x: torch.Tensor, pads: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Pad every spatial axis a of x (B, C, *S) by pads[a] on both sides."""
    arg: list[int] = []
    for p in reversed(pads):
        arg += [p, p]
    return F.pad(x, arg, value=value)


def window_weighted_sum(weights: torch.Tensor, x: torch.Tensor, pads: Sequence[int], taps: Sequence[int],
                        strides: Sequence[int]) -> torch.Tensor:
    """sum over the window of weights * neighbours of x: weights (B, 1, *S, *window), x (B, C, *S) -> (B, C, *S);
    neighbours outside the volume are zero."""
    neighbours = window_view(pad_spatial(x, pads), pads, taps, strides)
    return (weights * neighbours).sum(window_dims(len(pads)))


def mirrored_window_gather(y: torch.Tensor, pads: Sequence[int], taps: Sequence[int], strides: Sequence[int]
                           ) -> torch.Tensor:
    """out[b, *i, *t] = y[b, *(i + o_t), *mirror(t)] for y (B, *S, *window), zero where i + o_t is outside.

    The adjoint of a window gather is a scatter-add (autograd's, and torch.compile's, backward of unfold); but the
    offsets are symmetric, so what voxel j receives from the pair (j - o_t, t) is what the pair (j + o_t', t') with
    t' = mirror(t) holds: a gather again. As views: move the window axes in front as channels, flip them, pad, take
    the window view, and read the diagonal of (channel axis, window axis) per spatial axis.
    """
    dim = len(pads)
    window = tuple(y.shape[-dim:])
    lead = y.movedim(tuple(range(-dim, 0)), tuple(range(1, dim + 1))).flip(tuple(range(1, dim + 1)))
    view = window_view(pad_spatial(lead.reshape(y.shape[0], -1, *y.shape[1:1 + dim]), pads), pads, taps, strides)
    view = view.unflatten(1, window)  # (B, *window as channels, *S, *window)
    for a in range(dim):
        view = torch.diagonal(view, 0, 1, 1 + (dim - a) + dim)
    return view


class _WindowSquaredDistances(torch.autograd.Function):
    """sum_c (e_c(i) - e_c(i + o_t))^2, (B, C, *S) -> (B, *S, *window), zero padding; backward by gathers only."""

    @staticmethod
    def forward(ctx, e, pads, taps, strides):
        ctx.save_for_backward(e)
        ctx.window = (pads, taps, strides)
        neighbours = window_view(pad_spatial(e, pads), pads, taps, strides)
        return (expand_to_window(e, len(pads)) - neighbours).square().sum(1)

    @staticmethod
    def backward(ctx, grad):
        (e,) = ctx.saved_tensors
        pads, taps, strides = ctx.window
        dim = len(pads)
        # d/de_j: 2 sum_t [g(j, t) + g(j + o_t, mirror(t))] (e_j - e_(j + o_t))
        both = (grad + mirrored_window_gather(grad, pads, taps, strides)).unsqueeze(1)
        neighbours = window_view(pad_spatial(e, pads), pads, taps, strides)
        return 2 * (both * (expand_to_window(e, dim) - neighbours)).sum(window_dims(dim)), None, None, None


class _WindowWeightedSum(torch.autograd.Function):
    """`window_weighted_sum` for weights (B, 1, *S, *window) and x (B, 1, *S), with a backward by gathers only."""

    @staticmethod
    def forward(ctx, weights, x, pads, taps, strides):
        ctx.save_for_backward(weights, x)
        ctx.window = (pads, taps, strides)
        return window_weighted_sum(weights, x, pads, taps, strides)

    @staticmethod
    def backward(ctx, grad):
        weights, x = ctx.saved_tensors
        pads, taps, strides = ctx.window
        dim = len(pads)
        grad_weights = expand_to_window(grad, dim) * window_view(pad_spatial(x, pads), pads, taps, strides)
        # x(j) entered out(j - o_t) with weight w(j - o_t, t): a mirrored gather of w * grad
        sent = (weights * expand_to_window(grad, dim)).squeeze(1)
        grad_x = mirrored_window_gather(sent, pads, taps, strides).sum(window_dims(dim)).unsqueeze(1)
        return grad_weights, grad_x, None, None, None


def window_squared_distances(e: torch.Tensor, pads: Sequence[int], taps: Sequence[int], strides: Sequence[int]
                             ) -> torch.Tensor:
    """(B, C, *S) -> (B, *S, *window): squared distance of every voxel's e to its window neighbours' (zero padded);
    differentiable, with a backward that gathers (no scatter-add), which torch.compile fuses."""
    return _WindowSquaredDistances.apply(e, list(pads), list(taps), list(strides))


def window_weighted_sum_gathered(weights: torch.Tensor, x: torch.Tensor, pads: Sequence[int], taps: Sequence[int],
                                 strides: Sequence[int]) -> torch.Tensor:
    """`window_weighted_sum` for a 1-channel x, differentiable in both with a backward that gathers only."""
    return _WindowWeightedSum.apply(weights, x, list(pads), list(taps), list(strides))


def window_dims(dim: int) -> tuple[int, ...]:
    """The window axes of a `window_view` result (the last `dim`)."""
    return tuple(range(-dim, 0))


def expand_to_window(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, C, *S) -> (B, C, *S, 1, ..., 1), broadcastable against a window view."""
    return x.reshape(tuple(x.shape) + (1,) * dim)
