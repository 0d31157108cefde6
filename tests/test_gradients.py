"""Gradients of attention_pool: gradcheck in float64, edge cases, double backward."""

import itertools

import pytest
import torch
from helpers import DEVICES, TOLERANCES, make_inputs

import attnpool


def _op(num_heads, mask, scale=None):
    def f(x, query, w_q, w_k):
        return attnpool.attention_pool(x, query, w_q, w_k, mask, num_heads, scale)

    return f


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "batch, seq_len, hidden, num_queries, num_heads, masked, scale",
    [
        (2, 4, 6, None, 1, False, None),
        (3, 5, 8, None, 2, True, None),
        (2, 6, 8, 3, 4, True, 0.7),
        (2, 3, 4, 2, 1, False, 2.0),
    ],
)
def test_gradcheck(device, batch, seq_len, hidden, num_queries, num_heads, masked, scale):
    inputs = make_inputs(
        batch, seq_len, hidden, num_queries, mask="random" if masked else None, device=device
    ).requiring_grad()
    f = _op(num_heads, inputs.mask, scale)
    assert torch.autograd.gradcheck(f, (inputs.x, inputs.query, inputs.w_q, inputs.w_k))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_reference_on_long_split_sequences(device):
    inputs = make_inputs(2, 2500, 32, 2, mask="random", device=device).requiring_grad()
    leaves = (inputs.x, inputs.query, inputs.w_q, inputs.w_k)
    weights = torch.randn(2, 2, 32, dtype=torch.float64, device=device)
    got = torch.autograd.grad((attnpool.attention_pool(*inputs.args(), 2) * weights).sum(), leaves)
    ref = attnpool.reference.attention_pool(*inputs.args(), 2)
    want = torch.autograd.grad((ref * weights).sum(), leaves)
    for name, g, w in zip(("x", "query", "w_q", "w_k"), got, want, strict=True):
        torch.testing.assert_close(g, w, **TOLERANCES[torch.float64], msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "hidden, num_queries, num_heads",
    [(200, None, 1), (256, 3, 1), (192, 2, 2), (96, None, 3)],
    ids=["6-uneven-runs", "8-runs-3-queries", "3-runs-per-head", "one-run-per-head"],
)
def test_fold_cut_into_runs_matches_reference(device, hidden, num_queries, num_heads):
    # The CPU fold cuts each head's rows of w_q and w_k into runs of at least
    # 32 rows (up to 8 tasks) and sums the runs' partial u in order.
    inputs = make_inputs(2, 6, hidden, num_queries, mask="random", device=device).requiring_grad()
    leaves = (inputs.x, inputs.query, inputs.w_q, inputs.w_k)
    out = attnpool.attention_pool(*inputs.args(), num_heads)
    ref = attnpool.reference.attention_pool(*inputs.args(), num_heads)
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.float64])
    weights = torch.randn(out.shape, dtype=torch.float64, device=device)
    got = torch.autograd.grad((out * weights).sum(), leaves)
    want = torch.autograd.grad((ref * weights).sum(), leaves)
    for name, g, w in zip(("x", "query", "w_q", "w_k"), got, want, strict=True):
        torch.testing.assert_close(g, w, **TOLERANCES[torch.float64], msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reduced_precision_gradients(device, dtype):
    base = make_inputs(3, 20, 16, 2, mask="random", device=device)
    param_dtype = torch.float32 if dtype != torch.float32 else dtype
    inputs = base.to(dtype=dtype, param_dtype=param_dtype).requiring_grad()
    exact = base.to(dtype=dtype, param_dtype=param_dtype).to(dtype=torch.float64).requiring_grad()
    out = attnpool.attention_pool(*inputs.args(), 2)
    ref = attnpool.reference.attention_pool(*exact.args(), 2)
    weights = torch.randn(3, 2, 16, device=device, dtype=torch.float64)
    got = torch.autograd.grad(
        (out.double() * weights).sum(), (inputs.x, inputs.query, inputs.w_q, inputs.w_k)
    )
    want = torch.autograd.grad((ref * weights).sum(), (exact.x, exact.query, exact.w_q, exact.w_k))
    assert got[0].dtype == dtype and got[1].dtype == param_dtype
    for name, g, w in zip(("x", "query", "w_q", "w_k"), got, want, strict=True):
        scale = w.abs().max().item() + 1e-12
        assert (g.double() - w).abs().max().item() / scale < 3e-2, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hidden", [64, 20], ids=["rows-64-byte-aligned", "rows-unaligned"])
def test_dx_matches_float64_with_streaming_and_plain_stores(dtype, hidden):
    # With one query and one head the CPU backward writes dx with
    # non-temporal stores when its rows are 64-byte aligned and its pages are
    # already backed (as a small allocation's are), with plain stores
    # otherwise. Either way dx must be the float64 reference's.
    base = make_inputs(3, 41, hidden, mask="random")
    inputs = base.to(dtype=dtype).requiring_grad()
    exact = base.to(dtype=dtype).to(dtype=torch.float64).requiring_grad()
    grad_out = torch.randn(3, hidden, dtype=torch.float64)
    for _ in range(2):  # the second dx may reuse the first one's pages
        (dx,) = torch.autograd.grad(
            attnpool.attention_pool(*inputs.args()), inputs.x, grad_out.to(dtype)
        )
    (want,) = torch.autograd.grad(
        attnpool.reference.attention_pool(*exact.args()), exact.x, grad_out
    )
    torch.testing.assert_close(dx.double(), want, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "hidden", [64, 48, 20], ids=["two-vectors", "one-vector-tail", "scalar-tail"]
)
def test_reduced_dx_is_the_rounded_float_dx(dtype, hidden):
    # With one query and one head the CPU backward rounds dx to x's dtype as
    # it stores each pair of float vectors, then a single vector, then single
    # values: every path must give the float64 reference's dx, rounded. Rows
    # of 64 (128 bytes) are whole lines, written with non-temporal stores
    # once dx's pages are backed (the second dx may reuse the first's).
    base = make_inputs(3, 41, hidden, mask="random")
    inputs = base.to(dtype=dtype, param_dtype=torch.float32).requiring_grad()
    exact = inputs.to(dtype=torch.float64).requiring_grad()
    grad_out = torch.randn(3, hidden, dtype=torch.float64)
    for _ in range(2):
        (dx,) = torch.autograd.grad(
            attnpool.attention_pool(*inputs.args()), inputs.x, grad_out.to(dtype)
        )
    (want,) = torch.autograd.grad(
        attnpool.reference.attention_pool(*exact.args()),
        exact.x,
        grad_out.to(dtype).double(),
    )
    assert dx.dtype == dtype
    torch.testing.assert_close(dx.double(), want, **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_and_empty_sequences_have_zero_gradients(device):
    inputs = make_inputs(3, 5, 8, 2, device=device).requiring_grad()
    mask = torch.ones(3, 5, dtype=torch.bool, device=device)
    mask[1] = False
    out = attnpool.attention_pool(*inputs.args()[:4], mask, 2)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.equal(inputs.x.grad[1], torch.zeros_like(inputs.x.grad[1]))
    assert inputs.x.grad[0].abs().sum() > 0
    for t in (inputs.x, inputs.query, inputs.w_q, inputs.w_k):
        assert torch.isfinite(t.grad).all()

    empty = make_inputs(2, 0, 8, None, device=device).requiring_grad()
    attnpool.attention_pool(*empty.args()).sum().backward()
    for t in (empty.query, empty.w_q, empty.w_k):
        assert torch.equal(t.grad, torch.zeros_like(t))
    assert empty.x.grad.shape == (2, 0, 8)


GRAD_SUBSETS = [
    subset
    for size in range(1, 5)
    for subset in itertools.combinations(("x", "query", "w_q", "w_k"), size)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("names", GRAD_SUBSETS, ids=["+".join(s) for s in GRAD_SUBSETS])
def test_each_combination_of_inputs_requiring_grad_gets_the_reference_gradients(device, names):
    # The autograd kernels decide per input whether it needs a gradient; a
    # forgotten one comes back None or zero only in some combinations.
    inputs = make_inputs(2, 5, 8, 2, mask="random", device=device)
    args = dict(x=inputs.x, query=inputs.query, w_q=inputs.w_q, w_k=inputs.w_k)
    leaves = {name: args[name].clone().requires_grad_(True) for name in names}
    args.update(leaves)
    got = torch.autograd.grad(
        attnpool.attention_pool(**args, mask=inputs.mask, num_heads=2).sum(), list(leaves.values())
    )
    reference_leaves = {name: t.detach().clone().requires_grad_(True) for name, t in leaves.items()}
    args.update(reference_leaves)
    want = torch.autograd.grad(
        attnpool.reference.attention_pool(**args, mask=inputs.mask, num_heads=2).sum(),
        list(reference_leaves.values()),
    )
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(g, w, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_reaches_only_inputs_that_require_it(device):
    inputs = make_inputs(2, 5, 8, device=device)
    w_k = inputs.w_k.clone().requires_grad_(True)
    out = attnpool.attention_pool(inputs.x, inputs.query, inputs.w_q, w_k)
    (grad,) = torch.autograd.grad(out.sum(), (w_k,))
    assert grad.shape == w_k.shape and grad.abs().sum() > 0


def test_differentiating_the_gradient_is_refused():
    inputs = make_inputs(2, 4, 8).requiring_grad()
    out = attnpool.attention_pool(*inputs.args())
    (grad_x,) = torch.autograd.grad(out.sum(), (inputs.x,), create_graph=True)
    with pytest.raises(
        RuntimeError,
        match="_folded_attention_pool_backward.*not implemented"
        "|not implemented.*_folded_attention_pool_backward",
    ):
        grad_x.sum().backward()
