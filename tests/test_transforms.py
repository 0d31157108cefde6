"""What users do around the op: transforms (forward-mode AD, TorchScript) and
changes to the modules' Linears (parametrizations, pruning, hooks, wrappers).
Each gives the right answer or a clear error, never a silently wrong one.
(torch.compile and torch.export have their own files.)"""

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.utils.prune
from helpers import TOLERANCES, RecordedOps, make_inputs
from torch import nn

import attnpool
from attnpool import _transforms, reference

# torch.jit.script is deprecated, but serving code still uses it (and torch.func
# calls it inside); the warning says nothing about attnpool.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")

ARGS = ("x", "query", "w_q", "w_k")


def _pool_inputs(num_queries=2, dtype=torch.float64):
    """Inputs with a random mask (one sequence fully masked) and NaN where masked."""
    inputs = make_inputs(3, 5, 8, num_queries=num_queries, mask="random", dtype=dtype)
    inputs.x[~inputs.mask] = float("nan")
    return inputs


def _attention_pool(module, inputs, num_heads=2):
    """module.attention_pool as a function of (x, query, w_q, w_k)."""

    def pool(x, query, w_q, w_k):
        return module.attention_pool(x, query, w_q, w_k, inputs.mask, num_heads)

    return pool


def _folded_pool(module, mask, full_width):
    def pool(x, u):
        return module.folded_attention_pool(x, u, mask, 0.7, full_width)

    return pool


def _fold(module, num_heads=2):
    def fold(query, w_q, w_k, q_bias):
        return module.fold_query(query, w_q, w_k, num_heads, q_bias)

    return fold


def _tangents(primals, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in primals)


# --- forward-mode AD: the reference's tangent ---------------------------------------


@pytest.mark.parametrize("tangent_of", [*ARGS, "all"])
def test_dual_tensors_give_the_reference_tangent(tangent_of):
    inputs = _pool_inputs()
    primals = tuple(getattr(inputs, name) for name in ARGS)
    tangents = tuple(
        t if tangent_of in ("all", name) else torch.zeros_like(t)
        for name, t in zip(ARGS, _tangents(primals), strict=True)
    )
    _, want = torch.func.jvp(_attention_pool(reference, inputs), primals, tangents)
    with fwAD.dual_level():
        duals = [
            fwAD.make_dual(p, t) if tangent_of in ("all", name) else p
            for name, p, t in zip(ARGS, primals, tangents, strict=True)
        ]
        got = fwAD.unpack_dual(_attention_pool(attnpool, inputs)(*duals)).tangent
    assert got is not None
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("full_width", [False, True], ids=["head_slices", "full_width"])
@pytest.mark.parametrize("num_queries", [None, 3], ids=["u_2d", "u_3d"])
def test_func_jvp_of_folded_attention_pool_matches_the_reference(full_width, num_queries):
    inputs = _pool_inputs(num_queries)
    u = reference.fold_query(inputs.query, inputs.w_q, inputs.w_k, 2)
    primals = (inputs.x, u)
    tangents = _tangents(primals)
    got = torch.func.jvp(_folded_pool(attnpool, inputs.mask, full_width), primals, tangents)
    want = torch.func.jvp(_folded_pool(reference, inputs.mask, full_width), primals, tangents)
    assert not want[1].isnan().any()
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("num_queries", [None, 3], ids=["query_1d", "query_2d"])
def test_func_jvp_of_fold_query_matches_the_reference(num_queries):
    inputs = make_inputs(1, 1, 8, num_queries=num_queries)
    primals = (inputs.query, inputs.w_q, inputs.w_k, torch.randn(8, dtype=torch.float64))
    tangents = _tangents(primals)
    got = torch.func.jvp(_fold(attnpool), primals, tangents)
    want = torch.func.jvp(_fold(reference), primals, tangents)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_func_jvp_in_reduced_precision_is_close_to_float64(dtype):
    inputs = _pool_inputs(dtype=dtype)
    u = attnpool.fold_query(inputs.query, inputs.w_q, inputs.w_k, 2)
    tangents = (torch.randn_like(inputs.x), torch.randn_like(u))
    out, tangent = torch.func.jvp(
        _folded_pool(attnpool, inputs.mask, False), (inputs.x, u), tangents
    )
    assert out.dtype == tangent.dtype == dtype
    want = torch.func.jvp(
        _folded_pool(reference, inputs.mask, False),
        (inputs.x.double(), u.double()),
        tuple(t.double() for t in tangents),
    )[1]
    torch.testing.assert_close(tangent.double(), want, **TOLERANCES[dtype])


def test_func_jacfwd_equals_jacrev():
    inputs = _pool_inputs()
    primals = tuple(getattr(inputs, name) for name in ARGS)
    pool = _attention_pool(attnpool, inputs)
    with _NoFallbackWarning():  # the tangents batched by jacfwd fold into one call
        forward = torch.func.jacfwd(pool, argnums=(0, 1, 2, 3))(*primals)
    reverse = torch.func.jacrev(pool, argnums=(0, 1, 2, 3))(*primals)
    torch.testing.assert_close(forward, reverse, atol=1e-12, rtol=1e-10)
    assert all(j.abs().sum() > 0 for j in forward)


def test_gradcheck_in_both_modes_and_batched():
    inputs = _pool_inputs().requiring_grad()
    inputs.x.data[~inputs.mask] = 0  # gradcheck perturbs every element, NaN included
    checks = dict(check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=True)
    assert torch.autograd.gradcheck(
        _attention_pool(attnpool, inputs), tuple(getattr(inputs, n) for n in ARGS), **checks
    )
    u = attnpool.fold_query(inputs.query, inputs.w_q, inputs.w_k, 2).detach().requires_grad_()
    for full_width in (False, True):
        pool = _folded_pool(attnpool, inputs.mask, full_width)
        assert torch.autograd.gradcheck(pool, (inputs.x, u), **checks)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    fold_inputs = (inputs.query, inputs.w_q, inputs.w_k, bias)
    assert torch.autograd.gradcheck(_fold(attnpool), fold_inputs, **checks)


# --- forward-mode AD: one pass over x and its tangent ---------------------------------

JVP_CASES = [
    # (id, batch, seq_len, hidden, heads, queries, full_width, rows left out by)
    ("one-score-mask", 3, 5, 8, 1, None, False, "mask"),
    ("heads-queries-lengths", 3, 9, 12, 3, 2, False, "lengths"),
    ("full-width-bias", 2, 9, 12, 3, 2, True, "attn_bias"),
    ("odd-width-full-width", 2, 37, 41, 1, 3, True, "mask"),
    ("long-sequence-in-pieces", 1, 3000, 40, 2, 3, False, "mask"),
]


def _jvp_case(batch, seq_len, hidden, heads, queries, left_out_by):
    """(x, u, keyword arguments) with NaN in x and in its tangent where a row is
    left out (never read), and an attn_bias with -inf there when it leaves them out."""
    gen = torch.Generator().manual_seed(seq_len)
    x = torch.randn(batch, seq_len, hidden, generator=gen, dtype=torch.float64)
    u_shape = (heads, hidden) if queries is None else (queries, heads, hidden)
    u = torch.randn(u_shape, generator=gen, dtype=torch.float64) / hidden**0.5
    attended = torch.rand(batch, seq_len, generator=gen) > 0.3
    attended[-1] = False if batch > 1 else attended[-1]  # a sequence with nothing to attend
    kwargs = {}
    if left_out_by == "mask":
        kwargs["mask"] = attended
    elif left_out_by == "lengths":
        lengths = torch.randint(0, seq_len + 1, (batch,), generator=gen)
        lengths[-1] = 0
        kwargs["lengths"] = lengths
        attended = torch.arange(seq_len) < lengths[:, None]
    else:
        bias = torch.randn(batch, seq_len, generator=gen, dtype=torch.float64)
        kwargs["attn_bias"] = bias.masked_fill(~attended, float("-inf"))
    x[~attended] = float("nan")
    return x, u, attended, kwargs


@pytest.mark.parametrize("tangent_of", ["x", "u", "both"])
@pytest.mark.parametrize("case", [c[1:] for c in JVP_CASES], ids=[c[0] for c in JVP_CASES])
def test_jvp_kernel_gives_the_reference_tangent(case, tangent_of):
    batch, seq_len, hidden, heads, queries, full_width, left_out_by = case
    x, u, attended, kwargs = _jvp_case(batch, seq_len, hidden, heads, queries, left_out_by)
    gen = torch.Generator().manual_seed(1)
    x_tangent = torch.randn(x.shape, generator=gen, dtype=x.dtype).masked_fill(
        ~attended[..., None], float("nan")
    )
    u_tangent = torch.randn(u.shape, generator=gen, dtype=u.dtype)
    if tangent_of == "x":
        u_tangent = torch.zeros_like(u)
    if tangent_of == "u":
        x_tangent = torch.zeros_like(x)

    def pool(module):
        return lambda x, u: module.folded_attention_pool(
            x, u, scale=0.7, full_width=full_width, **kwargs
        )

    got = torch.func.jvp(pool(attnpool), (x, u), (x_tangent, u_tangent))
    want = torch.func.jvp(pool(reference), (x, u), (x_tangent, u_tangent))
    assert want[1].isfinite().all() and want[1].abs().sum() > 0
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("case", [c[1:] for c in JVP_CASES[:4]], ids=[c[0] for c in JVP_CASES[:4]])
def test_jvp_composition_for_other_devices_equals_the_kernel(case):
    # Devices without a jvp kernel (and vmap) run the composition in torch ops;
    # on the CPU both exist, and must agree.
    batch, seq_len, hidden, heads, queries, full_width, left_out_by = case
    x, u, attended, kwargs = _jvp_case(batch, seq_len, hidden, heads, queries, left_out_by)
    mask, attn_bias, lengths = (kwargs.get(k) for k in ("mask", "attn_bias", "lengths"))
    ops = torch.ops.attnpool
    out, lse = ops._folded_attention_pool_forward(x, u, mask, 0.7, full_width, attn_bias, lengths)
    gen = torch.Generator().manual_seed(3)
    tangents = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (x, u)]
    bias_tangent = None if attn_bias is None else torch.randn(batch, seq_len, dtype=x.dtype)
    args = (x, u, mask, out, lse, 0.7, full_width, attn_bias, lengths, *tangents, bias_tangent)
    kernel = ops._folded_attention_pool_jvp(*args)
    torch.testing.assert_close(kernel, _transforms._pool_jvp_composite(*args))
    # The same rows as a ragged batch.
    rows = x.nan_to_num().flatten(0, 1)
    cu_seqlens = torch.arange(0, rows.shape[0] + 1, seq_len)
    out, lse = ops._folded_attention_pool_varlen_forward(rows, cu_seqlens, u, 0.7, full_width)
    args = (rows, cu_seqlens, u, out, lse, 0.7, full_width, tangents[0].flatten(0, 1), tangents[1])
    kernel = ops._folded_attention_pool_varlen_jvp(*args)
    torch.testing.assert_close(kernel, _transforms._varlen_jvp_composite(*args))


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "ragged"])
def test_jvp_is_one_kernel_over_x_and_its_tangent(varlen):
    # One call of the jvp op after the forward: no products over x and its
    # tangent composed in torch (before it, three passes over each, and the
    # ragged batch padded to its longest sequence).
    x = torch.randn(12, 16, dtype=torch.float64)
    u = torch.randn(2, 4, 16, dtype=torch.float64)
    cu_seqlens = torch.tensor([0, 5, 5, 12])
    tangents = (torch.randn_like(x), torch.randn_like(u))

    def pool(x, u):
        if varlen:
            return attnpool.folded_attention_pool_varlen(x, u, cu_seqlens=cu_seqlens)
        return attnpool.folded_attention_pool(x.view(3, 4, 16), u)

    with RecordedOps() as calls:
        torch.func.jvp(pool, (x, u), tangents)
    attnpool_calls = [name for name in calls.names if name.startswith("attnpool.")]
    kind = "_varlen" if varlen else ""
    assert attnpool_calls == [
        f"attnpool._folded_attention_pool{kind}_forward",
        f"attnpool._folded_attention_pool{kind}_jvp",
    ]
    assert not any(name.split(".")[1] in ("mm", "bmm", "exp", "matmul") for name in calls.names)


def test_derivative_of_a_tangent_is_a_clear_error():
    inputs = _pool_inputs()
    x = inputs.x.nan_to_num()
    u = attnpool.fold_query(inputs.query, inputs.w_q, inputs.w_k, 2)
    tangents = (torch.randn_like(x), torch.randn_like(u))

    def tangent(x):
        return torch.func.jvp(_folded_pool(attnpool, inputs.mask, False), (x, u), tangents)[1]

    with pytest.raises(
        RuntimeError, match=r"attnpool::_folded_attention_pool_jvp is not implemented"
    ):
        torch.func.grad(lambda x: tangent(x).sum())(x)


# --- torch.func: reverse mode, vmap, and what stays refused ---------------------------


class _NoFallbackWarning(warnings.catch_warnings):
    """vmap warns when it falls back to a per-sample loop (no batching rule); here that fails."""

    def __enter__(self):
        entered = super().__enter__()
        warnings.filterwarnings("error", message=".*batching rule.*")
        return entered


def test_func_grad_vjp_and_jacrev_match_the_reference():
    inputs = _pool_inputs()
    primals = tuple(getattr(inputs, name) for name in ARGS)

    def loss(module):
        return lambda *args: _attention_pool(module, inputs)(*args).pow(2).sum()

    argnums = (0, 1, 2, 3)
    got = torch.func.grad(loss(attnpool), argnums=argnums)(*primals)
    torch.testing.assert_close(got, torch.func.grad(loss(reference), argnums=argnums)(*primals))
    out, pullback = torch.func.vjp(_attention_pool(attnpool, inputs), *primals)
    want_out, want_pullback = torch.func.vjp(_attention_pool(reference, inputs), *primals)
    cotangent = torch.randn_like(out)
    torch.testing.assert_close(pullback(cotangent), want_pullback(cotangent))
    jacobians = torch.func.jacrev(_attention_pool(attnpool, inputs), argnums=argnums)(*primals)
    want = torch.func.jacrev(_attention_pool(reference, inputs), argnums=argnums)(*primals)
    torch.testing.assert_close(jacobians, want)


@pytest.mark.parametrize("batched", ["x", "mask", "x_and_mask", "u", "u_of_a_1d_query", "x_and_u"])
def test_func_vmap_of_folded_attention_pool_equals_a_loop(batched):
    inputs = _pool_inputs()
    samples = 4
    gen = torch.Generator().manual_seed(2)
    u = attnpool.fold_query(inputs.query, inputs.w_q, inputs.w_k, 2)
    if batched == "u_of_a_1d_query":
        u = u[0]
    # (No NaN in x: the batched masks attend where inputs.mask does not.)
    args = {"x": inputs.x.nan_to_num(0.0), "u": u, "mask": inputs.mask}
    in_dims = {}
    for name in ("x", "u", "mask"):
        if name in batched:
            arg = args[name]
            if name == "mask":
                args[name] = torch.rand(samples, *arg.shape, generator=gen) > 0.3
            else:
                args[name] = torch.randn(samples, *arg.shape, generator=gen, dtype=arg.dtype)
            in_dims[name] = 0
    dims = tuple(in_dims.get(name) for name in ("x", "u", "mask"))

    def pool(x, u, mask):
        return attnpool.folded_attention_pool(x, u, mask, 0.7)

    with _NoFallbackWarning():
        got = torch.func.vmap(pool, in_dims=dims)(args["x"], args["u"], args["mask"])
    pick = [
        tuple(args[n][i] if in_dims.get(n) == 0 else args[n] for n in ("x", "u", "mask"))
        for i in range(samples)
    ]
    want = torch.stack([pool(*sample) for sample in pick])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("batched", ["query", "w_k"])
def test_func_vmap_of_attention_pool_equals_a_loop(batched):
    inputs = _pool_inputs()
    stacked = torch.stack([getattr(inputs, batched), 2 * getattr(inputs, batched)])
    pool = _attention_pool(attnpool, inputs)

    def with_one(value):
        args = {name: getattr(inputs, name) for name in ARGS}
        args[batched] = value
        return pool(*(args[name] for name in ARGS))

    with _NoFallbackWarning():
        got = torch.func.vmap(with_one)(stacked)
    torch.testing.assert_close(got, torch.stack([with_one(v) for v in stacked]))


def test_func_transforms_of_zero_samples_give_empty_results():
    """vmap over zero samples, and jacrev of an empty batch (a vmap over the
    output's zero elements), return empty tensors of the right shapes, as
    torch's own ops do (they once failed to stack nothing)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    query, w_q, w_k = (
        torch.randn(*shape, dtype=torch.float64) for shape in ((3, 8), (8, 8), (8, 8))
    )

    def pool(x, w_q):
        return attnpool.attention_pool(x, query, w_q, w_k)

    got = torch.func.vmap(pool, in_dims=(None, 0))(x, w_q.expand(0, 8, 8))
    assert got.shape == (0, 2, 3, 8) and got.dtype == torch.float64
    grads = torch.func.vmap(torch.func.grad(lambda w: pool(x, w).sum()))(w_q.expand(0, 8, 8))
    assert grads.shape == (0, 8, 8)
    jacobian = torch.func.jacrev(lambda q: attnpool.attention_pool(x[:0], q, w_q, w_k))(query)
    assert jacobian.shape == (0, 3, 8, 3, 8)
    rows, offsets = torch.randn(4, 8, dtype=torch.float64), torch.tensor([0, 1, 4])
    ragged = torch.func.vmap(
        lambda w: attnpool.attention_pool_varlen(rows, query, w, w_k, cu_seqlens=offsets)
    )(w_q.expand(0, 8, 8))
    assert ragged.shape == (0, 2, 3, 8)


def test_per_sample_gradients_of_the_module_equal_a_loop():
    torch.manual_seed(0)
    module = attnpool.AttentionPooling(8, num_heads=2, num_queries=2).double()
    params = {name: p.detach() for name, p in module.named_parameters()}
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    mask = torch.rand(4, 6) > 0.3

    def loss(params, x, mask):
        return torch.func.functional_call(module, params, (x[None], mask[None])).pow(2).sum()

    with _NoFallbackWarning():
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, mask)
    for name, param in module.named_parameters():
        loop = [
            torch.autograd.grad(module(x[i : i + 1], mask[i : i + 1]).pow(2).sum(), param)[0]
            for i in range(len(x))
        ]
        torch.testing.assert_close(per_sample[name], torch.stack(loop), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("masking", ["mask", "attn_bias"])
@pytest.mark.parametrize("num_queries", [2, 24], ids=["fold", "projection"])
def test_func_transforms_of_multihead_attention_pooling_on_either_path(num_queries, masking):
    """Per-sample gradients (vmap of grad) equal a loop, and jvp equals the
    reverse-mode jacobian times the tangent, on both of the head's paths. The
    projection path runs SDPA, which has no forward-mode AD, and checks its
    inputs with an op that vmap's fallback could not run; under vmap it takes
    the matmuls, which batch, not SDPA, which vmap would run per sample."""
    torch.manual_seed(0)
    module = attnpool.MultiheadAttentionPooling(8, 2, num_queries=num_queries).double()
    with torch.no_grad():
        module.in_proj_bias.normal_()
    params = {name: p.detach() for name, p in module.named_parameters()}
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    if masking == "mask":
        positions = {"mask": torch.rand(3, 6) > 0.3}
    else:
        positions = {"attn_bias": torch.randn(3, 6, dtype=torch.float64)}

    def loss(params, x, positions):
        batched = {name: value[None] for name, value in positions.items()}
        out = torch.func.functional_call(module, params, (x[None],), batched)
        return out.pow(2).sum()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(
            params, x, positions
        )
    assert not [w for w in caught if "batching rule" in str(w.message)]
    for name, param in module.named_parameters():
        loop = [
            torch.autograd.grad(
                loss(
                    dict(module.named_parameters()),
                    x[i],
                    {key: value[i] for key, value in positions.items()},
                ),
                param,
            )[0]
            for i in range(len(x))
        ]
        torch.testing.assert_close(per_sample[name], torch.stack(loop), atol=1e-12, rtol=1e-10)

    def pool(x):
        return module(x, **positions)

    tangent = torch.randn_like(x)
    _, got = torch.func.jvp(pool, (x,), (tangent,))
    jacobian = torch.func.jacrev(pool)(x)  # [*out.shape, *x.shape]
    want = (jacobian * tangent).flatten(-3).sum(-1)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_second_order_is_a_clear_error():
    inputs = _pool_inputs(num_queries=None)
    pool = _attention_pool(attnpool, inputs)

    def loss(x):
        return pool(x, inputs.query, inputs.w_q, inputs.w_k).sum()

    x = inputs.x.nan_to_num()
    with pytest.raises(NotImplementedError, match=r"attnpool::_folded_attention_pool_backward"):
        torch.func.hessian(loss)(x)
    with pytest.raises(
        RuntimeError, match=r"attnpool::_folded_attention_pool_backward .*not implemented"
    ):
        torch.func.grad(lambda x: torch.func.grad(loss)(x).sum())(x)


def test_func_functionalize_matches_eager():
    inputs = _pool_inputs()
    pool = _attention_pool(attnpool, inputs)
    args = tuple(getattr(inputs, name) for name in ARGS)
    torch.testing.assert_close(torch.func.functionalize(pool)(*args), pool(*args), rtol=0, atol=0)


# --- TorchScript ---------------------------------------------------------------------


@pytest.mark.parametrize("num_queries", [1, 3])
def test_torch_jit_script_of_attention_pooling_matches_eager(num_queries):
    torch.manual_seed(0)
    module = attnpool.AttentionPooling(8, num_heads=2, num_queries=num_queries).double()
    scripted = torch.jit.script(module)
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    mask = torch.rand(3, 6) > 0.3
    torch.testing.assert_close(scripted(x, mask), module(x, mask), rtol=0, atol=0)
    torch.testing.assert_close(scripted(x), module(x), rtol=0, atol=0)


def test_torch_jit_script_of_weighted_pooling_matches_eager():
    module = attnpool.WeightedPooling(6)
    with torch.no_grad():
        module.weight.copy_(torch.linspace(-1, 1, 6))
    scripted = torch.jit.script(module)
    x = torch.randn(3, 5, 4)
    mask = torch.rand(3, 5) > 0.3
    torch.testing.assert_close(scripted(x, mask), module(x, mask), rtol=0, atol=0)
    # The scripted module refuses what the eager one refuses (a [1, L] mask
    # once broadcast silently).
    for args, message in (
        ((x, mask[:1]), r"mask must have shape \[B, L\] = \[3, 5\], got \[1, 5\]"),
        ((x, mask.float()), "mask must be bool or an integer dtype"),
        ((torch.randn(3, 7, 4),), "sequence length 7 exceeds max_len = 6"),
        ((x.long(),), "x must be float64, float32, float16 or bfloat16"),
    ):
        with pytest.raises(Exception, match="WeightedPooling: " + message):
            scripted(*args)


@pytest.mark.parametrize("kdim", [None, 6])
@pytest.mark.parametrize("num_queries", [1, 24], ids=["fold", "projection"])
def test_torch_jit_script_of_multihead_attention_pooling_matches_eager(num_queries, kdim):
    """Both paths (the fold for few queries, the key projection for many), with
    each way of giving the positions, and the scripted module still refuses
    what the eager one refuses."""
    torch.manual_seed(0)
    module = attnpool.MultiheadAttentionPooling(8, 2, num_queries=num_queries, kdim=kdim).double()
    with torch.no_grad():
        module.in_proj_bias.normal_()
        module.out_proj.bias.normal_()
    scripted = torch.jit.script(module)
    x = torch.randn(3, 6, kdim or 8, dtype=torch.float64)
    mask = torch.rand(3, 6) > 0.3
    mask[0] = False
    attn_bias = torch.randn(3, 6, dtype=torch.float64)
    attn_bias[1, :2] = float("-inf")
    lengths = torch.tensor([0, 2, 6])
    for positions in ({}, {"mask": mask}, {"attn_bias": attn_bias}, {"lengths": lengths}):
        torch.testing.assert_close(scripted(x, **positions), module(x, **positions), rtol=0, atol=0)
    with pytest.raises(Exception, match=r"mask must have shape \[B, L\] = \[3, 6\]"):
        scripted(x, mask[:, :5])


# --- what users do to q_proj and k_proj ---------------------------------------------


def _module_and_input():
    torch.manual_seed(0)
    module = attnpool.AttentionPooling(8, num_heads=2, num_queries=2).double()
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    return module, x


def _expected(module, x):
    """The reference with the weights the Linears would use in their forward."""
    w_q = module.q_proj(torch.eye(8, dtype=torch.float64)).T
    w_k = module.k_proj(torch.eye(8, dtype=torch.float64)).T
    return reference.attention_pool(x, module.query, w_q, w_k, None, module.num_heads)


class _LowRankAdapter(nn.Module):
    """A LoRA-style wrapper: its forward adds a low-rank update to the Linear's."""

    def __init__(self, linear):
        super().__init__()
        self.base = linear
        self.weight = linear.weight
        self.down = nn.Linear(8, 2, bias=False, dtype=torch.float64)
        self.up = nn.Linear(2, 8, bias=False, dtype=torch.float64)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


class _AdaptedLinear(nn.Linear):
    """A Linear subclass whose forward differs from nn.Linear's."""

    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("name", ["q_proj", "k_proj"])
def test_parametrized_weight_is_used(name):
    module, x = _module_and_input()

    class Doubled(nn.Module):
        def forward(self, weight):
            return 2 * weight

    torch.nn.utils.parametrize.register_parametrization(getattr(module, name), "weight", Doubled())
    torch.testing.assert_close(module(x), _expected(module, x))


@pytest.mark.parametrize("name", ["q_proj", "k_proj"])
def test_parametrizations_weight_norm_and_spectral_norm_are_used(name):
    for apply in (
        torch.nn.utils.parametrizations.weight_norm,
        torch.nn.utils.parametrizations.spectral_norm,
    ):
        module, x = _module_and_input()
        apply(getattr(module, name))
        module.eval()  # spectral_norm: no power iteration between the two calls
        torch.testing.assert_close(module(x), _expected(module, x))


HOOKED = [
    ("prune", lambda linear: torch.nn.utils.prune.l1_unstructured(linear, "weight", amount=0.3)),
    ("old-weight-norm", lambda linear: torch.nn.utils.weight_norm(linear)),
    ("old-spectral-norm", lambda linear: torch.nn.utils.spectral_norm(linear)),
    ("forward-hook", lambda linear: linear.register_forward_hook(lambda *args: None)),
    ("forward-pre-hook", lambda linear: linear.register_forward_pre_hook(lambda *args: None)),
]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the old weight_norm is deprecated
@pytest.mark.parametrize("name", ["q_proj", "k_proj"])
@pytest.mark.parametrize("how", [c[1] for c in HOOKED], ids=[c[0] for c in HOOKED])
def test_hooked_projection_is_refused(name, how):
    module, x = _module_and_input()
    how(getattr(module, name))
    with pytest.raises(ValueError, match=rf"AttentionPooling: {name} has module hooks"):
        module(x)


@pytest.mark.parametrize("name", ["q_proj", "k_proj"])
@pytest.mark.parametrize("wrap", [_LowRankAdapter, None], ids=["wrapper-module", "linear-subclass"])
def test_projection_with_its_own_forward_is_refused(name, wrap):
    module, _ = _module_and_input()
    old = getattr(module, name)
    if wrap is None:
        new = _AdaptedLinear(8, 8, bias=False, dtype=torch.float64)
    else:
        new = wrap(old)
    setattr(module, name, new)
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match=rf"AttentionPooling: {name} must be a plain nn.Linear"):
        module(x)
