"""Shared test material: named tensor-list cases, float64 oracles, tolerances, asserts.

The oracles are plain PyTorch formulas evaluated in float64 on the same inputs upcast
(half inputs are exact in float64), so every backend, the reference one included, is
checked against something it does not share code with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
DTYPE_NAMES = {F32: "f32", F64: "f64", F16: "f16", BF16: "bf16"}
INF = math.inf

# p and squared of every norm that regfuse.norms computes, with readable test ids: the
# fast paths (1, 2, inf, squared), the general kernel (p < 1 and p > 2), the count of
# nonzeros (0) and min |x| (-inf).
NORM_KINDS = [(1, False), (2, False), (INF, False), (2, True), (0.5, False), (3, False), (0, False),
              (-INF, False)]
NORM_IDS = ["l1", "l2", "linf", "squared", "p0.5", "p3", "l0", "lneginf"]
# The orders alone (what total_norm and clip_grad_norm_ take).
ORDERS = [p for p, squared in NORM_KINDS if not squared]
ORDER_IDS = [name for name, (p, squared) in zip(NORM_IDS, NORM_KINDS) if not squared]

# ---- tensor-list cases -------------------------------------------------------------

Rand = Callable[..., Tensor]  # rand(shape, dtype, scale=1.0) -> Tensor on the case's device


def _single(rand: Rand, dtype: torch.dtype) -> list[Tensor]:
    return [rand((37, 5), dtype)]


def _odd_sizes(rand: Rand, dtype: torch.dtype) -> list[Tensor]:
    # Sizes that are not multiples of any block or vector width.
    return [rand((1023,), dtype), rand((4097,), dtype, 3.0), rand((3, 7, 11), dtype, 0.25)]


def _zero_d(rand: Rand, dtype: torch.dtype) -> list[Tensor]:
    return [rand((), dtype), rand((5,), dtype), rand((), dtype, 4.0)]


def _empty_and_zero(rand: Rand, dtype: torch.dtype) -> list[Tensor]:
    # Empty tensors first, between and last; an all-zero tensor (L2 norm 0, gradient 0).
    return [rand((0,), dtype), rand((4, 3), dtype), rand((2, 0, 3), dtype),
            rand((6,), dtype, 0.0), rand((), dtype), rand((0,), dtype)]


def _all_empty(rand: Rand, dtype: torch.dtype) -> list[Tensor]:
    # Nothing to read at all: no chunk, yet one result per tensor.
    return [rand((0,), dtype), rand((3, 0), dtype)]


def _non_contiguous(rand: Rand, dtype: torch.dtype) -> list[Tensor]:
    return [rand((40, 33), dtype).t(),  # transposed
            rand((300,), dtype)[::3],  # sliced with a step
            rand((8, 9, 10), dtype, 2.0)[:, ::2, 1:],  # strided in two dimensions
            rand((6, 7), dtype).t()[::2],  # transposed, then stepped
            rand((50,), dtype)]  # a contiguous one among them


def _mixed_dtypes(rand: Rand) -> list[Tensor]:
    # Contains a float64 tensor, so everything accumulates in float64.
    return [rand((100,), F32), rand((33, 3), F16), rand((257,), BF16, 2.0),
            rand((17, 2), F64), rand((), F16), rand((9, 4), BF16).t()]


def _mixed_half(rand: Rand) -> list[Tensor]:
    # No float64: float32 accumulation of float32, float16 and bfloat16 inputs.
    return [rand((100,), F32), rand((33, 3), F16), rand((257,), BF16, 2.0),
            rand((7, 5), F32).t(), rand((), BF16)]


_TINY_SHAPES = [(), (1,), (2,), (3,), (2, 2), (0,)]


def _tiny(rand: Rand, dtype: torch.dtype, count: int) -> list[Tensor]:
    return [rand(_TINY_SHAPES[i % len(_TINY_SHAPES)], dtype) for i in range(count)]


def _zero_groups(rand: Rand, dtype: torch.dtype) -> list[Tensor]:
    # Conv- and Linear-shaped weights with all-zero groups along dim 0 and along dim 1,
    # groups with no element (5, 0) and a tensor with no group (0, 4).
    conv = rand((6, 3, 3, 3), dtype)
    conv[1] = 0
    conv[4] = 0
    linear = rand((7, 5), dtype, 0.5)
    linear[:, 2] = 0
    linear[3] = 0
    bias = rand((4,), dtype)
    bias[2] = 0
    return [conv, rand((5, 0), dtype), linear, rand((0, 4), dtype), bias, rand((), dtype)]


def _many_chunks(rand: Rand, dtype: torch.dtype) -> list[Tensor]:
    # > 300k elements: several chunks for any chunk size from 4k to 64k, plus a tail.
    return [rand((2**18 + 2**16 + 7,), dtype), rand((3,), dtype)]


@dataclass(frozen=True)
class Case:
    """A named tensor list, rebuilt identically (fixed seed) on any device."""

    name: str
    make: Callable[[Rand], list[Tensor]]

    def __str__(self) -> str:
        return self.name

    def tensors(self, device: "str | torch.device" = "cpu", seed: int = 0) -> list[Tensor]:
        gen = torch.Generator().manual_seed(seed)

        def rand(shape: tuple, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
            values = torch.randn(shape, generator=gen, dtype=F64) * scale
            return values.to(device=device, dtype=dtype)

        return self.make(rand)

    def leaves(self, device: "str | torch.device" = "cpu", seed: int = 0) -> list[Tensor]:
        """The tensors as leaves requiring grad, keeping their (non-contiguous) strides."""
        return [t.detach().requires_grad_() for t in self.tensors(device, seed)]


def _per_dtype(name: str, make: Callable, dtypes: Sequence[torch.dtype]) -> list[Case]:
    return [Case(f"{name}-{DTYPE_NAMES[d]}", partial(make, dtype=d)) for d in dtypes]


ALL_DTYPES = (F32, F64, F16, BF16)
CASES: list[Case] = [
    *_per_dtype("single", _single, ALL_DTYPES),
    *_per_dtype("odd_sizes", _odd_sizes, ALL_DTYPES),
    *_per_dtype("zero_d", _zero_d, (F32, F64)),
    *_per_dtype("empty_and_zero", _empty_and_zero, (F32, F64, BF16)),
    *_per_dtype("all_empty", _all_empty, (F32,)),
    *_per_dtype("non_contiguous", _non_contiguous, (F32, F64, F16)),
    Case("mixed_dtypes", _mixed_dtypes),
    Case("mixed_half", _mixed_half),
    *_per_dtype("few_tiny", partial(_tiny, count=40), (F32,)),
    *_per_dtype("many_tiny", partial(_tiny, count=3000), (F32, F16)),
    *_per_dtype("many_chunks", _many_chunks, (F32, BF16)),
    *_per_dtype("zero_groups", _zero_groups, (F32, F64, BF16)),
]
# Groups longer than a CPU chunk (a group's norm sums several chunks), for the kernels
# that work per group; not in CASES, which would make every test slower.
WIDE_ROWS = Case("wide_rows", lambda rand: [rand((3, 70001), F32), rand((2, 40000), BF16),
                                            rand((4, 5), F16)])
CASES_BY_NAME = {case.name: case for case in (*CASES, WIDE_ROWS)}


def case(name: str) -> Case:
    return CASES_BY_NAME[name]


def with_specials(device: "str | torch.device", dtype: torch.dtype) -> list[Tensor]:
    """Tensors holding NaN, +Inf and -Inf (alone and together) and one clean tensor."""
    base = torch.linspace(-2, 3, 9, dtype=F64)
    nan, pos, neg, both = base.clone(), base.clone(), base.clone(), base.clone()
    nan[4] = math.nan
    pos[2] = INF
    neg[7] = -INF
    both[0], both[8] = INF, math.nan
    return [t.to(device=device, dtype=dtype) for t in (nan, pos, neg, both, base)]


# ---- what each backend is asked to process --------------------------------------------

class SizeLimit(NamedTuple):
    """The largest tensor list a backend is asked to process in the tests."""

    numel: int  # elements over the whole list
    tensors: int  # tensors in the list


# The Triton interpreter runs every program instance in Python: keep its lists tiny so
# that the whole suite stays within minutes on a 2-core machine.
INTERPRETER_LIMIT = SizeLimit(numel=6_000, tensors=50)


# The emulated CUDA kernels (csrc/cuda/simt_cpu.h) cost about 0.1 ms per block of 256
# fibers, whatever its size: keep the number of chunks (one per group of a group op, one
# per non-empty tensor at least) within a few thousand; 3,000 tiny tensors still run.
EMULATION_LIMIT = SizeLimit(numel=1_000_000, tensors=3_000)
# Groups of a group op (one table entry each) on the slow CPU paths.
GROUP_LIMITS = {"triton": 100, "cuda": 1_000}


def is_interpreted(backend: str, device: "str | torch.device") -> bool:
    """True where ``backend`` runs through the (slow) Triton interpreter."""
    return backend == "triton" and torch.device(device).type == "cpu"


def is_emulated(backend: str, device: "str | torch.device") -> bool:
    """True where ``backend`` runs the CUDA kernels on the CPU (``REGFUSE_CUDA_EMULATE=1``)."""
    return backend == "cuda" and torch.device(device).type == "cpu"


def size_limit(backend: str, device: "str | torch.device") -> Optional[SizeLimit]:
    """The size cap for ``backend`` on ``device`` in the tests, ``None`` for no cap."""
    if is_interpreted(backend, device):
        return INTERPRETER_LIMIT
    return EMULATION_LIMIT if is_emulated(backend, device) else None


def group_limit(backend: str, device: "str | torch.device") -> Optional[int]:
    """The most groups a group op is asked to process by ``backend`` on ``device``."""
    return GROUP_LIMITS.get(backend) if torch.device(device).type == "cpu" else None


# ---- float64 oracles -----------------------------------------------------------------

def result_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The documented result/accumulation dtype: float64 where any input is float64."""
    return F64 if any(t.dtype == F64 for t in tensors) else F32


def sample_coefficients(n: int) -> list[float]:
    """Distinct per-tensor coefficients for ``n`` tensors, zeros included."""
    return [0.0 if i % 5 == 3 else 0.5 + 0.25 * (i % 4) for i in range(n)]


def dtype_id(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


def coefficient_values(coefficients, n: int) -> Tensor:
    if coefficients is None:
        return torch.ones(n, dtype=F64)
    return torch.as_tensor(coefficients, dtype=F64).cpu()


def _flat64(t: Tensor) -> Tensor:
    return t.reshape(-1).to(F64)


def _norm64(x: Tensor, p: float, squared: bool) -> Tensor:
    flat = _flat64(x)
    if squared:
        return (flat * flat).sum()
    if flat.numel() == 0:  # vector_norm(+-inf) refuses empty input: the identities of max / min
        return flat.new_full((), INF if p == -INF else 0.0)
    return torch.linalg.vector_norm(flat, p)


def oracle_norms(tensors: Sequence[Tensor], p: float, squared: bool = False) -> Tensor:
    """``torch.linalg.vector_norm`` of each tensor in float64, on the inputs' device."""
    if not tensors:
        return torch.empty(0, dtype=F64)
    return torch.stack([_norm64(t, p, squared) for t in tensors])


def oracle_norm_grads(tensors: Sequence[Tensor], p: float, squared: bool,
                      grad_out: Tensor) -> list[Tensor]:
    """Gradient of ``(oracle_norms(tensors) * grad_out).sum()`` by torch autograd, float64."""
    x64 = [t.detach().to(F64).requires_grad_() for t in tensors]
    total = (oracle_norms(x64, p, squared) * grad_out.to(F64)).sum()
    if not total.requires_grad:  # only empty tensors under p=inf: nothing depends on them
        return [torch.zeros_like(x) for x in x64]
    return list(torch.autograd.grad(total, x64, allow_unused=True, materialize_grads=True))


def overflowed_to(expected: Tensor, dtype: torch.dtype) -> Tensor:
    """``expected`` (float64) with the values that overflow ``dtype`` replaced by the
    infinities any result stored in ``dtype`` holds (the gradient of a p < 1 norm is
    unbounded near 0: in float16 it can exceed 65504)."""
    rounded = expected.to(dtype)
    return torch.where(rounded.isinf() & expected.isfinite(), rounded.to(expected.dtype), expected)


def oracle_total_norm(tensors: Sequence[Tensor], p: float) -> Tensor:
    """The ``p``-norm of the concatenation of ``tensors`` in float64, by ``vector_norm``
    (differentiable when the tensors require grad); 0 for no element, inf for ``p=-inf``."""
    flat = [_flat64(t) for t in tensors]
    if not flat or sum(x.numel() for x in flat) == 0:
        return torch.tensor(INF if p == -INF and flat else 0.0, dtype=F64)
    return torch.linalg.vector_norm(torch.cat(flat), p)


def oracle_penalty(tensors: Sequence[Tensor], l1: float, l2: float, coefficients=None) -> Tensor:
    c = coefficient_values(coefficients, len(tensors))
    total = torch.zeros((), dtype=F64)
    for ci, t in zip(c, tensors):
        flat = _flat64(t).cpu()
        total = total + ci * (l1 * flat.abs().sum() + l2 * (flat * flat).sum())
    return total


def oracle_penalty_grads(tensors: Sequence[Tensor], l1: float, l2: float,
                         coefficients=None) -> list[Tensor]:
    """``c_i * (l1 * sign(x) + 2 * l2 * x)`` per tensor, float64, on the inputs' device."""
    c = coefficient_values(coefficients, len(tensors))
    return [float(ci) * (l1 * torch.sign(t.to(F64)) + 2 * l2 * t.to(F64)) for ci, t in zip(c, tensors)]


def prox_thresholds(tensors: Sequence[Tensor], threshold: float, coefficients=None) -> Tensor:
    """The per-tensor thresholds rounded to the accumulation dtype, as the kernels use them.

    With these, whether ``|x| - c_i * threshold`` is positive is decided exactly the same
    way in float64 as in the kernels, so the zero pattern can be compared exactly.
    """
    acc = result_dtype(tensors)
    c = coefficient_values(coefficients, len(tensors)).to(acc)
    return (torch.tensor(threshold, dtype=acc) * c).to(F64)


def oracle_prox(tensors: Sequence[Tensor], threshold: float, coefficients=None) -> list[Tensor]:
    """Soft-thresholding of each tensor in float64, rounded once to the tensor's dtype."""
    thresholds = prox_thresholds(tensors, threshold, coefficients)
    out = []
    for thr, t in zip(thresholds, tensors):
        x = t.to(F64)
        out.append((torch.sign(x) * torch.clamp_min(x.abs() - thr.item(), 0)).to(t.dtype))
    return out


# ---- group oracles (regfuse.groups) ------------------------------------------------------

def _by_group(t: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``t`` in float64 as a ``(groups, size)`` matrix whose row ``j`` is ``t.select(dim, j)``
    flattened (a 0-d tensor is one group), and the moved tensor to undo it with."""
    x = t.to(F64)
    moved = x.reshape(1, 1) if x.dim() == 0 else x.movedim(dim, 0)
    groups = moved.shape[0]
    return moved.reshape(groups, moved.numel() // groups if groups else 0), moved


def _from_groups(matrix: Tensor, moved: Tensor, t: Tensor, dim: int) -> Tensor:
    out = matrix.reshape(moved.shape)
    return out.reshape(t.shape) if t.dim() == 0 else out.movedim(0, dim)


def _row_norms64(matrix: Tensor, p: float) -> Tensor:
    if matrix.shape[1] == 0:  # vector_norm(inf) refuses empty rows; the norm of nothing is 0
        return matrix.new_zeros(matrix.shape[0])
    return torch.linalg.vector_norm(matrix, p, dim=1)


def oracle_group_norms(tensors: Sequence[Tensor], dim: int, p: float) -> list[Tensor]:
    """Per tensor, ``vector_norm`` of each slice ``t.select(dim, j)`` in float64."""
    return [_row_norms64(_by_group(t, dim)[0], p) for t in tensors]


def oracle_group_norm_grads(tensors: Sequence[Tensor], dim: int, p: float,
                            grad_outs: Sequence[Tensor]) -> list[Tensor]:
    """Gradient of ``sum_i (oracle_group_norms(tensors)[i] * grad_outs[i]).sum()`` by torch
    autograd in float64 (its conventions: 0 at 0, max shared evenly)."""
    x64 = [t.detach().to(F64).requires_grad_() for t in tensors]
    total = sum((n * g.to(F64)).sum() for n, g in zip(oracle_group_norms(x64, dim, p), grad_outs))
    if not isinstance(total, Tensor) or not total.requires_grad:
        return [torch.zeros_like(x) for x in x64]
    return list(torch.autograd.grad(total, x64, allow_unused=True, materialize_grads=True))


def group_scale(t: Tensor, dim: int, scale_by_size: bool) -> float:
    """``s_g``: sqrt of the number of elements of one group of ``t`` (or 1)."""
    if not scale_by_size or t.dim() <= 1:
        return 1.0
    return math.sqrt(t.numel() // t.shape[dim]) if t.shape[dim] else 0.0


def oracle_group_penalty(tensors: Sequence[Tensor], weight: float, dim: int, l1: float,
                         scale_by_size: bool = True, coefficients=None) -> Tensor:
    c = coefficient_values(coefficients, len(tensors))
    total = torch.zeros((), dtype=F64)
    for ci, t in zip(c, tensors):
        norms = oracle_group_norms([t], dim, 2)[0].cpu()
        total = total + ci * (weight * group_scale(t, dim, scale_by_size) * norms.sum()
                              + l1 * _flat64(t).abs().sum().cpu())
    return total


def oracle_group_penalty_grads(tensors: Sequence[Tensor], weight: float, dim: int, l1: float,
                               scale_by_size: bool = True, coefficients=None) -> list[Tensor]:
    """``c_i * (weight * s_g * w_g / ||w_g|| + l1 * sign(w))`` (0 for an all-zero group),
    float64, written out rather than differentiated."""
    c = coefficient_values(coefficients, len(tensors))
    grads = []
    for ci, t in zip(c, tensors):
        matrix, moved = _by_group(t, dim)
        norms = _row_norms64(matrix, 2).unsqueeze(1)
        unit = torch.where(norms == 0, 0.0, matrix / torch.where(norms == 0, 1.0, norms))
        term = weight * group_scale(t, dim, scale_by_size) * unit + l1 * torch.sign(matrix)
        grads.append(float(ci) * _from_groups(term, moved, t, dim))
    return grads


def group_thresholds(tensors: Sequence[Tensor], threshold: float, dim: int, scale_by_size: bool,
                     coefficients=None) -> list[float]:
    """``c_i * threshold * s_g`` per tensor, in float64."""
    c = coefficient_values(coefficients, len(tensors))
    return [float(ci) * threshold * group_scale(t, dim, scale_by_size) for ci, t in zip(c, tensors)]


def oracle_prox_group_lasso(tensors: Sequence[Tensor], threshold: float, dim: int,
                            l1_threshold: float = 0.0, scale_by_size: bool = True,
                            coefficients=None) -> list[Tensor]:
    """Soft-threshold by ``c_i * l1_threshold`` (rounded as the kernels round it), then
    ``w_g * max(0, 1 - c_i * threshold * s_g / ||w_g||)`` in float64, rounded once per
    step to the tensor's dtype as the kernels store it."""
    if l1_threshold:
        tensors = oracle_prox(tensors, l1_threshold, coefficients)
    out = []
    for t, limit in zip(tensors, group_thresholds(tensors, threshold, dim, scale_by_size, coefficients)):
        matrix, moved = _by_group(t, dim)
        norms = _row_norms64(matrix, 2).unsqueeze(1)
        factor = torch.where(norms == 0, 0.0, torch.clamp_min(1 - limit / norms, 0))
        out.append(_from_groups(matrix * factor, moved, t, dim).to(t.dtype))
    return out


# ---- tolerances and asserts ------------------------------------------------------------

class Tol(NamedTuple):
    atol: float
    rtol: float


# Keyed by the dtype of the value being checked: a result accumulated in float32 (even
# from half inputs: it is compared with float64 of the same half values), or a gradient
# / updated tensor stored in a half type (which allows a couple of ulps of rounding).
TOLERANCES = {
    F64: Tol(atol=1e-12, rtol=1e-11),
    F32: Tol(atol=1e-6, rtol=1e-5),
    F16: Tol(atol=1e-6, rtol=2e-3),
    BF16: Tol(atol=1e-6, rtol=1.6e-2),
}


def tolerance(dtype: torch.dtype, magnitude: float = 0.0) -> Tol:
    """The tolerance for ``dtype``; ``magnitude`` raises atol to ``rtol * magnitude`` for
    values that are sums of larger terms (a gradient added to an existing one)."""
    tol = TOLERANCES[dtype]
    return Tol(max(tol.atol, tol.rtol * magnitude), tol.rtol)


def _mismatches(a: Tensor, e: Tensor, atol: "Tensor | float", rtol: "Tensor | float") -> Tensor:
    """Mask of the elements of float64 ``a`` that are not close to ``e`` (NaN/Inf exact)."""
    either_nan = a.isnan() | e.isnan()
    nan_mismatch = a.isnan() != e.isnan()
    inf_mismatch = (a.isinf() | e.isinf()) & (a != e) & ~either_nan
    finite = a.isfinite() & e.isfinite()
    too_far = finite & ((a - e).abs() > atol + rtol * e.abs())
    return nan_mismatch | inf_mismatch | too_far


def _report(a: Tensor, e: Tensor, bad: Tensor, tol: Tol, what: str, dtype: torch.dtype,
            limit: int = 8) -> str:
    finite = a.isfinite() & e.isfinite()
    diff = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    rel = diff / e.abs().clamp_min(tol.atol)
    nan_mismatches = int((a.isnan() != e.isnan()).sum())
    inf_mismatches = int(((a.isinf() | e.isinf()) & (a != e) & ~(a.isnan() | e.isnan())).sum())
    lines = [
        f"{what} ({dtype}): {int(bad.sum())} of {a.numel()} elements differ "
        f"(atol={tol.atol:g}, rtol={tol.rtol:g}); NaN disagreements: {nan_mismatches}, "
        f"Inf disagreements: {inf_mismatches}; "
        f"max abs error {diff.max().item():.3e}, max rel error {rel.max().item():.3e}"]
    for index in bad.nonzero()[:limit].tolist():
        x, y = a[tuple(index)].item(), e[tuple(index)].item()
        lines.append(f"  at {tuple(index)}: got {x!r}, expected {y!r}, diff {abs(x - y):.3e}")
    return "\n".join(lines)


def assert_close(actual: Tensor, expected: Tensor, tol: Optional[Tol] = None, what: str = "value") -> None:
    """Elementwise ``|actual - expected| <= atol + rtol * |expected|``, NaN and Inf exactly.

    On failure, reports the number of mismatches, the first mismatching indices with both
    values, the NaN/Inf disagreements, and the largest errors.
    """
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    tol = tol or tolerance(actual.dtype)
    a = actual.detach().cpu().to(F64)
    e = expected.detach().cpu().to(F64)
    bad = _mismatches(a, e, tol.atol, tol.rtol)
    if bool(bad.any()):
        raise AssertionError(_report(a, e, bad, tol, what, actual.dtype))


def assert_lists_close(actual: Sequence[Optional[Tensor]], expected: Sequence[Tensor],
                       what: str = "tensor", magnitudes: Optional[Sequence[float]] = None) -> None:
    """:func:`assert_close` on each pair, with the tolerance of each actual tensor's dtype.

    Checks everything in one flat comparison (lists of thousands of tensors stay fast),
    then reports the first tensor that differs in detail.
    """
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a is not None, f"{what}[{i}] is None"
        assert tuple(a.shape) == tuple(e.shape), f"{what}[{i}]: shape {tuple(a.shape)} != {tuple(e.shape)}"
    if not actual:
        return
    magnitudes = magnitudes if magnitudes is not None else [0.0] * len(actual)
    tols = [tolerance(a.dtype, m) for a, m in zip(actual, magnitudes)]
    counts = torch.tensor([a.numel() for a in actual])
    flat_a = torch.cat([a.detach().reshape(-1).cpu().to(F64) for a in actual])
    flat_e = torch.cat([e.detach().reshape(-1).cpu().to(F64) for e in expected])
    atol = torch.tensor([t.atol for t in tols], dtype=F64).repeat_interleave(counts)
    rtol = torch.tensor([t.rtol for t in tols], dtype=F64).repeat_interleave(counts)
    bad = _mismatches(flat_a, flat_e, atol, rtol)
    if bool(bad.any()):
        first = int(torch.searchsorted(counts.cumsum(0), bad.nonzero()[0, 0], right=True))
        assert_close(actual[first], expected[first], tols[first], what=f"{what}[{first}]")
        raise AssertionError(f"{what}[{first}]: differs in the flat comparison")


def max_abs(t: Optional[Tensor]) -> float:
    return 0.0 if t is None or t.numel() == 0 else t.detach().abs().max().item()


_SAME_SIZE_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def assert_bitwise_equal(a: Tensor, b: Tensor, what: str = "value") -> None:
    """Same dtype, shape and bits (NaN payloads and signed zeros included)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (
        f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
    as_int = _SAME_SIZE_INT[a.element_size()]
    assert torch.equal(a.detach().view(as_int), b.detach().view(as_int)), f"{what}: results differ bitwise"
