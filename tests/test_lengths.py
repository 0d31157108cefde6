"""lengths (SPEC.md §6): right-padded [B, L, H] batches with lengths [B]. Rows past
a length are never read (NaN there changes nothing) and get zero gradients; the
result is the mask l < lengths[b], bit for bit, in every op and module."""

import pytest
import torch
from helpers import DEVICES, TOLERANCES, make_inputs

import attnpool
from attnpool import reference

LENGTHS = [5, 0, 3, 9]  # one empty sequence, one longer than L = 7 (all of it)


def _padded(device="cpu", dtype=torch.float64, num_queries=2):
    """Inputs whose rows past each length are NaN, and those lengths."""
    inputs = make_inputs(4, 7, 8, num_queries, dtype=dtype, device=device)
    lengths = torch.tensor(LENGTHS, device=device)
    padding = torch.arange(7, device=device) >= lengths[:, None]
    inputs.x[padding] = float("nan")
    return inputs, lengths, ~padding


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("full_width", [False, True], ids=["slices", "full-width"])
def test_equals_the_mask_and_never_reads_the_padding(device, dtype, full_width):
    inputs, lengths, mask = _padded(device, dtype)
    u = attnpool.fold_query(inputs.query, inputs.w_q, inputs.w_k, 2)
    got = attnpool.folded_attention_pool(inputs.x, u, None, 0.5, full_width, None, lengths)
    assert not got.isnan().any()
    masked = attnpool.folded_attention_pool(inputs.x, u, mask, 0.5, full_width)
    assert torch.equal(got, masked)
    want = reference.folded_attention_pool(
        inputs.x.double(), u.double(), None, 0.5, full_width, None, lengths
    )
    torch.testing.assert_close(got.double(), want, **TOLERANCES[dtype])
    assert torch.equal(got[1], torch.zeros_like(got[1]))


@pytest.mark.parametrize("device", DEVICES)
def test_rows_of_odd_width_never_read_the_next_row(device):
    # 13 scores of bfloat16 rows of 41 values: AVX512_BF16 reads a row in
    # pairs ([Note: scores from u's tiles by vdpbf16ps]), and its last pair
    # holds one value; the next row's first, NaN here, must stay unread.
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor(LENGTHS, device=device)
    x = torch.randn(4, 7, 41, generator=gen).to(device, torch.bfloat16)
    x[torch.arange(7, device=device) >= lengths[:, None]] = float("nan")
    u = (torch.randn(13, 1, 41, generator=gen) / 4).to(device)
    leaf = x.clone().requires_grad_()
    got = attnpool.folded_attention_pool(leaf, u, lengths=lengths)
    got.float().pow(2).sum().backward()
    assert not got.isnan().any()
    assert not leaf.grad.isnan().any()
    want = reference.folded_attention_pool(x.nan_to_num(0.0).double(), u.double(), lengths=lengths)
    torch.testing.assert_close(got.double(), want, **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_are_zero_past_each_length(device):
    inputs, lengths, mask = _padded(device)
    inputs.x[~mask] = 0.0  # the reference's gradient would be NaN next to NaN
    grads = {}
    for name, kwargs in (("lengths", dict(lengths=lengths)), ("mask", dict(mask=mask))):
        leaves = inputs.requiring_grad()
        out = attnpool.attention_pool(
            leaves.x, leaves.query, leaves.w_q, leaves.w_k, num_heads=2, **kwargs
        )
        out.pow(2).sum().backward()
        grads[name] = [t.grad for t in (leaves.x, leaves.query, leaves.w_q, leaves.w_k)]
    for got, want in zip(grads["lengths"], grads["mask"], strict=True):
        assert torch.equal(got, want)
    assert torch.equal(grads["lengths"][0][~mask], torch.zeros_like(inputs.x[~mask]))
    leaves = inputs.requiring_grad()
    gradcheck_inputs = (leaves.x, leaves.query, leaves.w_q, leaves.w_k)
    assert torch.autograd.gradcheck(
        lambda *a: attnpool.attention_pool(*a, num_heads=2, lengths=lengths), gradcheck_inputs
    )


def test_modules_take_lengths():
    inputs, lengths, mask = _padded(num_queries=None)
    pooling = attnpool.AttentionPooling(8, 2, 3).double()
    assert torch.equal(pooling(inputs.x, lengths=lengths), pooling(inputs.x, mask))
    head = attnpool.MultiheadAttentionPooling(8, 2, 3).double()
    with torch.no_grad():
        head.in_proj_bias.normal_()
        head.out_proj.bias.normal_()
    out = head(inputs.x, lengths=lengths)
    assert torch.equal(out, head(inputs.x, mask))
    torch.testing.assert_close(out[1], head.out_proj.bias.expand(3, -1), rtol=0, atol=0)


def test_func_vmap_over_lengths_equals_a_loop():
    inputs, _, _ = _padded()
    x = inputs.x.nan_to_num(0.0)
    u = attnpool.fold_query(inputs.query, inputs.w_q, inputs.w_k, 2)
    batches = torch.tensor([[1, 2, 3, 4], [7, 0, 7, 2]])

    def pool(lengths):
        return attnpool.folded_attention_pool(x, u, None, 0.5, False, None, lengths)

    got = torch.func.vmap(pool)(batches)
    torch.testing.assert_close(got, torch.stack([pool(b) for b in batches]))
    xs = torch.stack([x, 2 * x])
    both = torch.func.vmap(
        lambda x, lengths: attnpool.folded_attention_pool(x, u, None, 0.5, False, None, lengths)
    )(xs, batches)
    loop = [
        attnpool.folded_attention_pool(a, u, None, 0.5, False, None, b)
        for a, b in zip(xs, batches, strict=True)
    ]
    torch.testing.assert_close(both, torch.stack(loop))


def test_opcheck_with_lengths():
    inputs, lengths, _ = _padded()
    x = inputs.x.nan_to_num(0.0).requires_grad_()
    u = attnpool.fold_query(inputs.query, inputs.w_q, inputs.w_k, 2).detach().requires_grad_()
    torch.library.opcheck(
        torch.ops.attnpool.folded_attention_pool.default, (x, u, None, 0.5, False, None, lengths)
    )
    leaves = inputs.requiring_grad()
    args = (leaves.x.detach().nan_to_num(0.0), leaves.query, leaves.w_q, leaves.w_k)
    torch.library.opcheck(
        torch.ops.attnpool.attention_pool.default, (*args, None, 2, None, None, lengths)
    )


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("num_queries", [1, 64], ids=["fold", "projection"])
def test_narrow_integer_lengths_count_positions_past_their_range(dtype, num_queries):
    # L = 300 > 255: positions counted in the lengths' own dtype would wrap.
    seq_len, longest = 300, 200 if dtype == torch.uint8 else 100
    inputs = make_inputs(2, seq_len, 8, num_queries)
    lengths = torch.tensor([longest, 7])
    inputs.x[torch.arange(seq_len) >= lengths[:, None]] = float("nan")
    got = attnpool.attention_pool(*inputs.args()[:4], None, 2, None, None, lengths.to(dtype))
    want = attnpool.attention_pool(*inputs.args()[:4], None, 2, None, None, lengths)
    assert not got.isnan().any()
    assert torch.equal(got, want)
    u = attnpool.fold_query(inputs.query, inputs.w_q, inputs.w_k, 2)
    got = attnpool.folded_attention_pool(inputs.x, u, None, 0.5, False, None, lengths.to(dtype))
    assert torch.equal(
        got, attnpool.folded_attention_pool(inputs.x, u, None, 0.5, False, None, lengths)
    )


def test_errors_name_lengths():
    inputs, lengths, mask = _padded()
    u = attnpool.fold_query(inputs.query, inputs.w_q, inputs.w_k, 2)
    pool = attnpool.folded_attention_pool
    with pytest.raises(ValueError, match="pass at most one of mask and lengths"):
        pool(inputs.x, u, mask, 1.0, False, None, lengths)
    with pytest.raises(ValueError, match=r"lengths must have shape \[B\] = \[4\], got \[2\]"):
        pool(inputs.x, u, None, 1.0, False, None, lengths[:2])
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        pool(inputs.x, u, None, 1.0, False, None, lengths.float())
    with pytest.raises(TypeError, match="lengths must be a Tensor"):
        pool(inputs.x, u, None, 1.0, False, None, LENGTHS)
    with pytest.raises(ValueError, match="attention_pool: pass at most one of mask and lengths"):
        attnpool.attention_pool(*inputs.args()[:4], mask, 2, None, None, lengths)


def test_large_padded_gradient_is_exact_on_zero_pages():
    # A dx of 42 MB, 85% padding: the CPU backward maps it as zero pages
    # and writes only the attended rows ([Note: dx on zero pages]). It must
    # still be an ordinary tensor: zeros past each length, the packed
    # gradient elsewhere, and usable by what comes next (in place, twice).
    torch.manual_seed(0)
    lengths = torch.tensor([700, 0, 1, 1750])
    x = torch.randn(4, 4096, 640).requires_grad_()
    query, w_q, w_k = torch.randn(640), torch.randn(640, 640) / 25, torch.randn(640, 640) / 25
    for _ in range(2):  # the second backward accumulates into x.grad
        attnpool.attention_pool(x, query, w_q, w_k, lengths=lengths).pow(2).sum().backward()
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    rows = torch.cat([x.detach()[b, : lengths[b]] for b in range(4)])
    packed = rows.requires_grad_()
    attnpool.attention_pool_varlen(packed, query, w_q, w_k, cu_seqlens=offsets).pow(
        2
    ).sum().backward()
    padding = torch.arange(4096)[None, :] >= lengths[:, None]
    assert torch.equal(x.grad[padding], torch.zeros_like(x.grad[padding]))
    torch.testing.assert_close(x.grad[~padding], 2 * packed.grad, **TOLERANCES[torch.float32])
    x.grad.mul_(0.5).add_(1.0)
    assert x.grad[padding].eq(1.0).all()


def test_threads_split_a_padded_batch_by_rows_and_give_the_same_bits():
    # Seven short sequences and one that fills L = 600 (64-wide rows: one
    # work item each): the CPU forward hands threads runs of items holding
    # about the same number of attended rows, here the seven short ones to
    # one thread and the long one to another. Which thread runs an item must
    # not change a bit, forward, backward or jvp.
    lengths = torch.tensor([9, 3, 12, 0, 7, 5, 11, 600])
    x = torch.randn(8, 600, 64)
    u = torch.randn(2, 64)
    tangents = (torch.randn_like(x), torch.randn_like(u))
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            x_leaf, u_leaf = x.clone().requires_grad_(), u.clone().requires_grad_()
            out = attnpool.folded_attention_pool(x_leaf, u_leaf, None, 0.125, False, None, lengths)
            out.pow(2).sum().backward()
            _, tangent = torch.func.jvp(
                lambda a, b: attnpool.folded_attention_pool(
                    a, b, None, 0.125, False, None, lengths
                ),
                (x, u),
                tangents,
            )
            results.append((out, x_leaf.grad, u_leaf.grad, tangent))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            assert torch.equal(got, want)
    want = reference.folded_attention_pool(
        x.double(), u.double(), None, 0.125, False, None, lengths
    )
    torch.testing.assert_close(results[0][0].double(), want, **TOLERANCES[torch.float32])
