"""A frozen function as CUDA graphs (fast/frozen_graphs.py; v2's vision tower is its user) against the function itself
(the GPU test is skipped on a CPU)."""

from __future__ import annotations

import pytest
import torch

from dsocr_lightning.fast.frozen_graphs import ShapeGraphs


def tower() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.GELU(), torch.nn.Flatten(1),
                               torch.nn.LazyLinear(16))  # fmt: skip


def test_on_a_cpu_it_is_the_function():
    model, graphs = tower(), ShapeGraphs("test")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(graphs(model, x), model(x))
    assert graphs.graphs == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_replays_equal_the_function_per_shape_and_tag(caplog):
    model, graphs = tower().cuda(), ShapeGraphs("test", limit=2)
    model(torch.randn(1, 3, 16, 16, device="cuda"))  # the lazy layer takes its size
    with caplog.at_level("INFO"):
        for rows in (2, 3, 2, 5):  # 5: past the limit, eager
            x = torch.randn(rows, 3, 16, 16, device="cuda")
            out = graphs(model, x, tag="train")
            with torch.no_grad():
                torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    assert len(graphs.graphs) == 2 and "[5, 3, 16, 16] and later new shapes run eagerly" in caplog.text
    first = graphs(model, torch.ones(2, 3, 16, 16, device="cuda"), tag="train")
    second = graphs(model, torch.zeros(2, 3, 16, 16, device="cuda"), tag="train")
    assert not torch.equal(first, second)  # an output is the caller's own, not the graph's buffer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_function_that_cannot_be_captured_runs_eagerly_and_says_why(caplog):
    def copies_from_the_cpu(x):
        return x + torch.arange(x.shape[-1]).to(x.device)

    graphs, x = ShapeGraphs("test"), torch.zeros(2, 4, device="cuda")
    with caplog.at_level("WARNING"):
        for _ in range(2):
            torch.testing.assert_close(graphs(copies_from_the_cpu, x), copies_from_the_cpu(x))
    assert graphs.graphs == {((2, 4), torch.float32, x.device, None): None}
    assert caplog.text.count("input [2, 4] cannot run as a CUDA graph, it runs eagerly") == 1
