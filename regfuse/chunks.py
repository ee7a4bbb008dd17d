"""The multi-tensor metadata: one int64 table that tells every kernel program its work.

The layout is the contract of ``csrc/regfuse.h`` (``MetaLayout``). For ``n`` tensors cut
into ``C`` chunks of ``chunk_size`` elements the table holds, in order::

    ptrs n | numels n | dtype codes n | chunk_offsets n+1 | chunk_tensor C | chunk_start C | flat_offset n

Empty tensors own no chunk; ``flat_offset[i]`` is the offset of tensor ``i`` in the flat
buffer of its dtype (tensors of one dtype in list order, each slot padded to a multiple
of ``ALIGNMENT`` bytes, so that every slot of a 16-byte aligned buffer is aligned). With
``rows=True`` the entries ("tensor i") are the rows of every tensor along dim 0 instead
(see :mod:`regfuse.backends.base`), expanded by :func:`_row_entries` before the same
build; the rows of one tensor share its slot.
Kernels choose the 16-byte vector path per chunk, from the chunk's addresses at run time.
The table is built with vectorized torch ops (no Python loop per chunk), uploaded to the
tensors' device once per stream without a host synchronization, and cached
(:mod:`regfuse.device_cache`): a training loop that passes the same tensors every step
pays neither the build nor the upload again. Where the C++ extension is built, its
``_C.metadata`` builds the same table natively (``csrc/multi_tensor.h``); the Python
build is the fallback.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .backends.base import DTYPE_CODES, DTypeCode, row_counts
from .device_cache import DeviceCache, current_stream, upload

try:
    from regfuse import _C
except ImportError:  # the package works without the extension
    _C = None

NUM_DTYPES = len(DTypeCode)
ALIGNMENT = 16  # bytes of the widest vector access (kAlignment in csrc/regfuse.h)
_ITEMSIZE = {int(code): torch.empty(0, dtype=dtype).element_size() for dtype, code in DTYPE_CODES.items()}
_CACHE_SIZE = 32


def flat_slot(numel: int, code: int) -> int:
    """Elements tensor of ``numel`` elements and dtype ``code`` takes in its flat buffer:
    ``numel`` rounded up to whole ``ALIGNMENT``-byte vectors (``flat_slot`` in multi_tensor.h)."""
    per_vector = ALIGNMENT // _ITEMSIZE[code]
    return -(-numel // per_vector) * per_vector


class MetaLayout(NamedTuple):
    """Sizes of a metadata table and where each section starts (mirrors ``MetaLayout``)."""

    num_tensors: int
    num_chunks: int
    chunk_size: int
    flat_sizes: tuple  # elements of the flat buffer of each dtype code (padded slots)
    flat_offsets: tuple  # the table's flat_offset section, on the host

    @property
    def ptrs(self) -> int:
        return 0

    @property
    def numels(self) -> int:
        return self.num_tensors

    @property
    def dtypes(self) -> int:
        return 2 * self.num_tensors

    @property
    def chunk_offsets(self) -> int:
        return 3 * self.num_tensors

    @property
    def chunk_tensor(self) -> int:
        return 4 * self.num_tensors + 1

    @property
    def chunk_start(self) -> int:
        return 4 * self.num_tensors + 1 + self.num_chunks

    @property
    def flat_offset(self) -> int:
        return 4 * self.num_tensors + 1 + 2 * self.num_chunks

    @property
    def size(self) -> int:
        return 5 * self.num_tensors + 1 + 2 * self.num_chunks


def _layout(numels: Sequence[int], codes: Sequence[int], chunk_size: int,
            continues_slot: Sequence[bool] = ()) -> MetaLayout:
    """The layout of the table over these entries (``build_metadata`` in multi_tensor.h):
    every entry starts an aligned slot unless ``continues_slot`` says it continues the
    previous entry's (the later rows of a tensor)."""
    num_chunks = sum(-(-numel // chunk_size) for numel in numels)
    ends = [0] * NUM_DTYPES
    flat_offsets = []
    for i, (numel, code) in enumerate(zip(numels, codes)):
        if not (continues_slot and continues_slot[i]):
            ends[code] = flat_slot(ends[code], code)  # a new slot starts aligned
        flat_offsets.append(ends[code])
        ends[code] += numel
    flat_sizes = tuple(flat_slot(end, code) for code, end in enumerate(ends))
    return MetaLayout(len(numels), num_chunks, chunk_size, flat_sizes, tuple(flat_offsets))


def build_host(ptrs: Sequence[int], numels: Sequence[int], codes: Sequence[int], chunk_size: int,
               layout: MetaLayout) -> Tensor:
    """The table on the CPU, from per-tensor lists (vectorized over tensors and chunks)."""
    n = len(ptrs)
    numels_t = torch.tensor(numels, dtype=torch.int64)
    chunks_per_tensor = (numels_t + (chunk_size - 1)) // chunk_size  # 0 for an empty tensor
    chunk_offsets = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(chunks_per_tensor, 0, out=chunk_offsets[1:])
    num_chunks = int(chunk_offsets[-1])
    chunk_tensor = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), chunks_per_tensor)
    chunk_start = (torch.arange(num_chunks, dtype=torch.int64) - chunk_offsets[chunk_tensor]) * chunk_size
    return torch.cat([torch.tensor(ptrs, dtype=torch.int64), numels_t,
                      torch.tensor(codes, dtype=torch.int64), chunk_offsets, chunk_tensor,
                      chunk_start, torch.tensor(layout.flat_offsets, dtype=torch.int64)])


def _check_chunk_size(chunk_size: int) -> None:
    # Chunk starts must keep a 16-byte aligned tensor aligned for every dtype (regfuse.h).
    if chunk_size <= 0 or chunk_size % (ALIGNMENT // 2) != 0:
        raise ValueError(f"regfuse: the chunk size must be a positive multiple of 8 elements, "
                         f"got {chunk_size}")


_cache = DeviceCache(_CACHE_SIZE)


def _row_entries(ptrs: Sequence[int], numels: Sequence[int], codes: Sequence[int],
                 rows: Sequence[int]) -> tuple[list, list, list, list]:
    """The entries of a table over rows: tensor ``i`` gives ``rows[i]`` consecutive entries
    of ``numels[i] / rows[i]`` elements each, in one flat slot (``row_entries`` in
    multi_tensor.h): (pointers, numels, dtype codes, continues-the-slot flags)."""
    entry_ptrs, entry_numels, entry_codes, continues = [], [], [], []
    for ptr, numel, code, count in zip(ptrs, numels, codes, rows):
        row = numel // count if count else 0
        entry_ptrs += [ptr + r * row * _ITEMSIZE[code] for r in range(count)]
        entry_numels += [row] * count
        entry_codes += [code] * count
        continues += [r > 0 for r in range(count)]
    return entry_ptrs, entry_numels, entry_codes, continues


def build_metadata(tensors: Sequence[Tensor], chunk_size: int,
                   rows: bool = False) -> tuple[Tensor, MetaLayout]:
    """The metadata table of ``tensors`` (or, with ``rows``, of their rows along dim 0) on
    their device, and its layout (cached).

    ``tensors`` must be a non-empty list of contiguous float32/float64/float16/bfloat16
    tensors on one device. The table depends only on the data pointers, sizes and dtypes
    (and row counts), which form the cache key (with the device and the current stream):
    a list whose tensors were reallocated at the same addresses with the same sizes has
    the same table, so a hit is always correct.
    """
    ptrs = tuple(t.data_ptr() for t in tensors)
    numels = tuple(t.numel() for t in tensors)
    codes = tuple(int(DTYPE_CODES[t.dtype]) for t in tensors)
    rows_per_tensor = tuple(row_counts(tensors)) if rows else None
    device = tensors[0].device

    def build():
        _check_chunk_size(chunk_size)
        entry_ptrs, entry_numels, entry_codes, continues = (
            _row_entries(ptrs, numels, codes, rows_per_tensor) if rows else (ptrs, numels, codes, ()))
        layout = _layout(entry_numels, entry_codes, chunk_size, continues)
        native = getattr(_C, "metadata", None)
        if native is not None:  # the same table, built and uploaded (and cached) natively
            meta, num_chunks = native(list(tensors), chunk_size, *current_stream(device), rows)
            assert num_chunks == layout.num_chunks, "native metadata disagrees with MetaLayout"
            return meta, layout, None
        host = build_host(entry_ptrs, entry_numels, entry_codes, chunk_size, layout)
        meta, pinned = upload(host, device)
        return meta, layout, pinned  # the pinned source lives as long as the table

    meta, layout, _ = _cache.get((ptrs, numels, codes, chunk_size, rows_per_tensor), device, build)
    return meta, layout


def clear_cache() -> None:
    """Forget the cached tables (to release their memory; correctness never needs it).
    Tables used by captured CUDA graphs stay."""
    _cache.clear()
