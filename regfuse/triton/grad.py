"""The fused backward: element ``x`` of tensor ``i`` gets ``a_i * sign(x) + b_i * x``.

Memory traffic: one read of every element, one write of its gradient (plus one read of
the existing gradient when accumulating in place). The gradient is computed in the
accumulation dtype and rounded once to the element dtype. Multiply-adds are not fused,
so every product and sum is rounded as in the same PyTorch expression: the gradients
equal the reference backend's bit for bit.

Two destinations, chosen at compile time (``ACCUMULATE``):
- new gradients: one flat output buffer per dtype, tensor ``i`` at ``flat_offset[i]``
  of its dtype's buffer; the caller gets views of those buffers shaped like the inputs;
- in place: added to the tensor whose address is entry ``i`` of a second metadata table
  (built over the gradients), which is how ``add_penalty_grad_`` updates ``p.grad``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends.base import DTYPE_CODES, DTypeCode
from ..chunks import MetaLayout, build_metadata
from . import (CONFIG, DTYPES_BY_CODE, FLOAT16, FLOAT32, FLOAT64, acc_type, chunk_work,
               device_guard, load_block, sign, store_block, to_element,
               typed_pointer)


@triton.jit
def _destination(flat_out, out_meta, meta, tensor, num_tensors, num_chunks,
                 ACCUMULATE: tl.constexpr, OUT_ALIGNED: tl.constexpr):
    """Where tensor ``tensor``'s gradient goes: a pointer typed like ``flat_out``.

    The alignment hint on a flat offset sits on the load that defines it (see ``chunk_work``).
    """
    if ACCUMULATE:
        out_ptr = typed_pointer(tl.load(out_meta + tensor), flat_out.dtype.element_ty, OUT_ALIGNED)
    else:
        offset = tl.load(meta + 4 * num_tensors + 1 + 2 * num_chunks + tensor)  # flat_offset
        if OUT_ALIGNED:
            offset = tl.multiple_of(offset, 128 // flat_out.dtype.element_ty.primitive_bitwidth)
        out_ptr = flat_out + offset
    return out_ptr


@triton.jit
def _grad_steps(x_ptr, out_ptr, start, numel, a, b, ACCUMULATE: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, MASKED: tl.constexpr):
    for step in tl.static_range(0, CHUNK, BLOCK):
        offsets = start + step + tl.arange(0, BLOCK)
        x = load_block(x_ptr, offsets, numel, MASKED).to(ACC)
        grad = a * sign(x) + b * x
        if ACCUMULATE:
            grad = load_block(out_ptr, offsets, numel, MASKED).to(ACC) + grad
        store_block(out_ptr, offsets, to_element(grad, out_ptr.dtype.element_ty), numel, MASKED)


@triton.jit
def _grad_chunk(x_ptr, out_ptr, start, numel, a, b, ACCUMULATE: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Gradient of elements ``[start, start + CHUNK)`` of the tensor at ``x_ptr``."""
    if start + CHUNK <= numel:  # a full chunk: unmasked, vectorizable (see load_block)
        _grad_steps(x_ptr, out_ptr, start, numel, a, b, ACCUMULATE, CHUNK, BLOCK, ACC, False)
    else:
        _grad_steps(x_ptr, out_ptr, start, numel, a, b, ACCUMULATE, CHUNK, BLOCK, ACC, True)


@triton.jit
def _grad_kernel(
    meta,  # int64 multi-tensor metadata of the inputs (regfuse/chunks.py)
    scales,  # (2, num_tensors) accumulation dtype: a_i (row 0) and b_i (row 1)
    out_meta,  # ACCUMULATE: metadata of the gradients to add to (only its addresses are read)
    out_f32, out_f64, out_f16, out_bf16,  # not ACCUMULATE: flat output buffer per dtype
    num_tensors, num_chunks,
    ACCUMULATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
    X_ALIGNED: tl.constexpr, OUT_ALIGNED: tl.constexpr,  # inputs' / outputs' 16-byte alignment
):
    chunk = tl.program_id(0)
    tensor, start, numel, code, address = chunk_work(meta, chunk, num_tensors, num_chunks, CHUNK)
    a = tl.load(scales + tensor)
    b = tl.load(scales + num_tensors + tensor)
    # A typed pointer may not outlive its branch (branches must agree on types), so each
    # branch makes its pointers and does the whole chunk.
    if code == FLOAT32:
        _grad_chunk(typed_pointer(address, tl.float32, X_ALIGNED),
                    _destination(out_f32, out_meta, meta, tensor, num_tensors, num_chunks,
                                 ACCUMULATE, OUT_ALIGNED),
                    start, numel, a, b, ACCUMULATE, CHUNK, BLOCK, ACC)
    elif code == FLOAT64:
        _grad_chunk(typed_pointer(address, tl.float64, X_ALIGNED),
                    _destination(out_f64, out_meta, meta, tensor, num_tensors, num_chunks,
                                 ACCUMULATE, OUT_ALIGNED),
                    start, numel, a, b, ACCUMULATE, CHUNK, BLOCK, ACC)
    elif code == FLOAT16:
        _grad_chunk(typed_pointer(address, tl.float16, X_ALIGNED),
                    _destination(out_f16, out_meta, meta, tensor, num_tensors, num_chunks,
                                 ACCUMULATE, OUT_ALIGNED),
                    start, numel, a, b, ACCUMULATE, CHUNK, BLOCK, ACC)
    else:
        _grad_chunk(typed_pointer(address, tl.bfloat16, X_ALIGNED),
                    _destination(out_bf16, out_meta, meta, tensor, num_tensors, num_chunks,
                                 ACCUMULATE, OUT_ALIGNED),
                    start, numel, a, b, ACCUMULATE, CHUNK, BLOCK, ACC)


def _flat_buffers(layout: MetaLayout, device: torch.device) -> list[Tensor]:
    """One output buffer per dtype code, sized for that dtype's tensors (empty if none)."""
    return [torch.empty(layout.dtype_numels[code], dtype=DTYPES_BY_CODE[code], device=device)
            for code in DTypeCode]


def _views(tensors: Sequence[Tensor], buffers: list[Tensor]) -> list[Tensor]:
    """Tensor ``i``'s slice of its dtype's buffer, packed in list order as ``flat_offset`` is."""
    next_offset = [0] * len(buffers)
    views = []
    for t in tensors:
        code = DTYPE_CODES[t.dtype]
        begin = next_offset[code]
        next_offset[code] = begin + t.numel()
        views.append(buffers[code][begin:next_offset[code]].view(t.shape))
    return views


def penalty_grad(tensors: Sequence[Tensor], scales: Tensor, acc_dtype: torch.dtype,
                 accumulate_into: Optional[Sequence[Tensor]] = None) -> Optional[list[Tensor]]:
    """``scales[0, i] * sign(x) + scales[1, i] * x`` for every element of every tensor.

    ``scales``: ``(2, n)`` contiguous, ``acc_dtype``. Returns new gradients (views of
    one flat buffer per dtype), or adds them in place to ``accumulate_into`` (contiguous,
    shaped and typed like ``tensors``) and returns ``None``.
    """
    device = tensors[0].device
    meta, layout = build_metadata(tensors, CONFIG.chunk_size)
    accumulate = accumulate_into is not None
    if accumulate:
        out_meta, out_layout = build_metadata(accumulate_into, CONFIG.chunk_size)
        out_aligned = out_layout.ptrs_aligned
        buffers = [torch.empty(0, dtype=DTYPES_BY_CODE[code], device=device) for code in DTypeCode]
    else:
        out_meta = meta  # unused by the kernel in this mode
        out_aligned = layout.flat_aligned  # fresh buffers are aligned; their offsets may not be
        buffers = _flat_buffers(layout, device)
    if layout.num_chunks:
        with device_guard(device):
            _grad_kernel[(layout.num_chunks,)](
                meta, scales, out_meta, *buffers, layout.num_tensors, layout.num_chunks,
                ACCUMULATE=accumulate, CHUNK=CONFIG.chunk_size, BLOCK=CONFIG.block,
                ACC=acc_type(acc_dtype), X_ALIGNED=layout.ptrs_aligned, OUT_ALIGNED=out_aligned,
                num_warps=CONFIG.num_warps, enable_fp_fusion=False)
    return None if accumulate else _views(tensors, buffers)
