"""The refinement's per-voxel classifier head: it learns from the thresholded dRAM what lesions look like, reads the
image (and, if asked, the backbone's features) without training the backbone, starts as the identity when added,
and is stored with the checkpoint."""
import pytest
import torch
from scipy import ndimage
from torch import nn

from nnunetv2_dram.architectures.dram_network import DenseRegressionNetwork
from nnunetv2_dram.architectures.dram_refinement import DRAMRefinement
from nnunetv2_dram.inference.region_inference import predict_case_by_regions
from nnunetv2_dram.losses.self_training import calibrated_targets, self_training_loss
from nnunetv2_dram.training.dram_trainers import LOCAL_ATTENTION, DRAMTrainer
from nnunetv2_dram.training.region_chunks import ChunkSpec, build_region_samples, region_bboxes
from nnunetv2_dram.training.variants.refinement import DRAMTrainerFullDRAMWeight

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
    refinement = DRAMRefinement(2, 1, LOCAL_ATTENTION, head=head, head_channels=1 if head else None)
    optimizer = torch.optim.Adam(refinement.parameters(), lr=0.05)

    def refined(return_head=False):
        return refinement(dram, image, image, (1.0, 1.0), region, head_features=image if head else None,
                          return_head=return_head)

    for _ in range(40):
        out, head_logits = refined(return_head=True)
        loss = self_training_loss(out, dram, region, interval)
        if refinement.head_own_loss:
            loss = loss + self_training_loss(head_logits, dram, region, interval)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return _iou(calibrated_targets(refined().detach(), region, interval)[0, 0], truth)


@pytest.mark.parametrize("head, gain", [({"combine": "add"}, 0.04), ({"combine": "replace"}, 0.2),
                                        ({"combine": "add", "inputs": "image", "kernel_size": 1, "own_loss": True}, 0.04),
                                        (DRAMTrainer.head_settings, 0.04)])
def test_self_training_teaches_the_head_what_a_lesion_the_dram_missed_looks_like(head, gain):
    """The attention only moves the dRAM's own lesion along the image; the head learns from it what lesions look
    like and finds the second one, which the dRAM missed, far from the first."""
    attention_only = _self_trained_iou(None)
    with_head = _self_trained_iou(head)
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
@pytest.mark.parametrize("inputs, combine", [("decoder", "add"), ("encoder", "add"), ("image", "add_after")])
def test_the_head_reads_its_inputs_without_training_the_backbone_and_starts_as_the_identity(shape, deep_supervision,
                                                                                           inputs, combine):
    dim = len(shape) - 2
    x = torch.randn(shape)
    with_head = _network(dim, {"combine": combine, "inputs": inputs}, deep_supervision)
    assert with_head.refinement.head.in_channels == (1 if inputs == "image" else 5)
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
    assert trained.refinement.settings()["head"] == {"combine": "replace", "inputs": "decoder", "own_loss": False,
                                                     "in_channels": 5, "hidden_channels": 16, "depth": 1,
                                                     "kernel_size": 3, "norm": True,
                                                         "dram_weight": 1.0}
    x = torch.randn(1, 1, 16, 16)
    # whatever head the loading network was built with (none, another one), the checkpoint's own is rebuilt
    for other in ({"combine": "replace"}, None, {"combine": "add"}, DRAMTrainer.head_settings):
        rebuilt = _network(2, other)
        rebuilt.load_state_dict(state)
        assert rebuilt.refinement.settings() == trained.refinement.settings()
        with torch.no_grad():
            assert torch.equal(rebuilt(x), trained(x))


def test_a_model_trained_without_the_head_loads_and_predicts_as_it_was_trained():
    trained = _network(2, None)
    rebuilt = _network(2, {"combine": "add"})
    rebuilt.load_state_dict(trained.state_dict())
    assert rebuilt.refinement.head is None and rebuilt.refinement.settings() == trained.refinement.settings()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained(x))


def test_a_model_whose_head_settings_name_no_inputs_loads_as_a_head_on_the_decoder():
    """Models of version 0.3.0 store neither the head's inputs nor its loss: their head read the decoder and was
    trained through the refined map. They load as such, also into a network built with today's head."""
    trained = _network(2, {"combine": "add"})
    with torch.no_grad():
        trained.refinement.head.out.weight.normal_()
    state = trained.state_dict()
    stored = state["refinement._extra_state"]["settings"]["head"]
    del stored["inputs"], stored["own_loss"], stored["norm"]
    rebuilt = _network(2, {"combine": "add"})
    rebuilt.load_state_dict(state)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained(x))
    current = _network(2, DRAMTrainer.head_settings)
    current.load_state_dict(state)
    assert current.refinement.head_inputs == "decoder" and not current.refinement.voxelwise_head
    with torch.no_grad():
        assert torch.equal(current(x), trained(x))


@pytest.mark.parametrize("combine", ["add", "add_after"])
def test_a_head_with_a_loss_of_its_own_is_trained_by_that_loss_only(combine):
    """Trained through the refined map, a head learns only what the dRAM does not already say about the dRAM's own
    threshold; with `own_loss` it is a classifier of its own, and the refined map's loss does not reach it."""
    net = _network(3, {"combine": combine, "inputs": "image", "kernel_size": 1, "own_loss": True})
    x = torch.randn(2, 1, 8, 16, 16)
    out = net(x, return_all=True)
    assert out["head"].shape == out["refined"].shape
    out["refined"].mean().backward(retain_graph=True)
    assert net.refinement.head.out.weight.grad is None
    out["head"].mean().backward()
    assert net.refinement.head.out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.backbone.parameters())


def _case(dim: int, size: int):
    """A case of two regions whose image has single-voxel bright spots (a detail finer than a zoomed chunk)."""
    z = size // 2 if dim == 3 else 1
    g = torch.Generator().manual_seed(1)
    data = (0.1 * torch.randn(1, z, size, size, generator=g)).numpy()
    data[0, :, 3::4, 3::4] = 3.0
    seg = torch.zeros(1, z, size, size, dtype=torch.int16).numpy()
    seg[0, :, 2:-2, 2:size // 2] = 1
    seg[0, :, 2:-2, size // 2 + 1:-2] = 2
    samples, _ = build_region_samples({"case": region_bboxes(seg)}, None)
    return data, seg, samples


@pytest.mark.parametrize("head", [DRAMTrainer.head_settings, DRAMTrainerFullDRAMWeight.head_settings],
                         ids=["DRAMTrainer", "full_dram_weight"])
@pytest.mark.parametrize("dim", [2, 3])
def test_a_voxelwise_head_is_evaluated_on_the_case_grid(dim, head, monkeypatch):
    """The chunks are zoomed to fit the patch, so a map computed on them is coarser than the case. DRAMTrainer's head
    (pointwise, on the image, no norm, added after the attention) needs only each voxel's intensity: it is added on
    the case's own grid, where it sees every bright voxel; without zoom that is exactly the chunk's refined map."""
    net = _network(dim, head).eval()
    assert net.refinement.voxelwise_head
    with torch.no_grad():
        net.refinement.head.out.weight.fill_(1.0)

    def refined(size, chunk):
        data, seg, samples = _case(dim, size)
        spec = ChunkSpec.from_configuration((chunk,) * dim, (1.0,) * dim, 1.0, True)
        grid, image = (seg[0], data[0]) if dim == 3 else (seg[0, 0], data[0, 0])
        return predict_case_by_regions(net, data, seg, samples, spec, torch.device("cpu")).probability, grid, image

    # no zoom: the head on the case grid gives the chunks' own refined maps
    on_case_grid, _, _ = refined(16, 32)
    monkeypatch.setattr(DRAMRefinement, "voxelwise_head", property(lambda self: False))
    on_chunks, _, _ = refined(16, 32)
    assert torch.allclose(torch.from_numpy(on_case_grid), torch.from_numpy(on_chunks), atol=1e-5)
    # zoomed chunks: on the chunks the bright voxels are averaged with their neighbours, on the case grid each of
    # them stands out against every other voxel of the region
    zoomed, grid, image = refined(32, 16)
    monkeypatch.undo()
    on_case_grid, grid, image = refined(32, 16)
    inside = grid > 0
    bright = inside & (image > 1)
    assert on_case_grid[bright].min() > on_case_grid[inside & ~bright].max()
    assert not zoomed[bright].min() > zoomed[inside & ~bright].max()


def test_a_refinement_without_attention_is_half_the_dram_plus_the_head_and_is_stored_so():
    net = _network(2, DRAMTrainer.head_settings)
    without = DenseRegressionNetwork(_unet(2, True), 2, (1.0, 1.0), image_channels=1, low_level_channels=4,
                                     refinement={"attention": None, "crf": None, "downsample": 1,
                                                 "head": DRAMTrainer.head_settings})
    assert without.refinement.attention is None and without.refinement.settings()["attention"] is None
    with torch.no_grad():
        without.refinement.head.out.weight.normal_()
    x = torch.randn(2, 1, 16, 16)
    out = without(x, return_all=True)
    assert torch.allclose(out["refined"], 0.5 * out["dram"][0] + out["head"], atol=1e-6)
    rebuilt = DenseRegressionNetwork(_unet(2, True), 2, (1.0, 1.0), image_channels=1, low_level_channels=4,
                                     refinement={"attention": None, "crf": None, "downsample": 1,
                                                 "head": DRAMTrainer.head_settings})
    rebuilt.load_state_dict(without.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), without(x))
    # a network built with an attention loads it as it was trained: without one
    net.load_state_dict(without.state_dict())
    assert net.refinement.attention is None
    with torch.no_grad():
        assert torch.equal(net(x), without(x))


def test_a_model_trained_with_the_attention_loads_into_todays_dramtrainer_and_predicts_as_it_was_trained():
    """DRAMTrainer's models of version 0.4.0 have the attention; today's DRAMTrainer builds none: the stored
    attention is rebuilt (with its stored neighbourhood, iterations and mix) before the weights load."""
    def network(attention):
        torch.manual_seed(1)
        return DenseRegressionNetwork(_unet(2, True), 2, (1.0, 1.0), image_channels=1, low_level_channels=4,
                                      refinement={"attention": attention, "crf": None, "downsample": 1,
                                                  "head": DRAMTrainer.head_settings})
    trained = network({**LOCAL_ATTENTION, "kernel_size": 5})
    with torch.no_grad():
        trained.refinement.head.out.weight.normal_()
        trained.refinement.attention.theta.weight.normal_()
    today = network(DRAMTrainer.attention_settings)
    assert today.refinement.attention is None
    today.load_state_dict(trained.state_dict())
    assert today.refinement.settings() == trained.refinement.settings()
    # in the trained network's order, which a continued training's optimiser state follows
    assert [n for n, _ in today.named_parameters()] == [n for n, _ in trained.named_parameters()]
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(today(x), trained(x))
        assert not torch.equal(today(x), network(None)(x))


def test_the_dram_weight_scales_the_dram_under_the_head_and_is_stored_with_the_checkpoint():
    """DRAMTrainer: refined = 0.5 x dRAM + head. A model trained with one weight predicts with it
    whatever weight the loading network was built with; a stored head without `dram_weight` (models of version 0.5.0
    and earlier) has weight 1."""
    def network(head):
        torch.manual_seed(1)
        return DenseRegressionNetwork(_unet(2, True), 2, (1.0, 1.0), image_channels=1, low_level_channels=4,
                                      refinement={"attention": None, "crf": None, "downsample": 1, "head": head})
    half = network(DRAMTrainer.head_settings)
    with torch.no_grad():
        half.refinement.head.out.weight.normal_()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out = half(x, return_all=True)
    assert torch.allclose(out["refined"], 0.5 * out["dram"][0] + out["head"], atol=1e-6)
    full = network(DRAMTrainerFullDRAMWeight.head_settings)
    assert full.refinement.head_dram_weight == 1.0
    full.load_state_dict(half.state_dict())
    assert full.refinement.head_dram_weight == 0.5
    with torch.no_grad():
        assert torch.equal(full(x), half(x))
    state = network(DRAMTrainer.head_settings).state_dict()
    stored = next(v for k, v in state.items() if k.endswith("_extra_state"))
    del stored["settings"]["head"]["dram_weight"]  # as written before the setting existed
    loading = network(DRAMTrainer.head_settings)
    loading.load_state_dict(state)
    assert loading.refinement.head_dram_weight == 1.0


@pytest.mark.parametrize("head", [{"combine": "add", "dram_weight": 0.5}, {"combine": "add_after", "dram_weight": 0}])
def test_a_dram_weight_is_refused_where_it_cannot_apply(head):
    with pytest.raises(ValueError, match="dram_weight"):
        DenseRegressionNetwork(_unet(2, True), 2, (1.0, 1.0), image_channels=1, low_level_channels=4,
                               refinement={"attention": None, "crf": None, "downsample": 1,
                                           "head": {"inputs": "image", **head}})
