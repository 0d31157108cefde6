"""Python entry point of the attnpool::attention_pool operator."""

from typing import Optional

import torch
from torch import Tensor


def attention_pool(
    x: Tensor,
    query: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    mask: Optional[Tensor] = None,
    num_heads: int = 1,
    scale: Optional[float] = None,
) -> Tensor:
    """Pools each sequence of ``x`` into one vector per query (SPEC.md §1).

    Scores are ``scale * (w_k @ x[b, l])[D_h] . (w_q @ query[i])[D_h]`` per head
    ``h`` (its ``d = H / num_heads`` consecutive dims ``D_h``), softmax runs over
    the sequence, and the values are ``x`` itself. The key projection is folded
    into the query, so the op makes one pass over ``x`` forward and one
    backward, and allocates nothing of size ``[B, L, H]`` in the forward.

    Args:
        x: ``[B, L, H]`` float64/float32/float16/bfloat16. Any strides; rows
            whose last dimension is not contiguous are copied first.
        query: ``[H]`` or ``[Q, H]``.
        w_q, w_k: ``[H, H]`` projection weights in ``nn.Linear`` layout (out, in).
            Same dtype as ``x``, or float32 when ``x`` is float16/bfloat16.
        mask: optional ``[B, L]``; nonzero (``True``) means "attend". A sequence
            with no position to attend (or ``L == 0``) pools to zeros, with zero
            gradients. Masked positions never reach the output, even if NaN.
        num_heads: number of heads; must divide ``H``.
        scale: score scale, finite and positive; defaults to ``1/sqrt(H / num_heads)``.

    Returns:
        ``[B, H]`` for a 1-D ``query``, ``[B, Q, H]`` otherwise, in ``x``'s dtype.
        Differentiable in ``x``, ``query``, ``w_q`` and ``w_k`` (first order).

    Raises:
        ValueError: wrong shapes, devices, ``num_heads`` or ``scale``.
        TypeError: unsupported dtypes.
    """
    return torch.ops.attnpool.attention_pool.default(x, query, w_q, w_k, mask, num_heads, scale)
