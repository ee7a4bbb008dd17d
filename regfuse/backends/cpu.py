"""``cpu``: the C++ extension's CPU kernels (one parallel region over every chunk)."""
from __future__ import annotations

from typing import Optional

import torch

from .native import (IMPORT_ERROR, backward, block_shrink_, prox_l1_, reduce,  # noqa: F401  (the protocol)
                     scale_)

name = "cpu"


def unavailable_reason(device: torch.device) -> Optional[str]:
    if IMPORT_ERROR is not None:
        return IMPORT_ERROR
    if device.type != "cpu":
        return f"the cpu backend runs CPU tensors only, not {device.type}"
    return None
