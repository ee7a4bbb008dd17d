"""``cuda``: the C++/CUDA extension's kernels, on the current CUDA stream."""
from __future__ import annotations

from typing import Optional

import torch

from .native import IMPORT_ERROR, _C, backward, prox_l1_, reduce, scale_  # noqa: F401  (the protocol)

name = "cuda"


def unavailable_reason(device: torch.device) -> Optional[str]:
    if IMPORT_ERROR is not None:
        return IMPORT_ERROR
    if not _C.built_with_cuda():
        return ("the extension was built without CUDA kernels (the torch it was built against "
                "has no CUDA; rebuild with a CUDA torch or REGFUSE_FORCE_CUDA=1)")
    if device.type != "cuda":
        return f"the cuda backend runs CUDA tensors only, not {device.type}"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None
