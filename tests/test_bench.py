"""Smoke run of the benchmark (python -m attnpool.bench --quick): every method
runs, agrees with the op, and the table, JSON and plot are written. Speed is
measured by the benchmark itself, not by tests."""

import json

import pytest
import torch
from helpers import CUDA_SKIP_REASON

import attnpool
from attnpool import bench


def test_quick_benchmark_writes_table_json_and_plot(tmp_path, capsys):
    assert (
        bench.main(
            [
                "--quick",
                "--threads",
                "1",
                "--dtypes",
                "float32",
                "--rounds",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "CPU kernels: " + attnpool._C.cpu_kernel_isa() in printed
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {r["mode"] for r in report["results"]} == {"forward", "forward+backward"}
    for row in report["results"]:
        assert {"attnpool", "eager-folded", "notebook", "compiled", "mha", "sdpa"} <= set(
            row["seconds"]
        )
        assert all(seconds > 0 for seconds in row["seconds"].values())
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_benchmarked_compositions_compute_the_op():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 16, generator=gen)
    query = torch.randn(2, 16, generator=gen)
    w_q, w_k = torch.randn(2, 16, 16, generator=gen) / 4
    mask = torch.rand(3, 11, generator=gen) > 0.2
    want = attnpool.attention_pool(x, query, w_q, w_k, mask, num_heads=4)
    for fn in (bench.folded_attention_pool, bench.sdpa_attention_pool):
        torch.testing.assert_close(
            fn(x, query, w_q, w_k, mask, num_heads=4), want, atol=1e-5, rtol=1e-4
        )


@pytest.mark.skipif(CUDA_SKIP_REASON is None, reason="this machine can run the GPU benchmark")
def test_cuda_benchmark_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        bench.main(["--device", "cuda", "--quick", "--out", str(tmp_path)])
    assert raised.value.code == 2
    assert "--device cuda needs a GPU" in capsys.readouterr().err


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))
def test_quick_cuda_benchmark_runs_every_method_on_the_gpu(tmp_path):
    args = ["--device", "cuda", "--quick", "--dtypes", "float32", "--rounds", "1"]
    assert bench.main([*args, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["device"] == "cuda" and report["targets"] == []
    for row in report["results"]:
        assert row["device"] == "cuda"
        assert all(seconds > 0 for seconds in row["seconds"].values())
