"""In-place soft-thresholding ``x = sign(x) * max(|x| - t_i, 0)`` over a tensor list.

Memory traffic: one read and one write of every element. Computed in the accumulation
dtype and rounded once. ``max`` propagates NaN (``tl.maximum`` would drop it on a GPU),
so NaN stays NaN and ``|x| - t`` = NaN (``x`` and ``t`` infinite) gives NaN, as
``torch.clamp_min`` does.
"""
from __future__ import annotations

from typing import Sequence

import triton
import triton.language as tl
from torch import Tensor

from ..chunks import build_metadata
from . import (CONFIG, FLOAT16, FLOAT32, FLOAT64, acc_type, chunk_work, device_guard, is_aligned,
               load_block, sign, store_block, to_element, typed_pointer)


@triton.jit
def _prox_steps(x_ptr, start, numel, threshold, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                ACC: tl.constexpr, MASKED: tl.constexpr):
    for step in tl.static_range(0, CHUNK, BLOCK):
        offsets = start + step + tl.arange(0, BLOCK)
        x = load_block(x_ptr, offsets, numel, MASKED).to(ACC)
        shrunk = tl.maximum(tl.abs(x) - threshold, 0.0, propagate_nan=tl.PropagateNan.ALL)
        store_block(x_ptr, offsets, to_element(sign(x) * shrunk, x_ptr.dtype.element_ty), numel, MASKED)


@triton.jit
def _prox_chunk(address, start, numel, threshold, ELEM: tl.constexpr, CHUNK: tl.constexpr,
                BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Soft-threshold elements ``[start, start + CHUNK)`` of the ``ELEM`` tensor at ``address``."""
    if (start + CHUNK <= numel) & is_aligned(address):  # unmasked, 16-byte vectors (see load_block)
        _prox_steps(typed_pointer(address, ELEM, True), start, numel, threshold, CHUNK, BLOCK, ACC, False)
    else:
        _prox_steps(typed_pointer(address, ELEM, False), start, numel, threshold, CHUNK, BLOCK, ACC, True)


@triton.jit(do_not_specialize=["num_tensors", "num_chunks"])  # one compiled kernel for every list
def _prox_kernel(
    meta,  # int64 multi-tensor metadata (regfuse/chunks.py); the tensors are updated in place
    thresholds,  # (num_tensors,) accumulation dtype
    num_tensors, num_chunks,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    chunk = tl.program_id(0)
    tensor, start, numel, code, address = chunk_work(meta, chunk, num_tensors, num_chunks, CHUNK)
    threshold = tl.load(thresholds + tensor)
    if code == FLOAT32:
        _prox_chunk(address, start, numel, threshold, tl.float32, CHUNK, BLOCK, ACC)
    elif code == FLOAT64:
        _prox_chunk(address, start, numel, threshold, tl.float64, CHUNK, BLOCK, ACC)
    elif code == FLOAT16:
        _prox_chunk(address, start, numel, threshold, tl.float16, CHUNK, BLOCK, ACC)
    else:
        _prox_chunk(address, start, numel, threshold, tl.bfloat16, CHUNK, BLOCK, ACC)


def prox_l1_(tensors: Sequence[Tensor], thresholds: Tensor) -> None:
    """In place ``x = sign(x) * max(|x| - thresholds[i], 0)`` for every tensor ``i``.

    ``tensors``: non-empty list of contiguous tensors on one device; ``thresholds``:
    ``(n,)`` in the accumulation dtype on that device.
    """
    meta, layout = build_metadata(tensors, CONFIG.chunk_size)
    if not layout.num_chunks:
        return
    with device_guard(tensors[0].device):
        _prox_kernel[(layout.num_chunks,)](
            meta, thresholds.contiguous(), layout.num_tensors, layout.num_chunks,
            CHUNK=CONFIG.chunk_size, BLOCK=CONFIG.block, ACC=acc_type(thresholds.dtype),
            num_warps=CONFIG.num_warps, enable_fp_fusion=False)
