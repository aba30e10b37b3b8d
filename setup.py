"""Build of fastbald's native library (torch.utils.cpp_extension, ninja).

Extensions:
  fastbald._C         op schemas; the CUDA kernels when built with CUDA
  fastbald._cpu_avx512  CPU kernel compiled for AVX-512 (F/BW/VL/DQ; loaded on CPUs that have it)
  fastbald._cpu_avx2  CPU kernel compiled for AVX2+FMA (loaded on CPUs that have them)
  fastbald._cpu_base  the same CPU kernel for any x86-64 / other CPUs

Environment:
  FASTBALD_CPU_ONLY=1     never build the CUDA kernels
  FASTBALD_FORCE_CUDA=1   build them even with no GPU present (needs nvcc + a CUDA build of torch)
  FASTBALD_CUDA_ONLY=1    build only fastbald._C (with the CUDA kernels): the CUDA build check
  FASTBALD_PTXAS_VERBOSE=1  print ptxas' per-kernel resource usage (registers, spills, smem)
  TORCH_CUDA_ARCH_LIST    CUDA archs (default "8.0;9.0+PTX"); PTX of the last listed arch is always
                          embedded ("+PTX" added if missing) so newer GPUs JIT the kernels
  FASTBALD_DEBUG=1        -O0 -g
"""

from __future__ import annotations

import glob
import os
import platform

os.environ.setdefault("CUDA_HOME", "/usr/local/cuda") if os.path.isdir("/usr/local/cuda") else None
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
if "PTX" not in os.environ["TORCH_CUDA_ARCH_LIST"].upper():
    os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["TORCH_CUDA_ARCH_LIST"].rstrip("; ") + "+PTX"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
    include_paths,
)

HERE = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("FASTBALD_DEBUG") == "1"
OPT = ["-O0", "-g"] if DEBUG else ["-O3", "-g1" if os.environ.get("FASTBALD_LINE_INFO") == "1" else "-g0"]
WARN = ["-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
# torch's headers are system headers for us: warnings-as-errors apply to our sources only.
SYSTEM_INCLUDES = [f for d in include_paths() for f in ("-isystem", d)]
# -ffp-contract=fast: let a * b + c become one FMA (one rounding instead of two).
CXX = ["-std=c++20", "-fopenmp", "-fvisibility=hidden", "-ffp-contract=fast", *OPT, *WARN, *SYSTEM_INCLUDES]
LINK = ["-fopenmp"]
# CPU kernels compiled into fastbald._C itself (they dispatch on the CPU at run time): BatchBALD.
OPS_CPU_SOURCES = ["csrc/cpu/batchbald_cpu.cpp"]


def want_cuda() -> bool:
    if os.environ.get("FASTBALD_CPU_ONLY") == "1":
        return False
    has_nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if os.environ.get("FASTBALD_FORCE_CUDA") == "1":
        if not has_nvcc or torch.version.cuda is None:
            raise RuntimeError(
                "FASTBALD_FORCE_CUDA=1 but nvcc or a CUDA build of torch is missing "
                f"(CUDA_HOME={CUDA_HOME}, torch.version.cuda={torch.version.cuda})"
            )
        return True
    return has_nvcc and torch.version.cuda is not None and torch.cuda.is_available()


def extensions():
    cuda = want_cuda()
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    exts = []
    c_args = {"cxx": list(CXX)}
    if cuda and cu_sources:
        c_args["cxx"].append("-DFASTBALD_WITH_CUDA")
        c_args["nvcc"] = [
            "-O3",
            "-std=c++20",
            "-DFASTBALD_WITH_CUDA",
            "--expt-relaxed-constexpr",
            "-Xcompiler=-Wall,-Wextra,-Werror,-Wno-unused-parameter,-fvisibility=hidden",
            "-Werror=all-warnings",
            "-Xptxas=-warn-spills",
        ]
        if os.environ.get("FASTBALD_PTXAS_VERBOSE") == "1":
            # Registers / spills / shared memory per kernel (scripts/check_cuda_build.sh).
            c_args["nvcc"].append("-Xptxas=-v")
        exts.append(
            CUDAExtension(
                "fastbald._C",
                ["csrc/ops.cpp", *OPS_CPU_SOURCES, *cu_sources],
                extra_compile_args=c_args,
                extra_link_args=LINK,
            )
        )
    else:
        exts.append(CppExtension("fastbald._C", ["csrc/ops.cpp", *OPS_CPU_SOURCES], extra_compile_args=c_args["cxx"], extra_link_args=LINK))
    if cuda and os.environ.get("FASTBALD_CUDA_ONLY") == "1":
        # scripts/check_cuda_build.sh: only the library that carries the CUDA kernels.
        return exts
    is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    variants = [("base", [])]
    if is_x86:
        variants.insert(0, ("avx2", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]))
        # torch's own AVX512 capability flags (ATen/native/cpu builds), plus AVX2/FMA for the
        # 256-bit transposes the group kernel still uses.
        avx512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]
        # GCC 12 flags _mm512_undefined_ps() (`__m512 __Y = __Y;` in its own avx512fintrin.h) as
        # (maybe-)uninitialized once inlined into our code, a known false positive; -Werror stays on.
        avx512 += ["-Wno-maybe-uninitialized", "-Wno-uninitialized"]
        variants.insert(0, ("avx512", [*avx512, "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]))
    for name, flags in variants:
        exts.append(
            CppExtension(
                f"fastbald._cpu_{name}",
                # One source per extension; a per-variant copy name keeps ninja's object files apart.
                [f"csrc/cpu/scores_cpu_{name}.cpp"],
                extra_compile_args=[*CXX, *flags, f"-DFB_CPU_MODULE=_cpu_{name}"],
                extra_link_args=LINK,
            )
        )
    # Stochastic batch acquisition (fastbald/stochastic.py): scalar integer code, one portable build.
    exts.append(
        CppExtension(
            "fastbald._stochastic_cpu",
            ["csrc/cpu/stochastic_cpu.cpp"],
            extra_compile_args=list(CXX),
            extra_link_args=LINK,
        )
    )
    # EPIG's inner loop (fastbald/epig.py): AVX-512 code behind target attributes, chosen at run time.
    exts.append(
        CppExtension("fastbald._epig_cpu", ["csrc/cpu/epig_cpu.cpp"], extra_compile_args=list(CXX), extra_link_args=LINK)
    )
    return exts


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
