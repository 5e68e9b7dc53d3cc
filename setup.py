"""Build of record for bigmodel: one extension, ``bigmodel._C``, from ``csrc/``.

Environment knobs (all optional):

``BIGMODEL_CUDA``      ``0`` forces a CPU-only build; ``1`` makes a missing CUDA toolkit an error.
                       Unset: CUDA sources are compiled when torch is a CUDA build and nvcc is found.
``TORCH_CUDA_ARCH_LIST`` CUDA archs to compile for (default ``8.0;9.0``). No GPU is needed to build.
``BIGMODEL_CPU_ARCH``  value for ``-march`` (default ``native``: the build machine's ISA). Use e.g.
                       ``x86-64-v3`` (AVX2) or ``x86-64-v2`` for a portable wheel.
``MAX_JOBS``           parallel compile jobs (ninja).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The CUDA toolkit root, or None. A `nvcc` on PATH may be a wrapper script, so prefer a root
    that really holds bin/nvcc and include/cuda_runtime.h."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
            os.path.join(root, "include", "cuda_runtime.h")
        ):
            return root
    return None


_cuda_env = os.environ.get("BIGMODEL_CUDA", "").strip()
CUDA_HOME = _find_cuda_home()
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = CUDA_HOME
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if _cuda_env == "0":
    WITH_CUDA = False
elif torch.version.cuda is None or CUDA_HOME is None:
    if _cuda_env == "1":
        sys.exit(
            "BIGMODEL_CUDA=1 but "
            + ("torch is a CPU-only build" if torch.version.cuda is None else "no CUDA toolkit (nvcc) was found")
            + "; set CUDA_HOME or use BIGMODEL_CUDA=0."
        )
    WITH_CUDA = False
else:
    WITH_CUDA = True

CPU_ARCH = os.environ.get("BIGMODEL_CPU_ARCH", "native")


def _compiler_macros(march):
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run(
            [cxx, f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull],
            check=True, capture_output=True, text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    return set(re.findall(r"#define (__\w+__) ", out))


def _cpu_capability(march):
    """ATen's at::vec picks its vector width from CPU_CAPABILITY_* macros, not from -march, so
    mirror what the chosen ISA offers."""
    m = _compiler_macros(march)
    if {"__AVX512F__", "__AVX512BW__", "__AVX512VL__", "__AVX512DQ__"} <= m:
        return "AVX512"
    if {"__AVX2__", "__FMA__"} <= m:
        return "AVX2"
    return "DEFAULT"


CPU_CAPABILITY = _cpu_capability(CPU_ARCH)


def _pip_cuda_includes():
    """pip's nvidia-* wheels carry headers (cublas, cusparse, ...) the toolkit may lack."""
    dirs = []
    for p in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            d = os.path.join(p, sub)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
        dirs += [d for d in glob.glob(os.path.join(p, "nvidia", "*", "include")) if d not in dirs]
    if CUDA_HOME and os.path.isfile(os.path.join(CUDA_HOME, "include", "cublas_v2.h")):
        return []
    return dirs


def _cuda_archs():
    archs = []
    for a in re.split(r"[;\s]+", os.environ["TORCH_CUDA_ARCH_LIST"].strip()):
        if a:
            archs.append(a.replace("+PTX", "").replace(".", ""))
    return archs


def extension():
    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cpp_sources = [s for s in cpp_sources if not s.startswith("csrc/tests/")]
    cu_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    cap_macro = [] if CPU_CAPABILITY == "DEFAULT" else [f"-DCPU_CAPABILITY_{CPU_CAPABILITY}"]
    build_info = [
        f'-DBIGMODEL_CPU_ARCH="{CPU_ARCH}"',
        f'-DBIGMODEL_CPU_CAPABILITY="{CPU_CAPABILITY}"',
    ]
    cxx = ["-O3", "-std=c++20", f"-march={CPU_ARCH}", "-fopenmp"]
    cxx += cap_macro + build_info
    kwargs = dict(
        name="bigmodel._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if WITH_CUDA:
        archs = _cuda_archs()
        cxx.append("-DBIGMODEL_WITH_CUDA")
        cxx.append(f'-DBIGMODEL_CUDA_ARCHS="{";".join("sm_" + a for a in archs)}"')
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-DBIGMODEL_WITH_CUDA"]
        kwargs["include_dirs"] += _pip_cuda_includes()
        return CUDAExtension(
            sources=cpp_sources + cu_sources,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **kwargs,
        )
    return CppExtension(sources=cpp_sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    packages=find_packages(include=["bigmodel", "bigmodel.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
