"""torch.export: the operator stays one node, runs with dynamic shapes, and
the program round-trips through torch.export.save / torch.export.load."""

import pytest
import torch
from helpers import DEVICES, TOLERANCES, PoolingModel, make_batch

import attnpool  # noqa: F401 (registers torch.ops.attnpool)

TOL = TOLERANCES[torch.float32]
OP = torch.ops.attnpool.attention_pool.default


def _model(device):
    torch.manual_seed(0)
    return PoolingModel(16, num_heads=4, num_queries=2).to(device)


def _export(model, device):
    batch, seq_len = torch.export.Dim("batch"), torch.export.Dim("seq_len")
    shapes = {"x": {0: batch, 1: seq_len}, "mask": {0: batch, 1: seq_len}}
    example = make_batch(3, 7, 16, device=device, empty_row=-1)
    return torch.export.export(model, example, dynamic_shapes=shapes)


def _calls(program, target):
    return [n for n in program.graph.nodes if n.op == "call_function" and n.target is target]


def _other_attnpool_ops(program):
    return [
        str(n.target)
        for n in program.graph.nodes
        if n.op == "call_function" and str(n.target).startswith("attnpool.") and n.target is not OP
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_exported_program_keeps_the_op_as_one_node(device):
    program = _export(_model(device), device)
    (node,) = _calls(program, OP)
    assert node.args[5] == 4  # num_heads travels as an argument of the node
    assert _other_attnpool_ops(program) == []


@pytest.mark.parametrize("device", DEVICES)
def test_inference_decomposition_keeps_the_op_as_one_node(device):
    # run_decompositions() gives the inference IR that AOTInductor and other
    # lowerings consume. A custom op is kept there, not replaced by the
    # internal forward that only its autograd formula needs.
    model = _model(device)
    program = _export(model, device).run_decompositions()
    assert _other_attnpool_ops(program) == [], program.graph_module.code
    assert len(_calls(program, OP)) == 1, program.graph_module.code
    x, mask = make_batch(4, 9, 16, device=device, seed=5, empty_row=-1)
    torch.testing.assert_close(program.module()(x, mask), model(x, mask), **TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_exported_program_runs_at_other_shapes(device):
    model = _model(device)
    exported = _export(model, device).module()
    for seed, (batch, seq_len) in enumerate([(3, 7), (5, 2), (2, 40), (6, 11)]):
        x, mask = make_batch(batch, seq_len, 16, device=device, seed=seed, empty_row=-1)
        got = exported(x, mask)
        assert got.shape == (batch, 2, 16)
        torch.testing.assert_close(
            got, model(x, mask), **TOL, msg=lambda m, b=batch, n=seq_len: f"B={b}, L={n}: {m}"
        )


@pytest.mark.parametrize("device", DEVICES)
def test_save_load_round_trip(device, tmp_path):
    model = _model(device)
    path = tmp_path / "model.pt2"
    torch.export.save(_export(model, device), path)
    loaded = torch.export.load(path)
    assert len(_calls(loaded, OP)) == 1
    x, mask = make_batch(4, 13, 16, device=device, seed=3, empty_row=-1)
    torch.testing.assert_close(loaded.module()(x, mask), model(x, mask), **TOL)
