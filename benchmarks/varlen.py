"""Times attention pooling of a ragged batch: 64 sequences of skewed lengths
(log-normal, mean about 128, one of 2,048 rows), H = 768, one query and one
head, float32 and bfloat16. Contenders, all computing the same pooled vectors:

- varlen: attnpool.attention_pool_varlen on the packed rows [T, H];
- lengths: attnpool.attention_pool on the right-padded [64, 2048, H] batch
  with lengths;
- mask: the same padded batch with a boolean mask;
- PyG: torch_geometric's AttentionalAggregation(gate_nn=Linear(H, 1)) on the
  packed rows, with the gate holding the folded query (same softmax weights);
- the read floor: the faster of x.sum() and x @ v on the packed rows.

    python benchmarks/varlen.py [--threads 2] [--repeats 7] [--malloc reuse|system]

It ends with issue #16's targets, one PASS/FAIL line each, per dtype.

Calls are interleaved round by round, each round timing back-to-back calls
of one contender for at least 20 ms; each figure is the median over rounds.
--malloc is attnpool.bench's: "reuse" (the default) has glibc keep freed
blocks, as jemalloc or tcmalloc would; "system" leaves glibc's defaults,
where every large tensor is fresh memory whose pages fault on first write.
"""

import math

import torch

import attnpool
from attnpool.bench import (
    forward_backward,
    print_targets,
    script_parser,
    start_script,
    target,
    time_interleaved,
)

BATCH, LONGEST, HIDDEN, MEAN_LENGTH = 64, 2048, 768, 128


def skewed_lengths(seed=0):
    """Log-normal lengths with mean about MEAN_LENGTH, the first one LONGEST."""
    gen = torch.Generator().manual_seed(seed)
    sigma = 0.8
    mu = math.log(MEAN_LENGTH) - sigma**2 / 2
    lengths = torch.randn(BATCH, generator=gen).mul(sigma).add(mu).exp().round().clamp(1, LONGEST)
    lengths[0] = LONGEST
    return lengths.long()


def contenders(dtype):
    torch.manual_seed(0)
    lengths = skewed_lengths()
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    rows = torch.randn(int(offsets[-1]), HIDDEN).to(dtype)
    padded = rows.new_zeros(BATCH, LONGEST, HIDDEN)
    mask = torch.arange(LONGEST)[None, :] < lengths[:, None]
    padded[mask] = rows
    query = torch.randn(HIDDEN)
    w_q, w_k = (torch.randn(HIDDEN, HIDDEN) / HIDDEN**0.5 for _ in range(2))
    u = attnpool.fold_query(query, w_q, w_k)  # [1, H]
    scale = HIDDEN**-0.5
    pooling = {
        "varlen": (
            rows,
            lambda x: attnpool.attention_pool_varlen(x, query, w_q, w_k, cu_seqlens=offsets),
        ),
        "lengths": (padded, lambda x: attnpool.attention_pool(x, query, w_q, w_k, lengths=lengths)),
        "mask": (padded, lambda x: attnpool.attention_pool(x, query, w_q, w_k, mask)),
    }
    try:
        from torch_geometric.nn.aggr import AttentionalAggregation

        gate = torch.nn.Linear(HIDDEN, 1).to(dtype)
        with torch.no_grad():
            gate.weight.copy_(u * scale)
        index = torch.repeat_interleave(torch.arange(BATCH), lengths)
        peer = AttentionalAggregation(gate_nn=gate)
        pooling["PyG AttentionalAggregation"] = (
            rows,
            lambda x: peer(x, index, dim_size=BATCH),
        )
    except ImportError:
        print("(torch_geometric is not installed: PyG is not timed)")
    v = torch.randn(HIDDEN, 1).to(dtype)
    floor = {
        "x.sum() (packed)": lambda: rows.sum(),
        "x @ v (packed)": lambda: rows @ v,
    }
    return rows, pooling, floor


MIN_SECONDS = 0.02


def milliseconds(seconds: dict) -> dict:
    return {name: 1e3 * value for name, value in seconds.items()}


def main() -> None:
    args = script_parser(__doc__, repeats=7).parse_args()
    malloc = start_script(args)
    lengths = skewed_lengths()
    print(
        f"{BATCH} sequences, {int(lengths.sum())} rows (mean {lengths.float().mean():.0f}, "
        f"longest {int(lengths.max())}), H={HIDDEN}, {args.threads} threads, "
        f"median of {args.repeats} rounds; malloc: {malloc}"
    )
    checks = []
    for dtype in (torch.float32, torch.bfloat16):
        rows, pooling, floor = contenders(dtype)
        calls = dict(floor)
        for name, (x, run) in pooling.items():
            calls[f"forward: {name}"] = lambda x=x, run=run: run(x)
            calls[f"forward+backward: {name}"] = lambda x=x, run=run: forward_backward(x, run)
        # Each sample: back-to-back calls for at least MIN_SECONDS (one call of
        # a few tenths of a millisecond timed alone was mostly noise).
        with torch.no_grad():
            ms = milliseconds(
                time_interleaved(
                    {k: c for k, c in calls.items() if "backward" not in k},
                    args.repeats,
                    MIN_SECONDS,
                )
            )
        ms.update(
            milliseconds(
                time_interleaved(
                    {k: c for k, c in calls.items() if "backward" in k}, args.repeats, MIN_SECONDS
                )
            )
        )
        read = min(ms[name] for name in floor)
        print(f"\n{str(dtype).replace('torch.', '')}: one read of the packed x = {read:.2f} ms")
        for name in pooling:
            fwd, both = ms[f"forward: {name}"], ms[f"forward+backward: {name}"]
            print(
                f"  {name:28s} forward {fwd:8.2f} ms ({fwd / read:5.2f}x the read)   "
                f"forward+backward {both:8.2f} ms"
            )
        varlen = ms["forward+backward: varlen"]
        for name in pooling:
            if name != "varlen":
                print(
                    f"  forward+backward, {name} / varlen: "
                    f"{ms[f'forward+backward: {name}'] / varlen:.2f}"
                )
        print(
            "  forward+backward, mask / lengths: "
            f"{ms['forward+backward: mask'] / ms['forward+backward: lengths']:.2f}"
        )
        checks += targets(str(dtype).replace("torch.", ""), ms, read, list(pooling))
    print_targets(checks)


def targets(dtype: str, ms: dict, read: float, names: list) -> list:
    """Issue #16's targets for one dtype, as bench.print_targets takes them."""

    def both(name):
        return ms[f"forward+backward: {name}"]

    checks = [
        target(f"{dtype}: forward+backward, mask / varlen", both("mask") / both("varlen"), 2.0),
        target(
            f"{dtype}: varlen forward / read",
            ms["forward: varlen"] / read,
            1.3,
            lower_is_better=True,
        ),
        target(f"{dtype}: forward+backward, mask / lengths", both("mask") / both("lengths"), 1.5),
    ]
    peer = "PyG AttentionalAggregation"
    if peer in names:
        description = f"{dtype}: forward+backward, {peer} / varlen"
        checks.insert(1, target(description, both(peer) / both("varlen"), 4.0))
    return checks


if __name__ == "__main__":
    main()
