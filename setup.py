"""Builds regfuse._C: the CPU kernels always, the CUDA kernels when the torch it builds
against has CUDA (or REGFUSE_FORCE_CUDA=1). Install with
``pip install --no-build-isolation -e .`` so that the build uses the installed torch."""
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def with_cuda() -> bool:
    if os.environ.get("REGFUSE_FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


sources = ["csrc/bindings.cpp", "csrc/cpu/kernels.cpp"]
cxx_flags = ["-O3", "-fopenmp"]  # at::parallel_for is OpenMP inline code
if with_cuda():
    extension = CUDAExtension(
        "regfuse._C",
        sources + ["csrc/cuda/kernels.cu"],
        define_macros=[("REGFUSE_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
        extra_link_args=["-fopenmp"],
    )
else:
    extension = CppExtension("regfuse._C", sources, extra_compile_args=cxx_flags,
                             extra_link_args=["-fopenmp"])

setup(
    name="regfuse",
    version="0.1.0",
    description="Fused regularization penalties and norms over lists of tensors",
    packages=find_packages(include=["regfuse", "regfuse.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.5"],
)
