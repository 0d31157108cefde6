"""nn.Module front ends: AttentionPooling (the fused op) and WeightedPooling."""

import math
from typing import Optional

import torch
from torch import Tensor, nn

from attnpool import reference
from attnpool.ops import _check_int, _check_number, attention_pool

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _check_plain_linear(module: nn.Module, name: str) -> None:
    """Refuses what would be silently ignored: the op reads ``<name>.weight``
    and never calls the Linear, so its hooks would not run and a changed
    forward (LoRA, adapters) would not apply. Parametrizations change the
    weight itself and work."""
    owner = type(module).__name__
    linear = getattr(module, name)
    if not isinstance(linear, nn.Linear) or type(linear).forward is not nn.Linear.forward:
        raise TypeError(
            f"{owner}: {name} must be a plain nn.Linear (parametrizations are fine), got "
            f"{type(linear).__name__} with a forward of its own: {owner} folds {name}.weight into "
            f"the query and never calls {name}, so the changed forward would be ignored; merge "
            "it into the weight, or use torch.nn.utils.parametrize"
        )
    hooked = (
        linear._forward_pre_hooks
        or linear._forward_hooks
        or linear._backward_hooks
        or linear._backward_pre_hooks
    )
    if hooked:
        raise ValueError(
            f"{owner}: {name} has module hooks (torch.nn.utils.prune, the old weight_norm or "
            f"spectral_norm, or hooks of your own), which would never run: {owner} reads "
            f"{name}.weight and never calls {name}. Use torch.nn.utils.parametrize instead "
            "(torch.nn.utils.parametrizations.weight_norm / spectral_norm / custom "
            "parametrizations, pruning as a parametrization), or remove the hooks"
        )


class AttentionPooling(nn.Module):
    """Pools ``[B, L, embed_dim]`` sequences with learned queries (SPEC.md §1).

    Parameters (state_dict names match the C++ ``attnpool::AttentionPooling``):

    - ``query``: ``[num_queries, embed_dim]``, initialised from
      ``N(0, 1/embed_dim)`` so that each query has about unit norm;
    - ``q_proj.weight``, ``k_proj.weight``: ``[embed_dim, embed_dim]``
      bias-free ``nn.Linear`` weights with ``nn.Linear``'s default init.

    With this init the scores start small, so an untrained module pools close
    to the mean of the unmasked positions, and learns where to look from there.

    ``forward(x, mask=None)`` returns ``[B, embed_dim]`` when ``num_queries == 1``
    and ``[B, num_queries, embed_dim]`` otherwise, in ``x``'s dtype. ``x`` may be
    float16/bfloat16 while the parameters stay float32 (mixed precision).
    ``mask`` (``[B, L]``): ``True`` (nonzero) means attend, the opposite of
    ``nn.MultiheadAttention``'s ``key_padding_mask``; pass ``~key_padding_mask``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int = 1,
        num_queries: int = 1,
        *,
        scale: Optional[float] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
            ("num_queries", num_queries),
        ):
            _check_int("AttentionPooling", name, value)
        if embed_dim < 1:
            raise ValueError(f"AttentionPooling: embed_dim must be >= 1, got {embed_dim}")
        if num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(
                f"AttentionPooling: num_heads must be >= 1 and divide embed_dim = {embed_dim}, "
                f"got num_heads = {num_heads}"
            )
        if num_queries < 1:
            raise ValueError(f"AttentionPooling: num_queries must be >= 1, got {num_queries}")
        if scale is not None:
            _check_number("AttentionPooling", "scale", scale)
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(
                    f"AttentionPooling: scale must be a finite positive number, got {scale}"
                )
            scale = float(scale)
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_queries = num_queries
        self.scale = scale
        self.query = nn.Parameter(torch.empty(num_queries, embed_dim, **factory))
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=False, **factory)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=False, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.query, std=self.embed_dim**-0.5)
        self.q_proj.reset_parameters()
        self.k_proj.reset_parameters()

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"AttentionPooling: x must have shape [B, L, embed_dim = {self.embed_dim}], "
                f"got {list(x.shape)}"
            )
        if not torch.jit.is_scripting():
            _check_plain_linear(self, "q_proj")
            _check_plain_linear(self, "k_proj")
        query = self.query[0] if self.num_queries == 1 else self.query
        return attention_pool(
            x, query, self.q_proj.weight, self.k_proj.weight, mask, self.num_heads, self.scale
        )

    def extra_repr(self) -> str:
        text = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_queries={self.num_queries}"
        return text if self.scale is None else f"{text}, scale={self.scale}"


def _check_weighted_pool_inputs(x: Tensor, mask: Optional[Tensor], weight: Tensor, max_len: int):
    """WeightedPooling's argument checks, as the op's: shapes and devices
    (ValueError), dtypes (TypeError)."""
    if x.dim() != 3:
        raise ValueError(f"WeightedPooling: x must have shape [B, L, H], got {list(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            "WeightedPooling: x must be float64, float32, float16 or bfloat16, "
            f"got {str(x.dtype).replace('torch.', '')}"
        )
    if x.device != weight.device:
        raise ValueError(
            f"WeightedPooling: x must be on the module's device ({weight.device}), got {x.device}"
        )
    if x.shape[1] > max_len:
        raise ValueError(
            f"WeightedPooling: sequence length {x.shape[1]} exceeds max_len = {max_len}"
        )
    if mask is not None:
        if mask.shape != x.shape[:2]:
            raise ValueError(
                f"WeightedPooling: mask must have shape [B, L] = {list(x.shape[:2])}, "
                f"got {list(mask.shape)}"
            )
        if mask.device != x.device:
            raise ValueError(
                f"WeightedPooling: mask must be on the same device as x ({x.device}), "
                f"got {mask.device}"
            )
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(
                "WeightedPooling: mask must be bool or an integer dtype (nonzero = attend), "
                f"got {str(mask.dtype).replace('torch.', '')}"
            )


class WeightedPooling(nn.Module):
    """The baseline "normal pooling": one learned weight per position.

    ``weight`` (``[max_len]``, zeros at init, so it starts as mean pooling) are
    logits; the pooling weights are their softmax over the unmasked positions of
    each sequence. Sequences may be shorter than ``max_len``, not longer.
    ``mask`` (``[B, L]``): ``True`` means attend, as in :class:`AttentionPooling`.
    """

    def __init__(self, max_len: int, *, device=None, dtype=None) -> None:
        super().__init__()
        _check_int("WeightedPooling", "max_len", max_len)
        if max_len < 1:
            raise ValueError(f"WeightedPooling: max_len must be >= 1, got {max_len}")
        self.max_len = max_len
        self.weight = nn.Parameter(torch.empty(max_len, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if not torch.jit.is_scripting():
            _check_weighted_pool_inputs(x, mask, self.weight, self.max_len)
        return reference.weighted_pool(x, self.weight, mask)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}"
