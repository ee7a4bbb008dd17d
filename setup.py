"""Builds regfuse._C: the CPU kernels always, the CUDA kernels when the torch it builds
against has CUDA (or REGFUSE_FORCE_CUDA=1), else the same CUDA kernels compiled for the
CPU (csrc/cuda/simt_cpu.h; run with REGFUSE_CUDA_EMULATE=1). Metadata lives in
pyproject.toml.

Install with ``pip install --no-build-isolation .`` (or ``-e .``) so that the build uses
the installed torch. Build settings read from the environment:

- ``TORCH_CUDA_ARCH_LIST``: GPU architectures to compile for; unset, Ampere and Hopper
  (``8.0;8.6;9.0+PTX``, the PTX lets newer GPUs JIT-compile the sm_90 code).
- ``MAX_JOBS``: parallel compile jobs (torch's ninja build; all cores when unset).
"""
import os
import shutil
import sys
import sysconfig

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

DEFAULT_CUDA_ARCHS = "8.0;8.6;9.0+PTX"


def with_cuda() -> bool:
    if os.environ.get("REGFUSE_FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


if "pip-build-env-" in torch.__file__:
    # Building in pip's isolated environment: the torch here is a fresh download, not the
    # one the extension will be imported by, and a mismatch fails at import time.
    print("regfuse: warning: building against a torch in pip's isolated build environment "
          f"({torch.__version__}); install with `pip install --no-build-isolation` to build "
          "against your own torch", file=sys.stderr)

# torch builds in parallel (MAX_JOBS) only with ninja, which it looks up on PATH; a ninja
# pip-installed into the building environment is not there unless that is activated.
scripts_dir = sysconfig.get_path("scripts")
if shutil.which("ninja") is None and shutil.which("ninja", path=scripts_dir):
    os.environ["PATH"] = scripts_dir + os.pathsep + os.environ.get("PATH", "")

sources = ["csrc/bindings.cpp", "csrc/cpu/kernels.cpp"]
cxx_flags = ["-O3", "-fopenmp"]  # at::parallel_for is OpenMP inline code
if with_cuda():
    # torch's default is the architectures of the GPUs visible at build time: a build on an
    # H100 would not run on an A100, and a machine without a GPU has none to take.
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    print(f"regfuse: building CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
    extension = CUDAExtension(
        "regfuse._C",
        sources + ["csrc/cuda/kernels.cu"],
        define_macros=[("REGFUSE_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
        extra_link_args=["-fopenmp"],
    )
else:
    # The CUDA kernels compiled for the CPU through csrc/cuda/simt_cpu.h: the cuda backend
    # on CPU tensors with REGFUSE_CUDA_EMULATE=1 (tests without a GPU).
    extension = CppExtension("regfuse._C", sources + ["csrc/cuda/kernels_emulated.cpp"],
                             define_macros=[("REGFUSE_WITH_CUDA_EMULATION", None)],
                             extra_compile_args=cxx_flags + ["-Wno-unknown-pragmas"],  # nvcc's unroll
                             extra_link_args=["-fopenmp"])

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
)
