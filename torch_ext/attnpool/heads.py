"""Drop-in fused versions of peers' pooling heads (SPEC.md §7).

``convert_pooling_head(head)`` returns a module that computes what ``head``
computes, with the same call signature, outputs and gradients, through
:func:`attnpool.modules.pool_with_projections` instead of projecting every key
and value. It holds the head's own submodules and parameters (shared, not
copied) under the same names, so a checkpoint of a swapped model loads into
the original and back. ``swap_pooling_heads(model)`` converts every such head
inside a model in place.

Converted today: Hugging Face ``SiglipMultiheadAttentionPoolingHead`` and
``Siglip2MultiheadAttentionPoolingHead`` (with its ``attention_mask``), timm's
``AttentionPoolLatent`` (the ``global_pool='map'`` head of its ViTs) and
open_clip's ``AttentionalPooler`` (CoCa's). The classes are recognised by
module and name, so no peer library is ever imported here.
"""

import inspect
import sys
from typing import Optional

import torch
from torch import Tensor, nn

from attnpool.modules import pool_projected, pool_with_projections

_HF_MAP_HEADS = ("SiglipMultiheadAttentionPoolingHead", "Siglip2MultiheadAttentionPoolingHead")
# Every head convert_pooling_head knows, as (package, class name).
_KNOWN_HEADS = tuple(("transformers", name) for name in _HF_MAP_HEADS) + (
    ("timm", "AttentionPoolLatent"),
    ("open_clip", "AttentionalPooler"),
)


def _kind(module: nn.Module) -> Optional[str]:
    """The name of the known head class `module` is, or None."""
    cls = type(module)
    package = cls.__module__.split(".")[0]
    return cls.__name__ if (package, cls.__name__) in _KNOWN_HEADS else None


def _check_exact(attention: nn.Module, path: str) -> None:
    """What pool_with_projections cannot reproduce exactly, named. ``path``:
    where ``attention`` sits, as ``Head.attention``, for the messages."""
    if not isinstance(attention, nn.MultiheadAttention):
        raise TypeError(
            f"convert_pooling_head: {path} must be an nn.MultiheadAttention, "
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
                f"convert_pooling_head: {path} has {option}, which the fused head "
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
        _check_exact(head.attention, f"{owner}.attention")
        self.probe = head.probe
        self.attention = head.attention
        self.layernorm = head.layernorm
        self.mlp = head.mlp
        self.converted_from = owner
        # Siglip2 turns attention_mask into scores with transformers' own
        # function, which depends on the config (it ignores the mask when no
        # attention implementation is set): the fused head calls the same one.
        self.config = getattr(head, "config", None)
        # SigLIP's (v1) head takes no attention_mask, though its module
        # defines the mask function too: ask the head's own signature.
        takes_mask = "attention_mask" in inspect.signature(head.forward).parameters
        self._mask_function = (
            getattr(sys.modules[type(head).__module__], "create_bidirectional_mask", None)
            if takes_mask
            else None
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
            self.attention,
            hidden_state,
            self.probe[0],
            attn_bias=attn_bias,
            owner=self.converted_from,
            x_name="hidden_state",
        )  # [B, 1, E]
        residual = pooled
        pooled = residual + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]

    def extra_repr(self) -> str:
        return f"converted_from={self.converted_from}"


def _score_mask(attn_mask: Tensor, x: Tensor, owner: str):
    """(mask, attn_bias) [B, L] from an SDPA ``attn_mask`` that is the same for
    every head and query (``[B, 1, 1, L]``, ``[B, L]`` and the like): True
    attends in a boolean one, a float one is added to the scores."""
    batch, length = x.shape[0], x.shape[1]
    shape = list(attn_mask.shape)
    if (
        not shape
        or shape[-1] != length
        or any(size != 1 for size in shape[1:-1])
        or (len(shape) > 1 and shape[0] not in (1, batch))
    ):
        raise ValueError(
            f"{owner}: the fused head takes an attn_mask that is the same for every head and "
            f"query ([B, 1, 1, L] = [{batch}, 1, 1, {length}]), got {shape}"
        )
    flat = attn_mask.reshape(-1 if len(shape) > 1 else 1, length).expand(batch, length)
    if flat.dtype == torch.bool:
        return flat, None
    return None, flat


class FusedAttentionPoolLatent(nn.Module):
    """timm's ``AttentionPoolLatent`` (the ``global_pool='map'`` head of its
    ViTs), fused: ``latent``, ``q``, ``kv``, ``q_norm``, ``k_norm``, ``proj``,
    ``proj_drop``, ``norm``, ``mlp`` and ``pos_embed`` are the original head's
    own; ``kv`` is never called, its weights are read (no key or value is
    projected). ``forward(x, attn_mask=None)`` as timm's, for an ``attn_mask``
    that is the same for every head and query.
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        owner = type(head).__name__
        if not (isinstance(head.q_norm, nn.Identity) and isinstance(head.k_norm, nn.Identity)):
            raise ValueError(
                f"convert_pooling_head: {owner} has qk_norm=True, which normalises every "
                "projected key: the fused head never projects one, so it cannot reproduce it"
            )
        for name in ("latent", "q", "kv", "q_norm", "k_norm", "proj", "proj_drop", "norm", "mlp"):
            setattr(self, name, getattr(head, name))
        self.pos_embed = head.pos_embed
        self.num_heads = head.num_heads
        self.pool = head.pool
        self.out_features = head.out_features
        self.converted_from = owner

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        if self.pos_embed is not None:
            x = x + self.pos_embed.unsqueeze(0).to(x.dtype)
        mask = attn_bias = None
        if attn_mask is not None:
            mask, attn_bias = _score_mask(attn_mask, x, self.converted_from)
        embed_dim = self.kv.out_features // 2
        w_k, w_v = self.kv.weight[:embed_dim], self.kv.weight[embed_dim:]
        b_v = None if self.kv.bias is None else self.kv.bias[embed_dim:]
        query = self.latent[0]
        if isinstance(self.q, nn.Linear):
            w_q, b_q = self.q.weight, self.q.bias
        else:  # q_proj=False: the latent is the query
            w_q, b_q = torch.eye(embed_dim, dtype=w_k.dtype, device=w_k.device), None
        out = pool_projected(
            x,
            query,
            w_q,
            b_q,
            w_k,
            w_v,
            b_v,
            self.num_heads,
            mask,
            attn_bias,
            owner=self.converted_from,
        ).to(x.dtype)  # [B, latent_len, E]
        out = self.proj_drop(self.proj(out))
        if self.mlp is not None:
            out = out + self.mlp(self.norm(out))
        if self.pool == "token":
            return out[:, 0]
        if self.pool == "avg":
            return out.mean(1)
        return out

    def extra_repr(self) -> str:
        return f"converted_from={self.converted_from}"


# LayerNorms that compute F.layer_norm on x's rows and give x's dtype back,
# as (package, class name): open_clip's own, besides nn.LayerNorm itself.
_PLAIN_LAYER_NORMS = (("open_clip", "LayerNorm"), ("open_clip", "LayerNormFp32"))


def _fusable_norm(norm: nn.Module, width: int) -> bool:
    """Whether ``norm`` is a LayerNorm over rows of ``width`` that the pooling
    pass can compute itself (attnpool.modules.pool_with_projections'
    ``key_norm``); anything else runs as a module of its own."""
    cls = type(norm)
    plain = (
        cls is nn.LayerNorm or (cls.__module__.split(".")[0], cls.__name__) in _PLAIN_LAYER_NORMS
    )
    return (
        plain
        and isinstance(norm, nn.LayerNorm)
        and tuple(norm.normalized_shape) == (width,)
        and norm.eps > 0
    )


class FusedAttentionalPooler(nn.Module):
    """open_clip's ``AttentionalPooler`` (CoCa's, 1 query or many), fused:
    ``query``, ``attn``, ``ln_q`` and ``ln_k`` are the original's own; ``attn``
    is never called, its parameters are read. ``ln_k``, a LayerNorm, runs in
    the pooling pass where the head folds its queries (no normalized copy of
    ``x`` is made or saved), and as a pass of its own where it projects the
    keys (CoCa's 256 queries) or is some other module."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        owner = type(head).__name__
        _check_exact(head.attn, f"{owner}.attn")
        self.query = head.query
        self.attn = head.attn
        self.ln_q = head.ln_q
        self.ln_k = head.ln_k
        self.converted_from = owner

    def forward(self, x: Tensor) -> Tensor:
        query = self.ln_q(self.query)
        if _fusable_norm(self.ln_k, x.shape[-1]):
            return pool_with_projections(
                self.attn, x, query, key_norm=self.ln_k, owner=self.converted_from
            )
        return pool_with_projections(self.attn, self.ln_k(x), query, owner=self.converted_from)

    def extra_repr(self) -> str:
        return f"converted_from={self.converted_from}"


def convert_pooling_head(head: nn.Module) -> nn.Module:
    """A fused module computing exactly what ``head`` computes (same call
    signature, outputs and gradients, same parameter names), sharing its
    parameters. Raises ``TypeError`` for a head it does not know and
    ``ValueError`` for an option it cannot reproduce exactly."""
    kind = _kind(head)
    if kind in _HF_MAP_HEADS:
        return FusedSiglipPoolingHead(head)
    if kind == "AttentionPoolLatent":
        return FusedAttentionPoolLatent(head)
    if kind == "AttentionalPooler":
        return FusedAttentionalPooler(head)
    known = ", ".join(f"{package}'s {name}" for package, name in _KNOWN_HEADS)
    raise TypeError(
        f"convert_pooling_head: no fused version of {type(head).__module__}."
        f"{type(head).__name__}; known: {known}"
    )


def swap_pooling_heads(model: nn.Module) -> int:
    """Replaces every pooling head :func:`convert_pooling_head` knows inside
    ``model`` by its fused version, in place; returns how many it replaced."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"swap_pooling_heads: model must be an nn.Module, got {type(model).__name__}"
        )
    if _kind(model) is not None:
        raise TypeError(
            "swap_pooling_heads: model is itself a pooling head; use convert_pooling_head"
        )
    found = [name for name, module in model.named_modules() if _kind(module) is not None]
    for name in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, convert_pooling_head(getattr(parent, child)))
    return len(found)
