"""attnpool.pyg (SPEC.md §6): attention pooling as a PyTorch Geometric aggregation,
and the exact equality with PyG's own AttentionalAggregation for one folded query."""

import pytest
import torch

pytest.importorskip("torch_geometric")

from helpers import TOLERANCES  # noqa: E402
from torch_geometric.nn.aggr import AttentionalAggregation  # noqa: E402

import attnpool  # noqa: E402
from attnpool import reference  # noqa: E402
from attnpool.pyg import AttentionPoolingAggregation  # noqa: E402

# Nodes per graph: one graph without nodes in the middle, one at the end.
NODES = [4, 1, 0, 30, 7, 0]
TOL = TOLERANCES[torch.float64]


def _graphs(channels=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(NODES), channels, generator=gen, dtype=torch.float64)
    index = torch.repeat_interleave(torch.arange(len(NODES)), torch.tensor(NODES))
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(NODES).cumsum(0)])
    return x, index, ptr


def test_pyg_attentional_aggregation_is_one_folded_query():
    torch.manual_seed(0)
    x, index, ptr = _graphs()
    gate = torch.nn.Linear(16, 1).double()
    peer = AttentionalAggregation(gate_nn=gate)
    x_peer = x.clone().requires_grad_(True)
    want = peer(x_peer, index, dim_size=len(NODES))
    x_ours = x.clone().requires_grad_(True)
    u = gate.weight.detach().clone().requires_grad_(True)
    got = attnpool.folded_attention_pool_varlen(x_ours, u, index=index, num_segments=len(NODES))
    torch.testing.assert_close(got, want, **TOL)
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_peer.grad, **TOL)
    torch.testing.assert_close(u.grad, gate.weight.grad, **TOL)


@pytest.mark.parametrize("num_heads, num_queries", [(1, 1), (4, 3)])
def test_aggregation_equals_the_reference_for_index_ptr_and_one_graph(num_heads, num_queries):
    torch.manual_seed(0)
    x, index, ptr = _graphs()
    aggr = AttentionPoolingAggregation(16, num_heads, num_queries).double()
    pool = aggr.pool
    query = pool.query[0] if num_queries == 1 else pool.query
    want = reference.attention_pool_varlen(
        x, ptr, query, pool.q_proj.weight, pool.k_proj.weight, num_heads
    ).reshape(len(NODES), -1)
    assert want.shape == (len(NODES), num_queries * 16)
    for kwargs in (dict(index=index, dim_size=len(NODES)), dict(ptr=ptr)):
        torch.testing.assert_close(aggr(x, **kwargs), want, **TOL)
    # Without dim_size, graphs after the last index are not known to exist.
    torch.testing.assert_close(aggr(x, index), want[:-1], **TOL)
    # Neither index nor ptr: all nodes are one graph.
    whole = reference.attention_pool_varlen(
        x, ptr[[0, -1]], query, pool.q_proj.weight, pool.k_proj.weight, num_heads
    )
    torch.testing.assert_close(aggr(x), whole.reshape(1, -1), **TOL)


def test_aggregation_trains_inside_a_gnn_readout():
    from torch_geometric.nn import GCNConv

    torch.manual_seed(0)
    x, index, ptr = _graphs()
    edges = torch.stack([torch.arange(x.shape[0] - 1), torch.arange(1, x.shape[0])])
    conv = GCNConv(16, 16).double()
    aggr = AttentionPoolingAggregation(16, num_heads=2).double()
    out = aggr(conv(x, edges).relu(), index, dim_size=len(NODES))
    out.pow(2).sum().backward()
    for name, param in list(conv.named_parameters()) + list(aggr.named_parameters()):
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_bad_arguments_raise_clear_errors():
    x, index, _ = _graphs()
    aggr = AttentionPoolingAggregation(16).double()
    with pytest.raises(ValueError, match="x must be \\[num_nodes, channels\\]"):
        aggr(x[None], index, dim=1)
    with pytest.raises(ValueError, match="index must be sorted"):
        aggr(x, index.flip(0), dim_size=len(NODES))
