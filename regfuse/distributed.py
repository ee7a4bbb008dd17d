"""DTensor lists (FSDP2, tensor, expert and pipeline parallelism) at the API boundary.

Every public function of :mod:`regfuse.api` carries one :func:`dtensor_aware` line. While
``torch.distributed.tensor`` was never imported it costs one check; for a plain list, one
``isinstance`` of the first element (the function's own native checks refuse a DTensor
further on, and only then is the list looked at element by element). A list holding
DTensors, on any number of device meshes and with plain tensors mixed in (a plain tensor
is taken as replicated on every rank), runs the unchanged function once on all the local
shards, so each rank makes one fused launch, and returns:

* **A list on one mesh with one result placement**: what torch's own DTensor rules
  (``torch/distributed/tensor/_ops/_math_ops.py``) give for the same maths, with no
  communication. On a mesh dimension where an input is sharded (``Shard``,
  ``_StridedShard``, anything that says it shards) the local results are partial:
  ``Partial("sum")`` for sums (the L1 norm, the squared L2 norm, ``p=0``), torch's
  norm-partial ``_NormPartial(p)`` for a p-norm, ``Partial("max")`` (``"min"``) for
  ``±inf``. On a dimension where it is replicated the result is replicated. A ``Partial``
  *input* is first redistributed to ``Replicate``, as torch does for a non-linear
  reduction. A placement that is none of these raises ``NotImplementedError``.
* **Mixed placements on one mesh (tensor parallelism)**: a replicated DTensor; **several
  meshes, or plain tensors mixed in (expert parallelism, layers without a TP plan)**: a
  plain tensor holding the global value. Either way the per-tensor partial values of
  the one launch are folded into one vector per process group (``p``-th powers for a
  p-norm; a replicated shard counted on coordinate 0 of its replicated mesh dimensions
  only, with its gradient on every rank) and all-reduced once: one all-reduce per mesh,
  meshes spanning the same ranks sharing one.
* **Loss terms** (``penalty``, ``group_penalty``): always a plain tensor holding the
  global value, so that ``loss + penalty(model.parameters())`` joins a plain loss. The
  all-reduce's backward passes the gradient through: every rank adds the same term, so
  its share of the value has the same upstream gradient; no collective in the backward.
* **Per-slice results** (``group_norms``): one result per tensor, sharded like its
  slices, partial where the slices are split over the ranks (partial sums, reduced when
  asked for, never a gather of the tensor).
* **In-place ops** (``prox_l1_``, ``add_penalty_grad_``): every local shard and plain
  tensor updated; no communication. The in-place group ops (``prox_group_lasso_``)
  on slices split over the ranks all-reduce one partial sum of squares per slice, then
  update the local shards (``split=``).

Gradients reach the inputs with the inputs' placements (``to_local`` / ``from_local``
are differentiable). The local backward of a norm only knows the local norm; for a
norm-partial or max-partial DTensor result the gradient is rescaled in the backward by
what the global value says (one all-reduce of the result vector, as torch's own
``vector_norm`` backward); through the folded all-reduce of the other cases the chain
rule does it with no collective (a max norm's needs one, to share the gradient among the
ranks attaining it). ``pp_mesh`` (``stages=``): the global value is then reduced across
the pipeline stages (:func:`across_stages`).

A tensor subclass that is not a DTensor and whose data the kernels cannot read (any
subclass with ``__torch_dispatch__``, nested tensors) is refused with a ``TypeError``
naming its type (:func:`regfuse.validation.inspect_py`), before anything runs.

A new public function gets all of this with one line, e.g.::

    @dtensor_aware(reduce=lambda args: norm_combination(args["p"]), per_tensor=True)
    def norms(tensors, p=2.0, *, backend="auto"): ...

``torch.compile``: the custom ops only ever see the local shards, so they need no DTensor
sharding rule (``register_sharding``); dynamo traces ``to_local``, ``from_local`` and the
autograd functions below itself.
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
           "is_dtensor", "global_value"]

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


# ---- placements ---------------------------------------------------------------------------

def shard_dim(placement) -> Optional[int]:
    """The tensor dimension ``placement`` splits over its mesh dimension; ``None`` for one that
    replicates (``Replicate``) or holds pending values (``Partial`` and its subclasses).

    ``Shard`` and every placement whose class or ``is_shard()`` says it shards (torch's
    ``_StridedShard``, which FSDP2 composed with tensor parallelism gives, is not a ``Shard``
    subclass and answers ``is_shard() == False``) shard; anything else is refused, so that
    a new kind of placement is never mistaken for a replicated one.
    """
    if placement.is_replicate() or placement.is_partial():
        return None
    dim = getattr(placement, "dim", None)
    if isinstance(dim, int) and (placement.is_shard() or "Shard" in type(placement).__name__):
        return dim
    raise NotImplementedError(f"regfuse: placement {placement!r} ({type(placement).__qualname__}) is "
                              "none of Shard, _StridedShard, Replicate or Partial; regfuse cannot "
                              "tell how its local values combine")


def _sharding(t) -> list[Optional[int]]:
    return [shard_dim(p) for p in t.placements]


def _on_result_dim(placement, dim: int = 0):
    """The placement sharding a per-slice result (dim 0) as ``placement`` shards the slices."""
    from torch.distributed.tensor import Shard
    if isinstance(placement, Shard) or placement.is_shard():
        return Shard(dim)
    split_factor = getattr(placement, "split_factor", None)
    if split_factor is not None:  # _StridedShard: the same interleaving of the slices
        return type(placement)(dim, split_factor=split_factor)
    raise NotImplementedError(f"regfuse: cannot shard a per-slice result as {placement!r}")


# ---- the decorator ----------------------------------------------------------------------

Entries = Callable[[list, dict, list], Tensor]


def dtensor_aware(*, reduce: Union[Combination, Callable[[dict], Combination], None] = None,
                  per_tensor: Union[bool, str] = False, in_place: Optional[str] = None,
                  slices: Optional[Callable[[dict], int]] = None,
                  entries: Optional[Entries] = None,
                  finish: Optional[Callable[[Tensor, dict], Tensor]] = None,
                  loss_term: bool = False, stages: Optional[str] = None,
                  split: Optional[Callable[[list, dict, list], None]] = None,
                  global_checks: Optional[dict[str, Callable[[Tensor, dict], None]]] = None) -> Callable:
    """Makes a public function whose first argument is the tensor list accept DTensor lists,
    on any number of device meshes, with plain tensors mixed in.

    Exactly one of:

    * ``reduce``: the function is a reduction returning a tensor on the inputs' device;
      ``reduce`` says how local results combine across shards (:data:`SUM`, :data:`MAX`,
      :data:`MIN`, :class:`NormPartial`), or computes it from the function's arguments
      (a dict, defaults applied). ``per_tensor=True``: entry ``i`` of the 1-D result
      belongs to tensor ``i`` (``norms``); ``per_tensor="list"``: the function returns
      one 1-D tensor per input, one value per slice (needs ``slices``); else the result
      combines the whole list, and ``entries(local, arguments, dtensors)`` gives one
      value per tensor (its share of the result, combined as ``reduce`` says) from the
      local shards in one launch, and ``finish(global_values, arguments)`` the result
      from the global per-tensor values.
    * ``in_place="values"``: the function updates the tensors in place (``prox_l1_``);
      ``in_place="grads"``: it updates (or creates) their ``.grad`` (``add_penalty_grad_``).

    ``slices`` (for functions working on whole slices along a dimension, group norms and
    the group lasso) gives that dimension from the arguments. An in-place function on
    slices split over the ranks (sharded along another dimension) is refused, unless
    ``split(local, arguments, splits)`` does it: the local shards, the arguments and, per
    tensor, its :class:`SplitSlices` (``None`` where its slices are whole here).

    ``loss_term``: the result is always a plain tensor holding the global value (a loss
    term joins a plain loss). ``stages`` names an argument holding a pipeline group
    (``pp_mesh``): the local calls run without it and the global value is then reduced
    across it (:func:`across_stages`); the function itself does that for plain lists.

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
            if not items:
                return fn(tensors, *args, **kwargs)
            if not isinstance(items[0], cls):
                # A plain list: the function's own (native) checks refuse a DTensor further
                # on before anything runs; only then is the list looked at element by element.
                try:
                    return fn(tensors, *args, **kwargs)
                except TypeError:
                    if not any(isinstance(t, cls) for t in items):
                        raise
            bound = signature.bind(tensors if isinstance(tensors, Tensor) else list(items),
                                   *args, **kwargs)
            bound.apply_defaults()
            return _distributed(fn, bound, list(items), cls)

        def _distributed(fn, bound, tensors: list, cls: type):
            dtensors = [t if isinstance(t, cls) else None for t in tensors]
            meshes = _meshes(dtensors)
            dim = slices(bound.arguments) if slices is not None else None
            if in_place is not None:
                splits = split_slices(dtensors, [dim] * len(tensors)) if dim is not None else []
                if any(splits):
                    if split is None:
                        _refuse_split_slices(splits, dtensors, dim)
                    body = lambda local: split(local, bound.arguments, splits)  # noqa: E731
                else:
                    body = lambda local: _call_on(fn, bound, local)  # noqa: E731
                return _in_place(body, tensors, dtensors, in_place == "grads")
            tensors = _replicate_partials(tensors, dtensors)
            dtensors = [t if d is not None else None for t, d in zip(tensors, dtensors)]
            combination = reduce(bound.arguments) if callable(reduce) else reduce
            if per_tensor == "list":
                return _per_slice_results(fn, bound, tensors, dtensors, dim, combination)
            if dim is not None and entries is None:  # slices split over the ranks made whole
                dtensors = [d if d is None or not _split_dims(d, dim) else _whole_slices(d, dim)
                            for d in dtensors]
                tensors = [t if d is None else d for t, d in zip(tensors, dtensors)]
            pipeline = bound.arguments.get(stages) if stages else None
            if stages:
                bound.arguments[stages] = None
            asked = [name for name in (global_checks or {}) if bound.arguments.get(name)]
            for name in asked:
                bound.arguments[name] = False
            one_mesh = len(meshes) == 1 and all(d is not None for d in dtensors)
            groups = _placement_groups(dtensors, combination) if one_mesh else {}
            if one_mesh and len(groups) == 1 and not loss_term:
                result = _reduce_group(fn, bound, tensors, meshes[0], next(iter(groups)),
                                       combination, per_tensor)
                value = global_value(result) if (asked or pipeline is not None) else None
            else:
                make = (lambda local, arguments, _: _call_on(fn, bound, local)) \
                    if per_tensor else entries
                value = _global_reduction(make, bound, tensors, dtensors, meshes, combination)
                if not per_tensor:
                    value = finish(value, bound.arguments)
                result = value
                if one_mesh and not loss_term:  # torch's rules: a replicated DTensor
                    result = _unsharded(value, meshes[0], _replicated(meshes[0]))
            if pipeline is not None:
                result = value = across_stages(value, combination, pipeline)
            if asked:
                for name in asked:
                    bound.arguments[name] = True
                    global_checks[name](value.detach(), bound.arguments)
            return result

        return wrapper

    return decorate


def _meshes(dtensors: list) -> list:
    """The distinct device meshes of a list, in order of appearance."""
    meshes: list = []
    for d in dtensors:
        if d is not None and not any(d.device_mesh == m for m in meshes):
            meshes.append(d.device_mesh)
    return meshes


def _replicated(mesh) -> list:
    from torch.distributed.tensor import Replicate
    return [Replicate()] * mesh.ndim


def _placement_groups(dtensors: list, combination) -> dict:
    groups: dict[tuple, list[int]] = {}
    for i, d in enumerate(dtensors):
        groups.setdefault(_output_placements(tuple(d.placements), combination), []).append(i)
    return groups


# ---- one all-reduce per process group ---------------------------------------------------

_groups: dict = {}


def _process_groups(mesh, dims: Sequence[int]) -> tuple:
    """The process groups that together span ``dims`` of ``mesh``: one where it can be had
    (a single dimension, the world, or a flattened mesh), else one per dimension."""
    dims = tuple(sorted(dims))
    key = (mesh, dims)
    found = _groups.get(key)
    if found is not None:
        return found
    import torch.distributed as dist
    if len(dims) == 1:
        found = (mesh.get_group(dims[0]),)
    elif len(dims) == mesh.ndim and mesh.size() == dist.get_world_size():
        found = (dist.group.WORLD,)
    elif mesh.mesh_dim_names:
        names = tuple(mesh.mesh_dim_names[d] for d in dims)
        sub = mesh if len(dims) == mesh.ndim else mesh[names]
        found = (sub._flatten().get_group(),)
    else:
        found = tuple(mesh.get_group(d) for d in dims)
    _groups[key] = found
    return found


def _reduce_op(combination):
    import torch.distributed as dist
    return {MAX: dist.ReduceOp.MAX, MIN: dist.ReduceOp.MIN}.get(combination, dist.ReduceOp.SUM)


class _SumAcross(torch.autograd.Function):
    """All-reduce (sum) whose backward passes the gradient through: the result is a global
    value that every rank uses alike, so each rank's share of it gets the same upstream
    gradient (no collective in the backward; differentiable again)."""

    @staticmethod
    def forward(ctx, local: Tensor, groups: tuple):
        import torch.distributed as dist
        out = local.detach().clone()
        for group in groups:
            dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ExtremumAcross(torch.autograd.Function):
    """All-reduce (max or min) of per-tensor extrema; the gradient goes to the ranks whose
    value attains the global one, shared in proportion to their elements attaining it
    (``hits``), as torch shares a max norm's gradient (one all-reduce in the backward of
    ``counted``: the hits with those of a replicated copy counted on one rank only)."""

    @staticmethod
    def forward(ctx, local: Tensor, hits: Tensor, counted: Tensor, groups: tuple, op):
        import torch.distributed as dist
        out = local.detach().clone()
        for group in groups:
            dist.all_reduce(out, op=op, group=group)
        ctx.groups = groups
        ctx.save_for_backward(local, hits, counted, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        import torch.distributed as dist
        local, hits, counted, out = ctx.saved_tensors
        attained = local == out
        mine = torch.where(attained, hits.to(local.dtype), torch.zeros_like(local))
        total = torch.where(attained, counted.to(local.dtype), torch.zeros_like(local))
        for group in ctx.groups:
            dist.all_reduce(total, group=group)
        return grad * mine / total.clamp_min(1), None, None, None, None


def _safe_pow(x: Tensor, e: float) -> Tensor:
    """``x ** e`` for ``x >= 0`` (NaN stays NaN), 0 with gradient 0 at 0: no ``inf * 0`` in a backward."""
    return torch.where(x != 0, x.clamp_min(torch.finfo(x.dtype).tiny).pow(e), torch.zeros_like(x))


def counted_here(t, ignore: Sequence[int] = ()) -> bool:
    """Whether this rank counts a DTensor's local values in a sum over its whole mesh: on
    every mesh dimension that does not shard it (``ignore`` aside), only coordinate 0 does,
    so that a replicated shard is counted once."""
    mesh = t.device_mesh
    coordinate = mesh.get_coordinate()
    return all(coordinate[k] == 0 for k, d in enumerate(_sharding(t)) if d is None and k not in ignore)


def count_once(values: Tensor, counted: Sequence[bool]) -> Tensor:
    """``values`` with the entries not counted here zeroed in value but not in gradient
    (each rank's replicated copy gets the full gradient, as a replicated tensor does)."""
    if all(counted):
        return values
    keep = torch.tensor(counted, device=values.device)
    return torch.where(keep, values, values - values.detach())


def _identity(combination) -> float:
    return {MAX: -math.inf, MIN: math.inf}.get(combination, 0.0)


def _global_reduction(make: Entries, bound, tensors: list, dtensors: list, meshes: list,
                      combination) -> Tensor:
    """Per-tensor global values of a list spread over meshes and plain tensors: one launch
    over all local shards (``make``), one all-reduce per process group involved."""
    local = _local_shards(tensors, dtensors)
    values = make(local, dict(bound.arguments), dtensors)
    wide = values.to(torch.float64)
    if isinstance(combination, NormPartial):
        wide = _safe_pow(wide, combination.p)
    extremum = combination in (MAX, MIN)
    if extremum:
        hits = torch.stack([(s.detach().abs().to(wide.dtype) == v).sum() if s.numel() else s.new_zeros((), dtype=wide.dtype)
                            for s, v in zip(local, wide.detach())]) if torch.is_grad_enabled() and wide.requires_grad \
            else torch.zeros_like(wide)
    once_list = [d is None or counted_here(d) for d in dtensors]
    if extremum:
        once = torch.tensor(once_list, dtype=wide.dtype, device=wide.device)
    else:
        wide = count_once(wide, once_list)
    result = wide
    identity = _identity(combination)
    by_group: dict = {}
    for mesh in meshes:
        members = [d is not None and d.device_mesh == mesh for d in dtensors]
        groups = _process_groups(mesh, range(mesh.ndim))
        key = tuple(id(g) for g in groups)
        if key in by_group:
            by_group[key][1] = [a or b for a, b in zip(by_group[key][1], members)]
        else:
            by_group[key] = [groups, members]
    for groups, members in by_group.values():
        inside = torch.tensor(members, device=wide.device)
        part = torch.where(inside, wide, torch.full_like(wide, identity))
        if extremum:
            mine = torch.where(inside, hits, torch.zeros_like(hits))
            reduced = _ExtremumAcross.apply(part, mine, mine * once, groups, _reduce_op(combination))
        else:
            reduced = _SumAcross.apply(part, groups)
        result = torch.where(inside, reduced, result)
    if isinstance(combination, NormPartial):
        result = _safe_pow(result, 1 / combination.p)
    return result.to(values.dtype)


def across_stages(value: Tensor, combination, pp_mesh) -> Tensor:
    """``value`` (this stage's global reduction) combined over the pipeline stages: the sum of
    p-th powers for a p-norm, the max (min) for ``±inf``, the sum of counts for ``p=0``.

    ``pp_mesh`` is a 1-D ``DeviceMesh`` or a ``ProcessGroup`` whose ranks hold disjoint
    parameters; one all-reduce. The result is a plain tensor on every rank."""
    if is_dtensor(value):
        value = global_value(value)
    groups = (pp_mesh,) if not hasattr(pp_mesh, "get_group") else \
        _process_groups(pp_mesh, range(pp_mesh.ndim))
    if combination in (MAX, MIN):
        return _ExtremumAcross.apply(value, torch.ones_like(value), torch.ones_like(value), groups, _reduce_op(combination))
    if isinstance(combination, NormPartial):
        wide = _safe_pow(value.to(torch.float64), combination.p)
        return _safe_pow(_SumAcross.apply(wide, groups), 1 / combination.p).to(value.dtype)
    return _SumAcross.apply(value, groups)


def global_value(t: Tensor) -> Tensor:
    """The single-process value of a result as a plain tensor: a DTensor's pending values
    reduced with one all-reduce over its partial mesh dimensions (``full_tensor`` makes
    one per dimension); anything else as it is. Not differentiable through the reduction
    for max/min partials."""
    if not is_dtensor(t):
        return t
    dims = [k for k, p in enumerate(t.placements) if p.is_partial()]
    if any(shard_dim(p) is not None for p in t.placements) or not dims:
        return t.full_tensor()
    local = t.to_local() if torch.is_grad_enabled() else t._local_tensor
    kinds = {getattr(t.placements[k], "reduce_op", None) for k in dims}
    norm = {getattr(t.placements[k], "norm_type", None) for k in dims}
    groups = _process_groups(t.device_mesh, dims)
    if len(kinds) != 1:
        return t.full_tensor()
    kind = next(iter(kinds))
    if kind == "sum":
        p = next(iter(norm))
        if p is None or len(norm) != 1:
            return _SumAcross.apply(local, groups)
        return across_groups_norm(local, float(p), groups)
    if kind in ("max", "min"):
        return _ExtremumAcross.apply(local, torch.ones_like(local), torch.ones_like(local), groups, _reduce_op(kind))
    return t.full_tensor()


def across_groups_norm(local: Tensor, p: float, groups: tuple) -> Tensor:
    if p in (math.inf, -math.inf):
        return _ExtremumAcross.apply(local, torch.ones_like(local), torch.ones_like(local), groups, _reduce_op(MAX if p > 0 else MIN))
    wide = _safe_pow(local.to(torch.float64), p)
    return _safe_pow(_SumAcross.apply(wide, groups), 1 / p).to(local.dtype)


# ---- in-place ops: every local shard, no communication ----------------------------------

def _in_place(body: Callable[[list], None], tensors: list, dtensors: list, grads: bool) -> None:
    for i, t in enumerate(dtensors):
        if t is None:
            continue
        _sharding(t)  # an unknown placement is refused before anything runs
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
        # carries the local shard of the gradient as its own .grad. Plain tensors as they are.
        local = [t if d is None else d._local_tensor.detach() for t, d in zip(tensors, dtensors)]
    if grads:
        for stand_in, d in zip(local, dtensors):
            if d is not None and d.grad is not None:
                stand_in.grad = d.grad._local_tensor
    body(local)
    changed = []
    for stand_in, d in zip(local, dtensors):
        if d is None:
            continue
        if not grads:
            changed.append(d)
        elif d.grad is None:  # the function created the gradient: give the DTensor its own
            d.grad = _wrap_like(stand_in.grad, d)
        else:
            changed.append(d.grad)
    bump_versions(changed)


def _unsharded(local: Tensor, mesh, placements, shape=None) -> Tensor:
    """``local`` as a DTensor whose global shape is its own (``shape`` where given):
    ``placements`` replicate it or hold partial values of it (no communication)."""
    from torch.distributed.tensor import DTensor
    shape = local.shape if shape is None else torch.Size(shape)
    stride = local.stride() if shape == local.shape else tuple(torch.empty(shape, device="meta").stride())
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)


def _wrap_like(local: Tensor, like) -> Tensor:
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


# ---- reductions ---------------------------------------------------------------------------

def _replicate_partials(tensors: list, dtensors: list) -> list:
    """A ``Partial`` input holds pending sums: a norm needs its values (torch does the same)."""
    from torch.distributed.tensor import Replicate
    out = []
    for t, d in zip(tensors, dtensors):
        if d is not None:
            _sharding(d)  # an unknown placement is refused before anything runs
            if any(p.is_partial() for p in d.placements):
                t = d.redistribute(d.device_mesh, [Replicate() if p.is_partial() else p for p in d.placements])
        out.append(t)
    return out


def _partial(combination: Combination):
    from torch.distributed.tensor import Partial
    if isinstance(combination, NormPartial):
        from torch.distributed.tensor._ops._math_ops import _NormPartial
        return _NormPartial(combination.p)
    return Partial(combination)


def _output_placements(placements: tuple, combination: Combination) -> tuple:
    """The result's placement on each mesh dimension: partial where the input is sharded."""
    from torch.distributed.tensor import Replicate
    partial = _partial(combination)
    return tuple(partial if shard_dim(p) is not None else Replicate() for p in placements)


def _local_shards(tensors: list, dtensors: Optional[list] = None) -> list:
    dtensors = tensors if dtensors is None else dtensors
    grad = torch.is_grad_enabled()
    return [t if d is None else (d.to_local() if grad else d._local_tensor)  # differentiable
            for t, d in zip(tensors, dtensors)]


def _split_dims(t, dim: int) -> list[int]:
    """The mesh dimensions along which ``t`` is sharded across tensor dimension ``dim``'s slices."""
    if t.dim() == 0:
        return []
    dim = dim % t.dim() if -t.dim() <= dim < t.dim() else dim  # out of range: the function raises
    return [k for k, d in enumerate(_sharding(t)) if d is not None and d != dim]


@dataclass(frozen=True)
class SplitSlices:
    """How a DTensor's slices along a dimension are split over the ranks: ``groups``, the
    process groups spanning the ranks that hold parts of the same slices; ``first``, this
    rank is the first of them (it counts a slice's value once); ``shape``, the global
    shape (a slice's size is the whole slice's)."""
    groups: tuple
    first: bool
    shape: torch.Size


def split_slices(dtensors: list, dims: Sequence[int]) -> list[Optional[SplitSlices]]:
    """Per tensor, how its slices along ``dims[i]`` are split over the ranks; ``None`` for
    a plain tensor or one whose slices are whole on every rank."""
    out: list[Optional[SplitSlices]] = []
    for d, dim in zip(dtensors, dims):
        k = _split_dims(d, dim) if d is not None else []
        coordinate = d.device_mesh.get_coordinate() if k else None
        out.append(SplitSlices(_process_groups(d.device_mesh, k), all(coordinate[j] == 0 for j in k),
                               d.shape) if k else None)
    return out


def sum_split_slices(values: list[Tensor], splits: Sequence[Optional[SplitSlices]]) -> list[Tensor]:
    """Per tensor, its per-slice partial sums (``values[i]``) made global where its slices
    are split (``splits[i]``): one all-reduce per set of process groups, of all the
    tensors split over it together; differentiable (the gradient passes through)."""
    by_groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(splits):
        if s is not None:
            by_groups.setdefault(s.groups, []).append(i)
    values = list(values)
    for groups, members in by_groups.items():
        reduced = _SumAcross.apply(torch.cat([values[i] for i in members]), groups)
        for i, r in zip(members, reduced.split([values[i].numel() for i in members])):
            values[i] = r
    return values


def _refuse_split_slices(splits: list, dtensors: list, dim: int) -> None:
    for i, t in enumerate(dtensors):
        if splits[i] is not None:
            raise ValueError(f"regfuse: tensor {i} has placements {tuple(t.placements)}, so its slices "
                             f"along dim {dim} are split over the ranks; this in-place op works on "
                             f"whole slices: shard along dim {dim} (FSDP2 shards dim 0) or redistribute")


def _whole_slices(t, dim: int):
    """``t`` redistributed so that its slices along ``dim`` are whole on every rank."""
    from torch.distributed.tensor import Replicate
    split = _split_dims(t, dim)
    return t.redistribute(t.device_mesh, [Replicate() if k in split else p for k, p in enumerate(t.placements)])


def _per_slice_results(fn, bound, tensors: list, dtensors: list, dim: int, combination) -> list:
    """One result per input, from one launch over all local shards: a plain tensor for a
    plain input; for a DTensor, sharded like its slices where they are sharded, partial
    (``combination``) where they are split over the ranks (the partial sums are reduced
    when the value is asked for: an all-reduce of one number per slice, never a gather of
    the tensor), replicated elsewhere."""
    from torch.distributed.tensor import DTensor, Replicate
    if combination in (MAX, MIN) and torch.is_grad_enabled() and any(
            d is not None and d.requires_grad and _split_dims(d, dim) for d in dtensors):
        # The max-norm gradient needs each slice's elements: those slices are gathered.
        dtensors = [d if d is None or not _split_dims(d, dim) else _whole_slices(d, dim) for d in dtensors]
        tensors = [t if d is None else d for t, d in zip(tensors, dtensors)]
    results = _call_on(fn, bound, _local_shards(tensors, dtensors))
    out = []
    for d, r in zip(dtensors, results):
        if d is None:
            out.append(r)
            continue
        if d.dim() == 0:
            out.append(_unsharded(r, d.device_mesh, _replicated(d.device_mesh)))
            continue
        along = dim % d.dim()
        placements, partial = [], False
        for p, s in zip(d.placements, _sharding(d)):
            if s is None:
                placements.append(Replicate())
            elif s == along:
                placements.append(_on_result_dim(p))
            else:
                placements.append(_partial(combination))
                partial = True
        shape = (d.shape[along],)
        if partial and isinstance(combination, NormPartial):
            out.append(_NormPartialResult.apply(r, d.device_mesh, tuple(placements), combination.p, shape))
        else:
            out.append(DTensor.from_local(r, d.device_mesh, placements, run_check=False,
                                          shape=torch.Size(shape), stride=(1,)))
    return out


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
        return _NormPartialResult.apply(result, mesh, out_placements, combination.p, None)
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


def _local_of(full: Tensor, like) -> Tensor:
    """This rank's part of a full (replicated) value, sharded as ``like``'s placements say."""
    if full.dim() == 0 or not any(shard_dim(q) is not None for q in like.placements
                                  if not q.is_partial()):
        return full
    from torch.distributed.tensor import Replicate, distribute_tensor
    placements = [Replicate() if q.is_partial() else q for q in like.placements]
    return distribute_tensor(full, like.device_mesh, placements, src_data_rank=None).to_local()


class _NormPartialResult(torch.autograd.Function):
    """Local p-norms ``n`` -> a DTensor partial (``_NormPartial(p)``) where the inputs are split.

    The local kernel's backward computes ``d n / d x`` with the local norm; the global norm
    ``N = (sum_k n_k**p)**(1/p)`` has ``d N / d n_k = (n_k / N)**(p - 1)``, which the backward
    applies to the upstream gradient (0 where ``n_k`` is 0, as for a zero norm). ``shape``:
    the result's global shape where it is also sharded (per-slice norms), else ``None``.
    """

    @staticmethod
    def forward(ctx, local: Tensor, mesh, placements: tuple, p: float, shape):
        ctx.mesh, ctx.placements, ctx.p, ctx.shape = mesh, placements, p, shape
        ctx.save_for_backward(local)
        return _unsharded(local.detach(), mesh, placements, shape)

    @staticmethod
    def backward(ctx, grad):
        local, = ctx.saved_tensors
        # N from sum-partials of n**p: differentiable as it is (torch's backward of a
        # _NormPartial redistribution passes the gradient through unscaled), which makes
        # this backward itself differentiable.
        powers = _unsharded(local.pow(ctx.p), ctx.mesh, _partial_sum_placements(ctx.placements), ctx.shape)
        total = _replicated_locally(powers).pow(1 / ctx.p)
        upstream = _replicated_locally(grad).to(local.dtype)
        if ctx.shape is not None:  # sharded too: this rank's part of the full values
            total, upstream = _local_of(total, powers), _local_of(upstream, powers)
        zero = local == 0
        ratio = local / torch.where(zero, torch.ones_like(total), total)
        scale = torch.where(zero, torch.zeros_like(ratio), ratio.pow(ctx.p - 1))
        return upstream * scale, None, None, None, None


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


# ---- per-tensor shares of whole-list reductions -----------------------------------------

def penalty_entries(local: list, arguments: dict, dtensors: list) -> Tensor:
    """Per tensor, ``c_i * (l1 * ||t_i||_1 + l2 * ||t_i||_2**2)`` of its local shard, from one
    fused read (``L1_L2``): :func:`regfuse.penalty`'s value, one entry per tensor."""
    from . import backends, ops
    from .api import _builds_graph, _weights
    from .backends.base import Reduction
    from .validation import check_nonnegative, inspect
    l1 = check_nonnegative("l1", arguments["l1"])
    l2 = check_nonnegative("l2", arguments["l2"])
    backend = arguments["backend"]
    backends.check_backend_name(backend)
    info = inspect(local)
    weights = _weights((l1, l2), arguments["coefficients"], len(local), info)
    if _builds_graph(info):
        l1_l2 = ops.reduce_with_grad(local, Reduction.L1_L2, None, backend)
    else:
        l1_l2 = ops.run_reduce(local, Reduction.L1_L2, None, backend, info)
    return weights[0] * l1_l2[0] + weights[1] * l1_l2[1].square()


def total(values: Tensor, arguments: dict) -> Tensor:
    """The sum of the per-tensor values: the ``finish`` of a sum over the list."""
    return values.sum()
