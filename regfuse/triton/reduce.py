"""Fused reductions (L1, L2, squared L2, general p, nonzero count, max-abs, min-abs,
weighted penalty, L1 and L2 together) over a tensor list, or over the rows of its tensors.

Memory traffic: every element is read once (both terms of the penalty come from the
same load); the partials are one or two numbers per chunk of ``chunk_size`` elements.

Stage 1 (:func:`_partials_kernel`, one program per chunk) writes the chunk's partial
sum (or max) to its own slot: no atomics. Stage 2 (:func:`_combine_kernel`, one
program per tensor) combines that tensor's partials in index order through a fixed
reduction tree, so the same input gives bitwise the same result on every run. Multiply-adds may be
fused (``x * x`` into the running sum): one rounding instead of two.

NaN handling for the max-abs and min-abs norms: ``tl.maximum`` and ``tl.max`` may drop
NaN on a GPU, so the max (min) is taken over the non-NaN values and the NaN values are
summed apart (a sum of NaN is NaN, of nothing is 0); adding the two gives NaN exactly
when any element is NaN, as ``torch.linalg.vector_norm(x, +-inf)`` does. The min of
nothing is +inf: masked-off lanes hold +inf for it, 0 for every other op.

General p: ``|x|**p`` is ``exp2(p * log2|x|)`` evaluated in float64 (Triton has no
``pow`` that also runs in the interpreter; float64 keeps it accurate), which is 0 for
``x = 0`` and inf for infinite ``x``. ``p`` comes in a one-element tensor of the
accumulation dtype: a Python float argument would be passed as float32.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends.base import Reduction
from ..chunks import build_metadata
from . import (CONFIG, FLOAT16, FLOAT32, FLOAT64, OP_INF, OP_L0, OP_L1, OP_L1_L2, OP_L2, OP_LP,
               OP_NEG_INF, OP_PENALTY, acc_type, chunk_work, device_guard, is_aligned, load_block,
               typed_pointer)


@triton.jit
def _pow(magnitude, exponent):
    """``magnitude ** exponent`` for ``magnitude >= 0`` and a finite ``exponent != 0``, in
    float64; ``0 ** exponent`` is 0 (``exponent > 0``) or inf, without taking ``log2(0)``."""
    wide = magnitude.to(tl.float64)
    is_zero = wide == 0
    power = tl.exp2(exponent.to(tl.float64) * tl.log2(tl.where(is_zero, 1.0, wide)))
    zero_power = tl.where(exponent > 0, 0.0, float("inf")).to(tl.float64)
    return tl.where(is_zero, zero_power, power).to(magnitude.dtype)


@triton.jit
def _identity(OP: tl.constexpr):
    """What the first running block starts from: +inf for the min, else 0."""
    if OP == OP_NEG_INF:
        value = float("inf")
    else:
        value = 0.0
    return value


@triton.jit
def _accumulate(first, second, x, p, OP: tl.constexpr):
    """Fold block ``x`` (accumulation dtype, the op's identity where masked) into the
    running blocks; ``p`` is the order of ``OP_LP``."""
    if OP == OP_INF:
        magnitude = tl.abs(x)
        is_nan = x != x
        first = tl.maximum(first, tl.where(is_nan, 0.0, magnitude))
        second += tl.where(is_nan, x, 0.0)
    elif OP == OP_NEG_INF:
        magnitude = tl.abs(x)
        is_nan = x != x
        first = tl.minimum(first, tl.where(is_nan, float("inf"), magnitude))
        second += tl.where(is_nan, x, 0.0)
    elif OP == OP_L1:
        first += tl.abs(x)
    elif OP == OP_L0:
        first += (x != 0).to(first.dtype)  # NaN != 0: counted, as torch counts it
    elif OP == OP_LP:
        first += _pow(tl.abs(x), p)
    elif OP == OP_PENALTY or OP == OP_L1_L2:
        first += tl.abs(x)
        second += x * x
    else:  # OP_L2, OP_SQ
        first += x * x
    return first, second


@triton.jit
def _finish(first, second, OP: tl.constexpr):
    """The scalars a block pair stands for: (sum or NaN-aware max / min, second sum)."""
    if OP == OP_INF:
        return tl.max(first, axis=0) + tl.sum(second, axis=0), tl.sum(second, axis=0)
    if OP == OP_NEG_INF:
        return tl.min(first, axis=0) + tl.sum(second, axis=0), tl.sum(second, axis=0)
    return tl.sum(first, axis=0), tl.sum(second, axis=0)


@triton.jit
def _sqrt(x):
    """Correctly rounded square root, as torch's (``tl.sqrt`` is approximate in float32)."""
    if x.dtype == tl.float64:
        root = tl.sqrt(x)  # sqrt.rn.f64: float64 has no approximate square root
    else:
        root = tl.sqrt_rn(x)
    return root


@triton.jit
def _partials_steps(x_ptr, start, numel, p, OP: tl.constexpr, CHUNK: tl.constexpr,
                    BLOCK: tl.constexpr, ACC: tl.constexpr, MASKED: tl.constexpr):
    """The partial(s) of the chunk, unmasked loads unless ``MASKED``."""
    first = tl.full([BLOCK], _identity(OP), dtype=ACC)
    second = tl.zeros([BLOCK], dtype=ACC)
    for step in tl.static_range(0, CHUNK, BLOCK):
        offsets = start + step + tl.arange(0, BLOCK)
        x = load_block(x_ptr, offsets, numel, MASKED).to(ACC)
        if MASKED and OP == OP_NEG_INF:  # the loads' 0 beyond numel would be the min
            x = tl.where(offsets < numel, x, float("inf"))
        first, second = _accumulate(first, second, x, p, OP)
    return _finish(first, second, OP)


@triton.jit
def _chunk_partials(address, start, numel, p, ELEM: tl.constexpr, OP: tl.constexpr,
                    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """The partial(s) of elements ``[start, start + CHUNK)`` of the ``ELEM`` tensor at ``address``."""
    if (start + CHUNK <= numel) & is_aligned(address):  # unmasked, 16-byte vectors (see load_block)
        first, second = _partials_steps(typed_pointer(address, ELEM, True), start, numel, p, OP, CHUNK,
                                        BLOCK, ACC, False)
    else:
        first, second = _partials_steps(typed_pointer(address, ELEM, False), start, numel, p, OP, CHUNK,
                                        BLOCK, ACC, True)
    return first, second


# Runtime integers are not specialized (Triton would compile a variant for 1 and for
# multiples of 16): one compiled kernel serves every list.
@triton.jit(do_not_specialize=["num_tensors", "num_chunks"])
def _partials_kernel(
    meta,  # int64 multi-tensor metadata (regfuse/chunks.py)
    partials,  # (num_parts, num_chunks) accumulation dtype: the output of this stage
    order,  # OP_LP: one-element tensor holding p (accumulation dtype); else unused
    num_tensors, num_chunks,
    OP: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    chunk = tl.program_id(0)
    tensor, start, numel, code, address = chunk_work(meta, chunk, num_tensors, num_chunks, CHUNK)
    if OP == OP_LP:
        p = tl.load(order)
    else:
        p = 0.0
    if code == FLOAT32:
        first, second = _chunk_partials(address, start, numel, p, tl.float32, OP, CHUNK, BLOCK, ACC)
    elif code == FLOAT64:
        first, second = _chunk_partials(address, start, numel, p, tl.float64, OP, CHUNK, BLOCK, ACC)
    elif code == FLOAT16:
        first, second = _chunk_partials(address, start, numel, p, tl.float16, OP, CHUNK, BLOCK, ACC)
    else:
        first, second = _chunk_partials(address, start, numel, p, tl.bfloat16, OP, CHUNK, BLOCK, ACC)
    tl.store(partials + chunk, first)
    if OP == OP_PENALTY or OP == OP_L1_L2:
        tl.store(partials + num_chunks + chunk, second)


@triton.jit(do_not_specialize=["num_tensors", "num_chunks"])
def _combine_kernel(
    meta,  # int64 multi-tensor metadata: chunk_offsets says which partials are whose
    partials,  # (num_parts, num_chunks) from _partials_kernel
    weights,  # PENALTY: (2, num_tensors) weights of sum|x| and sum x**2; else unused
    order,  # OP_LP: one-element tensor holding p (accumulation dtype); else unused
    out,  # (num_tensors,) accumulation dtype: per-tensor result (PENALTY: weighted terms;
    #       L1_L2: (2, num_tensors), sum|x| then sqrt(sum x**2))
    num_tensors, num_chunks,
    OP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    tensor = tl.program_id(0)
    begin = tl.load(meta + 3 * num_tensors + tensor)
    end = tl.load(meta + 3 * num_tensors + tensor + 1)
    first = tl.full([BLOCK], _identity(OP), dtype=ACC)  # an empty tensor owns no chunk: identity
    second = tl.zeros([BLOCK], dtype=ACC)
    for block_start in range(begin, end, BLOCK):
        index = block_start + tl.arange(0, BLOCK)
        mask = index < end
        part = tl.load(partials + index, mask=mask, other=_identity(OP))
        if OP == OP_INF or OP == OP_NEG_INF:
            first, second = _accumulate(first, second, part, 0.0, OP)
        else:
            first += part
        if OP == OP_PENALTY or OP == OP_L1_L2:
            second += tl.load(partials + num_chunks + index, mask=mask, other=0.0)
    total, second_total = _finish(first, second, OP)
    if OP == OP_L2:
        total = _sqrt(total)
    elif OP == OP_LP:
        total = _pow(total, 1.0 / tl.load(order).to(tl.float64))  # the p-th root
    elif OP == OP_PENALTY:
        total = (tl.load(weights + tensor) * total
                 + tl.load(weights + num_tensors + tensor) * second_total)
    elif OP == OP_L1_L2:
        tl.store(out + num_tensors + tensor, _sqrt(second_total))
    tl.store(out + tensor, total)


def reduce(tensors: Sequence[Tensor], op: Reduction, weights: Optional[Tensor],
           acc_dtype: torch.dtype, p: float = 0.0, rows: bool = False) -> Tensor:
    """Per-entry reductions (``(n,)``, ``(2, n)`` for ``L1_L2``), or the 0-d weighted
    penalty; the entries are the tensors, or with ``rows`` their rows along dim 0.

    ``tensors``: non-empty list of contiguous tensors on one device; ``weights``: ``(2, n)``
    in ``acc_dtype`` for ``PENALTY``, else ``None``; ``p``: the order of ``LP``.
    Deterministic.
    """
    device = tensors[0].device
    meta, layout = build_metadata(tensors, CONFIG.chunk_size, rows)
    n, num_chunks = layout.num_tensors, layout.num_chunks
    acc = acc_type(acc_dtype)
    op = int(op)
    num_parts = 2 if op in (Reduction.PENALTY, Reduction.L1_L2) else 1
    partials = torch.empty((num_parts, num_chunks), dtype=acc_dtype, device=device)
    out = torch.empty((2, n) if op == Reduction.L1_L2 else n, dtype=acc_dtype, device=device)
    weights_arg = weights.contiguous() if weights is not None else out  # unused unless PENALTY
    order = torch.full((1,), p, dtype=acc_dtype, device=device) if op == Reduction.LP else out
    with device_guard(device):
        if num_chunks:  # a list of empty tensors has nothing to read
            _partials_kernel[(num_chunks,)](meta, partials, order, n, num_chunks, OP=op,
                                            CHUNK=CONFIG.chunk_size, BLOCK=CONFIG.block, ACC=acc,
                                            num_warps=CONFIG.num_warps, enable_fp_fusion=True)
        if n:  # a table over rows may have no entry at all
            _combine_kernel[(n,)](meta, partials, weights_arg, order, out, n, num_chunks, OP=op,
                                  BLOCK=CONFIG.combine_block, ACC=acc, num_warps=CONFIG.num_warps,
                                  enable_fp_fusion=True)
    # torch's sum over the n weighted terms is a fixed-order reduction (no atomics).
    return out.sum() if op == Reduction.PENALTY else out
