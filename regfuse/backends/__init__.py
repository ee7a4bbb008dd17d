"""Backend registry: which backends exist, which can run here, and what ``"auto"`` picks.

A backend is a module implementing :class:`regfuse.backends.base.Backend`. Adding one
means writing that module, adding a line to ``_MODULES`` and placing it in the
``_AUTO_ORDER`` of the devices it serves.

What can run where is decided once per (backend, device type) and kept, failures
included: a missing Triton or extension costs its import attempt once per device type, not
on every call (``"auto"`` is resolved on every call of every op). Nothing that decides it
changes while a process runs: the extension and Triton are imported once, Triton reads
``TRITON_INTERPRET`` when it is first imported, and CUDA availability is fixed.
:func:`forget` clears what was decided (for tests that change it).
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
# (backend, device type) -> None or why not; device type -> the backends "auto" may
# pick there, fastest first; (name, device type) -> the module resolve() returns.
_reasons: dict[tuple[str, str], Optional[str]] = {}
_available: dict[str, list[str]] = {}
_resolved: dict[tuple[str, str], ModuleType] = {}


def forget() -> None:
    """Forget every decision on what can run where; the next call decides again."""
    for cache in (_loaded, _import_errors, _reasons, _available, _resolved):
        cache.clear()


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
    device = torch.device(device)
    key = (name, device.type)
    if key not in _reasons:
        module = _module(name)
        _reasons[key] = _import_errors[name] if module is None else module.unavailable_reason(device)
    return _reasons[key]


def _usable(device_type: str) -> list[str]:
    names = _available.get(device_type)
    if names is None:
        order = _AUTO_ORDER.get(device_type, ("reference",))
        device = torch.device(device_type)
        names = _available[device_type] = [n for n in order if unavailable_reason(n, device) is None]
    return names


def available_backends(device: "str | torch.device" = "cpu") -> list[str]:
    """The backends usable for tensors on ``device`` here, fastest first."""
    return list(_usable(torch.device(device).type))


def check_backend_name(name: str) -> None:
    if name != "auto" and name not in _MODULES:
        raise ValueError(f"regfuse: unknown backend {name!r}; expected 'auto' or one of {list(NAMES)}")


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module to run for ``name`` on ``device``; raises if it cannot run here.

    A dictionary lookup once ``name`` has been resolved for ``device``'s type."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    module = _resolved.get((name, device_type))
    if module is not None:
        return module
    check_backend_name(name)
    if name == "auto":
        module = _module(_usable(device_type)[0])
    else:
        reason = unavailable_reason(name, device)
        if reason is not None:
            raise RuntimeError(f"regfuse backend {name!r} is not available for {device} tensors: {reason}")
        module = _module(name)
    _resolved[(name, device_type)] = module
    return module
