"""convert_pooling_head / swap_pooling_heads (SPEC.md §7) against the peers'
own modules, random init: Hugging Face's SigLIP and SigLIP2 pooling heads."""

import pytest
import torch
from transformers import Siglip2VisionConfig, SiglipVisionConfig, SiglipVisionModel
from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead
from transformers.models.siglip2.modeling_siglip2 import Siglip2MultiheadAttentionPoolingHead

import attnpool

WIDTH, HEADS = 32, 4


def _config(cls):
    return cls(hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=64)


def _heads(cls, config_cls):
    """A peer head with random weights and biases, in float64, and its fused version."""
    torch.manual_seed(0)
    head = cls(_config(config_cls)).double()
    with torch.no_grad():
        for param in head.parameters():
            param.copy_(torch.randn_like(param) / WIDTH**0.5)
    return head, attnpool.convert_pooling_head(head)


def _compare(peer, fused, x, *args):
    """Outputs, and gradients of x and of every parameter, equal."""
    grads = []
    for module in (peer, fused):
        module.zero_grad()
        leaf = x.clone().requires_grad_()
        out = module(leaf, *args)
        out.backward(torch.ones_like(out))
        grads.append((out, leaf.grad, {n: p.grad.clone() for n, p in module.named_parameters()}))
    (want, want_dx, want_params), (got, got_dx, got_params) = grads
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_dx, want_dx)
    assert got_params.keys() == want_params.keys()
    for name in want_params:
        torch.testing.assert_close(got_params[name], want_params[name], msg=name)


def test_siglip_head():
    peer, fused = _heads(SiglipMultiheadAttentionPoolingHead, SiglipVisionConfig)
    x = torch.randn(3, 9, WIDTH, dtype=torch.float64)
    _compare(peer, fused, x)
    assert fused.state_dict().keys() == peer.state_dict().keys()
    assert all(a is b for a, b in zip(fused.parameters(), peer.parameters(), strict=True))


def test_siglip_head_refuses_an_attention_mask_as_the_original_does():
    peer, fused = _heads(SiglipMultiheadAttentionPoolingHead, SiglipVisionConfig)
    x = torch.randn(2, 5, WIDTH, dtype=torch.float64)
    attention_mask = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(TypeError):
        peer(x, attention_mask)
    with pytest.raises(
        TypeError, match="SiglipMultiheadAttentionPoolingHead takes no attention_mask"
    ):
        fused(x, attention_mask)


@pytest.mark.parametrize("attention", ["eager", "sdpa", None])
def test_siglip2_head_with_padding(attention):
    peer, fused = _heads(Siglip2MultiheadAttentionPoolingHead, Siglip2VisionConfig)
    peer.config._attn_implementation = attention  # None: transformers ignores the mask
    x = torch.randn(3, 9, WIDTH, dtype=torch.float64)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[0, 5:] = 0
    attention_mask[2, :] = 0  # all padding: both average every position
    _compare(peer, fused, x, attention_mask)
    _compare(peer, fused, x)


def test_swap_in_a_vision_model_keeps_outputs_and_checkpoints():
    torch.manual_seed(0)
    config = _config(SiglipVisionConfig)
    config.update(dict(num_hidden_layers=1, image_size=32, patch_size=8))
    model = SiglipVisionModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(pixels).pooler_output
    state = model.state_dict()
    assert attnpool.swap_pooling_heads(model) == 1
    assert attnpool.swap_pooling_heads(model) == 0  # nothing left to swap
    with torch.no_grad():
        got = model(pixels).pooler_output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert model.state_dict().keys() == state.keys()
    fresh = SiglipVisionModel(config)
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_what_cannot_be_converted_is_named():
    with pytest.raises(TypeError, match="no fused version of torch.nn.modules.linear.Linear"):
        attnpool.convert_pooling_head(torch.nn.Linear(2, 2))
    peer, _ = _heads(SiglipMultiheadAttentionPoolingHead, SiglipVisionConfig)
    peer.attention.dropout = 0.1
    with pytest.raises(
        ValueError,
        match=r"SiglipMultiheadAttentionPoolingHead\.attention has dropout > 0, which the fused",
    ):
        attnpool.convert_pooling_head(peer)
    with pytest.raises(TypeError, match="use convert_pooling_head"):
        attnpool.swap_pooling_heads(peer)
    with pytest.raises(TypeError, match="model must be an nn.Module, got int"):
        attnpool.swap_pooling_heads(3)


@pytest.mark.parametrize(
    "cls, config_cls",
    [
        (SiglipMultiheadAttentionPoolingHead, SiglipVisionConfig),
        (Siglip2MultiheadAttentionPoolingHead, Siglip2VisionConfig),
    ],
)
def test_a_wrong_width_names_the_head_and_hidden_state(cls, config_cls):
    # The folded query's check would name u, which the caller never passed.
    _, fused = _heads(cls, config_cls)
    with pytest.raises(
        ValueError,
        match=rf"{cls.__name__}: hidden_state must have shape \[B, L, {WIDTH}\] .*got \[2, 5, 8\]",
    ):
        fused(torch.randn(2, 5, 8, dtype=torch.float64))
