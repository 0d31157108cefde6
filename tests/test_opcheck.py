"""torch.library.opcheck on every attnpool operator (schema, autograd
registration, fake tensors, AOT dispatch with dynamic shapes)."""

import pytest
import torch
from helpers import DEVICES, make_inputs

import attnpool

CASES = [
    dict(shape=(2, 5, 8), num_queries=None, num_heads=1, mask=None, scale=None),
    dict(shape=(3, 7, 8), num_queries=2, num_heads=2, mask="random", scale=0.5),
    dict(shape=(2, 4, 12), num_queries=1, num_heads=3, mask="random", scale=None),
    # Q·n > H + Q: attention_pool projects the keys (test_projection.py).
    dict(shape=(2, 5, 8), num_queries=6, num_heads=4, mask="random", scale=None),
]
IDS = ["1d-query", "heads-mask-scale", "q1-heads3", "projects"]


def _inputs(case, device, dtype=torch.float64, requires_grad=False):
    inputs = make_inputs(*case["shape"], case["num_queries"], mask=case["mask"], device=device)
    inputs = inputs.to(dtype=dtype, device=device)
    return inputs.requiring_grad() if requires_grad else inputs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_opcheck_attention_pool(device, case, requires_grad):
    inputs = _inputs(case, device, requires_grad=requires_grad)
    torch.library.opcheck(
        torch.ops.attnpool.attention_pool.default,
        inputs.args(),
        dict(num_heads=case["num_heads"], scale=case["scale"]),
    )


def _folded(case, device, requires_grad=False):
    """(x, u, mask) of a case, u folded with the case's heads."""
    inputs = _inputs(case, device)
    u = attnpool.fold_query(inputs.query, inputs.w_q, inputs.w_k, case["num_heads"])
    leaf = (lambda t: t.detach().requires_grad_(True)) if requires_grad else (lambda t: t)
    return leaf(inputs.x), leaf(u), inputs.mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("full_width", [False, True], ids=["slices", "full-width"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_opcheck_folded_attention_pool(device, case, full_width, requires_grad):
    x, u, mask = _folded(case, device, requires_grad)
    torch.library.opcheck(
        torch.ops.attnpool.folded_attention_pool.default, (x, u, mask, 0.5, full_width)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("biased", [False, True], ids=["no-bias", "bias"])
def test_opcheck_fold_query(device, case, biased):
    inputs = _inputs(case, device, requires_grad=True)
    bias = torch.randn(inputs.w_q.shape[0], dtype=inputs.w_q.dtype, device=device)
    torch.library.opcheck(
        torch.ops.attnpool.fold_query.default,
        (inputs.query, inputs.w_q, inputs.w_k, case["num_heads"]),
        dict(q_bias=bias.requires_grad_(True) if biased else None),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("full_width", [False, True], ids=["slices", "full-width"])
def test_opcheck_forward_and_backward_ops(device, case, full_width):
    x, u, mask = _folded(case, device)
    args = (x, u, mask, 0.5, full_width)
    ops = torch.ops.attnpool
    torch.library.opcheck(ops._folded_attention_pool_forward.default, args)
    out, lse = ops._folded_attention_pool_forward(*args)
    torch.library.opcheck(
        ops._folded_attention_pool_backward.default,
        (torch.randn_like(out), x, u, mask, out, lse, 0.5, full_width),
    )
    inputs = _inputs(case, device)
    fold_args = (inputs.query, inputs.w_q, inputs.w_k, case["num_heads"])
    torch.library.opcheck(ops._fold_query_forward.default, fold_args)
    folded, projected = ops._fold_query_forward(*fold_args)
    torch.library.opcheck(
        ops._fold_query_backward.default,
        (torch.randn_like(folded), *fold_args[:3], projected, case["num_heads"]),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("full_width", [False, True], ids=["slices", "full-width"])
def test_opcheck_jvp_ops(device, case, full_width):
    x, u, mask = _folded(case, device)
    bias = torch.randn(x.shape[:2], dtype=x.dtype, device=device)
    ops = torch.ops.attnpool
    out, lse = ops._folded_attention_pool_forward(x, u, mask, 0.5, full_width, bias)
    tangents = (torch.randn_like(x), torch.randn_like(u), torch.randn_like(bias))
    for chosen in (tangents, (tangents[0], None, None), (None, tangents[1], None)):
        torch.library.opcheck(
            ops._folded_attention_pool_jvp.default,
            (x, u, mask, out, lse, 0.5, full_width, bias, None, *chosen),
        )
    with pytest.raises(ValueError, match="folded_attention_pool jvp: out has shape"):
        ops._folded_attention_pool_jvp(
            x, u, mask, out[:1], lse, 0.5, full_width, bias, None, *chosen
        )
    rows = x.flatten(0, 1)
    cu_seqlens = torch.arange(0, rows.shape[0] + 1, x.shape[1], device=device)
    out, lse = ops._folded_attention_pool_varlen_forward(rows, cu_seqlens, u, 0.5, full_width)
    torch.library.opcheck(
        ops._folded_attention_pool_varlen_jvp.default,
        (rows, cu_seqlens, u, out, lse, 0.5, full_width, torch.randn_like(rows), None),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_reduced_precision(dtype):
    inputs = _inputs(CASES[1], "cpu", dtype=dtype, requires_grad=True)
    torch.library.opcheck(
        torch.ops.attnpool.attention_pool.default, inputs.args(), dict(num_heads=2, scale=None)
    )
