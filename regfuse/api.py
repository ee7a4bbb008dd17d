"""The public functional API (see README.md): fused norms, penalties and in-place updates.

Every function checks all of its input before any kernel runs (nothing is modified when
it raises), then hands one list to one backend call.
"""
from __future__ import annotations

import math
import types
import warnings
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from . import backends, ops
from .backends.base import Reduction
from .device_cache import DeviceCache, upload
from .distributed import (SUM, across_stages, dtensor_aware, global_value, norm_combination,
                          penalty_entries, total)
from .validation import (ListInfo, as_list, bump_versions, check_distinct, check_max_norm,
                         check_nonnegative, check_readable, inspect, native_extension)

# One tensor or any iterable of tensors (a list, model.parameters()), as torch's utilities take.
TensorList = Union[Tensor, Iterable[Tensor]]
Coefficients = Optional[Union[Sequence[float], Tensor]]

__all__ = ["norms", "total_norm", "penalty", "add_penalty_grad_", "prox_l1_", "clip_grad_norm_",
           "clip_grads_with_norm_", "available_backends"]

available_backends = backends.available_backends


def _norm_order(p: float) -> float:
    """``p`` as a float, if it is an order regfuse computes: > 0, 0, inf or -inf.

    Anything ``float()`` accepts is taken, as ``torch.nn.utils.clip_grad_norm_`` takes
    its ``norm_type`` (the string ``'inf'`` included). Negative finite orders are refused:
    ``torch.linalg.vector_norm`` defines them, but their value is 0 as soon as one
    element is 0, and their gradient is not defined there.
    """
    try:
        order = float(p)
    except (TypeError, ValueError):
        order = math.nan
    if math.isnan(order) or (order < 0 and order != -math.inf):
        raise ValueError(f"regfuse: unsupported p={p!r}; expected a number > 0, 0, float('inf') "
                         "or float('-inf')")
    return order


def _norm_reduction(p: float, squared: bool = False) -> tuple[Reduction, float]:
    """The per-tensor reduction computing the ``p``-norm, and the checked order."""
    order = _norm_order(p)
    if order == 2:
        return (Reduction.SQ if squared else Reduction.L2), order
    if squared:
        raise ValueError(f"regfuse: squared=True needs p=2, got p={p!r}")
    fast = {1.0: Reduction.L1, math.inf: Reduction.INF, -math.inf: Reduction.NEG_INF, 0.0: Reduction.L0}
    return fast.get(order, Reduction.LP), order


def _builds_graph(info: ListInfo) -> bool:
    """Whether a derivative must be recorded: autograd, the compiler, or a transform
    (forward mode, ``torch.func``) whose tangents the kernels would not see."""
    return ((info.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling()
            or ops.transforms_active())


def _coefficients(coefficients: Coefficients, n: int) -> Optional[Tensor]:
    """The per-tensor coefficients as a checked ``(n,)`` tensor, or ``None`` for all ones.

    Shape and dtype are always checked. The values (no negative, infinite or NaN number)
    are checked where that needs no GPU synchronization: a sequence of numbers (returned as
    a float64 CPU tensor, so that float64 lists get them exactly) and a CPU tensor. A
    tensor on a GPU is taken as it is, since reading it would make the host wait for the
    GPU; so is any tensor under ``torch.compile`` (the check would be a data-dependent
    branch).
    """
    if coefficients is None:
        return None
    shape_error = f"regfuse: coefficients must be a sequence of {n} numbers (one per tensor)"
    is_tensor = isinstance(coefficients, Tensor)
    try:
        values = coefficients if is_tensor else list(coefficients)
        c = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{shape_error}, got {coefficients!r}") from None
    if c.dim() != 1 or c.numel() != n:
        raise ValueError(f"{shape_error}, got shape {tuple(c.shape)}")
    if c.is_complex() or not (c.is_floating_point() or c.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"regfuse: coefficients must be real numbers, got dtype {c.dtype}")
    if torch.compiler.is_compiling():
        valid = is_tensor or all(0 <= float(v) < math.inf for v in values)
    else:
        if not is_tensor:
            c = torch.as_tensor(values, dtype=torch.float64)
        # (c >= 0) also refuses NaN; an infinite coefficient would turn a zero weight into NaN.
        valid = c.device.type != "cpu" or bool(((c >= 0) & torch.isfinite(c)).all())
    if not valid:
        raise ValueError("regfuse: coefficients must be finite non-negative numbers")
    return c


def _rows(values: tuple, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(len(values), n)`` with row ``k`` all ``values[k]``, filled on the device (no copy)."""
    # Never an inference tensor: it is cached, and a later backward could not save it.
    with torch.inference_mode(False):
        return torch.stack([torch.full((n,), v, dtype=dtype, device=device) for v in values])


def _scaled_rows(values: tuple, c: Tensor, device: torch.device, dtype: torch.dtype):
    """``values[k] * c_i`` computed on the host in ``dtype`` (as on the device: same
    rounding), uploaded without a host synchronization: (tensor, its pinned source)."""
    with torch.inference_mode(False):
        host = torch.tensor(values, dtype=dtype).unsqueeze(1) * c.to(dtype)
        return upload(host, device)


# Weight tables per (numbers, list length, dtype), device and stream; see device_cache.py
# for why they are safe to reuse across streams and CUDA graphs.
_weight_cache = DeviceCache(64)


def _weights(values: tuple, coefficients: Coefficients, n: int, info: ListInfo) -> Tensor:
    """``(len(values), n)`` in the accumulation dtype: row ``k`` is ``values[k] * c_i``.

    Cached: a training loop passing the same numbers (``l1``, ``l2``, a coefficients list)
    gets the same tensor back without building or copying anything, and new numbers reach
    the GPU without a host synchronization. A coefficients tensor on the GPU is used
    where it is (its values may change between calls, so it is never cached).
    """
    device, dtype = info.device, info.acc_dtype
    # No cache while tracing (traced into the graph), nor under a torch.func transform,
    # where a new tensor is a wrapper of the current level that must not outlive it.
    if torch.compiler.is_compiling() or ops.transforms_active():
        c = _coefficients(coefficients, n)
        rows = _rows(values, n, device, dtype)
        return rows if c is None else rows * c.to(device=device, dtype=dtype)
    if coefficients is None or (isinstance(coefficients, Tensor) and coefficients.device.type != "cpu"):
        c = _coefficients(coefficients, n)
        rows, _ = _weight_cache.get(("rows", values, n, dtype), device,
                                    lambda: (_rows(values, n, device, dtype), None))
        return rows if c is None else rows * c.to(device=device, dtype=dtype)
    if isinstance(coefficients, Tensor):  # on the CPU: checked now, cached by its values
        numbers = tuple(_coefficients(coefficients, n).tolist())
    else:
        try:
            numbers = tuple(coefficients)
        except TypeError:  # not a sequence: _coefficients raises the precise error
            _coefficients(coefficients, n)
            raise
    key = ("scaled", values, numbers, n, dtype)
    build = lambda: _scaled_rows(values, _coefficients(numbers, n), device, dtype)  # noqa: E731
    try:
        hash(key)
    except TypeError:  # unhashable entries: _coefficients says what is wrong
        return build()[0]
    return _weight_cache.get(key, device, build)[0]


@dtensor_aware(reduce=lambda args: norm_combination(args["p"], args["squared"]), per_tensor=True)
def norms(tensors: TensorList, p: float = 2, *, squared: bool = False, backend: str = "auto") -> Tensor:
    """Per-tensor norms of a list of tensors in one fused pass.

    Args:
        tensors: one tensor or an iterable of tensors on one device (any mix of
            float32/float16/bfloat16/float64, any shapes, empty, 0-d and non-contiguous
            tensors included).
        p: the order, as ``torch.linalg.vector_norm`` takes it: any ``p > 0`` (1, 2 and
            ``inf`` have their own kernels, every other ``p`` one general kernel), ``0``
            (the number of nonzero elements) or ``float('-inf')`` (``min |x|``).
            Negative finite orders and NaN raise ``ValueError``.
        squared: with ``p=2``, return ``sum(x**2)`` per tensor (gradient ``2x``).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        A 1-D tensor of ``len(tensors)`` norms, float32 (float64 where any input is
        float64), on the inputs' device; differentiable twice, in reverse and forward
        mode (dual tensors, ``torch.func.jvp``). Same values as
        ``torch.stack([torch.linalg.vector_norm(t, p) ...])`` computed in the
        accumulation dtype. The norm of an empty tensor is 0, except for ``p=-inf``,
        where it is ``inf`` (the identity of ``min``; ``vector_norm`` refuses both).
        Gradients follow ``torch.linalg.vector_norm``: ``sign(x) |x|**(p-1) / ‖x‖**(p-1)``,
        0 where ``x`` is 0 or the norm is 0; for ``p=±inf`` shared evenly by the elements
        that attain the max (min); 0 for ``p=0``.

        For DTensors (FSDP2), a DTensor computed on the local shards: ``Partial("sum")``
        for ``p=1``, ``p=0`` and ``squared``, a norm-partial for other ``p > 0``,
        ``Partial("max")`` for ``p=inf`` (``"min"`` for ``-inf``) where the inputs are
        sharded; ``.full_tensor()`` is the global value (see :mod:`regfuse.distributed`).
    """
    tensors = as_list(tensors)
    op, order = _norm_reduction(p, squared)
    backends.check_backend_name(backend)
    if not tensors:
        return torch.empty(0, dtype=torch.float32)
    info = inspect(tensors)
    return _per_tensor_norms(tensors, op, order, backend, info)


def _per_tensor_norms(tensors: list[Tensor], op: Reduction, order: float, backend: str,
                      info: ListInfo) -> Tensor:
    if _builds_graph(info):
        return ops.reduce_with_grad(tensors, op, None, backend, order)
    return ops.run_reduce(tensors, op, None, backend, info, p=order)


def _combined_norm(tensors: list[Tensor], order: float, backend: str, info: ListInfo) -> Tensor:
    """The ``order``-norm of every element of ``tensors`` together, a 0-d tensor.

    One fused per-tensor reduction, then the per-tensor norms combined on the device, in
    float64, as ``torch.nn.utils.get_total_norm`` combines them (``vector_norm`` of the
    norms, which is the norm of the concatenation for every ``p`` but 0, where the
    counts are summed). No host synchronization; differentiable like :func:`norms`.
    """
    op, order = _norm_reduction(order)
    return _norm_of_norms(_per_tensor_norms(tensors, op, order, backend, info), order)


def _norm_of_norms(per_tensor: Tensor, order: float) -> Tensor:
    # Widened inside the op (dtype=): one launch fewer than a cast first, the same bits.
    total = per_tensor.sum(dtype=torch.float64) if order == 0 else \
        torch.linalg.vector_norm(per_tensor, order, dtype=torch.float64)
    return total.to(per_tensor.dtype)


def _tensor_norms(local: list[Tensor], arguments: dict, dtensors: list) -> Tensor:
    """The per-tensor norms whose norm is the total norm (of local shards, for DTensors)."""
    return norms.__wrapped__(local, arguments["p"], backend=arguments["backend"])


def _total_of_norms(per_tensor: Tensor, arguments: dict) -> Tensor:
    return _norm_of_norms(per_tensor, _norm_order(arguments["p"]))


def _check_total_finite(total: Tensor, order: float) -> None:
    # torch's message, word for word (this check synchronizes with the device, as torch's does).
    if torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {order} for gradients from `parameters` is non-finite, so "
            "it cannot be clipped. To disable this error and scale the gradients by the "
            "non-finite norm anyway, set `error_if_nonfinite=False`")


def _check_total_finite_of(total: Tensor, arguments: dict) -> None:
    _check_total_finite(total, _norm_order(arguments["p"]))


@dtensor_aware(reduce=lambda args: norm_combination(args["p"]), entries=_tensor_norms,
               finish=_total_of_norms, stages="pp_mesh",
               global_checks={"error_if_nonfinite": _check_total_finite_of})
def total_norm(tensors: TensorList, p: float = 2, *, error_if_nonfinite: bool = False,
               pp_mesh=None, backend: str = "auto") -> Tensor:
    """The ``p``-norm of all the tensors together, as ``torch.nn.utils.get_total_norm``.

    Args:
        tensors: one tensor or an iterable of tensors on one device (any mix of
            float32/float16/bfloat16/float64, any shapes).
        p: as in :func:`norms`: any ``p > 0``, ``0``, ``float('inf')`` or
            ``float('-inf')`` (anything ``float()`` accepts, ``'inf'`` included).
        error_if_nonfinite: raise torch's ``RuntimeError`` when the result is NaN or
            infinite (this check waits for the device, as torch's does).
        pp_mesh: pipeline parallelism: a 1-D ``DeviceMesh`` or a ``ProcessGroup`` whose
            ranks hold disjoint parameters (the stages); the norm is reduced across it
            (the sum of ``p``-th powers, the max for ``inf``, the min for ``-inf``, the
            sum of counts for 0; one all-reduce) and returned as a plain tensor. Every
            rank of it must call, an empty list included.
        backend: as in :func:`norms`.

    Returns:
        A 0-d tensor, float32 (float64 where any input is float64; torch returns the
        inputs' promoted dtype, bfloat16 for an all-bfloat16 list), on the inputs'
        device: one fused reduction, the per-tensor norms combined on the device in
        float64, no host synchronization. Differentiable like :func:`norms` (twice, and
        in forward mode). ``tensor(0.)`` (float32, CPU) for an empty list, as torch.
        For ``p=0`` the result is the number of nonzero elements of the concatenation;
        torch's ``get_total_norm`` instead returns the number of tensors that hold a
        nonzero element. For ``p=-inf`` empty tensors are ignored (an all-empty list
        gives ``inf``, where torch raises).

        For DTensors (FSDP2), a DTensor computed on the local shards, as ``get_total_norm``
        gives it: ``_NormPartial(p)`` (``Partial("sum")`` for ``p`` 0 and 1,
        ``Partial("max")``/``("min")`` for ``±inf``) where the inputs are sharded;
        ``.full_tensor()`` is the global norm, and ``error_if_nonfinite`` checks that
        global value on every rank. A list whose DTensors mix placements (tensor
        parallelism) gives a replicated DTensor; one over several meshes, or with plain
        tensors (replicated on every rank) mixed in, a plain tensor holding the global
        norm; either costs one all-reduce per mesh. Under DDP the gradients are plain tensors, identical
        on every rank: their total norm is already the global one (no all-reduce, which
        would count it ``world_size`` times).
    """
    tensors = as_list(tensors)
    order = _norm_order(p)
    backends.check_backend_name(backend)
    if not tensors:
        total = torch.zeros((), dtype=torch.float32)
    else:
        total = _combined_norm(tensors, order, backend, inspect(tensors))
    if pp_mesh is not None:  # a stage without tensors still takes part
        total = across_stages(total, norm_combination(order), pp_mesh)
    if error_if_nonfinite:
        _check_total_finite(total, order)
    return total


@dtensor_aware(reduce=SUM, entries=penalty_entries, finish=total, loss_term=True)
def penalty(tensors: TensorList, l1: float = 0.0, l2: float = 0.0, *,
            coefficients: Coefficients = None, backend: str = "auto") -> Tensor:
    """``sum_i c_i * (l1 * ||t_i||_1 + l2 * ||t_i||_2**2)`` reading every element once.

    ``l2`` multiplies the sum of squares (the Keras convention). ``coefficients`` is an
    optional per-tensor sequence or 1-D tensor ``c`` of non-negative numbers (default
    all 1); it is a constant, not differentiated. The values of a coefficients tensor on
    a GPU are not checked (that would synchronize with the GPU); everything else is.
    Returns a 0-d float32 tensor (float64 where any input is float64), differentiable
    twice; 0 for an empty list. For DTensors (FSDP2, tensor parallelism, several meshes,
    plain tensors mixed in), a plain tensor holding the global penalty (one all-reduce of
    a scalar per mesh; a loss term joins a plain loss; see :mod:`regfuse.distributed`).
    """
    tensors = as_list(tensors)
    l1 = check_nonnegative("l1", l1)
    l2 = check_nonnegative("l2", l2)
    backends.check_backend_name(backend)
    if not tensors:
        _coefficients(coefficients, 0)
        return torch.zeros((), dtype=torch.float32)
    info = inspect(tensors)
    weights = _weights((l1, l2), coefficients, len(tensors), info)
    if _builds_graph(info):
        return ops.reduce_with_grad(tensors, Reduction.PENALTY, weights, backend)
    return ops.run_reduce(tensors, Reduction.PENALTY, weights, backend, info)


def _check_grads(params: list[Tensor]) -> list[Optional[Tensor]]:
    grads = [p.grad for p in params]
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        check_readable(g, f"the gradient of parameter {i}")
        if g.is_sparse:
            raise TypeError(f"regfuse: parameter {i} has a sparse gradient; dense gradients only")
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise ValueError(
                f"regfuse: parameter {i} ({tuple(p.shape)}, {p.dtype}, {p.device}) has a gradient "
                f"of another shape, dtype or device ({tuple(g.shape)}, {g.dtype}, {g.device})")
    return grads


def _grads_to_update(params: list[Tensor], what: str) -> list[Tensor]:
    """The parameters' ``.grad`` tensors, checked, a ``None`` one replaced by zeros.

    Call it last among the checks of an op that adds to gradients (``what``, for the
    messages): it sets ``.grad``.
    """
    extension = native_extension()
    if not (extension is not None and extension.grads_ready(params)):  # else: the common case, checked natively
        grads = _check_grads(params)
        # Every check has passed: from here on the parameters' gradients may change.
        for p, g in zip(params, grads):
            if g is None:
                p.grad = torch.zeros_like(p, memory_format=torch.preserve_format)
    grads = [p.grad for p in params]
    ops.refuse_transforms(what, grads)
    return grads


def _in_place_target(params: TensorList, backend: str, what: str) -> tuple[list, Optional[ListInfo]]:
    """The checked list of an in-place op and its summary (``None`` for an empty list)."""
    params = as_list(params)
    backends.check_backend_name(backend)
    if not params:
        return params, None
    info = inspect(params)
    ops.refuse_transforms(what, params)
    check_distinct(params)
    _check_available(backend, info)
    return params, info


def _check_available(backend: str, info: ListInfo) -> None:
    """Raise now, before anything is modified, if ``backend`` cannot run the list (when
    traced, the custom op raises as the graph runs, also before any change)."""
    if not torch.compiler.is_compiling():
        backends.resolve(backend, info.device)


def _run_in_place(custom_op, run, modified: Sequence[Tensor], args: tuple, info: ListInfo) -> None:
    """Runs an in-place op: the custom op under ``torch.compile``, else the kernel directly."""
    if torch.compiler.is_compiling():
        custom_op(*args)
        return
    run(*args, info=info)
    bump_versions(modified)


@dtensor_aware(in_place="grads")
def add_penalty_grad_(params: TensorList, l1: float = 0.0, l2: float = 0.0, *,
                      coefficients: Coefficients = None, backend: str = "auto") -> None:
    """In place: ``p.grad += c_i * (l1 * sign(p) + 2 * l2 * p)`` for every parameter.

    No autograd graph; one fused pass. A ``p.grad`` that is ``None`` becomes the term
    itself. The result equals adding ``penalty(params, l1, l2, coefficients=...)`` to the
    loss before ``backward()``. Call it after ``backward()`` and before
    ``optimizer.step()``. DTensor parameters (FSDP2) are updated on their local shards;
    their gradients must have the parameters' placements.
    """
    l1 = check_nonnegative("l1", l1)
    l2 = check_nonnegative("l2", l2)
    params, info = _in_place_target(params, backend, "add_penalty_grad_")
    if info is None:
        return
    # The gradient's scales: 2 * l2 * c_i rounds as (l2 * c_i) * 2 does (a factor of 2 is exact).
    weights = _weights((l1, 2 * l2), coefficients, len(params), info)
    grads = _grads_to_update(params, "add_penalty_grad_")
    _run_in_place(ops.add_grad_, ops.run_add_grad_, grads, (grads, params, weights, backend), info)


@dtensor_aware(in_place="values")
def prox_l1_(params: TensorList, threshold: float, *, coefficients: Coefficients = None,
             backend: str = "auto") -> None:
    """In place soft-thresholding ``p = sign(p) * max(|p| - c_i * threshold, 0)``.

    The proximal step of an L1 penalty: it leaves exact zeros. Call it after
    ``optimizer.step()`` with ``threshold = lr * l1``. NaN stays NaN. DTensor parameters
    (FSDP2) are updated on their local shards, without communication.
    """
    threshold = check_nonnegative("threshold", threshold)
    params, info = _in_place_target(params, backend, "prox_l1_")
    if info is None:
        return
    thresholds = _weights((threshold,), coefficients, len(params), info)[0]
    _run_in_place(ops.prox_l1_, ops.run_prox_l1_, params, (params, thresholds, backend), info)


def _gradients(parameters: list) -> list[Tensor]:
    """The ``.grad`` of every parameter that has one, in order."""
    extension = native_extension()
    grads = extension.defined_grads(parameters) if extension is not None else None
    if grads is not None:
        return grads
    try:
        return [g for g in [p.grad for p in parameters] if g is not None]
    except AttributeError:
        bad = next(i for i, p in enumerate(parameters) if not isinstance(p, Tensor))
        raise TypeError(f"regfuse: element {bad} is a {type(parameters[bad]).__name__}, "
                        "not a torch.Tensor") from None


def _parameter_list(parameters: "TensorList | Tensor") -> list:
    """torch's handling of ``parameters``: one tensor or an iterable (an empty generator warns)."""
    is_generator = isinstance(parameters, types.GeneratorType)
    parameters = as_list(parameters)
    if is_generator and not parameters:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                      stacklevel=3)
    return parameters


def clip_grad_norm_(parameters: "TensorList | Tensor", max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: Optional[bool] = None, *,
                    pp_mesh=None, backend: str = "auto") -> Tensor:
    """Clip the gradients' total norm, in place: ``torch.nn.utils.clip_grad_norm_``, fused.

    Same signature, result and semantics as torch's: ``parameters`` is one tensor or an
    iterable (parameters whose ``.grad`` is ``None`` are skipped); the total
    ``norm_type``-norm ``N`` of the gradients is computed as by :func:`total_norm`, then
    every gradient is multiplied by ``min(max_norm / (N + 1e-6), 1)``
    (:func:`clip_grads_with_norm_`); the total norm (before clipping) is returned. One
    fused reduction and one fused in-place scale, any mix of gradient dtypes in one call,
    and no host synchronization: the coefficient never leaves the device. Gradients
    whose coefficient is exactly 1 (a total norm below ``max_norm``) are left untouched,
    which gives the same bits as torch's multiplication by 1 at the cost of one read.

    Args:
        parameters: tensors whose ``.grad`` is clipped; the gradients must be on one
            device (torch also takes several). DTensor gradients may be on several meshes
            and mixed with plain ones (FSDP2 + tensor and expert parallelism).
        max_norm: the largest total norm allowed; ``float('inf')`` computes the norm
            without clipping. NaN or negative raises ``ValueError`` (torch takes a
            negative one and flips the gradients).
        norm_type: as ``p`` of :func:`total_norm` (``'inf'`` included).
        error_if_nonfinite: raise torch's ``RuntimeError`` when the total norm is NaN or
            infinite, before any gradient is modified (waits for the device, as torch).
        foreach: accepted for compatibility and ignored: regfuse always runs fused.
        pp_mesh: the pipeline stages' group, as for :func:`total_norm` (torchtitan's
            argument): the norm is global over the stages before clipping.
        backend: as in :func:`norms` (keyword only; not in torch's signature).

    Returns:
        The total norm, a 0-d tensor as :func:`total_norm` returns it (float32, float64
        where a gradient is float64; ``tensor(0.)`` when no parameter has a gradient).
    """
    del foreach  # the fused path is the only one
    parameters = _parameter_list(parameters)
    max_norm = check_max_norm(max_norm)
    order = _norm_order(norm_type)
    backends.check_backend_name(backend)
    grads = _gradients(parameters)
    if not grads and pp_mesh is None:
        return torch.zeros((), dtype=torch.float32)
    with torch.no_grad():
        # For DTensor gradients the total may be a partial DTensor; global_value reduces it
        # (one all-reduce of a scalar, no host synchronization), so that every rank scales
        # its shards by the coefficient of the global norm.
        total = total_norm(grads, order, error_if_nonfinite=error_if_nonfinite, pp_mesh=pp_mesh,
                           backend=backend)
        if grads:
            _clip_(grads, max_norm, global_value(total), backend=backend)
    return total


def clip_grads_with_norm_(parameters: "TensorList | Tensor", max_norm: float,
                          total_norm: "Tensor | float", foreach: Optional[bool] = None, *,
                          backend: str = "auto") -> None:
    """Scale the gradients by ``min(max_norm / (total_norm + 1e-6), 1)``, in place: a
    drop-in for ``torch.nn.utils.clip_grads_with_norm_``, one fused launch.

    ``total_norm`` is the norm computed beforehand (by :func:`total_norm`, possibly with
    ``pp_mesh``, or combined by hand over meshes); a partial DTensor is reduced first (one
    all-reduce of a scalar). ``parameters``, ``max_norm`` and ``foreach`` as in
    :func:`clip_grad_norm_`; the gradients may be DTensors on several meshes mixed with
    plain tensors. No host synchronization.
    """
    del foreach  # the fused path is the only one
    parameters = _parameter_list(parameters)
    max_norm = check_max_norm(max_norm)
    backends.check_backend_name(backend)
    if not isinstance(total_norm, Tensor):
        total_norm = torch.tensor(float(total_norm), dtype=torch.float64)
    grads = _gradients(parameters)
    if not grads:
        return
    with torch.no_grad():
        _clip_(grads, max_norm, global_value(total_norm), backend=backend)


@dtensor_aware(in_place="values")
def _clip_(grads: list[Tensor], max_norm: float, total: Tensor, *, backend: str) -> None:
    """``grads *= min(max_norm / (total + 1e-6), 1)`` in place, fused (``total`` is global)."""
    info = inspect(grads)
    ops.refuse_transforms("clip_grad_norm_", grads)
    check_distinct(grads)
    _check_available(backend, info)
    # torch's coefficient, formula for formula; clamping (not branching) keeps it on the device.
    coefficient = torch.clamp(max_norm / (total.to(info.device) + 1e-6), max=1.0)
    factors = coefficient.to(info.acc_dtype).expand(len(grads)).contiguous()
    _run_in_place(ops.scale_, ops.run_scale_, grads, (grads, factors, backend), info)
