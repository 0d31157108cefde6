"""attnpool.attention_pool against the reference (SPEC.md §1, §2)."""

import pytest
import torch
from helpers import DEVICES, TOLERANCES, make_inputs, reference_in_float64, scored_u

import attnpool

SHAPES = [(2, 5, 8), (3, 17, 24), (1, 1, 4), (4, 64, 32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("num_heads", [1, 2, 4])
@pytest.mark.parametrize("num_queries", [None, 1, 3], ids=["1d", "q1", "q3"])
def test_matches_reference_float64(device, shape, num_heads, num_queries):
    inputs = make_inputs(*shape, num_queries, mask="random", device=device)
    got = attnpool.attention_pool(*inputs.args(), num_heads=num_heads)
    want = attnpool.reference.attention_pool(*inputs.args(), num_heads=num_heads)
    expected_shape = (
        (shape[0], shape[2]) if num_queries is None else (shape[0], num_queries, shape[2])
    )
    assert got.shape == expected_shape
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [None, 0.25, 3.0])
def test_scale(device, scale):
    inputs = make_inputs(3, 11, 16, 2, mask="random", device=device, x_scale=2.0)
    got = attnpool.attention_pool(*inputs.args(), num_heads=2, scale=scale)
    want = attnpool.reference.attention_pool(*inputs.args(), num_heads=2, scale=scale)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])


def test_default_scale_is_inverse_sqrt_head_dim():
    inputs = make_inputs(2, 9, 16, mask="random")
    default = attnpool.attention_pool(*inputs.args(), num_heads=4)
    explicit = attnpool.attention_pool(*inputs.args(), num_heads=4, scale=0.5)
    other = attnpool.attention_pool(*inputs.args(), num_heads=4, scale=0.25)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert not torch.allclose(default, other)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "seq_len, hidden, batch",
    [(3000, 32, 1), (4096, 16, 2), (1500, 64, 3)],
    ids=["long-b1", "long-b2", "long-b3"],
)
def test_long_sequences_split_across_threads_match_reference(device, seq_len, hidden, batch):
    inputs = make_inputs(batch, seq_len, hidden, 2, device=device, x_scale=3.0)
    mask = torch.rand(batch, seq_len) > 0.5
    mask[0, : seq_len // 2] = False  # whole pieces of the sequence with nothing to attend
    inputs.mask = mask.to(device)
    got = attnpool.attention_pool(*inputs.args(), num_heads=2)
    torch.testing.assert_close(
        got, reference_in_float64(inputs, num_heads=2), **TOLERANCES[torch.float64]
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "mask_dtype", [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64]
)
def test_mask_nonzero_means_attend(device, mask_dtype):
    inputs = make_inputs(3, 7, 8, mask="random", device=device)
    as_bool = attnpool.attention_pool(*inputs.args())
    values = torch.where(inputs.mask, 3, 0).to(mask_dtype)  # any nonzero value attends
    as_dtype = attnpool.attention_pool(inputs.x, inputs.query, inputs.w_q, inputs.w_k, values)
    torch.testing.assert_close(as_dtype, as_bool, rtol=0, atol=0)
    torch.testing.assert_close(as_bool, reference_in_float64(inputs), **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
def test_masked_positions_do_not_change_the_output(device):
    inputs = make_inputs(2, 9, 8, mask="random", device=device)
    before = attnpool.attention_pool(*inputs.args())
    inputs.x = inputs.x.masked_fill(~inputs.mask[..., None], float("nan"))
    after = attnpool.attention_pool(*inputs.args())
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_queries", [None, 2], ids=["1d", "q2"])
def test_fully_masked_sequence_is_zero(device, num_queries):
    inputs = make_inputs(3, 6, 8, num_queries, device=device)
    inputs.mask = torch.ones(3, 6, dtype=torch.bool, device=device)
    inputs.mask[1] = False
    out = attnpool.attention_pool(*inputs.args(), num_heads=2)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].abs().sum() > 0 and out[2].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_empty_sequence_is_zero(device):
    inputs = make_inputs(3, 0, 8, 2, device=device)
    out = attnpool.attention_pool(*inputs.args(), num_heads=2)
    assert out.shape == (3, 2, 8)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_queries", [None, 2], ids=["1d", "q2"])
def test_empty_batch(device, num_queries):
    inputs = make_inputs(0, 5, 8, num_queries, device=device)
    out = attnpool.attention_pool(*inputs.args())
    assert out.shape == ((0, 8) if num_queries is None else (0, 2, 8))
    assert out.dtype == inputs.x.dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "layout", ["seq-strided", "batch-transposed", "hidden-strided", "expanded"]
)
def test_any_strides(device, layout):
    base = make_inputs(4, 10, 8, 2, mask="random", device=device)
    x = base.x
    if layout == "seq-strided":
        x = torch.stack([x, torch.full_like(x, float("nan"))], dim=2).flatten(1, 2)[:, ::2]
    elif layout == "batch-transposed":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "hidden-strided":
        x = torch.stack([x, -x], dim=-1)[..., 0]
    elif layout == "expanded":
        x = x[:1].expand(4, 10, 8)
    assert not x.is_contiguous()
    mask = torch.stack([base.mask, ~base.mask], dim=2).flatten(1, 2)[:, ::2]
    query = torch.stack([base.query, base.query], dim=-1)[..., 0]
    got = attnpool.attention_pool(x, query, base.w_q.t().contiguous().t(), base.w_k, mask, 2)
    want = attnpool.reference.attention_pool(
        x.contiguous(), base.query, base.w_q, base.w_k, base.mask, 2
    )
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mixed", [False, True], ids=["same-dtype", "float32-params"])
def test_reduced_precision(device, dtype, mixed):
    if dtype == torch.float32 and mixed:
        pytest.skip("float32 x with float32 parameters is the same-dtype case")
    inputs = make_inputs(4, 33, 32, 2, mask="random", device=device).to(
        dtype=dtype, param_dtype=torch.float32 if mixed else dtype
    )
    got = attnpool.attention_pool(*inputs.args(), num_heads=4)
    assert got.dtype == dtype
    torch.testing.assert_close(
        got.double(), reference_in_float64(inputs, num_heads=4), **TOLERANCES[dtype]
    )


@pytest.mark.parametrize(
    "batch, seq_len, num_heads, head_dim, num_queries",
    [(3, 37, 1, 64, None), (2, 21, 2, 32, 3), (4, 50, 3, 64, 2), (1, 1200, 2, 32, None)],
    ids=["one-head", "two-heads-q3", "three-heads-q2", "split-sequence"],
)
def test_bfloat16_rows_read_in_pairs_match_float64(
    batch, seq_len, num_heads, head_dim, num_queries
):
    # Head sizes that are multiples of 32 take the CPU forward's bfloat16 path
    # that widens x two halves at a time and keeps u and the sums in paired
    # order (one score), or the one that scores from bfloat16 products. Its
    # float32 output must agree with float64 on the same rounded inputs (u as
    # the kernels score against it) to float32 precision: any slip in the
    # pairing would be far off.
    hidden = num_heads * head_dim
    inputs = make_inputs(batch, seq_len, hidden, num_queries, mask="random").to(
        dtype=torch.bfloat16, param_dtype=torch.float32
    )
    u = attnpool.fold_query(inputs.query, inputs.w_q, inputs.w_k, num_heads)
    scale = (hidden // num_heads) ** -0.5
    out, lse = torch.ops.attnpool._folded_attention_pool_forward(
        inputs.x, u, inputs.mask, scale, False
    )
    assert out.dtype == torch.float32
    expected = attnpool.reference.folded_attention_pool(
        inputs.x.double(), scored_u(u, inputs.x).double(), inputs.mask, scale
    )
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)


def test_half_precision_accumulates_in_float32():
    # 4096 positions of equal weight: a float16 running sum would lose the
    # small contributions, a float32 one keeps them.
    x = torch.full((1, 4096, 8), 1.0, dtype=torch.float16)
    x[0, ::2] = 1.001
    w = torch.zeros(8, 8, dtype=torch.float16)
    out = attnpool.attention_pool(x, torch.ones(8, dtype=torch.float16), w, w)
    torch.testing.assert_close(out.float(), torch.full((1, 8), 1.0005), atol=1e-3, rtol=0)


def test_reports_cpu_instruction_set():
    assert attnpool._C.cpu_kernel_isa() in {"AMX_BF16", "AVX512_BF16", "AVX512", "AVX2", "DEFAULT"}


@pytest.mark.parametrize("device", DEVICES)
def test_zero_queries(device):
    inputs = make_inputs(2, 5, 8, 1, device=device).requiring_grad()
    inputs.query = inputs.query[:0].detach().requires_grad_(True)
    out = attnpool.attention_pool(*inputs.args())
    assert out.shape == (2, 0, 8)
    out.sum().backward()
    assert torch.equal(inputs.x.grad, torch.zeros_like(inputs.x))
    assert torch.equal(inputs.w_k.grad, torch.zeros_like(inputs.w_k))
    assert inputs.query.grad.shape == (0, 8)
