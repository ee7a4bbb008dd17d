"""Regularized training under DDP and FSDP2, checked against one process on the whole batch.

    torchrun --nproc_per_node=2 examples/ddp_fsdp.py                  # CPU: gloo
    torchrun --nproc_per_node=2 examples/ddp_fsdp.py --engine fsdp2   # GPUs: nccl, one per rank
    torchrun --nproc_per_node=4 examples/ddp_fsdp.py --tp             # FSDP2 + tensor parallelism

Every rank trains on its part of each global batch with an L1/L2 weight penalty
(``WeightRegularizer.attach()``), an L1 activity penalty (``ActivationRegularizer``),
gradient clipping (``clip_grad_norm_``) and a proximal L1 step (``prox_l1_``), under ``DistributedDataParallel`` and under FSDP2
(``fully_shard``); with ``--tp``, under FSDP2 composed with tensor parallelism on a
(dp=2, tp=2) mesh, torchtitan's layout (Colwise / Rowwise, the last layer without a plan
on the dp mesh alone, so the parameters span two meshes). It also trains the same model in one process on the whole batch (every
rank can: the model is tiny) and prints how far apart the two end up: float32 rounding.

What is per rank and what is global (docs/training.md, "Distributed training"):

* the weights: identical on every rank under DDP, one shard per rank under FSDP2, where
  regfuse works on the local shards and returns DTensors; ``attach()`` adds the penalty
  gradient once per backward, after DDP has averaged the gradients (or FSDP2 has
  reduce-scattered them), so the result is the single-process gradient;
* the activations: per rank. DDP and FSDP2 average the gradients over the ranks, so a
  per-sample penalty, ``penalty() / len(x)`` with the local batch, gives the
  single-process gradient; a raw ``penalty()`` would come out at 1/world_size of it;
* ``clip_grad_norm_``: the norm of the whole gradient. Under DDP every rank already
  holds it (no all-reduce: that would count it ``world_size`` times); under FSDP2 the
  shards' norms are reduced (one all-reduce of a scalar);
* ``sparsity_report``: the numbers of the whole (unsharded) model on every rank.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import regfuse

L1_WEIGHTS, L2_WEIGHTS, L1_ACTIVITY, LR, STEPS, MAX_NORM = 1e-3, 1e-2, 1e-3, 0.1, 5, 0.5


def make_model(hidden: int = 33) -> nn.Sequential:
    """Widths that shard unevenly under FSDP2 (tensor parallelism needs ``hidden`` even)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 17), nn.ReLU(), nn.Linear(17, 4))


def make_batches(device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 16, generator=gen).to(device), torch.randn(32, 4, generator=gen).to(device))
            for _ in range(STEPS)]


def relus(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.ReLU)]


def train(model: nn.Module, batches, shard=lambda t: t) -> nn.Module:
    """``STEPS`` SGD steps; ``shard`` picks this rank's part of each global batch."""
    weights = regfuse.WeightRegularizer(model, l1=L1_WEIGHTS, l2=L2_WEIGHTS)
    handle = weights.attach()  # the penalty gradient, once per backward, fused
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    with regfuse.ActivationRegularizer(relus(model), l1=L1_ACTIVITY) as activity:
        for x, y in batches:
            x, y = shard(x), shard(y)
            loss = F.mse_loss(model(x), y) + activity.penalty() / len(x)  # per sample
            optimizer.zero_grad()
            loss.backward()
            regfuse.clip_grad_norm_(model.parameters(), MAX_NORM)  # the global norm, either engine
            optimizer.step()
            activity.clear()
            regfuse.prox_l1_(weights.params, LR * L1_WEIGHTS)  # exact zeros
    handle.remove()
    return model


def wrap(model: nn.Module, engine: str, device: torch.device) -> nn.Module:
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def wrap_tp(model: nn.Module, device: torch.device) -> tuple[nn.Module, int, int]:
    """FSDP2 over ``dp`` composed with tensor parallelism over ``tp``; the model, this rank's
    dp coordinate and the dp size (the ranks of one tp group see the same batch)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh(device.type, (dist.get_world_size() // 2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh["dp"])
    return fully_shard(model, mesh=mesh["dp"]), mesh["dp"].get_local_rank(), mesh["dp"].size()


def compare(engine: str, device: torch.device) -> float:
    """Trains under ``engine`` and in one process; returns the largest parameter difference."""
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = make_batches(device)
    hidden = 34 if engine == "fsdp2+tp" else 33
    reference = train(make_model(hidden).to(device), batches)
    if engine == "fsdp2+tp":
        wrapped, part, parts = wrap_tp(make_model(hidden).to(device), device)
    else:
        wrapped, part, parts = wrap(make_model().to(device), engine, device), rank, world
    model = train(wrapped, batches, shard=lambda t: t.chunk(parts)[part])
    inner = model.module if engine == "ddp" else model
    difference = 0.0
    for p, q in zip(inner.parameters(), reference.parameters()):
        value = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2: gather the shards
        difference = max(difference, (value.detach() - q.detach()).abs().max().item())
    report = regfuse.sparsity_report(inner)  # global numbers, the same on every rank
    if rank == 0:
        print(f"{engine}: {world} ranks against one process, largest parameter difference "
              f"after {STEPS} steps: {difference:.1e}")
        print(report)
    return difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["ddp", "fsdp2", "both"], default="both")
    parser.add_argument("--tp", action="store_true",
                        help="FSDP2 + tensor parallelism on a (dp, tp=2) mesh (4 ranks or more, even)")
    args = parser.parse_args()
    engine = "fsdp2+tp" if args.tp else args.engine
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        for name in (["ddp", "fsdp2"] if engine == "both" else [engine]):
            compare(name, device)
    finally:
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
