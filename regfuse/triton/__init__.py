"""Triton kernels of regfuse: one launch over a whole tensor list, one file per kernel family.

Every kernel reads its work from the multi-tensor metadata of :mod:`regfuse.chunks`
(layout in ``csrc/regfuse.h``): program ``c`` handles chunk ``c``, loads which tensor it
belongs to, where it starts, the tensor's size, data address and dtype code, and turns
the address into a typed pointer (the pointer-table pattern of Triton's grouped-GEMM
tutorial). Mixed dtypes share one launch: each kernel branches at run time on the dtype
code, so the four element types are four branches of one compiled kernel.

This package imports Triton; :mod:`regfuse.backends.triton` imports it only when the
backend is used, so ``import regfuse`` works without Triton.
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..backends.base import DTypeCode, Reduction

# Kernels decorated while TRITON_INTERPRET=1 run in the interpreter (CPU tensors).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


class LaunchConfig(NamedTuple):
    chunk_size: int  # elements per program
    block: int  # elements per vectorized step inside a chunk
    combine_block: int  # partials per step when a reduction combines those of one entry
    num_warps: int


# On a GPU a chunk of 4096 elements is 4 unrolled steps of 1024, enough bytes in flight
# per program to saturate bandwidth while a list of many small tensors still yields
# many programs. The interpreter runs programs one after another in Python, so it wants
# fewer, smaller steps; its chunk stays small so that tests cover multi-chunk tensors.
CONFIG = (LaunchConfig(chunk_size=512, block=256, combine_block=64, num_warps=1) if INTERPRETED
          else LaunchConfig(chunk_size=4096, block=1024, combine_block=128, num_warps=4))

# Codes shared with regfuse.backends.base (DTypeCode, Reduction) as compile-time constants.
FLOAT32 = tl.constexpr(int(DTypeCode.FLOAT32))
FLOAT64 = tl.constexpr(int(DTypeCode.FLOAT64))
FLOAT16 = tl.constexpr(int(DTypeCode.FLOAT16))
OP_L1 = tl.constexpr(int(Reduction.L1))
OP_L2 = tl.constexpr(int(Reduction.L2))
OP_SQ = tl.constexpr(int(Reduction.SQ))
OP_INF = tl.constexpr(int(Reduction.INF))
OP_PENALTY = tl.constexpr(int(Reduction.PENALTY))
OP_LP = tl.constexpr(int(Reduction.LP))
OP_L0 = tl.constexpr(int(Reduction.L0))
OP_NEG_INF = tl.constexpr(int(Reduction.NEG_INF))
OP_L1_L2 = tl.constexpr(int(Reduction.L1_L2))

DTYPES_BY_CODE = {
    DTypeCode.FLOAT32: torch.float32,
    DTypeCode.FLOAT64: torch.float64,
    DTypeCode.FLOAT16: torch.float16,
    DTypeCode.BFLOAT16: torch.bfloat16,
}


def acc_type(acc_dtype: torch.dtype):
    """The Triton accumulation type for a torch accumulation dtype."""
    return tl.float64 if acc_dtype == torch.float64 else tl.float32


def device_guard(device: torch.device):
    """Launch on ``device`` (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def chunk_work(meta, chunk, num_tensors, num_chunks, CHUNK: tl.constexpr):
    """What program ``chunk`` works on: (tensor index, start offset, numel, dtype code, address).

    The offsets are those of ``MetaLayout`` in ``csrc/regfuse.h``. Compiler hints must
    sit on the op that defines a value (a hint on a function argument is lost), so the
    start offset's (a multiple of ``CHUNK``) is given here.
    """
    tensor = tl.load(meta + 4 * num_tensors + 1 + chunk)
    start = tl.multiple_of(tl.load(meta + 4 * num_tensors + 1 + num_chunks + chunk), CHUNK)
    numel = tl.load(meta + num_tensors + tensor)
    code = tl.load(meta + 2 * num_tensors + tensor)
    address = tl.load(meta + tensor)
    return tensor, start, numel, code, address


@triton.jit
def typed_pointer(address, ELEM: tl.constexpr, ALIGNED: tl.constexpr):
    """The int64 ``address`` as a pointer to ``ELEM``, hinted 16-byte aligned if ``ALIGNED``.

    The hint is what lets full chunks use 16-byte vector loads; it is only given inside a
    branch taken when :func:`is_aligned` holds for the address (a hint does not survive
    through an integer address).
    """
    ptr = address.to(tl.pointer_type(ELEM))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def is_aligned(address):
    """Whether the int64 ``address`` is a multiple of 16 bytes (``kAlignment``)."""
    return (address % 16) == 0


# Vector loads and stores need an aligned pointer and a mask that is constant over the
# vector; a mask against a size read from memory never is. So each program picks, by one
# branch per chunk at run time, the unmasked aligned variant for a full chunk (all but
# the last chunk of a tensor) of an aligned tensor, else the masked element-wise one:
# one misaligned tensor costs the vector path of its own chunks only. Chunk starts are
# multiples of CHUNK (a multiple of 16 elements), so they keep a tensor's alignment.

@triton.jit
def load_block(ptr, offsets, numel, MASKED: tl.constexpr):
    """``ptr[offsets]``, 0 beyond ``numel`` when ``MASKED``."""
    if MASKED:
        x = tl.load(ptr + offsets, mask=offsets < numel, other=0.0)
    else:
        x = tl.load(ptr + offsets)
    return x


@triton.jit
def store_block(ptr, offsets, value, numel, MASKED: tl.constexpr):
    """``ptr[offsets] = value``, skipping offsets beyond ``numel`` when ``MASKED``."""
    if MASKED:
        tl.store(ptr + offsets, value, mask=offsets < numel)
    else:
        tl.store(ptr + offsets, value)


@triton.jit
def sign(x):
    """``torch.sign``: -1, 0 or 1, and 0 for NaN."""
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


@triton.jit
def to_element(x, ELEM: tl.constexpr):
    """``x`` (accumulation dtype) rounded to element type ``ELEM`` exactly as torch's ``.to()``.

    torch rounds float64 to float16/bfloat16 through float32 (``c10::Half`` and
    ``c10::BFloat16`` are built from a float), so this does too; a direct conversion
    would round once and differ in the last bit now and then. float32 -> bfloat16 uses
    c10's integer round-to-nearest-even, which gives the same bits as the GPU's native
    conversion and also runs correctly in the interpreter (whose bfloat16 casts truncate).
    """
    # One return: every return of a Triton function must have the same type, even
    # those of compile-time branches that are not taken.
    if ELEM == tl.float64 or ELEM == tl.float32:
        rounded = x.to(ELEM)
    elif ELEM == tl.float16:
        rounded = x.to(tl.float32).to(tl.float16)
    else:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(x != x, 0x7FC0, bits)  # a quiet NaN, as c10 writes it
        rounded = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return rounded
