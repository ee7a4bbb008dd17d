"""The checks of tests/test_distributed.py, run inside every rank of a 2-process gloo group.

Run as ``python tests/distributed_checks.py RANK WORLD_SIZE PORT RESULT_FILE``: the rank
joins the group, runs every check of every configuration (plain DTensor lists, DDP with
both ``gradient_as_bucket_view`` settings, FSDP2 ``fully_shard``) and writes
``{check id: None or the traceback}`` as JSON. Each check compares what the ranks compute
with what one process computes with plain PyTorch on the whole data (every rank builds
the same tensors from the same seed, so each can evaluate that oracle itself).
"""
from __future__ import annotations

import contextlib
import datetime
import importlib.util
import io
import json
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._ops._math_ops import _NormPartial
from torch.nn.parallel import DistributedDataParallel as DDP

import regfuse
from regfuse.distributed import SUM, NormPartial, dtensor_aware

WORLD_SIZE = 2
CONFIGS = ("dtensor", "ddp-copy", "ddp-view", "fsdp2")
CHECKS: dict[str, Callable[["Env"], None]] = {}  # "config/name" -> check
L1, L2 = 0.01, 0.1
TOL = dict(rtol=2e-5, atol=2e-6)


def check(*configs: str, registry: dict = CHECKS):
    """Registers a check under ``config/name`` for each of ``configs``."""
    def register(fn):
        for config in configs:
            registry[f"{config}/{fn.__name__}"] = fn
        return fn
    return register


class Env:
    def __init__(self, config: str, rank: int, mesh: DeviceMesh):
        self.config, self.rank, self.mesh = config, rank, mesh

    @property
    def bucket_view(self) -> bool:
        return self.config == "ddp-view"

    def shard(self, full: torch.Tensor, placement=None) -> DTensor:
        return distribute_tensor(full.detach().clone(), self.mesh, [placement or Shard(0)])

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of a global batch."""
        return x.chunk(WORLD_SIZE)[self.rank]


# Mismatches of the running check. They are collected, not raised, so that a rank whose
# values are wrong still makes the same collective calls as the other rank (a rank that
# left a check early would make the other wait for it until the timeout).
MISMATCHES: list[str] = []


def close(actual, expected, what: str) -> None:
    if isinstance(actual, DTensor):
        actual = actual.full_tensor()
    try:
        torch.testing.assert_close(actual, expected.to(actual.dtype), **TOL)
    except AssertionError as exc:
        MISMATCHES.append(f"{what}: {exc}")


# ---- data and models ------------------------------------------------------------------------

def tensors() -> list[torch.Tensor]:
    """Shapes that shard unevenly over 2 ranks (one leaves rank 1 an empty shard), a zero
    tensor (L2 norm 0) and a maximum attained on both ranks (the max-norm gradient is
    shared between them)."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen),
            torch.randn(1, 4, generator=gen), torch.zeros(3, 2),
            torch.tensor([3.0, -1.0, 2.0, -3.0, 3.0, 0.5])]


def plain_norm(t: torch.Tensor, p: float, squared: bool) -> torch.Tensor:
    return t.pow(2).sum() if squared else torch.linalg.vector_norm(t, p)


def plain_penalty(ts, l1=L1, l2=L2, coefficients=None):
    coefficients = coefficients or [1.0] * len(ts)
    return sum(c * (l1 * t.abs().sum() + l2 * t.pow(2).sum()) for c, t in zip(coefficients, ts))


class MLP(nn.Sequential):
    def __init__(self):
        torch.manual_seed(0)
        # Out-features 9, 5, 3 shard unevenly over 2 ranks under FSDP2.
        super().__init__(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 5), nn.ReLU(), nn.Linear(5, 3))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)


def wrap(env: Env, model: nn.Module) -> nn.Module:
    if env.config.startswith("ddp"):
        return DDP(model, gradient_as_bucket_view=env.bucket_view)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=env.mesh)
    return fully_shard(model, mesh=env.mesh)


def inner(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def relus(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.ReLU)]


def oracle_grads(extra: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda m, x: 0):
    """Gradients of one process on the whole batch: mean loss plus ``extra(model, x)``."""
    model = MLP()
    x, y = data()
    (nn.functional.mse_loss(model(x), y) + extra(model, x)).backward()
    return model, {name: p.grad for name, p in model.named_parameters()}


def compare_grads(model: nn.Module, expected: dict, what: str) -> None:
    for name, p in inner(model).named_parameters():
        close(full(p.grad), expected[name], f"{what}: gradient of {name}")


def local_loss(env: Env, model: nn.Module) -> torch.Tensor:
    x, y = data()
    return nn.functional.mse_loss(model(env.batch(x)), env.batch(y))


# ---- DTensor lists ------------------------------------------------------------------------

NORM_PLACEMENTS = {(1, False): Partial("sum"), (2, False): _NormPartial(2),
                   (math.inf, False): Partial("max"), (2, True): Partial("sum")}


@check("dtensor")
def norms_values_placements_gradients(env: Env) -> None:
    for (p, squared), placement in NORM_PLACEMENTS.items():
        what = f"norms(p={p}, squared={squared})"
        plain = [t.clone().requires_grad_() for t in tensors()]
        sharded = [env.shard(t).requires_grad_() for t in tensors()]
        out = regfuse.norms(sharded, p=p, squared=squared)
        assert out.placements == (placement,), f"{what}: placements {out.placements}"
        expected = torch.stack([plain_norm(t, p, squared) for t in plain])
        close(out, expected, what)
        weights = torch.arange(1.0, len(plain) + 1)
        (expected * weights).sum().backward()
        (out.full_tensor() * weights).sum().backward()
        for i, (d, t) in enumerate(zip(sharded, plain)):
            assert d.grad.placements == d.placements, f"{what}: gradient placements of {i}"
            close(d.grad, t.grad, f"{what}: gradient of tensor {i}")


@check("dtensor")
def norm_partial_result_used_without_full_tensor(env: Env) -> None:
    # A downstream DTensor op (not full_tensor) redistributes the partial result itself.
    plain = [t.clone().requires_grad_() for t in tensors()]
    sharded = [env.shard(t).requires_grad_() for t in tensors()]
    out = regfuse.norms(sharded, p=2)
    (out * out).sum().backward()
    expected = torch.stack([torch.linalg.vector_norm(t) for t in plain])
    (expected * expected).sum().backward()
    for i, (d, t) in enumerate(zip(sharded, plain)):
        close(d.grad, t.grad, f"gradient of tensor {i}")


@check("dtensor")
def l2_norm_double_backward(env: Env) -> None:
    plain = [t.clone().requires_grad_() for t in tensors()[:2]]
    sharded = [env.shard(t).requires_grad_() for t in tensors()[:2]]
    probes = [torch.linspace(-1, 1, t.numel()).reshape(t.shape) for t in plain]

    def second_order(ts, make, probe):
        grads = torch.autograd.grad(make(ts), ts, create_graph=True)
        return sum((g * v).sum() for g, v in zip(grads, probe))

    second_order(plain, lambda ts: sum(torch.linalg.vector_norm(t) for t in ts), probes).backward()
    second_order(sharded, lambda ts: regfuse.norms(ts).full_tensor().sum(),
                 [env.shard(v) for v in probes]).backward()
    for i, (d, t) in enumerate(zip(sharded, plain)):
        close(d.grad, t.grad, f"second derivative of tensor {i}")


TOTAL_PLACEMENTS = {1: Partial("sum"), 2: _NormPartial(2.0), 3: _NormPartial(3.0), 0: Partial("sum"),
                    math.inf: Partial("max"), -math.inf: Partial("min")}


@check("dtensor")
def total_norm_global_value_and_gradients(env: Env) -> None:
    for p, placement in TOTAL_PLACEMENTS.items():
        what = f"total_norm(p={p})"
        plain = [t.clone().requires_grad_() for t in tensors()]
        sharded = [env.shard(t).requires_grad_() for t in tensors()]
        out = regfuse.total_norm(sharded, p)
        assert out.placements == (placement,), f"{what}: placements {out.placements}"
        expected = regfuse.total_norm(plain, p)  # one process; torch's get_total_norm for p != 0
        if p != 0:
            close(expected, torch.nn.utils.get_total_norm(plain, p), f"{what}: one process vs torch")
        close(out, expected, what)
        if p in (0, -math.inf):  # no gradient (0) / the zero tensor's minimum
            continue
        expected.backward()
        out.full_tensor().backward()
        for i, (d, t) in enumerate(zip(sharded, plain)):
            assert d.grad.placements == d.placements
            close(d.grad, t.grad, f"{what}: gradient of tensor {i}")
    # Mixed placements: a replicated result; a single DTensor as torch takes it.
    mixed = [env.shard(t, q) for t, q in zip(tensors(), [Shard(0), Replicate(), Shard(1), Replicate(), Shard(0)])]
    out = regfuse.total_norm(mixed, 2)
    assert out.placements == (Replicate(),), out.placements
    close(out, torch.nn.utils.get_total_norm(tensors(), 2), "total_norm of mixed placements")
    close(regfuse.total_norm(env.shard(tensors()[0]), 2),
          torch.linalg.vector_norm(tensors()[0]), "total_norm of one DTensor")


@check("dtensor")
def total_norm_nonfinite_raises_on_every_rank(env: Env) -> None:
    values = tensors()
    values[1][6] = math.nan  # on rank 1's shard only
    sharded = [env.shard(t) for t in values]
    try:
        regfuse.total_norm(sharded, 2, error_if_nonfinite=True)
    except RuntimeError as exc:
        assert "non-finite" in str(exc), exc
    else:
        MISMATCHES.append(f"rank {env.rank}: no error for a NaN on rank 1's shard")
    assert regfuse.total_norm(sharded, 2).full_tensor().isnan()


@check("dtensor")
def clip_grad_norm_of_dtensor_gradients(env: Env) -> None:
    for max_norm, p in ((0.5, 2.0), (1.0, math.inf), (100.0, 2.0)):  # the last clips nothing
        plain = [nn.Parameter(t.clone()) for t in tensors()]
        sharded = [nn.Parameter(env.shard(t)) for t in tensors()]
        for i, (a, b) in enumerate(zip(plain, sharded)):
            if i != 2:  # one parameter without a gradient
                a.grad = torch.linspace(-2, 3, a.numel()).reshape(a.shape)
                b.grad = env.shard(a.grad)
        expected = torch.nn.utils.clip_grad_norm_(plain, max_norm, p)
        out = regfuse.clip_grad_norm_(sharded, max_norm, p)
        close(out, expected, f"clip_grad_norm_({max_norm}, {p}): total norm")
        for i, (a, b) in enumerate(zip(plain, sharded)):
            assert (a.grad is None) == (b.grad is None)
            if a.grad is not None:
                assert b.grad.placements == b.placements
                close(b.grad, a.grad, f"clip_grad_norm_({max_norm}, {p}): gradient {i}")


@check("dtensor")
def penalty_with_coefficients(env: Env) -> None:
    for coefficients in ([0.5, 2.0, 1.0, 3.0, 0.25], torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25])):
        plain = [t.clone().requires_grad_() for t in tensors()]
        sharded = [env.shard(t).requires_grad_() for t in tensors()]
        out = regfuse.penalty(sharded, L1, L2, coefficients=coefficients)
        assert type(out) is torch.Tensor, type(out)  # a loss term: the global value, plain
        expected = plain_penalty(plain, coefficients=[float(c) for c in coefficients])
        close(out, expected, "penalty")
        expected.backward()
        out.backward()
        for i, (d, t) in enumerate(zip(sharded, plain)):
            close(d.grad, t.grad, f"penalty gradient of tensor {i}")


@check("dtensor")
def replicated_and_mixed_placements(env: Env) -> None:
    # Replicate only: a replicated result, not summed over the ranks.
    plain = [t.clone().requires_grad_() for t in tensors()]
    replicated = [env.shard(t, Replicate()).requires_grad_() for t in tensors()]
    out = regfuse.penalty(replicated, L1, L2)
    close(out, plain_penalty(plain), "penalty of replicated tensors (counted once)")
    # Shard(0), Shard(1) and Replicate in one list (tensor parallelism): one launch per
    # result placement, combined into a replicated result; gradients keep each placement.
    placements = [Shard(0), Replicate(), Shard(1), Shard(1), Replicate()]
    coefficients = [0.5, 2.0, 1.0, 3.0, 0.25]
    for p in (1, 2, math.inf):
        plain = [t.clone().requires_grad_() for t in tensors()]
        mixed = [env.shard(t, q).requires_grad_() for t, q in zip(tensors(), placements)]
        out = regfuse.norms(mixed, p=p)
        assert out.placements == (Replicate(),), out.placements
        expected = torch.stack([torch.linalg.vector_norm(t, p) for t in plain])
        close(out.to_local(), expected, f"norms(p={p}) of mixed placements")
        weights = torch.arange(1.0, len(plain) + 1)
        (out.to_local() * weights).sum().backward()
        (expected * weights).sum().backward()
        for i, (d, t) in enumerate(zip(mixed, plain)):
            assert d.grad.placements == d.placements
            close(d.grad, t.grad, f"norms(p={p}) gradient of tensor {i}")
    plain = [t.clone().requires_grad_() for t in tensors()]
    mixed = [env.shard(t, q).requires_grad_() for t, q in zip(tensors(), placements)]
    out = regfuse.penalty(mixed, L1, L2, coefficients=(c for c in coefficients))  # any iterable
    expected = plain_penalty(plain, coefficients=coefficients)
    close(out, expected, "penalty of mixed placements")
    out.backward()
    expected.backward()
    for i, (d, t) in enumerate(zip(mixed, plain)):
        close(d.grad, t.grad, f"penalty gradient of tensor {i}")


@check("dtensor")
def partial_input_is_reduced_first(env: Env) -> None:
    t = tensors()[0]
    # Rank r holds (r + 1) * t / 3: the pending sum is t.
    pending = DTensor.from_local(t * (env.rank + 1) / 3, env.mesh, [Partial("sum")])
    close(regfuse.norms([pending], p=1), t.abs().sum().reshape(1), "norms of a Partial input")


# Functions on whole slices (the shape of group norms and the group lasso), written for
# plain 2-D tensors and made DTensor-aware by one decorator line each.
@dtensor_aware(reduce=NormPartial(2.0), per_tensor="list", slices=lambda args: args["dim"])
def slice_norms(tensors, dim=0):
    return [torch.linalg.vector_norm(t, dim=1 - dim) for t in tensors]


@dtensor_aware(reduce=SUM, slices=lambda args: args["dim"])
def sum_of_slice_norms(tensors, dim=0):
    return sum(n.sum() for n in slice_norms(tensors, dim))


@dtensor_aware(in_place="values", slices=lambda args: args["dim"])
def normalize_slices_(tensors, dim=0):
    for t in tensors:
        t.div_(torch.linalg.vector_norm(t, dim=1 - dim, keepdim=True).clamp_min(1e-6))


@check("dtensor")
def functions_on_whole_slices(env: Env) -> None:
    matrices = [tensors()[i] for i in (0, 2, 3)]  # (5, 3), (1, 4), (3, 2): uneven rows
    for dim, placement in ((0, Shard(0)), (1, _NormPartial(2.0))):  # Shard(0) splits columns
        plain = [t.clone().requires_grad_() for t in matrices]
        sharded = [env.shard(t).requires_grad_() for t in matrices]
        got = slice_norms(sharded, dim=dim)
        expected = slice_norms(plain, dim=dim)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g.placements == (placement,), f"slice_norms(dim={dim}) {i}: {g.placements}"
            close(g, e, f"slice_norms(dim={dim}) of tensor {i}")
        total = sum_of_slice_norms(sharded, dim=dim)
        close(total, sum_of_slice_norms(plain, dim=dim), f"sum_of_slice_norms(dim={dim})")
        sum(full(g).sum() * (k + 1) for k, g in enumerate(got)).backward()
        sum(e.sum() * (k + 1) for k, e in enumerate(expected)).backward()
        for i, (d, t) in enumerate(zip(sharded, plain)):
            assert d.grad.placements == d.placements
            close(d.grad, t.grad, f"slice_norms(dim={dim}) gradient of tensor {i}")
    plain = [t.clone() for t in matrices]
    sharded = [env.shard(t) for t in matrices]
    normalize_slices_(plain)
    normalize_slices_(sharded)
    for i, (d, t) in enumerate(zip(sharded, plain)):
        close(d, t, f"normalize_slices_ of tensor {i}")
    before = [d.to_local().clone() for d in sharded]
    try:
        normalize_slices_(sharded, dim=1)
    except ValueError as exc:
        assert "whole slices" in str(exc), exc
    else:
        MISMATCHES.append("an in-place op on slices split over the ranks was not refused")
    assert all(torch.equal(d.to_local(), b) for d, b in zip(sharded, before))


@check("dtensor")
def group_ops_on_dtensors(env: Env) -> None:
    # FSDP2's Shard(0) leaves every rank whole groups along dim 0 (rows): local launches;
    # along dim 1 the groups are split: partial per-group norms, reduced when asked for.
    matrices = [tensors()[i] for i in (0, 2, 3)] + [tensors()[1]]  # (5, 3), (1, 4), (3, 2), (7,)
    for dim, placement in ((0, Shard(0)), (-1, _NormPartial(2.0))):
        plain = [t.clone().requires_grad_() for t in matrices]
        sharded = [env.shard(t).requires_grad_() for t in matrices]
        got = regfuse.group_norms(sharded, dim=dim)
        expected = regfuse.group_norms(plain, dim=dim)
        for i, (g, e) in enumerate(zip(got, expected)):
            if matrices[i].dim() == 2:
                assert g.placements == (placement,), f"group_norms(dim={dim}) {i}: {g.placements}"
            close(g, e, f"group_norms(dim={dim}) of tensor {i}")
        total = regfuse.group_penalty(sharded, 0.3, dim=dim, l1=0.1, coefficients=[1.0, 2.0, 0.5, 1.0])
        reference = regfuse.group_penalty(plain, 0.3, dim=dim, l1=0.1, coefficients=[1.0, 2.0, 0.5, 1.0])
        close(total, reference, f"group_penalty(dim={dim})")
        full(total).backward()
        reference.backward()
        for i, (d, t) in enumerate(zip(sharded, plain)):
            assert d.grad.placements == d.placements
            close(d.grad, t.grad, f"group_penalty(dim={dim}) gradient of tensor {i}")
    plain = [t.clone() for t in matrices]
    sharded = [env.shard(t) for t in matrices]
    regfuse.prox_group_lasso_(plain, 0.4, l1_threshold=0.1)
    regfuse.prox_group_lasso_(sharded, 0.4, l1_threshold=0.1)
    for i, (d, t) in enumerate(zip(sharded, plain)):
        close(d, t, f"prox_group_lasso_ of tensor {i}")
    assert any(bool((t == 0).all(dim=-1).any()) for t in plain if t.dim() == 2)  # whole rows zeroed
    # Along dim 1 the groups are split over the ranks: their sums of squares are all-reduced.
    regfuse.prox_group_lasso_(plain[:3], 0.2, dim=1, l1_threshold=0.05)
    regfuse.prox_group_lasso_(sharded[:3], 0.2, dim=1, l1_threshold=0.05)
    for i, (d, t) in enumerate(zip(sharded, plain)):
        close(d, t, f"prox_group_lasso_(dim=1) of tensor {i}")
    from regfuse.groups import add_group_penalty_grad_
    for ts in (plain, sharded):
        for t in ts:
            t.grad = torch.ones_like(t)
        add_group_penalty_grad_(ts[:3], 0.3, dim=1)
    for i, (d, t) in enumerate(zip(sharded, plain)):
        close(d.grad, t.grad, f"add_group_penalty_grad_(dim=1) of tensor {i}")


@check("dtensor")
def in_place_ops_on_shards(env: Env) -> None:
    coefficients = [1.0, 0.5, 2.0, 1.0, 0.0]
    plain = [t.clone() for t in tensors()]
    sharded = [env.shard(t) for t in tensors()]
    versions = [d._version for d in sharded]
    regfuse.prox_l1_(plain, 0.4, coefficients=coefficients)
    regfuse.prox_l1_(sharded, 0.4, coefficients=coefficients)
    for i, (d, t) in enumerate(zip(sharded, plain)):
        assert d._version > versions[i], "prox_l1_ must bump the DTensor's version counter"
        close(d, t, f"prox_l1_ of tensor {i}")
    plain = [nn.Parameter(t.clone()) for t in tensors()]
    sharded = [nn.Parameter(env.shard(t)) for t in tensors()]
    for i in (0, 2):  # a gradient to add to; the others have none yet
        plain[i].grad = torch.full_like(plain[i], 0.5)
        sharded[i].grad = env.shard(torch.full_like(plain[i], 0.5))
    regfuse.add_penalty_grad_(plain, L1, L2, coefficients=coefficients)
    regfuse.add_penalty_grad_(sharded, L1, L2, coefficients=coefficients)
    for i, (d, t) in enumerate(zip(sharded, plain)):
        assert isinstance(d.grad, DTensor) and d.grad.placements == d.placements
        close(d.grad, t.grad, f"add_penalty_grad_ of tensor {i}")


class UnknownPlacement(Replicate):
    """A placement regfuse does not know: neither sharding, replicating nor partial."""

    def is_replicate(self) -> bool:
        return False


@check("dtensor")
def clear_errors_before_anything_runs(env: Env) -> None:
    sharded = [nn.Parameter(env.shard(t)) for t in tensors()]
    before = [d.to_local().clone() for d in sharded]

    def raises(kind, fn, text):
        try:
            fn()
        except kind as exc:
            assert text in str(exc), f"{kind.__name__} without {text!r}: {exc}"
        else:
            raise AssertionError(f"no {kind.__name__} ({text})")

    # One DTensor is a list of one, as a plain tensor is.
    assert torch.equal(regfuse.norms(sharded[0]).full_tensor(), regfuse.norms(sharded[:1]).full_tensor())
    unknown = DTensor.from_local(torch.ones(3), env.mesh, [UnknownPlacement()], run_check=False)
    raises(NotImplementedError, lambda: regfuse.norms([sharded[0], unknown]), "UnknownPlacement")
    raises(NotImplementedError, lambda: regfuse.prox_l1_([sharded[0], unknown], 0.1), "UnknownPlacement")
    mixed = [sharded[0], env.shard(torch.ones(3), Replicate())]
    raises(ValueError, lambda: regfuse.penalty(mixed, L1, coefficients=[1.0, 2.0, 3.0]), "coefficients")
    raises(ValueError, lambda: regfuse.penalty(mixed, L1, coefficients=torch.ones(2, 1)), "coefficients")
    sharded[1].grad = env.shard(torch.ones(7), Replicate())
    raises(ValueError, lambda: regfuse.add_penalty_grad_(sharded, L1, L2), "placements")
    pending = DTensor.from_local(torch.ones(3), env.mesh, [Partial("sum")])
    raises(ValueError, lambda: regfuse.prox_l1_([sharded[0], pending], 0.1), "Partial")
    for i, (d, b) in enumerate(zip(sharded, before)):
        assert torch.equal(d.to_local(), b), f"tensor {i} modified by a refused call"
    assert sharded[0].grad is None and sharded[2].grad is None


@check("dtensor")
def gradient_penalty_of_dtensor_inputs(env: Env) -> None:
    plain = tensors()[0].clone().requires_grad_()
    sharded = env.shard(plain).requires_grad_()
    expected = regfuse.gradient_penalty((plain ** 3).sum(), [plain], weight=0.5)
    out = regfuse.gradient_penalty((sharded ** 3).sum().full_tensor(), [sharded], weight=0.5)
    close(out, expected, "gradient_penalty")
    expected.backward()
    full(out).backward()
    close(sharded.grad, plain.grad, "gradient through gradient_penalty")


@check("dtensor")
def sparsity_report_of_dtensors(env: Env) -> None:
    named = [(f"t{i}", t) for i, t in enumerate(tensors())]
    expected = regfuse.sparsity_report(named)
    got = regfuse.sparsity_report([(n, env.shard(t)) for n, t in named])
    assert [(r.name, r.numel, r.zeros, r.groups, r.zero_groups) for r in got.rows] == \
        [(r.name, r.numel, r.zeros, r.groups, r.zero_groups) for r in expected.rows], (got, expected)
    for r, e in zip(got.rows, expected.rows):
        assert math.isclose(r.l1, e.l1, rel_tol=1e-5) and math.isclose(r.l2, e.l2, rel_tol=1e-5), (r, e)


# ---- DDP and FSDP2 training -------------------------------------------------------------------

@check("ddp-copy", "ddp-view", "fsdp2")
def weight_regularizer_attach(env: Env) -> None:
    # Every backward adds the penalty gradient once: two backward passes accumulate two.
    once = oracle_grads(lambda m, x: plain_penalty(regfuse.WeightRegularizer(m).params))[1]
    model = wrap(env, MLP())
    reg = regfuse.WeightRegularizer(model, l1=L1, l2=L2)
    handle = reg.attach()
    for step in range(2):
        local_loss(env, model).backward()
        compare_grads(model, {k: (step + 1) * g for k, g in once.items()}, f"backward {step}")
    handle.remove()
    model.zero_grad()
    local_loss(env, model).backward()
    compare_grads(model, oracle_grads()[1], "after remove()")


@check("ddp-copy", "ddp-view")
def weight_regularizer_attach_with_no_sync(env: Env) -> None:
    # Gradient accumulation: the first backward without the all-reduce, the second with it.
    once = oracle_grads(lambda m, x: plain_penalty(regfuse.WeightRegularizer(m).params))[1]
    model = wrap(env, MLP())
    regfuse.WeightRegularizer(model, l1=L1, l2=L2).attach()
    with model.no_sync():
        local_loss(env, model).backward()
    local_loss(env, model).backward()
    compare_grads(model, {k: 2 * g for k, g in once.items()}, "no_sync() then a synchronized backward")


@check("ddp-copy", "ddp-view", "fsdp2")
def weight_regularizer_step_keeps_ranks_identical(env: Env) -> None:
    reference = MLP()
    ref_reg = regfuse.WeightRegularizer(reference, l1=L1, l2=L2)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    model = wrap(env, MLP())
    reg = regfuse.WeightRegularizer(model, l1=L1, l2=L2)
    reg.attach()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    for _ in range(3):
        ref_opt.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        ref_reg.add_grad_()
        ref_opt.step()
        opt.zero_grad()
        local_loss(env, model).backward()
        opt.step()
    for (name, p), q in zip(inner(model).named_parameters(), reference.parameters()):
        value = full(p.detach())
        close(value, q.detach(), f"{name} after 3 steps")
        gathered = [torch.empty_like(value) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, value.contiguous())
        assert torch.equal(gathered[0], gathered[1]), f"{name} differs between the ranks"


@check("ddp-copy", "ddp-view", "fsdp2")
def weight_regularizer_penalty_and_add_grad(env: Env) -> None:
    expected = oracle_grads(lambda m, x: plain_penalty(regfuse.WeightRegularizer(m).params))[1]
    model = wrap(env, MLP())
    reg = regfuse.WeightRegularizer(model, l1=L1, l2=L2)
    # The penalty is the same on every rank, and averaging keeps it: add it to every loss.
    (local_loss(env, model) + full(reg.penalty())).backward()
    compare_grads(model, expected, "penalty() in the loss")
    model.zero_grad()
    local_loss(env, model).backward()
    reg.add_grad_()
    compare_grads(model, expected, "add_grad_()")


@check("ddp-copy", "ddp-view", "fsdp2")
def activation_regularizer_scaled_per_sample(env: Env) -> None:
    # Activations are per rank; penalty() / local batch averages like the loss does.
    def activity(m, x):
        with regfuse.ActivationRegularizer(relus(m), l1=L1, l2=L2) as act:
            m(x)
            return act.penalty() / len(x)
    expected = oracle_grads(activity)[1]
    model = wrap(env, MLP())
    act = regfuse.ActivationRegularizer(relus(model), l1=L1, l2=L2)
    x, y = data()
    xs = env.batch(x)
    loss = nn.functional.mse_loss(model(xs), env.batch(y)) + act.penalty() / len(xs)
    loss.backward()
    act.remove()
    compare_grads(model, expected, "activation penalty / len(x)")


@check("ddp-copy", "fsdp2")
def proximal_step_of_model(env: Env) -> None:
    # SGD with the proximal group lasso on the weights (FSDP2: rows sharded over the ranks,
    # so each rank shrinks its own whole rows) against one process on the whole batch.
    reference, _ = oracle_grads()  # its .grad: the gradients of one process
    model = wrap(env, MLP())
    local_loss(env, model).backward()
    results = []
    for net in (inner(model), reference):
        weights = regfuse.WeightRegularizer(net, group_lasso=0.5)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
        prox = regfuse.ProximalStep(optimizer, group_lasso=weights.group_lasso, params=weights.params)
        optimizer.step()
        prox.remove()
        results.append(dict(net.named_parameters()))
    got, want = results
    for name in want:
        close(got[name].detach(), want[name].detach(), f"{name} after the proximal step")
    assert any(bool((w == 0).all(dim=1).any()) for w in want.values() if w.dim() == 2), \
        "the step should zero some rows"


@check("ddp-copy", "ddp-view", "fsdp2")
def clip_with_the_global_norm(env: Env) -> None:
    # DDP: identical gradients, nothing to all-reduce; FSDP2: the shards' norms reduced.
    reference, _ = oracle_grads()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    model = wrap(env, MLP())
    local_loss(env, model).backward()
    total = regfuse.clip_grad_norm_(model.parameters(), 0.05)
    assert isinstance(total, DTensor) == (env.config == "fsdp2")
    close(full(total), expected, "the total norm")
    assert float(expected) > 0.05, "the gradients should be clipped"
    compare_grads(model, {n: p.grad for n, p in reference.named_parameters()}, "clipped gradients")


@check("ddp-copy", "ddp-view", "fsdp2")
def norms_report_and_prox_of_model(env: Env) -> None:
    reference, expected = oracle_grads()
    model = wrap(env, MLP())
    local_loss(env, model).backward()
    params = list(inner(model).parameters())
    close(regfuse.norms([p.grad for p in params]), torch.stack(
        [torch.linalg.vector_norm(g) for g in expected.values()]), "norms of the gradients")
    close(regfuse.norms(params, p=1), torch.stack(
        [p.detach().abs().sum() for p in reference.parameters()]), "L1 norms of the parameters")
    with torch.no_grad():
        regfuse.prox_l1_(params, 0.2)
        regfuse.prox_l1_(list(reference.parameters()), 0.2)
    got = regfuse.sparsity_report(inner(model))
    want = regfuse.sparsity_report(reference)
    assert [(r.name, r.numel, r.zeros) for r in got.rows] == \
        [(r.name, r.numel, r.zeros) for r in want.rows], (got, want)
    assert want.zeros > 0, "the threshold should zero some weights"
    for r, e in zip(got.rows, want.rows):
        assert math.isclose(r.l1, e.l1, rel_tol=1e-5) and math.isclose(r.l2, e.l2, rel_tol=1e-5), (r, e)


WRAPPINGS = ("blocks and root", "root only", "blocks only, root parameters")


def wrapped(env: Env, how: str) -> nn.Module:
    """FSDP2 three ways: every Linear and the root; the root alone (its parameters stay
    unsharded plain tensors after the forward); the first two Linears with the last one
    left to the root (torchtitan's layout: DTensors and plain parameters mixed)."""
    model = MLP()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    blocks = {"blocks and root": linears, "root only": [],
              "blocks only, root parameters": linears[:2]}[how]
    for layer in blocks:
        fully_shard(layer, mesh=env.mesh)
    return fully_shard(model, mesh=env.mesh)


@check("ddp-copy", "fsdp2")
def loss_terms_join_a_plain_loss(env: Env) -> None:
    # loss + penalty(model.parameters()) + group_penalty + WeightRegularizer.penalty(), no
    # .full_tensor(): the oracle's gradients under DDP and FSDP2's three wrappings.
    def terms(model):
        return (regfuse.penalty(model.parameters(), L1, L2)
                + regfuse.group_penalty([p for p in model.parameters() if p.dim() == 2], 0.05, l1=L1)
                + regfuse.WeightRegularizer(model, l2=L2).penalty())
    expected = oracle_grads(lambda m, x: terms(m))[1]
    for how in (WRAPPINGS if env.config == "fsdp2" else ("ddp",)):
        model = wrap(env, MLP()) if how == "ddp" else wrapped(env, how)
        x, y = data()
        loss = nn.functional.mse_loss(model(env.batch(x)), env.batch(y))
        term = terms(inner(model))
        assert type(term) is torch.Tensor, (how, type(term))
        (loss + term).backward()
        compare_grads(model, expected, f"{how}: loss + the loss terms")


@check("ddp-copy", "fsdp2")
def grad_norms_of_model(env: Env) -> None:
    _, expected = oracle_grads()
    model = wrap(env, MLP())
    local_loss(env, model).backward()
    got = regfuse.grad_norms(inner(model))
    want = {f"grad_2.0_norm/{name}": torch.linalg.vector_norm(g) for name, g in expected.items()}
    want["grad_2.0_norm_total"] = torch.stack(list(want.values())).norm()
    assert list(got) == list(want), (list(got), list(want))
    for key, value in got.items():
        assert not isinstance(value, DTensor), f"{key} is a DTensor"
        close(value, want[key], f"grad_norms {key}")


@check("ddp-copy", "fsdp2")
def example_ddp_fsdp(env: Env) -> None:
    path = Path(__file__).resolve().parent.parent / "examples" / "ddp_fsdp.py"
    spec = importlib.util.spec_from_file_location("ddp_fsdp_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    engine = "ddp" if env.config.startswith("ddp") else "fsdp2"
    with contextlib.redirect_stdout(io.StringIO()):
        difference = example.compare(engine, torch.device("cpu"))
    if not difference < 1e-6:
        MISMATCHES.append(f"examples/ddp_fsdp.py under {engine}: parameters {difference:.1e} "
                          "away from one process")


# ---- the worker -----------------------------------------------------------------------------

def run(rank: int, world_size: int, port: int, out: str, checks: dict = CHECKS,
        make_env: Callable = lambda config, rank, world_size: Env(
            config, rank, init_device_mesh("cpu", (world_size,)))) -> None:
    """Runs every check, writing the outcomes so far to ``out`` after each one."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=30))
    results: dict = {}
    try:
        for name, fn in checks.items():
            MISMATCHES.clear()
            try:
                fn(make_env(name.split("/")[0], rank, world_size))
                results[name] = "\n".join(MISMATCHES) or None
            except Exception:  # reported to the test, which fails with it
                results[name] = "\n".join([*MISMATCHES, traceback.format_exc()])
            with open(out, "w") as f:
                json.dump(results, f)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
