"""Local affinity attention: refine a lesion logit map by propagating it between feature-similar neighbours.

This is the dRAM "attention" refinement (the authors' PCM, a DGL graph attention over an 18/26 neighbourhood at a
64^3 grid) rebuilt in plain torch for 2-D and 3-D. Each voxel i attends to the neighbours j at the offsets of a
kernel_size^dim cube at every dilation (itself included):

    a_ij = softmax_j( s(f_i, f_j) ),      m'_i = (1 - gamma) m_i + gamma * sum_j a_ij m_j

repeated `iterations` times with the same affinities (a lazy random walk on the affinity graph). gamma =
sigmoid(mix_logit) is learnable, initialised at 0.5.

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

Initialisation. Affinities from a randomly initialised projection on locally smooth features are close to uniform
over similar neighbours, so the module starts as a mild edge-aware smoothing blended half with the identity (it
cannot start from garbage: the output is a convex combination of nearby input logits).

Downsampling. With `downsample` > 1 the map and features are average-pooled by that factor, refined there, and only
the *residual* (refined - pooled) is upsampled (linear interpolation) and added to the full-resolution input, so fine
detail of the input map is kept and the attention only adds the coarse correction (like the authors' 64^3 grid,
with memory and time divided by downsample^dim).

Precision: works under autocast; the softmax and the propagation run in float32 (the output is float32 then).
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

SIMILARITIES = ("distance", "relu_dot")


def neighbourhood_offsets(dim: int, kernel_size: int, dilations: Sequence[int]) -> list[tuple[int, ...]]:
    """Offsets of a kernel_size^dim cube at each dilation, the zero offset first, duplicates removed."""
    radius = kernel_size // 2
    offsets = {tuple(d * k for k in combo)
               for d in dilations for combo in itertools.product(range(-radius, radius + 1), repeat=dim)}
    zero = (0,) * dim
    offsets.discard(zero)
    return [zero] + sorted(offsets)


class LocalAffinityAttention(nn.Module):
    """Refine logits (B, 1, *S) with affinities computed from features (B, C, *S); see the module docstring."""

    def __init__(self, in_channels: int, dim: int, proj_channels: int = 8, kernel_size: int = 3,
                 dilations: Sequence[int] = (1,), iterations: int = 1, downsample: int = 1,
                 similarity: str = "distance", init_mix: float = 0.5):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        dilations = tuple(int(d) for d in dilations)
        if not dilations or any(d < 1 for d in dilations):
            raise ValueError(f"dilations must be positive integers, got {dilations}")
        if iterations < 1 or downsample < 1 or proj_channels < 1 or in_channels < 1:
            raise ValueError("in_channels, proj_channels, iterations and downsample must be >= 1")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if not 0.0 < init_mix < 1.0:
            raise ValueError(f"init_mix must be in (0, 1), got {init_mix}")
        self.dim = dim
        self.in_channels = in_channels
        self.proj_channels = proj_channels
        self.iterations = int(iterations)
        self.downsample = int(downsample)
        self.similarity = similarity
        self.offsets = neighbourhood_offsets(dim, kernel_size, dilations)
        self.pad = max(dilations) * (kernel_size // 2)
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        self.theta = conv(in_channels, proj_channels, kernel_size=1)
        self.phi = conv(in_channels, proj_channels, kernel_size=1) if similarity == "relu_dot" else None
        self.mix_logit = nn.Parameter(torch.tensor(math.log(init_mix / (1.0 - init_mix))))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, neighbours={len(self.offsets)}, iterations={self.iterations}, "
                f"downsample={self.downsample}, similarity={self.similarity!r}")

    # ------------------------------------------------------------------------------------------------ helpers
    def _shifted(self, padded: torch.Tensor, offset: Sequence[int]) -> torch.Tensor:
        shape = padded.shape[2:]
        index = (slice(None), slice(None)) + tuple(
            slice(self.pad + o, size - self.pad + o) for o, size in zip(offset, shape))
        return padded[index]

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, [self.pad] * (2 * self.dim))

    def affinities(self, features: torch.Tensor) -> torch.Tensor:
        """Attention weights (B, K, *S) over `self.offsets`; each voxel's weights sum to one."""
        embedded = self.theta(features)
        scale = 1.0 / math.sqrt(self.proj_channels)
        padded = self._padded(embedded)
        if self.similarity == "distance":
            sq_norm = embedded.square().sum(1, keepdim=True)
            padded_sq_norm = self._padded(sq_norm)
        else:
            padded_key = self._padded(self.phi(features))
        valid_padded = self._padded(torch.ones((1, 1) + tuple(features.shape[2:]), device=features.device,
                                               dtype=torch.bool))
        scores, valid = [], []
        for offset in self.offsets:
            if self.similarity == "distance":
                if not any(offset):
                    # exact 0 rather than a rounding residue of |e|^2 + |e|^2 - 2 e.e
                    score = torch.zeros_like(sq_norm)
                else:
                    # |e_i - e_j|^2 via norms and a dot product: autograd then keeps only views, not K copies of e
                    dot = (embedded * self._shifted(padded, offset)).sum(1, keepdim=True)
                    score = -(sq_norm + self._shifted(padded_sq_norm, offset) - 2.0 * dot).clamp_min(0.0) * scale
            else:
                score = F.relu((embedded * self._shifted(padded_key, offset)).sum(1, keepdim=True)) * scale
            scores.append(score.float())
            valid.append(self._shifted(valid_padded, offset))
        scores = torch.cat(scores, 1).masked_fill(~torch.cat(valid, 1), float("-inf"))
        return torch.softmax(scores, dim=1)

    def _propagate(self, weights: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        padded = self._padded(logits)
        out = weights[:, :1] * logits
        for k, offset in enumerate(self.offsets[1:], start=1):
            out = out + weights[:, k:k + 1] * self._shifted(padded, offset)
        return out

    def _refine(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        weights = self.affinities(features)
        mix = torch.sigmoid(self.mix_logit.float())
        refined = logits.float()
        for _ in range(self.iterations):
            refined = refined + mix * (self._propagate(weights, refined) - refined)
        return refined

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Refined logits (B, 1, *S) from logits (B, 1, *S) and features (B, in_channels, *S)."""
        if logits.ndim != self.dim + 2 or logits.shape[1] != 1:
            raise ValueError(f"logits must be (B, 1, *S) with {self.dim} spatial axes; got {tuple(logits.shape)}")
        if (features.ndim != logits.ndim or features.shape[0] != logits.shape[0]
                or features.shape[1] != self.in_channels or features.shape[2:] != logits.shape[2:]):
            raise ValueError(f"features must be (B={logits.shape[0]}, {self.in_channels}, "
                             f"{', '.join(map(str, logits.shape[2:]))}); got {tuple(features.shape)} -- resample "
                             f"the features to the map's grid first")
        if self.downsample == 1:
            return self._refine(logits, features)
        size = tuple(logits.shape[2:])
        coarse_size = tuple(max(1, math.ceil(s / self.downsample)) for s in size)
        pool = F.adaptive_avg_pool3d if self.dim == 3 else F.adaptive_avg_pool2d
        coarse_logits = pool(logits, coarse_size)
        coarse_features = pool(features, coarse_size)
        residual = self._refine(coarse_logits, coarse_features) - coarse_logits.float()
        mode = "trilinear" if self.dim == 3 else "bilinear"
        return logits.float() + F.interpolate(residual, size=size, mode=mode, align_corners=False)
