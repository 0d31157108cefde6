"""MultiheadAttentionPooling (SPEC.md §7) against nn.MultiheadAttention itself,
random init and random biases: values, gradients, state_dict, edge cases, errors."""

import copy

import pytest
import torch
from helpers import TOLERANCES, RecordedOps, last_line_at_default_level
from torch import nn

import attnpool
from attnpool import reference

EMBED_DIM, NUM_HEADS, BATCH, SEQ_LEN = 16, 4, 5, 7
EMPTY_ROW = 2  # fully masked in every test batch


def _pair(num_queries, kdim, bias, dtype=torch.float64, seed=0):
    """The module and an nn.MultiheadAttention holding the same weights, biases random."""
    torch.manual_seed(seed)
    module = attnpool.MultiheadAttentionPooling(
        EMBED_DIM, NUM_HEADS, num_queries, kdim=kdim, bias=bias
    ).to(dtype)
    peer = nn.MultiheadAttention(
        EMBED_DIM, NUM_HEADS, kdim=kdim, vdim=kdim, bias=bias, batch_first=True
    ).to(dtype)
    with torch.no_grad():
        for param in peer.parameters():
            param.copy_(torch.randn_like(param) / EMBED_DIM**0.5)
    state = peer.state_dict()
    module.load_state_dict({**state, "query": module.query.detach()}, strict=True)
    return module, peer


def _batch(kdim, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ_LEN, kdim or EMBED_DIM, generator=gen, dtype=dtype)
    mask = torch.rand(BATCH, SEQ_LEN, generator=gen) > 0.4
    mask[:, 0] = True
    mask[EMPTY_ROW] = False
    return x, mask


def _peer_output(module, peer, x, mask):
    queries = module.query.expand(x.shape[0], -1, -1)
    out = peer(queries, x, x, key_padding_mask=~mask, need_weights=False)[0]
    return out[:, 0] if module.num_queries == 1 else out


# With 8 queries, the fold costs more than projecting the keys and values,
# and the module projects them (modules._fold_is_cheaper): both paths here.
CASES = [
    pytest.param(q, kdim, bias, id=f"q{q}-kdim{kdim}-{'bias' if bias else 'nobias'}")
    for q in (1, 3, 8)
    for kdim in (None, 12)
    for bias in (True, False)
]


@pytest.mark.parametrize("num_queries,kdim,bias", CASES)
def test_values_and_gradients_equal_nn_multihead_attention(num_queries, kdim, bias):
    module, peer = _pair(num_queries, kdim, bias)
    x, mask = _batch(kdim)
    attending = [b for b in range(BATCH) if b != EMPTY_ROW]  # the peer gives NaN there
    x_module = x.clone().requires_grad_()
    x_peer = x.clone().requires_grad_()
    got = module(x_module, mask)[attending]
    want = _peer_output(module, peer, x_peer[attending], mask[attending])
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])
    grad_out = torch.randn_like(got)
    got.backward(grad_out)
    want.backward(grad_out)
    torch.testing.assert_close(x_module.grad[attending], x_peer.grad[attending])
    for name, param in peer.named_parameters():
        torch.testing.assert_close(
            module.get_parameter(name).grad, param.grad, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert module.query.grad.abs().sum() > 0


def test_many_queries_project_instead_of_folding_with_the_same_conventions():
    from attnpool.modules import _fold_is_cheaper

    module, _ = _pair(8, None, True)
    x, _ = _batch(None)
    w_v = module.in_proj_weight.chunk(3)[2]
    assert not _fold_is_cheaper(module.query, w_v, NUM_HEADS)
    assert _fold_is_cheaper(module.query[:1], w_v, NUM_HEADS)
    # lengths: the padding is never read (NaN there), as on the fold's path.
    lengths = torch.tensor([7, 3, 0, 1, 5])
    padded = x.clone()
    padded[torch.arange(SEQ_LEN)[None, :] >= lengths[:, None]] = float("nan")
    got = module(padded, None, None, lengths)
    want = module(x, torch.arange(SEQ_LEN)[None, :] < lengths[:, None])
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])
    assert not got.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projection_in_bfloat16_on_the_cpu_scores_in_float32(dtype):
    # As attention_pool's projection path: SDPA's CPU kernel was slower for
    # bfloat16 than plain products with float32 scores, whose softmax sets
    # the tiny weights to 0 (test_projection.py).
    exact, _ = _pair(8, None, True)
    module = copy.deepcopy(exact).to(dtype)
    exact = exact.to(dtype).double()  # the same rounded weights
    x, mask = _batch(None, dtype=dtype)
    with RecordedOps() as recorded:
        got = module(x, mask)
    sdpa = any("scaled_dot_product" in name for name in recorded.names)
    assert sdpa == (dtype == torch.float32)
    assert ("attnpool._softmax_without_subnormals" in recorded.names) == (not sdpa)
    want = exact(x.double(), mask)
    torch.testing.assert_close(got.double(), want, **TOLERANCES[dtype])


AMX_TILES = attnpool._C.cpu_kernel_isa() == "AMX_BF16"


def _calls_sdpa(names):
    return any(
        "scaled_dot_product" in name or "attention_without_subnormals" in name for name in names
    )


@pytest.mark.parametrize("masking", ["none", "mask", "attn_bias"])
def test_bfloat16_inference_on_the_cpu_pools_sequence_by_sequence(masking):
    # As attention_pool's inference: the float32 scores of one sequence at a
    # time stay in cache; the values are those of the batch at once, which
    # training takes, bit for bit. With AMX only a bias's scores (SDPA
    # serves the others, below).
    if AMX_TILES and masking != "attn_bias":
        pytest.skip("SDPA serves bfloat16 inference on AMX")
    module, _ = _pair(8, None, True)
    module = module.bfloat16()
    x, mask = _batch(None, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    extra = {
        "none": {},
        "mask": {"mask": mask},
        "attn_bias": {"attn_bias": torch.randn(BATCH, SEQ_LEN, generator=gen)},
    }[masking]
    with torch.no_grad(), RecordedOps() as recorded:
        got = module(x, **extra)
    assert recorded.names.count("attnpool._softmax_without_subnormals") == BATCH, recorded.names
    trained = module(x, **extra)
    assert trained.requires_grad
    assert torch.equal(got, trained.detach())


@pytest.mark.parametrize("masking", ["none", "mask"])
def test_bfloat16_inference_on_the_cpu_takes_sdpa_with_amx(masking):
    # As attention_pool: SDPA multiplies on the tiles, CoCa's pooler forward
    # 9.1 ms against the products' 13.5 (benchmarks/peer_heads.py, bfloat16).
    module, _ = _pair(8, None, True)
    module = module.bfloat16()
    x, mask = _batch(None, dtype=torch.bfloat16)
    with torch.no_grad(), RecordedOps() as recorded:
        got = module(x, mask=mask if masking == "mask" else None)
    assert _calls_sdpa(recorded.names) == AMX_TILES, recorded.names
    assert ("attnpool._softmax_without_subnormals" in recorded.names) == (not AMX_TILES)
    exact = copy.deepcopy(module).double()
    want = exact(x.double(), mask=mask if masking == "mask" else None)
    torch.testing.assert_close(got.double(), want, **TOLERANCES[torch.bfloat16])


LOWERED_SCRIPT = """
import torch

import attnpool
from attnpool.modules import MultiheadAttentionPooling

torch.manual_seed(0)
module = MultiheadAttentionPooling(16, 4, num_queries=32).bfloat16()
with torch.no_grad(), torch.profiler.profile() as prof:
    module(torch.randn(3, 7, 16).bfloat16())
names = [event.name for event in prof.events()]
print(attnpool._C.cpu_kernel_isa(), any("scaled_dot_product" in n for n in names))
"""


def test_bfloat16_inference_below_amx_scores_in_float32():
    # The other side of the test above on a CPU with AMX.
    assert last_line_at_default_level(LOWERED_SCRIPT).split() == ["DEFAULT", "False"]


def test_bfloat16_inference_by_projection_of_an_empty_batch():
    module, _ = _pair(8, None, True)
    module = module.bfloat16()
    with torch.no_grad():
        out = module(torch.randn(0, SEQ_LEN, EMBED_DIM, dtype=torch.bfloat16))
    assert out.shape == (0, 8, EMBED_DIM)


# (torch.func calls the deprecated torch.jit.script inside; nothing to do with attnpool.)
@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
def test_projection_differentiates_attn_bias_of_frozen_parameters():
    # Only attn_bias carries a gradient or a tangent: the inference path,
    # which writes into its output, must not take the call.
    module, _ = _pair(8, None, True)
    module.requires_grad_(False)
    x, _ = _batch(None)
    gen = torch.Generator().manual_seed(3)
    bias = torch.randn(BATCH, SEQ_LEN, generator=gen, dtype=torch.float64).requires_grad_()
    torch.autograd.gradcheck(
        lambda b: module(x, attn_bias=b), (bias,), check_forward_ad=True, eps=1e-6
    )


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:.*torch.jit.trace.*:DeprecationWarning")
def test_jit_trace_of_bfloat16_inference_by_projection_runs_other_batch_sizes():
    # A loop over the batch would be unrolled into the trace at its size.
    module, _ = _pair(8, None, True)
    module = module.bfloat16().eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        traced = torch.jit.trace(
            module, torch.randn(2, SEQ_LEN, EMBED_DIM, generator=gen).bfloat16()
        )
        x = torch.randn(3, SEQ_LEN, EMBED_DIM, generator=gen).bfloat16()
        torch.testing.assert_close(traced(x), module(x), rtol=0, atol=0)


@pytest.mark.parametrize("num_queries", [1, 8], ids=["fold", "projection"])
def test_a_row_biased_to_the_lowest_float_has_exact_gradients(num_queries):
    """Peers pad with finfo.min (SPEC.md §7): such a row is a uniform average.
    Against SPEC.md §7's recipe on the reference ops, in float64. On the
    projection path SDPA's log-sum-exp of such a row rounded to finfo.min and
    its backward took p = 1 instead of 1/L: gradients L times too large."""
    from attnpool.modules import projection_weights

    module, _ = _pair(num_queries, None, True)
    x, _ = _batch(None)
    bias = torch.zeros(BATCH, SEQ_LEN, dtype=torch.float64)
    bias[1] = torch.finfo(torch.float32).min
    bias[3, 2:] = torch.finfo(torch.float32).min
    w_q, b_q, w_k, w_v, b_v = projection_weights(module)
    head_dim = EMBED_DIM // NUM_HEADS

    def recipe(x):
        u = reference.fold_query(module.query, w_q, w_k, NUM_HEADS, b_q)
        pooled = reference.folded_attention_pool(x, u, None, head_dim**-0.5, True, bias)
        heads = w_v.reshape(NUM_HEADS, head_dim, EMBED_DIM)
        values = torch.einsum("bqnk,ndk->bqnd", pooled, heads).flatten(2) + b_v
        out = module.out_proj(values)
        return out[:, 0] if num_queries == 1 else out

    results = []
    for pool in (lambda x: module(x, attn_bias=bias), recipe):
        leaf = x.clone().requires_grad_()
        out = pool(leaf)
        grads = torch.autograd.grad(out, [leaf, *module.parameters()], torch.ones_like(out))
        results.append((out, *grads))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("num_queries", [1, 8], ids=["fold", "projection"])
def test_both_paths_refuse_the_same_bad_input(num_queries):
    module, _ = _pair(num_queries, None, True)
    x, mask = _batch(None)
    # The fold's dtype rule on both paths (the projection path cast x).
    with pytest.raises(TypeError, match="x is float32 and the parameters are float64"):
        module(x.float())
    with pytest.raises(TypeError, match="x is float64 and the parameters are float32"):
        copy.deepcopy(module).float()(x)
    with pytest.raises(TypeError, match="x must be"):
        module(x.long())
    # Each names the module, on either path.
    with pytest.raises(TypeError, match="^MultiheadAttentionPooling: attn_bias must be"):
        module(x, attn_bias=mask)
    with pytest.raises(ValueError, match="^MultiheadAttentionPooling: attn_bias must have shape"):
        module(x, attn_bias=torch.zeros(x.shape[0], x.shape[1] + 1, dtype=x.dtype))
    with pytest.raises(TypeError, match="^MultiheadAttentionPooling: lengths must be an integer"):
        module(x, lengths=torch.ones(x.shape[0]))
    with pytest.raises(ValueError, match="^MultiheadAttentionPooling: mask must have shape"):
        module(x, mask[:2])
    with pytest.raises(TypeError, match="^MultiheadAttentionPooling: mask must be bool"):
        module(x, mask.double())


@pytest.mark.parametrize("num_queries", [2, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_a_row_with_nothing_to_attend_gives_the_output_bias(bias, num_queries):
    module, _ = _pair(num_queries, None, bias)
    x, mask = _batch(None)
    x.requires_grad_()
    out = module(x, mask)
    want = module.out_proj.bias if bias else torch.zeros(EMBED_DIM, dtype=x.dtype)
    torch.testing.assert_close(out[EMPTY_ROW], want.expand(num_queries, -1), rtol=0, atol=0)
    out.sum().backward()
    assert torch.equal(x.grad[EMPTY_ROW], torch.zeros_like(x[EMPTY_ROW]))
    assert not x.grad.isnan().any()
    empty = module(x[:, :0], mask[:, :0])
    torch.testing.assert_close(empty, want.expand(BATCH, num_queries, -1), rtol=0, atol=0)


def test_state_dict_round_trips_with_nn_multihead_attention():
    module, peer = _pair(3, 12, True)
    names = set(module.state_dict())
    assert names == set(peer.state_dict()) | {"query"}
    fresh = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, kdim=12, vdim=12, batch_first=True)
    state = {k: v for k, v in module.state_dict().items() if k != "query"}
    fresh.double().load_state_dict(state, strict=True)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, peer.state_dict()[name]), name


def test_gradcheck():
    module, _ = _pair(2, 12, True)
    x, mask = _batch(12)
    x = x[:, :4].clone().requires_grad_()
    params = tuple(module.parameters())

    def run(x, *values):
        named = dict(zip((n for n, _ in module.named_parameters()), values, strict=True))
        return torch.func.functional_call(module, named, (x, mask[:, :4]))

    assert torch.autograd.gradcheck(run, (x, *params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduced_precision_input_with_float32_parameters(dtype):
    module, _ = _pair(2, None, True, dtype=torch.float32)
    x, mask = _batch(None, dtype=dtype)
    out = module(x, mask)
    assert out.dtype == dtype
    want = module.double()(x.double(), mask)
    torch.testing.assert_close(out.double(), want, **TOLERANCES[dtype])


def test_constructor_and_forward_errors_name_the_argument():
    build = attnpool.MultiheadAttentionPooling
    with pytest.raises(TypeError, match="num_heads must be an int"):
        build(16, 2.0)
    with pytest.raises(TypeError, match="kdim must be an int"):
        build(16, 2, kdim="8")
    with pytest.raises(TypeError, match="bias must be a bool"):
        build(16, 2, bias=None)
    with pytest.raises(ValueError, match="num_heads must be >= 1 and divide embed_dim = 16"):
        build(16, 3)
    with pytest.raises(ValueError, match="num_queries must be >= 1"):
        build(16, 2, 0)
    with pytest.raises(ValueError, match="kdim must be >= 1"):
        build(16, 2, kdim=0)
    module = build(16, 2, kdim=8)
    with pytest.raises(ValueError, match=r"x must have shape \[B, L, 8\]"):
        module(torch.randn(2, 3, 16))
    with pytest.raises(TypeError, match="mask must be bool"):
        module(torch.randn(2, 3, 8), torch.zeros(2, 3))


@pytest.mark.parametrize("num_queries", [1, 8], ids=["fold", "projection"])
def test_key_norm_equals_the_layer_norm_before_the_head(num_queries):
    """pool_with_projections(key_norm=ln) (open_clip's ln_k) computes what the
    head computes on ln(x), on both paths, gradients of ln's parameters
    included; on the fold's path the norm runs in the pooling pass."""
    module, peer = _pair(num_queries, None, True)
    x, mask = _batch(None)
    attending = [b for b in range(BATCH) if b != EMPTY_ROW]
    norm = nn.LayerNorm(EMBED_DIM).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(EMBED_DIM))
        norm.bias.copy_(torch.randn(EMBED_DIM))
    x_fused = x.clone().requires_grad_()
    with RecordedOps() as recorded:
        got = attnpool.modules.pool_with_projections(
            peer, x_fused, module.query, mask, key_norm=norm
        )[attending]
    fused = "attnpool._layer_norm_folded_attention_pool_forward" in recorded.names
    assert fused == (num_queries == 1)
    assert ("aten.native_layer_norm" in recorded.names) == (num_queries == 8)
    fused_grads = torch.autograd.grad(got.sum(), (x_fused, norm.weight, norm.bias))
    x_peer = x.clone().requires_grad_()
    keys = norm(x_peer[attending])
    queries = module.query.expand(len(attending), -1, -1)
    want = peer(queries, keys, keys, key_padding_mask=~mask[attending], need_weights=False)[0]
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])
    peer_grads = torch.autograd.grad(want.sum(), (x_peer, norm.weight, norm.bias))
    torch.testing.assert_close(fused_grads[0][attending], peer_grads[0][attending])
    assert fused_grads[0][EMPTY_ROW].eq(0).all()
    for name, g, w in zip(("weight", "bias"), fused_grads[1:], peer_grads[1:], strict=True):
        torch.testing.assert_close(g, w, msg=name)
