"""Triton backend: the kernels of :mod:`regfuse.triton`, one launch per op over the whole list.

Runs on CUDA tensors, and on CPU tensors through Triton's interpreter when
``TRITON_INTERPRET=1`` is set before Triton is first imported (slow; for tests). Triton
is imported only when the backend is asked about or used, so ``import regfuse`` works
where it is not installed.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from .base import Reduction, row_counts, scale_table

name = "triton"


def _triton_import_error() -> Optional[str]:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


def unavailable_reason(device: torch.device) -> Optional[str]:
    error = _triton_import_error()
    if error is not None:
        return error
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return ("Triton kernels need a CUDA device; set TRITON_INTERPRET=1 to run them on CPU "
                "tensors through the interpreter")
    return f"Triton kernels do not run on {device.type} tensors"


def reduce(tensors: Sequence[Tensor], op: Reduction, weights: Optional[Tensor],
           acc_dtype: torch.dtype, p: float = 0.0, rows: bool = False) -> Tensor:
    from ..triton import reduce as kernels

    return kernels.reduce(tensors, op, weights, acc_dtype, p, rows)


def backward(tensors: Sequence[Tensor], op: Reduction, grad_out: Tensor,
             norms: Optional[Tensor], weights: Optional[Tensor], acc_dtype: torch.dtype,
             accumulate_into: Optional[Sequence[Tensor]] = None,
             rows: bool = False) -> Optional[list[Tensor]]:
    from ..triton import grad as kernels

    n = sum(row_counts(tensors)) if rows else len(tensors)
    scales = scale_table(op, grad_out, norms, weights, n, acc_dtype)
    return kernels.penalty_grad(tensors, scales, acc_dtype, accumulate_into, rows)


def prox_l1_(tensors: Sequence[Tensor], thresholds: Tensor) -> None:
    from ..triton import prox as kernels

    kernels.prox_l1_(tensors, thresholds)


def scale_(tensors: Sequence[Tensor], factors: Tensor, rows: bool = False) -> None:
    from ..triton import prox as kernels

    kernels.scale_(tensors, factors, rows)
