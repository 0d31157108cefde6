"""DistributedDataParallel: two processes (gloo, CPU, loopback) that each see
half of a global batch give the gradients of one process on the whole batch,
and a short training run keeps both replicas equal to that one process.

The test starts the processes itself (torch.multiprocessing, "spawn") and
gets their results back through files in pytest's tmp_path.
"""

import datetime
import gc
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import PoolingModel
from torch import nn
from torch.nn.parallel import DistributedDataParallel

WORLD_SIZE = 2
HIDDEN, NUM_CLASSES = 16, 4
GLOBAL_BATCH, SEQ_LEN, STEPS = 8, 12, 5
TIMEOUT_S = 120


def _make_model():
    torch.manual_seed(0)
    model = PoolingModel(HIDDEN, num_heads=4, num_queries=2, out_features=NUM_CLASSES, flatten=True)
    return model.double()


def _global_batches():
    """STEPS global batches (x, mask, labels); the same in every process."""
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, SEQ_LEN, HIDDEN, generator=gen, dtype=torch.float64)
        lengths = torch.randint(0, SEQ_LEN + 1, (GLOBAL_BATCH,), generator=gen)
        mask = torch.arange(SEQ_LEN)[None, :] < lengths[:, None]  # some rows fully masked
        labels = torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=gen)
        batches.append((x, mask, labels))
    return batches


def _train(model, batches, shard=slice(None)):
    """SGD on the mean cross-entropy of each batch's `shard`; returns the
    first step's gradients and the parameters after every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    first_grads, params = None, []
    for x, mask, labels in batches:
        logits = model(x[shard], mask[shard])
        loss = nn.functional.cross_entropy(logits, labels[shard])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in _module(model).named_parameters()}
        optimizer.step()
        params.append({n: p.detach().clone() for n, p in _module(model).named_parameters()})
    return first_grads, params


def _module(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=TIMEOUT_S // 2),
    )
    try:
        model = DistributedDataParallel(_make_model())
        per_rank = GLOBAL_BATCH // WORLD_SIZE
        shard = slice(rank * per_rank, (rank + 1) * per_rank)
        grads, params = _train(model, _global_batches(), shard)
        torch.save({"grads": grads, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))
        # Teardown in a fixed order: no rank closes its connections while the
        # other still communicates, and DDP's reducer (which holds the process
        # group and its gloo threads) goes before the group, not at interpreter
        # exit, where destroying it can abort the process.
        dist.barrier()
        del model
        gc.collect()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out_dir):
    context = mp.start_processes(
        _worker,
        args=(_free_port(), str(out_dir)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1):  # raises if a worker failed
            assert time.monotonic() < deadline, f"DDP workers still running after {TIMEOUT_S} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def _assert_same(got, want, what):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], atol=1e-10, rtol=1e-9, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


def test_ddp_matches_one_process_on_the_global_batch(tmp_path):
    results = _run_workers(tmp_path)
    want_grads, want_params = _train(_make_model(), _global_batches())
    assert all(g.abs().sum() > 0 for g in want_grads.values())
    for rank, result in enumerate(results):
        # Averaged over the ranks, the half-batch gradients are the global ones.
        _assert_same(result["grads"], want_grads, f"rank {rank}, first-step gradient of")
        assert len(result["params"]) == STEPS
        for step, (got, want) in enumerate(zip(result["params"], want_params, strict=True)):
            _assert_same(got, want, f"rank {rank}, step {step}, parameter")
    # The replicas stayed in sync with each other, to the bit.
    for name, value in results[0]["params"][-1].items():
        assert torch.equal(value, results[1]["params"][-1][name]), name
    # And training moved them.
    assert not torch.equal(want_params[-1]["pool.query"], _make_model().pool.query)
