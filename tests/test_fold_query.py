"""fold_query (SPEC.md §5): u against the float64 reference for every shape the
op takes (projection width E unlike x's width Hx, a 1-D query, a query bias),
and its gradients."""

import pytest
import torch
from helpers import DEVICES, TOLERANCES

import attnpool
from attnpool import reference

# (Q, Hq, E, Hx, n); Q None: a 1-D query.
SHAPES = [
    (None, 8, 8, 8, 1),
    (3, 8, 12, 8, 3),
    (2, 6, 16, 10, 4),
    (1, 5, 8, 7, 2),
    (4, 200, 200, 96, 1),  # cut into pieces of rows
    (2, 64, 256, 32, 2),
]
IDS = ["1d", "heads3", "kdim", "q1-kdim", "pieces", "pieces-heads"]


def _weights(num_queries, query_dim, proj_dim, x_dim, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query_shape = (query_dim,) if num_queries is None else (num_queries, query_dim)
    query = torch.randn(query_shape, generator=gen, dtype=torch.float64)
    w_q = torch.randn(proj_dim, query_dim, generator=gen, dtype=torch.float64) / query_dim**0.5
    w_k = torch.randn(proj_dim, x_dim, generator=gen, dtype=torch.float64) / x_dim**0.5
    q_bias = torch.randn(proj_dim, generator=gen, dtype=torch.float64)
    return [t.to(device) for t in (query, w_q, w_k, q_bias)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("biased", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_float64_reference(device, shape, biased, dtype):
    num_queries, _, _, x_dim, num_heads = shape
    query, w_q, w_k, q_bias = (t.to(dtype) for t in _weights(*shape[:4], device))
    bias = q_bias if biased else None
    u = attnpool.fold_query(query, w_q, w_k, num_heads, bias)
    expected_shape = ([] if num_queries is None else [num_queries]) + [num_heads, x_dim]
    assert list(u.shape) == expected_shape
    assert u.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    as64 = [t.double() if t is not None else None for t in (query, w_q, w_k, bias)]
    want = reference.fold_query(*as64[:3], num_heads, as64[3])
    tolerance = TOLERANCES[torch.float64 if dtype == torch.float64 else torch.float32]
    torch.testing.assert_close(u.double(), want, **tolerance)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("biased", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_weights_fold_as_their_float32_copies(shape, biased, dtype):
    # The CPU kernel widens 16-bit weights as it reads them, exactly: the
    # same u and projected query as from the weights converted first.
    query, w_q, w_k, q_bias = (t.to(dtype) for t in _weights(*shape[:4], "cpu"))
    bias = q_bias if biased else None
    got = torch.ops.attnpool._fold_query_forward(query, w_q, w_k, shape[4], bias)
    as32 = [t.float() if t is not None else None for t in (query, w_q, w_k, bias)]
    want = torch.ops.attnpool._fold_query_forward(*as32[:3], shape[4], as32[3])
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32 and torch.equal(g, w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=IDS[:4])
def test_gradcheck(device, shape):
    tensors = [t.requires_grad_(True) for t in _weights(*shape[:4], device)]
    num_heads = shape[4]
    assert torch.autograd.gradcheck(
        lambda q, wq, wk, b: attnpool.fold_query(q, wq, wk, num_heads, b), tuple(tensors)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES[4:], ids=IDS[4:])
def test_gradients_of_pieces_match_reference(device, shape):
    # Each head's rows are cut into pieces whose partial sums are added in order.
    tensors = [t.requires_grad_(True) for t in _weights(*shape[:4], device)]
    num_heads = shape[4]
    u = attnpool.fold_query(*tensors[:3], num_heads, tensors[3])
    weights = torch.randn_like(u)
    got = torch.autograd.grad((u * weights).sum(), tensors)
    want_u = reference.fold_query(*tensors[:3], num_heads, tensors[3])
    want = torch.autograd.grad((want_u * weights).sum(), tensors)
    torch.testing.assert_close(u, want_u, **TOLERANCES[torch.float64])
    for name, g, w in zip(("query", "w_q", "w_k", "q_bias"), got, want, strict=True):
        torch.testing.assert_close(g, w, **TOLERANCES[torch.float64], msg=name)


def test_without_bias_no_bias_gradient_is_made():
    query, w_q, w_k, _ = (t.requires_grad_(True) for t in _weights(2, 8, 8, 8, "cpu"))
    u = attnpool.fold_query(query, w_q, w_k, 2)
    grads = torch.autograd.grad(u.sum(), (query, w_q, w_k))
    assert all(g.abs().sum() > 0 for g in grads)
