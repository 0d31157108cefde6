"""convert_pooling_head and swap_pooling_heads on timm's AttentionPoolLatent and
open_clip's AttentionalPooler (SPEC.md §7), against the peers' own modules with
random init: outputs and the gradients of the input and of every parameter;
then smoke runs of benchmarks/peer_heads.py and examples/swap_pooling_heads.py.

timm and open_clip need torchvision, which imports beside the CUDA build of
torch 2.14.1 only: `make test` runs this file in .venv-cuda
(scripts/test_peer_heads.sh); elsewhere it is skipped."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

timm_layers = pytest.importorskip("timm.layers")
open_clip_transformer = pytest.importorskip("open_clip.transformer")

import timm  # noqa: E402
from helpers import TOLERANCES, RecordedOps  # noqa: E402

import attnpool  # noqa: E402

TOL = TOLERANCES[torch.float64]


def _outputs_and_grads(module, x, *args):
    """module(x, *args) and the gradients of x and of every parameter."""
    module.zero_grad()
    leaf = x.detach().clone().requires_grad_()
    out = module(leaf, *args)
    out.backward(torch.ones_like(out).cumsum(-1))  # not a uniform gradient
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return out.detach(), leaf.grad, grads


def _assert_same(head, fused, x, *args):
    want = _outputs_and_grads(head, x, *args)
    got = _outputs_and_grads(fused, x, *args)
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], **TOL, msg=name)


TIMM_CASES = {
    "siglip-like": dict(latent_len=1, pool_type="token", norm_layer=nn.LayerNorm),
    "4-latents-avg": dict(latent_len=4, pool_type="avg", num_heads=2),
    "3-latents-no-pool-pos-embed": dict(latent_len=3, pool_type="", pos_embed="abs", feat_size=7),
    "no-q-proj": dict(q_proj=False, num_heads=8),
    "pre-logits": dict(out_features=0, latent_len=2, pool_type="avg"),
    "no-qkv-bias": dict(qkv_bias=False),
}


@pytest.mark.parametrize("case", TIMM_CASES.values(), ids=TIMM_CASES.keys())
def test_timm_attention_pool_latent(case):
    torch.manual_seed(0)
    head = timm_layers.AttentionPoolLatent(32, **{"num_heads": 4, **case}).double()
    fused = attnpool.convert_pooling_head(head)
    assert fused.state_dict().keys() == head.state_dict().keys()
    _assert_same(head, fused, torch.randn(3, 7, 32, dtype=torch.float64))


def test_timm_attention_pool_latent_with_attn_mask():
    torch.manual_seed(0)
    head = timm_layers.AttentionPoolLatent(32, num_heads=4, latent_len=2, pool_type="avg").double()
    fused = attnpool.convert_pooling_head(head)
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    keep = torch.rand(3, 1, 1, 7) > 0.3
    keep[..., 0] = True
    _assert_same(head, fused, x, keep)
    bias = torch.randn(3, 1, 1, 7, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    _assert_same(head, fused, x, bias)
    with pytest.raises(ValueError, match="same for every head and query"):
        fused(x, torch.ones(3, 4, 1, 7, dtype=torch.bool))


def test_timm_qk_norm_is_refused_by_name():
    head = timm_layers.AttentionPoolLatent(32, num_heads=4, qk_norm=True)
    with pytest.raises(ValueError, match="qk_norm=True"):
        attnpool.convert_pooling_head(head)


def test_swap_in_a_timm_vit_with_a_map_head():
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        global_pool="map",
        img_size=32,
        patch_size=8,
        depth=1,
        num_classes=5,
    ).double()
    model.eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = model(images)
    state = model.state_dict()
    assert attnpool.swap_pooling_heads(model) == 1
    assert type(model.attn_pool).__name__ == "FusedAttentionPoolLatent"
    torch.testing.assert_close(model(images), want, **TOL)
    # A checkpoint of the swapped model loads into the original and back.
    assert model.state_dict().keys() == state.keys()
    model.load_state_dict(state, strict=True)


@pytest.mark.parametrize("n_queries", [1, 6, 24])
def test_open_clip_attentional_pooler(n_queries):
    """Its ln_k, random weights, runs in the pooling pass where the head folds
    (1 and 6 queries of 4 heads), and as a pass of its own where it projects
    the keys (24)."""
    torch.manual_seed(0)
    head = open_clip_transformer.AttentionalPooler(
        d_model=32, context_dim=24, n_head=4, n_queries=n_queries
    ).double()
    with torch.no_grad():
        for norm in (head.ln_k, head.ln_q):
            norm.weight.normal_()
            norm.bias.normal_()
    fused = attnpool.convert_pooling_head(head)
    assert fused.state_dict().keys() == head.state_dict().keys()
    x = torch.randn(3, 9, 24, dtype=torch.float64) * 3 + 1
    _assert_same(head, fused, x)
    with RecordedOps() as recorded:
        fused(x)
    in_the_pass = "attnpool._layer_norm_folded_attention_pool_forward" in recorded.names
    assert in_the_pass == (n_queries != 24)


@pytest.mark.parametrize("n_queries", [1, 24], ids=["fold", "projection"])
def test_converted_open_clip_pooler_compiles_whole(n_queries):
    """With many queries (CoCa's pooler) the fused head projects the keys, a
    path whose input check once broke torch.compile(fullgraph=True)."""
    torch.manual_seed(0)
    head = open_clip_transformer.AttentionalPooler(
        d_model=32, context_dim=24, n_head=4, n_queries=n_queries
    ).double()
    fused = attnpool.convert_pooling_head(head)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch, length in ((3, 9), (2, 13)):
        x = torch.randn(batch, length, 24, dtype=torch.float64)
        want = _outputs_and_grads(fused, x)
        got = _outputs_and_grads(compiled, x)
        torch.testing.assert_close(got[0], want[0], **TOL)
        torch.testing.assert_close(got[1], want[1], **TOL)
        for got_grad, want_grad in zip(got[2].values(), want[2].values(), strict=True):
            torch.testing.assert_close(got_grad, want_grad, **TOL)


def test_open_clip_attentional_pooler_refusal_names_its_attn():
    head = open_clip_transformer.AttentionalPooler(d_model=32, context_dim=24, n_head=4)
    head.attn.dropout = 0.1
    with pytest.raises(ValueError, match=r"AttentionalPooler\.attn has dropout > 0"):
        attnpool.convert_pooling_head(head)


def test_swap_in_an_open_clip_coca_vision_tower():
    torch.manual_seed(0)
    tower = open_clip_transformer.VisionTransformer(
        image_size=32,
        patch_size=8,
        width=32,
        layers=1,
        heads=4,
        mlp_ratio=2.0,
        attentional_pool=True,  # open_clip's CoCa setup: one pooler, many queries
        attn_pooler_queries=8,
        attn_pooler_heads=4,
        output_dim=16,
        output_tokens=True,
    ).double()
    tower.eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = tower(images)  # (pooled, tokens)
    assert attnpool.swap_pooling_heads(tower) == 1
    assert type(tower.attn_pool).__name__ == "FusedAttentionalPooler"
    for got, expected in zip(tower(images), want, strict=True):
        torch.testing.assert_close(got, expected, **TOL)


# benchmarks/peer_heads.py and examples/swap_pooling_heads.py, run --quick as
# a user would: with this interpreter and the attnpool this process imports.
ROOT = Path(__file__).resolve().parents[1]
TIMM_AND_OPEN_CLIP_ROWS = {
    ("siglip-b16", "timm AttentionPoolLatent"),
    ("siglip-so400m", "timm AttentionPoolLatent"),
    ("coca", "open_clip AttentionalPooler"),
    ("coca-contrastive", "open_clip AttentionalPooler"),
}
HF_ROWS = {
    ("siglip-b16", "HF SiglipMultiheadAttentionPoolingHead"),
    ("siglip-so400m", "HF SiglipMultiheadAttentionPoolingHead"),
}


def _run_script(script, *args):
    package_dir = str(Path(attnpool.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (package_dir, os.environ.get("PYTHONPATH")) if p)
    run = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


@pytest.fixture(scope="module")
def benchmark_rows(tmp_path_factory):
    figures = tmp_path_factory.mktemp("peer_heads") / "figures.json"
    _run_script("benchmarks/peer_heads.py", "--quick", "--json", str(figures))
    report = json.loads(figures.read_text())
    return {(row["shape"], row["peer"]): row for row in report["rows"]}


@pytest.fixture(scope="module")
def example_output():
    timm_part, _, hf_part = _run_script("examples/swap_pooling_heads.py", "--quick").partition(
        "Hugging Face SiglipVisionModel"
    )
    return {"timm": timm_part, "transformers": hf_part}


def _check_rows(rows, expected):
    assert expected <= rows.keys()
    for key in expected:
        row = rows[key]
        assert row["attnpool_matches_peer"], key
        for figures in (row["forward_ms"], row["forward_backward_ms"], row["saved_bytes"]):
            assert all(value > 0 for value in figures.values()), (key, figures)
        # The fused head saves no projected key or value for the backward.
        assert row["ratios"]["saved bytes peer/attnpool"] > 1, (key, row["saved_bytes"])


def test_peer_heads_benchmark_runs_in_bfloat16(tmp_path):
    # Heads, parameters and x in bfloat16; the outputs agree to 2e-2.
    figures = tmp_path / "figures.json"
    _run_script(
        "benchmarks/peer_heads.py",
        "--quick",
        "--dtype",
        "bfloat16",
        "--shapes",
        "coca",
        "--json",
        str(figures),
    )
    report = json.loads(figures.read_text())
    assert report["dtype"] == "bfloat16"
    [row] = report["rows"]
    assert row["dtype"] == "bfloat16" and row["attnpool_matches_peer"], row
    assert all(value > 0 for value in row["forward_backward_ms"].values()), row


def test_peer_heads_benchmark_times_timm_and_open_clip(benchmark_rows):
    _check_rows(benchmark_rows, TIMM_AND_OPEN_CLIP_ROWS)


def test_peer_heads_benchmark_times_hf_siglip(benchmark_rows):
    pytest.importorskip("transformers")
    _check_rows(benchmark_rows, HF_ROWS)


@pytest.mark.parametrize(
    "library, converted",
    [
        ("timm", "AttentionPoolLatent -> FusedAttentionPoolLatent"),
        ("transformers", "SiglipMultiheadAttentionPoolingHead -> FusedSiglipPoolingHead"),
    ],
)
def test_swap_example_replaces_one_head_and_keeps_the_outputs(example_output, library, converted):
    pytest.importorskip(library)
    output = example_output[library]
    assert f"swap_pooling_heads replaced 1 head: {converted}" in output, output
    assert "same pooled features" in output, output
    assert "skipped" not in output, output
