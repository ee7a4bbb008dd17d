"""Structured sparsity: group norms, the (sparse) group lasso and its proximal step.

A *group* of a tensor ``w`` is one of its slices along ``dim``, ``w.select(dim, j)``:
for a convolution weight ``(out, in, kh, kw)`` and ``dim=0``, one output filter; for a
``Linear`` weight ``(out, in)``, one output neuron (``dim=1``: one input feature). A 0-d
tensor is one group of one element and a 1-D tensor has one group per element (its
slices along its only dimension); an empty tensor of size 0 along ``dim`` has no group,
one of size ``r > 0`` along ``dim`` but 0 elsewhere has ``r`` empty groups of norm 0.

How it is fused: the groups along dim 0 of a contiguous tensor are its rows, stored one
after another, so the chunk table that every kernel reads is built over the rows of the
tensors instead of the tensors themselves (``rows=True``, see
:mod:`regfuse.backends.base`). The per-entry reductions are then the group norms in one
launch over the whole list, the fused backward ``a * sign(x) + b * x`` with per-row
scales is the group penalty's gradient, and the in-place scaling kernel with one factor
per row (each group's shrink factor) is block soft-thresholding.
Groups along another ``dim`` go through a contiguous ``movedim(dim, 0)`` copy (written
back by the in-place op): one extra pass over those tensors.

DTensors (FSDP2, tensor parallelism): every function runs on the local shards
(:mod:`regfuse.distributed`). FSDP2 shards dim 0, so each rank holds whole groups along
dim 0: the norms are then sharded like the groups, the penalty is the global value (a
plain tensor), and the proximal step updates the local groups with no communication.
Groups split over the ranks (a ``dim`` along which a tensor is not sharded) give partial
norms (reduced when asked for) and, in the penalty and the in-place ops, one all-reduce
of one partial sum of squares per group, never a gather of the tensors.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import backends, ops
from .api import (Coefficients, TensorList, _builds_graph, _coefficients,
                  _grads_to_update, _in_place_target, _norm_reduction, _weights)
from .backends.base import Reduction, row_counts
from .device_cache import DeviceCache, upload
from .distributed import (SUM, SplitSlices, count_once, dtensor_aware, norm_combination,
                          split_slices, sum_split_slices, total)
from .validation import ListInfo, as_list, bump_versions, check_nonnegative, inspect

__all__ = ["group_norms", "group_penalty", "prox_group_lasso_"]


def _group_dims(tensors: Sequence[Tensor], dim: int) -> list[int]:
    """``dim`` made non-negative for each tensor; refuses a ``dim`` a tensor does not have.

    As in torch's dimension wrapping, a 0-d tensor takes ``dim`` 0 or -1.
    """
    try:
        dim = operator.index(dim)
    except TypeError:
        raise TypeError(f"regfuse: dim must be an integer, got {type(dim).__name__}") from None
    dims = []
    for i, t in enumerate(tensors):
        ndim = max(t.dim(), 1)
        if not -ndim <= dim < ndim:
            raise IndexError(f"regfuse: dim {dim} is out of range for tensor {i} of shape "
                             f"{tuple(t.shape)} (expected -{ndim} <= dim < {ndim})")
        dims.append(dim % ndim)
    return dims


def _as_rows(tensors: Sequence[Tensor], dims: Sequence[int]) -> list[Tensor]:
    """Each tensor with its groups as rows: itself along dim 0 (made contiguous later, if
    needed, like every input), else a contiguous ``movedim(dim, 0)`` copy."""
    return [t if d == 0 else t.movedim(d, 0).contiguous() for t, d in zip(tensors, dims)]


def _row_layout(shapes: tuple, device: torch.device, dtype: torch.dtype) -> tuple:
    """Per tensor of these shapes: its number of groups (dim 0) and ``sqrt(group size)``
    as one float64 ``(2, n)`` tensor on ``device`` (counts are exact in it),
    with its pinned source, and the number of groups in all; never an inference tensor."""
    counts = [shape[0] if shape else 1 for shape in shapes]
    sizes = [math.sqrt(math.prod(shape) // c) if c else 0.0 for shape, c in zip(shapes, counts)]
    with torch.inference_mode(False):
        table, pinned = upload(torch.tensor([counts, sizes], dtype=torch.float64), device)
    return table, pinned, sum(counts)


# Group layouts per list shape, device and stream: a training loop neither builds nor
# copies them again (see device_cache.py for why reuse across streams is safe).
_layout_cache = DeviceCache(64)


def _per_group(per_tensor: Tensor, groups: Sequence[Tensor], scale_by_size: Sequence[bool]) -> Tensor:
    """``(k, n)`` per-tensor values as ``(k, groups)`` per-group ones; the rows flagged in
    ``scale_by_size`` multiplied by ``sqrt(group size)``."""
    shapes = tuple(tuple(g.shape) for g in groups)
    device = per_tensor.device
    if torch.compiler.is_compiling():  # traced into the graph: no cache
        table, _, total = _row_layout(shapes, device, per_tensor.dtype)
    else:
        build = lambda: _row_layout(shapes, device, per_tensor.dtype)  # noqa: E731
        table, _, total = _layout_cache.get(shapes, device, build)
    counts, sizes = table[0].long(), table[1].to(per_tensor.dtype)
    scaled = torch.stack([row * sizes if scale else row for row, scale in zip(per_tensor, scale_by_size)])
    return scaled.repeat_interleave(counts, dim=1, output_size=total)


def _reduce_rows(groups: list[Tensor], op: Reduction, backend: str, info: ListInfo,
                 p: float = 0.0) -> Tensor:
    """Per-group reductions of ``groups`` (their rows), differentiable where a derivative
    is recorded (reverse or forward mode)."""
    if _builds_graph(info):
        return ops.reduce_with_grad(groups, op, None, backend, p, rows=True)
    return ops.run_reduce(groups, op, None, backend, info, p=p, rows=True)


@dtensor_aware(reduce=lambda args: norm_combination(args["p"]), per_tensor="list",
               slices=lambda args: args["dim"])
def group_norms(tensors: TensorList, *, dim: int = 0, p: float = 2,
                backend: str = "auto") -> list[Tensor]:
    """For each tensor, the norms of its groups (slices along ``dim``) in one fused pass.

    ``group_norms([w], dim=0)[0][j]`` is ``torch.linalg.vector_norm(w.select(0, j), p)``:
    for a convolution weight, one norm per output filter. See :mod:`regfuse.groups` for
    what a group of a 0-d, 1-D or empty tensor is.

    Args:
        tensors: tensors on one device (any mix of float32/float16/bfloat16/float64; 0-d,
            empty and non-contiguous tensors included).
        dim: the dimension the groups are taken along (slices ``w.select(dim, j)``),
            valid for every tensor (0 or -1 for a 0-d tensor). Groups along dim 0 are
            read in place; another ``dim`` costs a contiguous ``movedim`` copy.
        p: the order, as for :func:`regfuse.norms` (1, 2 and ``inf`` have fast paths).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        A list with, per tensor, a 1-D tensor of its ``w.shape[dim]`` group norms
        (float32, float64 where any input is float64), all views of one buffer;
        differentiable twice, and in forward mode. The norm of an empty group is 0 (+inf
        for ``p=-inf``, as :func:`regfuse.norms`).
    """
    tensors = as_list(tensors)
    op, order = _norm_reduction(p)
    backends.check_backend_name(backend)
    dims = _group_dims(tensors, dim)
    if not tensors:
        return []
    info = inspect(tensors)
    groups = _as_rows(tensors, dims)
    return list(_reduce_rows(groups, op, backend, info, order).split(row_counts(groups)))


def _group_penalty_entries(local: list[Tensor], arguments: dict, dtensors: list) -> Tensor:
    """Per tensor, its share of :func:`group_penalty` from the local shards, in one launch.

    Where a tensor's groups are split over the ranks (sharded along another dimension than
    ``dim``), the groups' partial sums of squares are all-reduced over the splitting mesh
    dimensions (one all-reduce of one number per group, not a gather), the group term is
    then counted on one rank of them (its gradient reaches every rank) and the L1 term
    stays a partial sum; ``sqrt(group size)`` is that of the whole group.
    """
    weight = check_nonnegative("weight", arguments["weight"])
    l1 = check_nonnegative("l1", arguments["l1"])
    backend = arguments["backend"]
    backends.check_backend_name(backend)
    dims = _group_dims(local, arguments["dim"])
    info = inspect(local)
    per_tensor = _weights((weight, l1), arguments["coefficients"], len(local), info)
    groups = _as_rows(local, dims)
    counts = row_counts(groups)
    splits = split_slices(dtensors, dims)
    group_weight, group_l1 = _per_group(per_tensor, groups, (False, False))
    if arguments["scale_by_size"]:
        group_weight = group_weight * _whole_group_sizes(groups, dims, splits, group_weight)
    if l1 == 0:
        l1_norms, l2_norms = None, _reduce_rows(groups, Reduction.L2, backend, info)
    else:
        l1_norms, l2_norms = _reduce_rows(groups, Reduction.L1_L2, backend, info)
    norms = _global_group_norms(l2_norms, counts, splits)
    group_terms = torch.stack([g.sum() for g in (group_weight * norms).split(counts)])
    terms = count_once(group_terms, [s is None or s.first for s in splits])
    if l1_norms is not None:
        terms = terms + torch.stack([g.sum() for g in (group_l1 * l1_norms).split(counts)])
    return terms


def _whole_group_sizes(groups: list[Tensor], dims: Sequence[int], splits: Sequence[Optional[SplitSlices]],
                      like: Tensor) -> Tensor:
    """``sqrt(group size)`` per group (as ``like``), of the whole groups where they are
    split over the ranks (the local rows are parts of them)."""
    sizes = []
    for g, k, split in zip(groups, dims, splits):
        shape, at = (tuple(g.shape), 0) if split is None else (tuple(split.shape), k)
        sizes.append(math.sqrt(math.prod(shape) // shape[at]) if shape and shape[at] else 1.0)
    counts = torch.tensor(row_counts(groups)).to(like.device)
    return torch.tensor(sizes, dtype=like.dtype).to(like.device).repeat_interleave(counts)


def _global_group_norms(l2_norms: Tensor, counts: Sequence[int],
                        splits: Sequence[Optional[SplitSlices]]) -> Tensor:
    """The groups' 2-norms from the local rows' ones: where a tensor's groups are split
    over the ranks, the sums of squares all-reduced (one number per group); the others as
    they are. Differentiable, 0 (with gradient 0) for an all-zero group."""
    if not any(splits):
        return l2_norms
    whole = torch.cat(sum_split_slices(list(l2_norms.square().split(list(counts))), splits))
    return torch.where(whole != 0, whole.clamp_min(torch.finfo(whole.dtype).tiny).sqrt(), torch.zeros_like(whole))


@dtensor_aware(reduce=SUM, slices=lambda args: args["dim"], entries=_group_penalty_entries,
               finish=total, loss_term=True)
def group_penalty(tensors: TensorList, weight: float, *, dim: int = 0, l1: float = 0.0,
                  scale_by_size: bool = True, coefficients: Coefficients = None,
                  backend: str = "auto") -> Tensor:
    """The (sparse) group lasso ``sum_i c_i * (weight * sum_g s_g * ||w_i[g]||_2 + l1 * ||w_i||_1)``.

    ``w_i[g]`` runs over the groups of tensor ``i`` (slices along ``dim``, as in
    :func:`group_norms`), ``s_g = sqrt(group size)`` (Yuan & Lin's weighting, so that
    large and small groups are penalized alike) or 1 with ``scale_by_size=False``.
    ``l1 > 0`` adds the element-wise L1 term: the sparse group lasso. Both terms come from
    one read of every element.

    Gradient: ``c_i * (weight * s_g * w_g / ||w_g||_2 + l1 * sign(w))``, in one fused
    backward; a group that is entirely zero gets the subgradient 0 from the group term
    (as ``torch.linalg.vector_norm`` gives 0 at 0). Differentiable twice.

    Args:
        tensors: as for :func:`group_norms`.
        weight: the non-negative group lasso strength.
        dim: the dimension the groups are taken along (see :func:`group_norms`).
        l1: the non-negative element-wise L1 strength.
        scale_by_size: multiply each group's norm by the square root of its size.
        coefficients: an optional per-tensor sequence or 1-D tensor ``c`` of non-negative
            numbers (default all 1); constants, not differentiated.
        backend: as for :func:`group_norms`.

    Returns:
        A 0-d tensor, float32 (float64 where any input is float64); 0 for an empty list.
    """
    tensors = as_list(tensors)
    weight = check_nonnegative("weight", weight)
    l1 = check_nonnegative("l1", l1)
    backends.check_backend_name(backend)
    dims = _group_dims(tensors, dim)
    if not tensors:
        _coefficients(coefficients, 0)
        return torch.zeros((), dtype=torch.float32)
    info = inspect(tensors)
    per_tensor = _weights((weight, l1), coefficients, len(tensors), info)
    groups = _as_rows(tensors, dims)
    group_weight, group_l1 = _per_group(per_tensor, groups, (scale_by_size, False))
    if l1 == 0:  # the group term alone: one norm per group
        return (group_weight * _reduce_rows(groups, Reduction.L2, backend, info)).sum()
    l1_norms, l2_norms = _reduce_rows(groups, Reduction.L1_L2, backend, info)
    return (group_weight * l2_norms).sum() + (group_l1 * l1_norms).sum()


def _write_back(originals: Sequence[Tensor], work: Sequence[Tensor], dims: Sequence[int]) -> None:
    """Copies the row-major stand-ins an in-place kernel updated back into the originals."""
    for original, updated, d in zip(originals, work, dims):
        if updated is not original:
            original.copy_(updated.movedim(0, d))


def _shrink_factors(norms: Tensor, thresholds: Tensor) -> Tensor:
    """``max(0, 1 - t_g / ||w_g||)`` per group, NaN where the norm is NaN (a group holding a
    NaN becomes NaN, as the formula says). Written in place into ``thresholds``, and
    consumes ``norms``: each operation on a vector of one number per group is a launch on a
    GPU (and a parallel region on a CPU).

    The norm is clamped to the smallest normal number first: an all-zero group gets
    ``1 - t / tiny``, clamped to 0 for any ``t >= tiny``, and 1 for ``t = 0`` (its zeros
    stay zeros either way) where the formula would divide 0 by 0.
    """
    return thresholds.div_(norms.clamp_min_(torch.finfo(norms.dtype).tiny)).neg_().add_(1).clamp_min_(0)


def _on_split_groups(core: Callable) -> Callable[[list, dict, list], None]:
    """``dtensor_aware``'s ``split=`` for an in-place group op: ``core`` (the op's body,
    with ``splits=``) on the local shards."""
    def run(local: list, arguments: dict, splits: list) -> None:
        rest = dict(arguments)
        rest.pop(next(iter(arguments)))  # the tensor list, replaced by the local shards
        core(local, **rest, splits=splits)
    return run


def _shrink_groups_(params: list, threshold: float, dim: int, l1_threshold: float, scale_by_size: bool,
                    coefficients: Coefficients, backend: str,
                    splits: Optional[Sequence[Optional[SplitSlices]]] = None) -> None:
    """:func:`prox_group_lasso_`'s body; ``splits`` says which tensors' groups are split
    over the ranks (their norms are then all-reduced before the shrink)."""
    threshold = check_nonnegative("threshold", threshold)
    l1_threshold = check_nonnegative("l1_threshold", l1_threshold)
    params = as_list(params)
    dims = _group_dims(params, dim)
    params, info = _in_place_target(params, backend, "prox_group_lasso_")
    if info is None:
        return
    per_tensor = _weights((threshold, l1_threshold), coefficients, len(params), info)
    compiling = torch.compiler.is_compiling()
    split = splits is not None and any(splits)
    with torch.no_grad():
        work = [g.contiguous() for g in _as_rows(params, dims)]
        work_info = info._replace(contiguous=True)
        one_pass = None if compiling or split else \
            getattr(backends.resolve(backend, info.device), "block_shrink_", None)
        if one_pass is not None:
            thresholds, l1_thresholds = _per_group(per_tensor, work, (scale_by_size, False))
            one_pass(work, thresholds, l1_thresholds if l1_threshold > 0 else None)
        else:
            if l1_threshold > 0:
                if compiling:
                    ops.prox_l1_(work, per_tensor[1], backend)
                else:
                    ops.run_prox_l1_(work, per_tensor[1], backend, work_info)
            thresholds = _group_weights(per_tensor[0], work, dims, scale_by_size, splits)
            if compiling:
                norms = ops.reduce(work, int(Reduction.L2), None, backend, 0.0, True)
            else:
                norms = ops.run_reduce(work, Reduction.L2, None, backend, work_info, rows=True)
            if split:
                norms = _global_group_norms(norms, row_counts(work), splits)
            if compiling:
                ops.scale_(work, _shrink_factors(norms, thresholds), backend, True)
            else:
                ops.run_scale_(work, _shrink_factors(norms, thresholds), backend, work_info, rows=True)
        _write_back(params, work, dims)
    if not compiling:
        bump_versions(params)


def _group_weights(per_tensor: Tensor, groups: list[Tensor], dims: Sequence[int], scale_by_size: bool,
                   splits: Optional[Sequence[Optional[SplitSlices]]]) -> Tensor:
    """Per group, its tensor's value (``per_tensor``, ``(n,)``), times ``sqrt(group size)``
    with ``scale_by_size`` (of the whole group where it is split over the ranks)."""
    if splits is None or not any(splits) or not scale_by_size:
        return _per_group(per_tensor[None], groups, (scale_by_size,))[0]
    return _per_group(per_tensor[None], groups, (False,))[0] * _whole_group_sizes(groups, dims, splits, per_tensor)


@dtensor_aware(in_place="values", slices=lambda args: args["dim"], split=_on_split_groups(_shrink_groups_))
def prox_group_lasso_(params: TensorList, threshold: float, *, dim: int = 0,
                      l1_threshold: float = 0.0, scale_by_size: bool = True,
                      coefficients: Coefficients = None, backend: str = "auto") -> None:
    """In place block soft-thresholding: ``w_g <- w_g * max(0, 1 - c_i * threshold * s_g / ||w_g||_2)``.

    The proximal step of :func:`group_penalty`: every group (slice along ``dim``) whose
    norm is at most ``c_i * threshold * s_g`` becomes exactly zero, the others shrink
    towards zero. With ``l1_threshold > 0`` the element-wise soft-threshold
    ``sign(w) * max(|w| - c_i * l1_threshold, 0)`` (:func:`regfuse.prox_l1_`) runs
    first and the group step then uses the norms of its result: together the exact
    proximal step of the sparse group lasso. Call it after ``optimizer.step()`` with
    ``threshold = lr * weight`` and ``l1_threshold = lr * l1`` (or let
    :class:`regfuse.ProximalStep` do it).

    ``s_g`` and ``dim`` are as in :func:`group_penalty`. A group holding a NaN becomes
    NaN (its norm is NaN); an all-zero group stays zero. Everything is checked before
    anything is modified; groups along a ``dim`` other than 0 are updated in a contiguous
    copy that is written back. On the ``cpu`` backend each group is scaled right after
    its norm, while it is still in cache (after its soft-threshold, for ``l1_threshold``):
    one read and one write of memory; elsewhere one launch reads the groups for their
    norms and one reads and writes them to scale them (after a launch that
    soft-thresholds them, for ``l1_threshold``).
    """
    _shrink_groups_(params, threshold, dim, l1_threshold, scale_by_size, coefficients, backend)


def _add_group_grads_(params: list, weight: float, dim: int, scale_by_size: bool, backend: str,
                      splits: Optional[Sequence[Optional[SplitSlices]]] = None) -> None:
    """:func:`add_group_penalty_grad_`'s body; ``splits`` as for :func:`_shrink_groups_`."""
    weight = check_nonnegative("weight", weight)
    params = as_list(params)
    dims = _group_dims(params, dim)
    params, info = _in_place_target(params, backend, "add_group_penalty_grad_")
    if info is None:
        return
    per_tensor = _weights((weight,), None, len(params), info)
    grads = _grads_to_update(params, "add_group_penalty_grad_")
    with torch.no_grad():
        work = [g.contiguous() for g in _as_rows(params, dims)]
        work_grads = [g.contiguous() for g in _as_rows(grads, dims)]
        work_info = info._replace(contiguous=True)
        norms = ops.run_reduce(work, Reduction.L2, None, backend, work_info, rows=True)
        if splits is not None and any(splits):
            norms = _global_group_norms(norms, row_counts(work), splits)
        group_weight = _group_weights(per_tensor[0], work, dims, scale_by_size, splits)
        impl = backends.resolve(backend, info.device)
        impl.backward(work, Reduction.L2, group_weight, norms, None, info.acc_dtype,
                      accumulate_into=work_grads, rows=True)
        _write_back(grads, work_grads, dims)
    bump_versions(grads)


@dtensor_aware(in_place="grads", slices=lambda args: args["dim"], split=_on_split_groups(_add_group_grads_))
def add_group_penalty_grad_(params: TensorList, weight: float, *, dim: int = 0,
                            scale_by_size: bool = True, backend: str = "auto") -> None:
    """In place ``p.grad += weight * s_g * w_g / ||w_g||_2`` (0 for an all-zero group).

    The gradient :func:`group_penalty` (with ``l1=0``) would add in ``backward()``, as
    one fused pass after it; a ``p.grad`` that is ``None`` becomes the term itself.
    ``WeightRegularizer`` uses it for its ``add_grad_()`` and ``attach()`` routes.
    """
    _add_group_grads_(params, weight, dim, scale_by_size, backend)
