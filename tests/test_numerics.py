"""Edge-case values against the float64 reference: sizes that are empty but
valid (H = 0, Q = 0), NaN and Inf in x, scores so large that every softmax is
one-hot, extreme scales, and the gradients of a sharply peaked softmax in
half precision. Bad arguments are in test_errors.py."""

import math

import pytest
import torch
from helpers import DEVICES, TOLERANCES, Inputs, make_inputs, reference_in_float64, scored_u

import attnpool

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


# --- odd but valid sizes ----------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_queries", [None, 2], ids=["1d", "q2"])
def test_zero_hidden_size_gives_an_empty_output(device, num_queries):
    # H == 0 passes every check (num_heads = 1 divides 0), and the Meta kernel
    # returns [B, 0] / [B, Q, 0]; the CPU kernel must agree, not fail inside.
    x = torch.randn(2, 5, 0, device=device)
    query = torch.randn((0,) if num_queries is None else (num_queries, 0), device=device)
    w = torch.randn(0, 0, device=device)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = attnpool.attention_pool(*(mode.from_tensor(t) for t in (x, query, w, w)))
    out = attnpool.attention_pool(x, query, w, w)
    assert out.shape == fake.shape == ((2, 0) if num_queries is None else (2, num_queries, 0))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_queries_give_an_empty_output_and_zero_gradients(device):
    inputs = make_inputs(3, 5, 8, 0, mask="random", device=device).requiring_grad()
    out = attnpool.attention_pool(*inputs.args(), num_heads=2)
    assert out.shape == (3, 0, 8)
    out.sum().backward()
    for t in (inputs.x, inputs.query, inputs.w_q, inputs.w_k):
        assert t.grad.shape == t.shape and torch.equal(t.grad, torch.zeros_like(t))


# --- NaN and Inf ------------------------------------------------------------------


def _with_non_finite(value, dtype, device):
    """x holds `value` in attended positions of sequences 0 and 3 and in a
    masked position of sequence 2 (which must not notice)."""
    inputs = make_inputs(4, 6, 8, 2, mask="random", dtype=dtype, device=device)
    inputs.mask[0] = True
    inputs.mask[2, 1] = False
    inputs.mask[3] = True
    inputs.x[0, 2, 3] = value  # one element
    inputs.x[2, 1, 0] = value  # masked
    inputs.x[3, 4, :] = value  # a whole position
    return inputs


def _assert_like_reference(got, want, dtype, what):
    """Finite wherever the reference is finite, and close there."""
    finite = want.isfinite()
    assert got.isfinite()[finite].all(), f"{what}: not finite where the reference is"
    torch.testing.assert_close(
        got.double()[finite],
        want[finite],
        **TOLERANCES[dtype],
        msg=lambda m: f"{what}: {m}",
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_x_behaves_like_the_reference(device, dtype, value):
    inputs = _with_non_finite(value, dtype, device)
    leaves = inputs.requiring_grad()
    exact = inputs.to(dtype=torch.float64).requiring_grad()
    got = attnpool.attention_pool(*leaves.args(), num_heads=2)
    want = attnpool.reference.attention_pool(*exact.args(), num_heads=2)
    # Where the reference is finite (sequences 1 and 2, the one with a masked
    # NaN/Inf included) ours is finite and close ...
    _assert_like_reference(got, want, dtype, "output")
    assert got[1:3].isfinite().all()
    # ... and sequences with an attended NaN/Inf do not come out all finite.
    for b in (0, 3):
        assert not got[b].isfinite().all(), f"sequence {b} hides its non-finite input"
    if math.isnan(value):
        torch.testing.assert_close(got.double(), want, equal_nan=True, **TOLERANCES[dtype])

    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(0))
    weights = weights.to(device=device, dtype=torch.float64)
    (got.double() * weights).sum().backward()
    (want * weights).sum().backward()
    for name in ("x", "query", "w_q", "w_k"):
        _assert_like_reference(
            getattr(leaves, name).grad, getattr(exact, name).grad, dtype, f"gradient of {name}"
        )
    assert leaves.x.grad[1:3].isfinite().all()


# --- huge scores ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_long_sequences_keep_their_softmax_sum(device):
    # [Note: rows per piece]: a batch large enough that each sequence is one
    # piece of work, each 2^18 rows long, whose scores after the first are
    # log 0.7 below it. Summed in one float32 run, every term rounded alike
    # and log(sum) came out 2.6e-3 high (and past 2^24 rows the sum stopped).
    batch, length = 32, 2**18
    column = torch.full((1, length, 1), math.log(0.7), device=device)
    column[0, 0, 0] = 0.0
    x = column.expand(batch, length, 1)
    u = torch.ones(1, 1, device=device)
    out, lse = torch.ops.attnpool._folded_attention_pool_forward(x, u, None, 1.0, False, None, None)
    total = 1 + (length - 1) * 0.7
    want_lse = torch.full((batch, 1), math.log(total), dtype=torch.float64)
    want_out = torch.full(
        (batch, 1), (length - 1) * 0.7 * math.log(0.7) / total, dtype=torch.float64
    )
    torch.testing.assert_close(lse[..., 1].cpu().double(), want_lse, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.cpu().double(), want_out, rtol=1e-4, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_huge_scores_are_finite_and_match_the_reference(device, dtype):
    # x scaled by 1e4 (1e2 for float16, whose range ends at 65504) makes
    # scores of order 1e8: every softmax is one-hot, nothing may overflow.
    x_scale = 1e2 if dtype == torch.float16 else 1e4
    inputs = make_inputs(3, 50, 16, 2, mask="random", dtype=dtype, device=device, x_scale=x_scale)
    leaves = inputs.requiring_grad()
    got = attnpool.attention_pool(*leaves.args(), num_heads=2)
    want = reference_in_float64(inputs, num_heads=2)
    assert got.isfinite().all()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), want, atol=tol["atol"] * x_scale, rtol=tol["rtol"])
    # Each output is a convex combination of attended positions of x.
    keep = inputs.mask[..., None]
    x = inputs.x.double()
    low = x.masked_fill(~keep, math.inf).amin(dim=1)[:, None]
    high = x.masked_fill(~keep, -math.inf).amax(dim=1)[:, None]
    attended = inputs.mask.any(dim=1)
    assert ((got.double() >= low) & (got.double() <= high))[attended].all()
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(0))
    (got.double() * weights.to(device=device, dtype=torch.float64)).sum().backward()
    for name in ("x", "query", "w_q", "w_k"):
        assert getattr(leaves, name).grad.isfinite().all(), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1e3, 1e30])
def test_extreme_scales_match_the_reference_in_float64(device, scale):
    inputs = make_inputs(3, 9, 8, 2, mask="random", device=device)
    got = attnpool.attention_pool(*inputs.args(), num_heads=2, scale=scale)
    assert got.isfinite().all()
    torch.testing.assert_close(
        got, attnpool.reference.attention_pool(*inputs.args(), num_heads=2, scale=scale)
    )


# --- subnormals ---------------------------------------------------------------
# The CPU kernels take a softmax weight below 2^-100 as 0 ([Note: no
# subnormal weights] in csrc/ops/cpu/isa/vec_helpers.h); x, u and grad_out
# keep their subnormals.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_heads, full_width", [(1, False), (4, False), (3, True)])
def test_subnormal_x_pools_like_the_reference(device, num_heads, full_width):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 40, 64, generator=gen) * 2.0**-135  # every value subnormal
    assert (x.abs() < torch.finfo(torch.float32).tiny).all()
    u = torch.randn(2, num_heads, 64, generator=gen)
    x, u = x.to(device), u.to(device)
    got = attnpool.folded_attention_pool(x, u, full_width=full_width)
    want = attnpool.reference.folded_attention_pool(x.double(), u.double(), full_width=full_width)
    assert (got != 0).any()
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=2.0**-146)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("num_heads, full_width", [(1, False), (4, False), (3, True)])
def test_scores_far_apart_match_the_reference(dtype, num_heads, full_width):
    # The weights that the kernels take as 0 are below 2^-100 against a
    # largest weight of 1: the outputs and gradients stay within tolerance.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 200, 64, generator=gen).to(dtype)
    u = torch.randn(2, num_heads, 64, generator=gen) * 20
    u = scored_u(u, x)
    grad = torch.randn(attnpool.folded_attention_pool(x, u, scale=1.0, full_width=full_width).shape)
    results = []
    for pool, cast in (
        (attnpool.folded_attention_pool, dtype),
        (attnpool.reference.folded_attention_pool, torch.float64),
    ):
        xd = x.to(cast).detach().clone().requires_grad_()
        ud = u.to(torch.float64 if cast == torch.float64 else torch.float32)
        ud = ud.detach().clone().requires_grad_()
        out = pool(xd, ud, scale=1.0, full_width=full_width)
        (out.double() * grad.double()).sum().backward()
        results.append((out.double(), xd.grad.double(), ud.grad.double()))
    tol = TOLERANCES[dtype]
    for got, want in zip(*results, strict=True):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, atol=tol["atol"] * max(scale, 1), rtol=tol["rtol"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
def test_peaked_softmax_gradients_are_as_accurate_as_the_reference(device, dtype):
    # A peaked softmax whose winner is close to the output: the gradient of the
    # query is sum_l p_l (dp_l - delta) ..., a small difference of large
    # terms. The reference at the same dtype computes it in float32 and gets it
    # to about 1e-3 of its value; the op must be no worse than a few times that
    # (plus 1e-3 of the largest gradient element). (It computes
    # delta = sum(grad_out * out) from out rounded to x's dtype, which loses
    # the difference entirely.)
    x = torch.tensor([[[1.5391], [-0.2930], [-2.1719]]], device=device)
    params = [torch.tensor(v, device=device) for v in ([0.5703], [[-1.0859]], [[-1.3984]])]
    inputs = Inputs(x.to(dtype), *params)
    grad_out = torch.tensor([[1.5410]], dtype=torch.float64, device=device)

    def gradients(function, dtype_inputs):
        leaves = dtype_inputs.requiring_grad()
        out = function(*leaves.args(), num_heads=1, scale=4.0)
        (out.double() * grad_out).sum().backward()
        return [t.grad.double() for t in (leaves.query, leaves.w_q, leaves.w_k)]

    exact = gradients(attnpool.reference.attention_pool, inputs.to(dtype=torch.float64))
    reference = gradients(attnpool.reference.attention_pool, inputs)
    got = gradients(attnpool.attention_pool, inputs)
    for name, g, r, e in zip(("query", "w_q", "w_k"), got, reference, exact, strict=True):
        reference_error = (r - e).abs().max().item()
        error = (g - e).abs().max().item()
        assert error <= 4 * reference_error + 1e-3 * e.abs().max().item(), (
            f"gradient of {name}: error {error:.3g} of {e.abs().max().item():.3g}; "
            f"the reference at {dtype} is off by {reference_error:.3g}"
        )


# --- large scores: the backward's softmax is the forward's -------------------------

LARGE_SCORES = [
    # (id, dtype, x scale, score scale, heads, queries, hidden)
    ("fp32-1e6-one-score", torch.float32, 1e6, None, 1, None, 48),
    ("fp32-1e10-one-score", torch.float32, 1e10, None, 1, None, 48),
    ("fp32-1e6-heads", torch.float32, 1e6, None, 2, 3, 48),
    ("fp32-1e10-heads", torch.float32, 1e10, None, 2, 3, 40),
    # 16 or more scores: scored by columns ([Note: scores by columns])
    ("fp32-1e6-queries", torch.float32, 1e6, None, 1, 16, 48),
    ("fp32-1e10-queries-odd-width", torch.float32, 1e10, None, 1, 17, 41),
    ("fp32-1e6-heads-queries", torch.float32, 1e6, None, 4, 4, 48),
    ("bf16-paired-1e6-one-score", torch.bfloat16, 1e6, None, 1, None, 64),
    ("bf16-paired-1e6-heads", torch.bfloat16, 1e6, None, 2, 2, 128),
    ("bf16-1e6-odd-width", torch.bfloat16, 1e6, None, 1, 2, 41),
    # 12 or more: on AVX512_BF16, from u's tiles ([Note: scores from u's
    # tiles by vdpbf16ps]), into lanes (one head, or one query) or not
    ("bf16-1e6-queries-odd-width", torch.bfloat16, 1e6, None, 1, 13, 41),
    ("bf16-1e6-heads", torch.bfloat16, 1e6, None, 12, None, 48),
    ("bf16-1e6-heads-queries", torch.bfloat16, 1e6, None, 4, 4, 64),
    ("fp64-scale-1e30", torch.float64, 1.0, 1e30, 2, 3, 40),
]
_each_large_score_case = pytest.mark.parametrize(
    "dtype, x_scale, scale, heads, queries, hidden",
    [c[1:] for c in LARGE_SCORES],
    ids=[c[0] for c in LARGE_SCORES],
)


@pytest.mark.parametrize("device", DEVICES)
@_each_large_score_case
def test_large_score_gradients_match_the_reference(
    device, dtype, x_scale, scale, heads, queries, hidden
):
    # The backward recomputes p = exp(score - lse); summed in another order
    # than the forward's, a large score differs by more than 1 and p exceeds
    # 1 (dx off by percents at 1e6, NaN at 1e10). dx = sum p * G + ... must
    # match the float64 reference on the same rounded inputs: to 1e-3 in
    # float32, to bfloat16's own rounding of dx in bfloat16.
    inputs = make_inputs(
        3, 41, hidden, queries, mask="random", dtype=dtype, device=device, x_scale=x_scale
    )
    grad_out = torch.randn(
        reference_in_float64(inputs, heads, scale).shape, generator=torch.Generator().manual_seed(1)
    ).to(device)

    def gradients(function, leaves):
        out = function(*leaves.args(), num_heads=heads, scale=scale)
        (out.double() * grad_out.double()).sum().backward()
        return [getattr(leaves, name).grad for name in ("x", "query", "w_q", "w_k")]

    got = gradients(attnpool.attention_pool, inputs.requiring_grad())
    want = gradients(
        attnpool.reference.attention_pool, inputs.to(dtype=torch.float64).requiring_grad()
    )
    for name, g, w in zip(("x", "query", "w_q", "w_k"), got, want, strict=True):
        assert g.isfinite().all() == w.isfinite().all(), name
    dx, want_dx = got[0].double(), want[0]
    tolerance = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 1e-2}[dtype]
    assert ((dx - want_dx).norm() / want_dx.norm()).item() < tolerance


@pytest.mark.parametrize("grad_dtype", ["bfloat16-values", "float32-values"])
def test_large_score_bf16_backward_with_any_grad_out(grad_dtype):
    # With bfloat16 rows and several scores, the CPU backward sums G . x from
    # bfloat16 products when every value of grad_out is a bfloat16 (the
    # gradient of a bfloat16 output) and in float32 otherwise; delta must be
    # summed alike either way, or one-hot softmaxes give dx off by percents
    # ([Note: G . x from bfloat16 products]). The backward op takes any
    # float32 grad_out.
    inputs = make_inputs(3, 41, 128, 3, mask="random", dtype=torch.bfloat16, x_scale=1e6)
    u = attnpool.reference.fold_query(
        *(t.double() for t in (inputs.query, inputs.w_q, inputs.w_k)), 2
    ).float()
    scale = 128**-0.5
    out, lse = torch.ops.attnpool._folded_attention_pool_forward(
        inputs.x, u, inputs.mask, scale, False
    )
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    if grad_dtype == "bfloat16-values":
        grad_out = grad_out.bfloat16().float()
    else:
        grad_out = grad_out * (1 + 2**-12)  # not a bfloat16
        assert not torch.equal(grad_out.bfloat16().float(), grad_out)
    dx, _ = torch.ops.attnpool._folded_attention_pool_backward(
        grad_out, inputs.x, u, inputs.mask, out, lse, scale, False
    )
    x = inputs.x.double().requires_grad_(True)
    ref = attnpool.reference.folded_attention_pool(
        x, scored_u(u, inputs.x).double(), inputs.mask, scale
    )
    (want,) = torch.autograd.grad(ref, x, grad_out.double().view(ref.shape))
    assert dx.isfinite().all()
    assert ((dx.double() - want).norm() / want.norm()).item() < 1e-2


def _bf16_backward_errors(x, u, scale, grad_out):
    """Relative errors of the CPU backward's dx, per sequence, against float64."""
    out, lse = torch.ops.attnpool._folded_attention_pool_forward(x, u, None, scale, False)
    dx, _ = torch.ops.attnpool._folded_attention_pool_backward(
        grad_out, x, u, None, out, lse, scale, False
    )
    x64 = x.double().requires_grad_(True)
    ref = attnpool.reference.folded_attention_pool(x64, scored_u(u, x).double(), None, scale)
    (want,) = torch.autograd.grad(ref, x64, grad_out.double())
    return [((dx[b].double() - want[b]).norm() / want[b].norm()).item() for b in range(len(x))]


@pytest.mark.parametrize("grad_dtype", ["bfloat16-values", "float32-values"])
@pytest.mark.parametrize("queries,heads", [(2, 1), (12, 2)])
def test_tiny_grad_out_keeps_the_bf16_backward(grad_dtype, queries, heads):
    # vdpbf16ps flushes products under float32's normal range: G . x of a
    # grad_out of 1e-34 against x of 1e-4 lost dx until such a sequence's G
    # was scaled up by a power of two ([Note: G . x from bfloat16 products]),
    # also beside a sequence of ordinary G. The float32 path takes no scale.
    # 12 queries of 2 heads: G . x from G's tiles where the CPU has AVX512-BF16.
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 16, 64, generator=gen) * 1e-4).bfloat16()
    u = torch.randn(queries, heads, 64, generator=gen) * 64**-0.5
    grad_out = torch.randn(2, queries, 64, generator=gen)
    grad_out[1] *= 1e-34
    grad_out = grad_out.bfloat16().float()
    if grad_dtype == "float32-values":
        grad_out = grad_out * (1 + 2**-12)  # not a bfloat16
    errors = _bf16_backward_errors(x, u, 1e4, grad_out)  # scores of order 1
    assert max(errors) < 1e-2, errors


def test_small_grad_out_against_huge_x_stays_finite_in_bf16():
    # Scaling every G to 1 made G . x overflow against x near float32's
    # largest (a fuzz case); G of 1e-3 against x of 3e36 is left as it is.
    gen = torch.Generator().manual_seed(0)
    x = ((torch.rand(2, 16, 128, generator=gen) * 0.5 + 1.0) * 3e36).bfloat16()
    u = torch.randn(2, 1, 128, generator=gen) * 128**-0.5
    grad_out = ((torch.rand(2, 2, 128, generator=gen) + 0.5) * 1e-3).bfloat16().float()
    errors = _bf16_backward_errors(x, u, 1 / 3e36, grad_out)
    assert max(errors) < 1e-2, errors


# (torch.func calls the deprecated torch.jit.script inside; nothing to do with attnpool.)
@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("under_vmap", [False, True], ids=["jvp", "vmap-jvp"])
@_each_large_score_case
def test_large_score_tangents_are_the_attended_rows_tangents(
    device, dtype, x_scale, scale, heads, queries, hidden, under_vmap
):
    # At these scales every softmax is one-hot, so out is the top row's head
    # slice and its tangent is that row's tangent: sum p dx = dx[top], while
    # sum p (ds - sum p ds) x is 0 although each of its terms is about
    # |ds| |x| (1e21 at |x| ~ 1e10). The float64 composition loses dx[top]
    # there (its p is 1 only to an ulp of the score); the op keeps it. Under
    # vmap (and on devices without a jvp kernel) the tangent is the
    # composition of attnpool._transforms, which must keep it too.
    inputs = make_inputs(
        3, 41, hidden, queries, mask="random", dtype=dtype, device=device, x_scale=x_scale
    )
    scale = hidden**-0.5 if scale is None else scale
    u = attnpool.reference.fold_query(
        *(t.double() for t in (inputs.query, inputs.w_q, inputs.w_k)), heads
    ).to(dtype)
    gen = torch.Generator().manual_seed(2)
    x_tangent = (torch.randn(inputs.x.shape, generator=gen) * x_scale).to(dtype).to(device)
    u_tangent = torch.randn(u.shape, generator=gen).to(dtype).to(device)

    def pool(x, u):
        return attnpool.folded_attention_pool(x, u, inputs.mask, scale)

    us = u.double().reshape(-1, heads, hidden)
    scores = torch.einsum("blh,qnh->bqnl", inputs.x.double(), us)
    top = scores.masked_fill(~inputs.mask[:, None, None], -math.inf).argmax(-1)  # [B, Q, n]
    head_dim = hidden // heads
    slices = x_tangent.double().reshape(3, 41, heads, head_dim)
    want = torch.stack(
        [slices[b, top[b, :, h], h] for b in range(3) for h in range(heads)], dim=1
    )  # [Q, B * n, head_dim]
    want = want.reshape(-1, 3, heads, head_dim).transpose(0, 1).reshape(3, -1, hidden)
    want[~inputs.mask.any(-1)] = 0  # a sequence with nothing to attend
    want = want[:, 0] if u.dim() == 2 else want

    def tangent(x_tangent, u_tangent):
        return torch.func.jvp(pool, (inputs.x, u), (x_tangent, u_tangent))[1]

    if under_vmap:  # a batch of one tangent
        tangent = _batch_of_one(torch.func.vmap(tangent))
    got = tangent(x_tangent, torch.zeros_like(u))
    torch.testing.assert_close(got.double(), want.to(got.dtype).double(), rtol=0, atol=0)
    got = tangent(torch.zeros_like(inputs.x), u_tangent)
    assert torch.equal(got, torch.zeros_like(got))


def _batch_of_one(batched):
    """batched (a function of batched tensors) on unbatched tensors."""

    def call(*tensors):
        return batched(*(t[None] for t in tensors))[0]

    return call
