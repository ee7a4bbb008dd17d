"""In-place element-wise updates over a tensor list, one per-tensor number ``c_i`` each:
soft-thresholding ``x = sign(x) * max(|x| - c_i, 0)`` and scaling ``x = x * c_i``.

Memory traffic: one read and one write of every element (none for a tensor scaled by
exactly 1: ``x * 1`` is ``x``). Computed in the accumulation dtype and rounded once.
``max`` propagates NaN (``tl.maximum`` would drop it on a GPU), so NaN stays NaN and
``|x| - t`` = NaN (``x`` and ``t`` infinite) gives NaN, as ``torch.clamp_min`` does.
"""
from __future__ import annotations

from typing import Sequence

import triton
import triton.language as tl
from torch import Tensor

from ..chunks import build_metadata
from . import (CONFIG, FLOAT16, FLOAT32, FLOAT64, acc_type, chunk_work, device_guard, is_aligned,
               load_block, sign, store_block, to_element, typed_pointer)

# The update a kernel applies (compile-time constants).
PROX_L1 = tl.constexpr(0)
SCALE = tl.constexpr(1)


@triton.jit
def _update_steps(x_ptr, start, numel, c, OP: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK: tl.constexpr, ACC: tl.constexpr, MASKED: tl.constexpr):
    for step in tl.static_range(0, CHUNK, BLOCK):
        offsets = start + step + tl.arange(0, BLOCK)
        x = load_block(x_ptr, offsets, numel, MASKED).to(ACC)
        if OP == SCALE:
            y = x * c
        else:
            y = sign(x) * tl.maximum(tl.abs(x) - c, 0.0, propagate_nan=tl.PropagateNan.ALL)
        store_block(x_ptr, offsets, to_element(y, x_ptr.dtype.element_ty), numel, MASKED)


@triton.jit
def _update_chunk(address, start, numel, c, ELEM: tl.constexpr, OP: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Update elements ``[start, start + CHUNK)`` of the ``ELEM`` tensor at ``address``."""
    if (start + CHUNK <= numel) & is_aligned(address):  # unmasked, 16-byte vectors (see load_block)
        _update_steps(typed_pointer(address, ELEM, True), start, numel, c, OP, CHUNK, BLOCK, ACC, False)
    else:
        _update_steps(typed_pointer(address, ELEM, False), start, numel, c, OP, CHUNK, BLOCK, ACC, True)


@triton.jit
def _update_typed_chunk(address, code, start, numel, c, OP: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK: tl.constexpr, ACC: tl.constexpr):
    """:func:`_update_chunk` with the element type of dtype ``code``."""
    if code == FLOAT32:
        _update_chunk(address, start, numel, c, tl.float32, OP, CHUNK, BLOCK, ACC)
    elif code == FLOAT64:
        _update_chunk(address, start, numel, c, tl.float64, OP, CHUNK, BLOCK, ACC)
    elif code == FLOAT16:
        _update_chunk(address, start, numel, c, tl.float16, OP, CHUNK, BLOCK, ACC)
    else:
        _update_chunk(address, start, numel, c, tl.bfloat16, OP, CHUNK, BLOCK, ACC)


@triton.jit(do_not_specialize=["num_tensors", "num_chunks"])  # one compiled kernel for every list
def _update_kernel(
    meta,  # int64 multi-tensor metadata (regfuse/chunks.py); the tensors are updated in place
    per_tensor,  # (num_tensors,) accumulation dtype: thresholds (PROX_L1) or factors (SCALE)
    num_tensors, num_chunks,
    OP: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    chunk = tl.program_id(0)
    tensor, start, numel, code, address = chunk_work(meta, chunk, num_tensors, num_chunks, CHUNK)
    c = tl.load(per_tensor + tensor)
    if OP == SCALE:
        if c != 1.0:  # x * 1 is x: no traffic for an unclipped tensor
            _update_typed_chunk(address, code, start, numel, c, OP, CHUNK, BLOCK, ACC)
    else:
        _update_typed_chunk(address, code, start, numel, c, OP, CHUNK, BLOCK, ACC)


def _update(tensors: Sequence[Tensor], per_tensor: Tensor, op: int, rows: bool = False) -> None:
    meta, layout = build_metadata(tensors, CONFIG.chunk_size, rows)
    if not layout.num_chunks:
        return
    with device_guard(tensors[0].device):
        _update_kernel[(layout.num_chunks,)](
            meta, per_tensor.contiguous(), layout.num_tensors, layout.num_chunks, OP=op,
            CHUNK=CONFIG.chunk_size, BLOCK=CONFIG.block, ACC=acc_type(per_tensor.dtype),
            num_warps=CONFIG.num_warps, enable_fp_fusion=False)


def prox_l1_(tensors: Sequence[Tensor], thresholds: Tensor) -> None:
    """In place ``x = sign(x) * max(|x| - thresholds[i], 0)`` for every tensor ``i``.

    ``tensors``: non-empty list of contiguous tensors on one device; ``thresholds``:
    ``(n,)`` in the accumulation dtype on that device.
    """
    _update(tensors, thresholds, PROX_L1)


def scale_(tensors: Sequence[Tensor], factors: Tensor, rows: bool = False) -> None:
    """In place ``x = x * factors[i]`` for every entry ``i`` (same arguments as
    :func:`prox_l1_`; with ``rows``, one factor per row along dim 0); an entry whose
    factor is exactly 1 is neither read nor written."""
    _update(tensors, factors, SCALE, rows)
