"""Smoke run of the benchmark (python -m attnpool.bench --quick): every method
runs, agrees with the op, and the table, JSON and plot are written. Speed is
measured by the benchmark itself, not by tests."""

import importlib.util
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CUDA_SKIP_REASON

import attnpool
from attnpool import bench, bench_gpu, bench_grid

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_quick_benchmark_writes_table_json_and_plot(tmp_path, capsys):
    assert (
        bench.main(
            [
                "--quick",
                "--threads",
                "1",
                "--dtypes",
                "float32,bfloat16",
                "--rounds",
                "1",
                "--malloc",
                "system",  # this test's process keeps its malloc as it was
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "CPU kernels: " + attnpool._C.cpu_kernel_isa() in printed
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["malloc"].startswith("system")
    assert {r["mode"] for r in report["results"]} == {"forward", "forward+backward"}
    for row in report["results"]:
        assert {"attnpool", "eager-folded", "notebook", "compiled", "mha", "sdpa"} <= set(
            row["seconds"]
        )
        # bfloat16 cases also time the op on float32 x, interleaved with the rest.
        assert ("float32" in row["seconds"]) == (row["dtype"] == "bfloat16")
        assert all(seconds > 0 for seconds in row["seconds"].values())
    assert (tmp_path / "bench.png").stat().st_size > 10_000


RSS_AFTER_FREE = """
import torch
from attnpool import bench
print(bench.configure_malloc({mode!r}))
def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written
before_free = resident_mib()
del block
print(before_free - resident_mib())
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)
@pytest.mark.parametrize("mode", ["reuse", "system"])
def test_malloc_reuse_keeps_freed_blocks(mode):
    # With glibc's defaults a freed 64 MiB tensor is unmapped at once (and
    # the next one faults its pages in anew); with --malloc reuse it stays.
    run = subprocess.run(
        [sys.executable, "-c", RSS_AFTER_FREE.format(mode=mode)],
        capture_output=True,
        text=True,
        check=True,
    )
    description, released = run.stdout.split("\n")[:2]
    assert description.startswith(mode)
    if mode == "reuse":
        assert float(released) < 8, "the freed block left the process"
    else:
        assert float(released) > 56, "the freed block stayed mapped"


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


def test_quick_grid_reports_each_point_against_its_roofline(tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["--quick", "--rounds", "1", "--dtypes", "float32", "--malloc", "system"]
    assert bench_grid.main(argv + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "G multiply-adds/s" in printed and "targets:" in printed
    report = json.loads((out / "grid.json").read_text())
    assert [r["point"] for r in report["results"]] == list(bench_grid.QUICK_POINTS)
    for row in report["results"]:
        for mode in ("forward", "forward+backward"):
            assert {"attnpool", "eager", "read"} <= set(row[mode])
            assert all(seconds > 0 for seconds in row[mode].values())
        # The roofline is one read of x or the multiply-adds at the matmul rate.
        floor = max(row["forward"]["read"], row["multiply_adds"] / row["matmul_rate"])
        assert row["roofline"] == pytest.approx(floor)
    assert {t["target"].split(":")[0] for t in report["targets"]} == {
        f"{name} float32" for name in bench_grid.QUICK_POINTS
    }


def test_grid_rejects_an_unknown_point(capsys):
    with pytest.raises(SystemExit):
        bench_grid.main(["--points", "1x1,7x7"])
    assert "unknown --points ['7x7']" in capsys.readouterr().err


@pytest.mark.parametrize("full_width", [False, True])
def test_grid_compositions_compute_the_op(full_width):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 16, generator=gen, dtype=torch.float64)
    queries = torch.randn(2, 4, 4, generator=gen, dtype=torch.float64)
    w_k = torch.randn(16, 16, generator=gen, dtype=torch.float64) / 4
    u = torch.einsum("qnd,ndh->qnh", queries, w_k.view(4, 4, 16))
    want = attnpool.folded_attention_pool(x, u, scale=0.5, full_width=full_width)
    torch.testing.assert_close(bench_grid.eager_pool(x, u, 0.5, full_width), want)
    if not full_width:
        torch.testing.assert_close(bench_grid.projected_pool(x, queries, w_k, 0.5), want)


@pytest.mark.parametrize("name", ["1x12", "so400m-full"])
def test_score_spread_benchmark_spreads_scores_as_it_says(name):
    # benchmarks/score_spread.py times the op at scores of standard deviation
    # 1, 10 and 30: its u must give x's rows those scores, head by head.
    spec = importlib.util.spec_from_file_location("score_spread", BENCHMARKS / "score_spread.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    shape = script.SHAPES[name]
    hidden, queries, heads, full_width = shape[2:]
    columns = hidden if full_width else hidden // heads
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, hidden, generator=gen)
    for spread in script.SPREADS:
        u = script.spread_u(shape, spread, gen).detach()
        assert u.shape == (queries, heads, hidden)
        for h in range(heads):
            # The columns that head h scores (all of them at full width).
            first = 0 if full_width else h * columns
            scored = slice(first, first + columns)
            scores = x[:, scored] @ u[:, h, scored].T
            assert torch.allclose(scores.std(dim=0), torch.tensor(spread), rtol=0.1)


def test_quick_forward_mode_benchmark_times_each_shape():
    # (Its own process: it sets glibc's malloc to keep freed blocks.)
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "forward_mode.py"), "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line for line in run.stdout.splitlines() if "eager jvp" in line]
    assert len(rows) == 4, run.stdout  # two shapes, float32 and bfloat16
    assert all("the read of x and dx" in row for row in rows)


def test_quick_gpu_benchmark_reports_fractions_of_the_floor(tmp_path, capsys):
    # --device cpu: the GPU benchmark's own code, timed by the wall clock.
    argv = ["--device", "cpu", "--quick", "--rounds", "1", "--no-compile"]
    assert bench_gpu.main(argv + ["--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "timed with wall clock" in printed and "targets:" in printed
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["device"] == "cpu" and report["timing"].startswith("wall clock")
    assert [(r["point"], r["dtype"]) for r in report["results"]] == [
        (name, dtype) for dtype in ("float32", "bfloat16") for name in bench_gpu.QUICK_POINTS
    ]
    for row in report["results"]:
        forward, both = row["forward"], row["forward+backward"]
        assert {"attnpool", "eager", "read", "copy"} <= set(forward)
        assert {"attnpool", "eager"} <= set(both) and "compiled" not in both
        assert row["forward_floor"] == pytest.approx(forward["read"] / forward["attnpool"])
        floor = (forward["read"] + forward["copy"]) / both["attnpool"]
        assert row["backward_floor"] == pytest.approx(floor)
        assert row["gbps"] == pytest.approx(row["bytes"] / forward["attnpool"] / 1e9)
    # Never slower than the compositions: one target per point, dtype and pass.
    assert len(report["targets"]) == 2 * len(report["results"])
    assert (tmp_path / "gpu.png").stat().st_size > 10_000


def test_gpu_benchmark_compiles_eager_and_checks_floor_targets():
    point = bench_gpu.QUICK_POINTS["small-fold"]
    results = bench_gpu.measure({point.name: point}, [torch.float32], 1, True, "cpu", print)
    (row,) = results
    assert {"attnpool", "eager", "compiled", "sdpa"} <= set(row["forward+backward"])
    # A point with floor targets gets them, besides the speed-ups.
    row = dict(row, point="big-1x1", forward_floor=0.9, backward_floor=0.5)
    checks = {c[0]: c[4] for c in bench_gpu.check_targets([row])}
    assert checks["big-1x1 float32: forward, fraction of read"]
    assert not checks["big-1x1 float32: fwd+bwd, fraction of read+copy"]


def test_gpu_benchmark_rejects_an_unknown_point(capsys):
    with pytest.raises(SystemExit):
        bench_gpu.main(["--device", "cpu", "--points", "big-1x1,huge"])
    assert "unknown --points ['huge']" in capsys.readouterr().err


@pytest.mark.skipif(CUDA_SKIP_REASON is None, reason="this machine can run the GPU benchmark")
def test_gpu_benchmark_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        bench_gpu.main(["--quick", "--out", str(tmp_path)])
    assert raised.value.code == 2
    assert "--device cuda needs a GPU" in capsys.readouterr().err


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))
def test_quick_gpu_benchmark_times_with_cuda_events(tmp_path):
    argv = ["--quick", "--dtypes", "float32", "--rounds", "2", "--no-compile"]
    assert bench_gpu.main(argv + ["--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["device"] == "cuda" and report["timing"].startswith("CUDA events")
    for row in report["results"]:
        assert all(seconds > 0 for seconds in row["forward"].values())


@pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("g++") is None,
    reason="benchmarks/one_score_loops.cpp is x86-64 code for g++",
)
def test_one_score_loops_probe_compiles():
    # The CPU loop probe is built by hand (see its header); compiling it here
    # keeps it building as the code around it changes.
    result = subprocess.run(
        [
            "g++",
            "-march=x86-64-v4",
            "-fopenmp",
            "-fsyntax-only",
            str(BENCHMARKS / "one_score_loops.cpp"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
