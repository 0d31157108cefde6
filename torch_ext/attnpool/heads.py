"""Drop-in fused versions of peers' pooling heads (SPEC.md §7).

``convert_pooling_head(head)`` returns a module that computes what ``head``
computes, with the same call signature, outputs and gradients, through
:func:`attnpool.modules.pool_with_projections` instead of projecting every key
and value. It holds the head's own submodules and parameters (shared, not
copied) under the same names, so a checkpoint of a swapped model loads into
the original and back. ``swap_pooling_heads(model)`` converts every such head
inside a model in place.

Converted today: Hugging Face ``SiglipMultiheadAttentionPoolingHead`` and
``Siglip2MultiheadAttentionPoolingHead`` (with its ``attention_mask``). The
classes are recognised by name, so transformers is never imported here.
"""

import sys
from typing import Optional

import torch
from torch import Tensor, nn

from attnpool.modules import pool_with_projections

_HF_MAP_HEADS = ("SiglipMultiheadAttentionPoolingHead", "Siglip2MultiheadAttentionPoolingHead")


def _is_hf_map_head(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__.startswith("transformers.") and cls.__name__ in _HF_MAP_HEADS


def _check_exact(attention: nn.Module, owner: str) -> None:
    """What pool_with_projections cannot reproduce exactly, named."""
    if not isinstance(attention, nn.MultiheadAttention):
        raise TypeError(
            f"convert_pooling_head: {owner}.attention must be an nn.MultiheadAttention, "
            f"got {type(attention).__name__}"
        )
    refused = {
        "dropout > 0": attention.dropout > 0,
        "add_bias_kv=True": attention.bias_k is not None,
        "add_zero_attn=True": attention.add_zero_attn,
        "batch_first=False": not attention.batch_first,
        "kdim != vdim": attention.kdim != attention.vdim,
    }
    for option, present in refused.items():
        if present:
            raise ValueError(
                f"convert_pooling_head: {owner}.attention has {option}, which the fused head "
                "cannot reproduce exactly"
            )


class FusedSiglipPoolingHead(nn.Module):
    """Hugging Face's SigLIP/SigLIP2 pooling head, fused: ``probe``,
    ``attention``, ``layernorm`` and ``mlp`` are the original head's own
    submodules; ``attention`` is never called, its parameters are read.

    ``forward(hidden_state, attention_mask=None)``: ``attention_mask`` ``[B, L]``
    is Siglip2's (1 = attend, 0 = padding), turned into score biases by
    transformers' own function as the original head does: padding gets
    ``finfo(probe.dtype).min``, so a row that is all padding averages every
    position.
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        owner = type(head).__name__
        _check_exact(head.attention, owner)
        self.probe = head.probe
        self.attention = head.attention
        self.layernorm = head.layernorm
        self.mlp = head.mlp
        self.converted_from = owner
        # Siglip2 turns attention_mask into scores with transformers' own
        # function, which depends on the config (it ignores the mask when no
        # attention implementation is set): the fused head calls the same one.
        self.config = getattr(head, "config", None)
        self._mask_function = getattr(
            sys.modules[type(head).__module__], "create_bidirectional_mask", None
        )

    def _padding_bias(self, hidden_state: Tensor, attention_mask: Tensor) -> Optional[Tensor]:
        """[B, L]: what Hugging Face adds to the scores for this attention_mask."""
        if self._mask_function is None:
            raise TypeError(f"{self.converted_from} takes no attention_mask")
        probe = self.probe.expand(hidden_state.shape[0], -1, -1)
        mask = self._mask_function(
            config=self.config,
            inputs_embeds=probe,
            attention_mask=attention_mask,
            encoder_hidden_states=hidden_state,
        )
        if mask is None:
            return None
        mask = mask.reshape(hidden_state.shape[0], -1)  # [B, 1, 1, L]: one query
        if mask.dtype == torch.bool:
            lowest = torch.finfo(self.probe.dtype).min
            return torch.zeros(mask.shape, dtype=self.probe.dtype, device=mask.device).masked_fill(
                ~mask, lowest
            )
        return mask.to(self.probe.dtype)

    def forward(self, hidden_state: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        attn_bias = None
        if attention_mask is not None:
            attn_bias = self._padding_bias(hidden_state, attention_mask)
        pooled = pool_with_projections(
            self.attention, hidden_state, self.probe[0], attn_bias=attn_bias
        )  # [B, 1, E]
        residual = pooled
        pooled = residual + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]

    def extra_repr(self) -> str:
        return f"converted_from={self.converted_from}"


def convert_pooling_head(head: nn.Module) -> nn.Module:
    """A fused module computing exactly what ``head`` computes (same call
    signature, outputs and gradients, same parameter names), sharing its
    parameters. Raises ``TypeError`` for a head it does not know and
    ``ValueError`` for an option it cannot reproduce exactly."""
    if _is_hf_map_head(head):
        return FusedSiglipPoolingHead(head)
    raise TypeError(
        f"convert_pooling_head: no fused version of {type(head).__module__}."
        f"{type(head).__name__}; known: transformers' {', '.join(_HF_MAP_HEADS)}"
    )


def swap_pooling_heads(model: nn.Module) -> int:
    """Replaces every pooling head :func:`convert_pooling_head` knows inside
    ``model`` by its fused version, in place; returns how many it replaced."""
    if _is_hf_map_head(model):
        raise TypeError(
            "swap_pooling_heads: model is itself a pooling head; use convert_pooling_head"
        )
    found = [name for name, module in model.named_modules() if _is_hf_map_head(module)]
    for name in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, convert_pooling_head(getattr(parent, child)))
    return len(found)
