"""Benchmark: several queries and heads, each shape against its roofline.

    python -m attnpool.bench_grid [--out DIR] [--threads 2] [--dtypes float32,bfloat16]
                                  [--points 1x1,1x12,...] [--rounds 7]

For each grid point (queries x heads on one x, or full width) and dtype it
times, interleaved in one run (medians over rounds):

  attnpool   folded_attention_pool on the folded query u [Q, n, H]; at the
             CoCa point, attention_pool itself from the query and weights
             (it projects the keys there, as Q * n > H + Q), and the
             compositions from the same inputs
  eager      the same math in PyTorch: one matmul for the scores, softmax,
             one einsum for the weighted sums
  sdpa       the composition that projects the keys instead of folding the
             query: x @ w_k.T, then F.scaled_dot_product_attention per head
             (points with Q * n >= 64, where projecting starts to pay)
  read       the faster of x.sum() and x.view(-1, H) @ v: one read of x

and reports each point's roofline: the larger of one read of x and its
multiply-adds (SPEC.md §5: Q * n for the scores, plus Q for head slices or
Q * n at full width, per element of x) at the rate of a large torch.matmul in
the same dtype, measured in the same run. Forward+backward is timed too,
against the same compositions' backward. It prints the table, checks the
targets of the multi-head work and writes DIR/grid.json.

The malloc is configured as in attnpool.bench (--malloc reuse by default).
"""

import argparse
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import attnpool
from attnpool.bench import (
    configure_malloc,
    cpu_model,
    print_targets,
    target,
    time_interleaved,
    write_report,
)


@dataclass(frozen=True)
class Point:
    name: str
    shape: tuple  # (B, L, H)
    num_queries: int
    num_heads: int
    full_width: bool = False
    # Time attention_pool from (query, w_q, w_k) rather than the pooling on u.
    from_weights: bool = False

    @property
    def num_scores(self):
        return self.num_queries * self.num_heads

    def multiply_adds(self):
        """Multiply-adds of the forward (SPEC.md §5)."""
        batch, seq_len, hidden = self.shape
        sums = self.num_scores if self.full_width else self.num_queries
        return batch * seq_len * hidden * (self.num_scores + sums)


BERT = (32, 512, 768)
POINTS = {
    p.name: p
    for p in [
        Point("1x1", BERT, 1, 1),
        Point("1x12", BERT, 1, 12),
        Point("1x16", BERT, 1, 16),
        Point("4x12", BERT, 4, 12),
        Point("8x1", BERT, 8, 1),
        Point("16x12", BERT, 16, 12),
        # so400m's head slices: 72 columns, not a whole number of vectors.
        Point("so400m-1x16", (16, 729, 1152), 1, 16),
        Point("so400m-full", (16, 729, 1152), 1, 16, full_width=True),
        Point("coca-256x8", (8, 256, 768), 256, 8, from_weights=True),
    ]
}
QUICK_POINTS = {
    p.name: p
    for p in [
        Point("2x4", (2, 16, 32), 2, 4),
        Point("3x2-full", (2, 16, 32), 3, 2, full_width=True),
    ]
}
# Where the projecting composition is timed: with few scores it reads x
# several times over for nothing.
SDPA_MIN_SCORES = 64


def eager_pool(x, u, scale, full_width):
    """The folded math in PyTorch: scores by one matmul, softmax over the
    sequence, weighted sums by one einsum."""
    batch, seq_len, hidden = x.shape
    num_queries, num_heads, _ = u.shape
    scores = (x @ u.reshape(-1, hidden).to(x.dtype).T) * scale  # [B, L, Q*n]
    probs = torch.softmax(scores, dim=1)
    if full_width:
        out = torch.einsum("bls,blh->bsh", probs, x)
        return out.view(batch, num_queries, num_heads, hidden)
    head_dim = hidden // num_heads
    out = torch.einsum(
        "blqn,blnd->bqnd",
        probs.view(batch, seq_len, num_queries, num_heads),
        x.view(batch, seq_len, num_heads, head_dim),
    )
    return out.reshape(batch, num_queries, hidden)


def projected_pool(x, queries, w_k, scale):
    """Pooling by projecting every key: x @ w_k.T, then SDPA per head with
    the projected queries [Q, n, d]; values are x's head slices."""
    batch, seq_len, hidden = x.shape
    num_queries, num_heads, head_dim = queries.shape
    keys = (x @ w_k.to(x.dtype).T).view(batch, seq_len, num_heads, head_dim).transpose(1, 2)
    values = x.view(batch, seq_len, num_heads, head_dim).transpose(1, 2)
    q = queries.to(x.dtype).transpose(0, 1)[None].expand(batch, -1, -1, -1)
    out = F.scaled_dot_product_attention(q, keys, values, scale=scale)  # [B, n, Q, d]
    return out.transpose(1, 2).reshape(batch, num_queries, hidden)


def make_methods(
    point: Point, dtype: torch.dtype, training: bool, device: str = "cpu", compiled: bool = False
):
    """name -> one call of that method on `device`: attnpool, eager, sdpa
    (where it applies), read-sum and read-matvec; with `compiled` also
    torch.compile of eager ("compiled")."""
    batch, seq_len, hidden = point.shape
    num_queries, num_heads = point.num_queries, point.num_heads
    head_dim = hidden // num_heads
    gen = torch.Generator(device).manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=gen, device=device)

    x = randn(batch, seq_len, hidden).to(dtype)
    w_k = randn(hidden, hidden) / hidden**0.5
    queries = randn(num_queries, num_heads, head_dim)
    # u[i, h] = w_k[D_h].T @ q'[i, h] (SPEC.md §5), so that the projecting
    # composition computes the same scores.
    u = torch.einsum("qnd,ndh->qnh", queries, w_k.view(num_heads, head_dim, hidden))
    scale = head_dim**-0.5
    x_in = x.clone().requires_grad_(training)
    u.requires_grad_(training)
    leaves = [x_in, u]

    eager_compiled = torch.compile(eager_pool, dynamic=False) if compiled else None
    forwards = {
        "attnpool": lambda: attnpool.folded_attention_pool(
            x_in, u, scale=scale, full_width=point.full_width
        ),
        "eager": lambda: eager_pool(x_in, u, scale, point.full_width),
    }
    if compiled:
        forwards["compiled"] = lambda: eager_compiled(x_in, u, scale, point.full_width)
    if point.from_weights:
        query = randn(num_queries, hidden).requires_grad_(training)
        w_q = (randn(hidden, hidden) / hidden**0.5).requires_grad_(training)
        w_k.requires_grad_(training)
        leaves = [x_in, query, w_q, w_k]

        def projected_query():
            return (query @ w_q.T).view(num_queries, num_heads, head_dim)

        def folded():
            return torch.einsum(
                "qnd,ndh->qnh", projected_query(), w_k.view(num_heads, head_dim, hidden)
            )

        forwards = {
            "attnpool": lambda: attnpool.attention_pool(
                x_in, query, w_q, w_k, num_heads=num_heads, scale=scale
            ),
            "eager": lambda: eager_pool(x_in, folded(), scale, False),
            "sdpa": lambda: projected_pool(x_in, projected_query(), w_k, scale),
        }
        if compiled:
            forwards["compiled"] = lambda: eager_compiled(x_in, folded(), scale, False)
    elif point.num_scores >= SDPA_MIN_SCORES and not point.full_width:
        w_k.requires_grad_(training)
        queries.requires_grad_(training)
        leaves += [w_k, queries]
        forwards["sdpa"] = lambda: projected_pool(x_in, queries, w_k, scale)
    grad_out = randn(forwards["attnpool"]().shape).to(dtype)

    def step(fn):
        if not training:
            return fn

        def run():
            for leaf in leaves:
                leaf.grad = None
            fn().backward(grad_out)

        return run

    methods = {name: step(fn) for name, fn in forwards.items()}
    v = randn(hidden).to(dtype)
    flat = x.view(-1, hidden)
    methods["read-sum"] = lambda: x.sum()
    methods["read-matvec"] = lambda: flat @ v
    return methods


def matmul_rate(dtype, size=1536, rounds=5):
    """Multiply-adds per second of a large torch.matmul in dtype."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    seconds = time_interleaved({"matmul": lambda: a @ b}, rounds, 0.2)["matmul"]
    return size**3 / seconds


def measure(points, dtypes, threads, rounds, min_seconds, log):
    torch.set_num_threads(threads)
    results = []
    for dtype in dtypes:
        rate = matmul_rate(dtype)
        dtype_name = str(dtype).replace("torch.", "")
        log(f"{dtype_name}: large matmul at {rate / 1e9:.0f} G multiply-adds/s")
        for point in points.values():
            row = dict(
                point=point.name,
                dims=list(point.shape),
                queries=point.num_queries,
                heads=point.num_heads,
                full_width=point.full_width,
                dtype=dtype_name,
                threads=threads,
                matmul_rate=rate,
                multiply_adds=point.multiply_adds(),
            )
            for mode, training in (("forward", False), ("forward+backward", True)):
                seconds = time_interleaved(
                    make_methods(point, dtype, training), rounds, min_seconds
                )
                read = min(seconds.pop("read-sum"), seconds.pop("read-matvec"))
                row[mode] = dict(seconds, read=read)
            row["roofline"] = max(row["forward"]["read"], point.multiply_adds() / rate)
            results.append(row)
            log(format_row(row))
    return results


def format_row(row):
    fw = " full width" if row["full_width"] else ""
    head = f"{row['point']:>11} {'x'.join(map(str, row['dims'])):>12} {row['dtype']:>8}{fw:11}"
    forward, both = row["forward"], row["forward+backward"]
    ours = forward["attnpool"]
    cells = [
        f"roofline {row['roofline'] * 1e3:7.2f} ms",
        f"fwd {ours * 1e3:7.2f} ms = {ours / row['roofline']:4.2f}x roofline",
    ]
    for name in ("eager", "sdpa"):
        if name in forward:
            cells.append(
                f"{name}/attnpool fwd {forward[name] / ours:5.2f}x"
                f" fwd+bwd {both[name] / both['attnpool']:5.2f}x"
            )
    return f"{head} | " + "  ".join(cells)


# The targets of the multi-head work (float32 speed-ups over eager).
SPEEDUP_TARGETS = {
    "1x12": (2.0, 1.5),
    "1x16": (2.0, 1.5),
    "4x12": (1.2, 1.2),
    "8x1": (1.2, 1.2),
    "16x12": (1.2, 1.2),
    "so400m-full": (3.0, None),
}
ROOFLINE_TARGET = 1.5


def has_amx_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def check_targets(results):
    """(description, measured, relation, limit, passed) for each target."""
    checks = []

    def add(description, value, limit, lower_is_better):
        checks.append(target(description, value, limit, lower_is_better))

    for row in results:
        label = f"{row['point']} {row['dtype']}"
        forward, both = row["forward"], row["forward+backward"]
        if row["dtype"] == "float32" or has_amx_bf16():
            add(
                f"{label}: forward / roofline",
                forward["attnpool"] / row["roofline"],
                ROOFLINE_TARGET,
                True,
            )
        for mode, times in (("forward", forward), ("fwd+bwd", both)):
            others = [times[name] for name in ("eager", "sdpa") if name in times]
            add(
                f"{label}: fastest composition / attnpool, {mode}",
                min(others) / times["attnpool"],
                1.0,
                False,
            )
        targets = SPEEDUP_TARGETS.get(row["point"])
        if targets and row["dtype"] == "float32":
            for limit, (mode, times) in zip(
                targets, (("forward", forward), ("fwd+bwd", both)), strict=True
            ):
                if limit is not None:
                    add(
                        f"{label}: eager / attnpool, {mode}",
                        times["eager"] / times["attnpool"],
                        limit,
                        False,
                    )
    return checks


def select_points(parser, names, points):
    """The points named in --points (comma-separated), all of them without
    it; an unknown name is the parser's error."""
    if not names:
        return points
    unknown = set(names.split(",")) - set(points)
    if unknown:
        parser.error(f"unknown --points {sorted(unknown)}; choose from {list(points)}")
    return {name: points[name] for name in names.split(",")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--out", default="bench-output")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--points", default=None, help=f"comma-separated subset of {list(POINTS)}")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--malloc", default="reuse", choices=["reuse", "system"])
    args = parser.parse_args(argv)
    points = select_points(parser, args.points, QUICK_POINTS if args.quick else POINTS)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    rounds = args.rounds or (2 if args.quick else 7)
    min_seconds = 0.002 if args.quick else 0.05
    malloc = configure_malloc(args.malloc)
    print(
        f"attnpool {attnpool.__version__}, torch {torch.__version__}, {cpu_model()}, "
        f"{args.threads} threads; CPU kernels: {attnpool._C.cpu_kernel_isa()}; malloc: {malloc}"
    )
    results = measure(points, dtypes, args.threads, rounds, min_seconds, print)
    checks = check_targets(results)
    print_targets(checks)
    os.makedirs(args.out, exist_ok=True)
    write_report(os.path.join(args.out, "grid.json"), results, checks, malloc=malloc)
    print(f"\nwrote {args.out}/grid.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
