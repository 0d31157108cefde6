"""attnpool::_attention_without_subnormals, the SDPA of the path that projects
the keys: scaled_dot_product_attention whose CPU backward runs with every
thread of ATen's pool flushing subnormal numbers to 0, which kept CoCa's
pooler training at scores far apart from taking 6x its time. Here its values
and gradients, that the flush reaches every thread and ends with the
backward, its fallbacks, registrations and errors, and that the projection
path and MultiheadAttentionPooling call it."""

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, RecordedOps

import attnpool

op = torch.ops.attnpool._attention_without_subnormals
TINY = torch.finfo(torch.float32).tiny


def _qkv(batch=2, heads=3, queries=5, seq_len=11, head_dim=8, *, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, heads, seq_len, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, heads, seq_len, head_dim, generator=gen, dtype=dtype)
    return q, k, v


def _padding_mask(batch, seq_len, dtype):
    """Additive [B, 1, 1, L]: the last positions of each sequence excluded."""
    mask = torch.zeros(batch, 1, 1, seq_len, dtype=dtype)
    for b in range(batch):
        mask[b, ..., seq_len - 1 - b :] = float("-inf")
    return mask


def _subnormals(t):
    return int(((t != 0) & (t.abs() < TINY)).sum())


def _grads(fn, q, k, v, grad_out):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out)
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_values_and_gradients_are_sdpa_s(masked, dtype):
    q, k, v = _qkv(dtype=dtype)
    mask = _padding_mask(2, 11, dtype) if masked else None
    grad_out = torch.randn(q.shape, dtype=dtype)
    got, got_grads = _grads(lambda *t: op(*t, mask, 0.3), q, k, v, grad_out)
    want, want_grads = _grads(
        lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask, scale=0.3), q, k, v, grad_out
    )
    # The same kernels: only subnormal numbers could differ, and these
    # scores make none.
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_backward_flushes_subnormals_on_every_thread():
    # One query per head whose every key but the first scores 100 below it:
    # weights e^-100, subnormal in float32, and so are the value gradients
    # p * grad_out that SDPA's backward computes from them. 16 heads of
    # sequences share out over the pool's threads.
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q = torch.zeros(4, 4, 1, 16)
        q[..., 0] = 1.0
        k = torch.zeros(4, 4, 64, 16)
        k[..., 0] = -100.0
        k[:, :, 0, 0] = 0.0
        v = torch.randn(4, 4, 64, 16)
        grad_out = torch.randn(4, 4, 1, 16)
        _, sdpa_grads = _grads(
            lambda *t: F.scaled_dot_product_attention(*t, scale=1.0), q, k, v, grad_out
        )
        _, grads = _grads(lambda *t: op(*t, None, 1.0), q, k, v, grad_out)
        # SDPA leaves them in every head, so on each thread.
        assert (((sdpa_grads[2] != 0) & (sdpa_grads[2].abs() < TINY)).flatten(2).any(-1)).all()
        assert [_subnormals(g) for g in grads] == [0, 0, 0]
        torch.testing.assert_close(grads[2], sdpa_grads[2], rtol=1e-6, atol=TINY)
        # The flush ends with the backward: a parallel product on both
        # threads gives subnormals again.
        tiny_products = torch.full((1 << 20,), 1e-38) * 0.01
        assert _subnormals(tiny_products) == tiny_products.numel()
    finally:
        torch.set_num_threads(previous)


def test_fallbacks_keep_sdpa_s_own_autograd():
    q, k, v = _qkv(dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    assert "Flash" in op(*leaves, None, 0.5).grad_fn.name()  # float64: SDPA's node
    q, k, v = (t.float().requires_grad_() for t in _qkv())
    assert "AttentionWithoutSubnormals" in op(q, k, v, None, 0.5).grad_fn.name()
    mask = _padding_mask(2, 11, torch.float32).requires_grad_()
    assert "AttentionWithoutSubnormals" not in op(q, k, v, mask, 0.5).grad_fn.name()


# (gradcheck calls the deprecated torch.jit.script inside.)
@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
def test_gradcheck_float64():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 3, 5, 4, dtype=torch.float64))
    mask = _padding_mask(1, 5, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: op(*t, mask, 0.5), (q, k, v))


def test_no_second_derivative():
    q, k, v = (t.requires_grad_() for t in _qkv())
    (grad_q,) = torch.autograd.grad(op(q, k, v, None, 0.5).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        grad_q.sum().backward()


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_opcheck(device, requires_grad, masked):
    q, k, v = (t.to(device).requires_grad_(requires_grad) for t in _qkv(2, 2, 3, 7, 8))
    mask = _padding_mask(2, 7, torch.float32).to(device) if masked else None
    torch.library.opcheck(op.default, (q, k, v, mask, 0.5))


def test_meta_shape():
    q, k, v = (t.to("meta") for t in _qkv())
    assert op(q, k, v, None, 0.5).shape == q.shape


def test_errors_name_the_argument():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="key must be 4-D"):
        op(q, k[0], v, None, 1.0)
    with pytest.raises(ValueError, match="value must have query's batch, heads and head width"):
        op(q, k, v[..., :4], None, 1.0)
    with pytest.raises(ValueError, match="value must have key's length 11"):
        op(q, k, v[:, :, :7], None, 1.0)
    with pytest.raises(TypeError, match="key must have query's dtype"):
        op(q, k.double(), v, None, 1.0)
    with pytest.raises(TypeError, match="attn_mask must be additive in query's dtype"):
        op(q, k, v, torch.zeros(2, 1, 1, 11, dtype=torch.bool), 1.0)
    with pytest.raises(TypeError, match="query must be floating point"):
        op(q.int(), k.int(), v.int(), None, 1.0)


def _recorded_backward(fn):
    with RecordedOps() as recorded:
        fn().float().sum().backward()
    return recorded.names


def test_projection_path_trains_float32_through_it():
    # CoCa-like: Q·n = 24 > H + Q = 14 projects the keys.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 8, generator=gen, requires_grad=True)
    query = torch.randn(6, 8, generator=gen, requires_grad=True)
    w_q, w_k = (torch.randn(8, 8, generator=gen, requires_grad=True) for _ in range(2))
    names = _recorded_backward(lambda: attnpool.attention_pool(x, query, w_q, w_k, num_heads=4))
    assert "attnpool._attention_without_subnormals_backward" in names, names
    module = attnpool.MultiheadAttentionPooling(8, 4, num_queries=6)
    names = _recorded_backward(lambda: module(x))
    assert "attnpool._attention_without_subnormals_backward" in names, names
