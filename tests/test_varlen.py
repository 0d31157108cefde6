"""Ragged batches (SPEC.md §6): attention_pool_varlen and folded_attention_pool_varlen
on x [T, H] with cu_seqlens [B + 1], PyG's (index, num_segments), and jagged nested
tensors. Each is checked against the padded float64 reference: values and gradients,
empty sequences, heads, queries, both output modes, sequences cut into pieces."""

import warnings

import pytest
import torch
from helpers import DEVICES, TOLERANCES
from torch._dynamo.testing import CompileCounterWithBackend

import attnpool
from attnpool import reference

# One empty sequence, one of a single row, one long enough (with H = 64) to be
# cut into several pieces on the CPU and on a GPU.
LENGTHS = [3, 0, 1, 1100, 17, 0, 40]
HIDDEN = 64


def _offsets(lengths, device="cpu", dtype=torch.int64):
    lengths = torch.tensor(lengths, dtype=torch.int64)
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(device=device, dtype=dtype)


def _ragged(lengths=LENGTHS, hidden=HIDDEN, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lengths), hidden, generator=gen, dtype=torch.float64)
    return x.to(device=device, dtype=dtype), _offsets(lengths, device)


def _folded_query(num_queries, num_heads, hidden=HIDDEN, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    shape = (num_heads, hidden) if num_queries is None else (num_queries, num_heads, hidden)
    return torch.randn(shape, generator=gen, dtype=torch.float64).div(hidden**0.5).to(device)


def _weights(num_queries, hidden, device="cpu", seed=2):
    gen = torch.Generator().manual_seed(seed)
    shape = (hidden,) if num_queries is None else (num_queries, hidden)
    query = torch.randn(shape, generator=gen, dtype=torch.float64)
    w_q, w_k = (
        torch.randn(hidden, hidden, generator=gen, dtype=torch.float64) / hidden**0.5
        for _ in range(2)
    )
    return [t.to(device) for t in (query, w_q, w_k)]


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("full_width", [False, True], ids=["slices", "full-width"])
@pytest.mark.parametrize(
    "num_queries, num_heads", [(None, 1), (1, 4), (3, 2)], ids=["1d", "q1-h4", "q3-h2"]
)
def test_folded_equals_the_padded_reference_in_float64(
    device, offsets_dtype, full_width, num_queries, num_heads
):
    x, cu_seqlens = _ragged(device=device)
    cu_seqlens = cu_seqlens.to(offsets_dtype)
    x, u = _leaves(x, _folded_query(num_queries, num_heads, device=device))
    got = attnpool.folded_attention_pool_varlen(
        x, u, cu_seqlens=cu_seqlens, scale=0.7, full_width=full_width
    )
    x_ref, u_ref = _leaves(x, u)
    want = reference.folded_attention_pool_varlen(x_ref, cu_seqlens, u_ref, 0.7, full_width)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    grad = torch.randn_like(got)
    got.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOLERANCES[torch.float64])
    torch.testing.assert_close(u.grad, u_ref.grad, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reduced_precision_matches_the_float64_reference(device, dtype):
    x, cu_seqlens = _ragged(dtype=dtype, device=device)
    query, w_q, w_k = (t.float() for t in _weights(2, HIDDEN, device))
    got = attnpool.attention_pool_varlen(x, query, w_q, w_k, cu_seqlens=cu_seqlens, num_heads=4)
    assert got.dtype == dtype
    want = reference.attention_pool_varlen(
        x.double(), cu_seqlens, query.double(), w_q.double(), w_k.double(), 4
    )
    torch.testing.assert_close(got.double(), want, **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_attention_pool_varlen_gradients_equal_the_padded_op(device):
    x, cu_seqlens = _ragged(device=device)
    params = _weights(2, HIDDEN, device)
    leaves = _leaves(x, *params)
    got = attnpool.attention_pool_varlen(*leaves, cu_seqlens=cu_seqlens, num_heads=2)
    padded, lengths = reference.padded(x, cu_seqlens)
    dense = _leaves(padded, *params)
    want = attnpool.attention_pool(*dense, num_heads=2, lengths=lengths)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])
    got.pow(2).sum().backward()
    want.pow(2).sum().backward()
    for leaf, dense_leaf in zip(leaves[1:], dense[1:], strict=True):
        torch.testing.assert_close(leaf.grad, dense_leaf.grad, **TOLERANCES[torch.float64])
    padded_dx, _ = reference.padded(leaves[0].grad, cu_seqlens)
    torch.testing.assert_close(padded_dx, dense[0].grad, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
def test_index_and_nested_tensors_pool_like_cu_seqlens(device):
    x, cu_seqlens = _ragged(device=device)
    query, w_q, w_k = _weights(None, HIDDEN, device)
    want = attnpool.attention_pool_varlen(x, query, w_q, w_k, cu_seqlens=cu_seqlens)
    lengths = cu_seqlens.diff()
    index = torch.repeat_interleave(torch.arange(len(LENGTHS), device=device), lengths)
    for num_segments in (len(LENGTHS), None):
        got = attnpool.attention_pool_varlen(
            x, query, w_q, w_k, index=index, num_segments=num_segments
        )
        # Without num_segments, B comes from index.max(): the last sequence is not empty here.
        assert torch.equal(got, want)
    # Empty segments at the end exist only when num_segments says so.
    longer = attnpool.attention_pool_varlen(
        x, query, w_q, w_k, index=index, num_segments=len(LENGTHS) + 2
    )
    assert torch.equal(longer[: len(LENGTHS)], want)
    assert torch.equal(longer[len(LENGTHS) :], torch.zeros_like(longer[len(LENGTHS) :]))
    nested = torch.nested.nested_tensor_from_jagged(x, cu_seqlens)
    assert torch.equal(attnpool.attention_pool(nested, query, w_q, w_k), want)
    u = attnpool.fold_query(query, w_q, w_k, 2)
    for full_width in (False, True):
        assert torch.equal(
            attnpool.folded_attention_pool(nested, u, scale=0.5, full_width=full_width),
            attnpool.folded_attention_pool_varlen(
                x, u, cu_seqlens=cu_seqlens, scale=0.5, full_width=full_width
            ),
        )
    module = attnpool.AttentionPooling(HIDDEN, num_heads=2, num_queries=3).double().to(device)
    padded, padded_lengths = reference.padded(x, cu_seqlens)
    torch.testing.assert_close(
        module(nested), module(padded, None, padded_lengths), **TOLERANCES[torch.float64]
    )


def test_gradcheck_and_opcheck():
    x, cu_seqlens = _ragged([2, 0, 5, 1], hidden=8)
    u = _folded_query(2, 2, hidden=8)
    for full_width in (False, True):
        x_leaf, u_leaf = _leaves(x, u)
        assert torch.autograd.gradcheck(
            lambda x, u, fw=full_width: torch.ops.attnpool.folded_attention_pool_varlen(
                x, cu_seqlens, u, 0.5, fw
            ),
            (x_leaf, u_leaf),
        )
        for args in (
            (x, cu_seqlens, u, 0.5, full_width),
            (x_leaf, cu_seqlens, u_leaf, 0.5, full_width),
        ):
            torch.library.opcheck(torch.ops.attnpool.folded_attention_pool_varlen.default, args)
    query, w_q, w_k = _weights(2, 8)
    leaves = _leaves(x, query, w_q, w_k)
    assert torch.autograd.gradcheck(
        lambda x, q, wq, wk: attnpool.attention_pool_varlen(
            x, q, wq, wk, cu_seqlens=cu_seqlens, num_heads=2
        ),
        leaves,
    )
    torch.library.opcheck(
        torch.ops.attnpool.attention_pool_varlen.default,
        (leaves[0], cu_seqlens, *leaves[1:]),
        dict(num_heads=2),
    )


def test_work_is_split_over_rows_and_bitwise_the_same_for_any_thread_count():
    # One sequence of 3000 rows among 40 short ones: the CPU forward cuts it
    # into pieces of 512 rows (64-wide rows, 32768 elements a piece), which
    # run in parallel and are merged in a fixed order.
    lengths = [7] * 20 + [3000] + [5] * 20
    x, cu_seqlens = _ragged(lengths)
    u = _folded_query(2, 4)
    results = []
    for threads in (1, 2, 3):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            x_leaf, u_leaf = _leaves(x, u)
            out = attnpool.folded_attention_pool_varlen(x_leaf, u_leaf, cu_seqlens=cu_seqlens)
            out.pow(2).sum().backward()
            results.append((out, x_leaf.grad, u_leaf.grad))
        finally:
            torch.set_num_threads(previous)
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            assert torch.equal(got, want)
    want = reference.folded_attention_pool_varlen(x, cu_seqlens, u)
    torch.testing.assert_close(results[0][0], want, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batches_and_sequences(device):
    u = _folded_query(2, 2, hidden=8, device=device)
    for lengths in ([], [0], [0, 0, 0]):
        x, cu_seqlens = _ragged(lengths, hidden=8, device=device)
        x_leaf, u_leaf = _leaves(x, u)
        out = attnpool.folded_attention_pool_varlen(x_leaf, u_leaf, cu_seqlens=cu_seqlens)
        assert out.shape == (len(lengths), 2, 8)
        assert torch.equal(out, torch.zeros_like(out))
        out.sum().backward()
        assert torch.equal(u_leaf.grad, torch.zeros_like(u))


@pytest.mark.parametrize("device", DEVICES)
def test_compiles_once_for_changing_rows_and_batch(device):
    torch._dynamo.reset()
    query, w_q, w_k = _weights(2, 16, device)
    query, w_q, w_k = _leaves(query.float(), w_q.float(), w_k.float())

    def loss(x, cu_seqlens):
        return (
            attnpool.attention_pool_varlen(x, query, w_q, w_k, cu_seqlens=cu_seqlens, num_heads=2)
            .pow(2)
            .sum()
        )

    backend = CompileCounterWithBackend("inductor")
    compiled = torch.compile(loss, backend=backend, fullgraph=True, dynamic=True)
    for seed, lengths in enumerate(([3, 5], [9, 0, 4, 2], [1, 30, 6])):
        x, cu_seqlens = _ragged(lengths, hidden=16, dtype=torch.float32, device=device, seed=seed)
        got = torch.autograd.grad(compiled(x, cu_seqlens), (query, w_q))
        want = torch.autograd.grad(loss(x, cu_seqlens), (query, w_q))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, **TOLERANCES[torch.float32])
    assert backend.frame_count == 1, f"recompiled: {backend.frame_count} compiles"
    torch._dynamo.reset()


def test_an_unsorted_index_is_refused_in_a_compiled_graph():
    """A compiled graph cannot read the check's verdict on the host; it
    asserts it on the device instead of skipping it (an unsorted index once
    gave a silent wrong answer there)."""
    torch._dynamo.reset()
    query, w_q, w_k = (t.float() for t in _weights(None, 8))
    x = torch.randn(6, 8)

    def pool(x, index):
        return attnpool.attention_pool_varlen(x, query, w_q, w_k, index=index, num_segments=3)

    compiled = torch.compile(pool, backend="aot_eager", fullgraph=True)
    sorted_index = torch.tensor([0, 0, 1, 1, 2, 2])
    torch.testing.assert_close(compiled(x, sorted_index), pool(x, sorted_index))
    with pytest.raises(RuntimeError, match="index must be sorted"):
        compiled(x, torch.tensor([0, 2, 1, 1, 0, 2]))
    torch._dynamo.reset()


@pytest.mark.parametrize("tracing_mode", ["fake", "symbolic"])
def test_an_index_traces_with_fake_tensors(tracing_mode):
    """make_fx with fake tensors (as non-strict export and FakeTensorMode
    run it) has no index values to check on the host: the check goes into
    the traced graph, which then pools like eager and refuses an unsorted
    index."""
    from torch.fx.experimental.proxy_tensor import make_fx

    query, w_q, w_k = (t.float() for t in _weights(None, 8))
    x = torch.randn(6, 8)

    def pool(x, index, query, w_q, w_k):
        return attnpool.attention_pool_varlen(x, query, w_q, w_k, index=index, num_segments=3)

    sorted_index = torch.tensor([0, 0, 1, 1, 2, 2])
    traced = make_fx(pool, tracing_mode=tracing_mode)(x, sorted_index, query, w_q, w_k)
    torch.testing.assert_close(
        traced(x, sorted_index, query, w_q, w_k), pool(x, sorted_index, query, w_q, w_k)
    )
    with pytest.raises(RuntimeError, match="index must be sorted"):
        traced(x, torch.tensor([0, 2, 1, 1, 0, 2]), query, w_q, w_k)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (x, sorted_index, query, w_q, w_k)]
        assert pool(*fakes).shape == (3, 8)


def test_an_index_without_num_segments_compiles_with_fullgraph():
    # B = index.max() + 1 is then a size read from the data: the graph holds
    # it as a symbol instead of refusing it.
    torch._dynamo.reset()
    query, w_q, w_k = (t.float() for t in _weights(None, 8))
    x = torch.randn(7, 8)

    def pool(x, index):
        return attnpool.attention_pool_varlen(x, query, w_q, w_k, index=index)

    compiled = torch.compile(pool, backend="aot_eager", fullgraph=True)
    for index in (torch.tensor([0, 0, 1, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 1, 1, 3, 4])):
        torch.testing.assert_close(compiled(x, index), pool(x, index))
    torch._dynamo.reset()


def test_export_keeps_rows_and_batch_dynamic():
    query, w_q, w_k = (t.float() for t in _weights(None, 16))

    class Pool(torch.nn.Module):
        def forward(self, x, cu_seqlens):
            return attnpool.attention_pool_varlen(x, query, w_q, w_k, cu_seqlens=cu_seqlens)

    x, cu_seqlens = _ragged([3, 5, 2], hidden=16, dtype=torch.float32)
    # B = cu_seqlens.shape[0] - 1 is specialised against 1, as torch does for
    # any dynamic size: one program serves every B >= 2.
    rows, offsets = torch.export.Dim("rows"), torch.export.Dim("offsets", min=3)
    exported = torch.export.export(
        Pool(), (x, cu_seqlens), dynamic_shapes=({0: rows}, {0: offsets})
    )
    for seed, lengths in enumerate(([4, 0, 7, 7, 1], [6, 0], [0, 0, 0])):
        x2, cu2 = _ragged(lengths, hidden=16, dtype=torch.float32, seed=seed)
        torch.testing.assert_close(exported.module()(x2, cu2), Pool()(x2, cu2))


def _error(exc, pattern, fn, *args, **kwargs):
    with pytest.raises(exc, match=pattern):
        fn(*args, **kwargs)


def test_bad_offsets_and_arguments_raise_clear_errors():
    x, cu_seqlens = _ragged([2, 3], hidden=8)
    u = _folded_query(None, 1, hidden=8)
    query, w_q, w_k = _weights(None, 8)
    fold = attnpool.folded_attention_pool_varlen
    _error(ValueError, r"cu_seqlens\[0\] must be 0", fold, x, u, cu_seqlens=torch.tensor([1, 2, 5]))
    _error(ValueError, "non-decreasing", fold, x, u, cu_seqlens=torch.tensor([0, 4, 3, 5]))
    _error(
        ValueError,
        r"cu_seqlens\[-1\] must be T = x.shape\[0\] = 5",
        fold,
        x,
        u,
        cu_seqlens=torch.tensor([0, 2, 6]),
    )
    _error(
        TypeError,
        "cu_seqlens must be int32 or int64, got float32",
        fold,
        x,
        u,
        cu_seqlens=cu_seqlens.float(),
    )
    _error(
        ValueError,
        r"cu_seqlens must have shape \[B \+ 1\]",
        fold,
        x,
        u,
        cu_seqlens=cu_seqlens[None],
    )
    _error(ValueError, r"x must have shape \[T, H\]", fold, x[None], u, cu_seqlens=cu_seqlens)
    _error(ValueError, "exactly one of cu_seqlens and index", fold, x, u)
    index = torch.tensor([0, 0, 1, 1, 1])
    _error(ValueError, "exactly one of", fold, x, u, cu_seqlens=cu_seqlens, index=index)
    _error(ValueError, "index must be sorted", fold, x, u, index=index.flip(0), num_segments=2)
    _error(ValueError, "index must be sorted", fold, x, u, index=index, num_segments=1)
    _error(ValueError, "index must be sorted", fold, x, u, index=index - 5)
    # Each error names the function called, and a dtype error is a TypeError.
    pool = attnpool.attention_pool_varlen
    for bad in ([1, 2, 5], [0, 4, 3, 5], [0, 2, 6]):
        _error(
            ValueError,
            "^attention_pool_varlen: cu_seqlens",
            pool,
            x,
            query,
            w_q,
            w_k,
            cu_seqlens=torch.tensor(bad),
        )
    _error(
        ValueError,
        "^folded_attention_pool_varlen: cu_seqlens",
        fold,
        x,
        u,
        cu_seqlens=torch.tensor([1, 2, 5]),
    )
    _error(
        ValueError, "^folded_attention_pool_varlen: index must be sorted", fold, x, u, index=-index
    )
    _error(ValueError, "^segment_offsets: index must be sorted", attnpool.segment_offsets, -index)
    _error(
        TypeError, "index must be int32 or int64 .*, got float32", fold, x, u, index=index.float()
    )
    _error(ValueError, r"index must be 1-D, \[T\]", fold, x, u, index=index[None])
    _error(
        ValueError,
        r"index must have one entry per row of x, \[T\] = \[5\], got \[4\]",
        attnpool.attention_pool_varlen,
        x,
        query,
        w_q,
        w_k,
        index=index[:-1],
        num_segments=2,
    )
    _error(
        ValueError,
        "num_segments goes with index",
        fold,
        x,
        u,
        cu_seqlens=cu_seqlens,
        num_segments=2,
    )
    _error(
        TypeError,
        "num_heads must be an int",
        attnpool.attention_pool_varlen,
        x,
        query,
        w_q,
        w_k,
        cu_seqlens=cu_seqlens,
        num_heads=2.0,
    )
    _error(
        ValueError,
        r"w_q must have shape \[H, H\]",
        attnpool.attention_pool_varlen,
        x,
        query,
        w_q[:4],
        w_k,
        cu_seqlens=cu_seqlens,
    )
    nested = torch.nested.nested_tensor_from_jagged(x, cu_seqlens)
    _error(
        ValueError,
        "mask is for padded",
        attnpool.attention_pool,
        nested,
        query,
        w_q,
        w_k,
        torch.ones(2, 3, dtype=torch.bool),
    )
    strided = torch.nested.nested_tensor([x[:2], x[2:]])
    _error(ValueError, "layout=torch.jagged", attnpool.attention_pool, strided, query, w_q, w_k)
    # Only x may be nested; elsewhere a clear error, not the dispatcher's.
    _error(
        TypeError, "fold_query: query must be a dense tensor", attnpool.fold_query, nested, w_q, w_k
    )
    _error(TypeError, "u must be a dense tensor", attnpool.folded_attention_pool, x[None], nested)


def test_torch_func_reverse_mode_and_vmap_without_the_fallback():
    x, cu_seqlens = _ragged([2, 0, 5], hidden=8)
    query, w_q, w_k = _weights(2, 8)

    def loss(query, x):
        out = attnpool.attention_pool_varlen(x, query, w_q, w_k, cu_seqlens=cu_seqlens, num_heads=2)
        return out.pow(2).sum()

    leaf = query.clone().requires_grad_()
    loss(leaf, x).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's per-sample fallback warns
        assert torch.equal(torch.func.grad(loss)(query, x), leaf.grad)
        xs = torch.stack([x, 2 * x, -x])
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(query, xs)
        for sample in range(3):
            torch.testing.assert_close(per_sample[sample], torch.func.grad(loss)(query, xs[sample]))
        jacobian = torch.func.jacrev(
            lambda x: attnpool.folded_attention_pool_varlen(x, w_q[:1], cu_seqlens=cu_seqlens)
        )(x)
    assert jacobian.shape == (3, 8, 7, 8)
    assert torch.equal(jacobian[1], torch.zeros_like(jacobian[1]))  # the empty sequence
    # Under a transform the op still checks its own arguments, in its own name.
    with pytest.raises(ValueError, match="attention_pool_varlen: num_heads must divide H = 8"):
        torch.func.grad(
            lambda q: attnpool.attention_pool_varlen(
                x, q, w_q, w_k, cu_seqlens=cu_seqlens, num_heads=3
            ).sum()
        )(query)


@pytest.mark.parametrize("full_width", [False, True], ids=["slices", "full-width"])
def test_forward_mode_ad_equals_the_reference(full_width):
    x, cu_seqlens = _ragged([2, 0, 5], hidden=8)
    u = _folded_query(2, 2, hidden=8)
    tangents = (torch.randn_like(x), torch.randn_like(u))

    def pool(x, u):
        return attnpool.folded_attention_pool_varlen(
            x, u, cu_seqlens=cu_seqlens, scale=0.7, full_width=full_width
        )

    def want(x, u):
        return reference.folded_attention_pool_varlen(x, cu_seqlens, u, 0.7, full_width)

    _, got = torch.func.jvp(pool, (x, u), tangents)
    _, expected = torch.func.jvp(want, (x, u), tangents)
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.float64])
    torch.testing.assert_close(
        torch.func.jacfwd(pool)(x, u), torch.func.jacrev(pool)(x, u), **TOLERANCES[torch.float64]
    )
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangents[0])
        tangent = torch.autograd.forward_ad.unpack_dual(pool(dual, u)).tangent
    _, expected = torch.func.jvp(lambda x: want(x, u), (x,), tangents[:1])
    torch.testing.assert_close(tangent, expected, **TOLERANCES[torch.float64])
    assert torch.autograd.gradcheck(
        pool,
        _leaves(x, u),
        check_forward_ad=True,
        check_batched_grad=True,
        check_batched_forward_grad=True,
    )
