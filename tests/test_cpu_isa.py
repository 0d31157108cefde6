"""Every instruction-set build of the CPU kernels is correct, and the one that
runs follows the CPU, ATEN_CPU_CAPABILITY and ATTNPOOL_CPU_CAPABILITY (read
once per process, hence the subprocesses)."""

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

def errors(dtype, batch, length, hidden, heads, queries, x_scale=1.0, masked=True):
    gen = torch.Generator().manual_seed(hidden * 7 + heads)
    x = torch.randn(batch, length, hidden, generator=gen, dtype=torch.float64) * x_scale
    q = torch.randn((hidden,) if queries is None else (queries, hidden), generator=gen, dtype=torch.float64)
    wq, wk = torch.randn(2, hidden, hidden, generator=gen, dtype=torch.float64) / max(hidden, 1) ** 0.5
    mask = torch.rand(batch, length, generator=gen) > 0.2
    mask = mask if masked else None
    params = [t.to(dtype) for t in (q, wq, wk)]
    grad = None
    result = {}
    for name, function, cast in (
        ("exact", reference.attention_pool, torch.float64),
        ("reference", reference.attention_pool, dtype),
        ("op", attnpool.attention_pool, dtype),
    ):
        xd = x.to(dtype).to(cast).requires_grad_()
        # w_k's gradient comes from du, the kernels' other product.
        qd, wqd, wkd = [t.to(cast) for t in params]
        wkd = wkd.clone().requires_grad_()
        out = function(xd, qd, wqd, wkd, mask, heads)
        if grad is None:
            grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        (out.double() * grad).sum().backward()
        result[name] = (out.detach().double(), xd.grad.double(), wkd.grad.double())
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
    # [op's out, dx, dw_k and tangent errors, the same-dtype reference's four], relative
    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    return [rel(result[k][i], result["exact"][i]) for k in ("op", "reference") for i in range(4)]

report = {}
dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Odd widths hit every vector tail; 64 and 128 take bfloat16's paired read.
for dtype in dtypes:
    for hidden in (1, 3, 17, 41, 42, 64, 100, 128):
        for heads, queries in ((1, None), (2 if hidden % 2 == 0 else 1, 3)):
            report[f"{dtype}/H={hidden}/n={heads}/Q={queries}"] = errors(dtype, 2, 37, hidden, heads, queries)
# Nine queries of one head: rows of 16 bits (and float32 where a vector has 16
# lanes) scored by dot products into lanes, 24 rows a tile, the last one short.
for dtype in dtypes:
    report[f"{dtype}/Q=9"] = errors(dtype, 2, 61, 40, 1, 9)
# A long sequence (cut into pieces) and large scores (one order for every score).
report["torch.float32/long"] = errors(torch.float32, 1, 4000, 40, 1, None)
report["torch.float32/scores-1e6"] = errors(torch.float32, 3, 41, 48, 2, 3, x_scale=1e6)
report["torch.bfloat16/scores-1e6"] = errors(torch.bfloat16, 3, 41, 64, 1, None, x_scale=1e6)
# Several scores: bfloat16 products, or on AMX_BF16 tile products of 16-row
# blocks, the last short), recomputed alike by the backward and the jvp.
report["torch.bfloat16/scores-1e6/Q=3"] = errors(torch.bfloat16, 1, 41, 64, 2, 3, x_scale=1e6)
# Queries of several heads, whose weighted sums AMX_BF16 adds on tiles: 16
# queries fill a tile's rows, 33 take two groups of them and a short one.
for queries in (16, 33):
    report[f"torch.bfloat16/n=2/Q={queries}"] = errors(torch.bfloat16, 2, 45, 64, 2, queries)
# Twelve scores or more filling three quarters of their blocks of 16, which
# AVX512_BF16 sums from u's tiles by vdpbf16ps:
# an odd width (the last pair of a row half a pair), rows of one value and of
# a pair and a half, one block of 16 scores three lanes short, four blocks (a
# pass of three, then one), one query of 12 heads (its scores into lanes);
# large scores, several queries and heads or one query.
report["torch.bfloat16/H=41/Q=13"] = errors(torch.bfloat16, 2, 37, 41, 1, 13)
report["torch.bfloat16/H=1/Q=12"] = errors(torch.bfloat16, 2, 37, 1, 1, 12)
report["torch.bfloat16/H=3/Q=12"] = errors(torch.bfloat16, 2, 37, 3, 1, 12)
report["torch.bfloat16/H=33/Q=49"] = errors(torch.bfloat16, 2, 29, 33, 1, 49)
report["torch.bfloat16/n=12"] = errors(torch.bfloat16, 2, 37, 48, 12, None)
report["torch.bfloat16/scores-1e6/Q=16"] = errors(torch.bfloat16, 1, 41, 64, 4, 4, x_scale=1e6)
report["torch.bfloat16/scores-1e6/n=12"] = errors(torch.bfloat16, 1, 41, 48, 12, None, x_scale=1e6)
# Queries of several heads that fill three quarters of their blocks of 16,
# whose G . x AVX512_BF16 sums from G's tiles: head slices of an odd width;
# two blocks of queries; large scores (ds 0 where p is one-hot).
report["torch.bfloat16/n=2/H=42/Q=13"] = errors(torch.bfloat16, 2, 37, 42, 2, 13)
report["torch.bfloat16/n=2/Q=28"] = errors(torch.bfloat16, 2, 29, 64, 2, 28)
report["torch.bfloat16/scores-1e6/n=3/Q=12"] = errors(torch.bfloat16, 1, 41, 48, 3, 12, x_scale=1e6)
# Several scores without a mask: on AMX_BF16 each whole tile of 32 rows is
# scored in place beside the previous tile's weighted sums, the last tile
# short; head slices of two vectors (read in pairs) and of three, and
# three queries of one head.
report["torch.bfloat16/n=4/Q=3/unmasked"] = errors(torch.bfloat16, 2, 100, 128, 4, 3, masked=False)
report["torch.bfloat16/n=2/Q=2/unmasked"] = errors(torch.bfloat16, 1, 70, 96, 2, 2, masked=False)
report["torch.bfloat16/n=1/Q=3/unmasked"] = errors(torch.bfloat16, 2, 100, 128, 1, 3, masked=False)
# Head slices of 72 columns (so400m's 1152 in 16 heads): the backward's dx
# takes the last 8 of each in part of a vector.
for dtype in (torch.float32, torch.bfloat16):
    report[f"{dtype}/n=2/H=144/Q=3"] = errors(dtype, 2, 37, 144, 2, 3)
# Head slices that are not whole vectors in the forward's weighted sums,
# the last vector of each slice masked: slices of 72 columns two queries at
# a time (a slice a pass), or one query (three slices a pass, then one);
# slices of 10 columns, under one vector, four queries at a time.
for dtype in dtypes:
    report[f"{dtype}/n=4/H=288/Q=2"] = errors(dtype, 2, 37, 288, 4, 2)
    report[f"{dtype}/n=4/H=288/Q=3"] = errors(dtype, 2, 37, 288, 4, 3)
    report[f"{dtype}/n=4/H=40/Q=4"] = errors(dtype, 2, 37, 40, 4, 4)
# Bfloat16 head slices wider than 8 vectors, summed in pieces of whole
# vectors (256 columns: two pieces of 8 vectors at AVX-512; 384: three).
report["torch.bfloat16/n=2/H=512/Q=1"] = errors(torch.bfloat16, 2, 37, 512, 2, None)
report["torch.bfloat16/n=2/H=768/Q=4"] = errors(torch.bfloat16, 2, 37, 768, 2, 4)

# Whether bfloat16 rows are scored against u rounded to bfloat16: the output
# depends on u through the scores only, so it is then the same bit for bit.
gen = torch.Generator().manual_seed(5)
x = torch.randn(2, 45, 96, generator=gen).bfloat16()
u = torch.randn(3, 2, 96, generator=gen) / 10
rounds_u = {
    name: torch.equal(
        attnpool.folded_attention_pool(x, u, full_width=full_width),
        attnpool.folded_attention_pool(x, u.bfloat16().float(), full_width=full_width),
    )
    for name, full_width in (("head slices", False), ("full width", True))
}
print(json.dumps({"isa": attnpool._C.cpu_kernel_isa(), "errors": report, "rounds_u": rounds_u}))
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


ISAS = ["DEFAULT", "AVX2", "AVX512", "AVX512_BF16", "AMX_BF16"]


def _has_amx_bf16():
    """Whether the CPU has AMX-BF16 and the OS lets a process use it (torch
    asks Linux for the tile registers, as attnpool does)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags and torch.cpu._is_amx_tile_supported()


def _supported_isas():
    best = torch.backends.cpu.get_cpu_capability()
    if best == "AVX512" and torch.cpu._is_avx512_bf16_supported():
        best = "AMX_BF16" if _has_amx_bf16() else "AVX512_BF16"
    return ISAS[: ISAS.index(best) + 1] if best in ISAS else ["DEFAULT"]


def _run(script, isa=None, aten_isa=None):
    """Runs script with attnpool's kernels lowered to isa, ATen's to aten_isa
    (None: not lowered)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_CPU_CAPABILITY")}
    for name, value in (("ATTNPOOL_CPU_CAPABILITY", isa), ("ATEN_CPU_CAPABILITY", aten_isa)):
        if value is not None:
            env[name] = value.lower()
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)


def _report_at(isa, script):
    """The JSON report that script prints last with attnpool's kernels at isa
    (the test skipped where the CPU does not support it)."""
    if isa not in _supported_isas():
        pytest.skip(f"this CPU does not support {isa}")
    result = _run(script, isa)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["isa"] == isa
    return report


@pytest.mark.parametrize("isa", ISAS)
def test_each_instruction_set_matches_reference(isa):
    report = _report_at(isa, SCRIPT)
    # [Note: bfloat16 products] (csrc/ops/cpu/isa/vec_helpers.h): only
    # AVX512_BF16 and AMX_BF16 score bfloat16 rows against u rounded to
    # bfloat16.
    rounds_u = isa in ("AVX512_BF16", "AMX_BF16")
    assert report["rounds_u"] == {"head slices": rounds_u, "full width": rounds_u}
    assert len(report["errors"]) == 4 * 8 * 2 + 4 + 4 + 2 + 7 + 3 + 3 + 2 + 4 * 3 + 2
    for case, errors in report["errors"].items():
        floor = FLOOR[case.split("/")[0]]
        for what, error, reference_error in zip(
            ("out", "dx", "dw_k", "tangent"), errors[:4], errors[4:], strict=True
        ):
            if what == "tangent" and "scores" in case:
                # The float64 composition is no exact tangent at such scores (see
                # test_numerics.py's large-score tangents).
                continue
            assert error <= FACTOR * reference_error + floor, (case, what)


# Shapes drawn at random (a fixed seed) that reach the kernels' blocked
# paths, which the widths above are too small for: blocks of rows scored by
# columns with one or two vectors of scores (up to 16 x 16), tiles of 24 or
# 32 rows and their short last tiles, AMX tiles, pieces of long sequences,
# full width, masks, lengths, an attn_bias with -inf, ragged batches with
# empty sequences. Forward, dx and du of folded_attention_pool(_varlen)
# against the reference in float64 on u as the kernels score it. Prints the
# cases that miss their tolerance.
RANDOM_SHAPES = r"""
import json, random, sys
import torch, attnpool
sys.path.insert(0, TESTS)
from helpers import scored_u
from attnpool import reference

# Output: |got - want| <= t (1 + |want|); gradients: <= t (1 + max |want| + |want|)
# (bfloat16 three times that).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
missed = []
for case in range(CASES):
    draw = random.Random(case)
    gen = torch.Generator().manual_seed(case)
    dtype = draw.choice(dtypes)
    hidden = draw.choice([16, 32, 48, 96, 160, 256, 384])
    heads = draw.choice([n for n in (1, 2, 3, 4, 8, 12, 16) if hidden % n == 0])
    queries = draw.choice([None, 1, 2, 4, 8, 16])
    full_width = draw.random() < 0.3
    batch, length = draw.randint(0, 4), draw.choice([0, 1, 7, 31, 33, 64, 100, 257])
    kind = draw.choice(["none", "mask", "lengths", "bias", "varlen"])
    scale = draw.choice([0.5, 1.0, 2.0])
    if kind == "varlen":
        lengths = torch.randint(0, length + 1, (batch,), generator=gen)
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        x = torch.randn(int(offsets[-1]), hidden, generator=gen).to(dtype)
    else:
        x = torch.randn(batch, length, hidden, generator=gen).to(dtype)
    u_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    u_shape = (heads, hidden) if queries is None else (queries, heads, hidden)
    u = (torch.randn(u_shape, generator=gen) / hidden**0.5).to(u_dtype)
    options = {}
    if kind == "mask":
        options["mask"] = torch.rand(batch, length, generator=gen) > 0.3
    if kind == "lengths":
        options["lengths"] = torch.randint(0, length + 1, (batch,), generator=gen)
    if kind == "bias":
        bias = torch.randn(batch, length, generator=gen)
        options["attn_bias"] = bias.masked_fill(torch.rand(batch, length, generator=gen) < 0.2, float("-inf"))

    def pool(x, u, module):
        if kind != "varlen":
            return module.folded_attention_pool(x, u, scale=scale, full_width=full_width, **options)
        if module is attnpool:
            return attnpool.folded_attention_pool_varlen(
                x, u, cu_seqlens=offsets, scale=scale, full_width=full_width
            )
        return reference.folded_attention_pool_varlen(x, offsets, u, scale, full_width)

    def pooled_and_grads(x, u, module, grad=None):
        x, u = x.detach().requires_grad_(), u.detach().requires_grad_()
        out = pool(x, u, module)
        if grad is None:
            grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        if out.numel() == 0:
            return out.double(), grad, x.new_zeros(x.shape).double(), u.new_zeros(u.shape).double()
        dx, du = torch.autograd.grad((out.double() * grad).sum(), (x, u))
        return out.double(), grad, dx.double(), du.double()

    got, grad, *got_grads = pooled_and_grads(x, u, attnpool)
    want, _, *want_grads = pooled_and_grads(x.double(), scored_u(u, x).double(), reference, grad)
    t = TOLERANCE[dtype]
    errors = {"out": ((got - want).abs() / (t * (1 + want.abs()))).max().item() if want.numel() else 0}
    for name, g, w in zip(("dx", "du"), got_grads, want_grads):
        biggest = w.abs().max().item() if w.numel() else 0.0
        bound = t * (3 if dtype == torch.bfloat16 else 1) * (1 + biggest + w.abs())
        errors[name] = ((g - w).abs() / bound).max().item() if w.numel() else 0
    if max(errors.values()) > 1:
        shape = (dtype, kind, batch, length, hidden, heads, queries, full_width)
        missed.append([case, str(shape), errors])
print(json.dumps({"isa": attnpool._C.cpu_kernel_isa(), "missed": missed}))
"""


# The softmax weights themselves, whose exponentials AVX2 and AVX-512 compute
# in their own code ([Note: the softmax's exponential] in
# csrc/ops/cpu/isa/vec_helpers.h): rows of x one-hot, so that out[k] holds
# score k's weights, for scores down to -120 below the max (into subnormals
# and past them to 0), through each path that weighs scores: one score,
# dot products into lanes, scores by columns, two scores a vector. Each weight
# within 8 ulp plus what rounding its argument (x - max) to float32 may
# cost, |x - max| ulp (Sleef's exp measured 0.47 of that bound); below
# 2^-100, where the kernels take a weight as 0 ([Note: no subnormal weights]
# in csrc/ops/cpu/isa/vec_helpers.h), within 2^-100. The gradient of u (the
# backward's exponentials) within 2e-6 of float64's.
SOFTMAX_WEIGHTS = r"""
import json, torch, attnpool
L = 256
gen = torch.Generator().manual_seed(0)
x = torch.eye(L)[None].repeat(2, 1, 1)
worst = {}
for scores in (1, 2, 8, 12, 16, 24):
    for low in (-1.0, -20.0, -86.0, -100.0, -120.0):
        u = (torch.rand(scores, L, generator=gen, dtype=torch.float64) * low).float()
        u[:, 7] = 0.0
        u = u.requires_grad_()
        out = attnpool.folded_attention_pool(x, u, scale=1.0, full_width=True)
        grad = torch.randn(out.shape, generator=gen)
        (du,) = torch.autograd.grad(out, u, grad)
        u64 = u.detach().double().requires_grad_()
        want = torch.softmax(u64, -1).expand(2, -1, -1)
        (du_want,) = torch.autograd.grad(want, u64, grad.double())
        ulp = 2.0**-23
        smallest = 2.0**-100
        want = want.detach()
        allowed = want * (8 + u64.detach().abs()) * ulp
        allowed = torch.where(want < smallest, smallest, allowed)
        weights = ((out.double() - want).abs() / allowed).max().item()
        gradient = ((du.double() - du_want).norm() / du_want.norm() / 2e-6).item()
        worst[f"{scores}/{low}"] = max(weights, gradient)
print(json.dumps({"isa": attnpool._C.cpu_kernel_isa(), "worst": worst}))
"""


@pytest.mark.parametrize("isa", ISAS)
def test_softmax_weights_at_each_instruction_set(isa):
    report = _report_at(isa, SOFTMAX_WEIGHTS)
    assert len(report["worst"]) == 30
    missed = {case: error for case, error in report["worst"].items() if error > 1}
    assert missed == {}


@pytest.mark.parametrize("isa", ISAS)
def test_random_shapes_at_each_instruction_set(isa):
    tests = os.path.dirname(os.path.abspath(__file__))
    script = RANDOM_SHAPES.replace("TESTS", repr(tests)).replace("CASES", "60")
    report = _report_at(isa, script)
    assert report["missed"] == []


def test_in_process_kernels_are_the_best_the_cpu_allows():
    lowered = {"ATEN_CPU_CAPABILITY", "ATTNPOOL_CPU_CAPABILITY"} & set(os.environ)
    assert attnpool._C.cpu_kernel_isa() == _supported_isas()[-1] or lowered


PRINT_ISA = "import attnpool; print(attnpool._C.cpu_kernel_isa())"


def test_attnpool_capability_only_lowers_the_level():
    best = _supported_isas()[-1]
    for requested in ISAS:
        result = _run(PRINT_ISA, requested)
        assert result.returncode == 0, result.stderr
        want = requested if ISAS.index(requested) <= ISAS.index(best) else best
        assert result.stdout.split()[-1] == want, requested


@pytest.mark.parametrize("aten_isa", ["DEFAULT", "AVX2"])
def test_aten_capability_lowers_the_level_too(aten_isa):
    if aten_isa not in _supported_isas():
        pytest.skip(f"this CPU does not support {aten_isa}")
    result = _run(PRINT_ISA, aten_isa=aten_isa)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == aten_isa


def test_unknown_attnpool_capability_is_a_clear_error():
    result = _run(PRINT_ISA, "avx1024")
    assert result.returncode != 0
    assert "ATTNPOOL_CPU_CAPABILITY must be one of" in result.stderr
    assert "avx1024" in result.stderr


# attnpool::_softmax_without_subnormals (the path that projects the keys),
# whose CPU kernel takes the pooling kernels' exponentials at AVX2 and up
# and ATen's softmax below: rows of every width from one lane to past a
# vector's tail, scores down to -120 below the max. Each weight within 8 ulp
# plus |s - max| ulp of float64's (as above), 0 where e^(s - max) is below
# 2^-100 (2^-996 in float64), never subnormal; the scores' gradient 0 where
# the weight is, never subnormal either; rows with NaN or only -inf as
# torch.softmax gives them.
SOFTMAX_WITHOUT_SUBNORMALS = r"""
import json, torch, attnpool
op = torch.ops.attnpool._softmax_without_subnormals
gen = torch.Generator().manual_seed(0)
worst = {}
for dtype, ulp, smallest, tiny in (
    (torch.float32, 2.0**-23, 2.0**-100, torch.finfo(torch.float32).tiny),
    (torch.float64, 2.0**-52, 2.0**-996, torch.finfo(torch.float64).tiny),
):
    for width in (1, 5, 16, 17, 40, 100, 257):
        for low in (-1.0, -20.0, -86.0, -120.0, -800.0):
            s = (torch.rand(6, width, generator=gen, dtype=torch.float64) * low).to(dtype)
            s[:, width // 2] = 3.0
            s = s.requires_grad_()
            weights = op(s)
            grad = torch.randn(weights.shape, generator=gen, dtype=dtype)
            (ds,) = torch.autograd.grad(weights, s, grad)
            want = torch.softmax(s.detach().double(), -1)
            shift = (s.detach().double() - 3.0).abs()
            allowed = torch.where(want < smallest, smallest, want * (8 + shift) * ulp)
            error = ((weights.double() - want).abs() / allowed).max().item()
            subnormal = lambda t: ((t != 0) & (t.abs() < tiny)).any().item()
            cut_grad = (ds[weights == 0] != 0).any().item()
            worst[f"{dtype}/{width}/{low}"] = [error, subnormal(weights), subnormal(ds), cut_grad]
special = torch.randn(4, 19, generator=gen)
special[0, 3] = float("nan")
special[1] = float("-inf")
special[2, :6] = float("-inf")
same = torch.equal(op(special).isnan(), torch.softmax(special, -1).isnan())
close = torch.allclose(op(special[2:]), torch.softmax(special[2:], -1), atol=1e-7)
print(json.dumps({"isa": attnpool._C.cpu_kernel_isa(), "worst": worst, "special": [same, close]}))
"""


@pytest.mark.parametrize("isa", ISAS)
def test_softmax_without_subnormals_at_each_instruction_set(isa):
    report = _report_at(isa, SOFTMAX_WITHOUT_SUBNORMALS)
    assert len(report["worst"]) == 2 * 7 * 5
    for case, (error, subnormal_weight, subnormal_grad, cut_grad) in report["worst"].items():
        assert error <= 1, case
        assert not subnormal_weight and not subnormal_grad and not cut_grad, case
    assert report["special"] == [True, True]
