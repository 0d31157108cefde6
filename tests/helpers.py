"""Inputs, devices and tolerances shared by the Python tests."""

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

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
