"""The fused backward: element ``x`` of tensor ``i`` gets ``a_i * sign(x) + b_i * x``.

Memory traffic: one read of every element, one write of its gradient (plus one read of
the existing gradient when accumulating in place). The gradient is computed in the
accumulation dtype and rounded once to the element dtype. Multiply-adds are not fused,
so every product and sum is rounded as in the same PyTorch expression: the gradients
equal the reference backend's bit for bit.

Two destinations, chosen at compile time (``ACCUMULATE``):
- new gradients: one flat output buffer per dtype, tensor ``i`` at ``flat_offset[i]``
  of its dtype's buffer (a 16-byte aligned slot); the caller gets views of those buffers
  shaped like the inputs;
- in place: added to the tensor whose address is entry ``i`` of a second metadata table
  (built over the gradients), which is how ``add_penalty_grad_`` updates ``p.grad``.

Entries may be the tensors or, with ``rows``, their rows along dim 0 (one ``(a, b)`` per
row). The rows of a tensor share its flat slot, so a row's flat offset need not be
aligned: the vector path is taken per chunk where input and output addresses both are.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends.base import DTYPE_CODES, DTypeCode, row_counts
from ..chunks import MetaLayout, build_metadata
from . import (CONFIG, DTYPES_BY_CODE, FLOAT16, FLOAT32, FLOAT64, acc_type, chunk_work,
               device_guard, is_aligned, load_block, sign, store_block, to_element,
               typed_pointer)


@triton.jit
def _flat_offset(meta, tensor, num_tensors, num_chunks):
    return tl.load(meta + 4 * num_tensors + 1 + 2 * num_chunks + tensor)


@triton.jit
def _destination(flat_out, out_meta, meta, tensor, num_tensors, num_chunks,
                 ACCUMULATE: tl.constexpr, ALIGNED: tl.constexpr):
    """Where entry ``tensor``'s gradient goes: a pointer typed like ``flat_out``.

    The flat buffer itself is a fresh (aligned) allocation; a tensor's slot starts 16-byte
    aligned (offsets padded, ``csrc/regfuse.h``), a later row of it may not. The hint sits
    on the load that defines the offset (see ``chunk_work``) and is given only when
    ``ALIGNED`` (checked by the caller), as for an address from ``out_meta``.
    """
    if ACCUMULATE:
        out_ptr = typed_pointer(tl.load(out_meta + tensor), flat_out.dtype.element_ty, ALIGNED)
    else:
        offset = _flat_offset(meta, tensor, num_tensors, num_chunks)
        if ALIGNED:
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
def _grad_chunk(address, flat_out, out_meta, meta, tensor, start, numel, a, b, num_tensors,
                num_chunks, ELEM: tl.constexpr, ACCUMULATE: tl.constexpr, CHUNK: tl.constexpr,
                BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Gradient of elements ``[start, start + CHUNK)`` of the ``ELEM`` tensor at ``address``."""
    aligned = is_aligned(address)
    if ACCUMULATE:
        aligned = aligned & is_aligned(tl.load(out_meta + tensor))
    else:  # the buffer is aligned: the offset must be a whole number of 16-byte vectors
        per_vector = 128 // flat_out.dtype.element_ty.primitive_bitwidth
        aligned = aligned & (_flat_offset(meta, tensor, num_tensors, num_chunks) % per_vector == 0)
    if (start + CHUNK <= numel) & aligned:  # unmasked, 16-byte vectors (see load_block)
        _grad_steps(typed_pointer(address, ELEM, True),
                    _destination(flat_out, out_meta, meta, tensor, num_tensors, num_chunks,
                                 ACCUMULATE, True),
                    start, numel, a, b, ACCUMULATE, CHUNK, BLOCK, ACC, False)
    else:
        _grad_steps(typed_pointer(address, ELEM, False),
                    _destination(flat_out, out_meta, meta, tensor, num_tensors, num_chunks,
                                 ACCUMULATE, False),
                    start, numel, a, b, ACCUMULATE, CHUNK, BLOCK, ACC, True)


@triton.jit(do_not_specialize=["num_tensors", "num_chunks"])  # one compiled kernel for every list
def _grad_kernel(
    meta,  # int64 multi-tensor metadata of the inputs (regfuse/chunks.py)
    scales,  # (2, num_tensors) accumulation dtype: a_i (row 0) and b_i (row 1)
    out_meta,  # ACCUMULATE: metadata of the gradients to add to (only its addresses are read)
    out_f32, out_f64, out_f16, out_bf16,  # not ACCUMULATE: flat output buffer per dtype
    num_tensors, num_chunks,
    ACCUMULATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    chunk = tl.program_id(0)
    tensor, start, numel, code, address = chunk_work(meta, chunk, num_tensors, num_chunks, CHUNK)
    a = tl.load(scales + tensor)
    b = tl.load(scales + num_tensors + tensor)
    # A typed pointer may not outlive its branch (branches must agree on types), so each
    # branch makes its pointers and does the whole chunk.
    if code == FLOAT32:
        _grad_chunk(address, out_f32, out_meta, meta, tensor, start, numel, a, b, num_tensors,
                    num_chunks, tl.float32, ACCUMULATE, CHUNK, BLOCK, ACC)
    elif code == FLOAT64:
        _grad_chunk(address, out_f64, out_meta, meta, tensor, start, numel, a, b, num_tensors,
                    num_chunks, tl.float64, ACCUMULATE, CHUNK, BLOCK, ACC)
    elif code == FLOAT16:
        _grad_chunk(address, out_f16, out_meta, meta, tensor, start, numel, a, b, num_tensors,
                    num_chunks, tl.float16, ACCUMULATE, CHUNK, BLOCK, ACC)
    else:
        _grad_chunk(address, out_bf16, out_meta, meta, tensor, start, numel, a, b, num_tensors,
                    num_chunks, tl.bfloat16, ACCUMULATE, CHUNK, BLOCK, ACC)


def _flat_buffers(layout: MetaLayout, device: torch.device) -> list[Tensor]:
    """One output buffer per dtype code, sized for that dtype's slots (empty if none)."""
    return [torch.empty(layout.flat_sizes[code], dtype=DTYPES_BY_CODE[code], device=device)
            for code in DTypeCode]


def _views(tensors: Sequence[Tensor], buffers: list[Tensor], layout: MetaLayout,
           rows: bool) -> list[Tensor]:
    """Tensor ``i``'s slot of its dtype's buffer, at the table's ``flat_offset`` of its
    first entry (its rows follow in the same slot)."""
    views, entry = [], 0
    for t, entries in zip(tensors, row_counts(tensors) if rows else [1] * len(tensors)):
        offset = layout.flat_offsets[entry] if entry < layout.num_tensors else 0
        views.append(buffers[DTYPE_CODES[t.dtype]][offset:offset + t.numel()].view(t.shape))
        entry += entries
    return views


def penalty_grad(tensors: Sequence[Tensor], scales: Tensor, acc_dtype: torch.dtype,
                 accumulate_into: Optional[Sequence[Tensor]] = None,
                 rows: bool = False) -> Optional[list[Tensor]]:
    """``scales[0, i] * sign(x) + scales[1, i] * x`` for every element of every entry.

    ``scales``: ``(2, n)`` contiguous, ``acc_dtype``, one column per entry (tensor, or row
    with ``rows``). Returns new gradients (views of one flat buffer per dtype), or adds
    them in place to ``accumulate_into`` (contiguous, shaped and typed like ``tensors``)
    and returns ``None``.
    """
    device = tensors[0].device
    meta, layout = build_metadata(tensors, CONFIG.chunk_size, rows)
    accumulate = accumulate_into is not None
    if accumulate:
        out_meta, _ = build_metadata(accumulate_into, CONFIG.chunk_size, rows)
        buffers = [torch.empty(0, dtype=DTYPES_BY_CODE[code], device=device) for code in DTypeCode]
    else:
        out_meta = meta  # unused by the kernel in this mode
        buffers = _flat_buffers(layout, device)
    if layout.num_chunks:
        with device_guard(device):
            _grad_kernel[(layout.num_chunks,)](
                meta, scales, out_meta, *buffers, layout.num_tensors, layout.num_chunks,
                ACCUMULATE=accumulate, CHUNK=CONFIG.chunk_size, BLOCK=CONFIG.block,
                ACC=acc_type(acc_dtype), num_warps=CONFIG.num_warps, enable_fp_fusion=False)
    return None if accumulate else _views(tensors, buffers, layout, rows)
