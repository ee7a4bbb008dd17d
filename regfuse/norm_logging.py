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
from .distributed import replicated_value
from .reporting import named_tensors

__all__ = ["grad_norms", "weight_norms"]

NamedParameters = Union[nn.Module, Mapping[str, Tensor], Iterable[tuple[str, Tensor]]]


def _norm_order(norm_type: "float | int | str") -> float:
    """``norm_type`` as Lightning reads it: ``float()`` of it, refused when not positive."""
    order = float(norm_type)
    if order <= 0:
        raise ValueError(f"`norm_type` must be a positive number or 'inf' (infinity norm). Got {order}")
    return order


def _per_tensor_norms(values: list[Tensor], order: float, backend: str) -> list[Tensor]:
    """0-d norms, each in its tensor's dtype on its tensor's device, as ``t.norm(order)``
    gives them: one fused launch per device (one in the usual case), then one cast per
    dtype other than the accumulation dtype. DTensors give their global norms."""
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(values):
        by_device.setdefault(t.device, []).append(i)
    out: list[Tensor] = [None] * len(values)  # type: ignore[list-item]
    for indices in by_device.values():
        vector = replicated_value(norms([values[i] for i in indices], p=order, backend=backend))
        cast = {vector.dtype: vector}
        for k, i in enumerate(indices):
            dtype = values[i].dtype
            if dtype not in cast:
                cast[dtype] = vector.to(dtype)
            out[i] = cast[dtype][k]
    return out


def _norm_dict(prefix: str, named: list[tuple[str, Tensor]], norm_type: "float | int | str",
               group_separator: str, backend: str) -> dict[str, Tensor]:
    order = _norm_order(norm_type)
    if not named:
        return {}
    with torch.no_grad():
        values = _per_tensor_norms([t.detach() for _, t in named], order, backend)
        result = {f"{prefix}_{order}_norm{group_separator}{name}": v
                  for (name, _), v in zip(named, values)}
        # Lightning's total: the norm of the per-tensor norms (as rounded to their dtypes),
        # as a CPU tensor of their promoted dtype. One copy to the host per device.
        dtype = functools.reduce(torch.promote_types, (v.dtype for v in values))
        by_device: dict[torch.device, list[Tensor]] = {}
        for v in values:
            by_device.setdefault(v.device, []).append(v)
        host = torch.cat([torch.stack(vs).to(dtype).cpu() for vs in by_device.values()])
        result[f"{prefix}_{order}_norm_total"] = host.norm(order)
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
