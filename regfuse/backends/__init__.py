"""Backend registry: which backends exist, which can run here, and what ``"auto"`` picks.

A backend is a module implementing :class:`regfuse.backends.base.Backend`. Adding one
means writing that module, adding a line to ``_MODULES`` and placing it in the
``_AUTO_ORDER`` of the devices it serves.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import torch

# Fastest first per device; "auto" takes the first one that is available.
_MODULES = {
    "cpu": "regfuse.backends.cpu",
    "cuda": "regfuse.backends.cuda",
    "triton": "regfuse.backends.triton",
    "reference": "regfuse.backends.reference",
}
_AUTO_ORDER = {
    # Triton on CPU is the (slow) interpreter, cuda the (slower) emulation: never picked
    "cpu": ("cpu", "reference", "triton", "cuda"),
    "cuda": ("cuda", "triton", "reference"),
}

NAMES = tuple(_MODULES)

_loaded: dict[str, ModuleType] = {}
_import_errors: dict[str, str] = {}


def _module(name: str) -> Optional[ModuleType]:
    if name not in _loaded and name not in _import_errors:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except Exception as exc:  # a missing extension or Triton must not break the package
            _import_errors[name] = f"{type(exc).__name__}: {exc}"
    return _loaded.get(name)


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """``None`` if backend ``name`` can run on ``device`` here, else the reason it cannot."""
    check_backend_name(name)
    if name == "auto":
        raise ValueError("regfuse: 'auto' is not a backend; ask for a backend by name")
    module = _module(name)
    if module is None:
        return _import_errors[name]
    return module.unavailable_reason(torch.device(device))


def available_backends(device: "str | torch.device" = "cpu") -> list[str]:
    """The backends usable for tensors on ``device`` here, fastest first."""
    device = torch.device(device)
    order = _AUTO_ORDER.get(device.type, ("reference",))
    return [name for name in order if unavailable_reason(name, device) is None]


def check_backend_name(name: str) -> None:
    if name != "auto" and name not in _MODULES:
        raise ValueError(f"regfuse: unknown backend {name!r}; expected 'auto' or one of {list(NAMES)}")


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module to run for ``name`` on ``device``; raises if it cannot run here."""
    check_backend_name(name)
    if name == "auto":
        return _module(available_backends(device)[0])
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"regfuse backend {name!r} is not available for {device} tensors: {reason}")
    return _module(name)
