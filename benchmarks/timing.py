"""Timing: interleaved, warmed-up measurements with median and interquartile range.

Providers of one (workload, operation) pair are timed in rounds, each round running
every provider once in a rotating order, so that drift (clock boost, other processes,
allocator state) spreads evenly over them instead of favouring whoever ran first.

* CUDA: ``triton.testing.do_bench`` per round (CUDA events, L2 flushed before every
  call); each sample is one call. The caller rotates between copies of small inputs
  so that no call finds its data in L2 either way.
* CPU: a warmed-up ``time.perf_counter`` loop; each sample is the mean of a block of
  calls long enough (``min_block_s``) for the clock's resolution not to matter.

The machine's bandwidth limits are measured the same way: a read limit (``flat.sum()``
over a large float32 tensor) and a read+write limit (a large ``copy_``).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class Timing:
    """Seconds per call: the median and the quartiles over every sample."""

    median: float
    q1: float
    q3: float
    samples: int
    first_call: float  # the first (cold) call, compilation included where there is one

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def _summary(samples: list[float], first_call: float) -> Timing:
    if len(samples) > 1:
        q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    else:
        q1 = median = q3 = samples[0]
    return Timing(median, q1, q3, len(samples), first_call)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _cpu_block(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _cuda_samples(fn: Callable[[], object], rep_ms: float) -> list[float]:
    from triton.testing import do_bench

    times_ms = do_bench(fn, warmup=max(1.0, rep_ms / 4), rep=rep_ms, return_mode="all")
    return [t / 1e3 for t in times_ms]


def measure(fns: dict[str, Callable[[], object]], device: torch.device, rounds: int,
            budget_s: float = float("inf"), min_rounds: int = 3, min_block_s: float = 0.02,
            cuda_rep_ms: float = 25.0,
            progress: Optional[Callable[[str], None]] = None) -> dict[str, Timing]:
    """Time every function of ``fns`` (same work, different providers), interleaved.

    Each function is called once cold (its time is ``Timing.first_call``; that is where
    ``torch.compile`` compiles) and once more to warm up and size the CPU blocks, then
    sampled in up to ``rounds`` rounds; after ``min_rounds`` rounds, no new round starts
    once ``budget_s`` seconds have passed, so that slow baselines cannot make a run long.
    """
    started = time.perf_counter()
    names = list(fns)
    first = {}
    for name in names:
        if progress:
            progress(name)
        first[name] = _timed_call(fns[name], device)
    calls = {name: max(1, round(min_block_s / max(_timed_call(fns[name], device), 1e-9)))
             for name in names}

    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        if r >= min_rounds and time.perf_counter() - started > budget_s:
            break
        for name in names[r % len(names):] + names[:r % len(names)]:
            if device.type == "cuda":
                samples[name] += _cuda_samples(fns[name], cuda_rep_ms)
            else:
                samples[name].append(_cpu_block(fns[name], calls[name]))
    return {name: _summary(samples[name], first[name]) for name in names}


@dataclass
class Limits:
    """The machine's measured memory bandwidth, bytes per second."""

    read: float  # flat.sum() over a large float32 tensor
    copy: float  # dst.copy_(src): bytes read + bytes written

    def for_op(self, writes: bool) -> float:
        return self.copy if writes else self.read

    def best(self, other: "Limits") -> "Limits":
        """The higher of two measurements of each limit: what the machine can reach."""
        return Limits(read=max(self.read, other.read), copy=max(self.copy, other.copy))


def measure_limits(device: torch.device, numel: int, rounds: int) -> Limits:
    """Read and copy bandwidth on ``numel``-element float32 tensors."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    timings = measure({"sum": lambda: src.sum(), "copy": lambda: dst.copy_(src)}, device, rounds)
    nbytes = src.numel() * src.element_size()
    return Limits(read=nbytes / timings["sum"].median, copy=2 * nbytes / timings["copy"].median)


def kernel_launches(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """GPU kernels (and memsets/copies) one call of ``fn`` runs; ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()  # not the first call: no compilation or autotuning inside the profile
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    return sum(1 for event in prof.events() if event.device_type == DeviceType.CUDA)
