"""attention_pool where projecting the keys costs less than the fold.

With Q queries and n heads over width H the fold scores Q·n times per element
of x; projecting every key costs H, then Q for the scores. Where
Q·n > H + Q (CoCa's 256 queries x 8 heads at H=768) attention_pool projects
instead (issue 14, item 3); the results are the same up to rounding."""

import pytest
import torch
from helpers import DEVICES, TOLERANCES, RecordedOps, last_line_at_default_level, make_inputs

import attnpool
from attnpool import reference

# Q·n = 24 > H + Q = 14: projects. Q·n = 4 <= 10: folds.
PROJECTING = dict(hidden=8, num_queries=6, num_heads=4)
FOLDING = dict(hidden=8, num_queries=2, num_heads=2)


def _inputs(batch=3, seq_len=7, *, hidden, num_queries, num_heads, **kwargs):
    return make_inputs(batch, seq_len, hidden, num_queries, **kwargs), num_heads


def _called_ops(inputs, num_heads):
    inputs = inputs.requiring_grad()
    with RecordedOps() as recorded:
        attnpool.attention_pool(*inputs.args(), num_heads=num_heads)
    return set(recorded.names)


def test_projects_only_where_it_costs_less():
    folded = _called_ops(*_inputs(**FOLDING))
    assert "attnpool._folded_attention_pool_forward" in folded
    assert not any("scaled_dot_product" in name for name in folded)
    projected = _called_ops(*_inputs(**PROJECTING))
    assert not any(name.startswith("attnpool.") for name in projected), projected
    assert any("scaled_dot_product" in name for name in projected), projected


def _call_recording_softmax(inputs, num_heads):
    """attention_pool's output, the ops it called by name, and the (scores,
    weights) of each _softmax_without_subnormals it called."""
    softmaxes = []

    class Recorded(RecordedOps):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if str(func.overloadpacket) == "attnpool._softmax_without_subnormals":
                softmaxes.append((args[0], out))
            return out

    with Recorded() as recorded:
        out = attnpool.attention_pool(*inputs.args(), num_heads=num_heads)
    return out, recorded.names, softmaxes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_on_the_cpu_scores_in_float32_for_gradients(dtype):
    # SDPA's CPU kernel was slower than plain products with float32 scores
    # for bfloat16 (forward+backward), and rounded its scores to it: its
    # gradients missed the bfloat16 tolerance here. float32 keeps SDPA.
    inputs, num_heads = _inputs(**PROJECTING)
    inputs = inputs.to(dtype=dtype, param_dtype=torch.float32).requiring_grad()
    out, names, softmaxes = _call_recording_softmax(inputs, num_heads)
    sdpa = any("scaled_dot_product" in name for name in names)
    assert sdpa == (dtype == torch.float32), names
    assert [scores.dtype for scores, _ in softmaxes] == ([] if sdpa else [torch.float32])
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, [inputs.x, inputs.query, inputs.w_q, inputs.w_k], grad_out)
    in_float64 = inputs.to(dtype=torch.float64).requiring_grad()
    want_out = reference.attention_pool(*in_float64.args(), num_heads=num_heads)
    want = torch.autograd.grad(
        want_out,
        [in_float64.x, in_float64.query, in_float64.w_q, in_float64.w_k],
        grad_out.double(),
    )
    torch.testing.assert_close(out.double(), want_out, **TOLERANCES[dtype])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, **TOLERANCES[dtype])


def test_bfloat16_training_on_scores_far_apart_cuts_tiny_weights():
    # Scores 30 apart leave weights under 2^-100, which the softmax sets to 0
    # (test_softmax_without_subnormals.py): with them kept, subnormal, CoCa's
    # pooler trained 17x slower there (benchmarks/score_spread.py).
    inputs, num_heads = _inputs(**PROJECTING)
    inputs = inputs.to(dtype=torch.bfloat16, param_dtype=torch.float32)
    inputs.query.mul_(30.0)
    inputs = inputs.requiring_grad()
    out, _, softmaxes = _call_recording_softmax(inputs, num_heads)
    [(scores, weights)] = softmaxes
    tiny = torch.finfo(torch.float32).tiny

    def subnormal(w):
        return ((w > 0) & (w < tiny)).any()

    assert subnormal(torch.softmax(scores, -1)) and not subnormal(weights)
    grads = torch.autograd.grad(out.float().sum(), [inputs.x, inputs.query, inputs.w_q, inputs.w_k])
    assert all(g.isfinite().all() for g in grads)


def test_bfloat16_inference_on_the_cpu_takes_sdpa_with_amx():
    # Without gradients, SDPA serves bfloat16 where it multiplies on AMX
    # tiles (the CPU kernels' level AMX_BF16), 2.4x faster than the products
    # at CoCa's pooler; below, the products with float32 scores.
    # (Under no_grad the op runs whole, below Python's dispatch modes: the
    # profiler sees the ATen ops inside it.)
    inputs, num_heads = _inputs(**PROJECTING)
    inputs = inputs.to(dtype=torch.bfloat16, param_dtype=torch.float32)
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = attnpool.attention_pool(*inputs.args(), num_heads=num_heads)
    names = [event.name for event in prof.events()]
    sdpa = any("scaled_dot_product" in name for name in names)
    assert sdpa == (attnpool._C.cpu_kernel_isa() == "AMX_BF16"), names
    want = reference.attention_pool(*inputs.to(dtype=torch.float64).args(), num_heads=num_heads)
    torch.testing.assert_close(out.double(), want, **TOLERANCES[torch.bfloat16])


LOWERED_SCRIPT = """
import torch

import attnpool

torch.manual_seed(0)
x = torch.randn(3, 7, 8).bfloat16()
query, w_q, w_k = torch.randn(6, 8), torch.randn(8, 8), torch.randn(8, 8)
with torch.no_grad(), torch.profiler.profile() as prof:
    attnpool.attention_pool(x, query, w_q, w_k, num_heads=4)
names = [event.name for event in prof.events()]
print(attnpool._C.cpu_kernel_isa(), any("scaled_dot_product" in n for n in names))
"""


def test_bfloat16_inference_below_amx_scores_in_float32():
    # The other side of the test above on a CPU with AMX: with the kernels
    # lowered, no SDPA for bfloat16.
    assert last_line_at_default_level(LOWERED_SCRIPT).split() == ["DEFAULT", "False"]


def _masking(kind, batch, seq_len, device):
    gen = torch.Generator().manual_seed(1)
    if kind == "none":
        return {}
    if kind == "mask":
        mask = torch.rand(batch, seq_len, generator=gen) > 0.3
        mask[1] = False  # a row with nothing to attend
        return dict(mask=mask.to(device))
    if kind == "lengths":
        return dict(lengths=torch.tensor([seq_len, 0, 3], device=device))
    if kind == "lowest-float":
        # As peers pad (SPEC.md §7): row 1 a uniform average, row 2 past 4.
        bias = torch.zeros(batch, seq_len, dtype=torch.float64)
        bias[1] = torch.finfo(torch.float32).min
        bias[2, 4:] = torch.finfo(torch.float32).min
        return dict(attn_bias=bias.to(device))
    bias = torch.randn(batch, seq_len, generator=gen, dtype=torch.float64)
    bias[0, 2] = float("-inf")
    bias[2] = float("-inf")  # a row whose every score is -inf
    return dict(attn_bias=bias.to(device))


MASKINGS = ["none", "mask", "lengths", "attn_bias", "lowest-float"]


def _softmax_input_shapes(pool):
    """Runs pool() under no_grad and returns the input shapes of its softmaxes
    (the projection path's softmax without subnormals, whose CPU kernel calls
    no aten::_softmax from AVX2 up)."""
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
        out = pool()
    name = "attnpool::_softmax_without_subnormals"
    shapes = [event.input_shapes[0] for event in prof.events() if event.name == name]
    return out, shapes


@pytest.mark.skipif(
    attnpool._C.cpu_kernel_isa() == "AMX_BF16", reason="SDPA serves bfloat16 inference on AMX"
)
@pytest.mark.parametrize("masking", MASKINGS)
def test_bfloat16_inference_pools_sequence_by_sequence_as_training_does(masking):
    # Inference takes the float32 scores of one sequence at a time, all heads
    # at once, so that they stay in cache; the values are those the training
    # path computes for the whole batch, bit for bit.
    batch, seq_len = 3, 7
    inputs, num_heads = _inputs(batch, seq_len, **PROJECTING)
    inputs = inputs.to(dtype=torch.bfloat16, param_dtype=torch.float32)
    extra = _masking(masking, batch, seq_len, "cpu")
    extra = {k: v.float() if v.is_floating_point() else v for k, v in extra.items()}
    args = inputs.args()[:4]
    got, shapes = _softmax_input_shapes(
        lambda: attnpool.attention_pool(*args, num_heads=num_heads, **extra)
    )
    num_queries = PROJECTING["num_queries"]
    assert shapes == [[num_heads, num_queries, seq_len]] * batch
    query = inputs.query.clone().requires_grad_()
    trained = attnpool.attention_pool(args[0], query, *args[2:], num_heads=num_heads, **extra)
    assert torch.equal(got, trained.detach())
    in_float64 = inputs.to(dtype=torch.float64)
    extra = {k: v.double() if v.is_floating_point() else v for k, v in extra.items()}
    want = reference.attention_pool(*in_float64.args()[:4], num_heads=num_heads, **extra)
    torch.testing.assert_close(got.double(), want, **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masking", MASKINGS)
def test_values_and_gradients_match_reference_float64(device, masking):
    inputs, num_heads = _inputs(**PROJECTING, device=device)
    extra = _masking(masking, 3, 7, device)
    grads = []
    for impl in (attnpool, reference):
        leaves = inputs.requiring_grad()
        out = impl.attention_pool(*leaves.args()[:4], num_heads=num_heads, **extra)
        out.backward(
            torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=device).view_as(out)
        )
        grads.append(
            (out.detach(), leaves.x.grad, leaves.query.grad, leaves.w_q.grad, leaves.w_k.grad)
        )
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows_pool_to_zero_with_zero_gradient(device):
    inputs, num_heads = _inputs(**PROJECTING, device=device)
    leaves = inputs.requiring_grad()
    lengths = torch.tensor([7, 0, 3], device=device)
    out = attnpool.attention_pool(*leaves.args()[:4], num_heads=num_heads, lengths=lengths)
    out.sum().backward()
    assert out[1].abs().max() == 0
    assert leaves.x.grad[1].abs().max() == 0
    assert leaves.x.grad[2, 3:].abs().max() == 0
    assert torch.isfinite(leaves.w_k.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_positions_past_lengths_are_never_read(device):
    inputs, num_heads = _inputs(**PROJECTING, device=device)
    lengths = torch.tensor([7, 2, 3], device=device)
    clean = attnpool.attention_pool(*inputs.args()[:4], num_heads=num_heads, lengths=lengths)
    inputs.x[1, 2:] = float("nan")
    inputs.x[2, 3:] = float("inf")
    dirty = attnpool.attention_pool(*inputs.args()[:4], num_heads=num_heads, lengths=lengths)
    assert torch.equal(clean, dirty)


def test_gradcheck_and_forward_mode():
    inputs, num_heads = _inputs(2, 5, **PROJECTING, mask="random")
    leaves = inputs.requiring_grad()
    torch.autograd.gradcheck(
        lambda x, q, w_q, w_k: attnpool.attention_pool(
            x, q, w_q, w_k, inputs.mask, num_heads=num_heads
        ),
        (leaves.x, leaves.query, leaves.w_q, leaves.w_k),
        check_forward_ad=True,
    )


def test_forward_mode_with_a_bias_matches_reference():
    inputs, num_heads = _inputs(**PROJECTING)
    bias = _masking("attn_bias", 3, 7, "cpu")["attn_bias"].clamp(min=-30)
    tangent = torch.randn_like(inputs.x)

    def pool(impl):
        return lambda x: impl.attention_pool(
            x, inputs.query, inputs.w_q, inputs.w_k, num_heads=num_heads, attn_bias=bias
        )

    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(inputs.x, tangent)
        got = torch.autograd.forward_ad.unpack_dual(pool(attnpool)(dual)).tangent
    want = torch.func.jvp(pool(reference), (inputs.x,), (tangent,))[1]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masking", ["mask", "attn_bias"])
def test_reduced_precision_with_float32_parameters(device, dtype, masking):
    inputs, num_heads = _inputs(4, 33, hidden=32, num_queries=12, num_heads=8, device=device)
    inputs = inputs.to(dtype=dtype, param_dtype=torch.float32)
    extra = _masking(masking, 4, 33, device)
    extra = {k: v.float() if v.is_floating_point() else v for k, v in extra.items()}
    got = attnpool.attention_pool(*inputs.args()[:4], num_heads=num_heads, **extra)
    assert got.dtype == dtype
    in_float64 = inputs.to(dtype=torch.float64)
    extra = {k: v.double() if v.is_floating_point() else v for k, v in extra.items()}
    want = reference.attention_pool(*in_float64.args()[:4], num_heads=num_heads, **extra)
    torch.testing.assert_close(got.double(), want, **TOLERANCES[dtype])


def test_compiles_with_dynamic_shapes():
    inputs, num_heads = _inputs(**PROJECTING, mask="random")

    @torch.compile(fullgraph=True, dynamic=True)
    def pool(x, mask):
        return attnpool.attention_pool(
            x, inputs.query, inputs.w_q, inputs.w_k, mask, num_heads=num_heads
        )

    for batch, seq_len in ((3, 7), (2, 5)):
        x, mask = inputs.x[:batch, :seq_len], inputs.mask[:batch, :seq_len]
        want = reference.attention_pool(
            x, inputs.query, inputs.w_q, inputs.w_k, mask, num_heads=num_heads
        )
        torch.testing.assert_close(pool(x, mask), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(0, 7), (3, 0)], ids=["no-rows", "empty-sequences"])
def test_empty_inputs(shape):
    inputs, num_heads = _inputs(*shape, **PROJECTING)
    out = attnpool.attention_pool(*inputs.args(), num_heads=num_heads)
    assert out.shape == (shape[0], PROJECTING["num_queries"], PROJECTING["hidden"])
    assert (out == 0).all()
