"""Per-tensor sparsity and norms for logging: did the regularization act?

:func:`sparsity_report` answers it with numbers for a model's parameters (after an L1
penalty, ``prox_l1_`` or a group lasso) or for captured activations (after an activity
penalty): the fraction of exact zeros, of all-zero groups along dim 0 (pruned filters or
neurons), and the L1 and L2 norms of every named tensor.
"""
from __future__ import annotations

from typing import Iterable, Mapping, NamedTuple, Union

import torch
from torch import Tensor, nn

from .api import norms
from .backends.base import row_counts
from .distributed import SUM, dtensor_aware, global_value
from .groups import group_norms

__all__ = ["TensorStats", "SparsityReport", "sparsity_report"]

NamedTensors = Union[nn.Module, Mapping[str, Tensor], Iterable[tuple[str, Tensor]]]


class TensorStats(NamedTuple):
    """One row of a :class:`SparsityReport`."""
    name: str
    numel: int
    zeros: int  # elements exactly equal to 0
    l1: float
    l2: float
    groups: int = 0  # groups along dim 0 (rows; one per element of a 1-D tensor, 1 for 0-d)
    zero_groups: int = 0  # groups whose elements are all exactly 0

    @property
    def sparsity(self) -> float:
        """Fraction of exact zeros (0 for an empty tensor)."""
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def group_sparsity(self) -> float:
        """Fraction of all-zero groups along dim 0: for a weight, the filters or neurons
        that can be removed (0 for a tensor without groups)."""
        return self.zero_groups / self.groups if self.groups else 0.0

    @property
    def mean_abs(self) -> float:
        """Mean absolute value, ``l1 / numel`` (0 for an empty tensor)."""
        return self.l1 / self.numel if self.numel else 0.0


class SparsityReport(NamedTuple):
    """The rows of :func:`sparsity_report`, with totals and log-friendly views."""
    rows: list[TensorStats]

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.rows)

    @property
    def zeros(self) -> int:
        return sum(r.zeros for r in self.rows)

    @property
    def sparsity(self) -> float:
        """Fraction of exact zeros over all the tensors."""
        return self.zeros / self.numel if self.numel else 0.0

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{f"{prefix}sparsity/{name}": ..., f"{prefix}l1/{name}": ..., ...}``
        for TensorBoard, W&B or any logger taking scalars."""
        out: dict[str, float] = {}
        for r in self.rows:
            out[f"{prefix}sparsity/{r.name}"] = r.sparsity
            out[f"{prefix}zero_groups/{r.name}"] = r.group_sparsity
            out[f"{prefix}l1/{r.name}"] = r.l1
            out[f"{prefix}l2/{r.name}"] = r.l2
        out[f"{prefix}sparsity/total"] = self.sparsity
        return out

    def __str__(self) -> str:
        width = max([len("total")] + [len(r.name) for r in self.rows])
        lines = [f"{'tensor':<{width}} {'numel':>9} {'zeros':>7} {'zero groups':>15} {'L1':>11} "
                 f"{'L2':>9} {'mean|x|':>9}"]
        for r in self.rows:
            groups = f"{r.zero_groups}/{r.groups}"
            lines.append(f"{r.name:<{width}} {r.numel:>9} {r.sparsity:>7.2%} {groups:>15} "
                         f"{r.l1:>11.4g} {r.l2:>9.4g} {r.mean_abs:>9.3g}")
        lines.append(f"{'total':<{width}} {self.numel:>9} {self.sparsity:>7.2%}")
        return "\n".join(lines)


def named_tensors(tensors: NamedTensors, caller: str = "sparsity_report") -> list[tuple[str, Tensor]]:
    """The ``(name, tensor)`` pairs of a module, a mapping or an iterable of pairs."""
    if isinstance(tensors, nn.Module):
        return list(tensors.named_parameters())
    if isinstance(tensors, Mapping):
        return list(tensors.items())
    named = list(tensors)
    for item in named:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor)):
            raise TypeError(f"regfuse: {caller} takes a module, a mapping name -> tensor "
                            "or an iterable of (name, tensor) pairs")
    return named


@dtensor_aware(reduce=SUM, per_tensor=True)
def _nonzeros(tensors: list[Tensor]) -> Tensor:
    """Per-tensor count of nonzero elements (of the local shards, for DTensors)."""
    return torch.stack([torch.count_nonzero(t) for t in tensors])


@dtensor_aware(reduce=SUM, per_tensor=True, slices=lambda args: 0)
def _zero_groups(tensors: list[Tensor], backend: str = "auto") -> Tensor:
    """Per-tensor count of all-zero groups along dim 0 (of the local shards' whole groups,
    for DTensors). The max-abs norm is exact: a group is all zero iff it is 0."""
    return torch.stack([torch.count_nonzero(g == 0)
                        for g in group_norms(tensors, p=float("inf"), backend=backend)])


@torch.no_grad()
def sparsity_report(tensors: NamedTensors, *, backend: str = "auto") -> SparsityReport:
    """Fraction of exact zeros, all-zero groups along dim 0, and L1/L2 norms of every
    named tensor.

    Args:
        tensors: a module (all of its ``named_parameters()``), a mapping name -> tensor,
            or an iterable of ``(name, tensor)`` pairs such as
            ``(kv for kv in model.named_parameters() if kv[1].dim() > 1)``. Captured
            activations work as well as parameters, and so do DTensors (FSDP2): the
            numbers are then those of the whole tensors, the same on every rank.
        backend: for the norms, as for ``regfuse.norms``.

    Returns:
        A :class:`SparsityReport`: ``rows`` of :class:`TensorStats`, printable as a
        table, ``as_dict()`` for loggers.

    The L1 and L2 norms are two fused ``regfuse.norms`` launches over the whole list and
    the group norms (max-abs, exact: a group is all zero exactly when it is 0) one fused
    ``regfuse.group_norms`` launch; a group is a slice along dim 0 (an output filter or
    neuron; an element of a 1-D tensor). The zeros are counted with one
    ``count_nonzero`` per tensor, stacked and read back in the same single host
    synchronization: there is no fused multi-tensor count in torch, and a
    ``torch.cat`` of the list would copy every element first, more memory traffic than
    the counts themselves. A report is for logging every few hundred steps, not a
    per-step cost.
    """
    named = named_tensors(tensors)
    if not named:
        return SparsityReport([])
    values = [t.detach() for _, t in named]
    # For DTensors (FSDP2) each is a partial result over the local shards: global_value
    # reduces it (one small all-reduce each), so every rank reports the global numbers.
    l1 = global_value(norms(values, p=1, backend=backend))
    l2 = global_value(norms(values, p=2, backend=backend))
    nonzeros = global_value(_nonzeros(values))
    zero_groups = global_value(_zero_groups(values, backend=backend))
    # float64 holds counts exactly up to 2**53: one copy to the host for everything.
    l1, l2, nonzeros, zero_groups = torch.stack(
        [l1.double(), l2.double(), nonzeros.double(), zero_groups.double()]).tolist()
    return SparsityReport([
        TensorStats(name, t.numel(), t.numel() - int(nz), a, b, groups, int(zg))
        for (name, t), nz, a, b, zg, groups in zip(named, nonzeros, l1, l2, zero_groups,
                                                    row_counts(values))])
