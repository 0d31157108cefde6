"""Bad arguments raise clear errors naming the argument and its value
(SPEC.md §2 and §5), in every disguise: fake tensors, inputs that require grad,
non-contiguous views, odd ranks, under torch.compile. The backward ops reject
inconsistent saved tensors and the modules check their arguments.

One section per op, each with its table of bad arguments: a row is (id, kwargs,
expected message), fold_query's with the exception type before the message. The
kwargs replace the good defaults X, Q, W (and U for folded_attention_pool).
Edge-case values that are valid (NaN, Inf, empty sizes) are in test_numerics.py.
"""

import math

import pytest
import torch
from helpers import make_inputs

import attnpool

X = torch.randn(2, 5, 8)
Q = torch.randn(8)
W = torch.randn(8, 8)


def _uses_meta(kwargs):
    return any(isinstance(v, torch.Tensor) and v.device.type == "meta" for v in kwargs.values())


def _requiring_grad(t):
    if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
        return t.detach().clone().requires_grad_(True)
    return t


# --- attention_pool ---------------------------------------------------------------


def call(x=X, query=Q, w_q=W, w_k=W, mask=None, num_heads=1, scale=None):
    return attnpool.attention_pool(x, query, w_q, w_k, mask, num_heads, scale)


BAD_VALUES = [
    (
        "x-rank-2",
        dict(x=torch.randn(5, 8)),
        r"x must have shape \[B, L, H\], got a 2-D tensor of shape \[5, 8\]",
    ),
    (
        "x-rank-4",
        dict(x=torch.randn(1, 2, 5, 8)),
        r"x must have shape \[B, L, H\], got a 4-D tensor",
    ),
    (
        "query-hidden",
        dict(query=torch.randn(6)),
        r"query must have shape \[H\] or \[Q, H\] with H = 8 \(x.shape\[-1\]\), got \[6\]",
    ),
    (
        "query-rank-3",
        dict(query=torch.randn(1, 2, 8)),
        r"query must have shape \[H\] or \[Q, H\].*got \[1, 2, 8\]",
    ),
    (
        "w_q-shape",
        dict(w_q=torch.randn(8, 7)),
        r"w_q must have shape \[H, H\] = \[8, 8\] \(nn.Linear layout\), got \[8, 7\]",
    ),
    (
        "w_k-shape",
        dict(w_k=torch.randn(16, 8)),
        r"w_k must have shape \[H, H\] = \[8, 8\].*got \[16, 8\]",
    ),
    ("w_k-rank", dict(w_k=torch.randn(64)), r"w_k must have shape \[H, H\]"),
    ("heads-divide", dict(num_heads=3), r"num_heads must divide H = 8, got num_heads = 3"),
    ("heads-zero", dict(num_heads=0), r"num_heads must be >= 1, got 0"),
    ("heads-negative", dict(num_heads=-2), r"num_heads must be >= 1, got -2"),
    ("scale-zero", dict(scale=0.0), r"scale must be a finite positive number, got 0"),
    ("scale-negative", dict(scale=-1.5), r"scale must be a finite positive number, got -1.5"),
    ("scale-nan", dict(scale=math.nan), r"scale must be a finite positive number, got nan"),
    ("scale-inf", dict(scale=math.inf), r"scale must be a finite positive number, got inf"),
    (
        "mask-shape",
        dict(mask=torch.ones(2, 4, dtype=torch.bool)),
        r"mask must have shape \[B, L\] = \[2, 5\], got \[2, 4\]",
    ),
    (
        "mask-rank",
        dict(mask=torch.ones(10, dtype=torch.bool)),
        r"mask must have shape \[B, L\] = \[2, 5\], got \[10\]",
    ),
    (
        "mask-device",
        dict(mask=torch.ones(2, 5, dtype=torch.bool, device="meta")),
        r"mask must be on the same device as x \(cpu\), got meta",
    ),
    (
        "query-device",
        dict(query=Q.to("meta")),
        r"query must be on the same device as x \(cpu\), got meta",
    ),
    (
        "w_q-device",
        dict(w_q=W.to("meta")),
        r"w_q must be on the same device as x \(cpu\), got meta",
    ),
    (
        "w_k-device",
        dict(w_k=W.to("meta")),
        r"w_k must be on the same device as x \(cpu\), got meta",
    ),
]

BAD_TYPES = [
    ("x-int", dict(x=X.long()), r"x must be float64, float32, float16 or bfloat16, got int64"),
    ("x-bool", dict(x=X > 0), r"x must be float64, float32, float16 or bfloat16, got bool"),
    (
        "x-complex",
        dict(x=X.to(torch.complex64)),
        r"x must be float64, float32, float16 or bfloat16, got complex64",
    ),
    (
        "params-disagree",
        dict(w_q=W.double()),
        r"query, w_q and w_k must share one dtype, got float32, float64 and float32",
    ),
    (
        "params-wider-than-x",
        dict(query=Q.double(), w_q=W.double(), w_k=W.double()),
        r"must have x's dtype \(float32\) or float32 when x is float16/bfloat16, got float64",
    ),
    (
        "params-half-x-bf16",
        dict(x=X.bfloat16(), query=Q.half(), w_q=W.half(), w_k=W.half()),
        r"x's dtype \(bfloat16\).*got float16",
    ),
    (
        "mask-complex",
        dict(mask=torch.ones(2, 5, dtype=torch.complex64)),
        r"mask must be bool or an integer dtype \(nonzero = attend\), got complex64",
    ),
    *(
        (
            f"mask-{dtype_name}",
            dict(mask=torch.zeros(2, 5, dtype=getattr(torch, dtype_name))),
            rf"mask must be bool or an integer dtype \(nonzero = attend\), got {dtype_name}\. A "
            r"floating-point mask is refused because SDPA-style additive masks mean the "
            r"opposite \(0 = attend, -inf = masked\)",
        )
        for dtype_name, kind in (
            ("float32", "Float"),
            ("float64", "Double"),
            ("bfloat16", "BFloat16"),
        )
    ),
]


@pytest.mark.parametrize(
    "kwargs, message", [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES]
)
def test_bad_value_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        call(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message", [c[1:] for c in BAD_TYPES], ids=[c[0] for c in BAD_TYPES]
)
def test_bad_dtype_raises_type_error(kwargs, message):
    with pytest.raises(TypeError, match=message):
        call(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [c[1:] for c in BAD_VALUES + BAD_TYPES],
    ids=[c[0] for c in BAD_VALUES + BAD_TYPES],
)
def test_fake_tensors_raise_the_same_errors(kwargs, message):
    from torch._subclasses.fake_tensor import FakeTensorMode

    if _uses_meta(kwargs):
        pytest.skip("meta arguments are already fake")
    with FakeTensorMode() as mode:
        fake = {
            k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()
        }
        defaults = dict(x=X, query=Q, w_q=W, w_k=W)
        fake = {**{k: mode.from_tensor(v) for k, v in defaults.items() if k not in fake}, **fake}
        with pytest.raises((ValueError, TypeError), match=message):
            call(**fake)


ALL_BAD = BAD_VALUES + BAD_TYPES
# (id, kwargs, message, the exception the tests above expect)
ALL_BAD_TYPED = [(*c, ValueError) for c in BAD_VALUES] + [(*c, TypeError) for c in BAD_TYPES]
BAD_ON_CPU = [c for c in ALL_BAD if not _uses_meta(c[1])]


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
        call(**args)


NON_CONTIGUOUS_BAD = [
    (
        "x-transposed-wrong-hidden",
        dict(x=torch.randn(2, 6, 5).transpose(1, 2)),
        r"query must have shape \[H\] or \[Q, H\] with H = 6 \(x.shape\[-1\]\), got \[8\]",
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
        r"query must have shape \[H\] or \[Q, H\] with H = 8 \(x.shape\[-1\]\), got \[2, 6\]",
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
        dict(mask=torch.ones(2, 12, dtype=torch.bool)[:, ::2]),
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
        r"query must have shape \[H\] or \[Q, H\] with H = 8 \(x.shape\[-1\]\), got \[\]",
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
        call(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message", [c[1:] for c in BAD_ON_CPU], ids=[c[0] for c in BAD_ON_CPU]
)
def test_errors_surface_under_torch_compile(kwargs, message):
    # Dynamo runs the Meta kernel's checks on fake tensors while tracing; the
    # error it raises (a TorchRuntimeError) must still carry the message.
    torch._dynamo.reset()
    compiled = torch.compile(call, backend="eager", fullgraph=True)
    try:
        with pytest.raises(Exception, match=message):
            compiled(**kwargs)
    finally:
        torch._dynamo.reset()


def test_shape_error_is_not_hidden_by_a_dynamic_compile():
    # After a dynamic-shape compile of good inputs, a mask whose length no
    # longer matches x must fail the guards and raise, not run the old graph.
    torch._dynamo.reset()
    compiled = torch.compile(call, backend="eager", fullgraph=True, dynamic=True)
    try:
        mask = torch.ones(2, 5, dtype=torch.bool)
        torch.testing.assert_close(compiled(mask=mask), call(mask=mask))
        x = torch.randn(3, 7, 8)
        torch.testing.assert_close(
            compiled(x=x, mask=torch.ones(3, 7, dtype=torch.bool)), call(x=x)
        )
        with pytest.raises(
            # Traced with symbolic sizes, the message shows them as symbols (s0, s1).
            Exception,
            match=r"mask must have shape \[B, L\] = \[\w+, \w+\], got \[\w+, \w+\]",
        ):
            compiled(x=x, mask=torch.ones(3, 6, dtype=torch.bool))
    finally:
        torch._dynamo.reset()


# --- folded_attention_pool --------------------------------------------------------


U = torch.randn(1, 2, 8)


def call_folded(x=X, u=U, mask=None, scale=1.0, full_width=False):
    return attnpool.folded_attention_pool(x, u, mask, scale, full_width)


FOLDED_BAD_VALUES = [
    ("x-rank", dict(x=torch.randn(5, 8)), r"folded_attention_pool: x must have shape \[B, L, H\]"),
    (
        "u-width",
        dict(u=torch.randn(2, 6)),
        r"u must have shape \[Q, num_heads, H\] or \[num_heads, H\] with H = 8 \(x.shape\[-1\]\), "
        r"got \[2, 6\]",
    ),
    ("u-rank", dict(u=torch.randn(8)), r"u must have shape \[Q, num_heads, H\]"),
    ("u-no-head", dict(u=torch.randn(1, 0, 8)), r"u must have at least one head"),
    (
        "heads-divide",
        dict(u=torch.randn(3, 8)),
        r"the number of heads u.shape\[-2\] = 3 must divide H = 8 unless full_width=True",
    ),
    ("scale-zero", dict(scale=0.0), r"folded_attention_pool: scale must be a finite positive"),
    ("scale-nan", dict(scale=math.nan), r"scale must be a finite positive number, got nan"),
    (
        "mask-shape",
        dict(mask=torch.ones(2, 4, dtype=torch.bool)),
        r"folded_attention_pool: mask must have shape \[B, L\] = \[2, 5\], got \[2, 4\]",
    ),
    (
        "u-device",
        dict(u=torch.randn(2, 8, device="meta")),
        r"u must be on the same device as x \(cpu\), got meta",
    ),
]

FOLDED_BAD_TYPES = [
    ("x-int", dict(x=X.long()), r"folded_attention_pool: x must be float64, float32"),
    (
        "u-wider-than-x",
        dict(u=U.double()),
        r"u must have x's dtype \(float32\) or float32 when x is float16/bfloat16, got float64",
    ),
    ("u-half-x-float", dict(u=U.half()), r"u must have x's dtype \(float32\).*got float16"),
    (
        "mask-float",
        dict(mask=torch.zeros(2, 5)),
        r"folded_attention_pool: mask must be bool or an integer dtype .* got float32\. A floating",
    ),
]


@pytest.mark.parametrize(
    "kwargs, message", [c[1:] for c in FOLDED_BAD_VALUES], ids=[c[0] for c in FOLDED_BAD_VALUES]
)
def test_folded_attention_pool_bad_value_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        call_folded(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message", [c[1:] for c in FOLDED_BAD_TYPES], ids=[c[0] for c in FOLDED_BAD_TYPES]
)
def test_folded_attention_pool_bad_dtype_raises_type_error(kwargs, message):
    with pytest.raises(TypeError, match=message):
        call_folded(**kwargs)


def test_backward_op_checks_grad_out_shape():
    inputs = make_inputs(2, 5, 8)
    u = attnpool.fold_query(inputs.query, inputs.w_q, inputs.w_k)
    out, lse = torch.ops.attnpool._folded_attention_pool_forward(inputs.x, u)
    backward = torch.ops.attnpool._folded_attention_pool_backward
    with pytest.raises(
        ValueError, match=r"grad_out must have the output's shape \[2, 8\], got \[2, 7\]"
    ):
        backward(torch.ones(2, 7), inputs.x, u, None, out, lse, 1.0, False)
    with pytest.raises(ValueError, match=r"lse must have shape \[B, \*u.shape\[:-1\], 2\]"):
        backward(out, inputs.x, u, None, out, lse[..., 0], 1.0, False)


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


def test_jvp_ops_check_their_tangents():
    inputs = make_inputs(2, 5, 8)
    u = attnpool.fold_query(inputs.query, inputs.w_q, inputs.w_k, 2)  # [2, 8]
    out, lse = torch.ops.attnpool._folded_attention_pool_forward(inputs.x, u)

    def jvp(x_tangent=None, u_tangent=None, bias_tangent=None):
        return torch.ops.attnpool._folded_attention_pool_jvp(
            inputs.x, u, None, out, lse, 1.0, False, None, None, x_tangent, u_tangent, bias_tangent
        )

    x_like = torch.ones_like(inputs.x)
    with pytest.raises(ValueError, match=r"x_tangent must be on the same device as x \(cpu\)"):
        jvp(x_like.to("meta"))
    with pytest.raises(ValueError, match=r"u_tangent must have u's shape \[2, 8\], got \[8, 2\]"):
        jvp(u_tangent=u.T)
    with pytest.raises(TypeError, match="x_tangent must be floating point, got int64"):
        jvp(x_like.long())
    with pytest.raises(ValueError, match="x_tangent must be a dense"):
        jvp(x_like.to_sparse())  # (went round the op until Python's recursion limit)
    with pytest.raises(ValueError, match="bias_tangent was given without an attn_bias"):
        jvp(bias_tangent=torch.ones(2, 5, dtype=inputs.x.dtype))
    varlen_jvp = torch.ops.attnpool._folded_attention_pool_varlen_jvp
    rows, offsets = inputs.x.reshape(10, 8), torch.tensor([0, 5, 10])
    out, lse = torch.ops.attnpool._folded_attention_pool_varlen_forward(rows, offsets, u)
    with pytest.raises(ValueError, match=r"x_tangent must have x's shape \[10, 8\]"):
        varlen_jvp(rows, offsets, u, out, lse, 1.0, False, torch.ones(5, 8), None)


def test_backward_ops_check_dtypes_and_shapes():
    inputs = make_inputs(2, 5, 8)
    u = attnpool.fold_query(inputs.query, inputs.w_q, inputs.w_k)
    out, lse = torch.ops.attnpool._folded_attention_pool_forward(inputs.x, u)
    backward = torch.ops.attnpool._folded_attention_pool_backward
    with pytest.raises(TypeError, match="grad_out must be floating point, got int64"):
        backward(out.long(), inputs.x, u, None, out, lse, 1.0, False)
    with pytest.raises(TypeError, match="out must be floating point, got bool"):
        backward(out, inputs.x, u, None, out.bool(), lse, 1.0, False)
    projected = inputs.query[None] @ inputs.w_q.T  # [1, E]
    fold_backward = torch.ops.attnpool._fold_query_backward
    query = inputs.query[None].expand(3, -1)
    grad_u = torch.ones(3, 2, 8, dtype=u.dtype)
    with pytest.raises(ValueError, match=r"grad_u must have u's shape .*, got \[2, 3, 8\]"):
        fold_backward(
            grad_u.transpose(0, 1), query, inputs.w_q, inputs.w_k, projected.expand(3, -1), 2
        )
    with pytest.raises(TypeError, match="grad_u must be floating point, got int64"):
        fold_backward(grad_u.long(), query, inputs.w_q, inputs.w_k, projected.expand(3, -1), 2)


# --- fold_query -------------------------------------------------------------------


def call_fold(query=Q, w_q=W, w_k=W, num_heads=1, q_bias=None):
    return attnpool.fold_query(query, w_q, w_k, num_heads, q_bias)


FOLD_BAD_ARGS = [
    ("query-rank", dict(query=torch.randn(1, 2, 8)), ValueError, r"query must have shape \[Hq\]"),
    (
        "w_q-width",
        dict(w_q=torch.randn(8, 6)),
        ValueError,
        r"fold_query: w_q must have shape \[E, Hq\] with Hq = 8 \(query.shape\[-1\]\), got \[8, 6\]",
    ),
    (
        "w_k-rows",
        dict(w_k=torch.randn(6, 8)),
        ValueError,
        r"w_k must have shape \[E, Hx\] with E = 8 \(w_q.shape\[0\]\), got \[6, 8\]",
    ),
    (
        "heads-divide",
        dict(num_heads=3),
        ValueError,
        r"fold_query: num_heads must divide E \(w_q.shape\[0\]\) = 8, got num_heads = 3",
    ),
    ("heads-zero", dict(num_heads=0), ValueError, r"fold_query: num_heads must be >= 1, got 0"),
    (
        "bias-shape",
        dict(q_bias=torch.randn(7)),
        ValueError,
        r"q_bias must have shape \[E\] = \[8\], got \[7\]",
    ),
    (
        "bias-dtype",
        dict(q_bias=torch.randn(8).double()),
        TypeError,
        r"q_bias must have query's dtype \(float32\), got float64",
    ),
    (
        "weights-disagree",
        dict(w_k=W.double()),
        TypeError,
        r"query, w_q and w_k must share one dtype",
    ),
    (
        "query-int",
        dict(query=Q.long()),
        TypeError,
        r"query must be float64, float32, float16 or bfloat16, got int64",
    ),
    (
        "w_q-device",
        dict(w_q=torch.randn(8, 8, device="meta")),
        ValueError,
        r"w_q must be on the same device as query \(cpu\), got meta",
    ),
]


@pytest.mark.parametrize(
    "kwargs, error, message", [c[1:] for c in FOLD_BAD_ARGS], ids=[c[0] for c in FOLD_BAD_ARGS]
)
def test_fold_query_bad_argument_raises(kwargs, error, message):
    with pytest.raises(error, match=message):
        call_fold(**kwargs)


# --- Python argument types, every op -------------------------------------------------

U2 = torch.randn(1, 2, 8)
WRONG_PYTHON_TYPES = [
    (
        "num_heads-float",
        lambda: call(num_heads=2.0),
        r"attention_pool: num_heads must be an int, got float",
    ),
    (
        "num_heads-bool",
        lambda: call(num_heads=True),
        r"attention_pool: num_heads must be an int, got bool",
    ),
    (
        "query-none",
        lambda: call(query=None),
        r"attention_pool: query must be a Tensor, got NoneType",
    ),
    ("x-list", lambda: call(x=[[1.0]]), r"attention_pool: x must be a Tensor, got list"),
    (
        "mask-list",
        lambda: call(mask=[[True] * 5] * 2),
        r"attention_pool: mask must be a Tensor, got list",
    ),
    ("scale-string", lambda: call(scale="0.5"), r"attention_pool: scale must be a float, got str"),
    (
        "folded-u-none",
        lambda: attnpool.folded_attention_pool(X, None),
        r"folded_attention_pool: u must be a Tensor, got NoneType",
    ),
    (
        "folded-full-width-int",
        lambda: attnpool.folded_attention_pool(X, U2, full_width=1),
        r"folded_attention_pool: full_width must be a bool, got int",
    ),
    (
        "fold-num-heads-float",
        lambda: attnpool.fold_query(Q, W, W, 1.0),
        r"fold_query: num_heads must be an int, got float",
    ),
    (
        "fold-q-bias-number",
        lambda: attnpool.fold_query(Q, W, W, 1, 0.0),
        r"fold_query: q_bias must be a Tensor, got float",
    ),
    (
        "module-num-heads-float",
        lambda: attnpool.AttentionPooling(8, 2.0),
        r"AttentionPooling: num_heads must be an int, got float",
    ),
    (
        "module-embed-dim-string",
        lambda: attnpool.AttentionPooling("8"),
        r"AttentionPooling: embed_dim must be an int, got str",
    ),
    (
        "module-scale-string",
        lambda: attnpool.AttentionPooling(8, scale="1"),
        r"AttentionPooling: scale must be a float, got str",
    ),
    (
        "weighted-max-len-float",
        lambda: attnpool.WeightedPooling(5.0),
        r"WeightedPooling: max_len must be an int, got float",
    ),
]


@pytest.mark.parametrize(
    "make_call, message",
    [c[1:] for c in WRONG_PYTHON_TYPES],
    ids=[c[0] for c in WRONG_PYTHON_TYPES],
)
def test_wrong_python_type_raises_type_error_naming_the_argument(make_call, message):
    with pytest.raises(TypeError, match=message):
        make_call()


def test_numpy_scalars_are_taken_as_the_operators_take_them():
    np = pytest.importorskip("numpy")
    want = torch.ops.attnpool.attention_pool(X, Q, W, W, None, 2, 0.5)
    assert torch.equal(call(num_heads=np.int64(2), scale=np.float32(0.5)), want)
    assert torch.equal(call(num_heads=np.int32(2), scale=np.float64(0.5)), want)
    with pytest.raises(TypeError, match="num_heads must be an int, got bool"):
        call(num_heads=np.bool_(True))


# --- modules ----------------------------------------------------------------------


def test_module_arguments_are_checked():
    with pytest.raises(
        ValueError, match="num_heads must be >= 1 and divide embed_dim = 8, got num_heads = 3"
    ):
        attnpool.AttentionPooling(8, num_heads=3)
    with pytest.raises(ValueError, match="num_queries must be >= 1, got 0"):
        attnpool.AttentionPooling(8, num_queries=0)
    with pytest.raises(ValueError, match="embed_dim must be >= 1, got 0"):
        attnpool.AttentionPooling(0)
    with pytest.raises(ValueError, match="scale must be a finite positive number, got nan"):
        attnpool.AttentionPooling(8, scale=math.nan)
    with pytest.raises(
        ValueError, match=r"x must have shape \[B, L, embed_dim = 8\], got \[2, 3, 6\]"
    ):
        attnpool.AttentionPooling(8)(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="max_len must be >= 1, got 0"):
        attnpool.WeightedPooling(0)
    with pytest.raises(ValueError, match="sequence length 6 exceeds max_len = 5"):
        attnpool.WeightedPooling(5)(torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match=r"mask must have shape \[B, L\] = \[2, 4\], got \[2, 5\]"):
        attnpool.WeightedPooling(5)(torch.randn(2, 4, 3), torch.ones(2, 5))


WEIGHTED_POOLING_BAD_INPUTS = [
    (
        "x-int",
        dict(x=torch.ones(2, 4, 3, dtype=torch.long)),
        TypeError,
        r"x must be float64, float32, float16 or bfloat16, got int64",
    ),
    (
        "x-other-device",
        dict(x=torch.ones(2, 4, 3, device="meta")),
        ValueError,
        r"x must be on the module's device \(cpu\), got meta",
    ),
    (
        "mask-float",
        dict(mask=torch.ones(2, 4)),
        TypeError,
        r"mask must be bool or an integer dtype \(nonzero = attend\), got float32",
    ),
    (
        "mask-other-device",
        dict(mask=torch.ones(2, 4, dtype=torch.bool, device="meta")),
        ValueError,
        r"mask must be on the same device as x \(cpu\), got meta",
    ),
]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [c[1:] for c in WEIGHTED_POOLING_BAD_INPUTS],
    ids=[c[0] for c in WEIGHTED_POOLING_BAD_INPUTS],
)
def test_weighted_pooling_checks_dtypes_and_devices(kwargs, error, message):
    args = dict(x=torch.randn(2, 4, 3), mask=None)
    args.update(kwargs)
    with pytest.raises(error, match="WeightedPooling: " + message):
        attnpool.WeightedPooling(5)(**args)
