"""A Lightning callback: fused gradient clipping, weight penalties and the proximal step.

::

    from regfuse.integrations.lightning import RegfuseCallback

    trainer = lightning.Trainer(callbacks=[RegfuseCallback(max_norm=1.0, l2=1e-4, prox_l1=1e-5)])
    trainer.fit(module)   # logs "grad_norm" and "penalty"

Everything happens where Lightning clips: in ``on_before_optimizer_step``, once per
optimizer step (after gradient accumulation, and after the AMP gradient scaler has
unscaled the gradients), in this order:

1. the penalty ``l1 * ||w||_1 + l2 * ||w||_2**2`` (and the group lasso) of the weights
   :class:`regfuse.WeightRegularizer` selects is added to their gradients
   (:meth:`~regfuse.WeightRegularizer.add_grad_`: the gradient route, the same update as
   adding the penalty to the loss, which is therefore not in the logged loss: the
   callback logs ``penalty``, one more fused pass);
2. the gradients of the optimizer's parameters are clipped to ``max_norm`` by
   :func:`regfuse.clip_grad_norm_` and the total norm before clipping is logged as
   ``grad_norm``, what ``Trainer(gradient_clip_val=max_norm)`` does with
   ``torch.nn.utils.clip_grad_norm_``, unlogged (do not set both);
3. after ``optimizer.step()``, the proximal L1 / group lasso step with the optimizer's
   learning rate (:class:`regfuse.ProximalStep` on every optimizer of the fit).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

import regfuse

from . import require

try:
    _pl = require("lightning.pytorch", "lightning", "lightning")
except ImportError:  # the standalone package of the same code
    _pl = require("pytorch_lightning", "lightning", "lightning")

__all__ = ["RegfuseCallback"]


class RegfuseCallback(_pl.Callback):
    """Clipping, penalties and proximal steps for ``lightning.Trainer(callbacks=[...])``.

    Args:
        max_norm: clip the total gradient norm to this (``None``: no clipping; the
            norm is then not logged either). Leave the Trainer's ``gradient_clip_val``
            unset: setting both raises at the start of ``fit``.
        norm_type: the order of the clipped norm.
        l1, l2, group_lasso, group_dim: the penalty added to the gradients of the weights
            selected by ``regfuse.WeightRegularizer(module, ...)`` (biases and
            normalization parameters left out unless ``exclude_bias_and_norm=False``).
        prox_l1, prox_group_lasso: strengths of the proximal step after every optimizer
            step, with the same weights selected (threshold ``lr * strength``).
        exclude_bias_and_norm: as for :class:`regfuse.WeightRegularizer`.
        log: log ``grad_norm`` and ``penalty`` with ``LightningModule.log`` (per step).
    """

    def __init__(self, max_norm: Optional[float] = None, norm_type: float = 2.0, *, l1: float = 0.0,
                 l2: float = 0.0, group_lasso: float = 0.0, group_dim: int = 0, prox_l1: float = 0.0,
                 prox_group_lasso: float = 0.0, exclude_bias_and_norm: bool = True,
                 log: bool = True) -> None:
        super().__init__()
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.penalty_args = {"l1": l1, "l2": l2, "group_lasso": group_lasso, "group_dim": group_dim,
                             "exclude_bias_and_norm": exclude_bias_and_norm}
        self.prox_args = {"l1": prox_l1, "group_lasso": prox_group_lasso, "dim": group_dim}
        self.log_values = log
        self.regularizer: Optional[regfuse.WeightRegularizer] = None
        self._proximal: list[regfuse.ProximalStep] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.max_norm is not None and trainer.gradient_clip_val:
            raise ValueError("regfuse: RegfuseCallback(max_norm=...) clips the gradients; leave "
                             "Trainer(gradient_clip_val=...) unset, or they are clipped twice")
        penalized = any(self.penalty_args[k] > 0 for k in ("l1", "l2", "group_lasso"))
        proximal = any(v > 0 for k, v in self.prox_args.items() if k != "dim")
        if penalized or proximal:
            self.regularizer = regfuse.WeightRegularizer(pl_module, **self.penalty_args)
        if proximal:
            selected = {id(p) for p in self.regularizer.params}
            for optimizer in trainer.optimizers:
                owned = [p for group in optimizer.param_groups for p in group["params"] if id(p) in selected]
                if owned:
                    self._proximal.append(regfuse.ProximalStep(optimizer, params=owned, **self.prox_args))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        reg = self.regularizer
        if reg is not None and (reg.l1 > 0 or reg.l2 > 0 or reg.group_lasso > 0):
            if self.log_values:
                with torch.no_grad():
                    value = reg.penalty()
                pl_module.log("penalty", value, on_step=True, on_epoch=False)
            reg.add_grad_()
        if self.max_norm is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            total = regfuse.clip_grad_norm_(params, self.max_norm, self.norm_type)
            if self.log_values:
                pl_module.log("grad_norm", total, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        for step in self._proximal:
            step.remove()
        self._proximal = []

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.on_fit_end(trainer, pl_module)  # an interrupted fit leaves no hook behind
