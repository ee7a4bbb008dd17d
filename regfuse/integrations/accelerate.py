"""``accelerator.clip_grad_norm_`` with regfuse's fused clipping, for Accelerate users.

::

    from regfuse.integrations.accelerate import use_regfuse_clipping

    accelerator = use_regfuse_clipping(Accelerator(mixed_precision="fp16"))
    ...
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)  # now fused

What Accelerate does first is kept: the gradients are unscaled
(``accelerator.unscale_gradients()``, a no-op unless fp16 AMP with a gradient scaler)
and then clipped, by one fused ``regfuse.clip_grad_norm_`` instead of
``torch.nn.utils.clip_grad_norm_`` (or its per-mesh DTensor loop under FSDP2: regfuse
takes DTensor gradients as they are). Where Accelerate hands clipping to someone else,
its own method runs unchanged: DeepSpeed (which clips inside its engine), XLA (which
first all-reduces the gradients), FSDP1 (``FullyShardedDataParallel.clip_grad_norm_``),
and ``norm_type=0`` (Accelerate counts the tensors holding a nonzero gradient; regfuse's
0-norm counts elements).
"""
from __future__ import annotations

import types
from typing import Iterable, Optional

from torch import Tensor

import regfuse

from . import require

_accelerate = require("accelerate", "accelerate", "accelerate")
DistributedType = require("accelerate.utils", "accelerate", "accelerate").DistributedType

__all__ = ["clip_grad_norm_", "use_regfuse_clipping"]


def _uses_accelerates_own_clipping(accelerator, norm_type: float) -> bool:
    kind = accelerator.distributed_type
    return (float(norm_type) == 0 or kind in (DistributedType.DEEPSPEED, DistributedType.XLA)
            or (kind == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False)))


def clip_grad_norm_(accelerator, parameters: Iterable[Tensor], max_norm: float,
                    norm_type: float = 2.0) -> Optional[Tensor]:
    """``accelerator.clip_grad_norm_(parameters, max_norm, norm_type)``, fused.

    Same arguments and result as Accelerate's method (the total norm before clipping, a
    0-d tensor): the gradients are unscaled first, as Accelerate does, then clipped by
    :func:`regfuse.clip_grad_norm_`. Under DeepSpeed, XLA or FSDP1, and for
    ``norm_type=0``, Accelerate's own method runs (see the module docstring).
    """
    if _uses_accelerates_own_clipping(accelerator, norm_type):
        return type(accelerator).clip_grad_norm_(accelerator, parameters, max_norm, norm_type)
    accelerator.unscale_gradients()
    return regfuse.clip_grad_norm_(parameters, max_norm, norm_type)


def use_regfuse_clipping(accelerator):
    """Make ``accelerator.clip_grad_norm_`` the fused :func:`clip_grad_norm_` (on this
    instance only); returns the accelerator. ``transformers.Trainer`` calls that method
    to clip, so this also serves :mod:`regfuse.integrations.transformers`."""
    if not isinstance(accelerator, _accelerate.Accelerator):
        raise TypeError(f"regfuse: expected an accelerate.Accelerator, got {type(accelerator).__name__}")
    accelerator.clip_grad_norm_ = types.MethodType(clip_grad_norm_, accelerator)
    return accelerator
