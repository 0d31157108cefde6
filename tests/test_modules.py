"""attnpool.AttentionPooling and attnpool.WeightedPooling as nn.Modules."""

import pytest
import torch
from helpers import DEVICES, TOLERANCES

import attnpool


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_queries", [1, 3])
def test_attention_pooling_shapes_and_values(device, num_queries):
    pool = attnpool.AttentionPooling(
        16, num_heads=4, num_queries=num_queries, device=device, dtype=torch.float64
    )
    x = torch.randn(5, 9, 16, dtype=torch.float64, device=device)
    mask = torch.rand(5, 9, device=device) > 0.3
    out = pool(x, mask)
    assert out.shape == ((5, 16) if num_queries == 1 else (5, num_queries, 16))
    query = pool.query[0] if num_queries == 1 else pool.query
    want = attnpool.reference.attention_pool(
        x, query, pool.q_proj.weight, pool.k_proj.weight, mask, 4
    )
    torch.testing.assert_close(out, want, **TOLERANCES[torch.float64])


def test_parameter_names_shapes_and_factory_kwargs():
    pool = attnpool.AttentionPooling(12, num_heads=3, num_queries=2, dtype=torch.float64)
    shapes = {name: tuple(t.shape) for name, t in pool.state_dict().items()}
    assert shapes == {"query": (2, 12), "q_proj.weight": (12, 12), "k_proj.weight": (12, 12)}
    assert all(p.dtype == torch.float64 for p in pool.parameters())
    assert (
        repr(pool)
        == "AttentionPooling(\n  embed_dim=12, num_heads=3, num_queries=2\n  (q_proj): Linear(in_features=12, out_features=12, bias=False)\n  (k_proj): Linear(in_features=12, out_features=12, bias=False)\n)"
    )
    assert "scale=0.5" in repr(attnpool.AttentionPooling(4, scale=0.5))


def test_init_gives_unit_norm_queries_and_reset_parameters_redraws():
    torch.manual_seed(0)
    pool = attnpool.AttentionPooling(256, num_queries=64)
    norms = pool.query.detach().norm(dim=1)
    assert 0.9 < norms.mean().item() < 1.1
    before = pool.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    pool.reset_parameters()
    for name, value in pool.state_dict().items():
        assert not torch.equal(value, before[name]), name


def test_untrained_pooling_is_close_to_mean_pooling():
    torch.manual_seed(0)
    pool = attnpool.AttentionPooling(64, num_heads=4)
    x = torch.randn(8, 32, 64)
    out = pool(x)
    mean = x.mean(dim=1)
    assert (out - mean).norm() / mean.norm() < 0.35


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_reach_every_parameter(device):
    pool = attnpool.AttentionPooling(8, num_heads=2, num_queries=2, device=device)
    x = torch.randn(3, 6, 8, device=device, requires_grad=True)
    pool(x).square().sum().backward()
    for name, param in [("x", x), *pool.named_parameters()]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_mixed_precision_input_keeps_float32_parameters():
    pool = attnpool.AttentionPooling(16, num_heads=2)
    x = torch.randn(4, 10, 16).bfloat16().requires_grad_(True)
    out = pool(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert all(
        p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in pool.parameters()
    )


def test_optimizer_steps_reduce_the_loss():
    torch.manual_seed(0)
    pool = attnpool.AttentionPooling(8, num_heads=2)
    x = torch.randn(64, 10, 8)
    marker = torch.zeros(64, 10, 8)
    marker[:, 3, 0] = 4.0
    x = x + marker
    target = x[:, 3]  # the marked position: reachable only by attending to it
    optimizer = torch.optim.Adam(pool.parameters(), lr=0.05)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = (pool(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_state_dict_round_trip():
    a = attnpool.AttentionPooling(8, num_heads=2, num_queries=2)
    b = attnpool.AttentionPooling(8, num_heads=2, num_queries=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_weighted_pooling_normalises_over_unmasked_positions(device):
    pool = attnpool.WeightedPooling(10, device=device, dtype=torch.float64)
    with torch.no_grad():
        pool.weight.copy_(torch.linspace(-1, 1, 10, dtype=torch.float64))
    x = torch.randn(3, 6, 4, dtype=torch.float64, device=device)  # shorter than max_len
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0] * 6, [1] * 6], device=device)
    out = pool(x, mask)
    for b in (0, 2):
        keep = mask[b].bool()
        weights = torch.softmax(pool.weight[:6][keep], dim=0)
        torch.testing.assert_close(out[b], weights @ x[b][keep])
    assert torch.equal(out[1], torch.zeros(4, dtype=torch.float64, device=device))


def test_weighted_pooling_starts_as_mean_and_trains():
    pool = attnpool.WeightedPooling(7)
    x = torch.randn(4, 7, 3)
    torch.testing.assert_close(pool(x), x.mean(dim=1))
    pool(x).sum().backward()
    assert pool.weight.grad is not None and pool.weight.grad.shape == (7,)
    assert repr(pool) == "WeightedPooling(max_len=7)"


def test_nested_input_errors_name_the_module_and_the_layout():
    rows, offsets = torch.randn(7, 8), torch.tensor([0, 3, 7])
    jagged = torch.nested.nested_tensor_from_jagged(rows, offsets)
    strided = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(4, 8)])
    # AttentionPooling takes a jagged x (a ragged batch); other layouts are refused.
    assert attnpool.AttentionPooling(8)(jagged).shape == (2, 8)
    with pytest.raises(
        ValueError, match="attention_pool: a nested x must have layout=torch.jagged"
    ):
        attnpool.AttentionPooling(8)(strided)
    with pytest.raises(TypeError, match="MultiheadAttentionPooling: x must be a dense"):
        attnpool.MultiheadAttentionPooling(8, 2)(jagged)
    with pytest.raises(TypeError, match="WeightedPooling: x must be a dense"):
        attnpool.WeightedPooling(8)(jagged)
