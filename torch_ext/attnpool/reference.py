"""Pure-PyTorch attention pooling: the executable form of SPEC.md.

Written for clarity, not speed: it projects every key (``x @ w_k.T``) as the
original design did, which the fused kernels avoid. Tests compare the kernels
with it, and benchmarks time it as the "notebook" composition.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_norm_rows(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Tensor:
    """The layer norm a MAP head fuses into its pooling pass (open_clip's
    ``ln_k``): over each row of ``x``, in the accumulation dtype, rounded to
    ``x``'s dtype."""
    acc = accumulate_dtype(x.dtype)
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    return F.layer_norm(x.to(acc), (x.shape[-1],), w, b, eps).to(x.dtype)


def _keep(mask: Tensor) -> Tensor:
    """Where a mask attends: nonzero. Floating-point masks are refused (SPEC §2)."""
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(
            f"mask must be bool or an integer dtype (nonzero = attend), got {mask.dtype}: "
            "SDPA-style additive masks mean the opposite (0 = attend, -inf = masked); "
            "pass them as attn_bias"
        )
    return mask != 0


def _attended(
    x: Tensor,
    mask: Optional[Tensor],
    attn_bias: Optional[Tensor],
    lengths: Optional[Tensor] = None,
) -> Tensor:
    """[B, L] bool: positions that count. A -inf bias excludes its position like
    the mask does, so a NaN row there cannot reach the output; lengths [B] keeps
    l < lengths[b] (SPEC §6)."""
    keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if mask is not None:
        keep = _keep(mask)
    if lengths is not None:
        if mask is not None:
            raise ValueError("pass at most one of mask and lengths")
        keep = torch.arange(x.shape[1], device=x.device) < lengths[:, None]
    if attn_bias is not None:
        keep = keep & (attn_bias != float("-inf"))
    return keep


def _biased(scores: Tensor, attn_bias: Optional[Tensor]) -> Tensor:
    """scores [B, Q, n, L] plus attn_bias [B, L] in the scores' dtype."""
    if attn_bias is None:
        return scores
    return scores + attn_bias.to(scores.dtype)[:, None, None, :]


def attention_pool(
    x: Tensor,
    query: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    mask: Optional[Tensor] = None,
    num_heads: int = 1,
    scale: Optional[float] = None,
    attn_bias: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tensor:
    """Same signature and semantics as :func:`attnpool.attention_pool`."""
    batch, seq_len, hidden = x.shape
    head_dim = hidden // num_heads
    if scale is None:
        scale = head_dim**-0.5 if head_dim > 0 else 1.0
    acc = accumulate_dtype(x.dtype)
    num_queries = 1 if query.dim() == 1 else query.shape[0]
    queries = query.reshape(num_queries, hidden).to(acc)
    keep = _attended(x, mask, attn_bias, lengths)
    # Masked positions never reach the output, even when they hold NaN or Inf.
    xs = x.to(acc).masked_fill(~keep[..., None], 0)

    projected_query = queries @ w_q.to(acc).T  # [Q, H]
    keys = xs @ w_k.to(acc).T  # [B, L, H]
    scores = scale * torch.einsum(
        "blnd,qnd->bqnl",
        keys.view(batch, seq_len, num_heads, head_dim),
        projected_query.view(num_queries, num_heads, head_dim),
    )
    scores = _biased(scores, attn_bias).masked_fill(~keep[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A sequence with nothing to attend pools to zeros instead of NaN.
    probs = torch.where(keep.any(dim=1)[:, None, None, None], probs, 0.0)
    out = torch.einsum("bqnl,blnd->bqnd", probs, xs.view(batch, seq_len, num_heads, head_dim))
    out = out.reshape(batch, num_queries, hidden).to(x.dtype)
    return out[:, 0] if query.dim() == 1 else out


def fold_query(
    query: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    num_heads: int = 1,
    q_bias: Optional[Tensor] = None,
) -> Tensor:
    """Same signature and semantics as :func:`attnpool.fold_query`."""
    acc = accumulate_dtype(query.dtype)
    projected = query.reshape(-1, query.shape[-1]).to(acc) @ w_q.to(acc).T  # [Q, E]
    if q_bias is not None:
        projected = projected + q_bias.to(acc)
    proj_dim, x_dim = w_k.shape
    head_dim = proj_dim // num_heads
    u = torch.einsum(
        "qnd,ndh->qnh",
        projected.view(-1, num_heads, head_dim),
        w_k.to(acc).view(num_heads, head_dim, x_dim),
    )
    return u[0] if query.dim() == 1 else u


def folded_attention_pool(
    x: Tensor,
    u: Tensor,
    mask: Optional[Tensor] = None,
    scale: float = 1.0,
    full_width: bool = False,
    attn_bias: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tensor:
    """Same signature and semantics as :func:`attnpool.folded_attention_pool`."""
    batch, seq_len, hidden = x.shape
    acc = accumulate_dtype(x.dtype)
    us = u.reshape(-1, u.shape[-2], hidden).to(acc)  # [Q, n, H]
    num_queries, num_heads = us.shape[:2]
    keep = _attended(x, mask, attn_bias, lengths)
    xs = x.to(acc).masked_fill(~keep[..., None], 0)
    scores = scale * torch.einsum("blh,qnh->bqnl", xs, us)
    scores = _biased(scores, attn_bias).masked_fill(~keep[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(keep.any(dim=1)[:, None, None, None], probs, 0.0)
    if full_width:
        out = torch.einsum("bqnl,blh->bqnh", probs, xs)
    else:
        head_dim = hidden // num_heads
        out = torch.einsum(
            "bqnl,blnd->bqnd", probs, xs.view(batch, seq_len, num_heads, head_dim)
        ).reshape(batch, num_queries, hidden)
    out = out.to(x.dtype)
    return out[:, 0] if u.dim() == 2 else out


def padded(x: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
    """A ragged batch (x ``[T, H]``, ``cu_seqlens [B + 1]``, SPEC §6) as a
    right-padded ``[B, L, H]`` batch and its ``lengths [B]``, ``L`` the longest."""
    offsets = cu_seqlens.tolist()
    spans = list(zip(offsets[:-1], offsets[1:], strict=True))
    lengths = [end - begin for begin, end in spans]
    batch = x.new_zeros(len(spans), max(lengths, default=0), x.shape[-1])
    for b, (begin, end) in enumerate(spans):
        batch[b, : end - begin] = x[begin:end]
    return batch, torch.tensor(lengths, dtype=torch.int64, device=x.device)


def attention_pool_varlen(
    x: Tensor,
    cu_seqlens: Tensor,
    query: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    num_heads: int = 1,
    scale: Optional[float] = None,
) -> Tensor:
    """Same semantics as ``torch.ops.attnpool.attention_pool_varlen``: the
    sequences padded, then :func:`attention_pool` with ``lengths``."""
    batch, lengths = padded(x, cu_seqlens)
    return attention_pool(batch, query, w_q, w_k, None, num_heads, scale, lengths=lengths)


def folded_attention_pool_varlen(
    x: Tensor,
    cu_seqlens: Tensor,
    u: Tensor,
    scale: float = 1.0,
    full_width: bool = False,
) -> Tensor:
    """Same semantics as ``torch.ops.attnpool.folded_attention_pool_varlen``."""
    batch, lengths = padded(x, cu_seqlens)
    return folded_attention_pool(batch, u, None, scale, full_width, lengths=lengths)


def weighted_pool(x: Tensor, logits: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Learned per-position weights ``softmax(logits[:L])`` over the unmasked positions."""
    batch, seq_len, _ = x.shape
    keep = (
        torch.ones(batch, seq_len, dtype=torch.bool, device=x.device)
        if mask is None
        else _keep(mask)
    )
    scores = logits[:seq_len].to(x.dtype).expand(batch, seq_len).masked_fill(~keep, float("-inf"))
    weights = torch.where(keep.any(dim=1, keepdim=True), torch.softmax(scores, dim=-1), 0.0)
    return torch.einsum("bl,blh->bh", weights, x.masked_fill(~keep[..., None], 0))


def mean_pool(x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean over the unmasked positions; zeros for a sequence with none."""
    if mask is None:
        return x.mean(dim=1) if x.shape[1] > 0 else x.sum(dim=1)
    keep = _keep(mask).to(x.dtype)[..., None]
    return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1)
