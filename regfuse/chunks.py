"""The multi-tensor metadata: one int64 table that tells every kernel program its work.

The layout is the contract of ``csrc/regfuse.h`` (``MetaLayout``). For ``n`` tensors cut
into ``C`` chunks of ``chunk_size`` elements the table holds, in order::

    ptrs n | numels n | dtype codes n | chunk_offsets n+1 | chunk_tensor C | chunk_start C | flat_offset n

Empty tensors own no chunk; ``flat_offset[i]`` is the offset of tensor ``i`` in the flat
buffer of its dtype (tensors of one dtype packed in list order). The table is built with
vectorized torch ops (no Python loop per chunk), copied to the tensors' device once, and
cached: a training loop that passes the same tensors every step pays neither the build
nor the host-to-device copy again. Where the C++ extension is built, its
``_C.metadata`` builds the same table natively; the Python build is the fallback.
"""
from __future__ import annotations

import collections
import threading
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .backends.base import DTYPE_CODES, DTypeCode

try:
    from regfuse import _C
except ImportError:  # the package works without the extension
    _C = None

NUM_DTYPES = len(DTypeCode)
ALIGNMENT = 16  # bytes of the widest vector load
_ITEMSIZE = {int(code): torch.empty(0, dtype=dtype).element_size() for dtype, code in DTYPE_CODES.items()}
_CACHE_SIZE = 32


class MetaLayout(NamedTuple):
    """Sizes of a metadata table and where each section starts (mirrors ``MetaLayout``)."""

    num_tensors: int
    num_chunks: int
    chunk_size: int
    dtype_numels: tuple  # total elements per dtype code: the size of each flat buffer
    # Alignment facts kernels may use for vector loads (not part of the table):
    ptrs_aligned: bool  # every data pointer is a multiple of ALIGNMENT bytes
    flat_aligned: bool  # every flat_offset is a multiple of ALIGNMENT bytes

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


def _exclusive_cumsum(x: Tensor, dim: int = 0) -> Tensor:
    return torch.cumsum(x, dim) - x


def _layout(ptrs: Sequence[int], numels: Sequence[int], codes: Sequence[int],
            chunk_size: int) -> MetaLayout:
    num_chunks = sum(-(-numel // chunk_size) for numel in numels)
    dtype_numels = [0] * NUM_DTYPES
    for numel, code in zip(numels, codes):
        dtype_numels[code] += numel
    ptrs_aligned = all(ptr % ALIGNMENT == 0 for ptr in ptrs)
    # Flat offsets are running sums of numels, aligned if every tensor's byte size is.
    flat_aligned = all(numel * _ITEMSIZE[code] % ALIGNMENT == 0 for numel, code in zip(numels, codes))
    return MetaLayout(len(numels), num_chunks, chunk_size, tuple(dtype_numels), ptrs_aligned,
                      flat_aligned)


def _build_host(ptrs: Sequence[int], numels: Sequence[int], codes: Sequence[int],
                chunk_size: int) -> Tensor:
    """The table on the CPU, from per-tensor lists (vectorized over tensors and chunks)."""
    n = len(ptrs)
    ptrs_t = torch.tensor(ptrs, dtype=torch.int64)
    numels_t = torch.tensor(numels, dtype=torch.int64)
    codes_t = torch.tensor(codes, dtype=torch.int64)

    chunks_per_tensor = (numels_t + (chunk_size - 1)) // chunk_size  # 0 for an empty tensor
    chunk_offsets = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(chunks_per_tensor, 0, out=chunk_offsets[1:])
    num_chunks = int(chunk_offsets[-1])
    chunk_tensor = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), chunks_per_tensor)
    chunk_start = (torch.arange(num_chunks, dtype=torch.int64) - chunk_offsets[chunk_tensor]) * chunk_size

    # Offset within the flat buffer of its dtype: an exclusive running sum of the numels
    # of the earlier tensors of the same dtype, computed for all dtypes at once.
    numel_by_dtype = torch.nn.functional.one_hot(codes_t, NUM_DTYPES) * numels_t.unsqueeze(1)
    flat_offset = _exclusive_cumsum(numel_by_dtype).gather(1, codes_t.unsqueeze(1)).squeeze(1)

    return torch.cat([ptrs_t, numels_t, codes_t, chunk_offsets, chunk_tensor, chunk_start, flat_offset])


class _LRU:
    """A small thread-safe least-recently-used map."""

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_cache = _LRU(_CACHE_SIZE)


def build_metadata(tensors: Sequence[Tensor], chunk_size: int) -> tuple[Tensor, MetaLayout]:
    """The metadata table of ``tensors`` on their device, and its layout (cached).

    ``tensors`` must be a non-empty list of contiguous float32/float64/float16/bfloat16
    tensors on one device. The table depends only on the data pointers, sizes and dtypes,
    which form the cache key: a list whose tensors were reallocated at the same addresses
    with the same sizes has the same table, so a hit is always correct.
    """
    ptrs = tuple(t.data_ptr() for t in tensors)
    numels = tuple(t.numel() for t in tensors)
    codes = tuple(int(DTYPE_CODES[t.dtype]) for t in tensors)
    device = tensors[0].device
    key = (ptrs, numels, codes, device, chunk_size)
    hit = _cache.get(key)
    if hit is not None:
        return hit

    layout = _layout(ptrs, numels, codes, chunk_size)
    native = getattr(_C, "metadata", None)
    if native is not None:  # the same table, built (and cached on the device) in native code
        meta, num_chunks = native(list(tensors), chunk_size)
        assert num_chunks == layout.num_chunks, "native metadata disagrees with MetaLayout"
    else:
        meta = _build_host(ptrs, numels, codes, chunk_size)
    meta = meta.to(device)
    _cache.put(key, (meta, layout))
    return meta, layout


def clear_cache() -> None:
    """Forget every cached table (to release their memory; correctness never needs it)."""
    _cache.clear()
