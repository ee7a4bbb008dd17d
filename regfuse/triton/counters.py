"""Arrival counters of the one-launch reductions: int32 buffers that are all zero between
launches, so that no launch needs a memset first.

A reduction's programs each add one to a counter once their part is written; the program
that completes the count does the combining and sets the counter back to zero
(:func:`regfuse.triton.reduce._arrive_last`). A buffer therefore needs zeroing only when
it is made, provided that no two launches that may run at the same time share it:

- Eager launches: one buffer per device and stream, since the launches queued on one
  stream run one after another (on the CPU one buffer: Triton's interpreter runs one
  launch at a time, its grid state being global). A launch that needs more counters than
  the buffer holds replaces it with a larger one. A replaced or evicted buffer goes back
  to the caching allocator on the stream it was made on, whose next user there is
  ordered after the launches that used it (as in :mod:`regfuse.device_cache`).
- Launches captured into a CUDA graph: each gets its own buffer, allocated during the
  capture like the launch's partials, so it is graph memory used by that one kernel
  node: graphs replayed at the same time on any streams, or a graph and eager launches,
  never share a counter. A buffer shared with the capturing stream's eager launches (as
  :class:`~regfuse.device_cache.DeviceCache` shares its read-only tables) would race
  with them. Its zeroing is captured with it (one small extra node per captured
  reduction), which also makes every replay start from zero.
"""
from __future__ import annotations

import collections
import contextlib
import threading
from typing import Iterator

import torch
from torch import Tensor

from ..device_cache import current_stream

_CAPACITY = 64  # streams with a buffer
_MIN_SIZE = 256  # counters in a new buffer: most lists never grow it

_lock = threading.Lock()
_buffers: collections.OrderedDict = collections.OrderedDict()  # (device, stream) -> Tensor


def _eager_buffer(device: torch.device, stream: int, count: int) -> Tensor:
    key = (device, stream)
    with _lock:
        buffer = _buffers.get(key)
        if buffer is None or buffer.numel() < count:
            size = max(_MIN_SIZE, 1 << (count - 1).bit_length())  # doubling: few regrowths
            buffer = torch.zeros(size, dtype=torch.int32, device=device)
            _buffers[key] = buffer
        _buffers.move_to_end(key)
        while len(_buffers) > _CAPACITY:
            _buffers.popitem(last=False)
        return buffer


@contextlib.contextmanager
def arrival_counters(device: torch.device, count: int) -> Iterator[Tensor]:
    """At least ``count`` zero int32 counters on ``device`` for one launch on its current
    stream, which must leave them zero.

    A launch that raises part-way (the interpreter stops at the first Python error in a
    program) may leave counts behind: the buffer is zeroed again before the error
    propagates, so the next launch still starts from zero.
    """
    stream, capturing = current_stream(device)
    if capturing:
        buffer = torch.zeros(count, dtype=torch.int32, device=device)
    else:
        buffer = _eager_buffer(device, stream, count)
    try:
        yield buffer
    except BaseException:
        buffer.zero_()
        raise
