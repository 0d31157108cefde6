"""What the Python tests share: devices, tolerances, random inputs and the
float64 reference, the small model the transform tests (autocast, compile,
export, DDP) run, and the forward-and-backward the concurrency tests repeat.

Test modules import from here, never from each other.
"""

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import attnpool


def _cuda_skip_reason() -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    if not attnpool._C.with_cuda:
        return "attnpool was built without its CUDA kernels"
    return None


CUDA_SKIP_REASON = _cuda_skip_reason()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON)),
    ),
]

# Tolerances for comparing an op's output in `dtype` with the float64
# reference computed from the same (rounded) inputs.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


@dataclass
class Inputs:
    x: torch.Tensor
    query: torch.Tensor
    w_q: torch.Tensor
    w_k: torch.Tensor
    mask: Optional[torch.Tensor] = None

    def args(self):
        return (self.x, self.query, self.w_q, self.w_k, self.mask)

    def to(self, dtype=None, param_dtype=None, device=None) -> "Inputs":
        param_dtype = param_dtype or dtype

        def move(t, d):
            return None if t is None else t.to(device=device, dtype=d)

        return Inputs(
            move(self.x, dtype),
            move(self.query, param_dtype),
            move(self.w_q, param_dtype),
            move(self.w_k, param_dtype),
            None if self.mask is None else self.mask.to(device=device),
        )

    def requiring_grad(self) -> "Inputs":
        def leaf(t):
            return t.detach().clone().requires_grad_(True)

        return Inputs(leaf(self.x), leaf(self.query), leaf(self.w_q), leaf(self.w_k), self.mask)


def make_inputs(
    batch=2,
    seq_len=5,
    hidden=8,
    num_queries=None,
    *,
    mask=None,
    dtype=torch.float64,
    device="cpu",
    seed=0,
    x_scale=1.0,
) -> Inputs:
    """Random inputs with weights scaled like nn.Linear's, so scores are O(1).

    num_queries=None gives a 1-D query. mask: None, "random" (about 30%
    masked, plus one sequence fully masked when batch > 1), or a tensor.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, hidden, generator=gen, dtype=torch.float64) * x_scale
    query_shape = (hidden,) if num_queries is None else (num_queries, hidden)
    query = torch.randn(query_shape, generator=gen, dtype=torch.float64)
    w_q = torch.randn(hidden, hidden, generator=gen, dtype=torch.float64) / max(hidden, 1) ** 0.5
    w_k = torch.randn(hidden, hidden, generator=gen, dtype=torch.float64) / max(hidden, 1) ** 0.5
    if isinstance(mask, str):
        assert mask == "random"
        mask = torch.rand(batch, seq_len, generator=gen) > 0.3
        if batch > 1:
            mask[1] = False
    return Inputs(x, query, w_q, w_k, mask).to(dtype=dtype, device=device)


def reference_in_float64(inputs: Inputs, num_heads=1, scale=None) -> torch.Tensor:
    """The reference evaluated in float64 on exactly the (rounded) inputs given."""
    x64 = inputs.to(dtype=torch.float64)
    return attnpool.reference.attention_pool(*x64.args(), num_heads=num_heads, scale=scale)


def scored_u(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """u as the CPU kernels score x against it: rounded to bfloat16 where they
    take bfloat16 products (AVX512_BF16 or AMX_BF16 kernels, bfloat16 x,
    several scores per row, or one whose rows are read in pairs, H a multiple
    of 32; [Note: bfloat16 products] in csrc/ops/cpu/isa/vec_helpers.h)."""
    several_scores = u.dim() > 1 and u.shape[:-1].numel() > 1
    read_in_pairs = u.shape[-1] > 0 and u.shape[-1] % 32 == 0
    if (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and (several_scores or read_in_pairs)
        and attnpool._C.cpu_kernel_isa() in ("AVX512_BF16", "AMX_BF16")
    ):
        return u.to(torch.bfloat16).to(u.dtype)
    return u


def make_batch(batch, seq_len, hidden, *, device="cpu", seed=0, empty_row=0):
    """(x, mask) for a model: float32 x and a bool mask attending about 70% of
    positions, except sequence `empty_row`, which has nothing to attend."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, hidden, generator=gen)
    mask = torch.rand(batch, seq_len, generator=gen) > 0.3
    mask[empty_row] = False
    return x.to(device), mask.to(device)


class PoolingModel(nn.Module):
    """A position-wise linear layer (``encode``), optionally tanh, then
    AttentionPooling (``pool``), then optionally a linear ``head``.

    Without out_features the model returns the pooled [B, Q, hidden]. With it,
    the head maps each pooled query to out_features ([B, Q, out_features]),
    or, with flatten=True, all Q of them at once ([B, out_features]).
    """

    def __init__(
        self,
        hidden,
        num_heads,
        num_queries,
        *,
        tanh=True,
        out_features=None,
        flatten=False,
    ):
        super().__init__()
        self.tanh = tanh
        self.flatten = flatten
        self.encode = nn.Linear(hidden, hidden)
        self.pool = attnpool.AttentionPooling(hidden, num_heads, num_queries)
        self.head = None
        if out_features is not None:
            in_features = num_queries * hidden if flatten else hidden
            self.head = nn.Linear(in_features, out_features)

    def forward(self, x, mask):
        hidden = self.encode(x)
        pooled = self.pool(torch.tanh(hidden) if self.tanh else hidden, mask)
        if self.head is None:
            return pooled
        return self.head(pooled.flatten(1) if self.flatten else pooled)


def forward_backward(inputs: Inputs, num_heads):
    """[out, grad of x, query, w_q, w_k] of a fixed weighted sum of the output.

    torch.autograd.grad, not .backward(): nothing is accumulated into .grad
    fields, so threads may share the inputs.
    """
    leaves = [t.detach().requires_grad_(True) for t in (inputs.x, inputs.query, inputs.w_q)]
    leaves.append(inputs.w_k.detach().requires_grad_(True))
    out = attnpool.attention_pool(*leaves, inputs.mask, num_heads)
    weights = torch.linspace(-1.0, 1.0, out.numel(), device=out.device).view_as(out)
    grads = torch.autograd.grad((out.float() * weights).sum(), leaves)
    return [out.detach(), *grads]


def assert_bitwise_equal(got, want, what):
    """Two forward_backward results hold the same bits."""
    assert len(got) == len(want)
    for name, g, w in zip(("out", "x", "query", "w_q", "w_k"), got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}: {name}"
        assert torch.equal(g, w), f"{what}: {name} differs"


# (B, L, H, Q, heads, dtype, param dtype) for the concurrency tests: short and
# long sequences (the long ones are split across work items), every dtype,
# mixed precision, wide heads.
CONCURRENT_JOBS = [
    (2, 5, 8, None, 1, torch.float64, None),
    (3, 17, 24, 2, 3, torch.float32, None),
    (1, 3000, 32, 2, 4, torch.float32, None),
    (4, 700, 16, None, 2, torch.bfloat16, torch.float32),
    (2, 1500, 40, 3, 2, torch.float16, None),
    (5, 33, 12, 1, 3, torch.bfloat16, None),
    (2, 2500, 64, None, 8, torch.float64, None),
    (3, 0, 8, 2, 2, torch.float32, None),
    (2, 4000, 64, None, 1, torch.float32, None),
    (2, 40, 200, 2, 1, torch.float32, None),  # the fold cut into 6 runs of rows
    (2, 30, 256, None, 2, torch.float64, None),  # 4 runs per head
    (2, 2000, 40, 9, 1, torch.bfloat16, torch.float32),  # 9 scores into lanes, in pieces
    (2, 1500, 48, 4, 3, torch.float32, None),  # 12 scores by columns, 24-row tiles, in pieces
]


def concurrent_job(index, device="cpu"):
    """(inputs, num_heads) of CONCURRENT_JOBS[index]."""
    batch, seq_len, hidden, queries, heads, dtype, param_dtype = CONCURRENT_JOBS[index]
    inputs = make_inputs(batch, seq_len, hidden, queries, mask="random", seed=index, device=device)
    return inputs.to(dtype=dtype, param_dtype=param_dtype or dtype), heads


class RecordedOps(TorchDispatchMode):
    """The operators called while it is active, by name (``attnpool._fold_query_backward``)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def last_line_at_default_level(script: str) -> str:
    """The last line that `script` prints in a fresh process whose CPU kernels
    are forced to the default level (below AVX2, hence below AMX)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_CPU_CAPABILITY")}
    env["ATTNPOOL_CPU_CAPABILITY"] = "default"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]
