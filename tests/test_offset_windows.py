"""The stacked (one window view) implementation of the neighbour sums gives the loop's numbers and gradients."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_dram.building_blocks.dense_crf import TrainableDenseCRF
from nnunetv2_dram.building_blocks.local_attention import LocalAffinityAttention
from nnunetv2_dram.building_blocks.offset_windows import use_stacked, window_view


@pytest.mark.parametrize("taps, strides", [((1, 1, 1), (1, 1, 1)), ((2, 1, 2), (3, 1, 2))])
def test_window_view_reads_the_shifted_neighbours(taps, strides):
    x = torch.randn(2, 3, 7, 8, 9)
    pads = [n * s + 1 for n, s in zip(taps, strides)]  # more padding than the window needs is fine
    view = window_view(F.pad(x, [p for p in reversed(pads) for _ in (0, 1)]), pads, taps, strides)
    assert view.shape == (2, 3, 7, 8, 9, *(2 * n + 1 for n in taps))
    for t in [(0, 0, 0), tuple(2 * n for n in taps), (taps[0], 0, 2 * taps[2])]:
        offset = [(k - n) * s for k, n, s in zip(t, taps, strides)]
        expected = torch.zeros_like(x)
        src = tuple(slice(max(0, o), size + min(0, o)) for o, size in zip(offset, x.shape[2:]))
        dst = tuple(slice(max(0, -o), size - max(0, o)) for o, size in zip(offset, x.shape[2:]))
        expected[(slice(None), slice(None)) + dst] = x[(slice(None), slice(None)) + src]
        assert torch.equal(view[(Ellipsis,) + t], expected)


def test_window_view_rejects_too_little_padding():
    with pytest.raises(ValueError, match="exceeds the padding"):
        window_view(torch.zeros(1, 1, 6, 6), [1, 1], [1, 1], [2, 1])


def test_auto_mode_is_stacked_for_small_cuda_tensors_only_and_bad_modes_are_rejected():
    small, large = torch.empty(2, 3, 8, 8, 8, device="meta"), torch.empty(2, 3, 128, 128, 128, device="meta")
    assert not use_stacked("auto", torch.zeros(1, 1, 4)) and use_stacked("stacked", torch.zeros(1, 1, 4))
    assert not use_stacked("loop", small)
    if torch.cuda.is_available():
        assert use_stacked("auto", small.to_empty(device="cuda")) and not use_stacked("auto", large.to_empty(device="cuda"))
    with pytest.raises(ValueError, match="offset_mode"):
        TrainableDenseCRF(3, offset_mode="fast")
    with pytest.raises(ValueError, match="offset_mode"):
        LocalAffinityAttention(4, 3, offset_mode="fast")


def _outputs_and_grads(module, inputs, *extra):
    inputs = [t.clone().requires_grad_() for t in inputs]
    out = module(*inputs, *extra)
    grads = torch.autograd.grad((out * torch.cos(out)).sum(), inputs + list(module.parameters()))
    return out, grads


@pytest.mark.parametrize("dim, shape, similarity, dilations, iterations",
                         [(3, (9, 10, 12), "distance", (1,), 1), (2, (18, 20), "distance", (2,), 2),
                          (3, (8, 9, 10), "relu_dot", (1,), 2)])
def test_attention_stacked_matches_loop(dim, shape, similarity, dilations, iterations):
    torch.manual_seed(0)
    loop = LocalAffinityAttention(5, dim, similarity=similarity, dilations=dilations, iterations=iterations,
                                  offset_mode="loop")
    with torch.no_grad():
        loop.mix_logit.fill_(0.3)
    stacked = copy.deepcopy(loop)
    stacked.offset_mode = "stacked"
    inputs = [3 * torch.randn(2, 1, *shape), torch.randn(2, 5, *shape)]
    out_loop, grads_loop = _outputs_and_grads(loop, inputs)
    out_stacked, grads_stacked = _outputs_and_grads(stacked, inputs)
    torch.testing.assert_close(out_stacked, out_loop, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_stacked, grads_loop):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # float32 sums over every voxel


def test_attention_with_several_dilations_falls_back_to_the_loop():
    torch.manual_seed(0)
    module = LocalAffinityAttention(3, 2, dilations=(1, 2), offset_mode="stacked")
    reference = copy.deepcopy(module)
    reference.offset_mode = "loop"
    m, f = torch.randn(1, 1, 12, 12), torch.randn(1, 3, 12, 12)
    torch.testing.assert_close(module(m, f), reference(m, f))


@pytest.mark.parametrize("dim, shape, spacing, masked",
                         [(3, (14, 20, 20), (2.5, 0.7, 0.7), False), (3, (12, 16, 16), (1.0, 1.0, 1.0), True),
                          (2, (28, 30), (1.0, 0.8), True)])
def test_crf_stacked_matches_loop_in_float64(dim, shape, spacing, masked):
    torch.manual_seed(1)
    loop = TrainableDenseCRF(dim, offset_mode="loop").double()
    stacked = copy.deepcopy(loop)
    stacked.offset_mode = "stacked"
    logits = 3 * torch.randn(2, 1, *shape, dtype=torch.float64)
    guide = torch.rand(2, 1, *shape, dtype=torch.float64)
    mask = (torch.rand(2, 1, *shape) > 0.2).double() if masked else None
    out_loop, grads_loop = _outputs_and_grads(loop, [logits], guide, spacing, mask)
    out_stacked, grads_stacked = _outputs_and_grads(stacked, [logits], guide, spacing, mask)
    torch.testing.assert_close(out_stacked, out_loop, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads_stacked, grads_loop):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    q = torch.sigmoid(out_loop.detach())
    torch.testing.assert_close(stacked.energy(q, logits, guide, spacing, mask), loop.energy(q, logits, guide, spacing, mask))


def test_crf_stacked_half_precision_kernel_and_multichannel_guide_are_close():
    torch.manual_seed(2)
    logits, guide = 3 * torch.randn(1, 1, 10, 16, 16), torch.rand(1, 2, 10, 16, 16)
    # float16 storage rounds the stacked version's self weight too (the loop keeps it a Python float)
    for kwargs, tolerance in (({"kernel_dtype": torch.float16}, 2e-2), ({}, 1e-4)):
        loop = TrainableDenseCRF(3, offset_mode="loop", **kwargs)
        stacked = TrainableDenseCRF(3, offset_mode="stacked", **kwargs)
        torch.testing.assert_close(stacked(logits, guide, (1.0, 1.0, 1.0)), loop(logits, guide, (1.0, 1.0, 1.0)),
                                   rtol=tolerance, atol=tolerance)


def _compiler_available():
    import shutil
    return shutil.which(os.environ.get("CXX", "g++")) is not None


needs_compiler = pytest.mark.skipif(not _compiler_available(),
                                    reason="torch.compile on the CPU needs a C++ compiler (g++ or $CXX)")


@needs_compiler
def test_compiled_mode_matches_stacked_and_compiles_only_while_training():
    from torch._dynamo.utils import counters
    torch.manual_seed(3)
    shape = (9, 10, 12)
    logits, features, guide = 3 * torch.randn(2, 1, *shape), torch.randn(2, 5, *shape), torch.rand(2, 1, *shape)
    for make, inputs, extra in ((lambda m: LocalAffinityAttention(5, 3, offset_mode=m), [logits, features], ()),
                                (lambda m: TrainableDenseCRF(3, offset_mode=m), [logits], (guide, (2.0, 1.0, 1.0)))):
        reference = make("stacked")
        fused = copy.deepcopy(reference)
        fused.offset_mode = "compiled"
        frames = counters["frames"]["ok"]
        out_fused, grads_fused = _outputs_and_grads(fused, inputs, *extra)
        assert counters["frames"]["ok"] > frames  # torch.compile really ran
        out_reference, grads_reference = _outputs_and_grads(reference, inputs, *extra)
        # fused kernels sum in another order (and the CRF's exp is Inductor's): float32 rounding, not more
        torch.testing.assert_close(out_fused, out_reference, rtol=1e-4, atol=1e-4)
        for a, b in zip(grads_fused, grads_reference):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        frames = counters["frames"]["ok"]
        with torch.no_grad():  # inference sees many shapes (tiles): "compiled" then runs as "auto", uncompiled
            torch.testing.assert_close(fused(*inputs, *extra), out_reference, rtol=1e-4, atol=1e-4)
        assert counters["frames"]["ok"] == frames
    assert use_stacked("compiled", torch.zeros(1, 1, 4))
    with torch.no_grad():
        assert not use_stacked("compiled", torch.zeros(1, 1, 4))  # CPU tensor: "auto" takes the loop


def test_trainers_take_the_refinement_offsets_from_the_environment(weak3d, monkeypatch):
    import json

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_dram.training.variants.refinement import DRAMTrainerWithAttention, DRAMTrainerWithCRF
    ws, dataset = weak3d
    monkeypatch.delenv("NNUNETV2_DRAM_REFINE_OFFSETS", raising=False)
    pm = PlansManager(json.loads((ws.preprocessed / dataset / "nnUNetPlans_quick.json").read_text()))
    cm = pm.get_configuration("3d_fullres")

    def modes():
        attention = DRAMTrainerWithAttention.build_network_architecture(pm, cm, 1, 2, False).refinement.attention
        crf = DRAMTrainerWithCRF.build_network_architecture(pm, cm, 1, 2, False).refinement.crf
        return attention.offset_mode, crf.offset_mode
    assert modes() == ("auto", "auto")
    monkeypatch.setenv("NNUNETV2_DRAM_REFINE_OFFSETS", "compiled")
    assert modes() == ("compiled", "compiled")
    assert "offset_mode" not in DRAMTrainerWithAttention.attention_settings  # class defaults untouched
    assert "offset_mode" not in DRAMTrainerWithCRF.crf_settings
    monkeypatch.setenv("NNUNETV2_DRAM_REFINE_OFFSETS", "fused")
    with pytest.raises(SystemExit, match="NNUNETV2_DRAM_REFINE_OFFSETS='fused' must be one of auto, loop"):
        DRAMTrainerWithCRF.build_network_architecture(pm, cm, 1, 2, False)


@pytest.mark.parametrize("shape, pads, taps, strides", [((5, 6, 7), [1, 1, 1], [1, 1, 1], [1, 1, 1]),
                                                        ((9, 8), [4, 2], [2, 1], [2, 2]),
                                                        ((6, 7, 5), [2, 2, 2], [1, 1, 1], [2, 2, 2])])
def test_gathered_backward_passes_are_exact(shape, pads, taps, strides):
    from nnunetv2_dram.building_blocks.offset_windows import (expand_to_window, mirrored_window_gather, pad_spatial,
                                                              window_squared_distances, window_weighted_sum,
                                                              window_weighted_sum_gathered)
    torch.manual_seed(4)
    dim, window = len(shape), tuple(2 * n + 1 for n in taps)
    e = torch.randn(2, 3, *shape, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 1, *shape, *window, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 1, *shape, dtype=torch.float64, requires_grad=True)
    plain = (expand_to_window(e, dim) - window_view(pad_spatial(e, pads), pads, taps, strides)).square().sum(1)
    torch.testing.assert_close(window_squared_distances(e, pads, taps, strides), plain)
    torch.testing.assert_close(window_weighted_sum_gathered(weights, x, pads, taps, strides),
                               window_weighted_sum(weights, x, pads, taps, strides))
    assert torch.autograd.gradcheck(lambda t: window_squared_distances(t, pads, taps, strides), (e,))
    assert torch.autograd.gradcheck(lambda w, t: window_weighted_sum_gathered(w, t, pads, taps, strides), (weights, x))
    # the gather itself: out[i, t] = y[i + o_t, mirror(t)], zero outside
    y = torch.randn(1, *shape, *window, dtype=torch.float64)
    out = mirrored_window_gather(y, pads, taps, strides)
    i, t = (1,) * dim, (0,) * dim
    source = tuple(p + (k - n) * s for p, k, n, s in zip(i, t, taps, strides))
    expected = y[(0, *source, *(2 * n for n in taps))] if all(0 <= v < n for v, n in zip(source, shape)) else 0.0
    assert float(out[(0, *i, *t)]) == float(expected)
