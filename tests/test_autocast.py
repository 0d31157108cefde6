"""Autocast: the documented dtype policy holds inside torch.autocast regions.

The policy (README, "Semantics"): the op accumulates in float32, returns
``x``'s dtype, and takes float32 parameters with a float16/bfloat16 ``x``
(mixed precision), so a module's parameters stay float32. Autocast must not
change what the op computes: inside and outside an autocast region, the same
inputs give the same result.
"""

import pytest
import torch
from helpers import (
    CUDA_SKIP_REASON,
    TOLERANCES,
    Inputs,
    PoolingModel,
    forward_backward,
    make_batch,
    reference_in_float64,
)

import attnpool

_no_cuda = pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))
CASES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cpu", torch.float16, id="cpu-fp16"),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=_no_cuda),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=_no_cuda),
]


def _pool_inputs(pool, x, mask):
    query = pool.query[0] if pool.num_queries == 1 else pool.query
    return Inputs(
        x.detach(),
        query.detach(),
        pool.q_proj.weight.detach(),
        pool.k_proj.weight.detach(),
        mask,
    )


@pytest.mark.parametrize("device, dtype", CASES)
def test_module_follows_the_dtype_policy_under_autocast(device, dtype):
    torch.manual_seed(0)
    model = PoolingModel(32, num_heads=4, num_queries=2, tanh=False).to(device)
    x, mask = make_batch(3, 21, 32, device=device, empty_row=1)
    with torch.autocast(device, dtype=dtype):
        hidden = model.encode(x)
        out = model(x, mask)
    assert hidden.dtype == dtype  # autocast ran the linear layer in `dtype`
    assert out.dtype == dtype  # the op returns x's dtype
    out.float().sum().backward()
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32, name
        assert param.grad.dtype == torch.float32 and torch.isfinite(param.grad).all(), name
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # the fully masked sequence
    inputs = _pool_inputs(model.pool, hidden, mask)
    # Same values as the op outside autocast, and as the float64 reference.
    outside = attnpool.attention_pool(*inputs.args(), num_heads=4)
    torch.testing.assert_close(out, outside, **TOLERANCES[dtype])
    torch.testing.assert_close(
        out.double(), reference_in_float64(inputs, num_heads=4), **TOLERANCES[dtype]
    )


@pytest.mark.parametrize("device, dtype", CASES)
# 16 queries x 4 heads > 32 + 16: attention_pool projects the keys.
@pytest.mark.parametrize("num_heads, num_queries", [(2, 1), (4, 16)], ids=["fold", "projection"])
def test_float32_input_under_autocast_stays_float32(device, dtype, num_heads, num_queries):
    torch.manual_seed(0)
    pool = attnpool.AttentionPooling(32, num_heads=num_heads, num_queries=num_queries).to(device)
    x, mask = make_batch(3, 21, 32, device=device, seed=1, empty_row=1)
    with torch.autocast(device, dtype=dtype):
        out = pool(x, mask)
    assert out.dtype == torch.float32
    want = reference_in_float64(_pool_inputs(pool, x, mask), num_heads=num_heads)
    torch.testing.assert_close(out.double(), want, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("device, dtype", CASES)
def test_forward_and_backward_inside_autocast_equal_outside(device, dtype):
    x, mask = make_batch(3, 21, 32, device=device, seed=2, empty_row=1)
    gen = torch.Generator().manual_seed(3)
    inputs = Inputs(
        x.to(dtype),
        torch.randn(2, 32, generator=gen).to(device),
        (torch.randn(32, 32, generator=gen) / 32**0.5).to(device),
        (torch.randn(32, 32, generator=gen) / 32**0.5).to(device),
        mask,
    )
    outside = forward_backward(inputs, 4)
    with torch.autocast(device, dtype=dtype):  # forward and backward inside
        inside = forward_backward(inputs, 4)
    for name, got, want in zip(("out", "x", "query", "w_q", "w_k"), inside, outside, strict=True):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(
            got, want, **TOLERANCES[dtype], msg=lambda text, name=name: f"{name}: {text}"
        )


@pytest.mark.parametrize("device, dtype", CASES)
def test_accumulates_in_float32_under_autocast(device, dtype):
    # 4096 equally weighted positions alternating 1 and 1 + 2 ulp: the mean,
    # 1 + 1 ulp, is exact in float32 accumulation and lost in dtype's.
    step = 2 * torch.finfo(dtype).eps
    x = torch.ones(1, 4096, 8, dtype=dtype, device=device)
    x[0, ::2] = 1 + step
    zeros = torch.zeros(8, 8, device=device)
    with torch.autocast(device, dtype=dtype):
        out = attnpool.attention_pool(x, torch.ones(8, device=device), zeros, zeros)
    assert out.dtype == dtype
    torch.testing.assert_close(
        out.double(), torch.full((1, 8), 1 + step / 2, dtype=torch.float64, device=device)
    )
