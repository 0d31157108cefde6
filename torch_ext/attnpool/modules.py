"""nn.Module front ends: AttentionPooling (the fused op), MultiheadAttentionPooling
(a MAP head: the op plus value and output projections) and WeightedPooling."""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad

from attnpool import _C, reference
from attnpool._transforms import under_torch_func, under_vmap
from attnpool.ops import (
    _check_int,
    _check_number,
    _dtype_name,
    attention_pool,
    fold_query,
    folded_attention_pool,
)

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _check_plain_linear(module: nn.Module, name: str) -> None:
    """Refuses what would be silently ignored: the op reads ``<name>.weight``
    and never calls the Linear, so its hooks would not run and a changed
    forward (LoRA, adapters) would not apply. Parametrizations change the
    weight itself and work."""
    owner = type(module).__name__
    linear = getattr(module, name)
    if not isinstance(linear, nn.Linear) or type(linear).forward is not nn.Linear.forward:
        raise TypeError(
            f"{owner}: {name} must be a plain nn.Linear (parametrizations are fine), got "
            f"{type(linear).__name__} with a forward of its own: {owner} folds {name}.weight into "
            f"the query and never calls {name}, so the changed forward would be ignored; merge "
            "it into the weight, or use torch.nn.utils.parametrize"
        )
    hooked = (
        linear._forward_pre_hooks
        or linear._forward_hooks
        or linear._backward_hooks
        or linear._backward_pre_hooks
    )
    if hooked:
        raise ValueError(
            f"{owner}: {name} has module hooks (torch.nn.utils.prune, the old weight_norm or "
            f"spectral_norm, or hooks of your own), which would never run: {owner} reads "
            f"{name}.weight and never calls {name}. Use torch.nn.utils.parametrize instead "
            "(torch.nn.utils.parametrizations.weight_norm / spectral_norm / custom "
            "parametrizations, pruning as a parametrization), or remove the hooks"
        )


def _check_sizes(owner: str, embed_dim: int, num_heads: int, num_queries: int) -> None:
    """The constructor checks the attention modules share, with the op's kinds of
    error: TypeError for a non-int, ValueError for a bad value."""
    for name, value in (
        ("embed_dim", embed_dim),
        ("num_heads", num_heads),
        ("num_queries", num_queries),
    ):
        _check_int(owner, name, value)
    if embed_dim < 1:
        raise ValueError(f"{owner}: embed_dim must be >= 1, got {embed_dim}")
    if num_heads < 1 or embed_dim % num_heads != 0:
        raise ValueError(
            f"{owner}: num_heads must be >= 1 and divide embed_dim = {embed_dim}, "
            f"got num_heads = {num_heads}"
        )
    if num_queries < 1:
        raise ValueError(f"{owner}: num_queries must be >= 1, got {num_queries}")


class AttentionPooling(nn.Module):
    """Pools ``[B, L, embed_dim]`` sequences with learned queries (SPEC.md §1).

    Parameters (state_dict names match the C++ ``attnpool::AttentionPooling``):

    - ``query``: ``[num_queries, embed_dim]``, initialised from
      ``N(0, 1/embed_dim)`` so that each query has about unit norm;
    - ``q_proj.weight``, ``k_proj.weight``: ``[embed_dim, embed_dim]``
      bias-free ``nn.Linear`` weights with ``nn.Linear``'s default init.

    With this init the scores start small, so an untrained module pools close
    to the mean of the unmasked positions, and learns where to look from there.

    ``forward(x, mask=None, lengths=None)`` returns ``[B, embed_dim]`` when ``num_queries == 1``
    and ``[B, num_queries, embed_dim]`` otherwise, in ``x``'s dtype. ``x`` is
    ``[B, L, embed_dim]``, or a jagged nested tensor ``[B, j, embed_dim]``
    (``layout=torch.jagged``), pooled without padding. ``x`` may be
    float16/bfloat16 while the parameters stay float32 (mixed precision).
    ``mask`` (``[B, L]``): ``True`` (nonzero) means attend, the opposite of
    ``nn.MultiheadAttention``'s ``key_padding_mask``; pass ``~key_padding_mask``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int = 1,
        num_queries: int = 1,
        *,
        scale: Optional[float] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_sizes("AttentionPooling", embed_dim, num_heads, num_queries)
        if scale is not None:
            _check_number("AttentionPooling", "scale", scale)
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(
                    f"AttentionPooling: scale must be a finite positive number, got {scale}"
                )
            scale = float(scale)
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_queries = num_queries
        self.scale = scale
        self.query = nn.Parameter(torch.empty(num_queries, embed_dim, **factory))
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=False, **factory)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=False, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.query, std=self.embed_dim**-0.5)
        self.q_proj.reset_parameters()
        self.k_proj.reset_parameters()

    def forward(
        self, x: Tensor, mask: Optional[Tensor] = None, lengths: Optional[Tensor] = None
    ) -> Tensor:
        # (lengths is not keyword-only: TorchScript refuses keyword-only arguments.)
        # A nested x is attention_pool's to check: its layout, then its width.
        if not x.is_nested and (x.dim() != 3 or x.shape[-1] != self.embed_dim):
            raise ValueError(
                f"AttentionPooling: x must have shape [B, L, embed_dim = {self.embed_dim}], "
                f"got {list(x.shape)}"
            )
        if not torch.jit.is_scripting():
            _check_plain_linear(self, "q_proj")
            _check_plain_linear(self, "k_proj")
        query = self.query[0] if self.num_queries == 1 else self.query
        # A jagged nested x pools as a ragged batch (attention_pool does it).
        return attention_pool(
            x,
            query,
            self.q_proj.weight,
            self.k_proj.weight,
            mask,
            self.num_heads,
            self.scale,
            None,
            lengths,
        )

    def extra_repr(self) -> str:
        text = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_queries={self.num_queries}"
        return text if self.scale is None else f"{text}, scale={self.scale}"


class MultiheadAttentionPooling(nn.Module):
    """Multi-head attention pooling with learned queries (a "MAP head", SPEC.md §7).

    Computes exactly ``nn.MultiheadAttention(embed_dim, num_heads, kdim=kdim,
    vdim=kdim, bias=bias, batch_first=True)(query.expand(B, Q, E), x, x,
    key_padding_mask=~mask)[0]``, with that module's parameter names
    (``in_proj_weight`` when ``kdim == embed_dim``, else ``q_proj_weight``,
    ``k_proj_weight``, ``v_proj_weight``; ``in_proj_bias``, ``out_proj``) plus
    ``query`` (``[num_queries, embed_dim]``), so the state_dict of an
    ``nn.MultiheadAttention`` plus a ``query`` loads strictly, and the
    initialisation is that module's.

    It never projects a key or a value: the query is folded through the query
    and key projections (the key bias cancels in the softmax), each head pools
    ``x`` over its full width, and the value projection runs on the pooled
    vectors. Per element of ``x`` that is ``2 * num_queries * num_heads``
    multiply-adds instead of about ``2 * embed_dim``, and the backward saves only
    the pooled vectors. Only where that costs more (many queries and heads, as
    in CoCa's pooler) does it project the keys and values instead.

    ``forward(x, mask=None, attn_bias=None, lengths=None)``: ``x`` ``[B, L, kdim]``, ``mask``
    ``[B, L]`` with ``True`` (nonzero) = attend (pass ``~key_padding_mask``),
    ``attn_bias`` ``[B, L]`` added to every score (a float ``attn_mask``; -inf
    excludes a position). Returns ``[B, E]`` for one query, ``[B, Q, E]``
    otherwise. A row with nothing to attend gives ``out_proj.bias``
    (``nn.MultiheadAttention`` gives NaN) and zero gradient to ``x``. ``x`` may be float16/bfloat16 with float32 parameters; the projections
    then run in the parameters' dtype and the output is in ``x``'s.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_queries: int = 1,
        *,
        kdim: Optional[int] = None,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        owner = "MultiheadAttentionPooling"
        _check_sizes(owner, embed_dim, num_heads, num_queries)
        if kdim is not None:
            _check_int(owner, "kdim", kdim)
            if kdim < 1:
                raise ValueError(f"{owner}: kdim must be >= 1, got {kdim}")
        if not isinstance(bias, bool):
            raise TypeError(f"{owner}: bias must be a bool, got {type(bias).__name__}")
        kdim = embed_dim if kdim is None else kdim
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim
        self.vdim = kdim
        self.num_heads = num_heads
        self.num_queries = num_queries
        self.head_dim = embed_dim // num_heads
        self.batch_first = True
        # nn.MultiheadAttention's layout: one packed weight when every width is
        # embed_dim, three otherwise.
        self._qkv_same_embed_dim = kdim == embed_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, kdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.query = nn.Parameter(torch.empty(num_queries, embed_dim, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.MultiheadAttention's init, and AttentionPooling's for the query.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        self.out_proj.reset_parameters()
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        nn.init.normal_(self.query, std=self.embed_dim**-0.5)

    def forward(
        self,
        x: Tensor,
        mask: Optional[Tensor] = None,
        attn_bias: Optional[Tensor] = None,
        lengths: Optional[Tensor] = None,
    ) -> Tensor:
        if x.is_nested:
            raise TypeError(
                "MultiheadAttentionPooling: x must be a dense [B, L, kdim] tensor, got a nested "
                "tensor (pad it and pass lengths)"
            )
        # The fold's rule (u is float64 for float64 weights, else float32), on
        # either path: the projection path would otherwise cast x silently.
        folded = torch.float64 if self.query.dtype == torch.float64 else torch.float32
        if x.is_floating_point() and not (
            x.dtype == folded
            or (folded == torch.float32 and x.dtype in (torch.float16, torch.bfloat16))
        ):
            rule = "float64 x takes float64 parameters, float32 and 16-bit x the others"
            if torch.jit.is_scripting():  # (where a dtype prints as a number)
                raise TypeError(f"MultiheadAttentionPooling: x's dtype and the parameters': {rule}")
            x_dtype = str(x.dtype).replace("torch.", "")
            param_dtype = str(self.query.dtype).replace("torch.", "")
            raise TypeError(
                f"MultiheadAttentionPooling: x is {x_dtype} and the parameters are "
                f"{param_dtype}: {rule}"
            )
        w_q, b_q, w_k, w_v, b_v = split_projection_weights(
            self.in_proj_weight,
            self.q_proj_weight,
            self.k_proj_weight,
            self.v_proj_weight,
            self.in_proj_bias,
        )
        projected = pool_projected(
            x, self.query, w_q, b_q, w_k, w_v, b_v, self.num_heads, mask, attn_bias, lengths
        )
        out = self.out_proj(projected).to(x.dtype)
        return out[:, 0] if self.num_queries == 1 else out

    def extra_repr(self) -> str:
        text = (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_queries={self.num_queries}"
        )
        if self.kdim != self.embed_dim:
            text += f", kdim={self.kdim}"
        return text if self.in_proj_bias is not None else f"{text}, bias=False"


def pool_with_projections(
    attention: nn.Module,
    x: Tensor,
    query: Tensor,
    mask: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    key_norm: Optional[nn.LayerNorm] = None,
    owner: str = "MultiheadAttentionPooling",
    x_name: str = "x",
) -> Tensor:
    """``attention(query.expand(B, Q, E), x, x)[0]`` ([B, Q, E], x's dtype) for an
    ``nn.MultiheadAttention``-like ``attention`` (its parameters: ``in_proj_weight``
    or ``q/k/v_proj_weight``, ``in_proj_bias``, ``out_proj``; ``num_heads``),
    without projecting a key or a value (SPEC.md §7): see :func:`pool_projected`.
    Shared by MultiheadAttentionPooling and the converted peer heads. With
    ``key_norm`` (a LayerNorm over x's rows, as open_clip's ``ln_k``), the
    keys and values are those of ``key_norm(x)``, normalized in the pooling
    pass (:func:`pool_projected`'s ``norm_eps``). Errors name ``owner`` (the
    module called) and ``x_name`` (its name for ``x``)."""
    w_q, b_q, w_k, w_v, b_v = projection_weights(attention)
    norm_weight, norm_bias, norm_eps = None, None, None
    if key_norm is not None:
        norm_weight, norm_bias, norm_eps = key_norm.weight, key_norm.bias, key_norm.eps
    projected = pool_projected(
        x,
        query,
        w_q,
        b_q,
        w_k,
        w_v,
        b_v,
        attention.num_heads,
        mask,
        attn_bias,
        lengths,
        norm_weight,
        norm_bias,
        norm_eps,
        owner=owner,
        x_name=x_name,
    )
    return attention.out_proj(projected).to(x.dtype)


def projection_weights(attention: nn.Module):
    """``(w_q, b_q, w_k, w_v, b_v)`` of an ``nn.MultiheadAttention``-like module:
    :func:`split_projection_weights` of its parameters."""
    return split_projection_weights(
        attention.in_proj_weight,
        attention.q_proj_weight,
        attention.k_proj_weight,
        attention.v_proj_weight,
        attention.in_proj_bias,
    )


def split_projection_weights(
    in_proj_weight: Optional[Tensor],
    q_proj_weight: Optional[Tensor],
    k_proj_weight: Optional[Tensor],
    v_proj_weight: Optional[Tensor],
    in_proj_bias: Optional[Tensor],
) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor, Optional[Tensor]]:
    """``(w_q, b_q, w_k, w_v, b_v)`` from ``nn.MultiheadAttention``'s projection
    parameters, packed (``in_proj_weight``) or not; the biases are None without
    ``in_proj_bias`` (the key bias is left out: it cancels in the softmax).
    Tensors in, so that TorchScript compiles it."""
    if in_proj_weight is not None:
        w_q, w_k, w_v = in_proj_weight.chunk(3)
    else:
        assert q_proj_weight is not None and k_proj_weight is not None
        assert v_proj_weight is not None
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    b_q: Optional[Tensor] = None
    b_v: Optional[Tensor] = None
    if in_proj_bias is not None:
        b_q, _, b_v = in_proj_bias.chunk(3)
    return w_q, b_q, w_k, w_v, b_v


def pool_projected(
    x: Tensor,
    query: Tensor,
    w_q: Tensor,
    b_q: Optional[Tensor],
    w_k: Tensor,
    w_v: Tensor,
    b_v: Optional[Tensor],
    num_heads: int,
    mask: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    norm_eps: Optional[float] = None,
    owner: str = "MultiheadAttentionPooling",
    x_name: str = "x",
) -> Tensor:
    """Multi-head attention of ``query [Q, Eq]`` over ``x [B, L, kdim]`` with query,
    key and value projections ``w_q [E, Eq]`` (+ ``b_q``), ``w_k``, ``w_v [E, kdim]``
    (+ ``b_v``; a key bias cancels in the softmax), before any output projection:
    ``[B, Q, E]`` in the weights' dtype. Computed without projecting a key or a
    value: the query is folded through ``w_q`` and ``w_k``, each head pools
    ``x`` over its full width, and ``w_v`` runs on the pooled vectors (SPEC.md
    §7). A row with nothing to attend gives 0 (``b_v`` is added where a row
    attends, as the softmax weights it).

    When many queries and heads make the fold cost more than projecting the
    keys and values (CoCa's 256 queries x 8 heads), this projects them
    instead (:func:`_pool_by_projection`), the same result: see
    :func:`_fold_is_cheaper`.

    With ``norm_eps``, the keys and values are those of
    ``reference.layer_norm_rows(x, norm_weight, norm_bias, norm_eps)`` (open_clip's
    ``ln_k``); on the fold's path the norm runs in the pooling pass, so no
    normalized copy of ``x`` is made or saved.

    Errors name ``owner``, the module called, and ``x_name``, its name for
    ``x`` (a converted Hugging Face head's ``hidden_state``)."""
    # The checks the ops make on the fold's path, made here for both paths:
    # they refuse the same inputs, and the errors name the module (the ops'
    # would name u, the folded query, for an x of the wrong width).
    kdim = w_k.shape[1]
    if not x.is_nested and (x.dim() != 3 or x.shape[-1] != kdim):
        raise ValueError(
            f"{owner}: {x_name} must have shape [B, L, {kdim}] (the key projection's "
            f"input width), got {list(x.shape)}"
        )
    torch.ops.attnpool._check_pooled_positions(owner, x, mask, attn_bias, lengths)
    if not _fold_is_cheaper(query, w_v, num_heads):
        if norm_eps is not None:
            x = reference.layer_norm_rows(x, norm_weight, norm_bias, norm_eps)
        return _pool_by_projection(
            x, query, w_q, b_q, w_k, w_v, b_v, num_heads, mask, attn_bias, lengths
        )
    head_dim = w_v.shape[0] // num_heads
    u = fold_query(query, w_q, w_k, num_heads, b_q)  # [Q, n, kdim]
    # [B, Q, n, kdim]
    if norm_eps is None:
        pooled = folded_attention_pool(x, u, mask, head_dim**-0.5, True, attn_bias, lengths)
    else:
        # The norm in the pooling pass (under torch.func: the two parts).
        pooled = torch.ops.attnpool._layer_norm_folded_attention_pool(
            x, u, norm_weight, norm_bias, norm_eps, mask, head_dim**-0.5, True, attn_bias, lengths
        )
    pooled = pooled.to(w_v.dtype)
    embed_dim, kdim = w_v.shape
    # Per head: o[D_h] = W_v[D_h] @ pooled[h] (+ b_v[D_h] where a row attends).
    values = torch.einsum("bqnk,ndk->bqnd", pooled, w_v.reshape(num_heads, head_dim, kdim))
    values = values.reshape(x.shape[0], query.shape[0], embed_dim)
    if b_v is not None:
        # (The positions that count, as the op saw them.)
        attends = reference._attended(x, mask, attn_bias, lengths).any(dim=1)
        values = values + attends.to(values.dtype)[:, None, None] * b_v
    return values


def _fold_is_cheaper(query: Tensor, w_v: Tensor, num_heads: int) -> bool:
    """Multiply-adds per element of x [B, L, kdim] (SPEC.md §5): the fold scores
    and sums Q·n times (2·Q·n); projecting costs 2·E for the keys and values,
    then Q·E·2/kdim for the attention itself. The fold's value projection on
    the B·Q·n pooled rows (Q·E/L per element) is left out: with it the choice
    would depend on L, and torch.compile and torch.export would guard on L
    (recompiling, or refusing a dynamic L) where the two costs cross."""
    num_queries = query.shape[0]
    embed_dim, kdim = w_v.shape
    fold = 2 * num_queries * num_heads
    project = 2 * embed_dim + 2 * num_queries * embed_dim / kdim
    return fold <= project


def _pool_by_projection(
    x: Tensor,
    query: Tensor,
    w_q: Tensor,
    b_q: Optional[Tensor],
    w_k: Tensor,
    w_v: Tensor,
    b_v: Optional[Tensor],
    num_heads: int,
    mask: Optional[Tensor],
    attn_bias: Optional[Tensor],
    lengths: Optional[Tensor],
) -> Tensor:
    """What :func:`pool_projected` computes, by projecting every key and value
    and calling ``scaled_dot_product_attention``, with the same conventions:
    positions that do not count are never read (zeroed first, so NaN padding
    stays out), and a row with nothing to attend gives 0 with zero gradients."""
    batch, seq_len, _ = x.shape
    embed_dim = w_v.shape[0]
    dtype = w_v.dtype
    xs = x.to(dtype)
    scores_mask: Optional[Tensor] = None
    any_kept: Optional[Tensor] = None
    if mask is not None or attn_bias is not None or lengths is not None:
        keep = reference._attended(x, mask, attn_bias, lengths)  # [B, L]
        any_kept = keep.any(dim=1)
        xs = xs.masked_fill(~keep[..., None], 0)
        bias = torch.zeros(keep.shape, dtype=dtype, device=x.device)
        if attn_bias is not None:
            bias = bias + attn_bias.to(dtype)
        # A row with nothing to attend attends everywhere (no NaN, forward or
        # backward) and is zeroed below.
        bias = bias.masked_fill(~keep & any_kept[:, None], float("-inf"))
        scores_mask = bias.masked_fill(~any_kept[:, None], 0.0)[:, None, None, :]

    heads_query = _split_heads(F.linear(query, w_q, b_q), num_heads)  # [n, Q, d]
    q = heads_query.unsqueeze(0).expand(batch, -1, -1, -1)  # [B, n, Q, d]
    k = _split_heads(F.linear(xs, w_k), num_heads)  # [B, n, L, d]; a key bias cancels
    v = _split_heads(F.linear(xs, w_v, b_v), num_heads)
    # SDPA has no forward-mode AD, and its backward rebuilds p from a
    # log-sum-exp, max + log(sum), which for a row whose every bias is
    # finfo.min (as peers pad, a uniform average) rounds back to finfo.min:
    # p = 1 where the softmax gave 1/L, gradients L times too large. The
    # softmax's own backward uses p. Nor has it a batching rule: under vmap
    # (per-sample gradients) it ran once per sample, the matmuls batch.
    # bfloat16 on the CPU: float32 scores and softmax give gradients closer
    # to float64 than SDPA's, and below AMX run faster; inference with AMX
    # takes SDPA, which multiplies on the tiles (products_are_faster in
    # csrc/ops/attention_pool_by_projection.cpp, also for why float32 keeps
    # SDPA).
    exact = attn_bias is not None or (xs.device.type == "cpu" and dtype == torch.bfloat16)
    by_sequence = False
    cut = True
    flushed = False
    if not torch.jit.is_scripting():
        # (An attn_bias with a tangent is exact already: it is not None.)
        inputs = [x, query, w_q, b_q, w_k, w_v, b_v, attn_bias]
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in inputs
        )
        transformed = _any_tangent(inputs) or under_vmap()
        exact = attn_bias is not None or transformed or _products_are_faster(xs, needs_grad)
        by_sequence = exact and not transformed and _is_eager_cpu_inference(xs, needs_grad)
        cut = not (transformed or under_torch_func())
        # SDPA whose CPU backward flushes subnormals (a C++ autograd function:
        # not under torch.func, whose transforms take SDPA itself).
        flushed = cut and xs.device.type == "cpu"
    if by_sequence:
        out = _pool_sequence_by_sequence(_scaled(heads_query, dtype), k, v, scores_mask)
    elif exact:
        acc = reference.accumulate_dtype(dtype)
        scores = torch.matmul(_scaled(heads_query, dtype), k.to(acc).transpose(-1, -2))
        if scores_mask is not None:
            scores = scores + scores_mask.to(acc)
        weights = _softmax_of_scores(scores, cut)
        out = torch.matmul(weights.to(dtype), v).transpose(1, 2)
    elif flushed:
        scale = q.shape[-1] ** -0.5
        out = torch.ops.attnpool._attention_without_subnormals(q, k, v, scores_mask, scale)
        out = out.transpose(1, 2)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=scores_mask).transpose(1, 2)
    out = out.reshape(batch, query.shape[0], embed_dim)
    return out if any_kept is None else torch.where(any_kept[:, None, None], out, 0.0)


# Whether the CPU kernels run at their AMX_BF16 level (the CPU has AMX tiles
# and Linux lets the process use them), where SDPA's CPU kernel multiplies
# bfloat16 on the tiles too. Fixed once the library has loaded.
_AMX_TILES = _C.cpu_kernel_isa() == "AMX_BF16"


def _products_are_faster(x: Tensor, needs_grad: bool) -> bool:
    """products_are_faster of csrc/ops/attention_pool_by_projection.cpp: x in
    bfloat16 on the CPU, but for inference with AMX, which SDPA serves."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and (needs_grad or not _AMX_TILES)


def _is_eager_cpu_inference(x: Tensor, needs_grad: bool) -> bool:
    """Whether this call runs on the CPU with no gradient to record, and not
    traced by torch.compile or torch.jit.trace, which would unroll a loop over
    the batch (tangents and vmap are the caller's to check)."""
    return (
        x.device.type == "cpu"
        and not needs_grad
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def _pool_sequence_by_sequence(
    q: Tensor, k: Tensor, v: Tensor, scores_mask: Optional[Tensor]
) -> Tensor:
    """The products of the exact path one sequence at a time, all heads at
    once, as attention_pool's inference does (pool_sequence_by_sequence in
    csrc/ops/attention_pool_by_projection.cpp): a sequence's scores stay in
    cache; the values are the batch's. q: [n, Q, d] in the accumulation
    dtype, scaled (:func:`_scaled`); k, v: [B, n, L, d]; scores_mask:
    [B, 1, 1, L] or None. Returns [B, Q, n, d]."""
    batch, num_heads, _, head_dim = v.shape
    out = v.new_empty(batch, q.shape[1], num_heads, head_dim)
    for b in range(batch):
        scores = torch.matmul(q, k[b].to(q.dtype).transpose(-1, -2))
        if scores_mask is not None:
            scores = scores + scores_mask[b].to(q.dtype)
        probs = _softmax_of_scores(scores, cut=True).to(v.dtype)
        torch.matmul(probs, v[b], out=out[b].transpose(0, 1))
    return out


def _scaled(heads_query: Tensor, dtype: torch.dtype) -> Tensor:
    """Each head's queries [n, Q, d] in the accumulation dtype of ``dtype``,
    times 1/sqrt(d): the scores come out of their product scaled, a pass over
    them saved forward and backward (as scaled_head_queries in
    csrc/ops/attention_pool_by_projection.cpp)."""
    acc = reference.accumulate_dtype(dtype)
    return heads_query.to(acc) * heads_query.shape[-1] ** -0.5


def _softmax_of_scores(scores: Tensor, cut: bool) -> Tensor:
    """The softmax over the last dim. With ``cut``, weights below 2^-100 are 0
    (``attnpool::_softmax_without_subnormals``, the pooling kernels' rule),
    which keeps the backward clear of subnormals, slow on a CPU. Without, ATen's
    softmax, which torch.func transforms and forward-mode AD take."""
    if cut:
        return torch.ops.attnpool._softmax_without_subnormals(scores)
    return torch.softmax(scores, dim=-1)


def _any_tangent(tensors: list[Optional[Tensor]]) -> bool:
    """Whether forward-mode AD (torch.func.jvp, forward_ad) gives any of
    these a tangent."""
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _split_heads(t: Tensor, num_heads: int) -> Tensor:
    """[..., N, E] -> [..., n, N, E / n]: each head's slice of the width."""
    return t.unflatten(-1, (num_heads, t.shape[-1] // num_heads)).transpose(-3, -2)


def _check_weighted_pool_inputs(x: Tensor, mask: Optional[Tensor]):
    """WeightedPooling's checks of x and mask, as the op's: shapes and devices
    (ValueError), dtypes (TypeError)."""
    if x.is_nested:
        raise TypeError(
            "WeightedPooling: x must be a dense [B, L, H] tensor, got a nested tensor "
            "(pad it and pass a mask)"
        )
    if x.dim() != 3:
        raise ValueError(f"WeightedPooling: x must have shape [B, L, H], got {list(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            "WeightedPooling: x must be float64, float32, float16 or bfloat16, "
            f"got {_dtype_name(x.dtype)}"
        )
    if mask is not None:
        if mask.shape != x.shape[:2]:
            raise ValueError(
                f"WeightedPooling: mask must have shape [B, L] = {list(x.shape[:2])}, "
                f"got {list(mask.shape)}"
            )
        if mask.device != x.device:
            raise ValueError(
                f"WeightedPooling: mask must be on the same device as x ({x.device}), "
                f"got {mask.device}"
            )
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(
                "WeightedPooling: mask must be bool or an integer dtype (nonzero = attend), "
                f"got {_dtype_name(mask.dtype)}"
            )


def _check_weighted_pool_length(x: Tensor, weight: Tensor, max_len: int):
    """WeightedPooling's checks of x against its weights (ValueError)."""
    if x.device != weight.device:
        raise ValueError(
            f"WeightedPooling: x must be on the module's device ({weight.device}), got {x.device}"
        )
    if x.shape[1] > max_len:
        raise ValueError(
            f"WeightedPooling: sequence length {x.shape[1]} exceeds max_len = {max_len}"
        )


class WeightedPooling(nn.Module):
    """The baseline "normal pooling": one learned weight per position.

    ``weight`` (``[max_len]``, zeros at init, so it starts as mean pooling) are
    logits; the pooling weights are their softmax over the unmasked positions of
    each sequence. Sequences may be shorter than ``max_len``, not longer.
    ``mask`` (``[B, L]``): ``True`` means attend, as in :class:`AttentionPooling`.
    """

    def __init__(self, max_len: int, *, device=None, dtype=None) -> None:
        super().__init__()
        _check_int("WeightedPooling", "max_len", max_len)
        if max_len < 1:
            raise ValueError(f"WeightedPooling: max_len must be >= 1, got {max_len}")
        self.max_len = max_len
        self.weight = nn.Parameter(torch.empty(max_len, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if torch.jit.is_scripting():
            # TorchScript runs none of the Python checks of dtypes: the ops'
            # checks of x and mask, with the same verdicts.
            torch.ops.attnpool._check_pooled_positions("WeightedPooling", x, mask, None, None)
        else:
            _check_weighted_pool_inputs(x, mask)
        _check_weighted_pool_length(x, self.weight, self.max_len)
        return reference.weighted_pool(x, self.weight, mask)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}"
