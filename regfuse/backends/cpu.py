"""``cpu``: the C++ extension's CPU kernels (one parallel region over every chunk)."""
from __future__ import annotations

from typing import Optional

import torch

from .native import IMPORT_ERROR, backward, prox_l1_, reduce, scale_  # noqa: F401  (the protocol)

name = "cpu"


def unavailable_reason(device: torch.device) -> Optional[str]:
    if IMPORT_ERROR is not None:
        return IMPORT_ERROR
    if device.type != "cpu":
        return f"the cpu backend runs CPU tensors only, not {device.type}"
    return None
