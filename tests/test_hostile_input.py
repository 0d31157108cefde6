"""Hostile input: bad arguments in every disguise raise errors naming the
argument (test_errors.py has the table), non-finite and huge values behave
like the reference, and odd-but-valid sizes give the right shapes."""

import math

import pytest
import torch
from helpers import DEVICES, TOLERANCES, Inputs, make_inputs, reference_in_float64
from test_errors import BAD_TYPES, BAD_VALUES, Q, W, X

import attnpool

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def _uses_meta(kwargs):
    return any(isinstance(v, torch.Tensor) and v.device.type == "meta" for v in kwargs.values())


ALL_BAD = BAD_VALUES + BAD_TYPES
# (id, kwargs, message, the exception test_errors.py expects)
ALL_BAD_TYPED = [(*c, ValueError) for c in BAD_VALUES] + [(*c, TypeError) for c in BAD_TYPES]
BAD_ON_CPU = [c for c in ALL_BAD if not _uses_meta(c[1])]


def _call(x=X, query=Q, w_q=W, w_k=W, mask=None, num_heads=1, scale=None):
    return attnpool.attention_pool(x, query, w_q, w_k, mask, num_heads, scale)


def _requiring_grad(t):
    if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
        return t.detach().clone().requires_grad_(True)
    return t


# --- bad arguments ------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message, error", [c[1:] for c in ALL_BAD_TYPED], ids=[c[0] for c in ALL_BAD_TYPED]
)
def test_bad_inputs_requiring_grad_raise_the_same_errors(kwargs, message, error):
    # The Autograd kernel runs first: it must not hide or change the error.
    args = dict(x=X, query=Q, w_q=W, w_k=W)
    args.update(kwargs)
    args = {k: _requiring_grad(v) for k, v in args.items()}
    assert any(isinstance(v, torch.Tensor) and v.requires_grad for v in args.values())
    with pytest.raises(error, match=message):
        _call(**args)


NON_CONTIGUOUS_BAD = [
    (
        "x-transposed-wrong-hidden",
        dict(x=torch.randn(2, 6, 5).transpose(1, 2)),
        r"query must have shape \[H\] or \[Q, H\] with H = 6 \(x.shape\[2\]\), got \[8\]",
    ),
    (
        "x-sliced-rank-2",
        dict(x=torch.randn(5, 16)[:, ::2]),
        r"x must have shape \[B, L, H\], got a 2-D tensor of shape \[5, 8\]",
    ),
    (
        "x-expanded-rank-4",
        dict(x=torch.randn(1, 5, 8).expand(3, 2, 5, 8)),
        r"x must have shape \[B, L, H\], got a 4-D tensor of shape \[3, 2, 5, 8\]",
    ),
    (
        "query-strided-wrong-hidden",
        dict(query=torch.randn(2, 12)[:, ::2]),
        r"query must have shape \[H\] or \[Q, H\] with H = 8 \(x.shape\[2\]\), got \[2, 6\]",
    ),
    (
        "w_q-transposed-wrong-shape",
        dict(w_q=torch.randn(7, 8).t()),
        r"w_q must have shape \[H, H\] = \[8, 8\] \(nn.Linear layout\), got \[8, 7\]",
    ),
    (
        "w_k-expanded-wrong-shape",
        dict(w_k=torch.randn(8).expand(9, 8)),
        r"w_k must have shape \[H, H\] = \[8, 8\].*got \[9, 8\]",
    ),
    (
        "mask-transposed-wrong-shape",
        dict(mask=torch.ones(4, 2, dtype=torch.bool).t()),
        r"mask must have shape \[B, L\] = \[2, 5\], got \[2, 4\]",
    ),
    (
        "mask-broadcastable",
        dict(mask=torch.ones(1, 5, dtype=torch.bool)),
        r"mask must have shape \[B, L\] = \[2, 5\], got \[1, 5\]",
    ),
    (
        "mask-strided-wrong-shape",
        dict(mask=torch.ones(2, 12)[:, ::2]),
        r"mask must have shape \[B, L\] = \[2, 5\], got \[2, 6\]",
    ),
    (
        "x-0-d",
        dict(x=torch.tensor(1.0)),
        r"x must have shape \[B, L, H\], got a 0-D tensor of shape \[\]",
    ),
    (
        "query-0-d",
        dict(query=torch.tensor(1.0)),
        r"query must have shape \[H\] or \[Q, H\] with H = 8 \(x.shape\[2\]\), got \[\]",
    ),
    (
        "heads-huge",
        dict(num_heads=2**62),
        r"num_heads must divide H = 8, got num_heads = 4611686018427387904",
    ),
]


@pytest.mark.parametrize(
    "kwargs, message",
    [c[1:] for c in NON_CONTIGUOUS_BAD],
    ids=[c[0] for c in NON_CONTIGUOUS_BAD],
)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_non_contiguous_and_odd_bad_inputs_raise(kwargs, message, requires_grad):
    if requires_grad:
        kwargs = {k: _requiring_grad(v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        _call(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message", [c[1:] for c in BAD_ON_CPU], ids=[c[0] for c in BAD_ON_CPU]
)
def test_errors_surface_under_torch_compile(kwargs, message):
    # Dynamo runs the Meta kernel's checks on fake tensors while tracing; the
    # error it raises (a TorchRuntimeError) must still carry the message.
    torch._dynamo.reset()
    compiled = torch.compile(_call, backend="eager", fullgraph=True)
    try:
        with pytest.raises(Exception, match=message):
            compiled(**kwargs)
    finally:
        torch._dynamo.reset()


def test_shape_error_is_not_hidden_by_a_dynamic_compile():
    # After a dynamic-shape compile of good inputs, a mask whose length no
    # longer matches x must fail the guards and raise, not run the old graph.
    torch._dynamo.reset()
    compiled = torch.compile(_call, backend="eager", fullgraph=True, dynamic=True)
    try:
        mask = torch.ones(2, 5, dtype=torch.bool)
        torch.testing.assert_close(compiled(mask=mask), _call(mask=mask))
        x = torch.randn(3, 7, 8)
        torch.testing.assert_close(compiled(x=x, mask=torch.ones(3, 7)), _call(x=x))
        with pytest.raises(
            # Traced with symbolic sizes, the message shows them as symbols (s0, s1).
            Exception,
            match=r"mask must have shape \[B, L\] = \[\w+, \w+\], got \[\w+, \w+\]",
        ):
            compiled(x=x, mask=torch.ones(3, 6))
    finally:
        torch._dynamo.reset()


def test_backward_op_rejects_inconsistent_saved_tensors():
    inputs = make_inputs(2, 5, 8)
    u = attnpool.fold_query(inputs.query, inputs.w_q, inputs.w_k)
    out, lse = torch.ops.attnpool._folded_attention_pool_forward(inputs.x, u, inputs.mask)
    args = (inputs.x, u, inputs.mask)

    def backward(grad_out, out, lse):
        return torch.ops.attnpool._folded_attention_pool_backward(
            grad_out, *args, out, lse, 1.0, False
        )

    with pytest.raises(TypeError, match=r"lse must be float64, got float32"):
        backward(torch.ones_like(out), out, lse.float())
    with pytest.raises(ValueError, match=r"out has shape \[2, 7\], which does not match x and u"):
        backward(torch.ones(2, 7, dtype=out.dtype), torch.ones(2, 7), lse)
    with pytest.raises(
        ValueError, match=r"grad_out must be on the same device as x \(cpu\), got meta"
    ):
        backward(torch.ones_like(out, device="meta"), out, lse)


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
