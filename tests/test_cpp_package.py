"""The C++ side end to end: the installed CMake package, C++ inference of the demo model.

Once per session: build libattnpool with CMake and install it into a temporary prefix;
meanwhile train the demo model briefly and export it (``python -m attnpool.export``);
then configure and build, outside the repository and against the installed package only,
``examples/cpp`` and ``tests/cpp_consumer``. The tests run those programs and compare
their outputs with Python's.

The library is built in ``build/cpp-package`` (``ATTNPOOL_CMAKE_BUILD_DIR`` picks another
tree) without optimisation and with only the CPU level this machine runs: these tests
check the package and agreement with Python, not speed, and that build takes a fifth of
the time of an optimised one with every level (on 2 cores, about 1.5 against 7 minutes).
cmake, ninja and the binutils must be installed: a missing tool fails these tests.
"""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import attnpool

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "cpp"
CONSUMER = REPO / "tests" / "cpp_consumer"
TOLERANCE = 1e-5  # max |C++ - Python| in float32


def tool(name: str) -> str:
    # The venv's own bin directory (pip's ninja) counts even when not on PATH.
    path = shutil.which(
        name, path=os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent)])
    )
    if path is None:
        pytest.fail(f"{name} is needed for the C++ package tests and is not on PATH")
    return path


def run(args, **kwargs) -> subprocess.CompletedProcess:
    """Runs a command; on failure, fails the test with its output."""
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, args))} exited with {result.returncode}\n"
            f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"
        )
    return result


def install_package(prefix: Path) -> Path:
    build = Path(os.environ.get("ATTNPOOL_CMAKE_BUILD_DIR", REPO / "build" / "cpp-package"))
    configure = [tool("cmake"), "-S", REPO, "-B", build]
    if not (build / "CMakeCache.txt").exists():
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={tool('ninja')}"]
    level = attnpool._C.cpu_kernel_isa().lower()
    configure += [
        # -O0 and no debug information: the quickest build of the same package.
        "-DCMAKE_BUILD_TYPE=Debug",
        "-DCMAKE_CXX_FLAGS_DEBUG=-O0",
        f"-DATTNPOOL_CPU_ISAS={level}",
        "-DATTNPOOL_BUILD_TESTS=OFF",
    ]
    run([*configure, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"])
    run([tool("cmake"), "--build", build, "--target", "attnpool"])
    run([tool("cmake"), "--install", build, "--prefix", prefix])
    return prefix


def build_project(source: Path, prefix: Path, work: Path) -> Path:
    """Configures a copy of `source` outside the repository, with only `prefix` to search."""
    copy = work / source.name
    shutil.copytree(source, copy)
    build = work / f"{source.name}-build"
    configure = [tool("cmake"), "-S", copy, "-B", build, "-G", "Ninja"]
    configure += [f"-DCMAKE_MAKE_PROGRAM={tool('ninja')}", f"-DCMAKE_PREFIX_PATH={prefix}"]
    run(configure)
    run([tool("cmake"), "--build", build])
    return build


def export_demo_model(work: Path) -> Path:
    """A briefly trained demo model (still 100% accurate), exported as the README says."""
    demo = work / "demo"
    python = [sys.executable, "-m"]
    run([*python, "attnpool.demo", "--epochs", "3", "--train-size", "4000", "--out", demo])
    out = work / "export"
    run([*python, "attnpool.export", "--model", demo / "model.pt", "--out", out])
    return out


@dataclass
class CppBuild:
    prefix: Path  # the installed package
    export: Path  # model.pt2, pooling.pt, inputs.pt, expected.pt
    predict: Path  # examples/cpp
    consumer: Path  # tests/cpp_consumer


@pytest.fixture(scope="session")
def cpp(tmp_path_factory) -> CppBuild:
    work = tmp_path_factory.mktemp("cpp_package")
    with ThreadPoolExecutor(max_workers=2) as pool:
        # Exporting needs only Python; it overlaps the C++ builds.
        exported = pool.submit(export_demo_model, work)
        prefix = install_package(work / "prefix")
        example, consumer = [
            pool.submit(build_project, source, prefix, work) for source in (EXAMPLE, CONSUMER)
        ]
        return CppBuild(
            prefix,
            exported.result(),
            example.result() / "attnpool_predict",
            consumer.result() / "attnpool_consumer",
        )


def load(path: Path):
    return torch.load(path, weights_only=True)


def test_install_puts_library_headers_and_config_under_the_prefix(cpp):
    lib = cpp.prefix / "lib"
    assert (lib / "libattnpool.so.0").exists()
    assert (lib / "cmake" / "attnpool" / "attnpoolConfig.cmake").exists()
    assert (lib / "cmake" / "attnpool" / "attnpoolConfigVersion.cmake").exists()
    # attnpool/attnpool.h and every attnpool header it reaches are installed.
    include = cpp.prefix / "include"
    pending, seen = ["attnpool/attnpool.h"], set()
    while pending:
        header = pending.pop()
        assert (include / header).exists(), header
        seen.add(header)
        for line in (include / header).read_text().splitlines():
            if line.startswith("#include <attnpool/"):
                name = line.split("<")[1].split(">")[0]
                if name not in seen:
                    pending.append(name)
    assert {"attnpool/attention_pool.h", "attnpool/attention_pooling.h"} <= seen


def test_exported_demo_model_predicts_in_cpp_as_in_python(cpp, tmp_path):
    logits_file = tmp_path / "logits.pt"
    result = run([cpp.predict, cpp.export / "model.pt2", cpp.export / "inputs.pt", logits_file])
    expected = load(cpp.export / "expected.pt")
    logits = load(logits_file)
    assert logits.shape == expected["logits"].shape
    diff = (logits - expected["logits"]).abs().max().item()
    print(f"max |C++ - Python| of the AOTInductor model's logits: {diff:.3g}")
    assert diff <= TOLERANCE
    printed = [
        int(line.split("class ")[1].split()[0])
        for line in result.stdout.splitlines()
        if line.startswith("sequence ")
    ]
    assert printed == expected["predictions"].tolist()
    labels = load(cpp.export / "inputs.pt")["labels"]
    accuracy = (expected["predictions"] == labels).double().mean().item()
    assert f"accuracy {100 * accuracy:g}% on {len(labels)} sequences" in result.stdout


def test_example_loads_libattnpool_without_referencing_it(cpp):
    # attnpool_predict calls no attnpool function (the model calls the operator
    # through the dispatcher), so only the package's --no-as-needed keeps the
    # library, and with it the operator registrations, in the program.
    undefined = run([tool("nm"), "-D", "--undefined-only", "-C", cpp.predict]).stdout
    assert "attnpool" not in undefined
    dynamic = run([tool("readelf"), "-d", cpp.predict]).stdout
    assert "[libattnpool.so.0]" in dynamic


def run_consumer(cpp, pooling: Path, out: Path) -> subprocess.CompletedProcess:
    args = [cpp.consumer, pooling, cpp.export / "inputs.pt", 4, out]
    return subprocess.run([str(a) for a in args], capture_output=True, text=True)


def test_cpp_module_loads_python_weights_and_pools_as_python(cpp, tmp_path):
    result = run_consumer(cpp, cpp.export / "pooling.pt", tmp_path / "out.pt")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "parameter query [1, 64]",
        "parameter q_proj.weight [64, 64]",
        "parameter k_proj.weight [64, 64]",
    ]
    pooled, functional, *_ = load(tmp_path / "out.pt")
    expected = load(cpp.export / "expected.pt")["pooled"]
    diff = (pooled - expected).abs().max().item()
    print(f"max |C++ - Python| of AttentionPooling with the demo's weights: {diff:.3g}")
    assert diff <= TOLERANCE
    assert torch.equal(functional, pooled)


def test_cpp_module_init_draws_what_python_draws(cpp, tmp_path):
    result = run_consumer(cpp, cpp.export / "pooling.pt", tmp_path / "out.pt")
    assert result.returncode == 0, result.stderr
    _, _, *cpp_params = load(tmp_path / "out.pt")
    torch.manual_seed(0)
    python = attnpool.AttentionPooling(64, num_heads=4)
    for name, got in zip(["query", "q_proj.weight", "k_proj.weight"], cpp_params, strict=True):
        assert torch.equal(got, python.state_dict()[name]), name


@pytest.mark.parametrize("kdim", [32, 48], ids=["kdim=embed_dim", "kdim=48"])
def test_cpp_map_head_loads_python_weights_and_draws_python_init(cpp, tmp_path, kdim):
    exported = load(cpp.export / "inputs.pt")
    features, mask = exported["features"][..., :kdim].contiguous(), exported["mask"]
    torch.save({"features": features, "mask": mask}, tmp_path / "inputs.pt")
    torch.manual_seed(1)
    head = attnpool.MultiheadAttentionPooling(32, 4, 2, kdim=kdim)
    with torch.no_grad():
        head.in_proj_bias.normal_()
        head.out_proj.bias.normal_()
    torch.save(dict(head.state_dict()), tmp_path / "head.pt")
    program = cpp.consumer.parent / "map_head_consumer"
    args = [program, tmp_path / "head.pt", tmp_path / "inputs.pt", 32, 4, 2, tmp_path / "out.pt"]
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    pooled, *fresh = load(tmp_path / "out.pt")
    with torch.no_grad():
        torch.testing.assert_close(pooled, head(features, mask), rtol=0, atol=TOLERANCE)
    torch.manual_seed(0)
    python = attnpool.MultiheadAttentionPooling(32, 4, 2, kdim=kdim)
    names = [line.split()[1] for line in result.stdout.splitlines()]
    assert names == [name for name, _ in python.named_parameters()]
    for name, got in zip(names, fresh, strict=True):
        assert torch.equal(got, python.get_parameter(name)), name


def test_cpp_load_state_dict_explains_an_ordered_dict(cpp, tmp_path):
    # torch.save(module.state_dict()) pickles an OrderedDict, which C++ cannot read.
    pooling = tmp_path / "ordered.pt"
    torch.save(attnpool.AttentionPooling(64, num_heads=4).state_dict(), pooling)
    result = run_consumer(cpp, pooling, tmp_path / "out.pt")
    assert result.returncode == 1
    assert "load_state_dict: cannot read" in result.stderr
    assert "it must be written by torch.save(dict(module.state_dict()), path)" in result.stderr
