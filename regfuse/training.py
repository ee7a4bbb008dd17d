"""Training helpers built on the fused ops: activation and weight regularizers, and the
gradient penalty.

* :class:`ActivationRegularizer` keeps the outputs of chosen modules (forward hooks) and
  turns them into one fused penalty, the PyTorch counterpart of Keras'
  ``activity_regularizer``.
* :class:`WeightRegularizer` selects the weights worth regularizing (no biases, no
  normalization parameters) and applies the penalty as a loss term, as a gradient
  update after ``backward()``, or automatically during ``backward()``.
* :func:`gradient_penalty` is ``weight * sum_i ||d outputs / d inputs_i||**2`` with a
  graph that trains through it (R1 / activation-gradient penalties).

docs/training.md shows each one in a training loop.
"""
from __future__ import annotations

import threading
import warnings
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn
from torch.autograd import Variable

from . import backends
from .api import add_penalty_grad_, penalty
from .groups import _group_dims, add_group_penalty_grad_, group_penalty
from .validation import as_list, check_nonnegative

__all__ = ["ActivationRegularizer", "WeightRegularizer", "gradient_penalty", "select_weights",
           "NORMALIZATION_LAYERS"]

# Every parameter of these layers is left out of weight regularization (as timm's
# weight-decay groups do): scaling a normalized activation is not model complexity.
# Subclasses (SyncBatchNorm, the lazy variants) are covered by isinstance.
NORMALIZATION_LAYERS: tuple[type, ...] = tuple(
    getattr(nn, name) for name in (
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
        "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
        "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
        "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d",
        "LayerNorm", "GroupNorm", "RMSNorm")
    if hasattr(nn, name))  # RMSNorm exists from torch 2.4 on


def _check_coefficients(l1: float, l2: float, backend: str) -> tuple[float, float]:
    backends.check_backend_name(backend)
    return check_nonnegative("l1", l1), check_nonnegative("l2", l2)


# ---- activations ------------------------------------------------------------------------

def _floating_tensors(output: object) -> Iterator[Tensor]:
    """The floating-point tensors of a module output: the tensor itself, or those inside
    (nested) tuples, lists and dict values; integer outputs such as pooling indices and
    non-tensor values are skipped."""
    if isinstance(output, Tensor):
        if output.is_floating_point():
            yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _floating_tensors(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from _floating_tensors(item)


class ActivationRegularizer:
    """An L1/L2 penalty on the outputs of chosen modules, captured by forward hooks.

    Each output a hooked module produces while ``torch.is_grad_enabled()`` is kept
    (nothing under ``torch.no_grad()`` or ``torch.inference_mode()``, so evaluation
    costs nothing). A module called twice in a forward contributes twice; a tuple (or
    list, or dict) output contributes each of its floating-point tensors.

    Typical loop::

        reg = regfuse.ActivationRegularizer([m for m in model.modules()
                                             if isinstance(m, nn.ReLU)], l1=1e-4)
        for x, y in loader:
            loss = criterion(model(x), y) + reg.penalty()
            loss.backward()
            reg.clear()  # drop this step's activations
            ...

    What is kept is the output *tensor*, and the penalty reads it when ``penalty()``
    runs. With ``nn.ReLU(inplace=True)`` the output is the input tensor rectified in
    place, which is exactly the activation: hooking the ReLU works. Hooking the layer
    *before* an in-place ReLU captures a tensor that the ReLU then overwrites, so the
    penalty sees the rectified values (with the ReLU in its gradient); ``penalty()``
    warns when a captured tensor was modified in place after its capture.

    Args:
        modules: one ``nn.Module`` or an iterable of them (each is hooked once).
        l1, l2: the coefficients of ``regfuse.penalty`` (``l2`` multiplies the sum of
            squares).
        backend: as for ``regfuse.penalty``.
    """

    def __init__(self, modules: Union[nn.Module, Iterable[nn.Module]], l1: float = 0.0,
                 l2: float = 0.0, *, backend: str = "auto") -> None:
        self.l1, self.l2 = _check_coefficients(l1, l2, backend)
        self.backend = backend
        modules = [modules] if isinstance(modules, nn.Module) else list(modules)
        for m in modules:
            if not isinstance(m, nn.Module):
                raise TypeError(f"regfuse: expected nn.Module instances, got {type(m).__name__}")
        unique = list({id(m): m for m in modules}.values())
        # Captured tensors with their version counter at capture time (None under
        # torch.compile, where the counter is not traced).
        self._captured: list[tuple[Tensor, Optional[int]]] = []
        self._handles = [m.register_forward_hook(self._capture) for m in unique]

    def _capture(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if not torch.is_grad_enabled():
            return
        compiling = torch.compiler.is_compiling()
        for t in _floating_tensors(output):
            self._captured.append((t, None if compiling else t._version))

    @property
    def captured(self) -> list[Tensor]:
        """The outputs captured since the last :meth:`clear`, in capture order (for
        logging, or as the ``inputs`` of :func:`gradient_penalty`)."""
        return [t for t, _ in self._captured]

    def penalty(self) -> Tensor:
        """``regfuse.penalty(captured, l1, l2)``: one fused launch, differentiable back
        through the network; 0 when nothing was captured."""
        for i, (t, version) in enumerate(self._captured):
            if version is not None and t._version != version:
                warnings.warn(
                    f"regfuse.ActivationRegularizer: captured output {i} was modified in "
                    "place after its capture (an in-place op such as ReLU(inplace=True) "
                    "follows the hooked module); the penalty uses its current values",
                    stacklevel=2)
                break
        return penalty(self.captured, self.l1, self.l2, backend=self.backend)

    def clear(self) -> None:
        """Drop every captured output (call once per step, after ``backward()``)."""
        self._captured.clear()

    def remove(self) -> None:
        """Take the hooks off and drop the captured outputs."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> "ActivationRegularizer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"ActivationRegularizer(hooks={len(self._handles)}, l1={self.l1}, "
                f"l2={self.l2}, captured={len(self._captured)})")


# ---- weights ----------------------------------------------------------------------------

def select_weights(model: nn.Module,
                   exclude_bias_and_norm: bool = True) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs of ``model`` worth regularizing.

    Trainable parameters only (``requires_grad``); with ``exclude_bias_and_norm``, also
    without biases and other 1-D (or 0-d) parameters and without any parameter of a
    normalization layer (:data:`NORMALIZATION_LAYERS`). Shared parameters appear once.
    """
    skipped: set[int] = set()
    if exclude_bias_and_norm:
        for module in model.modules():
            if isinstance(module, NORMALIZATION_LAYERS):
                skipped.update(id(p) for p in module.parameters(recurse=False))
    selected = []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in skipped:
            continue
        if exclude_bias_and_norm and (p.dim() <= 1 or name.endswith("bias")):
            continue
        selected.append((name, p))
    return selected


class _GradientHookHandle:
    """What :meth:`WeightRegularizer.attach` returns: ``.remove()`` detaches it."""

    def __init__(self, owner: "WeightRegularizer", handles: list) -> None:
        self._owner = owner
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._owner._attached is self:
            self._owner._attached = None


class WeightRegularizer:
    """An L1/L2 (and group lasso) penalty on a model's weights, as a loss term or as a
    gradient update.

    From an ``nn.Module``, it selects every trainable parameter except biases (and other
    1-D parameters) and the parameters of normalization layers, as ``timm``'s
    weight-decay groups do (``exclude_bias_and_norm=False`` keeps them all); from an
    iterable of tensors, exactly those. ``.params`` (and ``.names`` for a model) list
    the selection.

    Three ways to apply it, all with the same gradient:

    * ``loss = loss + reg.penalty()`` before ``backward()``;
    * ``reg.add_grad_()`` after ``backward()``, before ``optimizer.step()``: one fused
      pass, no autograd graph;
    * ``reg.attach()`` once: from then on every ``backward()`` adds the penalty gradient
      itself (see :meth:`attach` for the rule).

    Unlike an optimizer's ``weight_decay`` (coupled L2 on *every* parameter, biases and
    norm scales included, and L2 only), this is L1 and/or L2 on the weights alone; unlike
    AdamW's decoupled decay, its gradient goes through the optimizer's scaling, as a
    penalty in the loss does. docs/training.md compares the three.

    ``group_lasso > 0`` adds ``group_lasso * sum_g sqrt(|g|) * ||w_g||_2`` over the groups
    (slices along ``group_dim``: output filters and neurons for 0) of every selected
    weight, :func:`regfuse.group_penalty`, to all three routes. For exact zeros use the
    proximal route on the same selection instead:
    ``regfuse.ProximalStep(optimizer, group_lasso=..., dim=..., params=reg.params)``.
    """

    def __init__(self, model_or_params: Union[nn.Module, Iterable[Tensor]], l1: float = 0.0,
                 l2: float = 0.0, *, group_lasso: float = 0.0, group_dim: int = 0,
                 exclude_bias_and_norm: bool = True, backend: str = "auto") -> None:
        self.l1, self.l2 = _check_coefficients(l1, l2, backend)
        self.group_lasso = check_nonnegative("group_lasso", group_lasso)
        self.group_dim = group_dim
        self.backend = backend
        if isinstance(model_or_params, nn.Module):
            named = select_weights(model_or_params, exclude_bias_and_norm)
            self.names: Optional[list[str]] = [name for name, _ in named]
            self.params: list[Tensor] = [p for _, p in named]
        else:
            self.names = None
            self.params = as_list(model_or_params)
            for i, p in enumerate(self.params):
                if not isinstance(p, Tensor):
                    raise TypeError(f"regfuse: element {i} is a {type(p).__name__}, not a torch.Tensor")
        if self.group_lasso > 0:
            _group_dims(self.params, group_dim)  # refused now rather than at the first step
        self._attached: Optional[_GradientHookHandle] = None
        self._lock = threading.Lock()
        self._pending: dict[int, list[Tensor]] = {}  # backward id -> params with a new grad

    def penalty(self) -> Tensor:
        """``regfuse.penalty(params, l1, l2)`` (plus ``regfuse.group_penalty(params,
        group_lasso, dim=group_dim)``): the loss term (0-d, differentiable)."""
        if self.group_lasso == 0:
            return penalty(self.params, self.l1, self.l2, backend=self.backend)
        if self.l2 == 0:  # the sparse group lasso: both terms from one read
            return group_penalty(self.params, self.group_lasso, dim=self.group_dim, l1=self.l1,
                                 backend=self.backend)
        return (penalty(self.params, self.l1, self.l2, backend=self.backend)
                + group_penalty(self.params, self.group_lasso, dim=self.group_dim, backend=self.backend))

    def add_grad_(self) -> None:
        """``p.grad += l1 * sign(p) + 2 * l2 * p`` (plus the group lasso gradient) for every
        selected parameter, fused.

        Call after ``backward()``; a parameter whose ``.grad`` is ``None`` gets the term
        alone, exactly as if ``penalty()`` had been added to the loss."""
        self._add_grads(self.params)

    def _add_grads(self, params: list[Tensor]) -> None:
        if self.l1 or self.l2 or not self.group_lasso:
            add_penalty_grad_(params, self.l1, self.l2, backend=self.backend)
        if self.group_lasso:
            add_group_penalty_grad_(params, self.group_lasso, dim=self.group_dim, backend=self.backend)

    def attach(self) -> _GradientHookHandle:
        """Add the penalty gradient during every ``backward()``; returns a handle with
        ``.remove()``.

        Each selected parameter gets a ``register_post_accumulate_grad_hook`` that only
        records it. The first one to fire in a backward queues a callback on the
        autograd engine, which runs after every other callback of that backward and
        applies one fused ``add_penalty_grad_`` over the parameters recorded in it: one
        launch per backward, not one per parameter.

        The rule: each ``backward()`` adds the penalty gradient once to every selected
        parameter that received a gradient in it. A parameter that gets no gradient in a
        backward (unused in that forward, or outside the part of the graph that was
        differentiated) gets no penalty gradient from it, so its ``.grad`` stays
        ``None`` when it was. With gradient accumulation over ``k`` backward passes per
        optimizer step, the penalty gradient is added ``k`` times, as when the penalty is
        added to each micro-batch loss: scale ``l1``, ``l2`` by ``1/k``, or call
        :meth:`add_grad_` once before the step instead. ``torch.autograd.grad`` does
        not fill ``.grad`` and triggers nothing.

        Under ``DistributedDataParallel`` and FSDP2 (``fully_shard``) the update runs after
        the engine has finished the gradients: after DDP's all-reduce (the term is added
        once, to the averaged gradient, identically on every rank) and after FSDP2's
        reduce-scatter (on the local gradient shards). FSDP1 parameters are refused
        (``TypeError``): it accumulates into flat parameters, where the hooks never fire.
        """
        if self._attached is not None:
            raise RuntimeError("regfuse: this WeightRegularizer is already attached; "
                               "call .remove() on the handle first")
        for i, p in enumerate(self.params):
            if not (p.requires_grad and p.is_leaf):
                raise ValueError(f"regfuse: attach() needs leaf tensors that require grad; "
                                 f"parameter {i} is not one")
            if getattr(p, "_fsdp_flattened", False):
                # FSDP (v1) accumulates into its flat parameters: these hooks would never fire.
                raise TypeError(f"regfuse: attach() cannot follow FullyShardedDataParallel (FSDP1) "
                                f"parameters (parameter {i} is flattened by it); use FSDP2 "
                                "(torch.distributed.fsdp.fully_shard), or penalty() in the loss")
        handles = [p.register_post_accumulate_grad_hook(self._on_grad_accumulated)
                   for p in self.params]
        self._attached = _GradientHookHandle(self, handles)
        return self._attached

    def _on_grad_accumulated(self, param: Tensor) -> None:
        # Keyed by the running backward, so that a backward nested in another one
        # (reentrant checkpointing) flushes its own parameters at its own end.
        backward_id = torch._C._current_graph_task_id()
        with self._lock:
            pending = self._pending.get(backward_id)
            if pending is None:
                pending = self._pending[backward_id] = []
                Variable._execution_engine.queue_callback(lambda: self._flush_after_engines(backward_id))
            pending.append(param)

    def _flush_after_engines(self, backward_id: int) -> None:
        # The engine runs the callbacks of a backward in the order they were queued, and a
        # callback queued by a callback after all of them. DDP (whose finalization waits for
        # the all-reduce and copies the averaged buckets into .grad) and FSDP2 (whose root
        # callback waits for the reduce-scatter) queue theirs during the backward, so
        # requeueing once puts the fused update after every gradient is final: it is added
        # once, to the averaged gradient, never while a collective still writes it.
        Variable._execution_engine.queue_callback(lambda: self._flush(backward_id))

    def _flush(self, backward_id: int) -> None:
        with self._lock:
            params = self._pending.pop(backward_id, [])
        if params:
            self._add_grads(params)

    def __repr__(self) -> str:
        group = f"group_lasso={self.group_lasso}, group_dim={self.group_dim}, " if self.group_lasso else ""
        return (f"WeightRegularizer(params={len(self.params)}, l1={self.l1}, l2={self.l2}, {group}"
                f"attached={self._attached is not None})")


# ---- gradient penalty -------------------------------------------------------------------

def gradient_penalty(outputs: Tensor, inputs: Union[Tensor, Iterable[Tensor]], weight: float = 1.0,
                     *, backend: str = "auto") -> Tensor:
    """``weight * sum_i ||d outputs / d inputs_i||_2**2``, differentiable.

    The gradients come from ``torch.autograd.grad(..., create_graph=True)``, so
    ``backward()`` on the result (or on a loss it is added to) trains through them; they
    are then reduced by one fused ``regfuse.penalty(grads, l2=weight)``. Nothing is
    written to any ``.grad`` by this call, and the ``backward()`` that follows fills the
    ``.grad`` of leaves only (parameters), never of activations.

    Args:
        outputs: a tensor of the graph; a non-scalar one is summed first, which gives
            the gradient of the sum (for per-sample outputs of independent samples, the
            per-sample gradients).
        inputs: one tensor or an iterable of tensors of the graph (activations, inputs
            or parameters). An input that ``outputs`` does not depend on has a zero
            gradient and contributes 0.
        weight: the non-negative coefficient.
        backend: as for ``regfuse.penalty``.

    Returns:
        A 0-d tensor (float32, float64 where a gradient is float64). It is a constant 0
        when no input influences ``outputs``.
    """
    weight = check_nonnegative("weight", weight)
    backends.check_backend_name(backend)
    inputs = [inputs] if isinstance(inputs, Tensor) else as_list(inputs)
    if not isinstance(outputs, Tensor):
        raise TypeError(f"regfuse: outputs must be a Tensor, got {type(outputs).__name__}")
    if not inputs:
        raise ValueError("regfuse: gradient_penalty needs at least one input")
    if not outputs.requires_grad:
        raise RuntimeError("regfuse: gradient_penalty needs outputs that are part of an autograd "
                           "graph (computed with grad enabled from tensors that require grad)")
    total = outputs if outputs.dim() == 0 else outputs.sum()
    grads = torch.autograd.grad(total, inputs, create_graph=True, allow_unused=True)
    used = [g for g in grads if g is not None]
    if not used:
        return torch.zeros((), device=outputs.device)
    return penalty(used, l2=weight, backend=backend)
