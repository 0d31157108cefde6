"""torch.compile: AttentionPooling inside a model compiles with fullgraph=True,
dynamic shapes compile once, and compiled outputs and gradients equal eager.

Inductor compiles C++ on the CPU, so these tests are few and use tiny models.
"""

import pytest
import torch
from helpers import DEVICES, TOLERANCES, PoolingModel, make_batch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import attnpool

# Six (B, L) pairs. None is 0 or 1: dynamo specialises sizes 0 and 1 even with
# dynamic=True (a documented torch behaviour), which would be a recompile that
# says nothing about this operator.
DYNAMIC_SHAPES = [(2, 5), (3, 7), (4, 16), (2, 33), (5, 3), (7, 2)]
TOL = TOLERANCES[torch.float32]


def _loss_and_grads(model, x, mask):
    """Output and gradients (of x and of every parameter) of a fixed weighted sum."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x, mask)
    weights = torch.linspace(-1.0, 1.0, out.numel(), device=out.device).view_as(out)
    (out * weights).sum().backward()
    grads = {"x": x.grad}
    module = getattr(model, "_orig_mod", model)  # the eager module behind a compiled one
    grads.update({name: p.grad.clone() for name, p in module.named_parameters()})
    module.zero_grad(set_to_none=True)
    return out.detach(), grads


def _assert_same(compiled, eager, what):
    torch.testing.assert_close(compiled[0], eager[0], **TOL, msg=lambda m: f"{what}, output: {m}")
    assert compiled[1].keys() == eager[1].keys()
    for name in eager[1]:
        torch.testing.assert_close(
            compiled[1][name],
            eager[1][name],
            **TOL,
            msg=lambda m, name=name: f"{what}, gradient of {name}: {m}",
        )


def _compiles_once_and_matches_eager(model, backend_name, shapes, device):
    """model (hidden 16, called as model(x, mask)) compiled with fullgraph=True
    and dynamic=True: outputs and gradients equal eager at each (B, L) of
    shapes, with one compile. Returns the backend, which holds the graph."""
    backend = CompileCounterWithBackend(backend_name)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    for step, (batch, seq_len) in enumerate(shapes):
        x, mask = make_batch(batch, seq_len, 16, device=device, seed=step)
        _assert_same(
            _loss_and_grads(compiled, x, mask),
            _loss_and_grads(model, x, mask),
            f"B={batch}, L={seq_len}",
        )
    assert backend.frame_count == 1, f"recompiled: {backend.frame_count} compiles"
    return backend


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_dynamic_fullgraph_compile_matches_eager_without_recompiling(device):
    torch.manual_seed(0)
    # A position-wise layer, attention pooling and a linear head.
    model = PoolingModel(16, num_heads=2, num_queries=2, out_features=3).to(device)
    backend = _compiles_once_and_matches_eager(model, "inductor", DYNAMIC_SHAPES, device)
    assert counters["stats"]["unique_graphs"] == 1
    (graph,) = backend.graphs
    pool_nodes = [
        node
        for node in graph.graph.nodes
        if node.target is torch.ops.attnpool.attention_pool.default
    ]
    assert len(pool_nodes) == 1, graph.code


@pytest.mark.parametrize("device", DEVICES)
# 4 queries: the costs were once compared with a term in 1/L that crossed at
# L = 8, between the shapes below, and the head recompiled there.
@pytest.mark.parametrize("num_queries", [2, 4, 24], ids=["fold", "fold-at-4", "projection"])
def test_multihead_attention_pooling_compiles_whole_on_either_path(device, num_queries):
    """The MAP head folds the query for few queries and projects the keys for
    many (CoCa's pooler): either way it traces into one graph, compiles once
    across shapes, and its outputs and gradients equal eager."""
    torch.manual_seed(2)
    head = attnpool.MultiheadAttentionPooling(16, 4, num_queries=num_queries).to(device)
    with torch.no_grad():
        head.in_proj_bias.normal_()
        head.out_proj.bias.normal_()
    w_v = head.in_proj_weight.chunk(3)[2]
    folds = attnpool.modules._fold_is_cheaper(head.query, w_v, head.num_heads)
    assert folds == (num_queries < 24)
    _compiles_once_and_matches_eager(head, "aot_eager", DYNAMIC_SHAPES[:4], device)


@pytest.mark.parametrize("device", DEVICES)
def test_max_autotune_compile_matches_eager_for_training_and_inference(device):
    torch.manual_seed(1)
    model = attnpool.AttentionPooling(8, num_heads=2).to(device)
    compiled = torch.compile(model, mode="max-autotune-no-cudagraphs", fullgraph=True)
    x, mask = make_batch(3, 6, 8, device=device, seed=7)
    _assert_same(_loss_and_grads(compiled, x, mask), _loss_and_grads(model, x, mask), "training")
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(x, mask), model(x, mask), **TOL, msg=lambda m: f"inference: {m}"
        )
    # One graph for training, one for inference (grad mode is guarded on).
    assert counters["stats"]["unique_graphs"] == 2
