"""The operations benchmarked and the implementations ("providers") compared for each.

For every operation the providers compute the same thing on the same tensors:

* ``naive``: the Python loop people write today (see the examples): a per-tensor
  ``torch.norm`` stacked (and its ``vector_norm`` for the total norm), ``sum(l1 * p.abs().sum() + l2 * (p * p).sum() ...)`` and, for
  the in-place gradient, that same loss followed by ``backward()``; for the group lasso,
  ``sum(sqrt(size) * w.flatten(1).norm(dim=1).sum() ...)`` and its block soft-threshold
  ``w.mul_(clamp(1 - t * sqrt(size) / norms, min=0))`` per tensor;
* ``naive_cat`` (penalties): the ``torch.cat([p.flatten() ...])`` variant;
* ``naive_inplace`` (gradient update): ``p.grad += l1 * sign(p) + 2 * l2 * p`` per tensor;
* ``foreach``: PyTorch's multi-tensor kernels (``torch._foreach_norm``, ``_foreach_add_``,
  ``_foreach_sign``, ...); ``torch.nn.utils.get_total_norm(foreach=True)`` for the total
  norm; for gradient clipping, ``torch.nn.utils.clip_grad_norm_``
  with ``foreach=True`` (``naive`` is the same with ``foreach=False``, its loop);
* ``compile``: ``torch.compile`` of the naive loop;
* ``lightning`` (per-layer gradient norms, where Lightning is installed):
  ``lightning.pytorch.utilities.grad_norm``, whose dict ``regfuse.grad_norms`` returns;
* ``regfuse_<backend>``: this library on one backend.

A provider is a function of a :class:`State` (the tensors, with ``.grad`` allocated
where the operation reads gradients). :func:`observe` extracts what a call produced so
that providers can be checked against each other.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

import regfuse

# Coefficients of a typical elastic-net setting; the threshold is lr * l1 for lr = 1e-2.
L1, L2 = 1e-5, 1e-4
THRESHOLD = 1e-7
# Gradient clipping: the usual max_norm = 1, far below the norm of these lists (~100 for
# ResNet-50); and max_norm = inf, the usual way to get the norm without clipping, where a
# gradient's coefficient is exactly 1 (torch still multiplies by it). Clipping works in
# place, so a repeated call would find a norm of max_norm and nothing left to clip (a
# coefficient of exactly 1 in float32): call k of a measurement clips to
# MAX_NORM * CLIP_DECAY**k instead, just below the norm the previous call left, so that
# every call of every provider scales every gradient.
MAX_NORM = 1.0
CLIP_DECAY = 0.999
# The group lasso strength, and its proximal threshold lr * strength for lr = 1e-2.
GROUP = 1e-4
GROUP_THRESHOLD = 1e-6


@dataclass
class State:
    """The tensors one provider works on; ``.grad`` is set where the operation needs it."""

    tensors: list[Tensor]
    calls: int = 0  # clipping calls made on these tensors so far (see CLIP_DECAY)


Provider = Callable[[State], object]


@dataclass(frozen=True)
class Op:
    """An operation, and the memory traffic a perfect implementation of it needs.

    ``passes`` counts full passes over the list in that minimum traffic (a forward read
    is 1; a fused backward that reads ``x`` and ``grad`` and writes ``grad`` is 3);
    ``writes`` says whether the limit to compare with is a copy (read and write) or a
    read-only sum.
    """

    name: str
    passes: int
    writes: bool
    requires_grad: bool  # the tensors are leaves that require grad
    allocate_grads: bool  # every tensor has a preallocated ``.grad`` (zeros)
    kinds: tuple[str, ...]  # the workload kinds it runs on
    description: str
    grads_are_values: bool = False  # the ``.grad`` of every tensor is a copy of its values
    max_norm: Optional[float] = None  # gradient clipping: its max_norm


OPS: dict[str, Op] = {op.name: op for op in (
    Op("norms_p1", 1, False, False, False, ("params",), "per-tensor L1 norms"),
    Op("norms_p2", 1, False, False, False, ("params", "sweep"), "per-tensor L2 norms"),
    Op("total_norm", 1, False, False, False, ("params",), "the L2 norm of the whole list"),
    Op("penalty", 1, False, False, False, ("params", "activations"),
       "l1 * L1 + l2 * squared L2, forward"),
    Op("penalty_fwd_bwd", 4, True, True, True, ("params",),
       "penalty forward + backward into allocated .grad"),
    Op("add_penalty_grad_", 3, True, True, True, ("params",),
       "p.grad += l1 * sign(p) + 2 * l2 * p"),
    Op("prox_l1_", 2, True, False, False, ("params",), "in-place soft-thresholding"),
    Op("group_penalty_fwd_bwd", 4, True, True, True, ("params",),
       "group lasso (filters/rows along dim 0) forward + backward into allocated .grad"),
    Op("prox_group_lasso_", 2, True, False, False, ("params",),
       "in-place block soft-thresholding of the rows along dim 0"),
    Op("activity_fwd_bwd", 3, True, True, False, ("activations",),
       "L1 activity penalty forward + torch.autograd.grad"),
    # Clipping reads every gradient, then reads and writes it; below max_norm a perfect
    # implementation only reads it.
    Op("clip_grad_norm_", 3, True, False, False, ("params",),
       "clip_grad_norm_(max_norm=1): total norm, every gradient scaled", grads_are_values=True,
       max_norm=MAX_NORM),
    Op("clip_grad_norm_unclipped", 1, False, False, False, ("params",),
       "clip_grad_norm_(max_norm=inf): the norm, no gradient changes", grads_are_values=True,
       max_norm=float("inf")),
    Op("grad_norms", 1, False, False, False, ("params",),
       "per-layer gradient norms for logging: Lightning's grad_norm dict (p=2)",
       grads_are_values=True),
)}
CLIP_OPS = tuple(name for name, op in OPS.items() if op.max_norm is not None)


def make_state(op: Op, tensors: list[Tensor], clone: bool = False) -> State:
    """Fresh leaf tensors sharing (or, with ``clone``, copying) the storage of ``tensors``."""
    leaves = [(t.detach().clone() if clone else t.detach()).requires_grad_(op.requires_grad)
              for t in tensors]
    if op.allocate_grads:
        for t in leaves:
            t.grad = torch.zeros_like(t)
    if op.grads_are_values:  # the parameters are not modified: only their gradients are
        for t in leaves:
            t.grad = t.detach().clone()
    return State(leaves)


# ---- the loops people write ------------------------------------------------------------

def _stacked_norms(p: int) -> Provider:
    def naive(state: State) -> Tensor:
        return torch.stack([torch.norm(t, p) for t in state.tensors])
    return naive


def _foreach_norms(p: int) -> Provider:
    def foreach(state: State) -> list[Tensor]:
        return torch._foreach_norm(state.tensors, p)
    return foreach


def _stacked_total_norm(state: State) -> Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in state.tensors]))


def _foreach_total_norm(state: State) -> Tensor:
    return torch.nn.utils.get_total_norm(state.tensors, foreach=True)


def _loop_penalty(state: State) -> Tensor:
    return sum(L1 * t.abs().sum() + L2 * (t * t).sum() for t in state.tensors)


def _cat_penalty(state: State) -> Tensor:
    flat = torch.cat([t.flatten() for t in state.tensors])
    return L1 * flat.abs().sum() + L2 * (flat * flat).sum()


def _foreach_penalty(state: State) -> Tensor:
    # Two multi-tensor passes: torch has no fused L1 + squared-L2 reduction.
    l1 = torch.stack(torch._foreach_norm(state.tensors, 1)).sum()
    l2 = torch.stack(torch._foreach_norm(state.tensors, 2)).square().sum()
    return L1 * l1 + L2 * l2


def _loop_activity(state: State) -> Tensor:
    return L1 * sum(a.abs().sum() for a in state.tensors)


def _foreach_activity(state: State) -> Tensor:
    return L1 * torch.stack(torch._foreach_norm(state.tensors, 1)).sum()


def _loop_penalty_backward(state: State) -> None:
    _loop_penalty(state).backward()


@torch.no_grad()
def _loop_add_grad(state: State) -> None:
    for t in state.tensors:
        t.grad.add_(L1 * torch.sign(t) + 2 * L2 * t)


@torch.no_grad()
def _foreach_add_grad(state: State) -> None:
    grads = [t.grad for t in state.tensors]
    torch._foreach_add_(grads, torch._foreach_sign(state.tensors), alpha=L1)
    torch._foreach_add_(grads, state.tensors, alpha=2 * L2)


@torch.no_grad()
def _loop_prox(state: State) -> None:
    for t in state.tensors:
        t.copy_(torch.sign(t) * torch.clamp(t.abs() - THRESHOLD, min=0))


@torch.no_grad()
def _foreach_prox(state: State) -> None:
    shrunk = torch._foreach_abs(state.tensors)
    torch._foreach_sub_(shrunk, THRESHOLD)
    torch._foreach_clamp_min_(shrunk, 0.0)
    torch._foreach_mul_(shrunk, torch._foreach_sign(state.tensors))
    torch._foreach_copy_(state.tensors, shrunk)


def _clip_max_norm(op: Op, state: State) -> float:
    """The max_norm of this call: op.max_norm, decayed per call when it clips."""
    if op.max_norm == float("inf"):
        return op.max_norm
    state.calls += 1
    return op.max_norm * CLIP_DECAY ** (state.calls - 1)


def _torch_clip(op: Op, foreach: bool) -> Provider:
    def clip(state: State) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(state.tensors, _clip_max_norm(op, state), foreach=foreach)
    return clip


def _named_grads(state: State) -> list[tuple[str, Tensor]]:
    return [(f"layer{i}", t) for i, t in enumerate(state.tensors)]


def _norm_dict(state: State, per_tensor: list[Tensor]) -> dict[str, Tensor]:
    """Lightning's grad_norm dict from per-tensor norms; the total from them on the host."""
    out = {f"grad_2.0_norm/{name}": n for (name, _), n in zip(_named_grads(state), per_tensor)}
    out["grad_2.0_norm_total"] = torch.tensor(list(out.values())).norm(2.0)
    return out


def _loop_grad_norms(state: State) -> dict[str, Tensor]:
    return _norm_dict(state, [t.grad.norm(2.0) for t in state.tensors])


def _foreach_grad_norms(state: State) -> dict[str, Tensor]:
    per_tensor = torch._foreach_norm([t.grad for t in state.tensors], 2.0)
    out = {f"grad_2.0_norm/{name}": n for (name, _), n in zip(_named_grads(state), per_tensor)}
    out["grad_2.0_norm_total"] = torch.stack(per_tensor).cpu().norm(2.0)  # one host copy
    return out


class _NamedParameters:
    """What Lightning's grad_norm reads of a module: ``named_parameters()``."""

    def __init__(self, state: State) -> None:
        self.state = state

    def named_parameters(self) -> list[tuple[str, Tensor]]:
        return _named_grads(self.state)


def _lightning_grad_norm(state: State) -> dict[str, Tensor]:
    from lightning.pytorch.utilities import grad_norm
    return grad_norm(_NamedParameters(state), 2.0)


def _rows(t: Tensor) -> Tensor:
    # The groups along dim 0 as rows; a 1-D tensor has one group per element.
    return t.reshape(len(t), -1)


def _loop_group_penalty(state: State) -> Tensor:
    return sum(GROUP * math.sqrt(t[0].numel()) * _rows(t).norm(dim=1).sum() for t in state.tensors)


@torch.no_grad()
def _loop_prox_group(state: State) -> None:
    for t in state.tensors:
        rows = _rows(t)
        norms = rows.norm(dim=1, keepdim=True)
        rows.mul_((1 - GROUP_THRESHOLD * math.sqrt(rows.shape[1]) / norms).clamp_min(0))


# Per operation: the baseline providers, in table order ("naive" first), and which of
# them torch.compile is given. (torch has no multi-tensor kernel for per-row norms: the
# group operations have no foreach baseline.)
_BASELINES: dict[str, dict[str, Provider]] = {
    "norms_p1": {"naive": _stacked_norms(1), "foreach": _foreach_norms(1)},
    "norms_p2": {"naive": _stacked_norms(2), "foreach": _foreach_norms(2)},
    "total_norm": {"naive": _stacked_total_norm, "foreach": _foreach_total_norm},
    "penalty": {"naive": _loop_penalty, "naive_cat": _cat_penalty, "foreach": _foreach_penalty},
    "penalty_fwd_bwd": {"naive": _loop_penalty, "naive_cat": _cat_penalty,
                        "foreach": _foreach_penalty},
    "add_penalty_grad_": {"naive": _loop_penalty_backward, "naive_inplace": _loop_add_grad,
                          "foreach": _foreach_add_grad},
    "prox_l1_": {"naive": _loop_prox, "foreach": _foreach_prox},
    "activity_fwd_bwd": {"naive": _loop_activity, "foreach": _foreach_activity},
    **{name: {"naive": _torch_clip(OPS[name], foreach=False),
              "foreach": _torch_clip(OPS[name], foreach=True)} for name in CLIP_OPS},
    "group_penalty_fwd_bwd": {"naive": _loop_group_penalty},
    "prox_group_lasso_": {"naive": _loop_prox_group},
    "grad_norms": {"naive": _loop_grad_norms, "foreach": _foreach_grad_norms,
                   **({"lightning": _lightning_grad_norm}
                      if importlib.util.find_spec("lightning") is not None else {})},
}
_COMPILED_BASELINE = {"add_penalty_grad_": "naive_inplace"}  # default: "naive"


def _regfuse(op: Op, backend: str) -> Provider:
    name = op.name
    if name.startswith("norms_p"):
        p = int(name[-1])
        return lambda s: regfuse.norms(s.tensors, p, backend=backend)
    if name == "total_norm":
        return lambda s: regfuse.total_norm(s.tensors, backend=backend)
    if name in ("penalty", "penalty_fwd_bwd"):
        return lambda s: regfuse.penalty(s.tensors, L1, L2, backend=backend)
    if name == "add_penalty_grad_":
        return lambda s: regfuse.add_penalty_grad_(s.tensors, L1, L2, backend=backend)
    if name == "prox_l1_":
        return lambda s: regfuse.prox_l1_(s.tensors, THRESHOLD, backend=backend)
    if name == "activity_fwd_bwd":
        return lambda s: regfuse.penalty(s.tensors, l1=L1, backend=backend)
    if name in CLIP_OPS:
        return lambda s: regfuse.clip_grad_norm_(s.tensors, _clip_max_norm(op, s), backend=backend)
    if name == "group_penalty_fwd_bwd":
        return lambda s: regfuse.group_penalty(s.tensors, GROUP, backend=backend)
    if name == "prox_group_lasso_":
        return lambda s: regfuse.prox_group_lasso_(s.tensors, GROUP_THRESHOLD, backend=backend)
    if name == "grad_norms":
        return lambda s: regfuse.grad_norms(_NamedParameters(s).named_parameters(), 2.0, backend=backend)
    raise ValueError(f"no regfuse provider for {name}")


def _with_backward(op: Op, forward: Provider) -> Provider:
    """``forward`` followed by the backward that ``op`` includes, if any."""
    if op.name in ("penalty_fwd_bwd", "group_penalty_fwd_bwd"):
        def forward_backward(state: State) -> Tensor:
            loss = forward(state)
            loss.backward()
            return loss
        return forward_backward
    if op.name == "activity_fwd_bwd":
        # What an activation receives: a gradient returned into the graph, not a .grad.
        return lambda state: torch.autograd.grad(forward(state), state.tensors)
    return forward


def _compiled(forward: Provider) -> Provider:
    # Dynamo keys its cache on the code object, which every workload shares; start from
    # an empty cache so that no workload hits the recompilation limit and falls back to
    # eager without saying so.
    torch._dynamo.reset()
    compiled = torch.compile(lambda tensors: forward(State(tensors)))
    return lambda state: compiled(state.tensors)


def providers(op: Op, backends: list[str], with_compile: bool) -> dict[str, Provider]:
    """Every provider of ``op``, in table order: baselines, ``compile``, then regfuse.

    The ``compile`` provider is compiled on its first call (call it once before timing).
    """
    baselines = _BASELINES[op.name]
    chosen = {name: _with_backward(op, fn) for name, fn in baselines.items()}
    if with_compile:
        target = baselines[_COMPILED_BASELINE.get(op.name, "naive")]
        chosen["compile"] = _with_backward(op, _compiled(target))
    for backend in backends:
        chosen[f"regfuse_{backend}"] = _with_backward(op, _regfuse(op, backend))
    return chosen


def observe(op: Op, state: State, result: object) -> list[Tensor]:
    """What one call produced, as float tensors comparable across providers."""
    if op.name in ("penalty_fwd_bwd", "add_penalty_grad_", "group_penalty_fwd_bwd"):
        out = [t.grad for t in state.tensors]
    elif op.name in CLIP_OPS:  # the returned norm, then the clipped gradients
        out = [result] + [t.grad for t in state.tensors]
    elif op.name in ("prox_l1_", "prox_group_lasso_"):
        out = state.tensors
    elif op.name == "activity_fwd_bwd":
        out = list(result)
    elif isinstance(result, dict):  # grad_norms: the per-tensor norms, then the total
        out = [torch.stack([v.float().cpu() for v in result.values()])]
    elif isinstance(result, (list, tuple)):  # torch._foreach_norm
        out = [torch.stack([r.float() for r in result])]
    else:
        out = [result]
    return [t.detach().float() for t in out]


def mismatch(op: Op, tensors: list[Tensor], candidate: Provider, reference: Provider,
             rtol: Optional[float] = None) -> Optional[str]:
    """``None`` when ``candidate`` and ``reference`` agree on fresh copies of ``tensors``.

    Otherwise a one-line description of the first disagreement. The default tolerance
    is loose enough for summation-order differences (and bfloat16 rounding where the
    list holds low-precision tensors), far tighter than any real bug.
    """
    low_precision = any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors)
    rtol = rtol if rtol is not None else (2e-2 if low_precision else 1e-3)
    outputs = []
    for provider in (candidate, reference):
        state = make_state(op, tensors, clone=True)
        outputs.append(observe(op, state, provider(state)))
    for i, (got, want) in enumerate(zip(*outputs)):
        scale = float(want.abs().max()) if want.numel() else 0.0
        try:
            torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale * 1e-2)
        except AssertionError as err:
            return f"output {i}: {str(err).splitlines()[0]} ({str(err).splitlines()[-1].strip()})"
    return None


def relative_error(op: Op, tensors: list[Tensor], provider: Provider) -> Optional[float]:
    """For the ops that return a total norm: its relative error against float64.

    The oracle is the L2 norm of every element upcast to float64 (exact for float32 and
    bfloat16 values); the provider runs once on fresh gradients. ``None`` for other ops.
    """
    if op.name not in CLIP_OPS:
        return None
    state = make_state(op, tensors)
    total = float(provider(state))
    exact = float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(t.detach().double()) for t in tensors])))
    return abs(total - exact) / exact
