"""Benchmark of the GPU kernels, timed the way GPU kernels are timed.

    python -m attnpool.bench_gpu [--out DIR] [--dtypes float32,bfloat16] [--points big-1x1,...]
                                 [--rounds 15] [--no-compile] [--quick] [--device cuda|cpu]

Each call is timed by two CUDA events recorded around it on the current
stream, with the L2 cache flushed just before it (a 256 MB write outside the
timed span, as triton.testing.do_bench does), so that x comes from HBM as it
does in a model, and no call is timed with another's inputs still in L2. The
methods of a point run interleaved, round by round; each figure is the median
over rounds. Methods, on the same inputs:

  attnpool   folded_attention_pool on the folded query u (or, at the points
             that start from the weights, attention_pool with its fold)
  eager      the same math in PyTorch (attnpool.bench_grid.eager_pool)
  compiled   torch.compile of eager (left out with --no-compile)
  sdpa       the composition that projects the keys, where bench_grid times it
  read       x.sum(), the floor of the forward
  copy       x.clone(); read + copy is the floor of forward+backward

Points: x of 256 MB to 1 GB (64x2048x1024 with 1 query and 1 or 16 heads,
1x262144x1024 with 1), BERT size and the long sequence of attnpool.bench
from the query and weights (the whole op with its fold), and bench_grid's
queries x heads grid, so400m's full width and CoCa's pooler. It prints each
point's GB/s of x beside x.sum()'s, the fraction of each pass's floor it
reaches, the compositions' times over attnpool's, and PASS/FAIL lines for
the targets of the GPU kernels (forward fractions at the large points, so400m
and BERT size; never slower than eager or compiled), then writes DIR/gpu.json
and DIR/gpu.png.

--device cpu runs the same on the CPU, timed by the wall clock and without a
flush: a smoke run of this script where there is no GPU. The CPU's own
benchmarks are attnpool.bench and attnpool.bench_grid.
"""

import argparse
import os
import statistics
import sys
import time

import torch

import attnpool
from attnpool.bench import print_targets, target, write_report
from attnpool.bench_grid import BERT, Point, make_methods, select_points
from attnpool.bench_grid import POINTS as GRID_POINTS
from attnpool.bench_grid import QUICK_POINTS as GRID_QUICK_POINTS

BIG = (64, 2048, 1024)  # 512 MB in float32, 256 MB in bfloat16
LONGEST = (1, 262144, 1024)  # one sequence: 1 GB in float32
POINTS = {
    p.name: p
    for p in [
        Point("big-1x1", BIG, 1, 1),
        Point("big-1x16", BIG, 1, 16),
        Point("longest-1x1", LONGEST, 1, 1),
        Point("bert-fold", BERT, 1, 1, from_weights=True),
        Point("long-fold", (1, 32768, 1024), 1, 1, from_weights=True),
        *GRID_POINTS.values(),
    ]
}
QUICK_POINTS = {
    p.name: p
    for p in [
        Point("small-fold", (2, 16, 32), 1, 1, from_weights=True),
        *GRID_QUICK_POINTS.values(),
    ]
}
FLUSH_BYTES = 256 << 20

# Fractions of the floor (read for the forward, read + copy for
# forward+backward) the op must reach: (point, dtype or None for both) ->
# (forward, forward+backward or None).
FLOOR_TARGETS = {
    ("big-1x1", None): (0.85, 0.75),
    ("longest-1x1", None): (0.85, 0.75),
    ("big-1x16", "bfloat16"): (0.75, None),
    ("so400m-full", "bfloat16"): (0.70, None),
    ("bert-fold", None): (0.70, None),
}


def time_calls(calls, rounds, device):
    """Median seconds of each call: GPU time between CUDA events with L2
    flushed before each call on "cuda", wall-clock time on the CPU. Calls
    are interleaved round by round after two warm-up calls each (compiling)."""
    on_gpu = device == "cuda"
    for call in calls.values():
        call()
        call()
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device) if on_gpu else None
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        events = []
        for name, call in calls.items():
            if on_gpu:
                flush.zero_()
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                call()
                end.record()
                events.append((name, start, end))
            else:
                begin = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - begin)
        if on_gpu:
            torch.cuda.synchronize()
            for name, start, end in events:
                samples[name].append(start.elapsed_time(end) / 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def floor_calls(point, dtype, device):
    """x.sum() and x.clone() on an x of the point's shape and dtype."""
    x = torch.randn(point.shape, device=device).to(dtype)
    return {"read": lambda: x.sum(), "copy": lambda: x.clone()}


def measure(points, dtypes, rounds, compiled, device, log):
    results = []
    for dtype in dtypes:
        for point in points.values():
            torch._dynamo.reset()  # each point compiles for its own shapes
            batch, seq_len, hidden = point.shape
            row = dict(
                point=point.name,
                dims=list(point.shape),
                queries=point.num_queries,
                heads=point.num_heads,
                full_width=point.full_width,
                from_weights=point.from_weights,
                dtype=str(dtype).replace("torch.", ""),
                bytes=batch * seq_len * hidden * dtype.itemsize,
            )
            for mode, training in (("forward", False), ("forward+backward", True)):
                calls = make_methods(point, dtype, training, device, compiled)
                del calls["read-sum"], calls["read-matvec"]  # on the GPU: read and copy
                if not training:
                    calls |= floor_calls(point, dtype, device)
                row[mode] = time_calls(calls, rounds, device)
                del calls  # the forward's tensors go before the backward's are made
            add_floors(row)
            results.append(row)
            log(format_row(row))
    return results


def add_floors(row):
    """GB/s of x for the forward and x.sum(), and each pass's fraction of its floor."""
    forward, both = row["forward"], row["forward+backward"]
    row["gbps"] = row["bytes"] / forward["attnpool"] / 1e9
    row["read_gbps"] = row["bytes"] / forward["read"] / 1e9
    row["forward_floor"] = forward["read"] / forward["attnpool"]
    row["backward_floor"] = (forward["read"] + forward["copy"]) / both["attnpool"]


def format_row(row):
    fw = " full width" if row["full_width"] else ""
    head = f"{row['point']:>12} {'x'.join(map(str, row['dims'])):>13} {row['dtype']:>8}{fw:11}"
    forward, both = row["forward"], row["forward+backward"]
    cells = [
        f"fwd {forward['attnpool'] * 1e3:7.3f} ms {row['gbps']:6.0f} GB/s"
        f" (x.sum() {row['read_gbps']:5.0f}) = {row['forward_floor']:4.2f} of read",
        f"fwd+bwd {both['attnpool'] * 1e3:7.3f} ms = {row['backward_floor']:4.2f} of read+copy",
    ]
    for name in ("eager", "compiled", "sdpa"):
        if name in forward:
            cells.append(
                f"{name}/attnpool {forward[name] / forward['attnpool']:5.2f}x"
                f" {both[name] / both['attnpool']:5.2f}x"
            )
    return f"{head} | " + "  ".join(cells)


def check_targets(results):
    """(description, measured, relation, limit, passed) for each target."""
    checks = []

    def add(description, value, limit):
        checks.append(target(description, value, limit))

    for row in results:
        label = f"{row['point']} {row['dtype']}"
        for key in ((row["point"], row["dtype"]), (row["point"], None)):
            forward_limit, backward_limit = FLOOR_TARGETS.get(key, (None, None))
            if forward_limit is not None:
                add(f"{label}: forward, fraction of read", row["forward_floor"], forward_limit)
            if backward_limit is not None:
                add(
                    f"{label}: fwd+bwd, fraction of read+copy",
                    row["backward_floor"],
                    backward_limit,
                )
        for mode in ("forward", "forward+backward"):
            times = row[mode]
            others = {name: times[name] for name in ("eager", "compiled") if name in times}
            fastest = min(others, key=others.get)
            add(f"{label}: {fastest} / attnpool, {mode}", others[fastest] / times["attnpool"], 1.0)
    return checks


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['point']}\n{r['dtype']}" for r in results]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(results)), 5))
    places = range(len(results))
    ax.bar([i - 0.2 for i in places], [r["forward_floor"] for r in results], 0.4, label="forward")
    ax.bar(
        [i + 0.2 for i in places],
        [r["backward_floor"] for r in results],
        0.4,
        label="forward+backward",
    )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(places), labels, fontsize=7, rotation=60)
    ax.set_ylabel("fraction of the floor (x.sum(); x.sum() + x.clone())")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--out", default="bench-output")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--points", default=None, help=f"comma-separated subset of {list(POINTS)}")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args(argv)
    if args.device == "cuda" and not (torch.cuda.is_available() and attnpool._C.with_cuda):
        parser.error("--device cuda needs a GPU and attnpool built with its CUDA kernels")
    points = select_points(parser, args.points, QUICK_POINTS if args.quick else POINTS)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    rounds = args.rounds or (2 if args.quick else 15)

    if args.device == "cuda":
        where = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
        timing = (
            "CUDA events around each call, L2 flushed before it "
            f"({FLUSH_BYTES >> 20} MB written outside the timed span)"
        )
    else:
        where = "the CPU"
        timing = "wall clock around each call, no flush (a smoke run without a GPU)"
    print(f"attnpool {attnpool.__version__}, torch {torch.__version__}, on {where}")
    print(f"timed with {timing}; medians of {rounds} rounds, the methods interleaved")
    print("fractions of the floor: read / attnpool (forward), (read + copy) / attnpool (fwd+bwd)")
    results = measure(points, dtypes, rounds, not args.no_compile, args.device, print)
    checks = check_targets(results)
    print_targets(checks)
    os.makedirs(args.out, exist_ok=True)
    write_report(
        os.path.join(args.out, "gpu.json"),
        results,
        checks,
        device=args.device,
        gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
        timing=timing,
    )
    plot(results, os.path.join(args.out, "gpu.png"), f"attnpool kernels on {where}")
    print(f"\nwrote {args.out}/gpu.json and {args.out}/gpu.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
