"""The C++ extension's kernels behind the Backend protocol; shared by ``cpu`` and ``cuda``.

The extension picks the CPU kernels or the CUDA launchers from the tensors' device (or,
with ``emulated_cuda``, runs CPU tensors through the CUDA launchers compiled for the
CPU); on CUDA it runs on the current stream, whose handle (and whether it is capturing a
CUDA graph, which pins the cached tables it uses) is passed down from here.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..device_cache import current_stream
from .base import Reduction, row_counts, scale_table

try:
    from regfuse import _C
except ImportError as exc:  # the package works without the extension (reference backend)
    _C = None
    IMPORT_ERROR: Optional[str] = f"the C++ extension regfuse._C is not built ({exc})"
else:
    IMPORT_ERROR = None


def reduce(tensors: Sequence[Tensor], op: Reduction, weights: Optional[Tensor],
           acc_dtype: torch.dtype, p: float = 0.0, rows: bool = False,
           emulated_cuda: bool = False) -> Tensor:
    return _C.reduce(tensors, int(op), weights, acc_dtype == torch.float64,
                     *current_stream(tensors[0].device), p, rows, emulated_cuda)


def backward(tensors: Sequence[Tensor], op: Reduction, grad_out: Tensor, norms: Optional[Tensor],
             weights: Optional[Tensor], acc_dtype: torch.dtype,
             accumulate_into: Optional[Sequence[Tensor]] = None,
             rows: bool = False, emulated_cuda: bool = False) -> Optional[list[Tensor]]:
    n = sum(row_counts(tensors)) if rows else len(tensors)
    scales = scale_table(op, grad_out, norms, weights, n, acc_dtype)
    stream = current_stream(tensors[0].device)
    acc_double = acc_dtype == torch.float64
    if accumulate_into is None:
        return _C.grad(tensors, scales, acc_double, *stream, rows, emulated_cuda)
    _C.add_grad_(accumulate_into, tensors, scales, acc_double, *stream, rows, emulated_cuda)
    return None


def prox_l1_(tensors: Sequence[Tensor], thresholds: Tensor, emulated_cuda: bool = False) -> None:
    _C.prox_l1_(tensors, thresholds, thresholds.dtype == torch.float64,
                *current_stream(tensors[0].device), emulated_cuda)


def scale_(tensors: Sequence[Tensor], factors: Tensor, rows: bool = False,
           emulated_cuda: bool = False) -> None:
    _C.scale_(tensors, factors, factors.dtype == torch.float64, *current_stream(tensors[0].device), rows,
              emulated_cuda)


def block_shrink_(tensors: Sequence[Tensor], thresholds: Tensor,
                  l1_thresholds: Optional[Tensor] = None) -> None:
    # CPU tensors only (the cpu backend); see Backend.block_shrink_.
    if l1_thresholds is not None:
        thresholds = torch.stack((thresholds, l1_thresholds))
    _C.block_shrink_(tensors, thresholds, l1_thresholds is not None, thresholds.dtype == torch.float64)
