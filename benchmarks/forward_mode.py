"""Times forward-mode AD of folded_attention_pool: torch.func.jvp with tangents
of x and u, against the forward alone, the same jvp of the eager reference
(attnpool.reference, the lines one would write by hand), and one read of x
and of its tangent (x.sum() + dx.sum()). Shapes: a BERT-size batch with one
query and one head, 12 heads, 4 queries x 12 heads, and the SigLIP-so400m
MAP head (full width, 16 heads); float32 and bfloat16.

    python benchmarks/forward_mode.py [--threads 2] [--repeats 7] [--quick]

Calls are interleaved round by round; each figure is the median over rounds.
"""

import torch

import attnpool
from attnpool import reference
from attnpool.bench import script_parser, start_script, time_rounds

# (label, B, L, H, queries, heads, full_width)
SHAPES = [
    ("32x512x768 1x1", 32, 512, 768, None, 1, False),
    ("32x512x768 1x12", 32, 512, 768, None, 12, False),
    ("32x512x768 4x12", 32, 512, 768, 4, 12, False),
    ("so400m 16x729x1152 1x16 full width", 16, 729, 1152, None, 16, True),
]
QUICK_SHAPES = [
    ("2x64x96 2x4", 2, 64, 96, 2, 4, False),
    ("2x64x96 1x4 full", 2, 64, 96, None, 4, True),
]


def calls_for(shape, dtype):
    """name -> zero-argument call for one shape and dtype."""
    _, batch, seq_len, hidden, queries, heads, full_width = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq_len, hidden, generator=gen).to(dtype)
    u_shape = (heads, hidden) if queries is None else (queries, heads, hidden)
    u = (torch.randn(u_shape, generator=gen) / hidden**0.5).to(dtype)
    tangents = (torch.randn(x.shape, generator=gen).to(dtype), torch.randn_like(u))
    scale = (hidden // heads) ** -0.5

    def pool(module):
        return lambda x, u: module.folded_attention_pool(x, u, None, scale, full_width)

    return {
        "forward": lambda: pool(attnpool)(x, u),
        "jvp: attnpool": lambda: torch.func.jvp(pool(attnpool), (x, u), tangents),
        "jvp: eager reference": lambda: torch.func.jvp(pool(reference), (x, u), tangents),
        "read of x and its tangent": lambda: (x.sum(), tangents[0].sum()),
    }


def main() -> None:
    parser = script_parser(__doc__, repeats=7, malloc=False)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    args = parser.parse_args()
    malloc = start_script(args)
    repeats = 2 if args.quick else args.repeats
    print(f"{args.threads} threads, median of {repeats} rounds; malloc: {malloc}")
    for dtype in (torch.float32, torch.bfloat16):
        print(f"\n{str(dtype).removeprefix('torch.')}")
        for shape in QUICK_SHAPES if args.quick else SHAPES:
            with torch.no_grad():
                ms = time_rounds(calls_for(shape, dtype), repeats)
            read = ms["read of x and its tangent"]
            jvp = ms["jvp: attnpool"]
            print(
                f"  {shape[0]:36s} forward {ms['forward']:7.2f} ms   jvp {jvp:7.2f} ms "
                f"({jvp / read:4.1f}x the read of x and dx)   eager jvp "
                f"{ms['jvp: eager reference']:8.2f} ms ({ms['jvp: eager reference'] / jvp:5.1f}x)"
            )


if __name__ == "__main__":
    main()
