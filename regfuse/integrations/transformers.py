"""A Hugging Face ``transformers.Trainer`` with regfuse's clipping and a logged penalty.

::

    from regfuse.integrations.transformers import RegfuseTrainer

    trainer = RegfuseTrainer(model=model, args=TrainingArguments(..., max_grad_norm=1.0),
                             train_dataset=data,
                             regularizer=regfuse.WeightRegularizer(model, l2=1e-4))
    trainer.train()   # logs "loss" (penalty included), "penalty" and "grad_norm"

or ``class MyTrainer(RegfuseTrainerMixin, SomeTrainerSubclass)`` to add it to another
Trainer (``Seq2SeqTrainer``, TRL's trainers).

**Clipping.** The Trainer clips in a private method (``_clip_grad_norm`` in
transformers 5; inline in ``_inner_training_loop`` in 4.x), which calls
``self.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)`` in every
version (but for 4.x's apex AMP path); the logged ``grad_norm`` is its result. The
mixin makes that method of the Trainer's accelerator the fused one (:func:`regfuse.integrations.accelerate.
use_regfuse_clipping`, which keeps the unscaling and DeepSpeed/XLA/FSDP1 hand-offs of
Accelerate) each time the Trainer creates its accelerator
(``create_accelerator_and_postprocess``, in ``__init__`` and again for a
hyper-parameter search), so no private method is overridden.

**Penalty.** ``compute_loss`` adds ``regularizer.penalty()`` to the training loss (not to
the evaluation loss), once per optimizer step whatever the gradient accumulation: the
Trainer divides an unscaled loss by the accumulation steps itself, and a loss it takes
as already normalized over the accumulated batch (``num_items_in_batch``) gets the
penalty divided by them here. The logged ``loss`` includes the penalty, and
``penalty`` (or ``penalty_log_name``) logs its mean over the steps since the last log.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from . import require
from .accelerate import use_regfuse_clipping

_transformers = require("transformers", "transformers", "transformers")
# What the mixin relies on, all there from 4.46 on: the accelerator created in
# create_accelerator_and_postprocess, and compute_loss(..., num_items_in_batch) with the
# gradient-accumulation normalization that training_step applies after it.
MIN_VERSION = (4, 46)
_found = tuple(int(x) for x in _transformers.__version__.split(".")[:2] if x.isdigit())
if _found < MIN_VERSION:
    raise ImportError(f"regfuse.integrations.transformers needs transformers >= 4.46, found "
                      f"{_transformers.__version__} (pip install -U transformers)")

__all__ = ["RegfuseTrainerMixin", "RegfuseTrainer"]

Regularizer = Union[Callable[[], Tensor], Any]  # a zero-argument callable or anything with .penalty()


class RegfuseTrainerMixin:
    """Mix in before a ``transformers.Trainer`` (sub)class: fused clipping, and
    ``regularizer``'s penalty added to the training loss and logged.

    Args (keyword, besides the Trainer's own):
        regularizer: ``None`` (clipping only), an object with a ``penalty()`` method
            returning a 0-d tensor (:class:`regfuse.WeightRegularizer`,
            :class:`regfuse.ActivationRegularizer`, whose ``clear()`` is called after each
            penalty), or a zero-argument callable returning it.
        penalty_log_name: the key of the logged penalty.
    """

    def __init__(self, *args: Any, regularizer: Optional[Regularizer] = None,
                 penalty_log_name: str = "penalty", **kwargs: Any) -> None:
        if regularizer is not None and not (hasattr(regularizer, "penalty") or callable(regularizer)):
            raise TypeError("regfuse: regularizer must have a penalty() method or be a "
                            f"zero-argument callable, got {type(regularizer).__name__}")
        self.regularizer = regularizer
        self.penalty_log_name = penalty_log_name
        self._penalty_sum: Optional[Tensor] = None  # since the last log, on the device
        self._penalty_count = 0  # micro-batches in _penalty_sum
        super().__init__(*args, **kwargs)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        use_regfuse_clipping(self.accelerator)

    def _penalty(self) -> Tensor:
        reg = self.regularizer
        if hasattr(reg, "penalty"):
            value = reg.penalty()
            if callable(getattr(reg, "clear", None)):
                reg.clear()  # an ActivationRegularizer: drop this forward's activations
            return value
        return reg()

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Whether the Trainer takes this loss as already normalized over the accumulated
        batch, and so does not divide it by the accumulation steps (the test of
        ``Trainer.training_step``; its explicit ``loss_is_scaled_for_ga`` first)."""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        return bool((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None,
                     **kwargs: Any):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch, **kwargs)
        if self.regularizer is None or not model.training or not torch.is_grad_enabled():
            return result
        loss, outputs = result if return_outputs else (result, None)
        penalty = self._penalty()
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            loss = loss + penalty / steps
        else:
            loss = loss + penalty  # the Trainer divides the whole loss by `steps`
        detached = penalty.detach()
        self._penalty_sum = detached if self._penalty_sum is None else self._penalty_sum + detached
        self._penalty_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._penalty_count:
            # The parameters do not change within an optimizer step, so the mean over the
            # micro-batches is the mean per step: the penalty's share of the logged loss.
            logs[self.penalty_log_name] = self._penalty_sum.item() / self._penalty_count
            self._penalty_sum, self._penalty_count = None, 0
        super().log(logs, *args, **kwargs)


class RegfuseTrainer(RegfuseTrainerMixin, _transformers.Trainer):
    """``transformers.Trainer`` with :class:`RegfuseTrainerMixin`."""
