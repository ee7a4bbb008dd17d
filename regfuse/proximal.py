"""Proximal optimization: the exact-zero steps of L1 and the group lasso after every
``optimizer.step()``, with each parameter group's own learning rate.

A penalty in the loss moves weights along its (sub)gradient, so they oscillate around
zero and seldom reach it; the proximal step of the same penalty after the gradient step
(proximal gradient descent, ISTA) sets them exactly to zero. :class:`ProximalStep`
applies :func:`regfuse.prox_l1_` or :func:`regfuse.prox_group_lasso_` from an
``optimizer.register_step_post_hook``, so the training loop does not change.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from . import backends
from .api import prox_l1_
from .groups import _group_dims, prox_group_lasso_
from .validation import as_list, check_nonnegative

__all__ = ["ProximalStep"]


class ProximalStep:
    """After every ``optimizer.step()``, the proximal step of ``l1 * ||w||_1 + group_lasso *
    sum_g sqrt(|g|) * ||w_g||_2`` with the step size ``lr`` of each parameter group.

    Per parameter group, one fused call: ``prox_group_lasso_(params, lr * group_lasso,
    dim=dim, l1_threshold=lr * l1)`` when ``group_lasso > 0`` (the exact step of the
    sparse group lasso), else ``prox_l1_(params, lr * l1)``. The ``lr`` is read at every
    step, so learning-rate schedulers are honoured, and different groups use their own.
    Works with any ``torch.optim`` optimizer (SGD, Adam, AdamW, ...); for SGD it is
    exactly proximal gradient descent, for adaptive optimizers the usual approximation
    that uses ``lr`` as the step size.

    Typical use, pruning whole convolution filters::

        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        prox = regfuse.ProximalStep(optimizer, group_lasso=1e-4,
                                    params=regfuse.WeightRegularizer(model).params)
        for x, y in loader:
            optimizer.zero_grad(); criterion(model(x), y).backward()
            optimizer.step()          # the proximal step runs here, after the update
        prox.remove()

    Args:
        optimizer: a ``torch.optim.Optimizer``.
        l1: non-negative element-wise L1 strength.
        group_lasso: non-negative group lasso strength; groups are slices along ``dim``
            (see :mod:`regfuse.groups`), scaled by ``sqrt(group size)``.
        dim: the group dimension, checked against every selected parameter now.
        params: the parameters to apply it to (each must be in the optimizer), e.g.
            ``WeightRegularizer(model).params`` so that the loss-term route and the
            proximal route select the same weights; ``None`` (default): every parameter
            of the optimizer, biases and normalization parameters included.
        backend: as for the functions it calls.

    A parameter without a ``.grad`` is left alone, as the optimizer leaves it. ``.remove()``
    takes the hook off.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, l1: float = 0.0,
                 group_lasso: float = 0.0, dim: int = 0,
                 params: Optional[Iterable[Tensor]] = None, backend: str = "auto") -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"regfuse: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.l1 = check_nonnegative("l1", l1)
        self.group_lasso = check_nonnegative("group_lasso", group_lasso)
        backends.check_backend_name(backend)
        self.dim = dim
        self.backend = backend
        optimized = [p for group in optimizer.param_groups for p in group["params"]]
        if params is None:
            self._selected: Optional[set[int]] = None
            selected = optimized
        else:
            selected = as_list(params)
            known = {id(p) for p in optimized}
            for i, p in enumerate(selected):
                if not isinstance(p, Tensor):
                    raise TypeError(f"regfuse: params element {i} is a {type(p).__name__}, not a Tensor")
                if id(p) not in known:
                    raise ValueError(f"regfuse: params element {i} (shape {tuple(p.shape)}) is not "
                                     "a parameter of the optimizer")
            self._selected = {id(p) for p in selected}
        if self.group_lasso > 0:  # the only step that uses dim: a bad one is refused now
            _group_dims(selected, dim)
        self._handle = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        for group in optimizer.param_groups:
            params = [p for p in group["params"]
                      if p.grad is not None and (self._selected is None or id(p) in self._selected)]
            if not params:
                continue
            lr = float(group["lr"])
            if self.group_lasso > 0:
                prox_group_lasso_(params, lr * self.group_lasso, dim=self.dim,
                                  l1_threshold=lr * self.l1, backend=self.backend)
            elif self.l1 > 0:
                prox_l1_(params, lr * self.l1, backend=self.backend)

    def remove(self) -> None:
        """Take the hook off the optimizer (idempotent)."""
        self._handle.remove()

    def __repr__(self) -> str:
        return f"ProximalStep(l1={self.l1}, group_lasso={self.group_lasso}, dim={self.dim})"
