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

def errors(dtype, batch, length, hidden, heads, queries, x_scale=1.0):
    gen = torch.Generator().manual_seed(hidden * 7 + heads)
    x = torch.randn(batch, length, hidden, generator=gen, dtype=torch.float64) * x_scale
    q = torch.randn((hidden,) if queries is None else (queries, hidden), generator=gen, dtype=torch.float64)
    wq, wk = torch.randn(2, hidden, hidden, generator=gen, dtype=torch.float64) / max(hidden, 1) ** 0.5
    mask = torch.rand(batch, length, generator=gen) > 0.2
    params = [t.to(dtype) for t in (q, wq, wk)]
    grad = None
    result = {}
    for name, function, cast in (
        ("exact", reference.attention_pool, torch.float64),
        ("reference", reference.attention_pool, dtype),
        ("op", attnpool.attention_pool, dtype),
    ):
        xd = x.to(dtype).to(cast).requires_grad_()
        out = function(xd, *[t.to(cast) for t in params], mask, heads)
        if grad is None:
            grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        (out.double() * grad).sum().backward()
        result[name] = (out.detach().double(), xd.grad.double())
    # The tangent of out for random tangents of x and the query (forward mode).
    x_tangent = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    q_tangent = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    for name, function, cast in (
        ("exact", reference.attention_pool, torch.float64),
        ("reference", reference.attention_pool, dtype),
        ("op", attnpool.attention_pool, dtype),
    ):
        weights = [t.to(cast) for t in params[1:]]
        _, tangent = torch.func.jvp(
            lambda x, q: function(x, q, *weights, mask, heads),
            (x.to(dtype).to(cast), params[0].to(cast)),
            (x_tangent.to(dtype).to(cast), q_tangent.to(dtype).to(cast)),
        )
        result[name] += (tangent.double(),)
    # [op's out, dx and tangent errors, the same-dtype reference's three], relative
    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    return [rel(result[k][i], result["exact"][i]) for k in ("op", "reference") for i in (0, 1, 2)]

report = {}
dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Odd widths hit every vector tail; 64 and 128 take bfloat16's paired read.
for dtype in dtypes:
    for hidden in (1, 3, 17, 41, 42, 64, 100, 128):
        for heads, queries in ((1, None), (2 if hidden % 2 == 0 else 1, 3)):
            report[f"{dtype}/H={hidden}/n={heads}/Q={queries}"] = errors(dtype, 2, 37, hidden, heads, queries)
# A long sequence (cut into pieces) and large scores (one order for every score).
report["torch.float32/long"] = errors(torch.float32, 1, 4000, 40, 1, None)
report["torch.float32/scores-1e6"] = errors(torch.float32, 3, 41, 48, 2, 3, x_scale=1e6)
report["torch.bfloat16/scores-1e6"] = errors(torch.bfloat16, 3, 41, 64, 1, None, x_scale=1e6)
print(json.dumps({"isa": attnpool._C.cpu_kernel_isa(), "errors": report}))
"""

# The op may be a few times less accurate than the reference computed in the
# same dtype (which also accumulates in float32), never more: a kernel that
# drops an element of a vector tail is off by about its share of the sum.
FACTOR = 4
FLOOR = {
    "torch.float64": 1e-13,
    "torch.float32": 1e-6,
    "torch.float16": 1e-4,
    "torch.bfloat16": 1e-3,
}


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
    assert len(report["errors"]) == 4 * 8 * 2 + 3
    for case, errors in report["errors"].items():
        floor = FLOOR[case.split("/")[0]]
        for what, error, reference_error in zip(
            ("out", "dx", "tangent"), errors[:3], errors[3:], strict=True
        ):
            if what == "tangent" and "scores" in case:
                # The float64 composition is no exact tangent at such scores (see
                # test_numerics.py's large-score tangents).
                continue
            assert error <= FACTOR * reference_error + floor, (case, what)


def test_in_process_kernels_are_the_best_the_cpu_allows():
    assert (
        attnpool._C.cpu_kernel_isa() == _supported_isas()[-1] or "ATEN_CPU_CAPABILITY" in os.environ
    )
