"""Recipes for the training frameworks, one module each, imported only when asked for
(``import regfuse`` never imports a framework):

* :mod:`regfuse.integrations.accelerate`: ``accelerator.clip_grad_norm_``, fused
  (:func:`~regfuse.integrations.accelerate.use_regfuse_clipping`);
* :mod:`regfuse.integrations.transformers`: a ``transformers.Trainer`` that clips with
  ``regfuse.clip_grad_norm_`` and adds a regfuse penalty to the loss, logging it
  (:class:`~regfuse.integrations.transformers.RegfuseTrainer`, or the mixin);
* :mod:`regfuse.integrations.lightning`: a Lightning callback for clipping, weight
  penalties and the proximal step
  (:class:`~regfuse.integrations.lightning.RegfuseCallback`).

docs/integrations.md shows each one.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, package: str, integration: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ``ImportError`` saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"regfuse.integrations.{integration} needs {package} "
                          f"(pip install {package}): {err}") from err
