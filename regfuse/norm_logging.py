"""Per-layer gradient and weight norms for logging, in one fused reduction.

:func:`grad_norms` is a drop-in for ``lightning.pytorch.utilities.grad_norm``: the same
dict (keys ``grad_{p}_norm/{name}`` and ``grad_{p}_norm_total``, the same values, dtypes
and devices), computed by one ``regfuse.norms`` launch over every gradient instead of
one ``norm`` per parameter, and one device-to-host copy for the total (Lightning's total
is a CPU tensor built from every per-parameter norm, one copy each). :func:`weight_norms`
is the same for the parameters themselves (keys ``weight_{p}_norm/{name}``), the
counterpart of the L2 columns of :func:`regfuse.sparsity_report` without its host copies.
"""
from __future__ import annotations

import functools
from typing import Iterable, Mapping, Union

import torch
from torch import Tensor, nn

from .api import norms
from .distributed import global_value
from .reporting import named_tensors

__all__ = ["grad_norms", "weight_norms"]

NamedParameters = Union[nn.Module, Mapping[str, Tensor], Iterable[tuple[str, Tensor]]]


def _norm_order(norm_type: "float | int | str") -> float:
    """``norm_type`` as Lightning reads it: ``float()`` of it, refused when not positive."""
    order = float(norm_type)
    if order <= 0:
        raise ValueError(f"`norm_type` must be a positive number or 'inf' (infinity norm). Got {order}")
    return order


def _device_norms(values: list[Tensor], order: float, promoted: torch.dtype,
                  backend: str) -> tuple[list[Tensor], Tensor]:
    """The norms of tensors on one device, as ``t.norm(order)`` gives them (0-d, each in
    its tensor's dtype), and the same values as one vector of the ``promoted`` dtype (for
    the total). One fused launch, then one cast per dtype other than the accumulation
    dtype; ``unbind`` makes the 0-d views without a launch per tensor. DTensors give
    their global norms."""
    vector = global_value(norms(values, p=order, backend=backend))
    dtypes = [t.dtype for t in values]
    rounded = vector.to(promoted)
    views: dict[torch.dtype, tuple[Tensor, ...]] = {}
    for dtype in dict.fromkeys(dtypes):
        cast = vector.to(dtype)
        views[dtype] = cast.unbind()
        if dtype != promoted:  # rounded to its own dtype first, as Lightning's total sees it
            mask = torch.tensor([d == dtype for d in dtypes], device=vector.device)
            rounded = torch.where(mask, cast.to(promoted), rounded)
    return [views[d][k] for k, d in enumerate(dtypes)], rounded


def _norm_dict(prefix: str, named: list[tuple[str, Tensor]], norm_type: "float | int | str",
               group_separator: str, backend: str) -> dict[str, Tensor]:
    order = _norm_order(norm_type)
    if not named:
        return {}
    # Not detached: no_grad keeps the graph out, and the same tensors as the last call let
    # the fused reduction reuse the device tables it built for this list.
    tensors = [t for _, t in named]
    # Lightning's total is the norm of the per-tensor norms as rounded to their dtypes, a
    # CPU tensor of their promoted dtype: the same here, with one host copy per device.
    promoted = functools.reduce(torch.promote_types, {t.dtype for t in tensors})
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    values: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    on_host = []
    with torch.no_grad():
        for indices in by_device.values():
            norms_here, rounded = _device_norms([tensors[i] for i in indices], order, promoted, backend)
            for i, v in zip(indices, norms_here):
                values[i] = v
            on_host.append(rounded.cpu())
        total = (on_host[0] if len(on_host) == 1 else torch.cat(on_host)).norm(order)
    result = {f"{prefix}_{order}_norm{group_separator}{name}": v for (name, _), v in zip(named, values)}
    result[f"{prefix}_{order}_norm_total"] = total
    return result


def grad_norms(module_or_named_parameters: NamedParameters, norm_type: "float | int | str" = 2.0,
               group_separator: str = "/", *, backend: str = "auto") -> dict[str, Tensor]:
    """Each parameter's gradient norm and their overall norm, for a logger, in one launch.

    A drop-in for ``lightning.pytorch.utilities.grad_norm(module, norm_type,
    group_separator)``, e.g. in ``LightningModule.on_before_optimizer_step``::

        self.log_dict(regfuse.grad_norms(self, norm_type=2))

    Args:
        module_or_named_parameters: a module (its ``named_parameters()``), a mapping
            name -> parameter, or an iterable of ``(name, parameter)`` pairs. Parameters
            whose ``.grad`` is ``None`` are left out, as Lightning leaves them out.
        norm_type: the order, ``float()`` of it (``2``, ``2.0``, ``'inf'``); it must be
            positive (else ``ValueError``, Lightning's message).
        group_separator: between ``grad_{p}_norm`` and the name, so that loggers group
            the norms in their own folder.
        backend: as for :func:`regfuse.norms` (keyword only; not in Lightning's signature).

    Returns:
        ``{f"grad_{p}_norm{sep}{name}": norm, ..., f"grad_{p}_norm_total": total}`` with
        ``p = float(norm_type)`` formatted by Python (``2.0``, ``inf``): each norm a 0-d
        tensor in its gradient's dtype on its gradient's device, the total a 0-d CPU
        tensor of their promoted dtype, the norm of the per-parameter norms; ``{}``
        when no parameter has a gradient. Same values as Lightning's up to the summation
        order (the fused reduction accumulates in float32, float64 for float64 lists).

    One ``regfuse.norms`` launch over all the gradients (per device, when a model spans
    several), a cast per low-precision dtype, and one device-to-host copy for the total.
    For DTensor gradients (FSDP2) the values are the global norms, as plain tensors, the
    same on every rank (one small all-reduce).
    """
    named = [(name, p.grad) for name, p in named_tensors(module_or_named_parameters, "grad_norms")
             if p.grad is not None]
    return _norm_dict("grad", named, norm_type, group_separator, backend)


def weight_norms(module_or_named_parameters: NamedParameters, norm_type: "float | int | str" = 2.0,
                 group_separator: str = "/", *, backend: str = "auto") -> dict[str, Tensor]:
    """:func:`grad_norms` for the parameters themselves: keys ``weight_{p}_norm{sep}{name}``
    and ``weight_{p}_norm_total``, every parameter included (a frozen one too), the same
    types, devices and single fused launch."""
    named = named_tensors(module_or_named_parameters, "weight_norms")
    return _norm_dict("weight", named, norm_type, group_separator, backend)
