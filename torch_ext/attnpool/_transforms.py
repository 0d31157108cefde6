"""Forward-mode AD and torch.func transforms for the attnpool operators.

The operators' autograd is C++ (``torch::autograd::Function``): it serves
``backward()`` from Python and from C++ alike, but it has no jvp and cannot
run under torch.func transforms. Here each operator gets a Python
``torch.autograd.Function`` with the same forward and backward (the private
``_<op>_forward`` / ``_<op>_backward`` operators) plus a jvp (the private
``_<op>_jvp`` operators: one pass over x and its tangent), registered
where only those cases dispatch:

- at ``FuncTorchDynamicLayerFrontMode``, which every call made under a
  torch.func transform (grad, vjp, jacrev, jvp, jacfwd, vmap, functionalize)
  reaches first;
- as the kernel of the private ``_<op>_forward_ad`` operators, which the C++
  autograd kernels call for inputs with a tangent (dual tensors, gradcheck's
  ``check_forward_ad``; see ``csrc/ops/autograd/forward_ad.h``).

Batching rules for the private operators let vmap run without torch's
per-sample fallback. Calls outside these cases never reach Python.
"""

import math
from typing import Optional

import torch
from torch import Tensor
from torch._C._functorch import TransformType, get_interpreter_stack, peek_interpreter_stack

from attnpool import reference
from attnpool.reference import accumulate_dtype

_ops = torch.ops.attnpool

_NO_BIAS_GRADIENT = (
    "attnpool: attn_bias has no gradient in reverse mode (it is an additive mask); "
    "pass attn_bias.detach()"
)


# --- folded_attention_pool -------------------------------------------------------------


# Products are written with matmul, not einsum: gradcheck's batched forward-AD
# check runs the jvp under torch's legacy vmap, which has no rule for einsum.


def _scores(rows: Tensor, us: Tensor) -> Tensor:
    """``rows[b, l] . us[i, h]`` as [B, Q, n, L]."""
    num_queries, num_heads, hidden = us.shape
    flat = us.reshape(num_queries * num_heads, hidden) @ rows.transpose(1, 2)
    return flat.reshape(rows.shape[0], num_queries, num_heads, rows.shape[1])


def _weighted_rows(weights: Tensor, rows: Tensor, full_width: bool) -> Tensor:
    """``sum_l weights[b, i, h, l] * rows[b, l]``: each head's slice of the
    width, or the whole width, as ``folded_attention_pool`` outputs it."""
    batch, num_queries, num_heads, seq_len = weights.shape
    hidden = rows.shape[2]
    if full_width:
        out = weights.reshape(batch, num_queries * num_heads, seq_len) @ rows
        return out.reshape(batch, num_queries, num_heads, hidden)
    sliced = rows.reshape(batch, seq_len, num_heads, hidden // num_heads).transpose(1, 2)
    out = weights.transpose(1, 2) @ sliced  # [B, n, Q, d]
    return out.transpose(1, 2).reshape(batch, num_queries, hidden)


def _softmax_of_attended(scores: Tensor, keep: Tensor) -> Tensor:
    """The softmax over the last dim of the scores where ``keep``; 0 elsewhere,
    and 0 for a sequence with nothing to attend."""
    attended = scores.masked_fill(~keep, -math.inf)
    top = attended.amax(-1, keepdim=True)
    weights = torch.exp(attended - torch.where(torch.isfinite(top), top, 0.0))
    total = weights.sum(-1, keepdim=True)
    return weights / torch.where(total > 0, total, 1.0)


def _pool_tangent(
    x: Tensor,
    u: Tensor,
    mask: Optional[Tensor],
    attn_bias: Optional[Tensor],
    lengths: Optional[Tensor],
    scale: float,
    full_width: bool,
    x_tangent: Optional[Tensor],
    u_tangent: Optional[Tensor],
    bias_tangent: Optional[Tensor] = None,
) -> Tensor:
    """The tangent of the (unrounded) output, per query and head:
    ``sum_l p_l (ds_l - sum_k p_k ds_k) x_l + sum_l p_l dx_l``, where
    ``ds_l = scale (dx_l . u + x_l . du) + dbias_l`` is the tangent of the score and
    ``p`` the softmax (SPEC.md §5).

    ``p`` is the softmax of the scores made here, not ``exp(s - lse)`` with the
    forward's log-sum-exp: the forward's kernel summed each score in its own
    order, and at scores of 1e12 and more two orders of summation differ by
    more than ``exp`` can take (``p`` overflows to inf, the tangent to NaN)."""
    acc = accumulate_dtype(x.dtype)
    batch, seq_len, hidden = x.shape
    us = u.reshape(-1, u.shape[-2], hidden).to(acc)  # [Q, n, H]
    keep = reference._attended(x, mask, attn_bias, lengths)
    # Masked positions never reach the output or its tangent, even if NaN.
    rows = x.to(acc).masked_fill(~keep[..., None], 0)
    scores = scale * _scores(rows, us)
    if attn_bias is not None:
        scores = scores + attn_bias.to(acc)[:, None, None, :]
    probs = _softmax_of_attended(scores, keep[:, None, None, :])

    score_tangent = torch.zeros_like(scores)
    if x_tangent is not None:
        row_tangents = x_tangent.to(acc).masked_fill(~keep[..., None], 0)
        score_tangent = score_tangent + _scores(row_tangents, us)
    if u_tangent is not None:
        u_tangents = u_tangent.reshape(us.shape).to(acc)
        score_tangent = score_tangent + _scores(rows, u_tangents)
    score_tangent = scale * score_tangent
    if bias_tangent is not None:
        score_tangent = score_tangent + bias_tangent.to(acc)[:, None, None, :]
    centred = score_tangent - (probs * score_tangent).sum(-1, keepdim=True)

    out_tangent = _weighted_rows(probs * centred, rows, full_width)
    if x_tangent is not None:
        out_tangent = out_tangent + _weighted_rows(probs, row_tangents, full_width)
    return out_tangent[:, 0] if u.dim() == 2 else out_tangent


class _FoldedAttentionPool(torch.autograd.Function):
    """(out, lse) = the private forward; out is unrounded, in the accumulation
    dtype, as the backward's ``G . out`` needs it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, u, mask, scale, full_width, attn_bias, lengths):
        return _ops._folded_attention_pool_forward.default(
            x, u, mask, scale, full_width, attn_bias, lengths
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, u, mask, scale, full_width, attn_bias, lengths = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        # An input without a tangent reaches jvp as None, not as zeros to multiply by.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, u, mask, out, lse, attn_bias, lengths)
        ctx.save_for_forward(x, u, mask, out, lse, attn_bias, lengths)
        ctx.scale = scale
        ctx.full_width = full_width

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        if ctx.needs_input_grad[5]:
            raise NotImplementedError(_NO_BIAS_GRADIENT)
        if grad_out is None:
            return (None,) * 7
        x, u, mask, out, lse, attn_bias, lengths = ctx.saved_tensors
        grad_x, grad_u = _ops._folded_attention_pool_backward.default(
            grad_out, x, u, mask, out, lse, ctx.scale, ctx.full_width, attn_bias, lengths
        )
        return grad_x, grad_u, None, None, None, None, None

    @staticmethod
    def jvp(ctx, x_tangent, u_tangent, _mask, _scale, _full_width, bias_tangent, _lengths):
        # (Forward mode covers attn_bias too: its tangent just adds to the scores'.)
        x, u, mask, out, lse, attn_bias, lengths = ctx.saved_tensors
        tangent = _jvp(
            _ops._folded_attention_pool_jvp.default,
            _pool_jvp_composite,
            x,
            u,
            mask,
            out,
            lse,
            ctx.scale,
            ctx.full_width,
            attn_bias,
            lengths,
            x_tangent,
            u_tangent,
            bias_tangent,
        )
        return tangent, None


def _functionalizing() -> bool:
    """Whether the innermost transform is torch.func.functionalize, which has
    no rule for autograd.Function yet; the ops mutate nothing, so it needs none."""
    interpreter = peek_interpreter_stack()
    return interpreter is not None and interpreter.key() == TransformType.Functionalize


def _folded_attention_pool(
    x: Tensor,
    u: Tensor,
    mask: Optional[Tensor] = None,
    scale: float = 1.0,
    full_width: bool = False,
    attn_bias: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tensor:
    args = (x, u, mask, scale, full_width, attn_bias, lengths)
    if _functionalizing():
        out, _ = _FoldedAttentionPool.forward(*args)
    else:
        out, _ = _FoldedAttentionPool.apply(*args)
    return out.to(x.dtype)


def _layer_norm_folded_attention_pool(
    x: Tensor,
    u: Tensor,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    norm_eps: float,
    mask: Optional[Tensor] = None,
    scale: float = 1.0,
    full_width: bool = False,
    attn_bias: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tensor:
    """The fused norm's op under torch.func: the norm, then
    folded_attention_pool, each with its own rules."""
    normalized = reference.layer_norm_rows(x, norm_weight, norm_bias, norm_eps)
    return _ops.folded_attention_pool.default(
        normalized, u, mask, scale, full_width, attn_bias, lengths
    )


# --- folded_attention_pool_varlen -------------------------------------------------------


def _padded(rows: Tensor, offsets: Tensor, longest: int) -> Tensor:
    """A ragged batch's rows [T, H] as [B, longest, H], zeros past each length."""
    lengths = offsets.diff()
    total = rows.shape[0]
    device = rows.device
    sequence = torch.repeat_interleave(
        torch.arange(lengths.shape[0], device=device), lengths, output_size=total
    )
    position = torch.arange(total, device=device) - offsets[sequence]
    padded = rows.new_zeros(lengths.shape[0], longest, rows.shape[-1])
    return padded.index_put((sequence, position), rows)


class _FoldedAttentionPoolVarlen(torch.autograd.Function):
    """(out, lse) = the private varlen forward, as _FoldedAttentionPool."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, cu_seqlens, u, scale, full_width):
        return _ops._folded_attention_pool_varlen_forward.default(
            x, cu_seqlens, u, scale, full_width
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, cu_seqlens, u, scale, full_width = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        # An input without a tangent reaches jvp as None, not as zeros to multiply by.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, cu_seqlens, u, out, lse)
        ctx.save_for_forward(x, cu_seqlens, u, out, lse)
        ctx.scale = scale
        ctx.full_width = full_width

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        if grad_out is None:
            return (None,) * 5
        x, cu_seqlens, u, out, lse = ctx.saved_tensors
        grad_x, grad_u = _ops._folded_attention_pool_varlen_backward.default(
            grad_out, x, cu_seqlens, u, out, lse, ctx.scale, ctx.full_width
        )
        return grad_x, None, grad_u, None, None

    @staticmethod
    def jvp(ctx, x_tangent, _cu_seqlens, u_tangent, _scale, _full_width):
        x, cu_seqlens, u, out, lse = ctx.saved_tensors
        tangent = _jvp(
            _ops._folded_attention_pool_varlen_jvp.default,
            _varlen_jvp_composite,
            x,
            cu_seqlens,
            u,
            out,
            lse,
            ctx.scale,
            ctx.full_width,
            x_tangent,
            u_tangent,
        )
        return tangent, None


def _folded_attention_pool_varlen(
    x: Tensor, cu_seqlens: Tensor, u: Tensor, scale: float = 1.0, full_width: bool = False
) -> Tensor:
    args = (x, cu_seqlens, u, scale, full_width)
    if _functionalizing():
        out, _ = _FoldedAttentionPoolVarlen.forward(*args)
    else:
        out, _ = _FoldedAttentionPoolVarlen.apply(*args)
    return out.to(x.dtype)


# --- fold_query ------------------------------------------------------------------------


def _fold(projected: Tensor, w_k: Tensor, num_heads: int) -> Tensor:
    """``u[i, h] = w_k[D_h].T @ projected[i, D_h]``: [Q, n, Hx]."""
    proj_dim, x_dim = w_k.shape
    head_dim = proj_dim // num_heads
    heads = projected.reshape(-1, num_heads, head_dim).transpose(0, 1)  # [n, Q, d]
    u = heads @ w_k.reshape(num_heads, head_dim, x_dim)  # [n, Q, Hx]
    return u.transpose(0, 1)


class _FoldQuery(torch.autograd.Function):
    """(u, projected) = the private forward; projected = w_q @ query + q_bias
    is what the backward multiplies with."""

    generate_vmap_rule = True

    @staticmethod
    def forward(query, w_q, w_k, num_heads, q_bias):
        return _ops._fold_query_forward.default(query, w_q, w_k, num_heads, q_bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        query, w_q, w_k, num_heads, q_bias = inputs
        _u, projected = output
        ctx.mark_non_differentiable(projected)
        # An input without a tangent reaches jvp as None, not as zeros to multiply by.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(query, w_q, w_k, projected)
        ctx.save_for_forward(query, w_q, w_k, projected)
        ctx.num_heads = num_heads
        ctx.has_bias = q_bias is not None

    @staticmethod
    def backward(ctx, grad_u, _grad_projected):
        if grad_u is None:
            return (None,) * 5
        query, w_q, w_k, projected = ctx.saved_tensors
        grad_query, grad_w_q, grad_w_k, grad_q_bias = _ops._fold_query_backward.default(
            grad_u, query, w_q, w_k, projected, ctx.num_heads
        )
        return grad_query, grad_w_q, grad_w_k, None, grad_q_bias if ctx.has_bias else None

    @staticmethod
    def jvp(ctx, query_tangent, w_q_tangent, w_k_tangent, _num_heads, q_bias_tangent):
        # u is bilinear in (projected, w_k), projected linear in (query, w_q, q_bias).
        query, w_q, w_k, projected = ctx.saved_tensors
        acc = projected.dtype
        queries = query.reshape(projected.shape[0], -1).to(acc)
        projected_tangent = torch.zeros_like(projected)
        if query_tangent is not None:
            projected_tangent = (
                projected_tangent + query_tangent.reshape(queries.shape).to(acc) @ w_q.to(acc).T
            )
        if w_q_tangent is not None:
            projected_tangent = projected_tangent + queries @ w_q_tangent.to(acc).T
        if q_bias_tangent is not None:
            projected_tangent = projected_tangent + q_bias_tangent.to(acc)
        u_tangent = _fold(projected_tangent, w_k.to(acc), ctx.num_heads)
        if w_k_tangent is not None:
            u_tangent = u_tangent + _fold(projected, w_k_tangent.to(acc), ctx.num_heads)
        return (u_tangent[0] if query.dim() == 1 else u_tangent), None


def _fold_query(
    query: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    num_heads: int = 1,
    q_bias: Optional[Tensor] = None,
) -> Tensor:
    if _functionalizing():
        u, _ = _FoldQuery.forward(query, w_q, w_k, num_heads, q_bias)
    else:
        u, _ = _FoldQuery.apply(query, w_q, w_k, num_heads, q_bias)
    return u


# --- attention_pool: the two parts, each with its own rules ---------------------------


def _attention_pool(
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
    from attnpool import _C

    # attention_pool's own checks (errors name it, not its parts), then the scale.
    resolved = _C._checked_attention_pool_scale(
        x, query, w_q, w_k, mask, num_heads, scale, attn_bias, lengths
    )
    u = _ops.fold_query.default(query, w_q, w_k, num_heads, None)
    return _ops.folded_attention_pool.default(x, u, mask, resolved, False, attn_bias, lengths)


def _attention_pool_varlen(
    x: Tensor,
    cu_seqlens: Tensor,
    query: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    num_heads: int = 1,
    scale: Optional[float] = None,
) -> Tensor:
    from attnpool import _C

    # attention_pool_varlen's own checks (errors name it, not its parts), then the scale.
    resolved = _C._checked_attention_pool_varlen_scale(
        x, cu_seqlens, query, w_q, w_k, num_heads, scale
    )
    u = _ops.fold_query.default(query, w_q, w_k, num_heads, None)
    return _ops.folded_attention_pool_varlen.default(x, cu_seqlens, u, resolved, False)


# --- the jvp ops as compositions ------------------------------------------------------
# The private jvp ops have one-pass CPU kernels (csrc/ops/cpu/isa/jvp.h). These
# compositions serve the other devices and calls under vmap (_jvp).


def _pool_jvp_composite(
    x,
    u,
    mask,
    _out,
    _lse,
    scale,
    full_width,
    attn_bias,
    lengths,
    x_tangent,
    u_tangent,
    bias_tangent,
):
    return _pool_tangent(
        x, u, mask, attn_bias, lengths, scale, full_width, x_tangent, u_tangent, bias_tangent
    )


def _varlen_jvp_composite(x, cu_seqlens, u, _out, _lse, scale, full_width, x_tangent, u_tangent):
    # The dense tangent on the sequences padded to the longest (whose length
    # is read from the device).
    offsets = cu_seqlens.long()
    lengths = offsets.diff()
    longest = int(lengths.max()) if lengths.numel() > 0 else 0
    padded_tangent = None
    if x_tangent is not None:
        padded_tangent = _padded(x_tangent, offsets, longest)
    return _pool_tangent(
        _padded(x, offsets, longest),
        u,
        None,
        None,
        lengths,
        scale,
        full_width,
        padded_tangent,
        u_tangent,
    )


def _checked(op, composite):
    """The composition behind the op's own checks: its Meta kernel runs on meta
    copies of the arguments, so that other devices reject what the CPU kernel
    rejects, with the same messages."""

    name = op._schema.name.split("::")[-1]

    def kernel(*args):
        # A sparse tensor stays sparse on meta and would come back here. (The
        # dispatcher leaves out trailing arguments equal to their defaults.)
        for arg, spec in zip(args, op._schema.arguments, strict=False):
            if isinstance(arg, Tensor) and arg.layout != torch.strided:
                raise ValueError(
                    f"{name}: {spec.name} must be a dense (strided) tensor, got layout {arg.layout}"
                )
        op(*(a.to("meta") if isinstance(a, Tensor) else a for a in args))
        return composite(*args)

    return kernel


def under_vmap() -> bool:
    """Whether torch.func.vmap (or jacfwd, jacrev, ...) batches this call at
    any level: ops without a batching rule then run once per sample. False
    inside torch.compile, which traces vmap by its own rules (and cannot
    trace the interpreter stack)."""
    if torch.compiler.is_compiling():
        return False
    stack = get_interpreter_stack() or ()
    return any(interpreter.key() == TransformType.Vmap for interpreter in stack)


def under_torch_func() -> bool:
    """Whether any torch.func transform (grad, vjp, jacrev, jvp, jacfwd, vmap,
    functionalize) wraps this call, where a C++ autograd function cannot run.
    False inside torch.compile, as under_vmap."""
    if torch.compiler.is_compiling():
        return False
    return bool(get_interpreter_stack())


def _jvp(op, composite, *args) -> Tensor:
    """The jvp op, or under vmap (jacfwd batches the tangents) its composition,
    which vmap batches as any torch code: the op would run once per sample."""
    if under_vmap():
        return composite(*args)
    return op(*args)


# --- batching rules --------------------------------------------------------------------


def _moved(tensor: Optional[Tensor], dim: Optional[int]) -> Optional[Tensor]:
    return tensor if tensor is None or dim is None else tensor.movedim(dim, 0)


def _per_sample(op, info, in_dims, *args):
    """The rule for any batched input: one call per sample, stacked. (The
    backward ops sum dx over queries and du over the batch, so a batch dimension
    cannot fold into either without mixing samples.)"""
    args = [
        _moved(arg, dim) if isinstance(arg, Tensor) else arg
        for arg, dim in zip(args, in_dims, strict=True)
    ]
    if info.batch_size == 0:
        return _no_samples(op, in_dims, args)
    results = []
    for sample in range(info.batch_size):
        picked = [
            arg[sample] if isinstance(arg, Tensor) and dim is not None else arg
            for arg, dim in zip(args, in_dims, strict=True)
        ]
        results.append(op(*picked))
    outputs = tuple(torch.stack(parts) for parts in zip(*results, strict=True))
    return outputs, (0,) * len(outputs)


def _no_samples(op, in_dims, args):
    """_per_sample's outputs for zero samples: empty, each shaped as one
    sample's would be. The shapes come from the Meta kernels, which read no
    data (a made-up sample could hold offsets the op refuses)."""
    on_meta = [
        arg
        if not isinstance(arg, Tensor)
        else arg.to("meta")
        if dim is None
        else arg.new_empty(arg.shape[1:], device="meta")
        for arg, dim in zip(args, in_dims, strict=True)
    ]
    device = next(arg.device for arg in args if isinstance(arg, Tensor))
    shapes = op(*on_meta)
    outputs = tuple(torch.empty((0, *t.shape), dtype=t.dtype, device=device) for t in shapes)
    return outputs, (0,) * len(outputs)


def _pool_forward_vmap(
    info, in_dims, x, u, mask=None, scale=1.0, full_width=False, attn_bias=None, lengths=None
):
    """A batch dimension of x (and of mask, attn_bias, lengths) folds into B; one
    of u alone into Q."""
    # (The dispatcher leaves out trailing arguments equal to their defaults.)
    in_dims = (*in_dims, None, None, None, None, None)[:7]
    op = _ops._folded_attention_pool_forward.default
    x_dim, u_dim, mask_dim, bias_dim, lengths_dim = (in_dims[i] for i in (0, 1, 2, 5, 6))
    args = (x, u, mask, scale, full_width, attn_bias, lengths)
    samples = info.batch_size
    xs = _moved(x, x_dim)
    per_row = (_moved(mask, mask_dim), _moved(attn_bias, bias_dim))
    per_sequence = _moved(lengths, lengths_dim)
    # (Shapes the op would refuse go one sample at a time, for its own error.)
    rows_fit = all(t is None or t.shape[-2:] == xs.shape[-3:-1] for t in per_row)
    rows_fit = rows_fit and (per_sequence is None or per_sequence.shape[-1:] == xs.shape[-3:-2])
    if x_dim is not None and u_dim is None and x.dim() == 4 and rows_fit:
        masks, biases = (
            None if t is None else t.expand(samples, *xs.shape[1:3]).reshape(-1, xs.shape[2])
            for t in per_row
        )
        if per_sequence is not None:
            per_sequence = per_sequence.expand(samples, xs.shape[1]).reshape(-1)
        flat = xs.reshape(-1, *xs.shape[2:])
        out, lse = op(flat, u, masks, scale, full_width, biases, per_sequence)
        unfold = (samples, xs.shape[1])
        return (out.reshape(*unfold, *out.shape[1:]), lse.reshape(*unfold, *lse.shape[1:])), (0, 0)
    rows_batched = any(dim is not None for dim in (x_dim, mask_dim, bias_dim, lengths_dim))
    if not rows_batched and u_dim is not None and u.dim() in (3, 4):
        us = _moved(u, u_dim)  # [samples, (Q,) n, H]
        flat = us.reshape(-1, *us.shape[-2:])
        out, lse = op(x, flat, mask, scale, full_width, attn_bias, lengths)
        unfold = (x.shape[0], samples, *us.shape[1:-2])
        return (out.reshape(*unfold, *out.shape[2:]), lse.reshape(*unfold, *lse.shape[2:])), (1, 1)
    return _per_sample(op, info, in_dims, *args)


def _fold_forward_vmap(info, in_dims, query, w_q, w_k, num_heads=1, q_bias=None):
    """A batch dimension of the query alone folds into Q."""
    in_dims = (*in_dims, None, None)[:5]
    op = _ops._fold_query_forward.default
    query_dim = in_dims[0]
    weights_batched = any(dim is not None for dim in in_dims[1:])
    if query_dim is None or weights_batched or query.dim() not in (2, 3):
        return _per_sample(op, info, in_dims, query, w_q, w_k, num_heads, q_bias)
    queries = _moved(query, query_dim)
    u, projected = op(queries.reshape(-1, queries.shape[-1]), w_q, w_k, num_heads, q_bias)
    if queries.dim() == 2:  # each sample's query is 1-D: u [n, Hx], projected [1, E]
        return (u, projected[:, None]), (0, 0)
    samples = info.batch_size
    return (
        u.reshape(samples, -1, *u.shape[1:]),
        projected.reshape(samples, -1, projected.shape[-1]),
    ), (0, 0)


def _rule(op):
    def rule(info, in_dims, *args):
        return _per_sample(op, info, in_dims, *args)

    return rule


# --- registration ----------------------------------------------------------------------

# Registrations last as long as this object.
_library = torch.library.Library("attnpool", "IMPL")


def register() -> None:
    """Called once, when attnpool is imported."""
    for name, kernel in (
        ("attention_pool", _attention_pool),
        ("fold_query", _fold_query),
        ("folded_attention_pool", _folded_attention_pool),
        ("folded_attention_pool_varlen", _folded_attention_pool_varlen),
        ("attention_pool_varlen", _attention_pool_varlen),
        ("_layer_norm_folded_attention_pool", _layer_norm_folded_attention_pool),
    ):
        _library.impl(name, kernel, "FuncTorchDynamicLayerFrontMode")
    _library.impl("_fold_query_forward_ad", _fold_query, "CompositeImplicitAutograd")
    _library.impl(
        "_folded_attention_pool_forward_ad", _folded_attention_pool, "CompositeImplicitAutograd"
    )
    _library.impl(
        "_folded_attention_pool_varlen_forward_ad",
        _folded_attention_pool_varlen,
        "CompositeImplicitAutograd",
    )
    for name, composite in (
        ("_folded_attention_pool_jvp", _pool_jvp_composite),
        ("_folded_attention_pool_varlen_jvp", _varlen_jvp_composite),
    ):
        op = getattr(_ops, name).default
        _library.impl(name, _checked(op, composite), "CompositeExplicitAutograd")
    for name, rule in (
        ("_folded_attention_pool_forward", _pool_forward_vmap),
        ("_folded_attention_pool_backward", _rule(_ops._folded_attention_pool_backward.default)),
        ("_fold_query_forward", _fold_forward_vmap),
        ("_fold_query_backward", _rule(_ops._fold_query_backward.default)),
        (
            "_folded_attention_pool_varlen_forward",
            _rule(_ops._folded_attention_pool_varlen_forward.default),
        ),
        (
            "_folded_attention_pool_varlen_backward",
            _rule(_ops._folded_attention_pool_varlen_backward.default),
        ),
    ):
        torch.library.register_vmap(f"attnpool::{name}", rule, lib=_library)
