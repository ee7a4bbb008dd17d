"""One pass over a tensor list: argument checks and what the dispatch needs to know.

The C++ extension does the same pass in native code (``regfuse._C.inspect``) because a
Python loop over 2,000 tensors costs more than the fused kernel itself; the Python
version below is the specification and the fallback when the extension is not built.
Both raise the same exceptions with the same messages.
"""
from __future__ import annotations

import functools
import math
from typing import Iterable, NamedTuple, Sequence

import torch
from torch import Tensor

try:
    from regfuse import _C
except ImportError:  # the package must work (reference backend) without the extension
    _C = None


def native_extension():
    """The extension for a native pass, or ``None`` where the Python pass runs instead:
    without a build, and while ``torch.compile`` traces (dynamo cannot trace into the
    extension, and its tensors are fakes without data)."""
    return None if _C is None or torch.compiler.is_compiling() else _C


SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class ListInfo(NamedTuple):
    device: torch.device
    acc_dtype: torch.dtype  # float64 where any tensor is float64, else float32
    requires_grad: bool  # any tensor requires grad
    contiguous: bool  # every tensor is contiguous


def _check_not_empty(tensors: list) -> None:
    if len(tensors) == 0:
        raise ValueError("regfuse: the tensor list is empty; the ops need at least one tensor")


def inspect_py(tensors: list) -> ListInfo:
    """Reference implementation of ``_C.inspect``."""
    _check_not_empty(tensors)
    device = None
    acc_dtype = torch.float32
    requires_grad = False
    contiguous = True
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"regfuse: element {i} is a {type(t).__name__}, not a torch.Tensor")
        check_readable(t, f"tensor {i}")
        if t.layout != torch.strided:
            raise TypeError(f"regfuse: tensor {i} has layout {t.layout}; dense (strided) tensors only")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"regfuse: tensor {i} has dtype {t.dtype}; expected float32, float64, "
                "float16 or bfloat16")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(
                f"regfuse: all tensors must be on one device; tensor 0 is on {device}, "
                f"tensor {i} on {t.device}")
        if t.dtype == torch.float64:
            acc_dtype = torch.float64
        requires_grad = requires_grad or t.requires_grad
        contiguous = contiguous and t.is_contiguous()
    return ListInfo(device, acc_dtype, requires_grad, contiguous)


@functools.lru_cache(maxsize=None)
def _tracing_classes() -> tuple:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    return FakeTensor, FunctionalTensor


def is_traced(t: Tensor) -> bool:
    """A tensor of the compiler's tracing (fake or functional): only shapes, no kernel runs."""
    return isinstance(t, _tracing_classes())


def check_readable(t: Tensor, what: str) -> None:
    """Refuse a tensor whose data the kernels cannot read through its pointer.

    A subclass with ``__torch_dispatch__`` (a wrapper subclass such as DTensor outside a
    DTensor list, or any subclass that decides in Python what its storage means) and a
    nested tensor would hand a kernel a null or foreign pointer. ``nn.Parameter`` and
    plain subclasses (``__torch_function__`` only) are ordinary tensors and pass. The
    same test runs natively in ``_C.inspect``, which then hands over to this pass.
    """
    if t.is_nested:
        raise TypeError(f"regfuse: {what} is a nested tensor; dense (strided) tensors only")
    if torch._C._dispatch_keys(t).has(torch._C.DispatchKey.Python) and not is_traced(t):
        kind = type(t)
        if kind.__name__ == "DTensor":
            reason = ("a DTensor where regfuse expects a plain tensor: the public functions take "
                      "DTensors in their tensor list (on any device meshes, plain tensors mixed "
                      "in), not in other arguments")
        else:
            reason = ("a tensor subclass whose data regfuse's kernels cannot read; plain tensors, "
                      "nn.Parameter and lists of DTensors are supported")
        raise TypeError(f"regfuse: {what} is a {kind.__module__}.{kind.__qualname__}, {reason}")


def inspect(tensors: list) -> ListInfo:
    """Check a non-empty tensor list and summarize it (native pass where built)."""
    _check_not_empty(tensors)
    extension = native_extension()
    if extension is None:  # the compiler traces the Python pass
        return inspect_py(tensors)
    summary = extension.inspect(tensors if isinstance(tensors, list) else list(tensors))
    if summary is None:  # something is wrong: the Python pass says exactly what
        return inspect_py(tensors)
    acc_double, requires_grad, contiguous = summary
    return ListInfo(tensors[0].device, torch.float64 if acc_double else torch.float32,
                    requires_grad, contiguous)


def as_list(tensors: "Iterable[Tensor] | Tensor") -> list:
    """The user's tensors as a list: one tensor, or any iterable of them (a generator
    such as ``model.parameters()`` too), as torch's utilities take them."""
    if isinstance(tensors, list):  # the common case: a shallow copy, no iteration in Python
        return tensors.copy()
    if isinstance(tensors, Tensor):
        return [tensors]
    try:
        return list(tensors)
    except TypeError:
        raise TypeError(f"regfuse: expected a tensor or an iterable of tensors, got "
                        f"{type(tensors).__name__}") from None


def check_nonnegative(name: str, value: float) -> float:
    """``value`` as a float, if it is finite and >= 0 (an inf or NaN strength would turn
    every result into inf or NaN)."""
    value = float(value)
    if not (value >= 0 and math.isfinite(value)):  # also refuses NaN
        raise ValueError(f"regfuse: {name} must be a finite non-negative number, got {value}")
    return value


def check_max_norm(value: float) -> float:
    """``max_norm`` of ``clip_grad_norm_`` as a float: >= 0, ``inf`` allowed (no clipping)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not number >= 0:  # also refuses NaN
        raise ValueError(f"regfuse: max_norm must be a non-negative number or float('inf'), got {value!r}")
    return number


def _first_overlap_py(tensors: list) -> "tuple[int, int] | None":
    ranges = []
    for i, t in enumerate(tensors):
        if t.numel():
            last = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
            ranges.append((t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size(), i))
    ranges.sort()
    for (_, end, i), (begin, _, j) in zip(ranges, ranges[1:]):
        if begin < end:
            return min(i, j), max(i, j)
    return None


def check_distinct(tensors: list) -> None:
    """Refuse a list that names the same memory twice: an in-place op would race with itself.

    Not while ``torch.compile`` traces (fakes have no addresses): the custom op checks
    the real tensors when the compiled graph runs it (:mod:`regfuse.ops`)."""
    if torch.compiler.is_compiling():
        return
    overlap = _first_overlap_py(tensors) if _C is None else _C.first_overlap(tensors)
    if overlap is not None:
        i, j = overlap
        raise ValueError(f"regfuse: tensors {i} and {j} share memory; an in-place update needs "
                         "distinct tensors")


# ---- arguments of the custom ops -------------------------------------------------------
# regfuse.api builds these itself; torch.ops.regfuse.* can be called with anything, and
# the kernels index them by tensor (the C++ binding checks them again where it takes
# their raw pointers).

def check_per_tensor(name: str, table, shape: tuple, info: ListInfo) -> None:
    """A tensor of per-tensor numbers (weights, scales, thresholds, norms): exactly
    ``shape``, dense, in the list's accumulation dtype, on the list's device."""
    if table is None:
        raise ValueError(f"regfuse: {name} are required: a {shape} {info.acc_dtype} tensor")
    if not isinstance(table, Tensor):
        raise TypeError(f"regfuse: {name} must be a tensor, got {type(table).__name__}")
    if (tuple(table.shape) != shape or table.dtype != info.acc_dtype or table.device != info.device
            or table.layout != torch.strided):
        raise ValueError(
            f"regfuse: {name} must be a dense {shape} {info.acc_dtype} tensor on {info.device} "
            f"(the list's accumulation dtype and device), got {tuple(table.shape)} {table.dtype} "
            f"{table.layout} on {table.device}")


def check_gradients(grads: list, params: list, native: bool = True) -> None:
    """Gradients an op writes into: one per tensor, each dense and shaped, typed and placed
    like its tensor (a native pass where built, unless ``native=False``: fake tensors with
    symbolic shapes have no native sizes)."""
    extension = native_extension() if native else None
    if extension is not None:
        extension.check_gradients(list(grads), list(params))
        return
    if len(grads) != len(params):
        raise ValueError(f"regfuse: {len(grads)} gradients for {len(params)} tensors; "
                         "one gradient per tensor")
    for i, (g, p) in enumerate(zip(grads, params)):
        if not isinstance(g, Tensor) or g.layout != torch.strided:
            raise TypeError(f"regfuse: gradient {i} must be a dense tensor, got {type(g).__name__}")
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise ValueError(
                f"regfuse: gradient {i} ({tuple(g.shape)}, {g.dtype}, {g.device}) does not match "
                f"its tensor ({tuple(p.shape)}, {p.dtype}, {p.device})")


def bump_versions(modified: Sequence[Tensor]) -> None:
    """Tell autograd that kernels wrote these tensors through raw pointers, so that a graph
    which saved them refuses to run a stale backward (for DTensors: their local shards,
    whose version counters are their own)."""
    if not modified:
        return
    try:
        torch.autograd.graph.increment_version(modified)
    except TypeError:  # older torch takes one tensor at a time
        for t in modified:
            torch.autograd.graph.increment_version(t)
