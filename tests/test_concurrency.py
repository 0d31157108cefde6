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
from helpers import (
    CONCURRENT_JOBS,
    DEVICES,
    assert_bitwise_equal,
    concurrent_job,
    forward_backward,
)

import attnpool

NUM_THREADS = 8  # threads at once; the jobs they run are helpers.CONCURRENT_JOBS


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
    jobs = [concurrent_job(i, device) for i in range(NUM_THREADS)]
    sequential = [forward_backward(inputs, heads) for inputs, heads in jobs]
    for repeat in range(3):
        concurrent = _run_in_threads(lambda i: forward_backward(*jobs[i]), NUM_THREADS)
        for i in range(NUM_THREADS):
            assert_bitwise_equal(concurrent[i], sequential[i], f"repeat {repeat}, job {i}")


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
from helpers import assert_bitwise_equal, concurrent_job, forward_backward
barrier = threading.Barrier({NUM_THREADS})
results = [None] * {NUM_THREADS}
def run(i):
    barrier.wait()
    results[i] = forward_backward(*concurrent_job(i))
threads = [threading.Thread(target=run, args=(i,)) for i in range({NUM_THREADS})]
[x.start() for x in threads]
[x.join() for x in threads]
for i in range({NUM_THREADS}):
    assert_bitwise_equal(results[i], forward_backward(*concurrent_job(i)), f"job {{i}}")
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
    for index in range(len(CONCURRENT_JOBS)):
        inputs, heads = concurrent_job(index, device)
        first = forward_backward(inputs, heads)
        assert_bitwise_equal(forward_backward(inputs, heads), first, f"job {index}")
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
            results[threads] = [
                forward_backward(*concurrent_job(i)) for i in range(len(CONCURRENT_JOBS))
            ]
    finally:
        torch.set_num_threads(before)
    reference = results[1]
    for threads, got in results.items():
        for index, (g, w) in enumerate(zip(got, reference, strict=True)):
            assert_bitwise_equal(g, w, f"{threads} threads, job {index}")


@pytest.mark.parametrize(
    "dtype, hidden, queries",
    [
        (torch.float32, 512, 1),
        (torch.float64, 512, 1),
        (torch.bfloat16, 512, 1),
        (torch.float32, 768, 1),
        (torch.float32, 512, 4),
        (torch.float32, 512, 8),
    ],
)
def test_a_sequence_pools_alike_in_a_small_and_a_large_batch(dtype, hidden, queries):
    # The CPU kernels read float rows a tile at a time when x fits the
    # last-level cache and one at a time when it does not ([Note: rows one
    # at a time]), and prefetch into L1 or L2 ([Note: prefetches from
    # memory]: float32 tiles of rows of 768 into L2 where L1 has 32 KB;
    # [Note: the next tile of float rows]: with 4 or 8 queries of one head,
    # from the weighted sums), summing in the same order: 32 sequences (4 MB
    # in float32 at 512) give the same bits alone as among 1024 (128 MB).
    # One piece per sequence in both batches, so that nothing else differs.
    gen = torch.Generator().manual_seed(0)
    batch, seq_len = 1024, 64
    x = torch.randn(batch, seq_len, hidden, generator=gen, dtype=dtype)
    u = torch.randn(queries, 1, hidden, generator=gen, dtype=dtype) / 8
    mask = torch.rand(batch, seq_len, generator=gen) > 0.3
    bias = torch.randn(batch, seq_len, generator=gen, dtype=dtype)
    grad_out = torch.randn(batch, queries, hidden, generator=gen, dtype=dtype)

    def pool(count):
        leaf = x[:count].clone().requires_grad_()
        out = attnpool.folded_attention_pool(
            leaf, u, mask[:count], scale=0.3, attn_bias=bias[:count]
        )
        out.backward(grad_out[:count])
        return out.detach()[:32], leaf.grad[:32]

    (out_small, dx_small), (out_large, dx_large) = pool(32), pool(batch)
    assert torch.equal(out_small, out_large), "out: 32 sequences alone and among 1024 differ"
    assert torch.equal(dx_small, dx_large), "dx: 32 sequences alone and among 1024 differ"
