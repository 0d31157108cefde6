"""Swaps the attention-pooling heads of a timm ViT (global_pool='map') and of a
Hugging Face SiglipVisionModel for attnpool's fused versions, checks that the
models compute the same pooled features, and times the heads and the models
before and after. Random weights: nothing is downloaded.

    python examples/swap_pooling_heads.py [--quick]

timm needs torchvision; a family whose library is missing is skipped with a
message. In this repository timm runs in .venv-cuda (scripts/test_peer_heads.sh):
    PYTHONPATH=build/cuda/pkg .venv-cuda/bin/python examples/swap_pooling_heads.py
"""

import argparse
import statistics
import time

import torch

import attnpool


def median_ms(run, repeats=5):
    run()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def head_ms(head, tokens):
    """(forward, forward+backward) ms of a pooling head on the tokens it pools."""

    def forward_backward():
        head(tokens.detach().requires_grad_()).sum().backward()

    with torch.no_grad():
        forward = median_ms(lambda: head(tokens))
    return forward, median_ms(forward_backward)


def timm_vit(quick):
    import timm

    size = dict(img_size=32, patch_size=8, embed_dim=64, num_heads=4) if quick else {}
    model = timm.create_model(
        "vit_base_patch16_siglip_224", pretrained=False, depth=2, num_classes=0, **size
    )  # num_classes=0: the model returns the pooled features
    return model, "attn_pool", model, model.forward_features


def hf_siglip(quick):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    if quick:
        size = dict(hidden_size=64, num_attention_heads=4, intermediate_size=256, image_size=32)
        size["patch_size"] = 8
    else:
        size = dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072)
        size.update(image_size=224, patch_size=16)
    model = SiglipVisionModel(SiglipVisionConfig(num_hidden_layers=2, **size))
    return (
        model,
        "head",
        lambda images: model(pixel_values=images).pooler_output,
        lambda images: model(pixel_values=images).last_hidden_state,
    )


def demo(title, build, quick):
    try:
        model, head_name, pooled, tokens = build(quick)
    except ImportError as error:
        print(f"{title}: skipped ({error})")
        return
    model.eval()
    size = 32 if quick else 224
    images = torch.randn(2 if quick else 8, 3, size, size)
    print(f"{title}, 2 blocks, random weights, {images.shape[0]} images {size}x{size}")

    head = model.get_submodule(head_name)
    with torch.no_grad():
        want, hidden = pooled(images), tokens(images)
        model_before = median_ms(lambda: pooled(images))
    head_before = head_ms(head, hidden)

    replaced = attnpool.swap_pooling_heads(model)
    fused = model.get_submodule(head_name)
    print(
        f"  swap_pooling_heads replaced {replaced} head: "
        f"{type(head).__name__} -> {type(fused).__name__}"
    )
    with torch.no_grad():
        got = pooled(images)
        model_after = median_ms(lambda: pooled(images))
    torch.testing.assert_close(got, want)  # float32 tolerances
    print(f"  same pooled features (max |difference| {(got - want).abs().max():.1e})")
    head_after = head_ms(fused, hidden)

    print(f"  {'median ms':28s} {'before':>9s} {'after':>9s}")
    rows = {
        "head forward": (head_before[0], head_after[0]),
        "head forward+backward": (head_before[1], head_after[1]),
        "model forward": (model_before, model_after),
    }
    for name, (before, after) in rows.items():
        print(f"  {name:28s} {before:9.2f} {after:9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models")
    args = parser.parse_args()
    torch.manual_seed(0)
    demo("timm vit_base_patch16_siglip_224 (global_pool='map')", timm_vit, args.quick)
    demo("Hugging Face SiglipVisionModel", hf_siglip, args.quick)


if __name__ == "__main__":
    main()
