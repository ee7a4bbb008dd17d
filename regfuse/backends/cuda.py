"""``cuda``: the C++/CUDA extension's kernels, on the current CUDA stream.

With ``REGFUSE_CUDA_EMULATE=1`` in the environment (read at run time, when the backends are
first resolved in a process; ``regfuse.backends.forget()`` reads it again) and an extension
built without CUDA, the backend also runs CPU tensors, through the same launchers, chunk
size, workspace, gradient buffers and checks, with the kernels compiled for the CPU by
``csrc/cuda/simt_cpu.h`` (slow; for tests without a GPU). ``"auto"`` never picks it for
CPU tensors.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import native
from .base import Reduction
from .native import IMPORT_ERROR, _C

name = "cuda"

EMULATE_VARIABLE = "REGFUSE_CUDA_EMULATE"


def emulating() -> bool:
    """Whether CPU tensors run through the emulated CUDA kernels (``REGFUSE_CUDA_EMULATE=1``)."""
    return os.environ.get(EMULATE_VARIABLE) == "1"


def unavailable_reason(device: torch.device) -> Optional[str]:
    if IMPORT_ERROR is not None:
        return IMPORT_ERROR
    if device.type == "cpu" and emulating():
        if _C.built_with_cuda_emulation():
            return None
        return ("this build of the extension has real CUDA kernels and no emulated ones; "
                f"{EMULATE_VARIABLE}=1 runs CPU tensors only in builds without CUDA")
    if not _C.built_with_cuda():
        return ("the extension was built without CUDA kernels (the torch it was built against "
                "has no CUDA; rebuild with a CUDA torch or REGFUSE_FORCE_CUDA=1; or set "
                f"{EMULATE_VARIABLE}=1 to run them emulated on CPU tensors)")
    if device.type != "cuda":
        return f"the cuda backend runs CUDA tensors only, not {device.type}"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def _emulated(tensors: Sequence[Tensor]) -> bool:
    return tensors[0].device.type == "cpu"


def reduce(tensors: Sequence[Tensor], op: Reduction, weights: Optional[Tensor],
           acc_dtype: torch.dtype, p: float = 0.0, rows: bool = False) -> Tensor:
    return native.reduce(tensors, op, weights, acc_dtype, p, rows, _emulated(tensors))


def backward(tensors: Sequence[Tensor], op: Reduction, grad_out: Tensor, norms: Optional[Tensor],
             weights: Optional[Tensor], acc_dtype: torch.dtype,
             accumulate_into: Optional[Sequence[Tensor]] = None,
             rows: bool = False) -> Optional[list[Tensor]]:
    return native.backward(tensors, op, grad_out, norms, weights, acc_dtype, accumulate_into, rows,
                           _emulated(tensors))


def prox_l1_(tensors: Sequence[Tensor], thresholds: Tensor) -> None:
    native.prox_l1_(tensors, thresholds, _emulated(tensors))


def scale_(tensors: Sequence[Tensor], factors: Tensor, rows: bool = False) -> None:
    native.scale_(tensors, factors, rows, _emulated(tensors))
