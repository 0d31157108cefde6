"""Times the layer norm of a MAP head's keys (open_clip's ln_k) done in the
pooling pass, attnpool's _layer_norm_folded_attention_pool, against the same
norm as a pass of its own (nn.LayerNorm, then folded_attention_pool): one
query, full width, at SigLIP B/16's head shape (x [32, 196, 768], 12 heads),
SigLIP-so400m's ([16, 729, 1152], 16 heads) and CoCa's contrastive pooler's
([8, 257, 768], 8 heads), float32 and bfloat16. Both compute the same pooled
vectors (checked before timing). Also prints the bytes autograd saves for the
backward besides x: the separate norm saves its output, a copy of x.

    python benchmarks/key_norm.py [--threads 2] [--repeats 7] [--malloc reuse|system]

Calls are interleaved round by round; each figure is the median over rounds.
--malloc as in varlen.py.
"""

import torch
from torch import nn

from attnpool.bench import forward_backward, script_parser, start_script, time_rounds

SHAPES = {
    "siglip-b16": (32, 196, 768, 12),
    "siglip-so400m": (16, 729, 1152, 16),
    "coca-contrastive": (8, 257, 768, 8),
}
EPS = 1e-5


def saved_bytes(run, x):
    """Bytes of the distinct storages autograd saves in run(x), x's excluded."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    leaf = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(leaf)
    storages.pop(leaf.untyped_storage().data_ptr(), None)
    return sum(storages.values())


def contenders(shape, dtype):
    batch, seq_len, width, heads = shape
    torch.manual_seed(0)
    x = torch.randn(batch, seq_len, width).mul(3).add(1).to(dtype)
    u = torch.randn(1, heads, width, requires_grad=True)
    norm = nn.LayerNorm(width, eps=EPS).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    scale = (width // heads) ** -0.5
    return x, {
        "norm in the pooling pass": lambda x: torch.ops.attnpool._layer_norm_folded_attention_pool(
            x, u, norm.weight, norm.bias, EPS, None, scale, True
        ),
        "nn.LayerNorm, then the pooling": lambda x: torch.ops.attnpool.folded_attention_pool(
            norm(x), u, None, scale, True
        ),
    }


def main() -> None:
    args = script_parser(__doc__, repeats=7).parse_args()
    malloc = start_script(args)
    print(
        f"ln_k in the pooling pass against a pass of its own, one query, full width, "
        f"{args.threads} threads, median of {args.repeats} rounds; malloc: {malloc}"
    )
    for name, shape in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            x, runs = contenders(shape, dtype)
            fused, separate = runs.values()
            with torch.no_grad():
                difference = (fused(x).float() - separate(x).float()).abs().max().item()
                forward = time_rounds(
                    {k: (lambda r=r, x=x: r(x)) for k, r in runs.items()}, args.repeats
                )
            both = time_rounds(
                {k: (lambda r=r, x=x: forward_backward(x, r)) for k, r in runs.items()},
                args.repeats,
            )
            batch, seq_len, width, heads = shape
            print(
                f"\n{name}: x [{batch}, {seq_len}, {width}], {heads} heads, "
                f"{str(dtype).removeprefix('torch.')}; max |difference| {difference:.2g}"
            )
            for key, run in runs.items():
                print(
                    f"  {key:32s} forward {forward[key]:7.2f} ms   forward+backward "
                    f"{both[key]:7.2f} ms   saved {saved_bytes(run, x) / 2**20:6.1f} MiB"
                )
            first, second = runs
            print(
                f"  separate / fused: forward {forward[second] / forward[first]:.2f}x, "
                f"forward+backward {both[second] / both[first]:.2f}x"
            )


if __name__ == "__main__":
    main()
