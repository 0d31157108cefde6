"""Concurrency and determinism: eight threads calling forward and backward at
once get the results of sequential calls, bit for bit;
torch.use_deterministic_algorithms(True) is honoured; the thread count of
the kernels does not change a bit of the result."""

import os
import subprocess
import sys
import threading

import pytest
import torch
from helpers import DEVICES, make_inputs

import attnpool

NUM_THREADS = 8

# (B, L, H, Q, heads, dtype, param dtype): short and long sequences (the long
# ones are split across work items), every dtype, mixed precision, wide heads.
JOBS = [
    (2, 5, 8, None, 1, torch.float64, None),
    (3, 17, 24, 2, 3, torch.float32, None),
    (1, 3000, 32, 2, 4, torch.float32, None),
    (4, 700, 16, None, 2, torch.bfloat16, torch.float32),
    (2, 1500, 40, 3, 2, torch.float16, None),
    (5, 33, 12, 1, 3, torch.bfloat16, None),
    (2, 2500, 64, None, 8, torch.float64, None),
    (3, 0, 8, 2, 2, torch.float32, None),
    (2, 4000, 64, None, 1, torch.float32, None),
    (2, 40, 200, 2, 1, torch.float32, None),  # the fold cut into 6 runs of rows
    (2, 30, 256, None, 2, torch.float64, None),  # 4 runs per head
]


def _job_inputs(index, device="cpu"):
    batch, seq_len, hidden, queries, heads, dtype, param_dtype = JOBS[index]
    inputs = make_inputs(batch, seq_len, hidden, queries, mask="random", seed=index, device=device)
    return inputs.to(dtype=dtype, param_dtype=param_dtype or dtype), heads


def _forward_backward(inputs, num_heads):
    """Output and the gradients of all four inputs (autograd.grad: nothing is
    accumulated into shared .grad fields)."""
    leaves = [t.detach().requires_grad_(True) for t in (inputs.x, inputs.query, inputs.w_q)]
    leaves.append(inputs.w_k.detach().requires_grad_(True))
    out = attnpool.attention_pool(*leaves, inputs.mask, num_heads)
    weights = torch.linspace(-1.0, 1.0, out.numel(), device=out.device).view_as(out)
    grads = torch.autograd.grad((out.float() * weights).sum(), leaves)
    return [out.detach(), *grads]


def _assert_bitwise_equal(got, want, what):
    assert len(got) == len(want)
    for name, g, w in zip(("out", "x", "query", "w_q", "w_k"), got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}: {name}"
        assert torch.equal(g, w), f"{what}: {name} differs"


def _run_in_threads(work, num_threads):
    """Runs work(i) in num_threads threads released at the same moment."""
    barrier = threading.Barrier(num_threads)
    results, errors = [None] * num_threads, []

    def target(i):
        try:
            barrier.wait(timeout=60)
            results[i] = work(i)
        except BaseException as error:  # noqa: B036 (reported below)
            errors.append((i, error))

    threads = [threading.Thread(target=target, args=(i,)) for i in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    assert not errors, errors
    return results


@pytest.mark.parametrize("device", DEVICES)
def test_eight_threads_match_sequential_calls(device):
    jobs = [_job_inputs(i, device) for i in range(NUM_THREADS)]
    sequential = [_forward_backward(inputs, heads) for inputs, heads in jobs]
    for repeat in range(3):
        concurrent = _run_in_threads(lambda i: _forward_backward(*jobs[i]), NUM_THREADS)
        for i in range(NUM_THREADS):
            _assert_bitwise_equal(concurrent[i], sequential[i], f"repeat {repeat}, job {i}")


def test_eight_threads_sharing_one_module_match_sequential_calls():
    torch.manual_seed(0)
    pool = attnpool.AttentionPooling(32, num_heads=4, num_queries=2)
    batches = [
        torch.randn(3, 400 + 50 * i, 32, generator=torch.Generator().manual_seed(i))
        for i in range(NUM_THREADS)
    ]
    params = list(pool.parameters())

    def step(i):
        out = pool(batches[i])
        return [out.detach(), *torch.autograd.grad(out.square().sum(), params)]

    sequential = [step(i) for i in range(NUM_THREADS)]
    concurrent = _run_in_threads(step, NUM_THREADS)
    for i in range(NUM_THREADS):
        for name, g, w in zip(
            ("out", "query", "q_proj", "k_proj"), concurrent[i], sequential[i], strict=True
        ):
            assert torch.equal(g, w), f"thread {i}: {name} differs"


def test_first_calls_from_eight_threads_at_once():
    # A fresh process, so that the very first calls (kernel selection, lazy
    # initialisation) race each other.
    script = f"""
import sys, threading
sys.path.insert(0, {os.path.dirname(__file__)!r})
import test_concurrency as t
barrier = threading.Barrier({NUM_THREADS})
results = [None] * {NUM_THREADS}
def run(i):
    barrier.wait()
    results[i] = t._forward_backward(*t._job_inputs(i))
threads = [threading.Thread(target=run, args=(i,)) for i in range({NUM_THREADS})]
[x.start() for x in threads]
[x.join() for x in threads]
for i in range({NUM_THREADS}):
    t._assert_bitwise_equal(results[i], t._forward_backward(*t._job_inputs(i)), f"job {{i}}")
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_mode_is_honoured(device, deterministic):
    # In deterministic mode the op must not raise (it has no nondeterministic
    # path to alert about), must repeat itself bit for bit, and must not read
    # memory it did not write (torch.empty fills with NaN in this mode).
    assert torch.utils.deterministic.fill_uninitialized_memory
    for index in range(len(JOBS)):
        inputs, heads = _job_inputs(index, device)
        first = _forward_backward(inputs, heads)
        _assert_bitwise_equal(_forward_backward(inputs, heads), first, f"job {index}")
        for t in first:
            assert not t.isnan().any(), f"job {index}: NaN from uninitialised memory"


def test_results_do_not_depend_on_the_thread_count():
    # The work plan depends on the shape only (attention_pool_cpu.h), so one
    # thread and all threads give the same bits.
    before = torch.get_num_threads()
    try:
        results = {}
        for threads in sorted({1, 2, max(before, 2)}):
            torch.set_num_threads(threads)
            results[threads] = [_forward_backward(*_job_inputs(i)) for i in range(len(JOBS))]
    finally:
        torch.set_num_threads(before)
    reference = results[1]
    for threads, got in results.items():
        for index, (g, w) in enumerate(zip(got, reference, strict=True)):
            _assert_bitwise_equal(g, w, f"{threads} threads, job {index}")
