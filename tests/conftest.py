"""Fixtures shared by every test: the device and the backend under test.

Every op test takes the ``backend`` fixture, so a new backend is tested by adding it to
the registry (``regfuse.backends.NAMES``); backends that cannot run here are skipped
with the registry's reason.
"""
import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported; without a GPU the triton
# backend can only run on CPU tensors through its interpreter. Likewise the cuda backend
# runs CPU tensors through its kernels compiled for the CPU (csrc/cuda/simt_cpu.h).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("REGFUSE_CUDA_EMULATE", "1")

from typing import Callable, Sequence  # noqa: E402

import pytest  # noqa: E402

from cases import group_limit, size_limit  # noqa: E402
from regfuse import backends  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(params=backends.NAMES)
def backend(request, device) -> str:
    """Each registered backend that can run on ``device`` here; the others are skipped."""
    reason = backends.unavailable_reason(request.param, device)
    if reason is not None:
        pytest.skip(f"backend {request.param!r} unavailable on {device.type}: {reason}")
    return request.param


@pytest.fixture
def skip_if_too_big(backend, device) -> Callable[[Sequence[torch.Tensor]], None]:
    """A callable that skips the test when a tensor list exceeds the backend's size cap."""
    limit = size_limit(backend, device)

    def check(tensors: Sequence[torch.Tensor]) -> None:
        if limit is None:
            return
        numel = sum(t.numel() for t in tensors)
        if numel > limit.numel or len(tensors) > limit.tensors:
            pytest.skip(f"list too big for {backend} on {device.type} "
                        f"(cap: {limit.tensors} tensors, {limit.numel} elements)")

    return check


@pytest.fixture
def skip_if_too_many_groups(backend, device, skip_if_too_big) -> Callable[[Sequence[torch.Tensor], int], None]:
    """Like ``skip_if_too_big``, also counting the groups along ``dim`` of a group op: the
    Triton interpreter runs one Python program per group (a 1-D tensor has one group per
    element), the CUDA emulation one block."""
    limit = group_limit(backend, device)

    def check(tensors: Sequence[torch.Tensor], dim: int = 0) -> None:
        skip_if_too_big(tensors)
        if limit is not None:
            groups = sum(t.shape[dim] if t.dim() else 1 for t in tensors)
            if groups > limit:
                pytest.skip(f"{groups} groups are too many for {backend} on {device.type} (cap: {limit})")

    return check
