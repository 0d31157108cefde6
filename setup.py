"""Builds the attnpool Python package and its native library attnpool._C.

Build against the torch that is already installed, without build isolation
(an isolated build would download another, multi-GB torch):

    pip install torch==2.13.0
    pip install --no-build-isolation .        # or -e . for development

ATTNPOOL_WITH_CUDA=1 forces the CUDA kernels on, =0 off; by default they are
built when the installed torch has CUDA and nvcc is found. ATTNPOOL_DEBUG_INFO=1
builds with debug information (-g). ATTNPOOL_OPTIMIZE=0 compiles the C++ at -O0,
for builds whose speed does not matter (the CUDA compile check). CMakeLists.txt
builds the same sources, by the same rules, for LibTorch users.
"""

import glob
import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit(
        "attnpool builds against an installed torch: run `pip install torch` first, then "
        "`pip install --no-build-isolation .`"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"

# Each file csrc/ops/cpu/isa/*_<isa>.cpp is compiled with these flags (and
# only these files are); the best set the CPU supports is chosen at run time.
ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}
ISA_FLAGS["avx512_bf16"] = ISA_FLAGS["avx512"] + ["-mavx512bf16"]
ISA_FLAGS["amx_bf16"] = ISA_FLAGS["avx512_bf16"] + ["-mamx-tile", "-mamx-bf16"]


# Every kernel file also gets -ffp-contract=off: scalar steps such as
# scale * score - lse must round the same in the forward and the backward
# (csrc/ops/cpu/isa/vec_helpers.h, [Note: one order for every score]); the
# vector code writes its fused multiply-adds out.
KERNEL_FLAGS = ["-ffp-contract=off"]


def target_isas():
    """The CPU instruction sets whose kernels are built: all of them on x86-64,
    or those listed in ATTNPOOL_CPU_ISAS (comma-separated; "default" is always
    built), for a quicker build where the CPU kernels do not matter."""
    is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    isas = list(ISA_FLAGS) if is_x86 else ["default"]
    wanted = os.environ.get("ATTNPOOL_CPU_ISAS")
    if wanted is None:
        return isas
    names = {name.strip().lower() for name in wanted.split(",") if name.strip()}
    unknown = names - set(ISA_FLAGS)
    if unknown:
        raise ValueError(f"ATTNPOOL_CPU_ISAS: unknown {sorted(unknown)}; known: {list(ISA_FLAGS)}")
    return [isa for isa in isas if isa == "default" or isa in names]


def relative_glob(pattern):
    return sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
    )


# Headers of torch that most files include: parsing them took about 15 of
# the 20 s of each common file on a 2-core EPYC. With GCC they are compiled
# once into a precompiled header that the common files include first
# (CMakeLists.txt precompiles the same ones).
PRECOMPILED_HEADERS = [
    "ATen/ATen.h",
    "torch/autograd.h",
    "torch/library.h",
    "torch/nn/module.h",
    "torch/nn/modules/linear.h",
]


def compiler_is_gcc():
    """Whether the C++ compiler torch's build calls is GCC, whose .gch files
    the precompiled header is; any other compiler parses the headers as usual."""
    try:
        banner = subprocess.run(
            [os.environ.get("CXX", "c++"), "--version"], capture_output=True, text=True
        ).stdout
    except OSError:
        return False
    return "Free Software Foundation" in banner and "clang" not in banner


def isa_sources(isa):
    return relative_glob(f"csrc/ops/cpu/isa/*_{isa}.cpp")


def common_sources():
    """Sources compiled once, as in CMakeLists.txt (plus the Python bindings)."""
    ops = [s for s in relative_glob("csrc/ops/**/*.cpp") if "/isa/" not in s]
    return ops + relative_glob("csrc/modules/*.cpp") + relative_glob("csrc/python/*.cpp")


def switched_on(value):
    """Whether an ATTNPOOL_* switch's value turns it on."""
    return value not in ("0", "", "false", "OFF")


def want_cuda():
    forced = os.environ.get("ATTNPOOL_WITH_CUDA")
    if forced is not None:
        return switched_on(forced)
    return torch.version.cuda is not None and CUDA_HOME is not None


def make_extension():
    with_cuda = want_cuda()
    # -O0 compiles the kernel files 4-9 times faster (kernels_avx2.cpp: 43 s
    # against 162 s in one cmake build on a 2-core EPYC), for kernels as slow.
    optimize = "-O3" if switched_on(os.environ.get("ATTNPOOL_OPTIMIZE", "1")) else "-O0"
    cxx_flags = [optimize, "-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
    # Python's own build flags add -g: debug information for torch's headers
    # in every file took a third of the build on a 2-core EPYC and made the
    # library 120 MB instead of 9. ATTNPOOL_DEBUG_INFO=1 keeps it.
    if not switched_on(os.environ.get("ATTNPOOL_DEBUG_INFO", "0")):
        cxx_flags.append("-g0")
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    macros = []
    sources = common_sources()
    if with_cuda:
        sources += relative_glob("csrc/ops/cuda/*.cu")
        macros.append(("ATTNPOOL_WITH_CUDA", None))
        for arch in os.environ.get("ATTNPOOL_CUDA_ARCHS", "80;90").split(";"):
            nvcc_flags += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    kind = CUDAExtension if with_cuda else CppExtension
    return kind(
        name="attnpool._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )


class BuildExtensionWithIsaKernels(BuildExtension):
    """Compiles the per-instruction-set kernel files, each with its own flags.

    Their objects are linked after the common ones, so that the linker keeps
    the baseline copy of any inline function they share.
    """

    def build_extension(self, ext):
        base_flags = ext.extra_compile_args["cxx"]

        def compile_isa(isa):
            # A folder per instruction set: each compile call writes its own
            # build.ninja and ninja dependency log there. In one shared folder
            # each call's ninja dropped the others' header dependencies, and
            # an incremental build then kept an instruction set's stale
            # objects after a header changed (a crash at run time).
            return self.compiler.compile(
                isa_sources(isa),
                output_dir=os.path.join(self.build_temp, "isa", isa),
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": base_flags + KERNEL_FLAGS + ISA_FLAGS[isa], "nvcc": []},
                depends=ext.depends,
            )

        def precompile_headers():
            # GCC takes a .cpp as a header with -x c++-header, and uses
            # attnpool_pch.h.gch in place of attnpool_pch.h where the flags
            # match (-Winvalid-pch says so where they do not).
            folder = os.path.join(os.path.abspath(self.build_temp), "pch")
            source = os.path.join(folder, "attnpool_pch.cpp")
            text = "".join(f"#include <{name}>\n" for name in PRECOMPILED_HEADERS)
            write_if_changed(source, text)  # else ninja would make it again
            [compiled] = self.compiler.compile(
                [source],
                output_dir=folder,
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                extra_preargs=["-x", "c++-header"],
                # A copy: torch's compile adds -std to the list it is given,
                # which the instruction sets' calls read meanwhile.
                extra_postargs={"cxx": list(base_flags), "nvcc": []},
                depends=ext.depends,
            )
            # The files that include it do not list its headers as their
            # dependencies: each version of it gets its own folder, so that
            # when ninja makes it again (torch's headers changed), their
            # command lines change and ninja compiles them again too.
            version = os.path.join(folder, str(os.stat(compiled).st_mtime_ns))
            header = os.path.join(version, "attnpool_pch.h")
            if not os.path.exists(header + ".gch"):
                for old in glob.glob(os.path.join(folder, "[0-9]*")):
                    shutil.rmtree(old)
                os.makedirs(version)
                shutil.copyfile(compiled, header + ".gch")
                write_if_changed(header, text)
            return ["-include", header, "-Winvalid-pch"]

        # The instruction sets compile side by side, and beside the
        # precompiled header: each is one large file, and one after another
        # they made most of a 7.5-minute build on a 16-core GPU machine.
        isas = target_isas()
        with ThreadPoolExecutor(max_workers=len(isas) + 1) as pool:
            headers = pool.submit(precompile_headers) if compiler_is_gcc() else None
            objects = [obj for objs in pool.map(compile_isa, isas) for obj in objs]
            header_flags = precompiled_or_none(headers)
        ext.extra_objects = objects + list(ext.extra_objects or [])
        ext.extra_compile_args["cxx"] = base_flags + header_flags
        super().build_extension(ext)
        check_error_messages(self.get_ext_fullpath(ext.name))


def write_if_changed(path, text):
    """Writes text to path unless it holds it already (its time then stays)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path, "w") as f:
        f.write(text)


def precompiled_or_none(headers):
    """The flags that include the precompiled header, or none where it was not
    made: the build then parses the headers in every file, as without it."""
    if headers is None:
        return []
    try:
        return headers.result()
    except Exception as error:  # any failure only costs time
        print(f"warning: no precompiled header ({error}); compiling without one")
        return []


# Loads the built library in a fresh interpreter: exits 3 if it carries its
# own copy of libstdc++ (std::locale::classic found in it first, not in the
# libstdc++ that libc10 uses), then has one op raise an error.
CHECK_LIBRARY = """
import ctypes, importlib.util, os, sys, torch
spec = importlib.util.spec_from_file_location("attnpool._C", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
c10 = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
ours = ctypes.CDLL(sys.argv[1])
symbol = "_ZNSt6locale7classicEv"
if ctypes.cast(getattr(ours, symbol), ctypes.c_void_p).value != ctypes.cast(
    getattr(c10, symbol), ctypes.c_void_p
).value:
    sys.exit(3)
try:
    torch.ops.attnpool.fold_query(torch.zeros(3), torch.zeros(5, 5), torch.zeros(5, 5), 0)
except (ValueError, RuntimeError):
    pass
"""


def check_error_messages(library):
    """Fails the build if the library carries its own copy of libstdc++.

    torch uses the shared libstdc++; a library with a second, static copy (a
    compiler that links it statically, as a GPU machine's CXX wrapper did)
    formats error messages with two copies of the C++ locale, and there it
    crashed on the first one: every bad input killed the process instead of
    raising. Also fails if the library crashes when an op raises.
    """
    run = subprocess.run(
        [sys.executable, "-c", CHECK_LIBRARY, library], capture_output=True, text=True
    )
    if run.returncode == 3 or run.returncode < 0:
        what = (
            "links its own copy of libstdc++"
            if run.returncode == 3
            else (f"crashes (signal {-run.returncode}) when an op raises an error")
        )
        raise RuntimeError(
            f"{library} {what}. torch needs libstdc++ as one shared library (readelf -d "
            "should list libstdc++.so.6): build with a compiler that links it so, e.g. "
            f"CXX=/usr/bin/g++ (CXX is {os.environ.get('CXX', 'unset')})."
        )
    if run.returncode != 0:
        print(f"warning: could not load {library} to check it:\n{run.stderr}")


setup(
    name="attnpool",
    version=VERSION,
    description="Attention pooling as a fused PyTorch operator (CPU and CUDA)",
    package_dir={"": "torch_ext"},
    packages=["attnpool"],
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtensionWithIsaKernels},
    install_requires=[f"torch=={torch.__version__.split('+')[0]}"],
    python_requires=">=3.10",
    zip_safe=False,
)
