"""Memory of the CPU kernels (SPEC.md §4): the forward allocates nothing of
size [B, L, ·] (only the output, the log-sum-exp and O(Q·H) pieces), the
backward only dx besides buffers of size O(H). Allocations are read from the
PyTorch profiler, which records every allocation of PyTorch's CPU allocator."""

import pytest
import torch
from helpers import make_inputs
from torch.profiler import ProfilerActivity, profile

import attnpool


def allocations(fn):
    """Sizes in bytes of the allocations made while fn() runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]


# Long sequences, small H: one float per position of x (B*L*4 bytes) is more
# than any O(Q*H) or O(H^2) buffer, so "nothing of size [B, L, ·]" is testable.
CASES = [
    dict(batch=4, seq_len=8192, hidden=64, num_queries=None, num_heads=1),
    dict(batch=1, seq_len=32768, hidden=32, num_queries=2, num_heads=2),
    dict(batch=64, seq_len=1024, hidden=32, num_queries=None, num_heads=4),
]


@pytest.mark.parametrize("case", CASES, ids=["b4-l8192", "b1-l32768-split", "b64-l1024"])
def test_forward_allocates_nothing_per_position(case):
    inputs = make_inputs(
        case["batch"], case["seq_len"], case["hidden"], case["num_queries"], dtype=torch.float32
    )
    row_floats = case["batch"] * case["seq_len"] * 4  # one float per position of x
    sizes = allocations(
        lambda: attnpool.attention_pool(*inputs.args(), num_heads=case["num_heads"])
    )
    assert sizes, "the profiler saw no allocation at all"
    assert max(sizes) < row_floats, sizes
    assert sum(sizes) < inputs.x.nbytes / 32, sizes


@pytest.mark.parametrize("case", CASES, ids=["b4-l8192", "b1-l32768-split", "b64-l1024"])
def test_backward_allocates_dx_and_small_buffers(case):
    inputs = make_inputs(
        case["batch"], case["seq_len"], case["hidden"], case["num_queries"], dtype=torch.float32
    ).requiring_grad()
    out = attnpool.attention_pool(*inputs.args(), num_heads=case["num_heads"])
    grad = torch.randn_like(out)
    row_floats = case["batch"] * case["seq_len"] * 4
    sizes = allocations(lambda: out.backward(grad))
    large = [s for s in sizes if s >= row_floats]
    assert large == [inputs.x.nbytes], sizes  # dx, and nothing else of size [B, L, ·]
    # du partials: at most 64 work items of Q*n*H floats; the rest is O(H^2).
    small_total = sum(sizes) - inputs.x.nbytes
    hidden = case["hidden"]
    num_scores = (case["num_queries"] or 1) * case["num_heads"]
    assert small_total <= 64 * num_scores * hidden * 4 + 16 * hidden * hidden * 4, sizes
