"""Property-based comparison of attention_pool with the reference (hypothesis).

Each example draws a shape (B and L from 0, one to four heads, a 1-D query or
0 to 3 queries), x's dtype (with float32 parameters or not for float16 and
bfloat16), a mask (none, random, all attended, none attended, per-sequence
lengths from 0; bool, uint8 or int64), layouts of x, mask, query and
weights (strided, transposed, expanded, offset views over NaN-filled storage),
a scale, and NaN in masked positions. It checks the output and the gradients
of all four inputs against the reference evaluated in float64 on the same
(rounded) inputs, allowing besides the dtype's tolerance for what the
roundings of the op's own path move them by (_reference_as_computed,
_out_rounding_effect): in a peaked softmax that can be more.

CI runs a fixed, derandomized set of ATTNPOOL_HYPOTHESIS_EXAMPLES examples
(default 200). For a longer local run with fresh random examples (failures are
saved in .hypothesis/ and replayed first next time):

    ATTNPOOL_HYPOTHESIS_EXAMPLES=20000 ATTNPOOL_HYPOTHESIS_RANDOM=1 \\
        .venv/bin/python -m pytest tests/test_hypothesis.py --hypothesis-show-statistics
"""

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from helpers import DEVICES, TOLERANCES, Inputs, reference_in_float64, scored_u
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import attnpool

EXAMPLES = int(os.environ.get("ATTNPOOL_HYPOTHESIS_EXAMPLES", "200"))
RANDOM = os.environ.get("ATTNPOOL_HYPOTHESIS_RANDOM", "0") == "1"
SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=not RANDOM,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
    **({} if RANDOM else {"database": None}),
)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
X_LAYOUTS = [
    "contiguous",
    "seq-strided",
    "hidden-strided",
    "batch-innermost",
    "hidden-not-innermost",
    "expanded-batch",
    "storage-offset",
]
# Gradients: atol = TOLERANCES[dtype]["atol"] + this times the largest exact
# gradient element, + 4 times the error of the reference run at the op's
# dtypes. float32: the backward recomputes the softmax from the saved
# log-sum-exp, and in peaked cases that costs up to about 1e-3 of the largest
# parameter gradient (the reference keeps its float32 probabilities instead).
GRADIENT_TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 5e-3,
    torch.float16: 3e-2,
    torch.bfloat16: 3e-2,
}
MASKS = ["none", "random", "all-attended", "none-attended", "lengths"]
MASK_DTYPES = [torch.bool, torch.uint8, torch.int64]


@dataclass
class Case:
    batch: int
    seq_len: int
    num_heads: int
    head_dim: int
    num_queries: Optional[int]
    dtype: torch.dtype
    float32_params: bool
    mask: str
    mask_dtype: torch.dtype
    x_layout: str
    mask_strided: bool
    params_strided: bool
    scale: Optional[float]
    x_scale: float
    nan_in_masked: bool
    seed: int

    @property
    def hidden(self):
        return self.num_heads * self.head_dim


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    return Case(
        batch=draw(st.integers(0, 4)),
        seq_len=draw(st.integers(0, 40)),
        num_heads=draw(st.integers(1, 4)),
        head_dim=draw(st.integers(1, 8)),
        num_queries=draw(st.sampled_from([None, 0, 1, 2, 3])),
        dtype=dtype,
        float32_params=dtype in (torch.float16, torch.bfloat16) and draw(st.booleans()),
        mask=draw(st.sampled_from(MASKS)),
        mask_dtype=draw(st.sampled_from(MASK_DTYPES)),
        x_layout=draw(st.sampled_from(X_LAYOUTS)),
        mask_strided=draw(st.booleans()),
        params_strided=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 8.0))),
        x_scale=draw(st.sampled_from([0.1, 1.0, 3.0])),
        nan_in_masked=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _in_nan_storage(t: torch.Tensor, shape_of_storage, index) -> torch.Tensor:
    """t as a view into bigger NaN-filled storage (floating t) or zero-filled."""
    fill = float("nan") if t.is_floating_point() else 0
    storage = torch.full(shape_of_storage, fill, dtype=t.dtype, device=t.device)
    storage[index] = t
    return storage[index]


def _lay_out_x(x: torch.Tensor, layout: str) -> torch.Tensor:
    batch, seq_len, hidden = x.shape
    if layout == "seq-strided":
        return _in_nan_storage(
            x, (batch, 2 * seq_len + 1, hidden), (slice(None), slice(1, None, 2))
        )
    if layout == "hidden-strided":
        return _in_nan_storage(x, (batch, seq_len, 2 * hidden), (Ellipsis, slice(None, None, 2)))
    if layout == "batch-innermost":
        return x.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    if layout == "hidden-not-innermost":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "expanded-batch":
        return x[:1].expand(batch, seq_len, hidden) if batch > 0 else x
    if layout == "storage-offset":
        storage = torch.full((x.numel() + 5,), float("nan"), dtype=x.dtype, device=x.device)
        view = storage[5:].view(x.shape)
        view.copy_(x)
        return view
    assert layout == "contiguous"
    return x


def _make(case: Case, device="cpu") -> Inputs:
    gen = torch.Generator().manual_seed(case.seed)
    b, n, h = case.batch, case.seq_len, case.hidden
    x = torch.randn(b, n, h, generator=gen, dtype=torch.float64) * case.x_scale
    query_shape = (h,) if case.num_queries is None else (case.num_queries, h)
    query = torch.randn(query_shape, generator=gen, dtype=torch.float64)
    w_q, w_k = torch.randn(2, h, h, generator=gen, dtype=torch.float64) / h**0.5

    mask = None
    if case.mask == "random":
        mask = torch.rand(b, n, generator=gen) > 0.4
        if b > 1:
            mask[-1] = False
    elif case.mask == "all-attended":
        mask = torch.ones(b, n, dtype=torch.bool)
    elif case.mask == "none-attended":
        mask = torch.zeros(b, n, dtype=torch.bool)
    elif case.mask == "lengths":
        lengths = torch.randint(0, n + 1, (b,), generator=gen)
        mask = torch.arange(n)[None, :] < lengths[:, None]
    if mask is not None and case.nan_in_masked and case.x_layout != "expanded-batch":
        x = x.masked_fill(~mask[..., None], float("nan"))
    if case.x_layout == "expanded-batch" and mask is not None:
        mask = mask[:1].expand(b, n) if b > 0 else mask

    param_dtype = torch.float32 if case.float32_params else case.dtype
    x = _lay_out_x(x.to(device=device, dtype=case.dtype), case.x_layout)
    query, w_q, w_k = (t.to(device=device, dtype=param_dtype) for t in (query, w_q, w_k))
    if case.params_strided:
        query = _in_nan_storage(query, (*query.shape[:-1], 2 * h), (Ellipsis, slice(None, None, 2)))
        w_q = w_q.t().contiguous().t()
        w_k = _in_nan_storage(w_k, (h, 3 * h), (slice(None), slice(h, 2 * h)))
    if mask is not None:
        # Any nonzero value attends.
        mask = torch.where(mask, 3, 0).to(device=device, dtype=case.mask_dtype)
        if case.mask_strided:
            mask = mask.t().contiguous().t()
    return Inputs(x, query, w_q, w_k, mask)


def _out_rounding_effect(inputs: Inputs, weights, num_heads, scale, dtype) -> list:
    """How much the gradients move when the backward, as SPEC.md §1 has it,
    computes delta = sum(grad_out * out) from the output rounded to `dtype`
    instead of the exact one. Evaluated in float64 with the operator's own
    backward (checked against the reference in float64 by the float64 cases)."""
    exact = inputs.to(dtype=torch.float64)
    hidden = exact.x.shape[-1]
    scale = (hidden // num_heads) ** -0.5 if scale is None else scale
    ops = torch.ops.attnpool
    fold_args = (exact.query, exact.w_q, exact.w_k)
    u, projected = ops._fold_query_forward(*fold_args, num_heads)
    out, lse = ops._folded_attention_pool_forward(exact.x, u, exact.mask, scale)
    weights = weights.reshape(out.shape)

    def gradients(used_out):
        dx, du = ops._folded_attention_pool_backward(
            weights, exact.x, u, exact.mask, used_out, lse, scale, False
        )
        return (dx, *ops._fold_query_backward(du, *fold_args, projected, num_heads)[:3])

    grads = [gradients(used_out) for used_out in (out, out.to(dtype).double())]
    return [(a - b).abs() for a, b in zip(*grads, strict=True)]


def _rounded_through(t, dtype):
    """t rounded to dtype and back, its gradient passed through the rounding."""
    return t + (t.detach().to(dtype).to(t.dtype) - t.detach())


def _reference_as_computed(x, query, w_q, w_k, mask, num_heads, scale, rounding):
    """The reference with the roundings that the op's own path takes for
    bfloat16 or float16 x (`rounding` is that dtype, or None for none), each
    passed through by the gradients, evaluated at x's dtype:

    - where the fold's CPU kernels score bfloat16 rows against u rounded to
      bfloat16 ([Note: bfloat16 products]), that rounding of u;
    - where the op projects the keys (projecting_keys_is_cheaper), the
      roundings of its products in x's dtype: w_k, the projected query, the
      keys and the weights.

    In a peaked softmax these alone can move an output or a gradient by more
    than the dtype's tolerance, which random examples found (scores of 18.5
    and 18.1, an output off by 0.18). For scale: on 400 random bfloat16
    cases of this test's shapes with x_scale 1 or 3, a bfloat16 eager
    composition, which also rounds its scores, missed bfloat16's tolerance
    106 times, the op 37."""
    if scale is None:
        scale = (x.shape[-1] // num_heads) ** -0.5
    num_queries = 1 if query.dim() == 1 else query.shape[0]
    if rounding is None or not _projects_keys(num_queries, num_heads, x.shape[-1]):
        u = attnpool.reference.fold_query(query, w_q, w_k, num_heads)
        if rounding is not None and _scores_against_rounded_u(u, x, rounding):
            u = _rounded_through(u, torch.bfloat16)
        return attnpool.reference.folded_attention_pool(x, u, mask, scale)
    batch, seq_len, hidden = x.shape
    head_dim = hidden // num_heads
    acc = attnpool.reference.accumulate_dtype(x.dtype)
    keep = torch.ones(batch, seq_len, dtype=torch.bool, device=x.device)
    keep = keep if mask is None else mask != 0
    rows = x.to(acc).masked_fill(~keep[..., None], 0)
    queries = query.reshape(num_queries, hidden).to(acc) @ w_q.to(acc).T
    queries = _rounded_through(queries, rounding).view(num_queries, num_heads, head_dim)
    keys = _rounded_through(rows @ _rounded_through(w_k.to(acc), rounding).T, rounding)
    keys = keys.view(batch, seq_len, num_heads, head_dim)
    scores = scale * torch.einsum("blnd,qnd->bqnl", keys, queries)
    weights = torch.softmax(scores.masked_fill(~keep[:, None, None, :], float("-inf")), dim=-1)
    weights = torch.where(keep.any(dim=1)[:, None, None, None], weights, 0.0)
    weights = _rounded_through(weights, rounding)
    values = rows.view(batch, seq_len, num_heads, head_dim)
    out = torch.einsum("bqnl,blnd->bqnd", weights, values).reshape(batch, num_queries, hidden)
    out = out.to(x.dtype)
    return out[:, 0] if query.dim() == 1 else out


def _projects_keys(num_queries, num_heads, hidden) -> bool:
    """attention_pool's choice (projecting_keys_is_cheaper in attention_pool_by_projection.cpp)."""
    return num_queries * num_heads > hidden + num_queries


def _scores_against_rounded_u(u, x, rounding) -> bool:
    """Whether the CPU kernels score rows of dtype `rounding` (x's, whatever
    dtype x is evaluated in here) against u rounded to bfloat16."""
    return scored_u(u, x.to(rounding)) is not u


def _assert_close_within(got, want, atol, rtol, slack, what):
    """|got - want| <= atol + rtol * |want| + slack, elementwise; NaN where want is NaN."""
    assert got.shape == want.shape, what
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN pattern differs"
    ok = want.isnan() | ((got - want).abs() <= atol + rtol * want.abs() + slack)
    if not ok.all():
        worst = ((got - want).abs() - rtol * want.abs() - slack).nan_to_num(0).argmax()
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {ok.numel()} elements differ; worst at flat index "
            f"{int(worst)}: got {got.flatten()[worst].item()}, want {want.flatten()[worst].item()} "
            f"(atol {atol:.3g}, rtol {rtol:.3g}, slack {slack.flatten()[worst].item():.3g})"
        )


# Found on an H200: one row, so the scores' gradient is exactly 0 in the
# reference; the CUDA backward summed delta = G . out in another order than
# G . x and left rounding noise above atol in the gradient of w_q.
ONE_ROW = Case(
    batch=1,
    seq_len=1,
    num_heads=1,
    head_dim=5,
    num_queries=None,
    dtype=torch.float32,
    float32_params=False,
    mask="none",
    mask_dtype=torch.bool,
    x_layout="contiguous",
    mask_strided=False,
    params_strided=False,
    scale=6.0,
    x_scale=1.0,
    nan_in_masked=False,
    seed=0,
)


def _peaked(dtype, batch, seq_len, num_heads, head_dim, num_queries, float32_params, scale, seed):
    """A plain case (no mask, contiguous) with x_scale 3."""
    return dataclasses.replace(
        ONE_ROW,
        batch=batch,
        seq_len=seq_len,
        num_heads=num_heads,
        head_dim=head_dim,
        num_queries=num_queries,
        dtype=dtype,
        float32_params=float32_params,
        scale=scale,
        x_scale=3.0,
        seed=seed,
    )


# Found with random examples, peaked softmaxes where the roundings of the
# op's own path move the result past the dtype's tolerance
# (_reference_as_computed, _out_rounding_effect): u rounded to bfloat16 for
# the scores (AVX512_BF16 and AMX_BF16 levels); keys projected in bfloat16
# and in float16; the float32 output in the backward's delta.
PEAKED = [
    _peaked(torch.bfloat16, 3, 15, 2, 2, None, False, 1.0, 4),
    _peaked(torch.bfloat16, 4, 11, 4, 1, 2, False, None, 4),
    _peaked(torch.float16, 2, 4, 4, 1, 3, True, None, 280929),
    _peaked(torch.float32, 2, 24, 1, 8, None, False, 6.75, 58507),
]


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(case=cases())
@example(case=ONE_ROW)
@example(case=PEAKED[0])
@example(case=PEAKED[1])
@example(case=PEAKED[2])
@example(case=PEAKED[3])
def test_matches_reference(device, case):
    inputs = _make(case, device)
    num_heads, scale = case.num_heads, case.scale
    got = attnpool.attention_pool(*inputs.args(), num_heads=num_heads, scale=scale)
    want = reference_in_float64(inputs, num_heads=num_heads, scale=scale)
    assert got.dtype == case.dtype
    assert got.shape == want.shape
    # The output may differ from the exact one by the effect of the roundings
    # that the op's path takes, too.
    reduced = case.dtype in (torch.float16, torch.bfloat16)
    as_computed = functools.partial(
        _reference_as_computed, rounding=case.dtype if reduced else None
    )
    exact_inputs = inputs.to(dtype=torch.float64)
    rounded = as_computed(*exact_inputs.args(), num_heads=num_heads, scale=scale)
    _assert_close_within(
        got.double(),
        want,
        **TOLERANCES[case.dtype],
        slack=(rounded - want).abs(),
        what="output",
    )

    # Gradients of all four inputs for one fixed weighting of the output: of
    # the op, of the reference in float64 (exact), and of the reference at the
    # op's dtypes with the roundings of the op's path, whose error measures how
    # well conditioned this case is.
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(case.seed))
    weights = weights.to(device=device, dtype=torch.float64)
    got_grads = _gradients(attnpool.attention_pool, inputs, weights, num_heads, scale)
    exact = _gradients(attnpool.reference.attention_pool, exact_inputs, weights, num_heads, scale)
    same_dtype = _gradients(as_computed, inputs, weights, num_heads, scale)
    # The backward starts from the output rounded to x's dtype (see
    # test_numerics.py::test_peaked_softmax_gradients_are_as_accurate_as_the_reference),
    # float32 included: random examples found scores of 77 and 44 where
    # rounding the output to float32 alone moved the gradient of the query by
    # 3% of its largest element (the op's was 6% off).
    slack = _out_rounding_effect(inputs, weights, num_heads, scale, case.dtype)
    tol = TOLERANCES[case.dtype]
    for index, name in enumerate(("x", "query", "w_q", "w_k")):
        got_grad, want_grad = got_grads[index], exact[index]
        assert got_grad.dtype == getattr(inputs, name).dtype, name
        biggest = want_grad.abs().max().item() if want_grad.numel() else 0.0
        reference_error = (same_dtype[index].double() - want_grad).abs()
        reference_error = reference_error.max().item() if want_grad.numel() else 0.0
        _assert_close_within(
            got_grad.double(),
            want_grad,
            atol=tol["atol"] + GRADIENT_TOLERANCE[case.dtype] * biggest + 4 * reference_error,
            rtol=tol["rtol"],
            slack=2 * slack[index],
            what=f"gradient of {name}",
        )


def _gradients(function, inputs: Inputs, weights, num_heads, scale):
    """Gradients of sum(function(...) * weights) with respect to x, query, w_q, w_k."""
    leaves = [t.detach().requires_grad_(True) for t in (inputs.x, inputs.query, inputs.w_q)]
    leaves.append(inputs.w_k.detach().requires_grad_(True))
    out = function(*leaves, inputs.mask, num_heads=num_heads, scale=scale)
    return torch.autograd.grad((out.double() * weights).sum(), leaves, allow_unused=True)
