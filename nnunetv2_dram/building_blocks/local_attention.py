"""Local affinity attention: refine a lesion logit map by propagating it between feature-similar neighbours.

This is the dRAM "attention" refinement (the authors' PCM, a DGL graph attention over an 18/26 neighbourhood at a
64^3 grid) rebuilt in plain torch for 2-D and 3-D. Each voxel i attends to the neighbours j at the offsets of a
kernel_size^dim cube at every dilation (itself included):

    a_ij = softmax_j( s(f_i, f_j) ),      m'_i = (1 - gamma) m_i + gamma * sum_j a_ij m_j

repeated `iterations` times with the same affinities (a lazy random walk on the affinity graph). gamma is either
learnable (gamma = sigmoid(mix_logit), initialised at `init_mix`, 0.5 by default) or fixed (`learn_mix=False`; up to
1, a full replacement of each voxel by its neighbourhood's weighted mean, as in the authors' PCM). A learnable gamma
gives self-training an easy way out: the refined map is trained towards the thresholded input, which the identity
(gamma -> 0) reproduces best among convex combinations, so gamma collapses instead of the affinities learning where
edges are. With gamma fixed, only the affinities can lower the loss.

Similarity. Default `similarity="distance"`: s_ij = -|e_i - e_j|^2 / sqrt(d), e = theta(f) a 1x1 convolution to d
(= proj_channels) dimensions. It is a true similarity: a voxel's own score (0) is the highest and a neighbour
scores lower the more its features differ, for *any* projection -- so even the untrained module respects feature
edges (a random projection keeps distinct features distinct), and scores are symmetric. The authors' form,
`similarity="relu_dot"`: s_ij = relu(theta(f_i) . phi(f_j)) / sqrt(d), is available for reproduction; it is not a
similarity (a voxel may prefer a dissimilar neighbour, and everything with a negative dot product ties at 0), so
with random weights it does not respect feature edges until trained.

Why logits are propagated. The output must be a logit map (the region pooling and the CRF take logits). Averaging
logits is linear, so the output is a convex combination of input logits: bounded by the input's range, the exact
identity when gamma -> 0, and with gradients that do not vanish where sigmoid saturates. Propagating probabilities
would need a logit(p) at the end, which is unbounded at 0/1 (clamping needed) and squashes gradients of confident
voxels. The price: a very confident neighbour pulls harder than in probability space, which for lesion maps (mostly
confident background, uncertain rims) is the desired behaviour -- uncertain rim voxels follow the confident,
feature-similar side.

Borders. Neighbours are read from a zero-padded copy with shifted slices (no unfold of the feature tensor: memory is
O(K * voxels) for the K affinities, plus O(d * voxels)); a padded neighbour's score is -inf, so it gets zero weight
and the weights over real neighbours still sum to one -- a constant map stays constant up to the border.

Speed. The neighbour distances and the propagation are two custom autograd functions. Plain autograd through K
shifted slices of a padded tensor allocates and zero-fills a padded gradient per slice in the backward pass (it
took 65% of the module's time on the CPU, backward 5x the forward); the custom backward passes accumulate into one
padded buffer instead. The distance to neighbour -d is the distance to +d read one offset back, so only half of
the offsets touch the d-channel features. On CUDA, grids up to offset_windows.STACKED_MAX_VOXELS take the "stacked"
path instead: all neighbours through one window view (offset_windows.py; `offset_mode`), a few kernels rather than a few
per offset, with autograd's backward. That path is the pure function `_stacked_refinement`, so that
`offset_mode="compiled"` can hand it to torch.compile while training (fused multiply-and-sum kernels, no window
temporaries).

Initialisation. Affinities from a randomly initialised projection on locally smooth features are close to uniform
over similar neighbours, so the module starts as a mild edge-aware smoothing, blended with the identity by the mix
(half and half with the default init_mix=0.5; DRAMTrainer uses a fixed mix of 1). It cannot start from garbage: the
output is a convex combination of nearby input logits.

Downsampling. With `downsample` > 1 the map and features are average-pooled by that factor, refined there, and only
the *residual* (refined - pooled) is upsampled (linear interpolation) and added to the full-resolution input, so fine
detail of the input map is kept and the attention only adds the coarse correction (like the authors' 64^3 grid,
with memory and time divided by downsample^dim).

Precision: works under autocast; the neighbour distances, the softmax and the propagation run in float32 (the output is
float32 then).
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunetv2_dram.building_blocks.offset_windows import (check_offset_mode, compiled, expand_to_window, pad_spatial,
                                                          use_compiled, use_stacked, window_dims,
                                                          window_squared_distances, window_view,
                                                          window_weighted_sum_gathered)

SIMILARITIES = ("distance", "relu_dot")


def neighbourhood_offsets(dim: int, kernel_size: int, dilations: Sequence[int]) -> list[tuple[int, ...]]:
    """Offsets of a kernel_size^dim cube at each dilation, the zero offset first, duplicates removed."""
    radius = kernel_size // 2
    offsets = {tuple(d * k for k in combo)
               for d in dilations for combo in itertools.product(range(-radius, radius + 1), repeat=dim)}
    zero = (0,) * dim
    offsets.discard(zero)
    return [zero] + sorted(offsets)


def _shifted_view(padded: torch.Tensor, offset: Sequence[int], pad: int) -> torch.Tensor:
    """View of a tensor padded by `pad` on every spatial side: result[..., i] = original[..., i + offset]."""
    shape = padded.shape[2:]
    return padded[(slice(None), slice(None)) + tuple(slice(pad + o, size - pad + o) for o, size in zip(offset, shape))]


def _pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    return pad_spatial(x, [pad] * (x.ndim - 2))


def _mirror_pairs(offsets: Sequence[tuple[int, ...]]) -> list[tuple[int, int | None]]:
    """(index of an offset computed directly, index of its negative or None) covering every offset once."""
    index = {o: k for k, o in enumerate(offsets)}
    pairs, done = [], set()
    for k, o in enumerate(offsets):
        if k in done:
            continue
        m = index.get(tuple(-v for v in o))
        m = None if m == k else m
        pairs.append((k, m))
        done.update({k} if m is None else {k, m})
    return pairs


class _NeighbourSquaredDistances(torch.autograd.Function):
    """dist_k(i) = sum_c (e_c(i) - e_c(i + offset_k))^2, (B, C, *S) -> (B, K, *S), zero padding outside the volume.

    Entries whose neighbour lies outside the volume are not meaningful (the caller masks them). For a pair of
    offsets +d/-d only +d is computed from e: dist_-d(i) = dist_+d(i - d).
    """

    @staticmethod
    def forward(ctx, e, offsets, pad):
        # float32 at least: a half-precision sum of squared differences overflows at |e| ~ 100
        input_dtype = e.dtype
        e = e.float() if e.dtype in (torch.float16, torch.bfloat16) else e
        pairs = _mirror_pairs(offsets)
        padded_e = _pad(e, pad)
        out = e.new_empty((e.shape[0], len(offsets)) + tuple(e.shape[2:]))
        for k, m in pairs:
            dist = (e - _shifted_view(padded_e, offsets[k], pad)).square_().sum(1, keepdim=True)
            out[:, k:k + 1] = dist
            if m is not None:
                out[:, m:m + 1] = _shifted_view(_pad(dist, pad), offsets[m], pad)
        ctx.save_for_backward(e)
        ctx.offsets, ctx.pad, ctx.pairs, ctx.input_dtype = offsets, pad, pairs, input_dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        (e,) = ctx.saved_tensors
        offsets, pad = ctx.offsets, ctx.pad
        grad = grad.to(e.dtype)
        padded_e = _pad(e, pad)
        padded_grad_out = _pad(grad, pad)
        padded_grad_e = torch.zeros_like(padded_e)
        grad_e = _shifted_view(padded_grad_e, (0,) * (e.ndim - 2), pad)
        for k, m in ctx.pairs:
            g = grad[:, k:k + 1]
            if m is not None:  # dist_-d(i + d) = dist_+d(i): its gradient arrives one offset ahead
                g = g + _shifted_view(padded_grad_out[:, m:m + 1], offsets[k], pad)
            diff = e - _shifted_view(padded_e, offsets[k], pad)
            diff.mul_(2.0 * g)
            grad_e.add_(diff)
            _shifted_view(padded_grad_e, offsets[k], pad).sub_(diff)
        return grad_e.to(ctx.input_dtype).contiguous(), None, None


class _NeighbourWeightedSum(torch.autograd.Function):
    """out(i) = sum_k w_k(i) m(i + offset_k), weights (B, K, *S), map (B, 1, *S), zero padding outside."""

    @staticmethod
    def forward(ctx, weights, values, offsets, pad):
        padded = _pad(values, pad)
        out = torch.zeros_like(values)
        for k, offset in enumerate(offsets):
            out.addcmul_(weights[:, k:k + 1], _shifted_view(padded, offset, pad))
        ctx.save_for_backward(weights, values)
        ctx.offsets, ctx.pad = offsets, pad
        return out

    @staticmethod
    def backward(ctx, grad):
        weights, values = ctx.saved_tensors
        offsets, pad = ctx.offsets, ctx.pad
        grad_weights = grad_values = None
        if ctx.needs_input_grad[0]:
            padded = _pad(values, pad)
            grad_weights = torch.cat([grad * _shifted_view(padded, o, pad) for o in offsets], 1)
        if ctx.needs_input_grad[1]:
            padded_grad_values = torch.zeros_like(_pad(values, pad))
            for k, offset in enumerate(offsets):
                _shifted_view(padded_grad_values, offset, pad).addcmul_(grad, weights[:, k:k + 1])
            grad_values = _shifted_view(padded_grad_values, (0,) * (values.ndim - 2), pad).contiguous()
        return grad_weights, grad_values, None, None


def _grid_window(x: torch.Tensor, pad: int, taps: int, stride: int) -> torch.Tensor:
    """All neighbours of x (B, C, *S) at once: (B, C, *S, *(2 * taps + 1,) * dim), zeros outside the volume."""
    dim = x.ndim - 2
    return window_view(_pad(x, pad), [pad] * dim, [taps] * dim, [stride] * dim)


def _stacked_refinement(embedded: torch.Tensor, key: torch.Tensor | None, logits: torch.Tensor,
                        invalid: torch.Tensor, mix: torch.Tensor, pad: int, taps: int, stride: int, iterations: int,
                        scale: float, gathered_backward: bool = False) -> torch.Tensor:
    """The attention over a grid of offsets as window-view sums, from the projected features (key: phi's
    projection for "relu_dot", None for "distance"); a pure function of tensors, so torch.compile can fuse it.
    gathered_backward: distances and propagation with backward passes that gather instead of scatter-adding
    (offset_windows.mirrored_window_gather), which a compiled graph fuses."""
    dim = logits.ndim - 2
    window = ([pad] * dim, [taps] * dim, [stride] * dim)
    if key is None and gathered_backward:
        scores = window_squared_distances(embedded, *window) * -scale
    elif key is None:
        differences = expand_to_window(embedded, dim) - _grid_window(embedded, pad, taps, stride)
        scores = differences.square().sum(1) * -scale
    else:
        products = expand_to_window(embedded, dim) * _grid_window(key, pad, taps, stride)
        scores = F.relu(products.sum(1)) * scale
    scores = scores.masked_fill(invalid, float("-inf"))
    weights = torch.softmax(scores.flatten(-dim), -1).view_as(scores).unsqueeze(1)
    refined = logits
    for _ in range(iterations):
        if gathered_backward:
            propagated = window_weighted_sum_gathered(weights, refined, *window)
        else:
            propagated = (weights * _grid_window(refined, pad, taps, stride)).sum(window_dims(dim))
        refined = refined + mix * (propagated - refined)
    return refined


class LocalAffinityAttention(nn.Module):
    """Refine logits (B, 1, *S) with affinities computed from features (B, C, *S); see the module docstring."""

    def __init__(self, in_channels: int, dim: int, proj_channels: int = 8, kernel_size: int = 3,
                 dilations: Sequence[int] = (1,), iterations: int = 1, downsample: int = 1,
                 similarity: str = "distance", init_mix: float = 0.5, offset_mode: str = "auto",
                 learn_mix: bool = True):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        if proj_channels < 1 or in_channels < 1:
            raise ValueError("in_channels and proj_channels must be >= 1")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if not (0.0 < init_mix < 1.0 or (not learn_mix and init_mix == 1.0)):
            raise ValueError(f"init_mix must be in (0, 1) (or 1 with learn_mix=False), got {init_mix}")
        self.dim = dim
        self.in_channels = in_channels
        self.proj_channels = proj_channels
        self.similarity = similarity
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        self.theta = conv(in_channels, proj_channels, kernel_size=1)
        self.phi = conv(in_channels, proj_channels, kernel_size=1) if similarity == "relu_dot" else None
        self.learn_mix = bool(learn_mix)
        if learn_mix:
            self.mix_logit = nn.Parameter(torch.tensor(math.log(init_mix / (1.0 - init_mix))))
        else:
            self.fixed_mix = float(init_mix)
        self.configure(kernel_size=kernel_size, dilations=dilations, iterations=iterations, downsample=downsample,
                       offset_mode=offset_mode)

    def configure(self, kernel_size: int, dilations: Sequence[int], iterations: int, downsample: int,
                  offset_mode: str) -> None:
        """(Re)set everything that is not a parameter: neighbourhood, iterations, grid, implementation."""
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        dilations = tuple(int(d) for d in dilations)
        if not dilations or any(d < 1 for d in dilations):
            raise ValueError(f"dilations must be positive integers, got {dilations}")
        if iterations < 1 or downsample < 1:
            raise ValueError("iterations and downsample must be >= 1")
        self.offset_mode = check_offset_mode(offset_mode)
        self.kernel_size = int(kernel_size)
        self.dilations = dilations
        self.iterations = int(iterations)
        self.downsample = int(downsample)
        self.offsets = neighbourhood_offsets(self.dim, kernel_size, dilations)
        self.pad = max(dilations) * (kernel_size // 2)
        self._invalid_cache: tuple | None = None  # (shape, device) -> mask of neighbours outside the volume
        # one dilation: the offsets are a grid, so the stacked implementation (offset_windows.py) applies
        self._grid = (kernel_size // 2, dilations[0]) if len(set(dilations)) == 1 else None
        self._invalid_grid_cache: tuple | None = None

    def mix(self) -> torch.Tensor | float:
        """gamma: how much of each voxel's value is replaced by its neighbourhood's weighted mean per iteration."""
        return torch.sigmoid(self.mix_logit.float()) if self.learn_mix else self.fixed_mix

    def settings(self) -> dict:
        """What `configure` takes, plus the settings that shape the parameters (which `configure` cannot change)."""
        return {"kernel_size": self.kernel_size, "dilations": list(self.dilations), "iterations": self.iterations,
                "downsample": self.downsample, "offset_mode": self.offset_mode, "proj_channels": self.proj_channels,
                "similarity": self.similarity, "in_channels": self.in_channels, "learn_mix": self.learn_mix,
                "fixed_mix": None if self.learn_mix else self.fixed_mix}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, neighbours={len(self.offsets)}, iterations={self.iterations}, "
                f"downsample={self.downsample}, similarity={self.similarity!r}, offset_mode={self.offset_mode!r}")

    # ------------------------------------------------------------------------------------------------ helpers
    def _invalid_neighbours(self, shape, device) -> torch.Tensor:
        """(1, K, *S) True where offset k of voxel i points outside the volume; kept for the last shape seen, since
        training calls this every step with the same patch size."""
        key = (tuple(shape), torch.device(device))
        if self._invalid_cache is not None and self._invalid_cache[0] == key:
            return self._invalid_cache[1]
        invalid = torch.ones((1, len(self.offsets)) + tuple(shape), dtype=torch.bool, device=device)
        for k, offset in enumerate(self.offsets):
            inside = tuple(slice(max(0, -o), size - max(0, o)) for o, size in zip(offset, shape))
            invalid[(0, k) + inside] = False
        self._invalid_cache = (key, invalid)
        return invalid

    def affinities(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention weights (B, K, *S) over `self.offsets`; each voxel's weights sum to one. With a region `mask`
        (B, 1, *S), a voxel only attends to neighbours on its own side of the region's border."""
        embedded = self.theta(features)
        scale = 1.0 / math.sqrt(self.proj_channels)
        if self.similarity == "distance":
            # offset 0 is exactly 0 (a voxel's distance to itself), not computed
            distances = _NeighbourSquaredDistances.apply(embedded, self.offsets[1:], self.pad)
            scores = torch.cat([torch.zeros_like(distances[:, :1]), distances], 1).float() * -scale
        else:
            padded_key = _pad(self.phi(features), self.pad)
            scores = torch.cat([F.relu((embedded * _shifted_view(padded_key, o, self.pad)).sum(1, keepdim=True)).float()
                                for o in self.offsets], 1) * scale
        invalid = self._invalid_neighbours(features.shape[2:], features.device)
        if mask is not None:
            inside = mask > 0.5
            padded = _pad(inside.to(torch.uint8), self.pad)
            crossing = torch.cat([_shifted_view(padded, o, self.pad).bool() != inside for o in self.offsets], 1)
            invalid = invalid | crossing
        scores = scores.masked_fill(invalid, float("-inf"))
        return torch.softmax(scores, dim=1)

    def _propagate(self, weights: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return _NeighbourWeightedSum.apply(weights, logits, self.offsets, self.pad)

    def _invalid_window(self, shape, device) -> torch.Tensor:
        """(*S, *window) True where the neighbour lies outside the volume (kept for the last shape seen)."""
        key = (tuple(shape), torch.device(device))
        if self._invalid_grid_cache is None or self._invalid_grid_cache[0] != key:
            inside = _grid_window(torch.ones((1, 1) + tuple(shape), device=device), self.pad, *self._grid)[0, 0] > 0.5
            self._invalid_grid_cache = (key, ~inside)
        return self._invalid_grid_cache[1]

    def _refine_stacked(self, logits: torch.Tensor, features: torch.Tensor, mask: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """`_refine` with every neighbour read through one window view (a few kernels instead of a few per
        offset), compiled into fused kernels in offset mode "compiled"; the same numbers up to float rounding, with
        autograd's backward."""
        embedded = self.theta(features).float()
        key = None if self.phi is None else self.phi(features).float()
        invalid = self._invalid_window(features.shape[2:], features.device)
        if mask is not None:
            inside = (mask > 0.5).to(torch.uint8)
            crossing = _grid_window(inside, self.pad, *self._grid)[:, 0] != expand_to_window(inside, self.dim)[:, 0]
            invalid = invalid | crossing
        mix = self.mix()
        fused = use_compiled(self.offset_mode)
        refine = compiled(_stacked_refinement) if fused else _stacked_refinement
        return refine(embedded, key, logits.float(), invalid, mix, self.pad, *self._grid, self.iterations,
                      1.0 / math.sqrt(self.proj_channels), gathered_backward=fused)

    def _refine(self, logits: torch.Tensor, features: torch.Tensor, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        if self._grid is not None and use_stacked(self.offset_mode, logits):
            return self._refine_stacked(logits, features, mask)
        weights = self.affinities(features, mask)
        mix = self.mix()
        refined = logits.float()
        for _ in range(self.iterations):
            refined = refined + mix * (self._propagate(weights, refined) - refined)
        return refined

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, logits: torch.Tensor, features: torch.Tensor, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Refined logits (B, 1, *S) from logits (B, 1, *S) and features (B, in_channels, *S). mask (B, 1, *S),
        optional: a region; no voxel then attends across its border (inside and outside are refined apart)."""
        if logits.ndim != self.dim + 2 or logits.shape[1] != 1:
            raise ValueError(f"logits must be (B, 1, *S) with {self.dim} spatial axes; got {tuple(logits.shape)}")
        if (features.ndim != logits.ndim or features.shape[0] != logits.shape[0]
                or features.shape[1] != self.in_channels or features.shape[2:] != logits.shape[2:]):
            raise ValueError(f"features must be (B={logits.shape[0]}, {self.in_channels}, "
                             f"{', '.join(map(str, logits.shape[2:]))}); got {tuple(features.shape)} -- resample "
                             f"the features to the map's grid first")
        if mask is not None and (mask.shape[0] != logits.shape[0] or mask.shape[1] != 1
                                 or mask.shape[2:] != logits.shape[2:]):
            raise ValueError(f"mask must be (B, 1, *S) matching logits {tuple(logits.shape)}; got {tuple(mask.shape)}")
        if self.downsample == 1:
            return self._refine(logits, features, mask)
        size = tuple(logits.shape[2:])
        coarse_size = tuple(max(1, math.ceil(s / self.downsample)) for s in size)
        pool = F.adaptive_avg_pool3d if self.dim == 3 else F.adaptive_avg_pool2d
        coarse_logits = pool(logits, coarse_size)
        coarse_features = pool(features, coarse_size)
        coarse_mask = None if mask is None else (pool(mask.float(), coarse_size) > 0.5).float()
        residual = self._refine(coarse_logits, coarse_features, coarse_mask) - coarse_logits.float()
        mode = "trilinear" if self.dim == 3 else "bilinear"
        return logits.float() + F.interpolate(residual, size=size, mode=mode, align_corners=False)
