"""Times the op on scores spread far apart, as a trained head's often are,
against the same shapes with scores of standard deviation 1: many weights
e^(s - max) of a wide spread fall below the smallest normal float, where
arithmetic can cost a CPU many times its usual time ([Note: no subnormal
weights] in csrc/ops/cpu/isa/vec_helpers.h). Forward and forward+backward
of folded_attention_pool, and the forward of the eager composition
(bench_grid's eager_pool) beside it, at scores of standard deviation 1, 10
and 30 per head. CoCa's pooler (256 queries x 8 heads) runs attention_pool,
which projects the keys there, beside the composition that calls
scaled_dot_product_attention (bench_grid's projected_pool), at queries
scaled to spread its scores alike.

    python benchmarks/score_spread.py [--threads 2] [--repeats 7] [--malloc reuse|system]

Calls are interleaved round by round; each figure is the median over rounds.
Targets: each spread's time within 1.15x of the same shape's at spread 1.
"""

import torch

import attnpool
from attnpool.bench import (
    forward_backward,
    print_targets,
    script_parser,
    start_script,
    target,
    time_rounds,
)
from attnpool.bench_grid import eager_pool, projected_pool

# name: (batch, seq_len, hidden, queries, heads, full_width)
SHAPES = {
    "1x1": (32, 512, 768, 1, 1, False),
    "1x12": (32, 512, 768, 1, 12, False),
    "4x12": (32, 512, 768, 4, 12, False),
    "8x1": (32, 512, 768, 8, 1, False),
    "so400m-full": (16, 729, 1152, 1, 16, True),
    "coca-256x8": (8, 256, 768, 256, 8, False),
}
# Shapes timed through attention_pool's projection of the keys.
PROJECTED = {"coca-256x8"}
SPREADS = (1.0, 10.0, 30.0)
WITHIN = 1.15


def spread_u(shape, spread, gen):
    """u [Q, n, H] whose scores against rows of standard normal x have
    standard deviation `spread` (at scale 1): each head's vector has norm
    `spread` over the columns it scores."""
    _, _, hidden, queries, heads, full_width = shape
    u = torch.randn(queries, heads, hidden, generator=gen)
    if not full_width:
        head_dim = hidden // heads
        slices = torch.zeros(heads, hidden)
        for h in range(heads):
            slices[h, h * head_dim : (h + 1) * head_dim] = 1
        u = u * slices
    return (u / u.norm(dim=-1, keepdim=True) * spread).requires_grad_()


def projected_calls(shape, dtype):
    """As calls, for attention_pool(x, query, w_q, w_k): weights of standard
    deviation 1/sqrt(H) give scores of standard deviation about 1 at
    queries of standard normal entries, `spread` at queries that times
    larger. The composition: keys projected, then SDPA."""
    batch, seq_len, hidden, queries, heads, _ = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq_len, hidden, generator=gen).to(dtype)
    w_q, w_k = (torch.randn(hidden, hidden, generator=gen) / hidden**0.5 for _ in range(2))
    query = torch.randn(queries, hidden, generator=gen)
    head_dim = hidden // heads
    forward, both, sdpa = {}, {}, {}
    for spread in SPREADS:
        q = (query * spread).requires_grad_()

        def op(x, q=q):
            return attnpool.attention_pool(x, q, w_q, w_k, num_heads=heads)

        projected = (q.detach() @ w_q.T).view(queries, heads, head_dim)
        forward[f"attnpool {spread:g}"] = lambda op=op: op(x)
        both[f"attnpool {spread:g}"] = lambda op=op: forward_backward(x, op)
        sdpa[f"sdpa {spread:g}"] = lambda p=projected: projected_pool(x, p, w_k, head_dim**-0.5)
    return forward, both, sdpa


def calls(shape, dtype):
    batch, seq_len, hidden, _, _, full_width = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq_len, hidden, generator=gen).to(dtype)
    forward, both, eager = {}, {}, {}
    for spread in SPREADS:
        u = spread_u(shape, spread, gen)

        def op(x, u=u):
            return attnpool.folded_attention_pool(x, u, scale=1.0, full_width=full_width)

        forward[f"attnpool {spread:g}"] = lambda op=op: op(x)
        both[f"attnpool {spread:g}"] = lambda op=op: forward_backward(x, op)
        eager[f"eager {spread:g}"] = lambda u=u: eager_pool(x, u, 1.0, full_width)
    # Timed apart: each set's calls leave the caches alike for the next.
    return forward, both, eager


def main() -> None:
    args = script_parser(__doc__, repeats=7).parse_args()
    malloc = start_script(args)
    print(
        f"Scores spread apart: time at scores of standard deviation s per head, "
        f"{args.threads} threads, median of {args.repeats} rounds; malloc: {malloc}; "
        f"CPU kernels: {attnpool._C.cpu_kernel_isa()}, torch {torch.__version__}"
    )
    checks = []
    for dtype in (torch.float32, torch.bfloat16):
        name_of_dtype = str(dtype).removeprefix("torch.")
        print(f"\n{name_of_dtype}: ms at s = " + ", ".join(f"{s:g}" for s in SPREADS))
        for name, shape in SHAPES.items():
            projects = name in PROJECTED
            forward, both, eager = (projected_calls if projects else calls)(shape, dtype)
            with torch.no_grad():
                forward_ms = time_rounds(forward, args.repeats)
                eager_ms = time_rounds(eager, args.repeats)
            both_ms = time_rounds(both, args.repeats)
            composition = "sdpa" if projects else "eager"
            rows = (
                ("attnpool forward", forward_ms, "attnpool"),
                ("attnpool fwd+bwd", both_ms, "attnpool"),
                (f"{composition} forward", eager_ms, composition),
            )
            for label, ms, who in rows:
                times = [ms[f"{who} {s:g}"] for s in SPREADS]
                ratios = " ".join(f"{t / times[0]:5.2f}x" for t in times[1:])
                print(
                    f"  {name:12s} {label:17s} "
                    + " ".join(f"{t:8.2f}" for t in times)
                    + f"   against s = 1: {ratios}"
                )
                if who == "attnpool":
                    mode = label.removeprefix("attnpool ")
                    checks.append(
                        target(
                            f"{name} {name_of_dtype} {mode}: at s = {SPREADS[-1]:g} / at s = 1",
                            times[-1] / times[0],
                            WITHIN,
                            lower_is_better=True,
                        )
                    )
    print_targets(checks)


if __name__ == "__main__":
    main()
