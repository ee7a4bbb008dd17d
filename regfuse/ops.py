"""The operators, registered with ``torch.library`` so that ``torch.compile`` sees them.

Four custom ops carry all the work: ``regfuse::reduce`` (norms and penalties, with
autograd), ``regfuse::reduce_backward`` (the fused first backward), ``regfuse::add_grad_``
and ``regfuse::prox_l1_`` (in place). Each has a fake implementation for tracing. The
``run_*`` functions are their eager implementations; :mod:`regfuse.api` calls them
directly when no autograd graph is being built, and records eager graphs through
``_EagerReduce`` (the same forward and backward as an ``autograd.Function``), which
skips the dispatcher's per-call cost on long lists. Under ``torch.compile`` the custom
ops are used, so the compiler sees them.

Double backward: the fused backward is a kernel, not differentiable by itself, so
when the backward is being recorded (``create_graph=True``) the same gradient is
computed with the reference backend's differentiable PyTorch ops instead.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import backends
from .backends import reference
from .backends.base import Reduction
from .validation import (ListInfo, check_gradients, check_per_tensor, inspect, inspect_py)


def _contiguous(tensors: Sequence[Tensor], info: ListInfo) -> list[Tensor]:
    return list(tensors) if info.contiguous else [t.contiguous() for t in tensors]


def _write_back(originals: Sequence[Tensor], work: Sequence[Tensor]) -> None:
    """Copies the contiguous stand-ins an in-place kernel updated back into the originals."""
    for original, updated in zip(originals, work):
        if updated is not original:
            original.copy_(updated)


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


def _check_reduce(tensors: Sequence[Tensor], op: int, weights: Optional[Tensor],
                  info: ListInfo) -> Reduction:
    op = _reduction(op)
    if op == Reduction.PENALTY:
        check_per_tensor("weights", weights, (2, len(tensors)), info)
    elif weights is not None:
        raise ValueError(f"regfuse: weights are only taken by the PENALTY reduction, not {op.name}")
    return op


def _check_reduce_backward(tensors: Sequence[Tensor], op: int, grad_out: Tensor,
                           norms: Optional[Tensor], weights: Optional[Tensor], info: ListInfo) -> Reduction:
    op = _check_reduce(tensors, op, weights, info)
    n = len(tensors)
    if op == Reduction.INF:
        raise ValueError("regfuse: the INF reduction has no fused backward")
    shape = () if op == Reduction.PENALTY else (n,)
    if (not isinstance(grad_out, Tensor) or tuple(grad_out.shape) != shape
            or grad_out.device != info.device or not grad_out.is_floating_point()):
        got = (f"{tuple(grad_out.shape)} {grad_out.dtype} on {grad_out.device}"
               if isinstance(grad_out, Tensor) else type(grad_out).__name__)
        raise ValueError(f"regfuse: grad_out must be a floating-point {shape} tensor on "
                         f"{info.device}, got {got}")
    if op == Reduction.L2:
        check_per_tensor("norms", norms, (n,), info)
    return op


def _check_add_grad(grads: Sequence[Tensor], params: Sequence[Tensor], weights: Tensor,
                    info: ListInfo, native: bool = True) -> None:
    check_per_tensor("weights", weights, (2, len(params)), info)
    check_gradients(grads, params, native)


def _check_prox(params: Sequence[Tensor], thresholds: Tensor, info: ListInfo) -> None:
    check_per_tensor("thresholds", thresholds, (len(params),), info)


def run_reduce(tensors: Sequence[Tensor], op: Reduction, weights: Optional[Tensor], backend: str,
               info: Optional[ListInfo] = None) -> Tensor:
    if info is None:
        info = inspect(tensors)
        op = _check_reduce(tensors, op, weights, info)
    impl = backends.resolve(backend, info.device)
    return impl.reduce(_contiguous(tensors, info), op, weights, info.acc_dtype)


def run_reduce_backward(tensors: Sequence[Tensor], op: Reduction, grad_out: Tensor,
                        norms: Optional[Tensor], weights: Optional[Tensor], backend: str) -> list[Tensor]:
    info = inspect(tensors)
    op = _check_reduce_backward(tensors, op, grad_out, norms, weights, info)
    impl = backends.resolve(backend, info.device)
    grads = impl.backward(_contiguous(tensors, info), op, grad_out.to(info.acc_dtype), norms,
                          weights, info.acc_dtype)
    return grads


def run_add_grad_(grads: Sequence[Tensor], params: Sequence[Tensor], weights: Tensor, backend: str,
                  info: Optional[ListInfo] = None) -> None:
    """``grads[i] += weights[0, i] * sign(p_i) + 2 * weights[1, i] * p_i``, fused."""
    if info is None:
        info = inspect(params)
        _check_add_grad(grads, params, weights, info)
    impl = backends.resolve(backend, info.device)
    work = [g if g.is_contiguous() else g.contiguous() for g in grads]
    with torch.no_grad():
        impl.backward(_contiguous(params, info), Reduction.PENALTY, weights.new_ones(()), None,
                      weights, info.acc_dtype, accumulate_into=work)
        _write_back(grads, work)


def run_prox_l1_(params: Sequence[Tensor], thresholds: Tensor, backend: str,
                 info: Optional[ListInfo] = None) -> None:
    if info is None:
        info = inspect(params)
        _check_prox(params, thresholds, info)
    impl = backends.resolve(backend, info.device)
    work = _contiguous(params, info)
    with torch.no_grad():
        impl.prox_l1_(work, thresholds)
        _write_back(params, work)


# ---- torch.library registration -------------------------------------------------------

@torch.library.custom_op("regfuse::reduce", mutates_args=())
def reduce(tensors: list[Tensor], op: int, weights: Optional[Tensor], backend: str) -> Tensor:
    return run_reduce(tensors, _reduction(op), weights, backend)


@reduce.register_fake
def _(tensors, op, weights, backend):
    info = inspect_py(tensors)
    _check_reduce(tensors, op, weights, info)
    shape = () if op == Reduction.PENALTY else (len(tensors),)
    return tensors[0].new_empty(shape, dtype=info.acc_dtype)


@torch.library.custom_op("regfuse::reduce_backward", mutates_args=())
def reduce_backward(tensors: list[Tensor], op: int, grad_out: Tensor, norms: Optional[Tensor],
                    weights: Optional[Tensor], backend: str) -> list[Tensor]:
    grads = run_reduce_backward(tensors, _reduction(op), grad_out, norms, weights, backend)
    # Custom-op outputs may not share storage, and the fused kernels return views of one
    # flat buffer: copy them. Only traced graphs pay this; the eager autograd path below
    # calls the backend directly and keeps the single buffer.
    return [g.clone() for g in grads]


@reduce_backward.register_fake
def _(tensors, op, grad_out, norms, weights, backend):
    _check_reduce_backward(tensors, op, grad_out, norms, weights, inspect_py(tensors))
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]


def _setup_reduce(ctx, inputs, output):
    tensors, op, weights, backend = inputs
    ctx.op = Reduction(op)
    ctx.backend = backend
    ctx.num_tensors = len(tensors)
    ctx.save_for_backward(*tensors, output, weights)


def _tracing(tensors: Sequence[Tensor]) -> bool:
    """Whether the backward is being traced (dynamo, or AOT autograd's fake tensors)."""
    return torch.compiler.is_compiling() or torch._guards.detect_fake_mode(tensors) is not None


def _backward_reduce(ctx, grad_out):
    saved = ctx.saved_tensors
    tensors, norms, weights = list(saved[:ctx.num_tensors]), saved[-2], saved[-1]
    op = ctx.op
    if op == Reduction.INF:
        grads = reference.inf_norm_backward(tensors, norms, grad_out)
    elif torch.is_grad_enabled() and (grad_out.requires_grad or any(t.requires_grad for t in tensors)):
        acc_dtype = norms.dtype
        grads = reference.backward(tensors, op, grad_out.to(acc_dtype), norms, weights, acc_dtype)
    elif _tracing(tensors):
        grads = reduce_backward(tensors, int(op), grad_out, norms, weights, ctx.backend)
    else:
        grads = run_reduce_backward(tensors, op, grad_out, norms, weights, ctx.backend)
    return list(grads), None, None, None


reduce.register_autograd(_backward_reduce, setup_context=_setup_reduce)


class _EagerReduce(torch.autograd.Function):
    """``regfuse::reduce`` with the same autograd, for eager mode.

    The custom op is what the compiler sees; called eagerly it costs a dispatcher round
    trip per tensor of the list and, on first use, a one-time import of the compiler
    stack (seconds). This Function runs the same forward and backward without either.
    """

    @staticmethod
    def forward(ctx, op: int, weights: Optional[Tensor], backend: str, *tensors: Tensor) -> Tensor:
        output = run_reduce(tensors, Reduction(op), weights, backend)
        _setup_reduce(ctx, (tensors, op, weights, backend), output)
        return output

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grads = _backward_reduce(ctx, grad_out)[0]
        return (None, None, None, *grads)


def reduce_with_grad(tensors: list[Tensor], op: Reduction, weights: Optional[Tensor],
                     backend: str) -> Tensor:
    """The differentiable reduction: the custom op under ``torch.compile``, else eager autograd."""
    if torch.compiler.is_compiling():
        return reduce(tensors, int(op), weights, backend)
    return _EagerReduce.apply(int(op), weights, backend, *tensors)


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
