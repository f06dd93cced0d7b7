"""Trainable binary dense CRF (mean field) over a lesion logit map, 2-D or 3-D, in pure torch.

Model
-----
Labels are background (0) and lesion (1). For voxels i inside the mask the free energy of the mean-field
marginals Q_i(l) is

    F(Q) = sum_i sum_l Q_i(l) U_i(l)  +  sum_i sum_l Q_i(l) log Q_i(l)
           + 1/2 sum_{l,l'} mu(l, l') sum_{i,j} Q_i(l) [w_s K_s + w_b K_b]_ij Q_j(l')

with unaries U_i(1) = -log sigmoid(z_i), U_i(0) = -log(1 - sigmoid(z_i)) from the input logits z, the Potts label
compatibility mu (0 on the diagonal, 1 off it; fixed, so the model stays a smoother and cannot learn to reverse or
amplify contrast), two non-negative kernel weights and two normalised kernels:

* spatial   K_s(i, j) ~ exp(-|p_i - p_j|^2 / 2 theta_gamma^2)                      (p in millimetres)
* bilateral K_b(i, j) ~ exp(-|p_i - p_j|^2 / 2 theta_alpha^2 - |I_i - I_j|^2 / 2 theta_beta^2)

The parallel mean-field update Q_i(l) ∝ exp(-U_i(l) - sum_l' mu(l,l') [w_s K_s Q(l') + w_b K_b Q(l')]_i) is applied
`iterations` times; the returned map is the final log(Q_i(1) / Q_i(0)), i.e. a logit map again.

Design choices
--------------
Millimetres. All kernel widths are physical (mm) and are turned into voxels per axis with the voxel spacing, so a
coarse through-plane axis gets proportionally fewer voxels. Spacing is given in the same axis order as the tensor's
spatial axes (nnU-Net's (z, y, x) order for preprocessed data).

Normalisation. Each kernel is normalised symmetrically, K~ = D^-1/2 K D^-1/2 with D the row sums (over the voxels
that exist: inside the volume and inside the mask). This is what pydensecrf/densecrf does by default
(NORMALIZE_SYMMETRIC), so `w_spatial`/`w_bilateral` mean the same in both backends, and it makes a message a
*weighted average* of the neighbours' marginals (about 1 for a voxel surrounded by lesion) whatever the number of
voxels the kernel covers. Hence the weights mean "how many logits a fully agreeing neighbourhood adds" in 2-D and in
3-D alike, at any spacing.

Strength. With Potts, a voxel's logit moves by up to +-(w_spatial + w_bilateral): towards lesion where its kernel
neighbourhood is lesion, towards background where it is background. A lesion smaller than the kernels sees mostly
background, so strong weights erase it: at densecrf's photograph weights (3 and 5) a 5 mm-radius lesion with a unary
probability of 0.7 on a flat image vanishes completely. The trainable defaults are 0.5 and 0.5, under which such a
lesion keeps all of its voxels in 2-D and 3-D (tests/test_dense_crf.py), and learnable weights are bounded:
w = max_kernel_weight * sigmoid(raw), max_kernel_weight = 1 by default. Fixed weights (learnable=False, the
pseudo-label CRF's torch backend) are taken as given.
The symmetric (rather than row) normalisation keeps K~ symmetric, which the free energy above needs.

Self term and convergence. Like densecrf the kernels include the voxel itself (k_ii = 1). Both kernels are made
positive semidefinite: the per-axis tap weights of each separable spatial profile get the smallest centre increment
that makes their Fourier symbol non-negative (truncating a sampled Gaussian leaves it slightly negative), and a
product of PSD Toeplitz factors times a Gaussian intensity kernel (Schur product) restricted to the mask is PSD. With
the Potts compatibility the pairwise term is then concave in Q and the parallel mean-field update is a concave-convex
step that never increases F (Kraehenbuehl & Koltun, ICML 2013) -- the test checks this.

Spatial kernel. Exact separable 1-D convolutions with the sampled Gaussian truncated at 3 sigma per axis.

Bilateral kernel: the approximation. A fully connected CRF (Kraehenbuehl & Koltun 2011) sums over *all* voxel pairs
with a permutohedral-lattice filter that is itself approximate (it blurs in a down-sampled 4-/5-D feature space).
Here the bilateral sum runs over a local window of offsets instead: per axis the taps sit at k * stride voxels for
k = -window..window, with the stride chosen so the outermost tap reaches `bilateral_reach_sigmas` theta_alpha (in
mm); offsets are the Cartesian product of the per-axis taps (5^3 = 125 in 3-D with window 2, 7^2 = 49 in 2-D with
window 3). Each tap stands for stride^dim voxels, so the normalised kernel is a coarse quadrature of the Gaussian
window. Two errors against the fully connected model: (1) truncation: pairs beyond the reach are dropped, so
information spreads at most `iterations * reach` per call; (2) sparse sampling: voxels between taps are skipped,
so a structure smaller than the stride only talks to itself and its own taps, and a wall thinner than the stride can
be jumped. With a fixed number of taps the two pull in opposite directions. Measured against pydensecrf on noisy
spheres (3-D, window 2, theta_alpha = 8 voxels): a 5-voxel-radius sphere agrees best with short reach (thresholded
IoU 0.92 / 0.88 / 0.85 at reach 1 / 1.5 / 2 sigma), a 7-voxel one at 0.998 / 0.987 / 0.957; window 3 raises these
to 0.99 / 0.93 / 0.92 and 0.998 / 0.999 / 0.995 at 2.7x the cost. The default reach of 1.5 sigma is the compromise
(the cube then still holds 65% of the Gaussian's mass in 3-D). The window is a constructor argument; lesions
much smaller than theta_alpha in voxels are where a larger window (or the pydensecrf backend) pays off.

Memory. The bilateral weights are pre-computed once per call (they depend on the image, not on Q). The kernel is
symmetric, so only one of each pair of mirrored offsets is stored: about ((n_offsets - 1) / 2 + 10) * voxels * 4 bytes
(62 stored offsets in 3-D with window 2; `kernel_dtype=torch.float16` halves the stack). The message operator is
symmetric too, so its backward pass is the same operator applied to the incoming gradient (a custom autograd
function): autograd keeps no per-offset tensors, only O(voxels) per iteration. For volumes that do not fit,
`refine_large` processes overlapping tiles without gradients. On CUDA, volumes up to
offset_windows.STACKED_MAX_VOXELS take the "stacked" path (`offset_mode`): all window weights stored (the voxel's own
included, about n_offsets * voxels * 4 bytes) and each message one multiply-and-sum over a window view, so a message
is a few kernel launches instead of a few per offset.

Precision. The CRF runs in float32 (float64 for float64 inputs) with autocast disabled inside; it accepts fp16
inputs and returns the input dtype.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunetv2_dram.building_blocks.offset_windows import (check_offset_mode, compiled, expand_to_window, pad_spatial,
                                                          use_compiled, use_stacked, window_dims, window_view,
                                                          window_weighted_sum)

#: logit written for voxels outside the mask (sigmoid ~ 2e-9): clamped to background.
OUTSIDE_MASK_LOGIT = -20.0
_SPATIAL_TRUNCATE_SIGMAS = 3.0


def psd_gaussian_taps(tap_positions_mm: np.ndarray, sigma_mm: float) -> np.ndarray:
    """Gaussian weights at symmetric tap positions (index k = -r..r), centre raised just enough for a PSD kernel.

    The Fourier symbol of the tap sequence is w_0 + 2 sum_k w_k cos(k omega); truncation can make it dip below zero.
    Its minimum is found on a grid fine enough that the bound from the second derivative, added as a margin, covers
    the true minimum; the centre weight is raised by the deficit.
    """
    positions = np.asarray(tap_positions_mm, dtype=np.float64)
    radius = (len(positions) - 1) // 2
    weights = np.exp(-0.5 * (positions / sigma_mm) ** 2)
    if radius == 0:
        return weights
    k = np.arange(1, radius + 1)
    side = weights[radius + 1:]
    n_grid = 64 * (radius + 1)
    omega = np.linspace(0.0, np.pi, n_grid + 1)
    symbol = weights[radius] + 2.0 * (side[None, :] * np.cos(omega[:, None] * k[None, :])).sum(1)
    grid_step = np.pi / n_grid
    curvature_bound = 2.0 * float((side * k ** 2).sum())
    margin = 0.5 * curvature_bound * (grid_step / 2.0) ** 2
    deficit = margin - float(symbol.min())
    if deficit > 0:
        weights[radius] += deficit
    return weights


def _spacing_rows(spacing, batch: int, dim: int) -> list[tuple[float, ...]]:
    """Spacing as a list of `batch` tuples of `dim` positive floats (mm)."""
    if isinstance(spacing, torch.Tensor):
        array = spacing.detach().to("cpu", torch.float64).numpy()
    else:
        array = np.asarray(spacing, dtype=np.float64)
    if array.ndim == 1:
        array = np.broadcast_to(array, (batch, array.shape[0]))
    if array.ndim != 2 or array.shape != (batch, dim):
        raise ValueError(f"spacing must be {dim} floats (mm per spatial axis, in the tensor's axis order) or a "
                         f"(batch={batch}, {dim}) tensor; got shape {tuple(array.shape)}")
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ValueError(f"spacing must be positive and finite (mm); got {array.tolist()}")
    return [tuple(float(v) for v in row) for row in array]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (gradient checks); everything else runs in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _shifted(padded: torch.Tensor, offset: Sequence[int], pads: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """View of `padded` such that result[..., i] = original[..., i + offset] (zeros where that is outside)."""
    index = [slice(None), slice(None)]
    index += [slice(p + o, p + o + s) for o, p, s in zip(offset, pads, shape)]
    return padded[tuple(index)]



class _SymmetricOperatorFn(torch.autograd.Function):
    """y = K x for a symmetric linear operator K: the vector-Jacobian product is K g, so nothing is saved."""

    @staticmethod
    def forward(ctx, x, operator):
        ctx.operator = operator
        return operator(x)

    @staticmethod
    def backward(ctx, grad_output):
        return ctx.operator(grad_output), None


class _NormalisedSpatialKernel:
    """x -> D^-1/2 G D^-1/2 x with G a separable truncated Gaussian (zero padded) restricted to the mask."""

    def __init__(self, mask: torch.Tensor, spacing: Sequence[float], sigma_mm: float, stacked: bool = False,
                 compile_sums: bool = False):
        self.dim = mask.ndim - 2
        self.stacked = stacked
        self.axis_sum = compiled(_axis_window_sum) if compile_sums else _axis_window_sum
        self.tap_values: list[list[float]] = []  # per axis: weights of offsets 0, 1, ..., radius
        self.radii: list[int] = []
        for step_mm in spacing:
            radius = max(1, int(math.ceil(_SPATIAL_TRUNCATE_SIGMAS * sigma_mm / step_mm)))
            weights = psd_gaussian_taps(np.arange(-radius, radius + 1) * step_mm, sigma_mm)
            self.tap_values.append([float(w) for w in weights[radius:]])
            self.radii.append(radius)
        row_sums = self._convolve(mask)
        self.scale = torch.where(mask > 0, row_sums.clamp_min(1e-12).rsqrt(), torch.zeros_like(mask))

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        if self.stacked:
            return self._convolve_stacked(x)
        # Shifted in-place accumulation; torch's CPU conv3d has no fast path for 1-channel 1-D kernels.
        for axis, (taps, radius) in enumerate(zip(self.tap_values, self.radii)):
            pads = [radius if a == axis else 0 for a in range(self.dim)]
            padded = pad_spatial(x, pads)
            shape = tuple(x.shape[2:])
            out = x * taps[0]
            for k in range(1, radius + 1):
                forward_offset = [k if a == axis else 0 for a in range(self.dim)]
                backward_offset = [-k if a == axis else 0 for a in range(self.dim)]
                out.add_(_shifted(padded, forward_offset, pads, shape), alpha=taps[k])
                out.add_(_shifted(padded, backward_offset, pads, shape), alpha=taps[k])
            x = out
        return x

    def _convolve_stacked(self, x: torch.Tensor) -> torch.Tensor:
        # one windowed multiply-and-sum per axis (a 1-channel conv would run in TF32 under cuDNN's defaults)
        for axis, (taps, radius) in enumerate(zip(self.tap_values, self.radii)):
            x = self.axis_sum(x, _device_constant(tuple(taps[:0:-1] + taps), x.device, x.dtype), axis, radius)
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self._convolve(self.scale * x)


def _axis_window_sum(x: torch.Tensor, kernel: torch.Tensor, axis: int, radius: int) -> torch.Tensor:
    """x (B, C, *S) convolved along one spatial axis with the 2 * radius + 1 taps of kernel, zero padded."""
    pads = [radius if a == axis else 0 for a in range(x.ndim - 2)]
    return (pad_spatial(x, pads).unfold(2 + axis, 2 * radius + 1, 1) * kernel).sum(-1)


def _stacked_bilateral_weights(guide: torch.Tensor, log_spatial: torch.Tensor, pads: list[int], taps: list[int],
                               strides: list[int], neg_inv_two_var: float) -> torch.Tensor:
    """(B, 1, *S, *window) spatial x intensity weights of every window offset; zero outside the volume."""
    # Neighbours outside the volume get weight 0 through an infinite guide value: exp(-inf) = 0.
    neighbours = window_view(pad_spatial(guide, pads, float("inf")), pads, taps, strides)
    squared = (expand_to_window(guide, guide.ndim - 2) - neighbours).square().sum(1, keepdim=True)
    return (squared * neg_inv_two_var + log_spatial).exp()


@functools.lru_cache(maxsize=64)
def _device_constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant tensor, copied to the device once: a host-to-device copy per call would make the CPU wait
    for the GPU (a pageable copy synchronises the stream) and stop it from queueing work ahead."""
    return torch.tensor(values, dtype=dtype, device=device)


def _bilateral_axis_taps(spacing: Sequence[float], sigma_mm: float, window: int, reach_sigmas: float):
    """Per axis (number of taps per side n, stride in voxels, PSD tap weights for k = -n..n)."""
    axis_taps = []
    for step_mm in spacing:
        reach_vox = reach_sigmas * sigma_mm / step_mm
        stride = max(1, int(round(reach_vox / window)))
        n_taps = min(window, int(round(reach_vox / stride)))
        positions = np.arange(-n_taps, n_taps + 1) * stride
        axis_taps.append((n_taps, stride, psd_gaussian_taps(positions * step_mm, sigma_mm)))
    return axis_taps


class _NormalisedBilateralKernel:
    """x -> D^-1/2 B D^-1/2 x, B(i, i+d) = s(d) exp(-|I_i - I_(i+d)|^2 / 2 beta^2) over the window offsets d.

    B is symmetric, B(i, i+d) = B(i+d, i), so only the weights k_d(i) = B(i, i+d) of the offsets d in one half of
    the window (lexicographically positive) are stored; the mirrored offset's contribution k_d(i-d) x(i-d) is added
    by accumulating k_d * x into the output shifted by +d. That halves memory and set-up time.
    """

    def __init__(self, guide: torch.Tensor, mask: torch.Tensor | None, spacing: Sequence[float], sigma_mm: float,
                 intensity_sigma: float, window: int, reach_sigmas: float, kernel_dtype: torch.dtype):
        self.shape = tuple(guide.shape[2:])
        axis_taps = [(np.arange(-n, n + 1) * stride, weights)
                     for n, stride, weights in _bilateral_axis_taps(spacing, sigma_mm, window, reach_sigmas)]
        self.pads = [int(positions.max()) for positions, _ in axis_taps]
        self.offsets: list[tuple[int, ...]] = []
        log_spatial_weights = []
        self_weight = 1.0
        for combo in itertools.product(*[list(zip(p.tolist(), w.tolist())) for p, w in axis_taps]):
            offset = tuple(int(pos) for pos, _ in combo)
            weight = float(np.prod([w for _, w in combo]))
            if not any(offset):
                self_weight = weight
            elif offset > (0,) * len(offset):
                self.offsets.append(offset)
                log_spatial_weights.append(math.log(weight))
        # Neighbours outside the volume get weight 0 through an infinite guide value: exp(-inf) = 0.
        guide_padded = pad_spatial(guide, self.pads, float("inf"))
        mask_padded = None if mask is None else pad_spatial(mask, self.pads)
        neg_inv_two_var = -1.0 / (2.0 * intensity_sigma ** 2)
        self.weights = torch.empty((len(self.offsets),) + tuple(guide.shape[:1]) + (1,) + self.shape,
                                   dtype=kernel_dtype, device=guide.device)
        for n, (offset, log_spatial) in enumerate(zip(self.offsets, log_spatial_weights)):
            difference = guide - _shifted(guide_padded, offset, self.pads, self.shape)
            if guide.shape[1] == 1:
                exponent = torch.addcmul(torch.tensor(log_spatial, dtype=guide.dtype, device=guide.device),
                                         difference, difference, value=neg_inv_two_var)
            else:
                exponent = difference.square_().sum(1, keepdim=True).mul_(neg_inv_two_var).add_(log_spatial)
            weight = self.weights[n]
            weight.copy_(exponent.exp_())
            if mask is not None:
                weight.mul_(mask).mul_(_shifted(mask_padded, offset, self.pads, self.shape))
        self.self_weight = self_weight if mask is None else self_weight * mask
        row_sums = self._unnormalised(torch.ones_like(guide[:, :1]))
        self.scale = row_sums.clamp_min(1e-12).rsqrt()
        if mask is not None:
            self.scale = self.scale * mask

    def _unnormalised(self, x: torch.Tensor) -> torch.Tensor:
        x_padded = pad_spatial(x, self.pads)
        out_padded = torch.zeros_like(x_padded)
        out = _shifted(out_padded, (0,) * len(self.shape), self.pads, self.shape)
        out.copy_(x * self.self_weight)
        for weight, offset in zip(self.weights, self.offsets):
            out.addcmul_(weight, _shifted(x_padded, offset, self.pads, self.shape))
            # mirrored offset: out(i + d) += k_d(i) x(i)
            _shifted(out_padded, offset, self.pads, self.shape).addcmul_(weight, x)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self._unnormalised(self.scale * x)


class _StackedBilateralKernel:
    """The operator of `_NormalisedBilateralKernel` from one window view per call (see offset_windows.py): the
    weights of all (2n+1)^dim offsets are stored, the voxel itself included, twice the loop version's memory."""

    def __init__(self, guide: torch.Tensor, mask: torch.Tensor | None, spacing: Sequence[float], sigma_mm: float,
                 intensity_sigma: float, window: int, reach_sigmas: float, kernel_dtype: torch.dtype,
                 compile_sums: bool = False):
        self.dim = guide.ndim - 2
        axis_taps = _bilateral_axis_taps(spacing, sigma_mm, window, reach_sigmas)
        self.taps = [n for n, _, _ in axis_taps]
        self.strides = [stride for _, stride, _ in axis_taps]
        self.pads = [n * stride for n, stride, _ in axis_taps]
        # log of the separable spatial weight of every window offset, shaped like the window axes
        log_spatial = torch.zeros((), dtype=guide.dtype, device=guide.device)
        for axis, (_, _, weights) in enumerate(axis_taps):
            shape = [1] * self.dim
            shape[axis] = len(weights)
            axis_log = _device_constant(tuple(np.log(weights).tolist()), guide.device, guide.dtype)
            log_spatial = log_spatial + axis_log.view(shape)
        make_weights = compiled(_stacked_bilateral_weights) if compile_sums else _stacked_bilateral_weights
        self.weighted_sum = compiled(window_weighted_sum) if compile_sums else window_weighted_sum
        self.weights = make_weights(guide, log_spatial, self.pads, self.taps, self.strides,
                                    -1.0 / (2.0 * intensity_sigma ** 2)).to(kernel_dtype)
        if mask is not None:
            mask_neighbours = window_view(pad_spatial(mask, self.pads), self.pads, self.taps, self.strides)
            self.weights.mul_(expand_to_window(mask, self.dim) * mask_neighbours)
        self.scale = self.weights.sum(window_dims(self.dim), dtype=guide.dtype).clamp_min(1e-12).rsqrt()
        if mask is not None:
            self.scale = self.scale * mask

    def _unnormalised(self, x: torch.Tensor) -> torch.Tensor:
        return self.weighted_sum(self.weights, x, self.pads, self.taps, self.strides)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self._unnormalised(self.scale * x)


class TrainableDenseCRF(nn.Module):
    """Binary mean-field dense CRF with learnable, bounded kernel weights and a Potts compatibility (see module
    docstring).

    Args:
        dim: 2 or 3 spatial dimensions.
        iterations: mean-field iterations.
        spatial_sigma_mm: theta_gamma of the spatial (smoothness) kernel.
        bilateral_sigma_mm: theta_alpha, the spatial extent of the bilateral (appearance) kernel.
        intensity_sigma: theta_beta, in the units of the guidance image fed to `forward`.
        window: bilateral taps per side and axis (default 3 in 2-D, 2 in 3-D).
        bilateral_reach_sigmas: the outermost bilateral tap sits at this many theta_alpha (per axis).
        w_spatial, w_bilateral: initial (or, with learnable=False, fixed) kernel weights.
        learnable: whether the kernel weights are parameters (else fixed).
        max_kernel_weight: upper bound of a learnable kernel weight (w = max_kernel_weight * sigmoid(raw)).
        kernel_dtype: storage dtype of the pre-computed bilateral weights (float16 halves their memory).
        offset_mode: "auto" (default: one window view per message on CUDA, the per-offset loop otherwise),
            "stacked", "loop" or "compiled" (while training: the stacked sums through torch.compile); the same
            numbers up to float rounding, see offset_windows.py.
    """

    def __init__(self, dim: int, iterations: int = 5, spatial_sigma_mm: float = 3.0, bilateral_sigma_mm: float = 8.0,
                 intensity_sigma: float = 0.15, window: int | None = None, bilateral_reach_sigmas: float = 1.5,
                 w_spatial: float = 0.5, w_bilateral: float = 0.5, learnable: bool = True,
                 kernel_dtype: torch.dtype = torch.float32, offset_mode: str = "auto", max_kernel_weight: float = 1.0):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        for name, value in (("w_spatial", w_spatial), ("w_bilateral", w_bilateral)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        self.dim = dim
        self.configure(iterations=iterations, spatial_sigma_mm=spatial_sigma_mm,
                       bilateral_sigma_mm=bilateral_sigma_mm, intensity_sigma=intensity_sigma, window=window,
                       bilateral_reach_sigmas=bilateral_reach_sigmas, offset_mode=offset_mode)
        self.kernel_dtype = kernel_dtype
        self.learnable = bool(learnable)
        self.max_kernel_weight = float(max_kernel_weight)
        self.register_buffer("compatibility", torch.tensor([[0.0, 1.0], [1.0, 0.0]]), persistent=False)
        if learnable:
            if not max(w_spatial, w_bilateral) < self.max_kernel_weight:
                raise ValueError(f"learnable kernel weights must start below max_kernel_weight="
                                 f"{self.max_kernel_weight}; got w_spatial={w_spatial}, w_bilateral={w_bilateral}")
            self.raw_kernel_weights = nn.Parameter(torch.logit(torch.tensor([w_spatial, w_bilateral])
                                                               / self.max_kernel_weight))
        else:
            self.register_buffer("fixed_kernel_weights", torch.tensor([float(w_spatial), float(w_bilateral)]),
                                 persistent=False)

    def configure(self, iterations: int, spatial_sigma_mm: float, bilateral_sigma_mm: float, intensity_sigma: float,
                  window: int | None, bilateral_reach_sigmas: float, offset_mode: str) -> None:
        """(Re)set everything that is not a parameter: iterations, kernel widths, bilateral window, implementation."""
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}")
        for name, value in (("spatial_sigma_mm", spatial_sigma_mm), ("bilateral_sigma_mm", bilateral_sigma_mm),
                            ("intensity_sigma", intensity_sigma), ("bilateral_reach_sigmas", bilateral_reach_sigmas)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        window = int(window if window is not None else (3 if self.dim == 2 else 2))
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.offset_mode = check_offset_mode(offset_mode)
        self.iterations = int(iterations)
        self.spatial_sigma_mm = float(spatial_sigma_mm)
        self.bilateral_sigma_mm = float(bilateral_sigma_mm)
        self.intensity_sigma = float(intensity_sigma)
        self.window = window
        self.bilateral_reach_sigmas = float(bilateral_reach_sigmas)

    def settings(self) -> dict:
        """What `configure` takes, plus the weights' bound and parameterisation."""
        return {"iterations": self.iterations, "spatial_sigma_mm": self.spatial_sigma_mm,
                "bilateral_sigma_mm": self.bilateral_sigma_mm, "intensity_sigma": self.intensity_sigma,
                "window": self.window, "bilateral_reach_sigmas": self.bilateral_reach_sigmas,
                "offset_mode": self.offset_mode, "learnable": self.learnable,
                "max_kernel_weight": self.max_kernel_weight}

    # ----------------------------------------------------------------------------------------------- parameters
    @property
    def kernel_weights(self) -> torch.Tensor:
        """(w_spatial, w_bilateral): non-negative, below max_kernel_weight when learnable."""
        if self.learnable:
            return self.max_kernel_weight * torch.sigmoid(self.raw_kernel_weights)
        return self.fixed_kernel_weights

    def symmetric_compatibility(self) -> torch.Tensor:
        """mu as used by the energy (Potts)."""
        return self.compatibility

    def receptive_radius(self, spacing: Sequence[float]) -> list[int]:
        """Per-axis voxel reach of one message (max of spatial truncation and bilateral outer tap)."""
        radii = []
        for step_mm in spacing:
            spatial = max(1, int(math.ceil(_SPATIAL_TRUNCATE_SIGMAS * self.spatial_sigma_mm / step_mm)))
            reach_vox = self.bilateral_reach_sigmas * self.bilateral_sigma_mm / step_mm
            stride = max(1, int(round(reach_vox / self.window)))
            bilateral = min(self.window, int(round(reach_vox / stride))) * stride
            radii.append(max(spatial, bilateral))
        return radii

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, iterations={self.iterations}, spatial_sigma_mm={self.spatial_sigma_mm}, "
                f"bilateral_sigma_mm={self.bilateral_sigma_mm}, intensity_sigma={self.intensity_sigma}, "
                f"window={self.window}, offset_mode={self.offset_mode!r}")

    # ----------------------------------------------------------------------------------------------- plumbing
    def _check_inputs(self, logits, guide, mask):
        if logits.ndim != self.dim + 2 or logits.shape[1] != 1:
            raise ValueError(f"logits must be (B, 1, {'D, H, W' if self.dim == 3 else 'H, W'}) for this {self.dim}-D "
                             f"CRF; got shape {tuple(logits.shape)}")
        if guide.ndim != logits.ndim or guide.shape[0] != logits.shape[0] or guide.shape[2:] != logits.shape[2:]:
            raise ValueError(f"guide must be (B, C, *S) matching logits {tuple(logits.shape)}; "
                             f"got {tuple(guide.shape)}")
        if mask is not None and (mask.ndim != logits.ndim or mask.shape[1] != 1
                                 or mask.shape[2:] != logits.shape[2:] or mask.shape[0] not in (1, logits.shape[0])):
            raise ValueError(f"mask must be (B, 1, *S) matching logits {tuple(logits.shape)}; got {tuple(mask.shape)}")

    def _operators(self, guide: torch.Tensor, mask: torch.Tensor, spacing: Sequence[float], all_inside: bool):
        stacked = use_stacked(self.offset_mode, guide)
        fused = {"compile_sums": True} if use_compiled(self.offset_mode) else {}  # decided outside no_grad
        bilateral_kernel = _StackedBilateralKernel if stacked else _NormalisedBilateralKernel
        with torch.no_grad():
            spatial = _NormalisedSpatialKernel(mask, spacing, self.spatial_sigma_mm, stacked=stacked, **fused)
            bilateral = bilateral_kernel(guide, None if all_inside else mask, spacing,
                                         self.bilateral_sigma_mm, self.intensity_sigma,
                                         self.window, self.bilateral_reach_sigmas,
                                         torch.float64 if guide.dtype == torch.float64 else self.kernel_dtype,
                                         **fused)
        return spatial, bilateral

    @staticmethod
    def _float_mask(mask, like: torch.Tensor) -> torch.Tensor:
        if mask is None:
            return torch.ones_like(like)
        return (mask > 0.5).to(like.dtype).expand_as(like).contiguous()

    def _split_by_spacing(self, fn, spacing, batch: int, *tensors):
        """fn(*tensors, spacing_row) per run of samples sharing a spacing (kernels differ with spacing).

        Tensors are batch-first; None and batch-1 tensors (e.g. one shared mask) are passed through as they are.
        """
        rows = _spacing_rows(spacing, batch, self.dim)
        if all(row == rows[0] for row in rows):
            return fn(*tensors, rows[0])
        def sample(t, b):
            return t if t is None or t.shape[0] == 1 else t[b:b + 1]
        return torch.cat([fn(*[sample(t, b) for t in tensors], row) for b, row in enumerate(rows)], 0)

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, logits: torch.Tensor, guide: torch.Tensor, spacing, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Refined logits log(Q(1)/Q(0)) (B, 1, *S) after `iterations` mean-field steps.

        logits (B, 1, *S): unary lesion logits. guide (B, C, *S): image intensities (no gradient flows into it).
        spacing: `dim` floats in mm (tensor axis order) or a (B, dim) tensor. mask (B, 1, *S), optional: voxels
        outside are clamped to background (logit OUTSIDE_MASK_LOGIT) and neither send nor receive messages.
        """
        self._check_inputs(logits, guide, mask)
        return self._split_by_spacing(self._forward_one_spacing, spacing, logits.shape[0], logits, guide, mask)

    def _forward_one_spacing(self, logits, guide, mask, spacing):
        dtype = _compute_dtype(logits)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            unary = logits.to(dtype)
            inside = self._float_mask(mask, unary)
            spatial, bilateral = self._operators(guide.detach().to(dtype), inside, spacing, mask is None)
            w_spatial, w_bilateral = self.kernel_weights.to(dtype).unbind(0)
            mu = self.symmetric_compatibility().to(dtype)
            # Binary update, with M = w_s K_s + w_b K_b:
            #   logit = z - (mu10 - mu00) M(1_mask) - (mu00 + mu11 - mu01 - mu10) M(q)
            bias_coefficient = mu[1, 0] - mu[0, 0]
            coupling = mu[0, 0] + mu[1, 1] - mu[0, 1] - mu[1, 0]
            with torch.no_grad():
                spatial_of_mask, bilateral_of_mask = spatial(inside), bilateral(inside)
            message_of_mask = w_spatial * spatial_of_mask + w_bilateral * bilateral_of_mask
            refined = unary
            q = torch.sigmoid(unary) * inside
            for _ in range(self.iterations):
                message = (w_spatial * _SymmetricOperatorFn.apply(q, spatial)
                           + w_bilateral * _SymmetricOperatorFn.apply(q, bilateral))
                refined = unary - bias_coefficient * message_of_mask - coupling * message
                q = torch.sigmoid(refined) * inside
            refined = torch.where(inside > 0, refined, torch.full_like(refined, OUTSIDE_MASK_LOGIT))
        return refined.to(logits.dtype)

    # ----------------------------------------------------------------------------------------------- energy
    def energy(self, q: torch.Tensor, unary_logits: torch.Tensor, guide: torch.Tensor, spacing,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean-field free energy F(Q) (see module docstring) per batch element, shape (B,).

        q (B, 1, *S): lesion marginals Q(1) in [0, 1] (values outside the mask are ignored). Equal, up to a constant,
        to KL(Q || P) of the CRF distribution P, so lower is better; mean-field steps should decrease it.
        """
        self._check_inputs(unary_logits, guide, mask)
        if q.shape != unary_logits.shape:
            raise ValueError(f"q must have the shape of unary_logits {tuple(unary_logits.shape)}; got {tuple(q.shape)}")
        return self._split_by_spacing(self._energy_one_spacing, spacing, q.shape[0], q, unary_logits, guide, mask)

    def _energy_one_spacing(self, q, unary_logits, guide, mask, spacing):
        dtype = _compute_dtype(unary_logits)
        with torch.autocast(device_type=unary_logits.device.type, enabled=False):
            z = unary_logits.to(dtype)
            inside = self._float_mask(mask, z)
            q1 = q.to(dtype).clamp(0.0, 1.0) * inside
            q0 = (1.0 - q.to(dtype).clamp(0.0, 1.0)) * inside
            spatial, bilateral = self._operators(guide.detach().to(dtype), inside, spacing, mask is None)
            w_spatial, w_bilateral = self.kernel_weights.to(dtype).unbind(0)
            mu = self.symmetric_compatibility().to(dtype)
            messages = [w_spatial * _SymmetricOperatorFn.apply(ql, spatial)
                        + w_bilateral * _SymmetricOperatorFn.apply(ql, bilateral) for ql in (q0, q1)]
            marginals = (q0, q1)
            unary_term = q1 * F.softplus(-z) + q0 * F.softplus(z)
            neg_entropy = torch.xlogy(q1, q1) + torch.xlogy(q0, q0)
            pairwise = sum(0.5 * mu[a, b] * marginals[a] * messages[b] for a in range(2) for b in range(2))
            per_voxel = (unary_term + neg_entropy) * inside + pairwise
            return per_voxel.flatten(1).sum(1)

    # ----------------------------------------------------------------------------------------------- large volumes
    @torch.no_grad()
    def refine_large(self, logits: torch.Tensor, guide: torch.Tensor, spacing, mask: torch.Tensor | None = None, *,
                     device: torch.device | str | None = None, tile_shape: Sequence[int] | None = None,
                     halo: int | Sequence[int] | None = None, max_tile_voxels: int = 2 ** 21) -> torch.Tensor:
        """`forward` without gradients over overlapping tiles, so memory stays bounded for whole CT volumes.

        Inputs may live on the CPU; each tile (core plus `halo` voxels per side, clipped at the volume) is moved to
        `device` (default: the logits' device), refined, and its core written into the output (on the logits'
        device). One spacing for the whole batch.

        halo: per-axis overlap in voxels. Default: 2 * receptive_radius(spacing). A tile's core is *identical* to
        the un-tiled result (up to float rounding) once halo >= (iterations + 1) * receptive_radius, since a
        voxel's final marginal depends on nothing farther away; smaller halos trade a small border error for far
        less overlap work. Measured (3-D, 5 iterations, max |marginal difference| to the un-tiled call): halo of 1
        radius 0.03, 1.5 radii 5e-3, 2 radii 1e-4, 3 radii 0 (tests/test_dense_crf.py).
        tile_shape: core size per axis; default: the largest cores (halving the longest axis) whose tile including
        halos holds at most `max_tile_voxels` voxels per batch element (2^21 voxels ~ 0.6 GiB of fp32 bilateral
        weights and work buffers in 3-D with window 2).
        """
        self._check_inputs(logits, guide, mask)
        rows = _spacing_rows(spacing, logits.shape[0], self.dim)
        if any(row != rows[0] for row in rows):
            raise ValueError("refine_large needs one spacing for the whole batch; call it per case")
        spacing = rows[0]
        shape = tuple(logits.shape[2:])
        device = torch.device(device) if device is not None else logits.device
        if halo is None:
            halo = [2 * r for r in self.receptive_radius(spacing)]
        elif isinstance(halo, int):
            halo = [halo] * self.dim
        halo = [int(h) for h in halo]
        if len(halo) != self.dim or any(h < 0 for h in halo):
            raise ValueError(f"halo must be a non-negative int or {self.dim} of them; got {halo}")
        if tile_shape is None:
            tile_shape = self._default_tile_shape(shape, halo, max_tile_voxels)
        tile_shape = [min(int(t), s) for t, s in zip(tile_shape, shape)]
        if len(tile_shape) != self.dim or any(t < 1 for t in tile_shape):
            raise ValueError(f"tile_shape must be {self.dim} positive ints; got {tile_shape}")

        out = torch.empty_like(logits)
        starts = [range(0, s, t) for s, t in zip(shape, tile_shape)]
        for corner in itertools.product(*starts):
            core = [slice(c, min(c + t, s)) for c, t, s in zip(corner, tile_shape, shape)]
            crop = [slice(max(0, c.start - h), min(s, c.stop + h)) for c, h, s in zip(core, halo, shape)]
            inner = [slice(c.start - k.start, c.stop - k.start) for c, k in zip(core, crop)]
            crop_index = (slice(None), slice(None), *crop)
            tile_mask = None if mask is None else mask[crop_index].to(device)
            refined = self.forward(logits[crop_index].to(device), guide[crop_index].to(device), spacing, tile_mask)
            out[(slice(None), slice(None), *core)] = refined[(slice(None), slice(None), *inner)].to(out.device)
        return out

    @staticmethod
    def _default_tile_shape(shape, halo, max_tile_voxels):
        core = list(shape)

        def tile_voxels():
            return int(np.prod([min(c + 2 * h, s) for c, h, s in zip(core, halo, shape)]))
        while tile_voxels() > max_tile_voxels and max(core) > 1:
            longest = int(np.argmax(core))
            core[longest] = (core[longest] + 1) // 2
        # a core much thinner than the halo wastes nearly all work on overlap
        if tile_voxels() > max_tile_voxels or any(c < h // 2 and c < s for c, h, s in zip(core, halo, shape)):
            raise ValueError(f"max_tile_voxels={max_tile_voxels} is too small for halos of {halo} voxels "
                             f"(volume {tuple(shape)}): raise max_tile_voxels or pass a smaller halo")
        return core


def crf_energy(q: torch.Tensor, unary_logits: torch.Tensor, guide: torch.Tensor, spacing,
               mask: torch.Tensor | None = None, crf: TrainableDenseCRF | None = None, **crf_kwargs) -> torch.Tensor:
    """Mean-field free energy (B,) of marginals q under `crf` (or a fresh TrainableDenseCRF built from crf_kwargs)."""
    if crf is None:
        crf = TrainableDenseCRF(dim=unary_logits.ndim - 2, **crf_kwargs)
    elif crf_kwargs:
        raise ValueError("pass either crf or CRF keyword arguments, not both")
    return crf.energy(q, unary_logits, guide, spacing, mask)
