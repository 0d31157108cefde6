"""Every instruction-set build of the CPU kernels is correct, and the one that
runs follows the CPU and ATEN_CPU_CAPABILITY (read once per process, hence
the subprocesses)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import attnpool

SCRIPT = r"""
import json, torch, attnpool
from attnpool import reference
torch.manual_seed(0)
errors = {}
# The last case, bfloat16 with 2 heads of 32, takes the forward's paired-widening path.
for dtype, heads, queries, length, hidden in [(torch.float64, 2, 3, 37, 40), (torch.float32, 1, 1, 4000, 40), (torch.bfloat16, 4, 2, 50, 40), (torch.bfloat16, 2, 1, 70, 64)]:
    x = torch.randn(3, length, hidden, dtype=torch.float64)
    q = torch.randn(queries, hidden, dtype=torch.float64)
    wq, wk = torch.randn(2, hidden, hidden, dtype=torch.float64) / 6
    mask = torch.rand(3, length) > 0.2
    xd = x.to(dtype).requires_grad_()
    out = attnpool.attention_pool(xd, q.to(dtype), wq.to(dtype), wk.to(dtype), mask, heads)
    xr = xd.detach().double().requires_grad_()
    ref = reference.attention_pool(xr, q.to(dtype).double(), wq.to(dtype).double(), wk.to(dtype).double(), mask, heads)
    g = torch.randn_like(ref)
    (out.double() * g).sum().backward()
    (ref * g).sum().backward()
    errors[f"{dtype}/{hidden}"] = [(out.double() - ref).abs().max().item(), (xd.grad.double() - xr.grad).abs().max().item()]
print(json.dumps({"isa": attnpool._C.cpu_kernel_isa(), "errors": errors}))
"""

TOLERANCE = {"torch.float64": 1e-10, "torch.float32": 1e-4, "torch.bfloat16": 5e-2}


def _supported_isas():
    best = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    return order[: order.index(best) + 1] if best in order else ["DEFAULT"]


@pytest.mark.parametrize("isa", ["DEFAULT", "AVX2", "AVX512"])
def test_each_instruction_set_matches_reference(isa):
    if isa not in _supported_isas():
        pytest.skip(f"this CPU does not support {isa}")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": isa.lower()}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["isa"] == isa
    assert len(report["errors"]) == 4
    for dtype, (value_error, grad_error) in report["errors"].items():
        tolerance = TOLERANCE[dtype.split("/")[0]]
        assert value_error < tolerance, (dtype, value_error)
        assert grad_error < tolerance, (dtype, grad_error)


def test_in_process_kernels_are_the_best_the_cpu_allows():
    assert (
        attnpool._C.cpu_kernel_isa() == _supported_isas()[-1] or "ATEN_CPU_CAPABILITY" in os.environ
    )
