"""attnpool::_layer_norm_folded_attention_pool: folded_attention_pool of a
layer norm of x's rows (open_clip's ln_k), the norm done in the pooling pass
on the CPU. Values and gradients (of x, u and the norm's weight and bias)
against the float64 reference, the composite that serves other devices,
gradcheck, opcheck, forward-mode AD, torch.compile, errors, bitwise
repeatability across thread counts, and what autograd saves."""

import pytest
import torch
from helpers import TOLERANCES

import attnpool
from attnpool import reference

OP = torch.ops.attnpool._layer_norm_folded_attention_pool
FORWARD = torch.ops.attnpool._layer_norm_folded_attention_pool_forward.default
BACKWARD = torch.ops.attnpool._layer_norm_folded_attention_pool_backward.default
EPS = 1e-5


def _case(batch, length, hidden, queries, heads, dtype, seed=0, affine=(True, True)):
    """x (rows far from zero mean and unit variance, as a norm expects), u,
    weight and bias (each None unless affine says so), all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    acc = reference.accumulate_dtype(dtype)

    def rand(*shape, dtype=torch.float64):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    x = (rand(batch, length, hidden) * 3 + 2).to(dtype).requires_grad_()
    u = rand(queries, heads, hidden, dtype=acc).requires_grad_()
    weight = rand(hidden, dtype=dtype).requires_grad_() if affine[0] else None
    bias = rand(hidden, dtype=dtype).requires_grad_() if affine[1] else None
    return x, u, weight, bias


def _reference(x, u, weight, bias, mask=None, scale=0.3, full_width=True, **kw):
    """The norm, then the float64 reference pooling, in float64."""
    normalized = reference.layer_norm_rows(x, weight, bias, EPS)
    return reference.folded_attention_pool(
        normalized.double(), u.double(), mask, scale, full_width, **kw
    )


def _grads(out, inputs, grad):
    present = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, present, grad)


def _mask(batch, length, seed=1):
    keep = torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) > 0.3
    keep[0] = False  # an empty row
    keep[1, 0] = True
    return keep


SHAPES = {
    "one-score": (3, 37, 48, 1, 1, False),
    "heads-full-width": (2, 19, 64, 2, 4, True),
    "heads-slices": (4, 9, 40, 3, 2, False),
    "long-full-width": (2, 70, 96, 1, 1, True),
    # 13 scores over an odd width: bfloat16 from u's tiles on AVX512_BF16
    "many-scores-odd-width": (2, 29, 41, 13, 1, False),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "mask"])
def test_values_and_gradients_match_the_reference(dtype, shape, masked):
    *sizes, full_width = shape
    x, u, weight, bias = _case(*sizes, dtype)
    mask = _mask(x.shape[0], x.shape[1]) if masked else None
    out = OP(x, u, weight, bias, EPS, mask, 0.3, full_width)
    assert out.dtype == dtype
    want = _reference(x, u, weight, bias, mask, 0.3, full_width)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), want, **tol)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = _grads(out, (x, u, weight, bias), grad.to(dtype))
    # The reference's gradients, from the same rounded inputs in float64.
    leaves = [t.detach().double().requires_grad_() for t in (x, u, weight, bias)]
    wanted = _grads(_reference(*leaves, mask, 0.3, full_width), leaves, grad)
    for name, g, w in zip(("x", "u", "weight", "bias"), got, wanted, strict=True):
        scale = w.abs().max().clamp_min(1.0)
        torch.testing.assert_close(g.double() / scale, w / scale, **tol, msg=name)
    if masked:
        # The empty row pools to zeros, with zero gradients for its rows.
        assert out[0].eq(0).all() and got[0][0].eq(0).all()


def test_lengths_never_read_the_padding():
    """Rows past a length may hold NaN: the norm never runs on them, their dx
    rows are zero and the norm's gradients stay finite."""
    x, u, weight, bias = _case(3, 11, 32, 1, 2, torch.float32)
    lengths = torch.tensor([11, 4, 0])
    padded = x.detach().clone()
    padded[1, 4:] = float("nan")
    padded[2] = float("nan")
    padded.requires_grad_()
    out = OP(padded, u, weight, bias, EPS, None, 0.3, True, None, lengths)
    clean = OP(x, u, weight, bias, EPS, None, 0.3, True, None, lengths)
    torch.testing.assert_close(out, clean)
    assert out[2].eq(0).all()
    dx, dw, db = torch.autograd.grad(out.sum(), (padded, weight, bias))
    assert dx[1, 4:].eq(0).all() and dx[2].eq(0).all()
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all() and torch.isfinite(db).all()


def test_attn_bias_of_finfo_min_averages_the_row():
    """A row whose every bias is finfo.min (peers' padding) averages its
    normalized rows, as the composition does."""
    x, u, weight, bias = _case(2, 7, 16, 1, 2, torch.float64)
    attn_bias = torch.zeros(2, 7, dtype=torch.float64)
    attn_bias[1] = torch.finfo(torch.float64).min
    out = OP(x, u, weight, bias, EPS, None, 0.5, True, attn_bias)
    want = _reference(x, u, weight, bias, None, 0.5, True, attn_bias=attn_bias)
    torch.testing.assert_close(out, want, **TOLERANCES[torch.float64])
    mean = reference.layer_norm_rows(x, weight, bias, EPS)[1].mean(0)
    torch.testing.assert_close(out[1, 0, 0], mean, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, False)])
def test_gradcheck(affine):
    x, u, weight, bias = _case(2, 5, 8, 2, 2, torch.float64, affine=affine)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)

    def pool(x, u, weight, bias):
        return OP(x, u, weight, bias, EPS, mask, 0.7, True)

    assert torch.autograd.gradcheck(pool, (x, u, weight, bias))


def test_composite_of_other_devices_matches_the_cpu_kernels():
    """Where no fused kernel is (CUDA), the ops run the norm, then the pooling
    ops, rows that no score attends zeroed first: called here through their
    CompositeExplicitAutograd kernels."""
    composite = torch._C.DispatchKey.CompositeExplicitAutograd
    x, u, weight, bias = _case(3, 9, 24, 2, 3, torch.float32)
    x = x.detach()
    x[0, 5:] = float("nan")  # past the length
    lengths = torch.tensor([5, 9, 0])
    args = (x, u.detach(), weight.detach(), bias.detach(), EPS, None, 0.3, True, None, lengths)
    out, lse = FORWARD(*args)
    composite_out, composite_lse = FORWARD._op_dk(composite, *args)
    torch.testing.assert_close(composite_out, out)
    torch.testing.assert_close(composite_lse, lse)
    grad = torch.randn_like(out)
    backward_args = (grad, *args[:6], out, lse, *args[6:])
    got = BACKWARD._op_dk(composite, *backward_args)
    for name, g, w in zip(("x", "u", "weight", "bias"), got, BACKWARD(*backward_args), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=name)
        assert torch.isfinite(g).all(), name


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_opcheck(requires_grad):
    x, u, weight, bias = _case(2, 5, 8, 2, 2, torch.float64)
    tensors = [t.detach().requires_grad_(requires_grad) for t in (x, u, weight, bias)]
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    torch.library.opcheck(OP.default, (*tensors, EPS, mask, 0.7, True))
    if not requires_grad:  # (the forward and backward ops have no derivative)
        torch.library.opcheck(FORWARD, (*tensors, EPS, mask, 0.7, False))
        out, lse = FORWARD(*tensors, EPS, mask, 0.7, False)
        backward_args = (torch.randn_like(out), *tensors, EPS, mask, out, lse, 0.7, False)
        torch.library.opcheck(BACKWARD, backward_args)


def test_forward_mode_ad_matches_the_composition():
    x, u, weight, bias = _case(2, 6, 8, 1, 2, torch.float64)
    primals = tuple(t.detach() for t in (x, u, weight, bias))
    tangents = tuple(torch.randn_like(t) for t in primals)

    def fused(x, u, weight, bias):
        return OP(x, u, weight, bias, EPS, None, 0.5, True)

    def composed(x, u, weight, bias):
        normalized = reference.layer_norm_rows(x, weight, bias, EPS)
        return attnpool.folded_attention_pool(normalized, u, None, 0.5, True)

    _, want = torch.func.jvp(composed, primals, tangents)
    _, got = torch.func.jvp(fused, primals, tangents)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])
    # Dual tensors, without torch.func: the C++ autograd kernel's composition.
    with torch.autograd.forward_ad.dual_level():
        duals = [
            torch.autograd.forward_ad.make_dual(p, t)
            for p, t in zip(primals, tangents, strict=True)
        ]
        got = torch.autograd.forward_ad.unpack_dual(fused(*duals)).tangent
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])


def test_vmap_and_grad_of_torch_func():
    x, u, weight, bias = (t.detach() for t in _case(3, 6, 8, 1, 2, torch.float64))

    def loss(x, u, weight, bias):
        return OP(x, u, weight, bias, EPS, None, 0.5, True).square().sum()

    grads = torch.func.grad(loss, argnums=(0, 1, 2, 3))(x, u, weight, bias)
    leaves = [t.clone().requires_grad_() for t in (x, u, weight, bias)]
    want = torch.autograd.grad(loss(*leaves), leaves)
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w)
    per_sample = torch.func.vmap(loss, in_dims=(0, None, None, None))(x[:, None], u, weight, bias)
    for b in range(3):
        torch.testing.assert_close(per_sample[b], loss(x[b : b + 1], u, weight, bias))


def test_compiles_once_with_changing_shapes():
    weight = torch.randn(16, dtype=torch.float64, requires_grad=True)
    u = torch.randn(1, 2, 16, dtype=torch.float64, requires_grad=True)

    def pool(x):
        return OP(x, u, weight, None, EPS, None, 0.25, True)

    compiled = torch.compile(pool, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch, length in ((3, 5), (2, 9)):
        x = torch.randn(batch, length, 16, dtype=torch.float64, requires_grad=True)
        want = pool(x)
        got = compiled(x)
        torch.testing.assert_close(got, want)
        grads = torch.autograd.grad(got.sum(), (x, u, weight))
        for g, w in zip(grads, torch.autograd.grad(want.sum(), (x, u, weight)), strict=True):
            torch.testing.assert_close(g, w)


def test_bitwise_the_same_for_one_and_two_threads():
    x, u, weight, bias = _case(4, 300, 64, 1, 4, torch.float32)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            out = OP(x, u, weight, bias, EPS, None, 0.2, True)
            results.append((out, *torch.autograd.grad(out.sum(), (x, u, weight, bias))))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


def test_saves_no_normalized_copy_of_x():
    """The backward recomputes the norm from x: autograd keeps x itself and
    nothing else of its size."""
    x, u, weight, bias = _case(4, 64, 32, 1, 2, torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        OP(x, u, weight, bias, EPS, None, 0.2, True)
    large = [t for t in saved if t.numel() >= x.numel()]
    assert large and all(t.data_ptr() == x.data_ptr() for t in large)


BAD = [
    (dict(weight=torch.ones(7)), ValueError, r"norm_weight must have shape \[H\] = \[8\]"),
    (dict(bias=torch.ones(2, 8)), ValueError, r"norm_bias must have shape \[H\]"),
    (dict(weight=torch.ones(8, dtype=torch.int32)), TypeError, "norm_weight must be float64"),
    (dict(eps=0.0), ValueError, "norm_eps must be finite and > 0"),
    (dict(eps=float("nan")), ValueError, "norm_eps must be finite and > 0"),
]


@pytest.mark.parametrize("bad, error, message", BAD)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_norm_arguments_are_named(bad, error, message, device):
    x = torch.randn(2, 5, 8, device=device)
    u = torch.randn(1, 2, 8, device=device)
    weight = bad.get("weight", torch.ones(8)).to(device)
    bias = bad.get("bias", torch.zeros(8)).to(device)
    with pytest.raises(error, match=message):
        OP(x, u, weight, bias, bad.get("eps", EPS), None, 1.0, True)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_rows_of_no_element_are_refused(device):
    x = torch.randn(2, 5, 0, device=device)
    with pytest.raises(ValueError, match="at least one element to normalize"):
        OP(x, torch.randn(1, 2, 0, device=device), None, None, EPS, None, 1.0, True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_constant_row_normalizes_to_the_bias_exactly(dtype):
    """Its mean must come out exact: an ulp off, times rstd = 1/sqrt(eps),
    moved y by O(0.1) at eps = 1e-12 (BERT's)."""
    x = torch.full((1, 1, 768), 0.7, dtype=dtype)
    bias = torch.linspace(-1, 1, 768, dtype=dtype)
    out = OP(x, torch.ones(1, 768, dtype=dtype), None, bias, 1e-12, None, 1.0, True)
    assert torch.equal(out[0, 0], bias)
