"""The contract every kernel backend implements.

A backend sees only validated input: a non-empty list of contiguous floating-point
tensors, all on one device, plus the accumulation dtype (float64 where any input is
float64, else float32). Everything user-facing (argument checks, coefficients,
autograd, non-contiguous inputs, ``None`` gradients) is handled once in
:mod:`regfuse.api`, :mod:`regfuse.groups` and :mod:`regfuse.ops`, so a new backend is
five functions and its entries in the registry (:mod:`regfuse.backends`).

The per-element maths of every op is ``a_i * sign(x) + b_i * x`` (gradients) or a sum
of ``|x|`` / ``x**2`` / ``|x|**p`` / ``x != 0``, or ``max |x|`` / ``min |x|``
(reductions); the per-tensor scalars ``a_i``, ``b_i`` are derived by
:func:`grad_scales`, which the compiled backends mirror. The norms whose gradient is not
of that form (``LP``, ``INF``, ``NEG_INF``, ``L0``) are differentiated with PyTorch ops
in :mod:`regfuse.ops`.

Entries: what ``i`` counts is an *entry* of the chunk table. By default the entries are
the tensors. With ``rows=True`` they are the rows of every tensor along dim 0 (the
groups of :mod:`regfuse.groups`; :func:`row_counts` says how many per tensor), which a
contiguous tensor stores one after another: per-entry results are then per-row norms, and
per-entry scales or factors a per-row gradient or shrink factor, with no other change to
a kernel.
"""
from __future__ import annotations

import enum
from typing import Optional, Protocol, Sequence

import torch
from torch import Tensor


class Reduction(enum.IntEnum):
    """What ``reduce`` returns; the integer values are shared with the C++/CUDA/Triton code."""

    L1 = 0  # per tensor: sum |x|
    L2 = 1  # per tensor: sqrt(sum x**2)
    SQ = 2  # per tensor: sum x**2
    INF = 3  # per tensor: max |x| (NaN if any NaN); 0 for an empty tensor
    PENALTY = 4  # scalar: sum_i weights[0, i] * sum|x_i| + weights[1, i] * sum x_i**2
    LP = 5  # per tensor: (sum |x|**p) ** (1 / p) for a finite p > 0 (p given apart)
    L0 = 6  # per tensor: the number of x != 0 (NaN counts)
    NEG_INF = 7  # per tensor: min |x| (NaN if any NaN); +inf for an empty tensor
    L1_L2 = 8  # per tensor, shape (2, n): row 0 sum|x|, row 1 sqrt(sum x**2), from one read


class DTypeCode(enum.IntEnum):
    """Element type codes stored in the multi-tensor metadata."""

    FLOAT32 = 0
    FLOAT64 = 1
    FLOAT16 = 2
    BFLOAT16 = 3


DTYPE_CODES = {
    torch.float32: DTypeCode.FLOAT32,
    torch.float64: DTypeCode.FLOAT64,
    torch.float16: DTypeCode.FLOAT16,
    torch.bfloat16: DTypeCode.BFLOAT16,
}


class Backend(Protocol):
    """What a backend module provides (see ``regfuse/backends/reference.py``)."""

    name: str

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """``None`` if the backend can run on ``device`` here, else why not."""

    def reduce(self, tensors: Sequence[Tensor], op: Reduction, weights: Optional[Tensor],
               acc_dtype: torch.dtype, p: float = 0.0, rows: bool = False) -> Tensor:
        """Per-entry reductions (shape ``(n,)``, ``(2, n)`` for ``L1_L2``) or, for
        ``PENALTY``, a 0-d tensor; ``n`` counts entries (tensors, or rows with ``rows``).

        ``weights`` is ``None`` except for ``PENALTY``, where it is a ``(2, n)`` tensor of
        ``acc_dtype`` on the tensors' device: row 0 multiplies ``sum|x_i|``, row 1
        multiplies ``sum x_i**2``. ``p`` is the order of ``LP`` (a finite ``p > 0``),
        ignored by the other ops. Result dtype is ``acc_dtype``. Partial sums are
        combined in a fixed order, so the same input gives bitwise the same result.
        """

    def backward(self, tensors: Sequence[Tensor], op: Reduction, grad_out: Tensor,
                 norms: Optional[Tensor], weights: Optional[Tensor], acc_dtype: torch.dtype,
                 accumulate_into: Optional[Sequence[Tensor]] = None,
                 rows: bool = False) -> Optional[list[Tensor]]:
        """Gradient of ``reduce(tensors, op, weights, rows=rows)`` scaled by ``grad_out``.

        Element ``x`` of entry ``i`` gets ``a_i * sign(x) + b_i * x`` with ``(a_i, b_i)``
        from :func:`grad_scales` (``op`` is never ``INF`` here; :func:`scale_table` builds
        them, and for ``PENALTY`` with ``grad_out=None`` ``weights`` are the table). With
        ``accumulate_into=None`` it returns new tensors shaped and typed like the inputs
        (views of one flat buffer per dtype); otherwise it adds the term in place to
        ``accumulate_into[i]`` (contiguous, same shape and dtype as ``tensors[i]``) and
        returns ``None``.
        """

    def prox_l1_(self, tensors: Sequence[Tensor], thresholds: Tensor) -> None:
        """In place ``x = sign(x) * max(|x| - thresholds[i], 0)``; NaN stays NaN.

        ``thresholds`` is a ``(n,)`` tensor of the accumulation dtype on the device.
        """

    def scale_(self, tensors: Sequence[Tensor], factors: Tensor, rows: bool = False) -> None:
        """In place ``x = x * factors[i]`` for entry ``i``, computed in the accumulation
        dtype and rounded once.

        ``factors`` is a ``(n,)`` tensor of the accumulation dtype on the device (one per
        row with ``rows``: block soft-thresholding). An entry whose factor is exactly 1
        may be left untouched (``x * 1`` is ``x``), which is what makes an unclipped
        ``clip_grad_norm_`` cost one read of the gradients.
        """

    # Optional: a backend without it gets the two-pass route of regfuse/groups.py
    # (reduce(L2, rows=True), then scale_(rows=True)), whose results it must equal.
    def block_shrink_(self, tensors: Sequence[Tensor], thresholds: Tensor,
                      l1_thresholds: Optional[Tensor] = None) -> None:
        """In place block soft-thresholding of the rows (``rows=True`` entries) in one pass:
        row ``i`` gets ``x = x * max(0, 1 - thresholds[i] / max(||row_i||_2, tiny))``,
        bit for bit as the two-pass route computes it. With ``l1_thresholds``, each row
        is first soft-thresholded by ``l1_thresholds[i]`` as ``prox_l1_`` does it (the
        sparse group lasso), and its norm is that of the result.

        ``thresholds`` and ``l1_thresholds`` are ``(rows,)`` tensors of the accumulation
        dtype on the device.
        """


def grad_scales(op: Reduction, grad_out: Tensor, norms: Optional[Tensor],
                weights: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-tensor ``(a, b)`` so that ``d(op)/dx * grad_out = a * sign(x) + b * x``.

    ``grad_out`` has shape ``(n,)`` for the per-tensor norms and is 0-d for ``PENALTY``;
    ``norms`` is the forward result (needed by ``L2`` only). The gradient of an L2 norm
    that is 0 is 0, as in ``torch.linalg.vector_norm``.
    """
    zero = torch.zeros((), dtype=grad_out.dtype, device=grad_out.device)
    if op == Reduction.L1:
        return grad_out, zero.expand_as(grad_out)
    if op == Reduction.SQ:
        return zero.expand_as(grad_out), 2 * grad_out
    if op == Reduction.L2:
        assert norms is not None
        # Divide by a safe denominator: where() alone would still let a double backward
        # through grad_out / 0 produce 0 * inf = NaN.
        is_zero = norms == 0
        return zero.expand_as(grad_out), torch.where(is_zero, zero, grad_out / torch.where(is_zero, 1, norms))
    if op == Reduction.PENALTY:
        assert weights is not None
        return grad_out * weights[0], 2 * grad_out * weights[1]
    if op == Reduction.L1_L2:  # grad_out and norms are (2, n): the L1 row, then the L2 row
        assert norms is not None
        _, b = grad_scales(Reduction.L2, grad_out[1], norms[1], None)
        return grad_out[0], b
    raise ValueError(f"no fused gradient for {op!r}")


def scale_table(op: Reduction, grad_out: Tensor, norms: Optional[Tensor], weights: Optional[Tensor],
                n: int, acc_dtype: torch.dtype) -> Tensor:
    """:func:`grad_scales` as one contiguous ``(2, n)`` tensor of ``acc_dtype``: row 0 is
    ``a``, row 1 is ``b``, the layout every kernel's backward reads. For ``PENALTY`` with
    ``grad_out=None`` (``add_penalty_grad_``) ``weights`` are that table already."""
    if op == Reduction.PENALTY and grad_out is None:
        return weights
    if op == Reduction.PENALTY and weights is not None:
        # grad_scales' (grad_out * w[0], 2 * grad_out * w[1]) in two small ops, not eight:
        # this table is built on every add_penalty_grad_ and penalty backward.
        table = (weights * grad_out).to(acc_dtype).contiguous()
        table[1].mul_(2)
        return table
    a, b = grad_scales(op, grad_out, norms, weights)
    return torch.stack((a.to(acc_dtype).expand(n), b.to(acc_dtype).expand(n)))


def row_counts(tensors: Sequence[Tensor]) -> list[int]:
    """Rows of each tensor along dim 0, the entries of a ``rows=True`` table: a 0-d
    tensor is one row, a 1-D tensor has one row per element (the C++ ``rows_of``)."""
    return [t.shape[0] if t.dim() else 1 for t in tensors]


def row_matrix(t: Tensor) -> Tensor:
    """``t`` as a ``(rows, row numel)`` matrix whose rows are its entries (a view where
    ``t`` is contiguous)."""
    rows = t.shape[0] if t.dim() else 1
    return t.reshape(rows, t.numel() // rows if rows else 0)
