"""Pure-PyTorch backend: the oracle the other backends are tested against, and the fallback.

Each tensor is reduced in ``acc_dtype`` one at a time, as a matrix whose rows are its
entries (one row holding the whole tensor, or with ``rows=True`` its slices along dim 0);
it is simple rather than fast. Every operation here is differentiable, which is what
double backward relies on.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .base import Reduction, row_matrix, scale_table

name = "reference"


def unavailable_reason(device: torch.device) -> Optional[str]:
    return None


def entries(tensors: Sequence[Tensor], rows: bool) -> list[Tensor]:
    """Each tensor as a matrix with one row per entry of the chunk table."""
    return [row_matrix(t) if rows else t.reshape(1, t.numel()) for t in tensors]


def _reduce_rows(x: Tensor, op: Reduction, p: float) -> Tensor:
    """``op`` of every row of the matrix ``x`` (accumulation dtype)."""
    if op == Reduction.L1:
        return x.abs().sum(1)
    if op == Reduction.SQ:
        return (x * x).sum(1)
    if op == Reduction.L2:
        # Not vector_norm: in float32 it is off by ~1e-5 relative on 300k elements.
        return (x * x).sum(1).sqrt()
    if op == Reduction.INF:
        # vector_norm(inf) refuses empty rows; the norm of nothing is 0 here.
        return torch.linalg.vector_norm(x, math.inf, dim=1) if x.shape[1] else x.new_zeros(len(x))
    if op == Reduction.NEG_INF:
        # min |x| of nothing is the identity of min, +inf (vector_norm refuses empty input).
        return x.abs().amin(1) if x.shape[1] else x.new_full((len(x),), math.inf)
    if op == Reduction.L0:
        return (x != 0).sum(1).to(x.dtype)
    if op == Reduction.LP:
        return x.abs().pow(p).sum(1).pow(1 / p)
    raise ValueError(f"unknown per-tensor reduction {op!r}")


def _per_entry(tensors: Sequence[Tensor], op: Reduction, acc_dtype: torch.dtype, p: float,
               rows: bool) -> Tensor:
    if op == Reduction.L1_L2:
        return torch.stack((_per_entry(tensors, Reduction.L1, acc_dtype, p, rows),
                            _per_entry(tensors, Reduction.L2, acc_dtype, p, rows)))
    return torch.cat([_reduce_rows(m.to(acc_dtype), op, p) for m in entries(tensors, rows)])


def reduce(tensors: Sequence[Tensor], op: Reduction, weights: Optional[Tensor],
           acc_dtype: torch.dtype, p: float = 0.0, rows: bool = False) -> Tensor:
    if op == Reduction.PENALTY:
        assert weights is not None
        l1_sum = _per_entry(tensors, Reduction.L1, acc_dtype, p, rows)
        sq_sum = _per_entry(tensors, Reduction.SQ, acc_dtype, p, rows)
        return (weights[0] * l1_sum + weights[1] * sq_sum).sum()
    return _per_entry(tensors, op, acc_dtype, p, rows)


def _per_entry_split(values: Tensor, matrices: Sequence[Tensor]) -> list[Tensor]:
    """A vector of one value per entry as one column ``(entries, 1)`` per tensor."""
    return [v.unsqueeze(1) for v in values.split([len(m) for m in matrices])]


def backward(tensors: Sequence[Tensor], op: Reduction, grad_out: Tensor,
             norms: Optional[Tensor], weights: Optional[Tensor], acc_dtype: torch.dtype,
             accumulate_into: Optional[Sequence[Tensor]] = None,
             rows: bool = False) -> Optional[list[Tensor]]:
    matrices = entries(tensors, rows)
    a, b = scale_table(op, grad_out, norms, weights, sum(len(m) for m in matrices), acc_dtype)
    terms = [(a_i * torch.sign(m.to(acc_dtype)) + b_i * m.to(acc_dtype)).reshape(t.shape)
             for a_i, b_i, m, t in zip(_per_entry_split(a, matrices), _per_entry_split(b, matrices),
                                       matrices, tensors)]
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


def scale_(tensors: Sequence[Tensor], factors: Tensor, rows: bool = False) -> None:
    matrices = entries(tensors, rows)
    for x, m, f in zip(tensors, matrices, _per_entry_split(factors, matrices)):
        x.copy_((m.to(factors.dtype) * f).reshape(x.shape))


def inf_norm_backward(tensors: Sequence[Tensor], norms: Tensor, grad_out: Tensor,
                      rows: bool = False) -> list[Tensor]:
    """Gradient of ``max|x|`` (or ``min|x|``) per entry as torch gives it: shared evenly by
    the elements that attain it."""
    matrices = entries(tensors, rows)
    grads = []
    for m, t, norm, g in zip(matrices, tensors, _per_entry_split(norms, matrices),
                             _per_entry_split(grad_out, matrices)):
        acc = m.to(norms.dtype)
        hits = (acc.abs() == norm).to(acc.dtype)
        share = g / hits.sum(1, keepdim=True).clamp_min(1)
        grads.append((torch.sign(acc) * hits * share).reshape(t.shape).to(t.dtype))
    return grads


def lp_norm_backward(tensors: Sequence[Tensor], norms: Tensor, grad_out: Tensor, p: float,
                     rows: bool = False) -> list[Tensor]:
    """Gradient of ``(sum|x|**p) ** (1/p)`` per entry: ``sign(x) * |x|**(p-1) *
    norm**(1-p) * grad_out``.

    0 where ``x`` is 0 and for a norm that is 0, as ``torch.linalg.vector_norm`` gives it.
    The masked values go through safe stand-ins (``|x| = 1``, ``norm = 1``), so that a
    double backward never meets ``0 * inf``.
    """
    is_zero = norms == 0
    scale = torch.where(is_zero, 0, grad_out / torch.where(is_zero, 1, norms).pow(p - 1))
    matrices = entries(tensors, rows)
    grads = []
    for m, t, s in zip(matrices, tensors, _per_entry_split(scale, matrices)):
        acc = m.to(norms.dtype)
        zero = acc == 0
        magnitude = torch.where(zero, 1, acc.abs())
        term = torch.where(zero, 0, torch.sign(acc) * magnitude.pow(p - 1))
        grads.append((term * s).reshape(t.shape).to(t.dtype))
    return grads
