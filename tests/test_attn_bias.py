"""attn_bias (SPEC.md §2): an additive float [B, L] on every score, in every
kernel, forward and backward, against the float64 reference; -inf excludes a
position; peers' finfo.min masks; errors; opcheck; torch.func; the MAP head
against nn.MultiheadAttention with a float key_padding_mask."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from helpers import DEVICES, TOLERANCES, make_inputs
from torch import nn

import attnpool
from attnpool import reference

# (B, L, H, Q, n); Q None: a 2-D u. The long one is cut into pieces.
SHAPES = [(2, 5, 8, None, 1), (3, 7, 12, 2, 3), (2, 300, 16, 3, 4), (2, 50, 20, 17, 1)]
SHAPE_IDS = ["1d-query", "q2-heads3", "long-q3-heads4", "q17-one-head"]


def _case(batch, seq_len, hidden, num_queries, num_heads, *, device="cpu", masked=True, seed=0):
    """(x, u, mask, attn_bias) in float64; some biases -inf, x NaN there."""
    inputs = make_inputs(
        batch, seq_len, hidden, num_queries, mask="random" if masked else None, device=device
    )
    u = reference.fold_query(inputs.query, inputs.w_q, inputs.w_k, num_heads)
    gen = torch.Generator().manual_seed(seed + 1)
    bias = torch.randn(batch, seq_len, generator=gen, dtype=torch.float64) * 2
    excluded = torch.rand(batch, seq_len, generator=gen) > 0.8
    bias = bias.masked_fill(excluded, float("-inf")).to(device)
    x = inputs.x.masked_fill(excluded[..., None].to(device), float("nan"))
    return x, u, inputs.mask, bias


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("full_width", [False, True], ids=["slices", "full-width"])
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"]
)
def test_values_match_the_reference(device, shape, masked, full_width, dtype):
    x, u, mask, bias = _case(*shape, device=device, masked=masked)
    x = x.to(dtype)
    u = u.to(torch.float64 if dtype == torch.float64 else torch.float32)
    out = attnpool.folded_attention_pool(x, u, mask, 0.7, full_width, bias.to(u.dtype))
    want = reference.folded_attention_pool(x.double(), u.double(), mask, 0.7, full_width, bias)
    assert not want.isnan().any()
    torch.testing.assert_close(out.double(), want, **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("full_width", [False, True], ids=["slices", "full-width"])
def test_gradients_match_the_reference(device, shape, full_width):
    x, u, mask, bias = _case(*shape, device=device)
    x = x.nan_to_num(0.0)  # the reference's gradient of a NaN input is NaN

    def grads(module):
        xs, us = x.clone().requires_grad_(), u.clone().requires_grad_()
        out = module.folded_attention_pool(xs, us, mask, 0.7, full_width, bias)
        out.backward(grad_out)
        return xs.grad, us.grad

    gen = torch.Generator().manual_seed(3)
    out_shape = attnpool.folded_attention_pool(x, u, mask, 0.7, full_width, bias).shape
    grad_out = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(device)
    got, want = grads(attnpool), grads(reference)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])
    excluded = bias == float("-inf")
    assert torch.equal(got[0][excluded], torch.zeros_like(got[0][excluded]))


def test_gradcheck_with_a_bias():
    x, u, mask, bias = _case(2, 6, 8, 2, 2)
    x = x.nan_to_num(0.0).requires_grad_()
    u = u.requires_grad_()
    for full_width in (False, True):
        assert torch.autograd.gradcheck(
            lambda x, u, fw=full_width: attnpool.folded_attention_pool(x, u, mask, 0.7, fw, bias),
            (x, u),
        )


def test_attention_pool_takes_the_bias_too():
    x, _, mask, bias = _case(3, 7, 12, 2, 3)
    inputs = make_inputs(3, 7, 12, 2)
    args = (x, inputs.query, inputs.w_q, inputs.w_k, mask, 3, None, bias)
    torch.testing.assert_close(attnpool.attention_pool(*args), reference.attention_pool(*args))


def test_a_row_excluded_everywhere_pools_to_zeros_with_zero_gradients():
    x, u, _, bias = _case(3, 5, 8, 2, 2, masked=False)
    bias[1] = float("-inf")
    x = x.nan_to_num(0.0).requires_grad_()
    u = u.requires_grad_()
    out = attnpool.folded_attention_pool(x, u, None, 0.7, False, bias)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
    assert not u.grad.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finfo_min_masks_as_the_peers_do(dtype):
    """Siglip2 and timm NaFlex add finfo.min where a position is padding: that
    equals the bool mask, and a row that is all padding averages every position."""
    x, u, mask, _ = _case(3, 7, 8, 2, 2, masked=True)
    x, u = x.nan_to_num(0.0).to(dtype), u.float()
    mask[0] = True
    low = torch.finfo(torch.float32).min
    bias = torch.zeros(3, 7).masked_fill(~mask, low)
    got = attnpool.folded_attention_pool(x, u, None, 0.7, False, bias)
    attending = mask.any(dim=1)
    with_mask = attnpool.folded_attention_pool(x, u, mask, 0.7, False)
    # (Not bitwise: the padded rows still pass through the kernel, with weight 0.)
    torch.testing.assert_close(got[attending], with_mask[attending], **TOLERANCES[dtype])
    empty = int((~attending).nonzero()[0])
    torch.testing.assert_close(
        got[empty], x[empty].float().mean(0).to(dtype).expand_as(got[empty]), **TOLERANCES[dtype]
    )


@pytest.mark.parametrize("full_width", [False, True], ids=["slices", "full-width"])
def test_gradients_of_a_row_biased_to_the_lowest_float(full_width):
    """Every score of row 1 rounds to finfo.min: a uniform softmax, as in the
    peers. Its backward needs p = 1/L exactly, which max + log(sum) would lose
    to rounding (so the kernels keep the two apart)."""
    x, u, _, _ = _case(3, 9, 8, 2, 2, masked=False)
    x, u = x.nan_to_num(0.0).float(), u.float()
    bias = torch.zeros(3, 9)
    bias[1] = torch.finfo(torch.float32).min
    bias[2, 4:] = torch.finfo(torch.float32).min

    def grads(module):
        xs, us = x.clone().requires_grad_(), u.clone().requires_grad_()
        out = module.folded_attention_pool(xs, us, None, 0.7, full_width, bias)
        out.backward(torch.ones_like(out))
        return out, xs.grad, us.grad

    got, want = grads(attnpool), grads(reference)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


def test_reverse_mode_refuses_the_bias_and_forward_mode_covers_it():
    x, u, mask, bias = _case(2, 5, 8, 2, 2)
    x = x.nan_to_num(0.0)
    leaf = bias.clone().requires_grad_()
    refused = "attn_bias has no gradient in reverse mode"
    with pytest.raises(NotImplementedError, match=refused):
        attnpool.folded_attention_pool(x, u, mask, 0.7, False, leaf)
    with pytest.raises(NotImplementedError, match=refused):
        torch.func.grad(lambda b: attnpool.folded_attention_pool(x, u, mask, 0.7, False, b).sum())(
            bias
        )
    with torch.no_grad():  # no gradient asked for: fine
        attnpool.folded_attention_pool(x, u, mask, 0.7, False, leaf)
    tangent = torch.randn_like(bias).masked_fill(bias == float("-inf"), 0.0)

    def pool(module):
        return lambda b: module.folded_attention_pool(x, u, mask, 0.7, False, b)

    got = torch.func.jvp(pool(attnpool), (bias,), (tangent,))[1]
    want = torch.func.jvp(pool(reference), (bias,), (tangent,))[1]
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, want)
    with fwAD.dual_level():
        dual = attnpool.folded_attention_pool(x, u, mask, 0.7, False, fwAD.make_dual(bias, tangent))
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, want)


def test_errors_name_attn_bias():
    x, u, _, _ = _case(2, 5, 8, 2, 2)
    pool = attnpool.folded_attention_pool
    with pytest.raises(ValueError, match=r"attn_bias must have shape \[B, L\] = \[2, 5\]"):
        pool(x, u, None, 1.0, False, torch.zeros(2, 4))
    with pytest.raises(TypeError, match="attn_bias must be a floating-point tensor"):
        pool(x, u, None, 1.0, False, torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="attn_bias must be a Tensor"):
        pool(x, u, None, 1.0, False, [0.0] * 5)
    with pytest.raises(TypeError, match="or the additive mask itself as attn_bias"):
        pool(x, u, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="attention_pool: attn_bias must have shape"):
        inputs = make_inputs(2, 5, 8)
        attnpool.attention_pool(*inputs.args(), 1, None, torch.zeros(5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_opcheck(device, requires_grad):
    x, u, mask, bias = _case(3, 7, 12, 2, 3, device=device)
    x = x.nan_to_num(0.0).requires_grad_(requires_grad)
    u = u.requires_grad_(requires_grad)
    ops = torch.ops.attnpool
    for full_width in (False, True):
        torch.library.opcheck(
            ops.folded_attention_pool.default, (x, u, mask, 0.7, full_width, bias)
        )
    args = (x.detach(), u.detach(), mask, 0.7, False, bias)
    torch.library.opcheck(ops._folded_attention_pool_forward.default, args)
    out, lse = ops._folded_attention_pool_forward(*args)
    torch.library.opcheck(
        ops._folded_attention_pool_backward.default,
        (torch.randn_like(out), args[0], args[1], mask, out, lse, 0.7, False, bias),
    )


def test_func_jvp_and_vmap_with_a_bias():
    x, u, mask, bias = _case(3, 7, 8, 2, 2)
    x = x.nan_to_num(0.0)
    tangents = (torch.randn_like(x), torch.randn_like(u))

    def pool(module):
        return lambda x, u: module.folded_attention_pool(x, u, mask, 0.7, False, bias)

    got = torch.func.jvp(pool(attnpool), (x, u), tangents)
    want = torch.func.jvp(pool(reference), (x, u), tangents)
    torch.testing.assert_close(got, want)
    biases = torch.randn(4, 3, 7, dtype=torch.float64)
    vmapped = torch.func.vmap(lambda b: attnpool.folded_attention_pool(x, u, mask, 0.7, False, b))(
        biases
    )
    loop = torch.stack([attnpool.folded_attention_pool(x, u, mask, 0.7, False, b) for b in biases])
    torch.testing.assert_close(vmapped, loop)


def test_map_head_equals_nn_multihead_attention_with_a_float_padding_mask():
    torch.manual_seed(0)
    head = attnpool.MultiheadAttentionPooling(16, 4, 2).double()
    peer = nn.MultiheadAttention(16, 4, batch_first=True).double()
    with torch.no_grad():
        for param in peer.parameters():
            param.copy_(torch.randn_like(param) / 4)
    head.load_state_dict({**peer.state_dict(), "query": head.query.detach()})
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    bias = torch.randn(3, 7, dtype=torch.float64)
    bias[:, 2] = float("-inf")
    want = peer(head.query.expand(3, -1, -1), x, x, key_padding_mask=bias, need_weights=False)[0]
    torch.testing.assert_close(head(x, attn_bias=bias), want)
