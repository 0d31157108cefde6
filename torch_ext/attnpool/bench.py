"""Benchmark: attnpool against what a user would otherwise write.

    python -m attnpool.bench [--quick] [--out DIR] [--threads 1,2] [--dtypes float32,bfloat16]
                             [--device cpu|cuda]

For each shape, dtype and thread count it times, interleaved in one run
(medians over rounds, each round runs every method once in turn):

  attnpool      the fused op (forward; forward+backward)
  eager-folded  the best eager composition: fold the query, one matmul for
                the scores, softmax, one bmm
  notebook      the original design: project every key (attnpool.reference)
  compiled      torch.compile of eager-folded
  mha           nn.MultiheadAttention with one learned query (the timm /
                SigLIP pooling head; a different function, the same job)
  sdpa          F.scaled_dot_product_attention with one (folded) query
  read          x.sum(): the memory floor of the forward
  read+copy     x.sum() and x.clone(): the floor of forward+backward

It prints a table with each method's median and its ratio to attnpool,
checks the project's performance targets, writes DIR/bench.json and draws
DIR/bench.png. The machine is shared and noisy: trust ratios, not absolutes.

On the CPU, a bfloat16 or float16 case also times the op on a float32 copy
of x ("float32"), so the two dtypes are compared within one case.

glibc maps every block of 32 MB or more afresh and the first write to each of
its pages faults: at BERT size that is 10-20 ms per fresh [B, L, H] tensor,
more than the kernels take. By default the benchmark therefore asks glibc to
reuse freed blocks (mallopt, the same for every method; PyTorch's CPU
performance guide gets this from jemalloc or tcmalloc), so that it times the
kernels and not the page faults; --malloc system keeps glibc's defaults.

With --device cuda the same methods run on the GPU (timed between
synchronisations, so each median includes the launches) and the thread
count does not apply; the targets are the CPU's and are not checked there.
"""

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import attnpool
from attnpool import reference

SHAPES = {
    "small": (2, 8, 32),
    "bert-base": (32, 512, 768),
    "long": (1, 32768, 1024),
}
QUICK_SHAPES = {"small": (2, 8, 32), "medium": (4, 256, 128)}


def folded_attention_pool(x, query, w_q, w_k, mask=None, num_heads=1, scale=None):
    """The best eager composition: fold the query, one matmul for the scores,
    softmax over the sequence, one bmm for the weighted sum."""
    batch, seq_len, hidden = x.shape
    head_dim = hidden // num_heads
    scale = head_dim**-0.5 if scale is None else scale
    queries = query.reshape(-1, hidden).to(x.dtype)
    num_queries = queries.shape[0]
    projected = (queries @ w_q.to(x.dtype).T).view(num_queries, num_heads, head_dim)
    u = torch.einsum("qnd,ndh->qnh", projected, w_k.to(x.dtype).view(num_heads, head_dim, hidden))
    scores = (x @ u.reshape(-1, hidden).T) * scale  # [B, L, Q*n]
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[..., None], float("-inf"))
    probs = torch.softmax(scores, dim=1)  # over the sequence
    if num_heads == 1:
        out = torch.bmm(probs.transpose(1, 2), x)  # [B, Q, H]
    else:
        probs = probs.view(batch, seq_len, num_queries, num_heads)
        out = torch.einsum("blqn,blnd->bqnd", probs, x.view(batch, seq_len, num_heads, head_dim))
        out = out.reshape(batch, num_queries, hidden)
    return out[:, 0] if query.dim() == 1 else out


def sdpa_attention_pool(x, query, w_q, w_k, mask=None, num_heads=1, scale=None):
    """One folded query per head through F.scaled_dot_product_attention."""
    batch, seq_len, hidden = x.shape
    head_dim = hidden // num_heads
    scale = head_dim**-0.5 if scale is None else scale
    queries = query.reshape(-1, hidden).to(x.dtype)
    projected = (queries @ w_q.to(x.dtype).T).view(-1, num_heads, head_dim)
    u = torch.einsum("qnd,ndh->nqh", projected, w_k.to(x.dtype).view(num_heads, head_dim, hidden))
    keys = x[:, None].expand(batch, num_heads, seq_len, hidden)
    values = x.view(batch, seq_len, num_heads, head_dim).transpose(1, 2)
    attn_mask = None if mask is None else mask.bool()[:, None, None, :]
    out = F.scaled_dot_product_attention(
        u[None].expand(batch, -1, -1, -1), keys, values, attn_mask=attn_mask, scale=scale
    )  # [B, n, Q, d]
    out = out.transpose(1, 2).reshape(batch, -1, hidden)
    return out[:, 0] if query.dim() == 1 else out


@dataclass
class Case:
    shape: tuple
    dtype: torch.dtype
    threads: int
    mode: str  # "forward" or "forward+backward"
    device: str = "cpu"


def make_methods(case: Case, compile_enabled: bool):
    """name -> zero-argument callable running one iteration of that method."""
    batch, seq_len, hidden = case.shape
    gen = torch.Generator().manual_seed(0)
    device = case.device
    x = torch.randn(batch, seq_len, hidden, generator=gen).to(device, case.dtype)
    query = torch.randn(hidden, generator=gen).to(device)
    w_q = (torch.randn(hidden, hidden, generator=gen) / hidden**0.5).to(device)
    w_k = (torch.randn(hidden, hidden, generator=gen) / hidden**0.5).to(device)
    training = case.mode != "forward"
    params = [t.requires_grad_(training) for t in (query, w_q, w_k)]
    x_in = x.clone().requires_grad_(training)
    grad_out = torch.randn(batch, hidden, generator=gen).to(device, case.dtype)

    mha = nn.MultiheadAttention(hidden, 1, batch_first=True).to(device, case.dtype)
    mha.requires_grad_(training)
    mha_query = query.detach().to(case.dtype).view(1, 1, hidden).expand(batch, 1, hidden)

    def run_mha():
        return mha(mha_query, x_in, x_in, need_weights=False)[0][:, 0]

    def pool(fn):
        return lambda: fn(x_in, *params)

    def param_cast(fn):
        # The compositions run in x's dtype; the parameters stay float32.
        return lambda x_, q, wq, wk: fn(x_, q.to(x_.dtype), wq.to(x_.dtype), wk.to(x_.dtype))

    forwards = {"attnpool": pool(attnpool.attention_pool)}
    if case.dtype in (torch.bfloat16, torch.float16) and device == "cpu":
        # The op on the same values in float32, interleaved with the rest.
        x_float = x_in.detach().float().requires_grad_(training)
        forwards["float32"] = lambda: attnpool.attention_pool(x_float, *params)
    forwards |= {
        "eager-folded": pool(param_cast(folded_attention_pool)),
        "notebook": pool(param_cast(reference.attention_pool)),
        "mha": run_mha,
        "sdpa": pool(param_cast(sdpa_attention_pool)),
    }
    if compile_enabled:
        compiled = torch.compile(param_cast(folded_attention_pool), dynamic=False)
        forwards["compiled"] = pool(compiled)

    leaves = [x_in, *params, *mha.parameters()]
    if "float32" in forwards:
        leaves.append(x_float)

    def step(fn):
        if not training:
            return lambda: fn()

        def run():
            # Fresh gradients each time: backward then writes them instead of
            # adding into the previous ones (an extra pass over dx).
            for leaf in leaves:
                leaf.grad = None
            out = fn()
            out.backward(grad_out.to(out.dtype))

        return run

    methods = {name: step(fn) for name, fn in forwards.items()}
    if training:
        methods["read+copy"] = lambda: (x.sum(), x.clone())
    else:
        methods["read"] = lambda: x.sum()
    if x.numel() * hidden > 1e10:
        # Projecting every key of the longest shape costs seconds per call:
        # these two are left out there (they lose by far on smaller shapes).
        del methods["notebook"], methods["mha"]
    return methods


def time_interleaved(methods, rounds: int, min_seconds: float, sync=lambda: None):
    """Median seconds per call of each method; rounds interleave the methods
    so that a noisy neighbour hits them all alike. sync waits for queued
    device work (torch.cuda.synchronize on a GPU)."""
    for fn in methods.values():  # warm-up (and compilation)
        fn()
        fn()
    sync()
    per_call = {}
    for name, fn in methods.items():
        start = time.perf_counter()
        fn()
        sync()
        per_call[name] = max(time.perf_counter() - start, 1e-7)
    repeats = {name: max(1, int(min_seconds / t)) for name, t in per_call.items()}
    samples = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            for _ in range(repeats[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / repeats[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def shape_label(shape):
    return "x".join(map(str, shape))


def run_cases(
    shapes, dtypes, thread_counts, modes, rounds, min_seconds, compile_enabled, log, device="cpu"
):
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    results = []
    for shape_name, shape in shapes.items():
        for dtype in dtypes:
            for threads in thread_counts:
                torch.set_num_threads(threads)
                for mode in modes:
                    torch._dynamo.reset()  # each case compiles afresh, for its own shapes
                    case = Case(shape, dtype, threads, mode, device)
                    methods = make_methods(case, compile_enabled)
                    medians = time_interleaved(methods, rounds, min_seconds, sync)
                    row = dict(
                        device=device,
                        shape=shape_name,
                        dims=list(shape),
                        dtype=str(dtype).replace("torch.", ""),
                        threads=threads,
                        mode=mode,
                        seconds=medians,
                        bytes=shape[0] * shape[1] * shape[2] * dtype.itemsize,
                    )
                    results.append(row)
                    log(format_row(row))
    return results


def format_row(row):
    ours = row["seconds"]["attnpool"]
    where = "gpu" if row.get("device") == "cuda" else f"{row['threads']}t"
    head = f"{row['shape']:>9} {shape_label(row['dims']):>14} {row['dtype']:>8} {where} {row['mode']:>16}"
    cells = [f"attnpool {ours * 1e3:8.3f} ms"]
    for name, seconds in row["seconds"].items():
        if name != "attnpool":
            cells.append(f"{name} {seconds / ours:5.2f}x")
    return f"{head} | " + "  ".join(cells)


def find(results, shape, dtype, threads, mode):
    for row in results:
        if (row["shape"], row["dtype"], row["threads"], row["mode"]) == (
            shape,
            dtype,
            threads,
            mode,
        ):
            return row["seconds"]
    return None


def check_targets(results):
    """(description, measured, relation, limit, passed) for each target measured."""
    checks = []

    def add(description, value, limit, lower_is_better=True):
        if value is not None:
            checks.append(target(description, value, limit, lower_is_better))

    def ratio(seconds, a, b):
        if seconds is None or a not in seconds or b not in seconds:
            return None
        return seconds[a] / seconds[b]

    bert_fwd = find(results, "bert-base", "float32", 2, "forward")
    bert_fb = find(results, "bert-base", "float32", 2, "forward+backward")
    add("bert-base fp32 2t: forward / read", ratio(bert_fwd, "attnpool", "read"), 1.25)
    add("bert-base fp32 2t: fwd+bwd / (read+copy)", ratio(bert_fb, "attnpool", "read+copy"), 1.4)
    add(
        "bert-base fp32 2t: eager-folded / attnpool, forward",
        ratio(bert_fwd, "eager-folded", "attnpool"),
        2.0,
        False,
    )
    add(
        "bert-base fp32 2t: eager-folded / attnpool, fwd+bwd",
        ratio(bert_fb, "eager-folded", "attnpool"),
        2.5,
        False,
    )
    add(
        "bert-base fp32 2t: compiled / attnpool, forward",
        ratio(bert_fwd, "compiled", "attnpool"),
        1.5,
        False,
    )
    add(
        "bert-base fp32 2t: compiled / attnpool, fwd+bwd",
        ratio(bert_fb, "compiled", "attnpool"),
        1.5,
        False,
    )
    long_fwd = find(results, "long", "float32", 2, "forward")
    add("long fp32 2t: forward / read", ratio(long_fwd, "attnpool", "read"), 1.3)
    small_fb = find(results, "small", "float32", 2, "forward+backward")
    add(
        "small fp32 2t: eager-folded / attnpool, fwd+bwd",
        ratio(small_fb, "eager-folded", "attnpool"),
        1.0,
        False,
    )
    add(
        "bert-base 2t: bf16 forward / fp32 forward",
        ratio(find(results, "bert-base", "bfloat16", 2, "forward"), "attnpool", "float32"),
        0.6,
    )
    return checks


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["threads"] == max(x["threads"] for x in results)]
    labels = [
        f"{r['shape']}\n{r['dtype']}\n{'fwd' if r['mode'] == 'forward' else 'fwd+bwd'}"
        for r in rows
    ]
    methods = []
    for r in rows:
        for name in r["seconds"]:
            if name not in methods:
                methods.append(name)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 5))
    width = 0.8 / len(methods)
    for j, name in enumerate(methods):
        values = [
            r["seconds"]["attnpool"] / r["seconds"][name] if name in r["seconds"] else 0
            for r in rows
        ]
        ax.bar([i + j * width for i in range(len(rows))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, fontsize=8)
    ax.set_ylabel("speed relative to attnpool (higher is faster)")
    ax.set_yscale("log")
    where = (
        torch.cuda.get_device_name()
        if rows[0].get("device") == "cuda"
        else f"{rows[0]['threads']} threads, {cpu_model()}"
    )
    ax.set_title(f"attnpool benchmark, {where}")
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3


def target(description, value, limit, lower_is_better=False) -> tuple:
    """One check, as print_targets and write_report take them: (description,
    value, relation, limit, passed), value <= limit or >= limit."""
    passed = value <= limit if lower_is_better else value >= limit
    return (description, value, "<=" if lower_is_better else ">=", limit, passed)


def targets_as_json(checks) -> list:
    """The checks as write_report stores them."""
    return [dict(target=c[0], value=c[1], relation=c[2], limit=c[3], passed=c[4]) for c in checks]


def print_targets(checks) -> None:
    """One PASS/FAIL line per (description, value, relation, limit, passed)."""
    print("\ntargets:")
    for description, value, relation, limit, passed in checks:
        print(
            f"  {'PASS' if passed else 'FAIL'}  {description} = {value:.2f} "
            f"(target {relation} {limit})"
        )


def write_report(path: str, results, checks, **fields) -> None:
    """results and checks as JSON at path, with the machine and torch; fields
    (malloc, device, ...) go in beside them."""
    with open(path, "w") as f:
        json.dump(
            dict(
                cpu=cpu_model(),
                isa=attnpool._C.cpu_kernel_isa(),
                torch=torch.__version__,
                **fields,
                results=results,
                targets=targets_as_json(checks),
            ),
            f,
            indent=1,
        )


def time_rounds(calls, repeats):
    """Median ms of each call over `repeats` rounds, the calls interleaved
    round by round, after one warm-up round."""
    samples = {name: [] for name in calls}
    for _ in range(repeats + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(times[1:]) for name, times in samples.items()}


def forward_backward(x, run):
    """run(x) and the backward of its sum, with x a fresh leaf requiring grad."""
    leaf = x.detach().requires_grad_()
    run(leaf).sum().backward()


def configure_malloc(mode: str) -> str:
    """mode "reuse": have glibc serve blocks of up to 1 GiB from its heap and
    keep up to 2 GiB of freed memory there, instead of mapping (and faulting
    in) fresh pages for each large tensor; "system": leave malloc as it is.
    Returns what the malloc of this process now does, for the report."""
    if mode == "system":
        return "system (as configured)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "system (not glibc: --malloc reuse does not apply)"
    libc = ctypes.CDLL(None)
    if not (libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
        return "system (glibc refused mallopt)"
    return "reuse (glibc keeps freed blocks of up to 1 GiB for reuse)"


def script_parser(doc: str, repeats: int, malloc: bool = True) -> argparse.ArgumentParser:
    """The arguments of every script in benchmarks/: --threads (2), --repeats
    and, with `malloc`, --malloc (configure_malloc's modes); the description
    is the first paragraph of the script's docstring. Add a script's own
    arguments to it, then call start_script."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=repeats)
    if malloc:
        parser.add_argument("--malloc", default="reuse", choices=["reuse", "system"])
    return parser


def start_script(args) -> str:
    """Sets the thread count and the allocator (args.malloc, or "reuse") from
    script_parser's arguments; returns configure_malloc's description."""
    malloc = configure_malloc(getattr(args, "malloc", "reuse"))
    torch.set_num_threads(args.threads)
    return malloc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes, few rounds (a smoke run)"
    )
    parser.add_argument("--out", default="bench-output")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--shapes", default=None, help=f"comma-separated subset of {list(SHAPES)}")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--malloc",
        default="reuse",
        choices=["reuse", "system"],
        help="reuse: glibc keeps freed blocks for reuse (default); system: glibc's defaults",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not (torch.cuda.is_available() and attnpool._C.with_cuda):
        parser.error("--device cuda needs a GPU and attnpool built with its CUDA kernels")

    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    if args.device == "cuda":
        threads = threads[-1:]  # host threads barely matter to GPU kernels: time one count
    rounds = args.rounds or (3 if args.quick else 15)
    min_seconds = 0.002 if args.quick else 0.05

    malloc = configure_malloc(args.malloc)
    print(
        f"attnpool {attnpool.__version__}, torch {torch.__version__}, {cpu_model()}, "
        f"{os.cpu_count()} CPUs; CPU kernels: {attnpool._C.cpu_kernel_isa()}; malloc: {malloc}"
    )
    if args.device == "cuda":
        print(f"device: cuda, {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    print("ratios are (method time) / (attnpool time): above 1 means attnpool is faster")
    results = run_cases(
        shapes,
        dtypes,
        threads,
        ["forward", "forward+backward"],
        rounds,
        min_seconds,
        not args.no_compile,
        print,
        args.device,
    )
    checks = check_targets(results) if args.device == "cpu" else []
    if checks:
        print_targets(checks)
    os.makedirs(args.out, exist_ok=True)
    write_report(
        os.path.join(args.out, "bench.json"),
        results,
        checks,
        device=args.device,
        gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
        malloc=malloc,
    )
    plot(results, os.path.join(args.out, "bench.png"))
    print(f"\nwrote {args.out}/bench.json and {args.out}/bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
