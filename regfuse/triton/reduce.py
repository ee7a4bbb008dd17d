"""Fused reductions (L1, L2, squared L2, general p, nonzero count, max-abs, min-abs,
weighted penalty, L1 and L2 together) over a tensor list, or over the rows of its tensors,
in one launch of :func:`_reduce_kernel`.

Memory traffic: every element is read once (both terms of the penalty come from the
same load); the partials are one or two numbers per chunk of ``chunk_size`` elements.

One program per chunk writes the chunk's partial sum (or max) to its own slot, then
counts itself in at its entry's arrival counter (:func:`_arrive_last`); the program that
arrives last for an entry combines that entry's partials in index order through a fixed
reduction tree and writes its result. Every program then counts itself in at the
launch's counter, and the last one finishes the launch: the results of the empty entries
(which own no chunk) and, for the weighted penalty, the sum of the per-entry terms, again
in a fixed order. Which program arrives last depends on scheduling, what it computes does
not: the same input gives bitwise the same result on every run. The last program to
arrive sets a counter back to zero, so counters need no memset per launch
(:mod:`regfuse.triton.counters`). Multiply-adds may be fused (``x * x`` into the running
sum): one rounding instead of two.

NaN handling for the max-abs and min-abs norms: ``tl.maximum`` and ``tl.max`` may drop
NaN on a GPU, so the max (min) is taken over the non-NaN values and the NaN values are
summed apart (a sum of NaN is NaN, of nothing is 0); adding the two gives NaN exactly
when any element is NaN, as ``torch.linalg.vector_norm(x, +-inf)`` does. The min of
nothing is +inf: masked-off lanes hold +inf for it, 0 for every other op.

General p: ``|x|**p`` is ``exp2(p * log2|x|)`` evaluated in float64 (Triton has no
``pow`` that also runs in the interpreter; float64 keeps it accurate), which is 0 for
``x = 0`` and inf for infinite ``x``. ``p`` comes as the bits of a float64 in an int64
argument (a Python float argument would be passed as float32; a tensor would cost a
copy to the device per call) and is rounded to the accumulation dtype in the kernel.
"""
from __future__ import annotations

import struct
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
from .counters import arrival_counters


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



@triton.jit
def _order(p_bits, OP: tl.constexpr, ACC: tl.constexpr):
    """The order ``p`` of ``OP_LP`` in the accumulation dtype, from its float64 bits."""
    if OP == OP_LP:
        p = p_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    else:
        p = 0.0
    return p


@triton.jit
def _arrive_last(counter, arrivals):
    """Count this program in at ``counter``; whether it is the last of ``arrivals`` to arrive.

    The barrier orders every thread's stores of this program before the increment, whose
    release makes them visible to the last program, whose acquire makes them visible to
    its loads; the last one sets the counter back to zero for the next launch. A counter
    that one program arrives at is not touched.
    """
    tl.debug_barrier()
    last = arrivals == 1
    if arrivals > 1:
        last = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == arrivals - 1
        if last:
            tl.store(counter, 0)
    return last


@triton.jit
def _entry_results(total, second_total, entries, weights, p, num_tensors, mask, OP: tl.constexpr):
    """The results stored for ``entries`` (a scalar or a block, where ``mask``) from their
    combined partials: the root of L2 and LP, the weighted term of PENALTY, the root of
    the second sum of L1_L2 (second value; unused otherwise)."""
    if OP == OP_L2:
        total = _sqrt(total)
    elif OP == OP_LP:
        total = _pow(total, 1.0 / p.to(tl.float64))  # the p-th root
    elif OP == OP_PENALTY:
        total = (tl.load(weights + entries, mask=mask, other=0.0) * total
                 + tl.load(weights + num_tensors + entries, mask=mask, other=0.0) * second_total)
    elif OP == OP_L1_L2:
        second_total = _sqrt(second_total)
    return total, second_total


@triton.jit
def _store_results(out, entries, result, second_result, num_tensors, mask, OP: tl.constexpr):
    """``out[entries] = result`` where ``mask`` (and ``second_result`` into the second row of
    ``OP_L1_L2``)."""
    tl.store(out + entries, result, mask=mask)
    if OP == OP_L1_L2:
        tl.store(out + num_tensors + entries, second_result, mask=mask)


@triton.jit
def _combine_entry(partials, begin, end, num_chunks, OP: tl.constexpr, BLOCK: tl.constexpr,
                   ACC: tl.constexpr):
    """The combined partials ``[begin, end)`` of one entry, in index order.

    Partials written by other programs are loaded from L2 (``.cg``): this program's L1 may
    hold stale lines of the buffer's previous use.
    """
    first = tl.full([BLOCK], _identity(OP), dtype=ACC)
    second = tl.zeros([BLOCK], dtype=ACC)
    for block_start in range(begin, end, BLOCK):
        index = block_start + tl.arange(0, BLOCK)
        mask = index < end
        part = tl.load(partials + index, mask=mask, other=_identity(OP), cache_modifier=".cg")
        if OP == OP_INF or OP == OP_NEG_INF:
            first, second = _accumulate(first, second, part, 0.0, OP)
        else:
            first += part
        if OP == OP_PENALTY or OP == OP_L1_L2:
            second += tl.load(partials + num_chunks + index, mask=mask, other=0.0, cache_modifier=".cg")
    return _finish(first, second, OP)


@triton.jit
def _reduce_chunk(meta, partials, weights, out, counters, chunk, p, num_tensors, num_chunks,
                  OP: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                  COMBINE_BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Write chunk ``chunk``'s partial(s); the last chunk of its entry to arrive writes the
    entry's result."""
    tensor, start, numel, code, address = chunk_work(meta, chunk, num_tensors, num_chunks, CHUNK)
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
    begin = tl.load(meta + 3 * num_tensors + tensor)
    end = tl.load(meta + 3 * num_tensors + tensor + 1)
    if _arrive_last(counters + tensor, end - begin):
        total, second_total = _combine_entry(partials, begin, end, num_chunks, OP, COMBINE_BLOCK, ACC)
        always = tensor < num_tensors  # the mask of the helpers' block form, for one entry
        total, second_total = _entry_results(total, second_total, tensor, weights, p, num_tensors,
                                             always, OP)
        _store_results(out, tensor, total, second_total, num_tensors, always, OP)


@triton.jit
def _finish_launch(meta, out, penalty_out, weights, p, num_tensors, OP: tl.constexpr,
                   BLOCK: tl.constexpr, ACC: tl.constexpr):
    """What the launch's last program does once every entry that owns a chunk has its
    result: the results of the empty entries (from the identity: they own no partial) and,
    for ``OP_PENALTY``, the sum of the weighted terms, in a fixed order, into
    ``penalty_out``."""
    total = tl.zeros([BLOCK], dtype=ACC)
    for block_start in range(0, num_tensors, BLOCK):
        entries = block_start + tl.arange(0, BLOCK)
        valid = entries < num_tensors
        begin = tl.load(meta + 3 * num_tensors + entries, mask=valid, other=0)
        end = tl.load(meta + 3 * num_tensors + 1 + entries, mask=valid, other=0)
        empty = valid & (begin == end)
        result, second_result = _entry_results(tl.full([BLOCK], _identity(OP), dtype=ACC),
                                               tl.zeros([BLOCK], dtype=ACC), entries, weights, p,
                                               num_tensors, empty, OP)
        _store_results(out, entries, result, second_result, num_tensors, empty, OP)
        if OP == OP_PENALTY:
            written = tl.load(out + entries, mask=valid & (begin != end), other=0.0, cache_modifier=".cg")
            total += tl.where(empty, result, written)
    if OP == OP_PENALTY:
        tl.store(penalty_out, tl.sum(total, axis=0))


# Runtime integers are not specialized (Triton would compile a variant for 1 and for
# multiples of 16): one compiled kernel serves every list.
@triton.jit(do_not_specialize=["p_bits", "num_tensors", "num_chunks"])
def _reduce_kernel(
    meta,  # int64 multi-tensor metadata (regfuse/chunks.py)
    partials,  # (num_parts, num_chunks) accumulation dtype: one slot per program
    weights,  # PENALTY: (2, num_tensors) weights of sum|x| and sum x**2; else unused
    out,  # accumulation dtype: (num_tensors,) per-entry results; L1_L2: (2, num_tensors),
    #       sum|x| then sqrt(sum x**2); PENALTY: the weighted terms
    penalty_out,  # PENALTY: 0-d, the sum of the weighted terms; else unused
    counters,  # int32, at least num_tensors + 1, zero (regfuse/triton/counters.py)
    p_bits,  # OP_LP: the float64 bits of p; else unused
    num_tensors, num_chunks,
    OP: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, COMBINE_BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    chunk = tl.program_id(0)
    p = _order(p_bits, OP, ACC)
    if chunk < num_chunks:  # a launch over no chunk has one program, for the finish
        _reduce_chunk(meta, partials, weights, out, counters, chunk, p, num_tensors, num_chunks,
                      OP, CHUNK, BLOCK, COMBINE_BLOCK, ACC)
    if _arrive_last(counters + num_tensors, tl.num_programs(0)):
        # Entries per step as elements per step: a list of thousands takes a few steps.
        _finish_launch(meta, out, penalty_out, weights, p, num_tensors, OP, BLOCK, ACC)


def _float64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def reduce(tensors: Sequence[Tensor], op: Reduction, weights: Optional[Tensor],
           acc_dtype: torch.dtype, p: float = 0.0, rows: bool = False) -> Tensor:
    """Per-entry reductions (``(n,)``, ``(2, n)`` for ``L1_L2``), or the 0-d weighted
    penalty; the entries are the tensors, or with ``rows`` their rows along dim 0.

    ``tensors``: non-empty list of contiguous tensors on one device; ``weights``: ``(2, n)``
    in ``acc_dtype`` for ``PENALTY``, else ``None``; ``p``: the order of ``LP``.
    Deterministic; one kernel launch (none for a table over rows with no entry, which
    has nothing to compute).
    """
    device = tensors[0].device
    meta, layout = build_metadata(tensors, CONFIG.chunk_size, rows)
    n, num_chunks = layout.num_tensors, layout.num_chunks
    op = int(op)
    num_parts = 2 if op in (Reduction.PENALTY, Reduction.L1_L2) else 1
    # At least one slot: a launch over no chunk still gets a valid pointer.
    partials = torch.empty((num_parts, max(num_chunks, 1)), dtype=acc_dtype, device=device)
    out = torch.empty((2, n) if op == Reduction.L1_L2 else (n,), dtype=acc_dtype, device=device)
    # The penalty gets a tensor of its own: the result must not be a view into the terms.
    penalty_out = (torch.empty if n else torch.zeros)((), dtype=acc_dtype, device=device) \
        if op == Reduction.PENALTY else out
    if n:
        weights_arg = weights.contiguous() if weights is not None else out  # unused unless PENALTY
        with device_guard(device), arrival_counters(device, n + 1) as counters:
            _reduce_kernel[(max(num_chunks, 1),)](
                meta, partials, weights_arg, out, penalty_out, counters, _float64_bits(p), n, num_chunks, OP=op,
                CHUNK=CONFIG.chunk_size, BLOCK=CONFIG.block, COMBINE_BLOCK=CONFIG.combine_block,
                ACC=acc_type(acc_dtype), num_warps=CONFIG.num_warps, enable_fp_fusion=True)
    return penalty_out if op == Reduction.PENALTY else out
