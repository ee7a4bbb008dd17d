"""The operators, registered with ``torch.library`` so that ``torch.compile`` sees them.

Five custom ops carry all the work: ``regfuse::reduce`` (norms and penalties, with
autograd), ``regfuse::reduce_backward`` (the fused first backward), ``regfuse::add_grad_``,
``regfuse::prox_l1_`` and ``regfuse::scale_`` (in place). ``reduce``, ``reduce_backward``
and ``scale_`` take ``rows``: the entries are then the rows of every tensor along dim 0
(the groups of :mod:`regfuse.groups`). Each has a fake implementation for tracing. The ``run_*`` functions are their eager implementations; :mod:`regfuse.api`
calls them directly when no derivative is being recorded, and records eager graphs
through ``_EagerReduce`` (the same forward and backward as an ``autograd.Function``),
which skips the dispatcher's per-call cost on long lists. Under ``torch.compile`` the
custom ops are used, so the compiler sees them.

Double backward: the fused backward is a kernel, not differentiable by itself, so
when the backward is being recorded (``create_graph=True``) the same gradient is
computed with the reference backend's differentiable PyTorch ops instead. The norms
whose gradient is not ``a * sign(x) + b * x`` (general ``p``, ``+-inf``, ``0``) are
always differentiated with those ops.

Forward mode: the kernels read raw memory and cannot see a tangent, so whenever a dual
level (``torch.autograd.forward_ad``) or a ``torch.func`` transform is active the
reductions go through ``_EagerReduce``, whose ``jvp`` computes the output tangent with
PyTorch ops and whose ``vmap`` refuses; the in-place ops refuse tangents and transforms
(:func:`refuse_transforms`). Nothing is computed without its derivative.
"""
from __future__ import annotations

import inspect as pyinspect
import math
from typing import Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import backends
from .backends import reference
from .backends.base import Reduction, row_counts
from .validation import (ListInfo, check_distinct, check_gradients, check_per_tensor, inspect,
                         inspect_py, is_traced)


# The reductions whose gradient is not ``a * sign(x) + b * x``: always PyTorch ops.
_TORCH_OP_GRADIENTS = (Reduction.INF, Reduction.NEG_INF, Reduction.LP, Reduction.L0)


def _contiguous(tensors: Sequence[Tensor], info: ListInfo) -> list[Tensor]:
    return list(tensors) if info.contiguous else [t.contiguous() for t in tensors]


def _write_back(originals: Sequence[Tensor], work: Sequence[Tensor]) -> None:
    """Copies the contiguous stand-ins an in-place kernel updated back into the originals."""
    for original, updated in zip(originals, work):
        if updated is not original:
            original.copy_(updated)


def transforms_active() -> bool:
    """Whether tensors may carry derivatives that the kernels cannot see: a forward-mode
    dual level is open (tangents exist only inside one) or a ``torch.func`` transform
    (``jvp``, ``vmap``, ``grad``, ...) is running. Two global reads: cheap enough for
    every call."""
    # forward_ad keeps the open level in a module global; -1 when none is open.
    return fwAD._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None


def refuse_transforms(what: str, tensors: Sequence[Tensor]) -> None:
    """Raise before an in-place op whose result would silently lack a derivative."""
    if torch.compiler.is_compiling() or not transforms_active():
        return
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise NotImplementedError(
            f"regfuse.{what} does not support torch.func transforms (vmap, grad, jvp, ...): it "
            "updates tensors in place through their raw memory; call it outside the transform")
    for i, t in enumerate(tensors):
        if fwAD.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"regfuse.{what} does not support forward-mode AD: tensor {i} is a dual tensor "
                "(it carries a tangent), which an in-place update through raw memory would drop")


# The run_* functions take ``info`` (the list's summary) from regfuse.api, which has
# checked the whole call; without it (the custom ops, called by anyone) every argument is
# checked first by the _check_* functions, which the fake implementations share, so that
# a backend never indexes a table of the wrong size, dtype or device (the C++ binding
# checks what it reads again).

def _reduction(op: int) -> Reduction:
    try:
        return Reduction(op)
    except ValueError:
        raise ValueError(f"regfuse: unknown reduction {op!r}; expected one of "
                         f"{[int(r) for r in Reduction]}") from None


def _num_entries(tensors: Sequence[Tensor], rows: bool) -> int:
    """Entries of the chunk table: the tensors, or with ``rows`` their rows along dim 0."""
    return sum(row_counts(tensors)) if rows else len(tensors)


def _result_shape(op: Reduction, n: int) -> tuple:
    return {Reduction.PENALTY: (), Reduction.L1_L2: (2, n)}.get(op, (n,))


def _check_reduce(tensors: Sequence[Tensor], op: int, weights: Optional[Tensor],
                  info: ListInfo, p: float = 0.0, rows: bool = False) -> Reduction:
    op = _reduction(op)
    if op == Reduction.PENALTY:
        if rows:
            raise ValueError("regfuse: the PENALTY reduction takes per-tensor weights, not rows")
        check_per_tensor("weights", weights, (2, len(tensors)), info)
    elif weights is not None:
        raise ValueError(f"regfuse: weights are only taken by the PENALTY reduction, not {op.name}")
    if op == Reduction.LP and not (isinstance(p, (int, float)) and 0 < p < math.inf):
        raise ValueError(f"regfuse: the LP reduction needs a finite order p > 0, got {p!r}")
    return op


def _check_reduce_backward(tensors: Sequence[Tensor], op: int, grad_out: Tensor,
                           norms: Optional[Tensor], weights: Optional[Tensor], info: ListInfo,
                           rows: bool = False) -> Reduction:
    if _reduction(op) in _TORCH_OP_GRADIENTS:
        raise ValueError(f"regfuse: the {_reduction(op).name} reduction has no fused backward")
    op = _check_reduce(tensors, op, weights, info, rows=rows)
    shape = _result_shape(op, _num_entries(tensors, rows))
    if (not isinstance(grad_out, Tensor) or tuple(grad_out.shape) != shape
            or grad_out.device != info.device or not grad_out.is_floating_point()):
        got = (f"{tuple(grad_out.shape)} {grad_out.dtype} on {grad_out.device}"
               if isinstance(grad_out, Tensor) else type(grad_out).__name__)
        raise ValueError(f"regfuse: grad_out must be a floating-point {shape} tensor on "
                         f"{info.device}, got {got}")
    if op in (Reduction.L2, Reduction.L1_L2):
        check_per_tensor("norms", norms, shape, info)
    return op


def _check_add_grad(grads: Sequence[Tensor], params: Sequence[Tensor], weights: Tensor,
                    info: ListInfo, native: bool = True) -> None:
    check_per_tensor("weights", weights, (2, len(params)), info)
    check_gradients(grads, params, native)


def _check_prox(params: Sequence[Tensor], thresholds: Tensor, info: ListInfo) -> None:
    check_per_tensor("thresholds", thresholds, (len(params),), info)


def _check_scale(tensors: Sequence[Tensor], factors: Tensor, info: ListInfo, rows: bool = False) -> None:
    check_per_tensor("factors", factors, (_num_entries(tensors, rows),), info)


def _rows_kwargs(rows: bool) -> dict:
    # Only the group ops pass rows, so a backend written before them keeps working.
    return {"rows": True} if rows else {}


def run_reduce(tensors: Sequence[Tensor], op: Reduction, weights: Optional[Tensor], backend: str,
               info: Optional[ListInfo] = None, p: float = 0.0, rows: bool = False) -> Tensor:
    if info is None:
        info = inspect(tensors)
        op = _check_reduce(tensors, op, weights, info, p, rows)
    impl = backends.resolve(backend, info.device)
    return impl.reduce(_contiguous(tensors, info), op, weights, info.acc_dtype, p, **_rows_kwargs(rows))


def run_reduce_backward(tensors: Sequence[Tensor], op: Reduction, grad_out: Tensor,
                        norms: Optional[Tensor], weights: Optional[Tensor], backend: str,
                        rows: bool = False) -> list[Tensor]:
    info = inspect(tensors)
    op = _check_reduce_backward(tensors, op, grad_out, norms, weights, info, rows)
    impl = backends.resolve(backend, info.device)
    grads = impl.backward(_contiguous(tensors, info), op, grad_out.to(info.acc_dtype), norms,
                          weights, info.acc_dtype, **_rows_kwargs(rows))
    return grads


def run_add_grad_(grads: Sequence[Tensor], params: Sequence[Tensor], weights: Tensor, backend: str,
                  info: Optional[ListInfo] = None) -> None:
    """``grads[i] += weights[0, i] * sign(p_i) + weights[1, i] * p_i``, fused: ``weights``
    holds the gradient's scales (``l1 * c_i``, ``2 * l2 * c_i``), built once and cached by
    the caller, so that no table is computed per call."""
    if info is None:
        info = inspect(params)
        _check_add_grad(grads, params, weights, info)
        check_distinct(grads)
    impl = backends.resolve(backend, info.device)
    work = [g if g.is_contiguous() else g.contiguous() for g in grads]
    with torch.no_grad():
        impl.backward(_contiguous(params, info), Reduction.PENALTY, None, None,
                      weights, info.acc_dtype, accumulate_into=work)
        _write_back(grads, work)


def _run_per_tensor_(tensors: Sequence[Tensor], values: Tensor, backend: str,
                     info: Optional[ListInfo], check, kernel: str, **kernel_kwargs) -> None:
    """Runs the backend's in-place ``kernel(tensors, values)``, ``values`` one number per
    tensor (or per row, with ``rows=True`` in ``kernel_kwargs``; accumulation dtype), on
    contiguous stand-ins copied back where needed."""
    if info is None:  # the custom op, also as a compiled graph runs it: check it all here
        info = inspect(tensors)
        check(tensors, values, info)
        check_distinct(tensors)
    impl = backends.resolve(backend, info.device)
    work = _contiguous(tensors, info)
    with torch.no_grad():
        getattr(impl, kernel)(work, values, **kernel_kwargs)
        if not info.contiguous:  # else the kernel updated the tensors themselves
            _write_back(tensors, work)


def run_prox_l1_(params: Sequence[Tensor], thresholds: Tensor, backend: str,
                 info: Optional[ListInfo] = None) -> None:
    _run_per_tensor_(params, thresholds, backend, info, _check_prox, "prox_l1_")


def run_scale_(tensors: Sequence[Tensor], factors: Tensor, backend: str,
               info: Optional[ListInfo] = None, rows: bool = False) -> None:
    """``tensors[i] *= factors[i]`` in place, fused (``factors``: ``(n,)``, accumulation
    dtype; with ``rows``, one factor per row along dim 0)."""
    _run_per_tensor_(tensors, factors, backend, info,
                     lambda t, f, i: _check_scale(t, f, i, rows), "scale_", **_rows_kwargs(rows))


# ---- torch.library registration -------------------------------------------------------

@torch.library.custom_op("regfuse::reduce", mutates_args=())
def reduce(tensors: list[Tensor], op: int, weights: Optional[Tensor], backend: str,
           p: float, rows: bool = False) -> Tensor:
    # p (the order of LP, ignored by the other ops) has no default: the dispatcher would
    # leave a defaulted argument out of the inputs autograd matches the backward against.
    # rows has one (most calls leave it out); the backward returns one None per input the
    # op actually received (_backward_reduce).
    return run_reduce(tensors, _reduction(op), weights, backend, p=p, rows=rows)


@reduce.register_fake
def _(tensors, op, weights, backend, p, rows=False):
    info = inspect_py(tensors)
    op = _check_reduce(tensors, op, weights, info, p, rows)
    return tensors[0].new_empty(_result_shape(op, _num_entries(tensors, rows)), dtype=info.acc_dtype)


@torch.library.custom_op("regfuse::reduce_backward", mutates_args=())
def reduce_backward(tensors: list[Tensor], op: int, grad_out: Tensor, norms: Optional[Tensor],
                    weights: Optional[Tensor], backend: str, rows: bool = False) -> list[Tensor]:
    grads = run_reduce_backward(tensors, _reduction(op), grad_out, norms, weights, backend, rows)
    # Custom-op outputs may not share storage, and the fused kernels return views of one
    # flat buffer: copy them. Only traced graphs pay this; the eager autograd path below
    # calls the backend directly and keeps the single buffer.
    return [g.clone() for g in grads]


@reduce_backward.register_fake
def _(tensors, op, grad_out, norms, weights, backend, rows=False):
    _check_reduce_backward(tensors, op, grad_out, norms, weights, inspect_py(tensors), rows)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]


def _setup_reduce(ctx, inputs, output):
    tensors, op, weights, backend, p, rows = inputs
    ctx.op = Reduction(op)
    ctx.backend = backend
    ctx.p = p
    ctx.rows = rows
    ctx.num_tensors = len(tensors)
    ctx.save_for_backward(*tensors, output, weights)


def _tracing(tensors: Sequence[Tensor], grad_out: Tensor) -> bool:
    """Whether the backward is being traced (dynamo, or AOT autograd's fake or functional
    tensors, which all the tensors of one trace are). A few isinstance checks: it runs in
    every eager backward (``torch._guards.detect_fake_mode`` walks the whole list)."""
    return torch.compiler.is_compiling() or is_traced(grad_out) or is_traced(tensors[0])


def differentiable_grads(tensors: Sequence[Tensor], op: Reduction, grad_out: Tensor, norms: Tensor,
                         weights: Optional[Tensor], p: float, rows: bool = False) -> list[Tensor]:
    """The gradient of ``reduce(tensors, op, weights, p, rows)`` scaled by ``grad_out``,
    with differentiable PyTorch ops (``norms`` is the forward result), typed like ``tensors``."""
    if op in (Reduction.INF, Reduction.NEG_INF):
        return reference.inf_norm_backward(tensors, norms, grad_out, rows)
    if op == Reduction.LP:
        return reference.lp_norm_backward(tensors, norms, grad_out, p, rows)
    if op == Reduction.L0:
        # A count is piecewise constant: its gradient is 0, as torch.linalg.vector_norm(x, 0)'s.
        return [torch.zeros_like(t) for t in tensors]
    acc_dtype = norms.dtype
    return reference.backward(tensors, op, grad_out.to(acc_dtype), norms, weights, acc_dtype, rows=rows)


def _backward_reduce(ctx, grad_out):
    saved = ctx.saved_tensors
    tensors, norms, weights = list(saved[:ctx.num_tensors]), saved[-2], saved[-1]
    op, rows = ctx.op, ctx.rows
    records_derivatives = torch.is_grad_enabled() and (
        grad_out.requires_grad or any(t.requires_grad for t in tensors))
    if op in _TORCH_OP_GRADIENTS or records_derivatives or transforms_active():
        grads = differentiable_grads(tensors, op, grad_out, norms, weights, ctx.p, rows)
    elif _tracing(tensors, grad_out):
        grads = reduce_backward(tensors, int(op), grad_out, norms, weights, ctx.backend, rows)
    else:
        grads = run_reduce_backward(tensors, op, grad_out, norms, weights, ctx.backend, rows)
    # One None per other input the op received: the dispatcher leaves out an argument equal
    # to its default (rows=False), and needs_input_grad has one entry per input received.
    return (list(grads),) + (None,) * (len(ctx.needs_input_grad) - 1)


reduce.register_autograd(_backward_reduce, setup_context=_setup_reduce)


class _EagerReduce(torch.autograd.Function):
    """``regfuse::reduce`` with the same autograd, for eager mode, plus forward mode.

    The custom op is what the compiler sees; called eagerly it costs a dispatcher round
    trip per tensor of the list and, on first use, a one-time import of the compiler
    stack (seconds). This Function runs the same forward and backward without either.
    Its ``jvp`` gives dual tensors and ``torch.func.jvp`` their tangent; ``vmap`` is
    refused (the kernels take whole tensors, not batches).
    """

    @staticmethod
    def forward(op: int, weights: Optional[Tensor], backend: str, p: float, rows: bool,
                *tensors: Tensor) -> Tensor:
        return run_reduce(tensors, Reduction(op), weights, backend, p=p, rows=rows)

    @staticmethod
    def setup_context(ctx, inputs, output):
        op, weights, backend, p, rows, *tensors = inputs
        _setup_reduce(ctx, (tensors, op, weights, backend, p, rows), output)
        ctx.save_for_forward(*tensors, output, weights)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grads = _backward_reduce(ctx, grad_out)[0]
        return (None, None, None, None, None, *grads)

    @staticmethod
    def jvp(ctx, op_tangent, weights_tangent, backend_tangent, p_tangent, rows_tangent, *tangents):
        # The output tangent is the gradient (for an upstream gradient of ones) dotted with
        # the input tangents, per entry; computed in the accumulation dtype. The weights are
        # constants. L1_L2's two rows are two outputs: one gradient each.
        saved = ctx.saved_tensors
        tensors, output, weights = saved[:ctx.num_tensors], saved[-2], saved[-1]
        acc_dtype = output.dtype
        wide = [t.to(acc_dtype) for t in tensors]
        wide_tangents = [t.to(acc_dtype) if t is not None else torch.zeros_like(w)
                         for t, w in zip(tangents, wide)]
        upstream = ([torch.stack((torch.ones_like(output[0]), torch.zeros_like(output[0]))),
                     torch.stack((torch.zeros_like(output[0]), torch.ones_like(output[0])))]
                    if ctx.op == Reduction.L1_L2 else [torch.ones_like(output)])
        results = []
        for grad_out in upstream:
            grads = differentiable_grads(wide, ctx.op, grad_out, output, weights, ctx.p, ctx.rows)
            products = [g * t for g, t in zip(grads, wide_tangents)]
            results.append(torch.cat([m.sum(1) for m in reference.entries(products, ctx.rows)]))
        if ctx.op == Reduction.PENALTY:
            return results[0].sum()
        return torch.stack(results) if ctx.op == Reduction.L1_L2 else results[0]

    @staticmethod
    def vmap(info, in_dims, *args):
        raise NotImplementedError(
            "regfuse does not support torch.func.vmap: its fused kernels take whole tensors, not "
            "batches of them; call it once per batch element instead")


# torch.autograd.Function.apply binds its arguments to forward's signature on every call
# (setup_context style); a signature stored on the function spares inspect.signature
# rebuilding it each time (about 10 us a call).
_EagerReduce.forward.__signature__ = pyinspect.signature(_EagerReduce.forward)


def reduce_with_grad(tensors: list[Tensor], op: Reduction, weights: Optional[Tensor],
                     backend: str, p: float = 0.0, rows: bool = False) -> Tensor:
    """The differentiable reduction: the custom op under ``torch.compile``, else eager
    autograd (reverse and forward mode)."""
    if torch.compiler.is_compiling():
        return reduce(tensors, int(op), weights, backend, p, rows)
    return _EagerReduce.apply(int(op), weights, backend, p, rows, *tensors)


@torch.library.custom_op("regfuse::add_grad_", mutates_args=("grads",))
def add_grad_(grads: list[Tensor], params: list[Tensor], weights: Tensor, backend: str) -> None:
    run_add_grad_(grads, params, weights, backend)


@add_grad_.register_fake
def _(grads, params, weights, backend):
    _check_add_grad(grads, params, weights, inspect_py(params), native=False)
    return None


@torch.library.custom_op("regfuse::prox_l1_", mutates_args=("params",))
def prox_l1_(params: list[Tensor], thresholds: Tensor, backend: str) -> None:
    run_prox_l1_(params, thresholds, backend)


@prox_l1_.register_fake
def _(params, thresholds, backend):
    _check_prox(params, thresholds, inspect_py(params))
    return None


@torch.library.custom_op("regfuse::scale_", mutates_args=("tensors",))
def scale_(tensors: list[Tensor], factors: Tensor, backend: str, rows: bool = False) -> None:
    run_scale_(tensors, factors, backend, rows=rows)


@scale_.register_fake
def _(tensors, factors, backend, rows=False):
    _check_scale(tensors, factors, inspect_py(tensors), rows)
    return None
