"""The refinement's CUDA graph (building_blocks/cuda_graphs.py): eager wherever a graph cannot serve, the same
numbers where it does (the CUDA test runs on a GPU machine: `python -m pytest tests/test_cuda_graphs.py`)."""
import pytest
import torch
from torch import nn

from nnunetv2_dram.architectures.dram_network import DenseRegressionNetwork
from nnunetv2_dram.building_blocks.cuda_graphs import GraphCache, graphable, signature
from nnunetv2_dram.training.budget import CUDA_GRAPHS_VARIABLE, cuda_graphs_from_environment


def _network(cuda_graphs: bool, device="cpu") -> DenseRegressionNetwork:
    torch.manual_seed(0)
    backbone = nn.Conv3d(1, 1, 3, padding=1)
    return DenseRegressionNetwork(backbone, 3, (2.0, 0.8, 0.8), image_channels=1, low_level_channels=None,
                                  refine_downsample=2, cuda_graphs=cuda_graphs).to(device)


def _run(net, x):
    net.zero_grad(set_to_none=True)
    out = net(x, return_all=True)
    (out["attended"].square().mean() + out["refined"].mean()).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return out["attended"].detach().clone(), out["refined"].detach().clone(), grads


def test_on_the_cpu_the_graph_switch_changes_nothing():
    x = torch.randn(2, 1, 8, 20, 20)
    eager, switched = _run(_network(False), x), _run(_network(True), x)
    assert torch.equal(eager[0], switched[0]) and torch.equal(eager[1], switched[1])
    assert eager[2].keys() == switched[2].keys() and all(torch.equal(eager[2][k], switched[2][k]) for k in eager[2])


def test_the_graph_adds_nothing_to_the_checkpoint():
    assert _network(True).state_dict().keys() == _network(False).state_dict().keys()


def test_cache_runs_eagerly_where_no_graph_can_serve():
    built = []

    def build(key):
        built.append(key)
        return nn.Linear(3, 2)

    cache = GraphCache(build)
    x = torch.randn(4, 3, requires_grad=True)
    assert not graphable(x)  # CPU tensor
    y = cache(signature(x), x)
    y2 = cache(signature(x), x)
    assert y.shape == y2.shape == (4, 2) and built == [signature(x)]  # one module per key, reused
    assert cache.graphed == {} and cache.failure is None
    with torch.no_grad():
        assert not graphable(x)


@pytest.mark.parametrize("value,expected", [(None, False), ("1", True), ("0", False)])
def test_environment_switch(value, expected, monkeypatch):
    if value is None:
        monkeypatch.delenv(CUDA_GRAPHS_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(CUDA_GRAPHS_VARIABLE, value)
    assert cuda_graphs_from_environment(False) is expected


def test_bad_environment_value_stops_with_its_name(monkeypatch):
    monkeypatch.setenv(CUDA_GRAPHS_VARIABLE, "yes")
    with pytest.raises(SystemExit, match=CUDA_GRAPHS_VARIABLE):
        cuda_graphs_from_environment(False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_refinement_gives_the_eager_numbers_on_cuda():
    x = torch.randn(2, 1, 16, 40, 40, device="cuda")
    eager_net, graph_net = _network(False, "cuda"), _network(True, "cuda")
    eager = _run(eager_net, x)
    for _ in range(3):  # capture on the first call, replays after; replays must not drift
        graphed = _run(graph_net, x)
    assert len(graph_net._refinement_graphs.graphed) == 1 and graph_net._refinement_graphs.failure is None
    for a, b in zip(eager[:2], graphed[:2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert eager[2].keys() == graphed[2].keys()
    for k in eager[2]:
        torch.testing.assert_close(eager[2][k], graphed[2][k], rtol=1e-3, atol=1e-5)
    x2 = torch.randn(2, 1, 16, 40, 40, device="cuda")  # new data through the same graph
    torch.testing.assert_close(_run(eager_net, x2)[1], _run(graph_net, x2)[1], rtol=1e-4, atol=1e-4)
