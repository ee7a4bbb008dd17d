"""Pure-PyTorch backend: the oracle the other backends are tested against, and the fallback.

Each tensor is reduced in ``acc_dtype`` one at a time; it is simple rather than fast.
Every operation here is differentiable, which is what double backward relies on.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .base import Reduction, scale_table

name = "reference"


def unavailable_reason(device: torch.device) -> Optional[str]:
    return None


def _per_tensor(tensors: Sequence[Tensor], op: Reduction, acc_dtype: torch.dtype,
                p: float = 0.0) -> Tensor:
    flat = [t.reshape(-1).to(acc_dtype) for t in tensors]
    if op == Reduction.L1:
        return torch.stack([x.abs().sum() for x in flat])
    if op == Reduction.SQ:
        return torch.stack([(x * x).sum() for x in flat])
    if op == Reduction.L2:
        # Not vector_norm: in float32 it is off by ~1e-5 relative on 300k elements.
        return torch.stack([(x * x).sum().sqrt() for x in flat])
    if op == Reduction.INF:
        # vector_norm(inf) refuses empty inputs; the norm of nothing is 0 here.
        return torch.stack([
            torch.linalg.vector_norm(x, float("inf")) if x.numel() else x.new_zeros(())
            for x in flat
        ])
    if op == Reduction.NEG_INF:
        # min |x| of nothing is the identity of min, +inf (vector_norm refuses empty input).
        return torch.stack([x.abs().amin() if x.numel() else x.new_full((), math.inf) for x in flat])
    if op == Reduction.L0:
        return torch.stack([(x != 0).sum().to(acc_dtype) for x in flat])
    if op == Reduction.LP:
        return torch.stack([x.abs().pow(p).sum().pow(1 / p) for x in flat])
    raise ValueError(f"unknown per-tensor reduction {op!r}")


def reduce(tensors: Sequence[Tensor], op: Reduction, weights: Optional[Tensor],
           acc_dtype: torch.dtype, p: float = 0.0) -> Tensor:
    if op == Reduction.PENALTY:
        assert weights is not None
        l1_sum = _per_tensor(tensors, Reduction.L1, acc_dtype)
        sq_sum = _per_tensor(tensors, Reduction.SQ, acc_dtype)
        return (weights[0] * l1_sum + weights[1] * sq_sum).sum()
    return _per_tensor(tensors, op, acc_dtype, p)


def backward(tensors: Sequence[Tensor], op: Reduction, grad_out: Tensor,
             norms: Optional[Tensor], weights: Optional[Tensor], acc_dtype: torch.dtype,
             accumulate_into: Optional[Sequence[Tensor]] = None) -> Optional[list[Tensor]]:
    a, b = scale_table(op, grad_out, norms, weights, len(tensors), acc_dtype)
    terms = [a[i] * torch.sign(x.to(acc_dtype)) + b[i] * x.to(acc_dtype)
             for i, x in enumerate(tensors)]
    if accumulate_into is None:
        return [term.to(x.dtype) for term, x in zip(terms, tensors)]
    # Add in the accumulation dtype and round once, as the fused kernels do.
    for out, term in zip(accumulate_into, terms):
        out.copy_(out.to(acc_dtype) + term)
    return None


def prox_l1_(tensors: Sequence[Tensor], thresholds: Tensor) -> None:
    for i, x in enumerate(tensors):
        acc = x.to(thresholds.dtype)
        x.copy_(torch.sign(acc) * torch.clamp_min(acc.abs() - thresholds[i], 0))


def scale_(tensors: Sequence[Tensor], factors: Tensor) -> None:
    for i, x in enumerate(tensors):
        x.copy_(x.to(factors.dtype) * factors[i])


def inf_norm_backward(tensors: Sequence[Tensor], norms: Tensor, grad_out: Tensor) -> list[Tensor]:
    """Gradient of ``max|x|`` (or ``min|x|``) as torch gives it: shared evenly by the
    elements that attain it."""
    grads = []
    for i, x in enumerate(tensors):
        acc = x.to(norms.dtype)
        hits = (acc.abs() == norms[i]).to(acc.dtype)
        share = grad_out[i] / hits.sum().clamp_min(1)
        grads.append((torch.sign(acc) * hits * share).to(x.dtype))
    return grads


def lp_norm_backward(tensors: Sequence[Tensor], norms: Tensor, grad_out: Tensor, p: float) -> list[Tensor]:
    """Gradient of ``(sum|x|**p) ** (1/p)``: ``sign(x) * |x|**(p-1) * norm**(1-p) * grad_out``.

    0 where ``x`` is 0 and for a norm that is 0, as ``torch.linalg.vector_norm`` gives it.
    The masked values go through safe stand-ins (``|x| = 1``, ``norm = 1``), so that a
    double backward never meets ``0 * inf``.
    """
    is_zero = norms == 0
    scale = torch.where(is_zero, 0, grad_out / torch.where(is_zero, 1, norms).pow(p - 1))
    grads = []
    for i, x in enumerate(tensors):
        acc = x.to(norms.dtype)
        zero = acc == 0
        magnitude = torch.where(zero, 1, acc.abs())
        term = torch.where(zero, 0, torch.sign(acc) * magnitude.pow(p - 1))
        grads.append((term * scale[i]).to(x.dtype))
    return grads
