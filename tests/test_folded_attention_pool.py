"""folded_attention_pool (SPEC.md §5): values and gradients against the float64
reference, both output modes, empty rows, mixed precision, and its place in
attention_pool (the composition, u saved for the backward)."""

import os

import pytest
import torch
from helpers import CUDA_SKIP_REASON, DEVICES, TOLERANCES, RecordedOps, make_inputs

import attnpool
from attnpool import reference

# (B, L, H, Q, n); Q None: a 2-D u [n, H] (output without the Q dimension).
# q17-one-head: scored by columns on every instruction set (several vectors of
# lanes, several tiles of rows, a short last one, columns past the last whole
# vector); its 16-bit rows, and q9-one-head's, by dot products into lanes
# (float32 too where a vector has 16 lanes): tiles of 24 rows, a short last one,
# bfloat16 sums 32 columns at a time from products and the rest as float32 does.
SHAPES = [
    (2, 5, 8, None, 1),
    (3, 7, 12, 2, 3),
    (2, 9, 16, 3, 4),
    (1, 40, 6, 1, 2),
    (2, 30, 42, 17, 1),
    (2, 50, 36, 9, 1),
]
SHAPE_IDS = [
    "1d-query",
    "q2-heads3",
    "q3-heads4",
    "q1-heads2-long",
    "q17-one-head",
    "q9-one-head",
]
GRADCHECK_SHAPES = [0, 1, 2, 4]


def _folded_inputs(batch, seq_len, hidden, num_queries, num_heads, *, mask=None, device="cpu"):
    """(x, u, mask) in float64: u from random weights, as fold_query makes it."""
    inputs = make_inputs(batch, seq_len, hidden, num_queries, mask=mask, device=device)
    u = reference.fold_query(inputs.query, inputs.w_q, inputs.w_k, num_heads)
    return inputs.x, u, inputs.mask


def _reference64(x, u, mask, scale, full_width):
    return reference.folded_attention_pool(x.double(), u.double(), mask, scale, full_width)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("full_width", [False, True], ids=["slices", "full-width"])
@pytest.mark.parametrize(
    "dtype, u_dtype",
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
    ids=["f64", "f32", "bf16-x-f32-u", "f16-x-f32-u", "bf16"],
)
def test_matches_float64_reference(device, shape, masked, full_width, dtype, u_dtype):
    x, u, mask = _folded_inputs(*shape, mask="random" if masked else None, device=device)
    x, u = x.to(dtype), u.to(u_dtype)
    out = attnpool.folded_attention_pool(x, u, mask, 0.7, full_width)
    batch, _, hidden, num_queries, num_heads = shape
    expected_shape = [batch] + ([] if num_queries is None else [num_queries])
    expected_shape += ([num_heads] if full_width else []) + [hidden]
    assert list(out.shape) == expected_shape and out.dtype == dtype
    expected = _reference64(x, u, mask, 0.7, full_width)
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("full_width", [False, True], ids=["slices", "full-width"])
@pytest.mark.parametrize(
    "shape", [SHAPES[i] for i in GRADCHECK_SHAPES], ids=[SHAPE_IDS[i] for i in GRADCHECK_SHAPES]
)
def test_gradcheck(device, full_width, shape):
    x, u, mask = _folded_inputs(*shape, mask="random", device=device)
    x.requires_grad_(True)
    u.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, u: attnpool.folded_attention_pool(x, u, mask, 0.8, full_width), (x, u)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("full_width", [False, True], ids=["slices", "full-width"])
def test_gradients_match_reference_on_long_sequences(device, full_width):
    # Long enough that the kernels cut each sequence into pieces.
    x, u, mask = _folded_inputs(2, 3000, 16, 2, 2, mask="random", device=device)
    leaves = (x.requires_grad_(True), u.requires_grad_(True))
    out = attnpool.folded_attention_pool(x, u, mask, 0.5, full_width)
    weights = torch.randn_like(out)
    got = torch.autograd.grad((out * weights).sum(), leaves)
    expected = reference.folded_attention_pool(x, u, mask, 0.5, full_width)
    want = torch.autograd.grad((expected * weights).sum(), leaves)
    for name, g, w in zip(("x", "u"), got, want, strict=True):
        torch.testing.assert_close(g, w, **TOLERANCES[torch.float64], msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("full_width", [False, True], ids=["slices", "full-width"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"]
)
def test_gradients_of_many_scores_of_one_head_match_reference(device, full_width, dtype):
    # Nine scores of one head over sequences cut into pieces, tiles of 24 rows:
    # the forward scores them by dot products into lanes (rows of 16 bits; float32
    # where a vector has 16 lanes), sums bfloat16 rows from products where the
    # CPU has them, and the backward rebuilds the softmax from the log-sum-exp
    # that forward saved.
    x, u, mask = _folded_inputs(2, 2000, 40, 9, 1, mask="random", device=device)
    x = x.to(dtype).requires_grad_(True)
    u = u.float().requires_grad_(True)
    _assert_matches_reference64(x, u, mask, 0.5, full_width)


@pytest.mark.parametrize("full_width", [False, True], ids=["slices", "full-width"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gradients_of_several_queries_and_heads_match_reference(full_width, dtype):
    # 4 queries x 3 heads of 10 columns, scored by columns: the CPU backward
    # takes tiles of 24 rows as matrix products ([Note: the backward by
    # columns], csrc/ops/cpu/isa/backward.h). Sequences cut into pieces, masked
    # rows between a tile's rows, a fully masked sequence, short last tiles,
    # slices of no whole vector, an additive bias.
    x, u, mask = _folded_inputs(3, 1000, 30, 4, 3, mask="random")
    bias = torch.randn(3, 1000, dtype=torch.float64)
    x = x.to(dtype).requires_grad_(True)
    u = u.to(dtype).requires_grad_(True)
    _assert_matches_reference64(x, u, mask, 0.5, full_width, bias.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "num_queries, num_heads, head_dim",
    [(1, 12, 64), (1, 3, 16), (2, 2, 48), (3, 2, 32), (4, 3, 128), (8, 2, 64), (2, 2, 144)],
)
def test_head_slices_of_whole_vectors_match_reference(num_queries, num_heads, head_dim, dtype):
    # Slices of 1 to 8 whole vectors take sums of several heads or queries
    # per pass on the CPU (add_head_slices_in_groups, csrc/ops/cpu/isa/
    # u_columns.h): 1, 2 or 4 queries at a time, one head or several per
    # block, and a last block of one head; 144 columns (9 vectors) take the
    # sums per head slice instead. Masked rows, a short last tile.
    hidden = num_heads * head_dim
    x, u, mask = _folded_inputs(2, 45, hidden, num_queries, num_heads, mask="random")
    x = x.to(dtype).requires_grad_(True)
    u = u.to(dtype).requires_grad_(True)
    _assert_matches_reference64(x, u, mask, 0.3, False)


@pytest.mark.parametrize("full_width", [False, True], ids=["slices", "full-width"])
def test_rows_read_in_place_or_copied_give_the_same_bits(full_width):
    # Bfloat16 rows with several scores: on AMX_BF16 the tiles read evenly
    # spaced rows, each on a cache line, in place; rows one value off the
    # line, or with a masked row between them, are copied first ([Note:
    # scores on AMX tiles], csrc/ops/cpu/isa/amx_scores.h). The same values
    # must give the same outputs and gradients either way.
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(1, 70, 64, generator=gen).bfloat16()
    u = (torch.randn(4, 2, 64, generator=gen) / 8).bfloat16()

    def pooled(x, mask=None):
        x = x.detach().requires_grad_(True)
        u_ = u.clone().requires_grad_(True)
        out = attnpool.folded_attention_pool(x, u_, mask, 0.5, full_width)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
        (out.float() * weights).sum().backward()
        return out, x.grad, u_.grad

    in_place = pooled(values)
    off_the_line = torch.zeros(1, 70, 65, dtype=torch.bfloat16)[..., 1:]
    off_the_line.copy_(values)
    for got, want in zip(pooled(off_the_line), in_place, strict=True):
        assert torch.equal(got, want)
    # Row 5 masked out, against the same sequence without it.
    mask = torch.ones(1, 70, dtype=torch.bool)
    mask[0, 5] = False
    masked = pooled(values, mask)
    without = pooled(values[:, mask[0]].contiguous())
    assert torch.equal(masked[0], without[0])
    assert torch.equal(masked[1][:, mask[0]], without[1])
    assert torch.equal(masked[2], without[2])


def _assert_matches_reference64(x, u, mask, scale, full_width, attn_bias=None):
    """folded_attention_pool's output and the gradients of x and u (under random
    output weights) against the float64 reference, within x's dtype's tolerance."""
    out = attnpool.folded_attention_pool(x, u, mask, scale, full_width, attn_bias)
    weights = torch.randn(out.shape, dtype=torch.float64, device=x.device)
    got = torch.autograd.grad((out.double() * weights).sum(), (x, u))
    x64, u64 = (t.detach().double().requires_grad_(True) for t in (x, u))
    bias64 = None if attn_bias is None else attn_bias.double()
    expected = reference.folded_attention_pool(x64, u64, mask, scale, full_width, bias64)
    want = torch.autograd.grad((expected * weights).sum(), (x64, u64))
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[x.dtype])
    for name, g, w in zip(("x", "u"), got, want, strict=True):
        torch.testing.assert_close(g.double(), w, **TOLERANCES[x.dtype], msg=name)


def _ops_inside(*args):
    """The ATen operators that folded_attention_pool(*args) calls, as the
    profiler sees them inside the op."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        attnpool.folded_attention_pool(*args)
    return {event.name for event in prof.events()}


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))
@pytest.mark.parametrize(
    "full_width, num_queries, num_heads, dtype",
    [
        (False, 16, 8, torch.float64),
        (True, 4, 9, torch.float64),
        (False, 16, 8, torch.bfloat16),
        (True, 4, 9, torch.bfloat16),
    ],
    ids=["slices-f64", "full-width-f64", "slices-bf16", "full-width-bf16"],
)
def test_large_calls_with_many_scores_run_as_matrix_products_on_cuda(
    full_width, num_queries, num_heads, dtype
):
    # 4 x 1024 x 1024 elements with 16 x 8 or (full width) 36 scores: past the
    # CUDA entry's threshold for matrix products, the softmax in its kernels
    # (36 scores: a second, partial block of columns), with a mask and a bias.
    # bfloat16 rows meet float32 u, weights and ds as two bfloat16 terms each.
    torch.manual_seed(0)
    x, u, mask = _folded_inputs(4, 1024, 1024, num_queries, num_heads, mask="random", device="cuda")
    bias = torch.randn(4, 1024, dtype=torch.float64, device="cuda")
    bias[:, ::7] = float("-inf")
    x = x.to(dtype).requires_grad_(True)
    u = (u if dtype == torch.float64 else u.float()).requires_grad_(True)
    bias = bias.to(u.dtype)
    args = (mask, 0.5, full_width, bias)
    inside = _ops_inside(x.detach(), u.detach(), *args)
    assert {"aten::mm", "aten::bmm"} & inside, "products"
    assert "aten::amax" not in inside, "the softmax runs in its kernels, not in operators"
    small = (x.detach()[:1, :64], u.detach(), mask[:1, :64], 0.5, full_width, bias[:1, :64])
    assert not {"aten::mm", "aten::bmm"} & _ops_inside(*small), "a small call takes the kernels"
    _assert_matches_reference64(x, u, *args)


def _cuda_kernels_inside(*args):
    """The CUDA kernels that the forward and backward of
    folded_attention_pool(*args) launch, as the profiler names them."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        out = attnpool.folded_attention_pool(*args)
        out.sum().backward()
        torch.cuda.synchronize()
    return " ".join(event.name for event in prof.events())


# The op reads ATTNPOOL_CUDA_TENSOR_CORES once per process ([Note: opting in
# to the tensor-core kernels]): these run where the whole run opts in, as
# scripts/gpu_check.sh's second pass over the CUDA tests does.
def _tensor_cores_skip_reason():
    if CUDA_SKIP_REASON is not None:
        return CUDA_SKIP_REASON
    if os.environ.get("ATTNPOOL_CUDA_TENSOR_CORES") != "1":
        return "the run does not opt in to the tensor-core kernels (ATTNPOOL_CUDA_TENSOR_CORES=1)"
    return None


TENSOR_CORES_SKIP_REASON = _tensor_cores_skip_reason()


@pytest.mark.skipif(TENSOR_CORES_SKIP_REASON is not None, reason=str(TENSOR_CORES_SKIP_REASON))
@pytest.mark.parametrize(
    "full_width, num_queries, num_heads",
    [
        (False, 1, 16),
        (False, 3, 4),
        (True, 2, 4),
        (False, 16, 1),
        (False, 4, 8),
        (False, 16, 4),
        (True, 4, 8),
    ],
    ids=["1x16", "3x4", "full-width-2x4", "16x1", "4x8", "16x4", "full-width-4x8"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_tensor_core_kernels_match_reference_on_cuda(full_width, num_queries, num_heads, dtype):
    # bfloat16 rows, or float32 as 3xTF32; a mask and a bias; sequences cut
    # into pieces; one score block (up to 16 scores: dx and du in one
    # launch) or several (a launch each). Both directions must take the
    # tensor-core kernels.
    torch.manual_seed(0)
    x, u, mask = _folded_inputs(3, 700, 256, num_queries, num_heads, mask="random", device="cuda")
    bias = torch.randn(3, 700, device="cuda")
    x = x.to(dtype).requires_grad_(True)
    u = u.float().requires_grad_(True)
    kernels = _cuda_kernels_inside(x, u, mask, 0.5, full_width, bias)
    assert "mma_forward_kernel" in kernels and "mma_backward_kernel" in kernels
    _assert_matches_reference64(x, u, mask, 0.5, full_width, bias)


@pytest.mark.skipif(TENSOR_CORES_SKIP_REASON is not None, reason=str(TENSOR_CORES_SKIP_REASON))
@pytest.mark.parametrize("num_queries, num_heads", [(2, 4), (3, 8)], ids=["2x4", "3x8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_tensor_core_kernels_leave_one_attended_row_no_score_gradient(
    num_queries, num_heads, dtype
):
    # delta = G . out from the products dp takes ([Note: the tensor-core
    # backward]): with one attended row, out is that row (float32: its two
    # tf32 terms summed) and du is exactly 0, with one score block and with
    # two (24 scores).
    torch.manual_seed(0)
    x, u, _ = _folded_inputs(2, 90, 128, num_queries, num_heads, device="cuda")
    mask = torch.zeros(2, 90, dtype=torch.bool, device="cuda")
    mask[:, 37] = True
    x = (3 * x).to(dtype).requires_grad_(True)
    u = u.float().requires_grad_(True)
    out = attnpool.folded_attention_pool(x, u, mask, 0.5, False)
    out.backward(torch.randn_like(out))
    assert u.grad.abs().max() == 0
    assert x.grad[:, 37].abs().max() > 0 and x.grad[:, 36].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("full_width", [False, True], ids=["slices", "full-width"])
def test_fully_masked_row_and_empty_sequence_are_zero(device, full_width):
    x, u, _ = _folded_inputs(3, 6, 8, 2, 2, device=device)
    mask = torch.ones(3, 6, dtype=torch.bool, device=device)
    mask[1] = False
    x.requires_grad_(True)
    u.requires_grad_(True)
    out = attnpool.folded_attention_pool(x, u, mask, 1.0, full_width)
    assert out[1].abs().max() == 0 and out[0].abs().max() > 0
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad[1].abs().max() == 0 and torch.isfinite(u.grad).all()

    empty = torch.zeros(3, 0, 8, dtype=torch.float64, device=device, requires_grad=True)
    out = attnpool.folded_attention_pool(empty, u, None, 1.0, full_width)
    assert out.shape[0] == 3 and out.abs().max() == 0
    out.sum().backward()
    assert empty.grad.shape == empty.shape


@pytest.mark.parametrize("device", DEVICES)
def test_full_width_with_heads_that_do_not_divide_the_width(device):
    # 3 heads over 8 columns: no slices, but each head pools the whole row.
    x, _, mask = _folded_inputs(2, 5, 8, 2, 1, mask="random", device=device)
    u = torch.randn(2, 3, 8, dtype=torch.float64, device=device)
    out = attnpool.folded_attention_pool(x, u, mask, 0.5, True)
    torch.testing.assert_close(out, _reference64(x, u, mask, 0.5, True))
    with pytest.raises(ValueError, match=r"u.shape\[-2\] = 3 must divide H = 8 unless full_width"):
        attnpool.folded_attention_pool(x, u, mask, 0.5, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_pool_is_the_composition(device, dtype):
    inputs = make_inputs(3, 11, 16, 2, mask="random", device=device).to(
        dtype=dtype, param_dtype=torch.float32
    )
    num_heads = 4
    u = attnpool.fold_query(inputs.query, inputs.w_q, inputs.w_k, num_heads)
    composed = attnpool.folded_attention_pool(inputs.x, u, inputs.mask, (16 / num_heads) ** -0.5)
    assert torch.equal(attnpool.attention_pool(*inputs.args(), num_heads), composed)


def test_backward_reads_the_saved_fold_instead_of_folding_again():
    inputs = make_inputs(2, 6, 8, 2, mask="random").requiring_grad()
    out = attnpool.attention_pool(*inputs.args(), 2)
    with RecordedOps() as recorded:
        out.sum().backward()
    attnpool_ops = [name for name in recorded.names if name.startswith("attnpool.")]
    assert "attnpool._folded_attention_pool_backward" in attnpool_ops
    assert "attnpool._fold_query_backward" in attnpool_ops
    assert not any("forward" in name or name == "attnpool.fold_query" for name in attnpool_ops)
    assert all(t.grad is not None for t in (inputs.x, inputs.query, inputs.w_q, inputs.w_k))
