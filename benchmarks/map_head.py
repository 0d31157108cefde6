"""Times a MAP head (multi-head attention pooling with one learned query) as
attnpool.MultiheadAttentionPooling against nn.MultiheadAttention holding the
same weights, called as Hugging Face's SigLIP head calls it (need_weights left
at True) and with need_weights=False. Default shape: SigLIP-so400m's head.

    python benchmarks/map_head.py [--threads 2] [--batch 16 --seq-len 729 --dim 1152 --heads 16]

Calls are interleaved, and each figure is the median of --repeats calls.
"""

import argparse
import statistics
import time

import torch
from torch import nn

import attnpool


def _median_ms(samples):
    return 1e3 * statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=729)
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    batch, dim = args.batch, args.dim
    x = torch.randn(batch, args.seq_len, dim)
    head = attnpool.MultiheadAttentionPooling(dim, args.heads)
    peer = nn.MultiheadAttention(dim, args.heads, batch_first=True)
    peer.load_state_dict({k: v for k, v in head.state_dict().items() if k != "query"})
    query = head.query.detach().expand(batch, 1, dim)
    heads = {
        "nn.MultiheadAttention, need_weights=True (as HF calls it)": lambda x: peer(query, x, x)[0][
            :, 0
        ],
        "nn.MultiheadAttention, need_weights=False": lambda x: peer(
            query, x, x, need_weights=False
        )[0][:, 0],
        "attnpool.MultiheadAttentionPooling": head,
    }

    def backward(run):
        leaf = x.detach().requires_grad_()
        run(leaf).sum().backward()

    forward = {"x.sum() (one read of x)": lambda: x.sum()}
    forward.update({name: (lambda run=run: run(x)) for name, run in heads.items()})
    times = {("forward", name): [] for name in forward}
    times.update({("forward+backward", name): [] for name in heads})
    with torch.no_grad():
        for run in forward.values():
            run()  # warm up
    for _ in range(args.repeats):
        for name, run in forward.items():
            with torch.no_grad():
                start = time.perf_counter()
                run()
                times["forward", name].append(time.perf_counter() - start)
        for name, run in heads.items():
            start = time.perf_counter()
            backward(run)
            times["forward+backward", name].append(time.perf_counter() - start)

    print(
        f"B={batch} L={args.seq_len} E={dim} heads={args.heads} float32, "
        f"{args.threads} threads, median of {args.repeats} interleaved calls"
    )
    for (mode, name), samples in times.items():
        print(f"  {mode:16s} {name:58s} {_median_ms(samples):9.1f} ms")
    with torch.no_grad():
        difference = (head(x) - heads["nn.MultiheadAttention, need_weights=False"](x)).abs().max()
    print(f"  max |attnpool - nn.MultiheadAttention| = {difference.item():.2g}")


if __name__ == "__main__":
    main()
