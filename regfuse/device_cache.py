"""Caches of device buffers that kernels read (metadata tables, weights): safe across
streams and CUDA graphs, and filled without a host synchronization.

A cached buffer is read by kernels queued on some CUDA stream, possibly long after the
call that queued them returned. Three hazards, and what this module does about them:

- Host synchronization. A blocking host-to-device copy from pageable memory waits for the
  GPU; in a training loop every cache miss (new activations, fresh ``.grad`` tensors)
  would stall the step. :func:`upload` copies from pinned memory with
  ``non_blocking=True`` and the pinned source stays in the cache entry, alive as long as
  the device copy (the CUDA caching host allocator also defers reusing a pinned block
  until the copies that read it are done).
- Streams. The CUDA caching allocator hands a freed block to the next allocation on the
  stream it was allocated on, without waiting for other streams. Every entry therefore
  belongs to one stream (the stream is part of the key): made and used on that stream
  only, it can be evicted and freed at any time, as the reuse is ordered after its last
  use.
- CUDA graphs. A captured kernel reads the buffer at the same address on every replay,
  and a buffer first uploaded during capture is refilled by a copy recorded in the graph
  from its pinned source. So an entry used while the current stream is capturing becomes
  permanent: never evicted, never freed (it is small: a table or a few weights). During
  capture, an entry made on another stream (the warm-up iterations that torch asks for,
  usually on a side stream) is taken rather than uploaded again; ``torch.cuda.graph``
  synchronizes before capturing, so its upload is complete.

The C++ metadata cache (``csrc/bindings.cpp``, ``MetadataCache``) follows the same rules.
"""
from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Hashable, Optional

import torch
from torch import Tensor


def current_stream(device: torch.device) -> tuple[int, bool]:
    """(handle of the current stream of ``device``, whether it is capturing a CUDA graph).

    ``(0, False)`` off CUDA. The handle is what the native kernels launch on.
    """
    if device.type != "cuda":
        return 0, False
    return torch.cuda.current_stream(device).cuda_stream, torch.cuda.is_current_stream_capturing()


def upload(host: Tensor, device: torch.device) -> tuple[Tensor, Optional[Tensor]]:
    """``host`` (a CPU tensor) on ``device`` without a host synchronization.

    Returns the device tensor and the pinned host tensor it is being copied from, which
    the caller keeps alive with it (``None`` where nothing was copied). The copy is queued
    on the current stream of ``device``.
    """
    if device.type == "cpu":
        return host, None
    pinned = host.pin_memory()
    return pinned.to(device, non_blocking=True), pinned


class DeviceCache:
    """A thread-safe LRU map from a key to a value holding device buffers, per device and
    stream, with the capture rules of this module's docstring."""

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._permanent: dict = {}  # entries used by CUDA graphs
        self._lock = threading.Lock()

    def get(self, key: Hashable, device: torch.device, build: Callable[[], Any]) -> Any:
        """The value cached for ``key`` on the current stream of ``device``, else ``build()``
        (run on that stream; an exception leaves the cache unchanged)."""
        stream, capturing = current_stream(device)
        full_key = (key, device, stream)
        with self._lock:
            value = self._permanent.get(full_key)
            if value is not None:
                return value
            value = self._items.get(full_key)
            if value is not None:
                if capturing:
                    del self._items[full_key]
                    self._permanent[full_key] = value
                else:
                    self._items.move_to_end(full_key)
                return value
            if capturing:
                value = self._made_on_another_stream(key, device)
                if value is not None:
                    self._permanent[full_key] = value
                    return value
        value = build()
        with self._lock:
            if capturing:
                self._permanent[full_key] = value
            else:
                self._items[full_key] = value
                while len(self._items) > self._capacity:
                    self._items.popitem(last=False)
        return value

    def _made_on_another_stream(self, key: Hashable, device: torch.device) -> Any:
        for entries in (self._items, self._permanent):
            for (other_key, other_device, _), value in entries.items():
                if other_device == device and other_key == key:
                    return value
        return None

    def clear(self) -> None:
        """Forget the evictable entries (those used by CUDA graphs stay)."""
        with self._lock:
            self._items.clear()
