"""DTensor lists (FSDP2, tensor parallelism) at the API boundary.

Every public function of :mod:`regfuse.api` carries one :func:`dtensor_aware` line. For a
list of plain tensors it costs one ``isinstance`` check and calls the function unchanged.
For a list of DTensors (all on one device mesh) it runs the unchanged function once on the
local shards, so each rank makes one fused launch over its shards, and returns what
torch's own DTensor rules (``torch/distributed/tensor/_ops/_math_ops.py``) give for the
same maths:

* **Reductions** (``norms``, ``penalty``, ...) return a DTensor. On a mesh dimension where
  an input is sharded the local results are partial: ``Partial("sum")`` for sums (the L1
  norm, the squared L2 norm, penalties), torch's norm-partial ``_NormPartial(p)`` for a
  p-norm (``p`` not 0 or 1; reduced as ``(sum x**p)**(1/p)``), ``Partial("max")`` for the
  max norm. On a dimension where it is replicated the result is replicated, so a
  replicated tensor is never counted twice. ``.full_tensor()`` is the single-process value,
  at the cost of one small all-reduce, paid only when asked for. A ``Partial`` *input* is
  first redistributed to ``Replicate`` (a norm of pending sums is not the sum of norms),
  as torch does for a non-linear reduction.
* **Gradients** reach the inputs with the inputs' placements: the local shards come from
  ``DTensor.to_local`` and the results go through ``DTensor.from_local``, both
  differentiable, so the fused kernel's backward runs on the local shards. The local
  backward of a norm only knows the local norm, so for a norm-partial or max-partial
  result the gradient of each local result is rescaled in the backward by what the global
  value says (``(n_local / n_global)**(p - 1)``; for the max, the share of the elements
  attaining the global maximum that lives on this rank), which costs one all-reduce of the
  result vector in the backward, as torch's own ``vector_norm`` backward does.
* **In-place ops** (``prox_l1_``, ``add_penalty_grad_``) update every local shard (a
  replicated one identically on every rank); no communication.

Inputs whose placements differ (tensor parallelism mixes ``Shard`` and ``Replicate``) are
reduced in one launch per placement group; the groups' results are then made replicated
(one all-reduce each) and combined, since one DTensor cannot carry two placements, which
is also what torch's rules do when such results are stacked or added.

A tensor subclass that is not a DTensor and whose data the kernels cannot read (any
subclass with ``__torch_dispatch__``, nested tensors) is refused with a ``TypeError``
naming its type (:func:`regfuse.validation.inspect_py`), before anything runs.

A new public function gets all of this with one line, e.g.::

    @dtensor_aware(reduce=lambda args: norm_combination(args["p"]))
    def total_norm(tensors, p=2.0, *, backend="auto"): ...

``torch.compile``: the custom ops only ever see the local shards, so they need no DTensor
sharding rule (``register_sharding``); dynamo traces ``to_local``, ``from_local`` and the
autograd functions below itself (``penalty`` and ``norms`` of a DTensor list compile with
``fullgraph=True``, same values and placements as in eager mode; checked by hand with 2
gloo ranks, not in the test suite, whose time budget a compile would exceed).
"""
from __future__ import annotations

import functools
import inspect as pyinspect
import math
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .validation import as_list, bump_versions

__all__ = ["dtensor_aware", "norm_combination", "SUM", "MAX", "MIN", "NormPartial", "dtensor_class",
           "is_dtensor", "replicated_value"]

# How the local results of a reduction combine across the ranks that hold the shards.
SUM = "sum"
MAX = "max"
MIN = "min"


@dataclass(frozen=True)
class NormPartial:
    """Local p-norms that combine as ``(sum_k n_k**p)**(1/p)`` (torch's ``_NormPartial``)."""
    p: float


Combination = Union[str, NormPartial]


def norm_combination(p: float, squared: bool = False) -> Combination:
    """How the per-shard values of a p-norm (or of its square) combine into the global one."""
    try:
        p = float(p)
    except (TypeError, ValueError):
        return SUM  # not a norm: the function's own check raises, naming the value
    if squared or p in (0.0, 1.0):  # sums: of squares, of |x|, of nonzeros
        return SUM
    if p == math.inf:
        return MAX
    if p == -math.inf:
        return MIN
    return NormPartial(p)


def dtensor_class() -> Optional[type]:
    """``DTensor``, or ``None`` while ``torch.distributed.tensor`` was never imported (then no
    DTensor can exist, and regfuse need not pay for importing it)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(t: object) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def replicated_value(t: Tensor) -> Tensor:
    """The single-process value of a result: ``t.full_tensor()`` for a DTensor, else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


# ---- the decorator ----------------------------------------------------------------------

def dtensor_aware(*, reduce: Union[Combination, Callable[[dict], Combination], None] = None,
                  per_tensor: Union[bool, str] = False, in_place: Optional[str] = None,
                  slices: Optional[Callable[[dict], int]] = None,
                  per_tensor_args: Sequence[str] = ("coefficients",),
                  global_checks: Optional[dict[str, Callable[[Tensor, dict], None]]] = None) -> Callable:
    """Makes a public function whose first argument is the tensor list accept DTensor lists.

    Exactly one of:

    * ``reduce``: the function is a reduction returning a tensor on the inputs' device;
      ``reduce`` says how local results combine across shards (:data:`SUM`, :data:`MAX`,
      :data:`MIN`, :class:`NormPartial`), or computes it from the function's arguments
      (a dict, defaults applied). ``per_tensor=True``: entry ``i`` of the 1-D result
      belongs to tensor ``i`` (``norms``); ``per_tensor="list"``: the function returns
      one 1-D tensor per input, one value per slice (needs ``slices``); else the result
      combines the whole list.
    * ``in_place="values"``: the function updates the tensors in place (``prox_l1_``);
      ``in_place="grads"``: it updates (or creates) their ``.grad`` (``add_penalty_grad_``).

    ``slices`` (for functions working on whole slices along a dimension, group norms and
    the group lasso) gives that dimension from the arguments. A tensor sharded along
    another dimension is redistributed there first (its slices are split over the ranks)
    by a reduction, and refused by an in-place op; a tensor sharded along it keeps its
    shards, and a per-slice result is then sharded the same way (``Shard(0)``).

    ``per_tensor_args`` name the arguments holding one value per tensor, which are split
    along with the list when it has several placement groups.

    ``global_checks`` maps a boolean argument of a reduction that asks for a check of the
    result (``error_if_nonfinite``) to the check, ``check(value, arguments)``: for DTensors
    the local call runs without it and the check sees the global value, so that every
    rank decides the same (a local NaN would otherwise raise on one rank only, and the
    others would wait for it in their next collective).
    """
    if (reduce is None) == (in_place is None) or in_place not in (None, "values", "grads") \
            or (per_tensor == "list" and slices is None):
        raise ValueError("dtensor_aware: give either reduce=... or in_place='values'/'grads'; "
                         "per_tensor='list' needs slices=...")

    def decorate(fn: Callable) -> Callable:
        signature = pyinspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(tensors, *args, **kwargs):
            cls = dtensor_class()
            if cls is None:  # the common case: no DTensor can exist in this process
                return fn(tensors, *args, **kwargs)
            if isinstance(tensors, Tensor):  # one tensor: the function takes it or says no
                items = [tensors]
            elif isinstance(tensors, (list, tuple)):  # not copied: 2,000 tensors would cost 10 us
                items = tensors
            else:
                items = tensors = as_list(tensors)
            # A list is all DTensors or none: a plain list with a DTensor further on is
            # refused by the plain path's checks, naming the element.
            if not items or not isinstance(items[0], cls):
                return fn(tensors, *args, **kwargs)
            bound = signature.bind(tensors if isinstance(tensors, Tensor) else list(items),
                                   *args, **kwargs)
            bound.apply_defaults()
            tensors = list(items)
            mesh = _check_list(tensors, cls)
            dim = slices(bound.arguments) if slices is not None else None
            if in_place is not None:
                if dim is not None:
                    _refuse_split_slices(tensors, dim)
                return _in_place(fn, bound, tensors, in_place == "grads")
            tensors = _replicate_partials(tensors)
            if dim is not None:
                tensors = _whole_slices(tensors, dim)
            if per_tensor == "list":
                return _per_slice_results(fn, bound, tensors)
            combination = reduce(bound.arguments) if callable(reduce) else reduce
            asked = [name for name in (global_checks or {}) if bound.arguments.get(name)]
            for name in asked:
                bound.arguments[name] = False
            result = _reduction(fn, signature, bound, tensors, mesh, combination, per_tensor,
                                per_tensor_args)
            if asked:
                value = replicated_value(result).detach()
                for name in asked:
                    bound.arguments[name] = True
                    global_checks[name](value, bound.arguments)
            return result

        return wrapper

    return decorate


def _check_list(tensors: list, cls: type):
    mesh = tensors[0].device_mesh
    for i, t in enumerate(tensors):
        if not isinstance(t, cls):
            raise TypeError(f"regfuse: tensor 0 is a DTensor but tensor {i} is a {type(t).__name__}; "
                            "a list must be all DTensors (on one device mesh) or all plain tensors")
        if t.device_mesh != mesh:
            raise ValueError(f"regfuse: DTensors on different device meshes (tensor 0 on {mesh}, "
                             f"tensor {i} on {t.device_mesh}); one mesh per list")
    return mesh


# ---- in-place ops: every local shard, no communication ----------------------------------

def _in_place(fn: Callable, bound, tensors: list, grads: bool) -> None:
    for i, t in enumerate(tensors):
        if any(p.is_partial() for p in t.placements):
            raise ValueError(f"regfuse: tensor {i} is a Partial DTensor {t.placements}; its local "
                             "values are pending sums, not values to update in place")
        if grads and t.grad is not None:
            if not is_dtensor(t.grad) or t.grad.device_mesh != t.device_mesh \
                    or tuple(t.grad.placements) != tuple(t.placements):
                where = (f"placements {tuple(t.grad.placements)}" if is_dtensor(t.grad)
                         else f"a {type(t.grad).__name__}")
                raise ValueError(f"regfuse: parameter {i} is a DTensor with placements "
                                 f"{tuple(t.placements)} but its gradient has {where}; "
                                 "redistribute the gradient to the parameter's placements first")
    with torch.no_grad():
        # Stand-ins sharing the local shard's memory and version counter; for "grads" each
        # carries the local shard of the gradient as its own .grad.
        local = [t._local_tensor.detach() for t in tensors]
    if grads:
        for stand_in, t in zip(local, tensors):
            if t.grad is not None:
                stand_in.grad = t.grad._local_tensor
    _call_on(fn, bound, local)
    changed = []
    for stand_in, t in zip(local, tensors):
        if not grads:
            changed.append(t)
        elif t.grad is None:  # the function created the gradient: give the DTensor its own
            t.grad = _wrap_like(stand_in.grad, t)
        else:
            changed.append(t.grad)
    bump_versions(changed)


def _unsharded(local: Tensor, mesh, placements) -> Tensor:
    """``local`` as a DTensor whose global shape is its own: ``placements`` replicate it or
    hold partial values of it, none shards it (no communication)."""
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=local.shape,
                              stride=local.stride())


def _wrap_like(local: Tensor, like) -> Tensor:
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


# ---- reductions ---------------------------------------------------------------------------

def _replicate_partials(tensors: list) -> list:
    """A ``Partial`` input holds pending sums: a norm needs its values (torch does the same)."""
    from torch.distributed.tensor import Replicate
    out = []
    for t in tensors:
        if any(p.is_partial() for p in t.placements):
            t = t.redistribute(t.device_mesh, [Replicate() if p.is_partial() else p for p in t.placements])
        out.append(t)
    return out


def _output_placements(placements: tuple, combination: Combination) -> tuple:
    """The result's placement on each mesh dimension: partial where the input is sharded."""
    from torch.distributed.tensor import Partial, Replicate
    if isinstance(combination, NormPartial):
        from torch.distributed.tensor._ops._math_ops import _NormPartial
        partial = _NormPartial(combination.p)
    else:
        partial = Partial(combination)
    return tuple(partial if p.is_shard() else Replicate() for p in placements)


def _local_shards(tensors: list) -> list:
    if torch.is_grad_enabled():
        return [t.to_local() for t in tensors]  # differentiable: gradients come back as DTensors
    return [t._local_tensor for t in tensors]


def _split_dims(t, dim: int) -> list[int]:
    """The mesh dimensions along which ``t`` is sharded across tensor dimension ``dim``'s slices."""
    if t.dim() == 0:
        return []
    dim = dim % t.dim() if -t.dim() <= dim < t.dim() else dim  # out of range: the function raises
    return [k for k, p in enumerate(t.placements) if p.is_shard() and p.dim != dim]


def _refuse_split_slices(tensors: list, dim: int) -> None:
    for i, t in enumerate(tensors):
        if _split_dims(t, dim):
            raise ValueError(f"regfuse: tensor {i} has placements {tuple(t.placements)}, so its slices "
                             f"along dim {dim} are split over the ranks; this in-place op works on "
                             f"whole slices: shard along dim {dim} (FSDP2 shards dim 0) or redistribute")


def _whole_slices(tensors: list, dim: int) -> list:
    """Redistributes the tensors whose slices along ``dim`` are split over the ranks."""
    from torch.distributed.tensor import Replicate
    out = []
    for t in tensors:
        split = _split_dims(t, dim)
        if split:
            t = t.redistribute(t.device_mesh, [Replicate() if k in split else p
                                               for k, p in enumerate(t.placements)])
        out.append(t)
    return out


def _per_slice_results(fn, bound, tensors: list) -> list:
    """One DTensor per input: sharded like the slices (``Shard(0)``), else replicated."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    results = _call_on(fn, bound, _local_shards(tensors))
    out = []
    for t, r in zip(tensors, results):
        sharded = [p for p in t.placements if p.is_shard()]  # only along the slices' dim now
        placements = [Shard(0) if p.is_shard() else Replicate() for p in t.placements]
        shape = torch.Size([t.shape[sharded[0].dim]]) if sharded else r.shape
        out.append(DTensor.from_local(r, t.device_mesh, placements, run_check=False, shape=shape,
                                      stride=(1,) * len(shape)))
    return out


def _reduction(fn, signature, bound, tensors, mesh, combination, per_tensor, per_tensor_args):
    # Grouped by the result's placements: Shard(0) and Shard(1) inputs both give partial
    # results and share a launch.
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(_output_placements(tuple(t.placements), combination), []).append(i)
    if len(groups) == 1:
        placements = next(iter(groups))
        return _reduce_group(fn, bound, tensors, mesh, placements, combination, per_tensor)
    bad = _unsplittable(bound, len(tensors), per_tensor_args)
    if bad is not None:
        # The function's own check says what is wrong with it, on the whole list.
        with torch.no_grad():
            _call_on(fn, bound, [t._local_tensor for t in tensors])
        raise ValueError(f"regfuse: {bad} must hold one value per tensor ({len(tensors)})")
    # One launch per placement group, each result made replicated (differentiably), then
    # combined as the reduction combines: one DTensor holds only one placement.
    from torch.distributed.tensor import Replicate
    parts, order = [], []
    for out_placements, indices in groups.items():
        sub = _subset(signature, bound, tensors, indices, per_tensor_args)
        part = _reduce_group(fn, sub, [tensors[i] for i in indices], mesh, out_placements,
                             combination, per_tensor)
        parts.append(part.full_tensor())
        order.extend(indices)
    if per_tensor:
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        value = torch.cat(parts)[inverse.to(parts[0].device)]
    else:
        value = _combine(torch.stack(parts), combination)
    return _unsharded(value, mesh, [Replicate()] * mesh.ndim)


def _combine(values: Tensor, combination: Combination) -> Tensor:
    if combination == SUM:
        return values.sum()
    if combination == MAX:
        return values.max()
    if combination == MIN:
        return values.min()
    return torch.linalg.vector_norm(values, combination.p)


def _unsplittable(bound, n: int, per_tensor_args) -> Optional[str]:
    """The first per-tensor argument that does not hold ``n`` values (iterables become lists)."""
    for name in per_tensor_args:
        value = bound.arguments.get(name)
        if value is None:
            continue
        if isinstance(value, Tensor):
            if value.dim() != 1 or value.numel() != n:
                return name
            continue
        try:
            bound.arguments[name] = value = list(value)
        except TypeError:
            return name
        if len(value) != n:
            return name
    return None


def _subset(signature, bound, tensors: list, indices: list[int], per_tensor_args) -> pyinspect.BoundArguments:
    arguments = dict(bound.arguments)
    first = next(iter(signature.parameters))
    arguments[first] = [tensors[i] for i in indices]
    for name in per_tensor_args:
        value = arguments.get(name)
        if value is not None:
            arguments[name] = (value[torch.tensor(indices, device=value.device)]
                               if isinstance(value, Tensor) else [value[i] for i in indices])
    return pyinspect.BoundArguments(signature, arguments)


def _call_on(fn, bound, local: list):
    """``fn`` with its bound arguments, the tensors replaced by ``local`` (by its one tensor
    where the caller passed one tensor, not a list)."""
    arguments = dict(bound.arguments)
    first = next(iter(bound.signature.parameters))
    arguments[first] = local[0] if isinstance(arguments[first], Tensor) else local
    call = pyinspect.BoundArguments(bound.signature, arguments)
    return fn(*call.args, **call.kwargs)


def _reduce_group(fn, bound, tensors: list, mesh, out_placements: tuple, combination, per_tensor: bool):
    local = _local_shards(tensors)
    result = _call_on(fn, bound, local)
    if combination == SUM or not any(p.is_partial() for p in out_placements):
        # Gradient of a sum of shards: every shard gets the upstream gradient as it is.
        return _unsharded(result, mesh, out_placements)
    if isinstance(combination, NormPartial):
        return _NormPartialResult.apply(result, mesh, out_placements, combination.p)
    return _ExtremumPartialResult.apply(result, mesh, out_placements, per_tensor, *local)


def _partial_sum_placements(placements: tuple) -> tuple:
    from torch.distributed.tensor import Partial
    return tuple(Partial("sum") if q.is_partial() else q for q in placements)


def _replicated_locally(t) -> Tensor:
    """The full value of a DTensor as this rank's plain tensor, for rank-local computations.

    Each rank uses it for its own shards, so its gradient is a partial sum over the ranks
    (``grad_placements``), which the backward all-reduces: what a double backward needs.
    """
    if not is_dtensor(t):
        return t
    from torch.distributed.tensor import Partial
    return t.full_tensor(grad_placements=[Partial("sum")] * t.device_mesh.ndim)


class _NormPartialResult(torch.autograd.Function):
    """Local p-norms ``n`` -> a ``_NormPartial(p)`` DTensor.

    The local kernel's backward computes ``d n / d x`` with the local norm; the global norm
    ``N = (sum_k n_k**p)**(1/p)`` has ``d N / d n_k = (n_k / N)**(p - 1)``, which the backward
    applies to the upstream gradient (0 where ``n_k`` is 0, as for a zero norm).
    """

    @staticmethod
    def forward(ctx, local: Tensor, mesh, placements: tuple, p: float):
        ctx.mesh, ctx.placements, ctx.p = mesh, placements, p
        ctx.save_for_backward(local)
        return _unsharded(local.detach(), mesh, placements)

    @staticmethod
    def backward(ctx, grad):
        local, = ctx.saved_tensors
        # N from sum-partials of n**p: differentiable as it is (torch's backward of a
        # _NormPartial redistribution passes the gradient through unscaled), which makes
        # this backward itself differentiable.
        powers = _unsharded(local.pow(ctx.p), ctx.mesh, _partial_sum_placements(ctx.placements))
        total = _replicated_locally(powers).pow(1 / ctx.p)
        zero = local == 0
        ratio = local / torch.where(zero, torch.ones_like(total), total)
        scale = torch.where(zero, torch.zeros_like(ratio), ratio.pow(ctx.p - 1))
        return _replicated_locally(grad).to(local.dtype) * scale, None, None, None


class _ExtremumPartialResult(torch.autograd.Function):
    """Local max (or min) norms ``m`` -> a ``Partial("max")`` (or ``"min"``) DTensor.

    Torch shares the gradient of the max norm evenly among the elements attaining it; the
    local backward shares it among the local ones, so each local result receives the
    upstream gradient times (local elements attaining the global value) / (all of them).
    That is exact for per-tensor norms; for a total norm (one value for the list), where
    torch shares first among the tied tensors and then among each one's elements, it
    differs only when several *different* tensors tie exactly for the maximum.
    """

    @staticmethod
    def forward(ctx, local: Tensor, mesh, placements: tuple, per_tensor: bool, *shards: Tensor):
        ctx.mesh, ctx.placements, ctx.per_tensor = mesh, placements, per_tensor
        ctx.save_for_backward(local, *shards)
        return _unsharded(local.detach(), mesh, placements)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        local, *shards = ctx.saved_tensors
        extremum = _unsharded(local, ctx.mesh, ctx.placements).full_tensor()
        if ctx.per_tensor:
            hits = torch.stack([(s.abs().to(local.dtype) == m).sum() for s, m in zip(shards, local)]) \
                if shards else local.new_zeros(0)
        else:
            hits = sum(((s.abs().to(local.dtype) == local).sum() for s in shards), local.new_zeros(()))
        hits = torch.where(local == extremum, hits.to(local.dtype), torch.zeros_like(local))
        total = _unsharded(hits, ctx.mesh, _partial_sum_placements(ctx.placements)).full_tensor()
        share = hits / total.clamp_min(1)
        return (_replicated_locally(grad).to(local.dtype) * share, None, None, None, *([None] * len(shards)))
