"""Python entry points of the attnpool operators (SPEC.md §3, §5)."""

import numbers
from typing import Optional

import torch
from torch import Tensor


def _check_tensor(op: str, name: str, value, nested_ok: bool = False) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(value).__name__}")
    # A nested tensor reaching an operator would meet its dispatcher's bare
    # NotImplementedError; only x of the pooling functions may be one.
    if value.is_nested and not nested_ok:
        raise TypeError(f"{op}: {name} must be a dense tensor, got a nested tensor")


def _check_optional_tensor(op: str, name: str, value) -> None:
    if value is not None:
        _check_tensor(op, name, value)


def _dtype_name(dtype: torch.dtype) -> str:
    """A dtype as users write it in errors: float32, not torch.float32."""
    return str(dtype).replace("torch.", "")


def _check_int(op: str, name: str, value) -> None:
    # bool is an int in Python, but num_heads=True is a mistake. numbers.Integral
    # takes NumPy's integers too, as the operators do.
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")


def _check_number(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat)):
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")


def _jagged_parts(op: str, x: Tensor, **dense_only: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The rows ``[T, H]`` and offsets ``[B + 1]`` of a jagged nested tensor
    ``x`` (``[B, j, H]``), which pools as a ragged batch (SPEC.md §6)."""
    if x.layout != torch.jagged:
        raise ValueError(
            f"{op}: a nested x must have layout=torch.jagged (its rows and offsets are "
            f"pooled in place), got {x.layout}"
        )
    for name, value in dense_only.items():
        if value is not None:
            raise ValueError(
                f"{op}: {name} is for padded [B, L, H] batches; a nested x has no padding"
            )
    if x.dim() != 3 or x._ragged_idx != 1:
        raise ValueError(f"{op}: a nested x must have shape [B, j, H] (ragged in dim 1)")
    return x.values(), x.offsets()


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
    """Pools each sequence of ``x`` into one vector per query (SPEC.md §1).

    Scores are ``scale * (w_k @ x[b, l])[D_h] . (w_q @ query[i])[D_h]`` per head
    ``h`` (its ``d = H / num_heads`` consecutive dims ``D_h``), softmax runs over
    the sequence, and the values are ``x`` itself. The key projection is folded
    into the query (:func:`fold_query`), and the pooling runs on the folded
    query (:func:`folded_attention_pool`): one pass over ``x`` forward and one
    backward, nothing of size ``[B, L, H]`` allocated in the forward. Where many
    queries and heads make the fold dearer than projecting every key
    (``Q * num_heads > H + Q``, e.g. CoCa's 256 queries x 8 heads), the op
    projects the keys instead and runs ``scaled_dot_product_attention`` on
    them with ``x``'s head slices as values: the same result up to rounding,
    with the keys ``[B, L, H]`` allocated.

    Args:
        x: ``[B, L, H]`` float64/float32/float16/bfloat16. Any strides; rows
            whose last dimension is not contiguous are copied first. A jagged
            nested tensor (``layout=torch.jagged``, ``[B, j, H]``) pools as a
            ragged batch (:func:`attention_pool_varlen`), without padding.
        query: ``[H]`` or ``[Q, H]``.
        w_q, w_k: ``[H, H]`` projection weights in ``nn.Linear`` layout (out, in).
            Same dtype as ``x``, or float32 when ``x`` is float16/bfloat16.
        mask: optional ``[B, L]``; nonzero (``True``) means "attend", the
            opposite of ``nn.MultiheadAttention``'s ``key_padding_mask``. A
            sequence with no position to attend (or ``L == 0``) pools to zeros,
            with zero gradients. Masked positions never reach the output, even if NaN.
        num_heads: number of heads; must divide ``H``.
        scale: score scale, finite and positive; defaults to ``1/sqrt(H / num_heads)``.
        attn_bias: optional ``[B, L]`` floating point, added to every score (in
            float32, float64 for float64 ``x``): an SDPA-style additive mask or a
            position bias. ``-inf`` excludes a position as the mask does; a
            sequence whose every position is excluded pools to zeros. No
            gradient in reverse mode (asking for one is an error); forward
            mode covers it.
        lengths: optional ``[B]`` integer, for right-padded batches: position
            ``l`` of sequence ``b`` counts iff ``l < lengths[b]``; the rows past
            it are never read (they may hold anything, NaN included) and get
            zero gradients. At most one of ``mask`` and ``lengths``.

    Returns:
        ``[B, H]`` for a 1-D ``query``, ``[B, Q, H]`` otherwise, in ``x``'s dtype.
        Differentiable in ``x``, ``query``, ``w_q`` and ``w_k``, in reverse and
        forward mode and under ``torch.func`` (first order).

    Raises:
        ValueError: wrong shapes, devices, ``num_heads`` or ``scale``.
        TypeError: unsupported dtypes, or an argument of the wrong Python type.
    """
    if not torch.jit.is_scripting():
        op = "attention_pool"
        _check_tensor(op, "x", x, nested_ok=True)
        for name, value in (("query", query), ("w_q", w_q), ("w_k", w_k)):
            _check_tensor(op, name, value)
        _check_optional_tensor(op, "mask", mask)
        _check_int(op, "num_heads", num_heads)
        if scale is not None:
            _check_number(op, "scale", scale)
        _check_optional_tensor(op, "attn_bias", attn_bias)
        _check_optional_tensor(op, "lengths", lengths)
        if x.is_nested:
            rows, offsets = _jagged_parts(op, x, mask=mask, attn_bias=attn_bias, lengths=lengths)
            return torch.ops.attnpool.attention_pool_varlen.default(
                rows, offsets, query, w_q, w_k, num_heads, scale
            )
        return torch.ops.attnpool.attention_pool.default(
            x, query, w_q, w_k, mask, num_heads, scale, attn_bias, lengths
        )
    # TorchScript resolves the overload itself (it cannot call .default).
    return torch.ops.attnpool.attention_pool(
        x, query, w_q, w_k, mask, num_heads, scale, attn_bias, lengths
    )


def fold_query(
    query: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    num_heads: int = 1,
    q_bias: Optional[Tensor] = None,
) -> Tensor:
    """Folds the query through both projections (SPEC.md §5).

    ``u[i, h] = w_k[D_h].T @ (w_q @ query[i] + q_bias)[D_h]``, where ``D_h`` are
    head ``h``'s ``E / num_heads`` rows of ``w_q`` and ``w_k``; then the score of
    a row of ``x`` is ``x[b, l] . u[i, h]``, with no key projection.

    Args:
        query: ``[Hq]`` or ``[Q, Hq]``, float64/float32/float16/bfloat16.
        w_q: ``[E, Hq]``, ``w_k``: ``[E, Hx]`` in ``nn.Linear`` layout; ``E`` and
            ``Hx`` may differ (``kdim`` in ``nn.MultiheadAttention``).
        num_heads: must divide ``E``.
        q_bias: optional ``[E]``, the query projection's bias.

    Returns:
        ``u``: ``[Q, num_heads, Hx]`` (``[num_heads, Hx]`` for a 1-D query), in
        float64 for float64 weights, else float32. Differentiable in every tensor.
    """
    if not torch.jit.is_scripting():
        for name, value in (("query", query), ("w_q", w_q), ("w_k", w_k)):
            _check_tensor("fold_query", name, value)
        _check_optional_tensor("fold_query", "q_bias", q_bias)
        _check_int("fold_query", "num_heads", num_heads)
        return torch.ops.attnpool.fold_query.default(query, w_q, w_k, num_heads, q_bias)
    # TorchScript resolves the overload itself (it cannot call .default).
    return torch.ops.attnpool.fold_query(query, w_q, w_k, num_heads, q_bias)


def folded_attention_pool(
    x: Tensor,
    u: Tensor,
    mask: Optional[Tensor] = None,
    scale: float = 1.0,
    full_width: bool = False,
    attn_bias: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tensor:
    """Attention pooling on a folded query ``u`` (SPEC.md §5).

    For each query ``i`` and head ``h``: ``p = softmax over l of scale * x[b, l] . u[i, h]``
    (masked positions excluded), then

    - ``full_width=False``: ``out[b, i, D_h] = sum_l p * x[b, l, D_h]``, shape
      ``[B, Q, H]``: each head pools its own slice of ``H / num_heads`` columns;
    - ``full_width=True``: ``out[b, i, h] = sum_l p * x[b, l]``, shape
      ``[B, Q, num_heads, H]``: each head's pooled vector over the whole width,
      as a value projection after pooling needs (multi-head attention pooling).

    Args:
        x: ``[B, L, H]``, as in :func:`attention_pool`; a jagged nested tensor
            ``[B, j, H]`` pools as :func:`folded_attention_pool_varlen`.
        u: ``[Q, num_heads, H]`` or ``[num_heads, H]`` (then the output has no
            ``Q`` dimension), in ``x``'s dtype or float32 for float16/bfloat16 ``x``.
        mask: optional ``[B, L]``, nonzero = attend (the opposite of
            ``nn.MultiheadAttention``'s ``key_padding_mask``).
        scale: score scale, finite and positive.
        full_width: see above; without it ``num_heads`` must divide ``H``.
        attn_bias: optional ``[B, L]``, added to every score, as in
            :func:`attention_pool`.
        lengths: optional ``[B]`` for right-padded batches, as in
            :func:`attention_pool`.

    Returns:
        The pooled vectors in ``x``'s dtype; zeros for a sequence with nothing
        to attend. Differentiable in ``x`` and ``u``.
    """
    if not torch.jit.is_scripting():
        op = "folded_attention_pool"
        _check_tensor(op, "x", x, nested_ok=True)
        _check_tensor(op, "u", u)
        _check_optional_tensor(op, "mask", mask)
        _check_number(op, "scale", scale)
        if not isinstance(full_width, bool):
            raise TypeError(f"{op}: full_width must be a bool, got {type(full_width).__name__}")
        _check_optional_tensor(op, "attn_bias", attn_bias)
        _check_optional_tensor(op, "lengths", lengths)
        if x.is_nested:
            rows, offsets = _jagged_parts(op, x, mask=mask, attn_bias=attn_bias, lengths=lengths)
            return torch.ops.attnpool.folded_attention_pool_varlen.default(
                rows, offsets, u, scale, full_width
            )
        return torch.ops.attnpool.folded_attention_pool.default(
            x, u, mask, scale, full_width, attn_bias, lengths
        )
    # TorchScript resolves the overload itself (it cannot call .default).
    return torch.ops.attnpool.folded_attention_pool(
        x, u, mask, scale, full_width, attn_bias, lengths
    )


def _checks_on_host(index: Tensor) -> bool:
    """Whether a verdict about index's values can be read on the host: a real
    CPU tensor, outside torch.compile and fake-tensor tracing (make_fx,
    FakeTensorMode, non-strict export), where there is no value to read."""
    return (
        index.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and torch._guards.detect_fake_mode(index) is None
    )


def segment_offsets(index: Tensor, num_segments: Optional[int] = None) -> Tensor:
    """``cu_seqlens [B + 1]`` from PyG's sorted segment index ``[T]`` (SPEC.md §6).

    ``cu_seqlens[b]`` is the number of rows with ``index < b``, computed on
    ``index``'s device. ``num_segments`` (``B``) keeps it free of host
    synchronisation (and of recompiles under ``torch.compile``); without it,
    ``B = index.max() + 1`` is read from the device (under ``torch.compile``, a
    data-dependent size). Segments with no rows are empty sequences. ``index``
    must be sorted: that is checked on the CPU, and asynchronously (an
    assertion in the graph) on a GPU and in compiled or fake-tensor traced graphs.
    """
    return _segment_offsets("segment_offsets", index, num_segments)


def _segment_offsets(op: str, index: Tensor, num_segments: Optional[int]) -> Tensor:
    """segment_offsets, its errors naming ``op``."""
    _check_tensor(op, "index", index)
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"{op}: index must be int32 or int64 (the segment of each row), got "
            f"{_dtype_name(index.dtype)}"
        )
    if index.dim() != 1:
        raise ValueError(
            f"{op}: index must be 1-D, [T] (the segment of each row), got shape {list(index.shape)}"
        )
    if num_segments is None:
        num_segments = int(index.max()) + 1 if index.numel() > 0 else 0
        if torch.compiler.is_compiling():
            # There an unbacked symbol: tell the shape checks it is a count
            # (in eager, a negative index meets the clear error below).
            torch._check(num_segments >= 0)
    else:
        _check_int(op, "num_segments", num_segments)
        if num_segments < 0:
            raise ValueError(f"{op}: num_segments must be >= 0, got {num_segments}")
    if index.numel() > 0:
        in_order = (index.diff() >= 0).all() & (index[0] >= 0) & (index[-1] < num_segments)
        if _checks_on_host(index):
            if not bool(in_order):
                raise ValueError(
                    f"{op}: index must be sorted, with values in [0, num_segments = {num_segments})"
                )
        else:
            # On a GPU, in a compiled graph or a traced one, reading the
            # verdict on the host would wait for the device or break the
            # graph. (The message names no value: a traced num_segments is
            # symbolic.)
            torch._assert_async(
                in_order, f"{op}: index must be sorted, with values in [0, num_segments)"
            )
    segments = torch.arange(num_segments + 1, device=index.device, dtype=index.dtype)
    return torch.searchsorted(index, segments).to(index.dtype)


def _ragged_offsets(
    op: str,
    x: Tensor,
    cu_seqlens: Optional[Tensor],
    index: Optional[Tensor],
    num_segments: Optional[int],
) -> Tensor:
    """cu_seqlens as given, or from PyG's (index, num_segments)."""
    if (cu_seqlens is None) == (index is None):
        raise ValueError(f"{op}: pass exactly one of cu_seqlens and index")
    if cu_seqlens is not None:
        _check_tensor(op, "cu_seqlens", cu_seqlens)
        if num_segments is not None:
            raise ValueError(f"{op}: num_segments goes with index, not with cu_seqlens")
        return cu_seqlens
    offsets = _segment_offsets(op, index, num_segments)  # checks index: sorted, 1-D
    # Checked here, where the error can name index, not the offsets made from it.
    if x.dim() == 2 and index.shape[0] != x.shape[0]:
        raise ValueError(
            f"{op}: index must have one entry per row of x, [T] = [{x.shape[0]}], "
            f"got [{index.shape[0]}]"
        )
    return offsets


def attention_pool_varlen(
    x: Tensor,
    query: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    *,
    cu_seqlens: Optional[Tensor] = None,
    index: Optional[Tensor] = None,
    num_segments: Optional[int] = None,
    num_heads: int = 1,
    scale: Optional[float] = None,
) -> Tensor:
    """:func:`attention_pool` of a ragged batch: packed sequences or graphs (SPEC.md §6).

    ``x`` holds the rows of ``B`` sequences one after another, without
    padding. Say where each sequence starts with either

    - ``cu_seqlens``: ``[B + 1]`` int32/int64 offsets, from 0 to ``T``
      (flash-attn's ``cu_seqlens``, a jagged nested tensor's ``offsets()``,
      PyG's ``ptr``): sequence ``b`` is rows ``cu_seqlens[b]:cu_seqlens[b + 1]``;
    - ``index``: PyG's sorted batch vector ``[T]`` (the sequence of each row),
      with ``num_segments = B`` (see :func:`segment_offsets`).

    One pass over ``x`` forward and one backward, the work split over rows,
    so one long sequence among short ones does not run on one thread. The
    same result as padding the sequences and passing ``lengths`` (or a mask)
    to :func:`attention_pool`; an empty sequence pools to zeros.

    Args:
        x: ``[T, H]`` float64/float32/float16/bfloat16.
        query, w_q, w_k, num_heads, scale: as in :func:`attention_pool`.

    Returns:
        ``[B, H]`` for a 1-D ``query``, ``[B, Q, H]`` otherwise, in ``x``'s dtype.
        Differentiable in ``x``, ``query``, ``w_q`` and ``w_k``, in reverse and
        forward mode and under ``torch.func`` (first order).
    """
    op = "attention_pool_varlen"
    for name, value in (("x", x), ("query", query), ("w_q", w_q), ("w_k", w_k)):
        _check_tensor(op, name, value)
    _check_int(op, "num_heads", num_heads)
    if scale is not None:
        _check_number(op, "scale", scale)
    offsets = _ragged_offsets(op, x, cu_seqlens, index, num_segments)
    return torch.ops.attnpool.attention_pool_varlen.default(
        x, offsets, query, w_q, w_k, num_heads, scale
    )


def folded_attention_pool_varlen(
    x: Tensor,
    u: Tensor,
    *,
    cu_seqlens: Optional[Tensor] = None,
    index: Optional[Tensor] = None,
    num_segments: Optional[int] = None,
    scale: float = 1.0,
    full_width: bool = False,
) -> Tensor:
    """:func:`folded_attention_pool` of a ragged batch ``x [T, H]``, its
    sequences given by ``cu_seqlens`` or ``index`` as in
    :func:`attention_pool_varlen`. Returns ``[B, (Q,) H]``, or full width
    ``[B, (Q,) num_heads, H]``; differentiable in ``x`` and ``u``, in reverse and
    forward mode and under ``torch.func`` (first order).
    """
    op = "folded_attention_pool_varlen"
    _check_tensor(op, "x", x)
    _check_tensor(op, "u", u)
    _check_number(op, "scale", scale)
    if not isinstance(full_width, bool):
        raise TypeError(f"{op}: full_width must be a bool, got {type(full_width).__name__}")
    offsets = _ragged_offsets(op, x, cu_seqlens, index, num_segments)
    return torch.ops.attnpool.folded_attention_pool_varlen.default(x, offsets, u, scale, full_width)
