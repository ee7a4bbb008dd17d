"""The 4-rank checks of tests/test_distributed.py: 2-D and 3-D parallelism on a gloo group.

Run as ``python tests/distributed_checks_2d.py RANK 4 PORT RESULT_FILE`` (the runner of
tests/distributed_checks.py). Every check compares what the ranks compute with one
process in float64 on the whole batch and the unsharded tensors:

* ``fsdp_tp``: torchtitan's composition, ``parallelize_module`` (Colwise / Rowwise) over
  ``tp`` and ``fully_shard`` over ``dp`` of a (dp=2, tp=2) mesh, whose Colwise weight and
  bias get ``(_StridedShard(0, split_factor=2), Shard(0))``, with a layer left without a
  plan on the 1-D ``dp`` submesh (so ``model.parameters()`` spans two meshes);
* ``spread``: one list over two meshes (dense on (dp, tp), "experts" on (ep, efsdp)) and
  plain tensors (replicated on every rank), every function;
* ``pipeline``: 2 stages x 2 dp ranks, activations and their gradients sent between the
  stages, clipping with ``pp_mesh``.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import distributed_checks as base
import regfuse

WORLD_SIZE = 4
CHECKS: dict = {}
L1, L2, GROUP = 0.01, 0.1, 0.05
TOL = dict(rtol=1e-5, atol=1e-6)
BATCH = 8


def check(*configs: str):
    return base.check(*configs, registry=CHECKS)


class Env:
    def __init__(self, config: str, rank: int):
        self.config, self.rank = config, rank
        names = ("pp", "dp") if config == "pipeline" else ("dp", "tp")
        self.mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=names)


def close(actual, expected, what: str) -> None:
    if isinstance(actual, DTensor):
        actual = actual.full_tensor()
    try:
        torch.testing.assert_close(actual.double(), expected.double(), **TOL)
    except AssertionError as exc:
        base.MISMATCHES.append(f"rank {dist.get_rank()}: {what}: {exc}")


def close_each(actual: list, expected: list, what: str, attribute: str = "value") -> None:
    """``close`` for every pair of tensors (``attribute="grad"``: of their gradients)."""
    for i, (a, b) in enumerate(zip(actual, expected)):
        if attribute == "grad":
            a, b = a.grad, b.grad
        close(a, b, f"{what}, tensor {i}")


def all_reduces(fn) -> tuple[object, dict]:
    """``fn()`` and the collectives it made (CommDebugMode: c10d and functional ones)."""
    mode = CommDebugMode()
    with mode:
        result = fn()
    counts: dict = {}
    for op, n in mode.get_comm_counts().items():  # c10d and functional names alike
        name = str(op).split(".")[-1].split("'")[0].rstrip("_").replace("allreduce", "all_reduce")
        counts[name] = counts.get(name, 0) + n
    return result, counts


def at_most(counts: dict, limit: dict, what: str) -> None:
    for name, n in counts.items():
        if n > limit.get(name, 0):
            base.MISMATCHES.append(f"{what}: {n} {name} (at most {limit.get(name, 0)} expected), {counts}")


# ---- FSDP2 + tensor parallelism ---------------------------------------------------------------

class Net(nn.Sequential):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6), nn.Linear(6, 3))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 6, generator=gen), torch.randn(BATCH, 3, generator=gen)


def oracle(extra=lambda model: 0):
    """float64, one process, the whole batch: the model and its gradients."""
    model = Net().double()
    x, y = data()
    (nn.functional.mse_loss(model(x.double()), y.double()) + extra(model)).backward()
    return model


def parallel(env: Env) -> nn.Module:
    model = Net()
    parallelize_module(model, env.mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    for i in (0, 2, 3):  # layer 3 has no plan: it stays on the 1-D dp mesh
        fully_shard(model[i], mesh=env.mesh["dp"])
    return fully_shard(model, mesh=env.mesh["dp"])


def local_backward(env: Env, model: nn.Module, extra=lambda model: 0) -> None:
    x, y = data()
    dp = env.mesh["dp"].get_local_rank()
    xs, ys = x.chunk(2)[dp], y.chunk(2)[dp]
    (nn.functional.mse_loss(model(xs), ys) + extra(model)).backward()


def weights(model: nn.Module) -> list:
    return [p for n, p in model.named_parameters() if n.endswith("weight")]


def compare_grads(model, reference, what: str) -> None:
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        close(p.grad, q.grad, f"{what}: gradient of {name}")


def compare_values(model, reference, what: str) -> None:
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        close(p.detach(), q.detach(), f"{what}: {name}")


@check("fsdp_tp")
def placements_are_the_composed_ones(env: Env) -> None:
    model = parallel(env)
    seen = {n: tuple(type(q).__name__ for q in p.placements) for n, p in model.named_parameters()}
    assert seen["0.weight"] == ("_StridedShard", "Shard"), seen
    assert len({p.device_mesh for p in model.parameters()}) == 2, "two meshes expected"


@check("fsdp_tp")
def norms_and_clipping(env: Env) -> None:
    reference = oracle()
    for p, max_norm in ((2.0, 0.05), (1.0, 0.1), (math.inf, 0.02)):
        what = f"p={p}"
        model = parallel(env)
        local_backward(env, model)
        grads = [q.grad for q in model.parameters()]
        ref_grads = [q.grad for q in reference.parameters()]
        # One mesh, mixed placements (the TP layers, _StridedShard included): one all-reduce,
        # torch makes as many or more.
        two_d = [q.grad for q in list(model[0].parameters()) + list(model[2].parameters())]
        ours, counts = all_reduces(lambda: regfuse.total_norm(two_d, p).full_tensor())
        theirs, torch_counts = all_reduces(lambda: torch.nn.utils.get_total_norm(two_d, p).full_tensor())
        close(ours, torch.nn.utils.get_total_norm(ref_grads[:4], p), f"total_norm of the TP layers {what}")
        close(ours, theirs, f"total_norm of the TP layers {what} vs torch")
        close(regfuse.norms(two_d, p), torch.stack([torch.linalg.vector_norm(g, p) for g in ref_grads[:4]]),
              f"norms of the TP layers {what}")
        # The whole model: two meshes (layer 3 on dp alone).
        close(regfuse.total_norm(grads, p), torch.nn.utils.get_total_norm(ref_grads, p), f"total_norm {what}")
        close(regfuse.norms(grads, p), torch.stack([torch.linalg.vector_norm(g, p) for g in ref_grads]),
              f"norms {what}")
        at_most(counts, {"all_reduce": min(1, torch_counts.get("all_reduce", 0))}, f"total_norm {what}")
        _, counts = all_reduces(lambda: regfuse.clip_grad_norm_(model.parameters(), max_norm, p))
        at_most(counts, {"all_reduce": 2}, f"clip_grad_norm_ {what} (two meshes)")
        clipped = oracle()
        expected = torch.nn.utils.clip_grad_norm_(clipped.parameters(), max_norm, p)
        compare_grads(model, clipped, f"clip_grad_norm_ {what}")
        assert float(expected) > max_norm
    model = parallel(env)
    local_backward(env, model)
    total = regfuse.total_norm([q.grad for q in model.parameters()])
    regfuse.clip_grads_with_norm_(model.parameters(), 0.05, total)
    clipped = oracle()
    torch.nn.utils.clip_grad_norm_(clipped.parameters(), 0.05)
    compare_grads(model, clipped, "clip_grads_with_norm_")


@check("fsdp_tp")
def loss_terms_give_the_oracle_gradients(env: Env) -> None:
    def terms(model):
        return (regfuse.penalty(model.parameters(), L1, L2)
                + regfuse.group_penalty(weights(model), GROUP, dim=1)
                + regfuse.WeightRegularizer(model, l1=L1, group_lasso=GROUP).penalty())
    reference = oracle(terms)
    model = parallel(env)
    value = terms(model)
    assert type(value) is torch.Tensor, type(value)
    close(value, terms(oracle()), "value of the loss terms")
    local_backward(env, model, terms)
    compare_grads(model, reference, "loss + penalty + group_penalty + WeightRegularizer.penalty()")
    # One scalar all-reduce per mesh in the forward, none in the backward.
    value, counts = all_reduces(lambda: regfuse.penalty(model.parameters(), L1, L2))
    at_most(counts, {"all_reduce": 2}, "penalty over two meshes (forward)")
    _, counts = all_reduces(value.backward)
    at_most(counts, {}, "penalty (backward)")


@check("fsdp_tp")
def activation_regularizer_on_the_colwise_output(env: Env) -> None:
    # Each tp rank penalizes its own features of the Colwise output (a plain local tensor),
    # per sample of its dp part of the batch: the gradients of one process on the whole batch.
    model = parallel(env)
    act = regfuse.ActivationRegularizer([model[1]], l1=L1, l2=L2)
    local_backward(env, model, lambda m: act.penalty() / (BATCH // 2))
    act.remove()
    reference = Net().double()
    hooked = regfuse.ActivationRegularizer([reference[1]], l1=L1, l2=L2)
    x, y = data()
    (nn.functional.mse_loss(reference(x.double()), y.double()) + hooked.penalty() / BATCH).backward()
    hooked.remove()
    compare_grads(model, reference, "ActivationRegularizer")


@check("fsdp_tp")
def group_ops_and_in_place_ops(env: Env) -> None:
    model = parallel(env)
    reference = Net().double()
    params = list(model.parameters())
    for dim in (0, 1):
        got = regfuse.group_norms(weights(model), dim=dim)
        for g, w in zip(got, weights(reference)):
            close(g, torch.linalg.vector_norm(w.detach(), dim=1 - dim), f"group_norms(dim={dim})")
    # Groups split over the ranks: partial sums all-reduced, never the weights gathered.
    _, counts = all_reduces(lambda: regfuse.group_norms(weights(model), dim=1))
    at_most(counts, {}, "group_norms(dim=1): partial DTensors")
    _, counts = all_reduces(lambda: [g.full_tensor() for g in regfuse.group_norms(weights(model), dim=1)])
    # (the all-gather: of Rowwise's per-group result, sharded like its groups over tp)
    at_most(counts, {"all_reduce": 4, "all_gather_into_tensor": 1}, "group_norms(dim=1).full_tensor()")
    _, counts = all_reduces(lambda: regfuse.group_penalty(weights(model), GROUP, dim=1))
    at_most(counts, {"all_reduce": 5}, "group_penalty(dim=1): one per split layout and mesh, no gather")
    with torch.no_grad():
        regfuse.prox_l1_(params, 0.05)
        regfuse.prox_l1_(list(reference.parameters()), 0.05)
    compare_values(model, reference, "prox_l1_")
    # Rowwise's weight has its rows split over tp: their sums of squares are all-reduced.
    _, counts = all_reduces(lambda: regfuse.prox_group_lasso_(params, 0.3, l1_threshold=0.01))
    at_most(counts, {"all_reduce": 1}, "prox_group_lasso_: one all-reduce for the split rows, no gather")
    regfuse.prox_group_lasso_(list(reference.parameters()), 0.3, l1_threshold=0.01)
    compare_values(model, reference, "prox_group_lasso_")
    model = parallel(env)
    local_backward(env, model)
    regfuse.add_penalty_grad_(list(model.parameters()), L1, L2)
    expected = oracle(lambda m: base.plain_penalty(list(m.parameters())))
    compare_grads(model, expected, "add_penalty_grad_")


@check("fsdp_tp")
def weight_regularizer_routes(env: Env) -> None:
    expected = oracle(lambda m: base.plain_penalty(regfuse.WeightRegularizer(m).params))
    model = parallel(env)
    reg = regfuse.WeightRegularizer(model, l1=L1, l2=L2)
    handle = reg.attach()
    local_backward(env, model)
    handle.remove()
    compare_grads(model, expected, "attach()")
    model.zero_grad()
    local_backward(env, model)
    reg.add_grad_()
    compare_grads(model, expected, "add_grad_()")


# ---- one list, two meshes and plain tensors ---------------------------------------------------

def spread_data() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(6, 4, generator=gen), torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen),
            torch.randn(4, 6, generator=gen), torch.zeros(2, 3), torch.randn(3, 5, generator=gen),
            torch.tensor([3.0, -1.0, -3.0, 2.0])]


def spread(env: Env, values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Dense tensors on (dp, tp), expert-like ones on (ep, efsdp), plain ones."""
    experts = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "efsdp"))
    layout = [(env.mesh, [Shard(0), Shard(1)]), (env.mesh, [Shard(0), Replicate()]), (None, None),
              (experts, [Shard(0), Shard(1)]), (experts, [Replicate(), Shard(0)]), (None, None),
              (env.mesh, [Replicate(), Shard(0)])]
    return [v.clone() if mesh is None else distribute_tensor(v.clone(), mesh, placements)
            for v, (mesh, placements) in zip(values, layout)]


@check("spread")
def reductions_values_and_gradients(env: Env) -> None:
    def cases(ts):
        yield "norms(p=2)", lambda: regfuse.norms(ts).mul(torch.arange(1.0, 8.0, dtype=torch.float64)).sum()
        yield "norms(p=inf)", lambda: regfuse.norms(ts, float("inf")).sum()
        for p in (2, 1, 3, math.inf):
            yield f"total_norm(p={p})", lambda p=p: regfuse.total_norm(ts, p)
        yield "penalty", lambda: regfuse.penalty(ts, L1, L2, coefficients=[1, 2, 3, 1, 1, 0.5, 2])
        for dim in (0, 1):
            yield f"group_penalty(dim={dim})", lambda dim=dim: regfuse.group_penalty(
                [t for t in ts if t.dim() == 2], GROUP, dim=dim, l1=L1)
            yield f"group_norms(dim={dim})", lambda dim=dim: sum(
                (base.full(g).double() * (k + 1)).sum()
                for k, g in enumerate(regfuse.group_norms([t for t in ts if t.dim() == 2], dim=dim)))
    plain_cases = dict(cases(None))
    for name in plain_cases:
        plain = [v.double().requires_grad_() for v in spread_data()]
        mine = [t.requires_grad_() for t in spread(env, spread_data())]
        expected = dict(cases(plain))[name]()
        got = dict(cases(mine))[name]()
        assert type(got) is torch.Tensor, (name, type(got))
        close(got, expected, name)
        expected.backward()
        got.backward()
        for i, (a, b) in enumerate(zip(mine, plain)):
            assert (a.grad is None) == (b.grad is None), (name, i)
            if b.grad is not None:
                close(a.grad, b.grad, f"{name}: gradient of tensor {i}")
    mine = spread(env, spread_data())
    _, counts = all_reduces(lambda: regfuse.total_norm(mine))
    at_most(counts, {"all_reduce": 1}, "total_norm over two meshes spanning the world")
    _, counts = all_reduces(lambda: regfuse.penalty(mine, L1, L2))
    at_most(counts, {"all_reduce": 1}, "penalty over two meshes")


@check("spread")
def in_place_ops_and_clipping(env: Env) -> None:
    plain = [v.double() for v in spread_data()]
    mine = spread(env, spread_data())
    regfuse.prox_l1_(mine, 0.5)
    regfuse.prox_l1_(plain, 0.5)
    close_each(mine, plain, "prox_l1_ of tensor", "value")
    for dim in (0, -1):  # rows split over the ranks (Shard(1)) and whole ones, two meshes
        mine, reference = spread(env, spread_data()), [v.double() for v in spread_data()]
        regfuse.prox_group_lasso_(mine, 0.8, dim=dim)
        regfuse.prox_group_lasso_(reference, 0.8, dim=dim)
        close_each(mine, reference, f"prox_group_lasso_(dim={dim}) of tensor", "value")
    params = [nn.Parameter(t) for t in spread(env, spread_data())]
    ref = [nn.Parameter(v.double()) for v in spread_data()]
    for a, b in zip(params, ref):
        b.grad = torch.linspace(-2, 3, b.numel(), dtype=torch.float64).reshape(b.shape)
        a.grad = b.grad.float() if not isinstance(a, DTensor) else \
            distribute_tensor(b.grad.float(), a.device_mesh, a.placements)
    regfuse.add_penalty_grad_(params, L1, L2)
    regfuse.add_penalty_grad_(ref, L1, L2)
    close_each(params, ref, "add_penalty_grad_ of tensor", "grad")
    expected = torch.nn.utils.clip_grad_norm_(ref, 1.5)
    total = regfuse.clip_grad_norm_(params, 1.5)
    assert type(total) is torch.Tensor
    close(total, expected, "clip_grad_norm_: the norm")
    close_each(params, ref, "clip_grad_norm_: gradient", "grad")
    regfuse.clip_grads_with_norm_(params, 0.5, regfuse.total_norm([p.grad for p in params]))
    torch.nn.utils.clip_grads_with_norm_(ref, 0.5, torch.nn.utils.get_total_norm([p.grad for p in ref]))
    close_each(params, ref, "clip_grads_with_norm_: gradient", "grad")


@check("spread")
def weight_regularizer_on_a_spread_list(env: Env) -> None:
    params = [nn.Parameter(t) for t in spread(env, spread_data())]
    ref = [nn.Parameter(v.double()) for v in spread_data()]
    close(regfuse.WeightRegularizer(params, l1=L1, l2=L2, group_lasso=GROUP).penalty(),
          regfuse.WeightRegularizer(ref, l1=L1, l2=L2, group_lasso=GROUP).penalty(),
          "WeightRegularizer.penalty() with the group lasso")
    reg = regfuse.WeightRegularizer(params, l1=L1, l2=L2, group_lasso=GROUP)
    ref_reg = regfuse.WeightRegularizer(ref, l1=L1, l2=L2, group_lasso=GROUP)
    handle = reg.attach()
    regfuse.penalty(params, l2=0.5).backward()  # any loss over the list
    handle.remove()
    ref_reg.attach()
    regfuse.penalty(ref, l2=0.5).backward()
    close_each(params, ref, "attach(): gradient", "grad")
    reg.add_grad_()
    ref_reg.add_grad_()
    close_each(params, ref, "add_grad_(): gradient", "grad")


# ---- pipeline stages x data parallelism -------------------------------------------------------

@check("pipeline")
def two_stages_clip_with_pp_mesh(env: Env) -> None:
    pp, dp = env.mesh.get_coordinate()
    reference = Net().double()
    x, y = data()
    nn.functional.mse_loss(reference(x.double()), y.double()).backward()
    full_model = Net()
    stage = nn.Sequential(*list(full_model)[:2] if pp == 0 else list(full_model)[2:])
    fully_shard(stage, mesh=env.mesh["dp"])
    peer = env.mesh.mesh[1 - pp, dp].item()
    xs, ys = x.chunk(2)[dp], y.chunk(2)[dp]
    if pp == 0:
        hidden = stage(xs)
        dist.send(hidden.detach().contiguous(), peer)
        grad = torch.empty_like(hidden)
        dist.recv(grad, peer)
        hidden.backward(grad)
    else:
        hidden = torch.empty(xs.shape[0], 8)
        dist.recv(hidden, peer)
        hidden.requires_grad_()
        nn.functional.mse_loss(stage(hidden), ys).backward()
        dist.send(hidden.grad.contiguous(), peer)
    mine = list(stage.parameters())
    ref_stage = [q for layer in (list(reference)[:2] if pp == 0 else list(reference)[2:]) for q in layer.parameters()]
    everything = [p.grad for p in reference.parameters()]
    for p in (2.0, math.inf):
        for group in (env.mesh["pp"], env.mesh["pp"].get_group()):
            close(regfuse.total_norm([q.grad for q in mine], p, pp_mesh=group),
                  torch.nn.utils.get_total_norm(everything, p), f"total_norm(p={p}, pp_mesh={type(group).__name__})")
    saved = [q.grad.clone() for q in mine]
    total = regfuse.clip_grad_norm_(mine, 0.05, pp_mesh=env.mesh["pp"])
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    close(total, expected, "clip_grad_norm_(pp_mesh=): the norm over both stages")
    for a, b in zip(mine, ref_stage):
        close(a.grad, b.grad, "clip_grad_norm_(pp_mesh=): clipped gradient")
    for q, g in zip(mine, saved):
        q.grad = g
    regfuse.clip_grads_with_norm_(mine, 0.05, total)
    for a, b in zip(mine, ref_stage):
        close(a.grad, b.grad, "clip_grads_with_norm_ with the pipeline's norm")


if __name__ == "__main__":
    base.run(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], checks=CHECKS,
             make_env=lambda config, rank, world_size: Env(config, rank))
