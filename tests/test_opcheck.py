"""torch.library.opcheck on every attnpool operator (schema, autograd
registration, fake tensors, AOT dispatch with dynamic shapes)."""

import pytest
import torch
from helpers import DEVICES, make_inputs

import attnpool  # noqa: F401  (registers the operators)

CASES = [
    dict(shape=(2, 5, 8), num_queries=None, num_heads=1, mask=None, scale=None),
    dict(shape=(3, 7, 8), num_queries=2, num_heads=2, mask="random", scale=0.5),
    dict(shape=(2, 4, 12), num_queries=1, num_heads=3, mask="random", scale=None),
]
IDS = ["1d-query", "heads-mask-scale", "q1-heads3"]


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_opcheck_forward_and_backward_ops(device, case):
    inputs = _inputs(case, device)
    kwargs = dict(num_heads=case["num_heads"], scale=case["scale"])
    torch.library.opcheck(torch.ops.attnpool._attention_pool_forward.default, inputs.args(), kwargs)
    out, lse = torch.ops.attnpool._attention_pool_forward(*inputs.args(), **kwargs)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.attnpool._attention_pool_backward.default,
        (grad_out, *inputs.args(), out, lse, case["num_heads"], case["scale"]),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_reduced_precision(dtype):
    inputs = _inputs(CASES[1], "cpu", dtype=dtype, requires_grad=True)
    torch.library.opcheck(
        torch.ops.attnpool.attention_pool.default, inputs.args(), dict(num_heads=2, scale=None)
    )
