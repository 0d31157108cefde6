"""Attention pooling as a PyTorch Geometric aggregation (SPEC.md §6).

Importable only where PyTorch Geometric is installed; attnpool itself does
not depend on it::

    from attnpool.pyg import AttentionPoolingAggregation
"""

from typing import Optional

import torch
from torch import Tensor

from attnpool.modules import AttentionPooling
from attnpool.ops import _segment_offsets, attention_pool_varlen

try:
    from torch_geometric.nn.aggr import Aggregation
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "attnpool.pyg needs PyTorch Geometric: pip install torch_geometric"
    ) from error


class AttentionPoolingAggregation(Aggregation):
    """Pools the nodes of each graph with learned queries, in one pass.

    The readout of :class:`attnpool.AttentionPooling` for PyG's batches: a
    graph's nodes are one sequence, and the whole batch runs as one ragged
    batch (:func:`attnpool.attention_pool_varlen`), without PyG's three
    passes (gate, segment softmax, scatter) and without padding.

    ``AttentionalAggregation(gate_nn=Linear(channels, 1))`` is the special
    case of one query folded into the gate's weight:
    ``attnpool.folded_attention_pool_varlen(x, gate.weight, index=index)``
    computes it exactly (the gate's bias cancels in the softmax).

    Args:
        channels: node feature width ``F``.
        num_heads: heads; must divide ``channels``.
        num_queries: learned queries. Each graph's output is the
            ``num_queries`` pooled vectors concatenated, ``[num_graphs,
            num_queries * channels]``, as PyG's ``SetTransformerAggregation``
            concatenates its seed points.

    ``forward(x, index=None, ptr=None, dim_size=None, dim=-2)``: ``x`` is
    ``[num_nodes, channels]``; ``ptr`` (PyG's ``batch.ptr``, which needs no
    conversion) or a sorted ``index`` (``batch.batch``) says which graph each
    node belongs to. Pass ``dim_size`` (the number of graphs) with ``index``
    to avoid a read of ``index.max()`` from the device. A graph without nodes
    pools to zeros.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_queries: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.num_heads = num_heads
        self.num_queries = num_queries
        self.pool = AttentionPooling(channels, num_heads, num_queries)

    def reset_parameters(self) -> None:
        self.pool.reset_parameters()

    def forward(
        self,
        x: Tensor,
        index: Optional[Tensor] = None,
        ptr: Optional[Tensor] = None,
        dim_size: Optional[int] = None,
        dim: int = -2,
    ) -> Tensor:
        owner = type(self).__name__
        if x.dim() != 2 or dim not in (0, -2):
            raise ValueError(
                f"{owner}: x must be [num_nodes, channels] and dim the node dimension "
                f"(0 or -2), got x of shape {list(x.shape)} and dim={dim}"
            )
        if ptr is not None:
            offsets = ptr
        elif index is not None:
            offsets = _segment_offsets(owner, index, dim_size)
        else:
            offsets = torch.tensor([0, x.shape[0]], device=x.device)
        pool = self.pool
        query = pool.query[0] if self.num_queries == 1 else pool.query
        out = attention_pool_varlen(
            x,
            query,
            pool.q_proj.weight,
            pool.k_proj.weight,
            cu_seqlens=offsets,
            num_heads=self.num_heads,
        )
        return out.flatten(1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.channels}, num_heads={self.num_heads}, "
            f"num_queries={self.num_queries})"
        )
