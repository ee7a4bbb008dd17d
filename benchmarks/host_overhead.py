"""Time per call on small lists, where the host's work is the cost: ``backend="auto"``,
with Triton importable and without, against torch's utilities and the naive loops.

On a small model a fused kernel takes microseconds, so what a call costs is what happens
around it: resolving ``"auto"``, the argument checks, the weight tables, gathering
``.grad``. This section times the calls a training loop makes (clipping, the penalty
forward and forward + backward, norms, the total norm, the in-place penalty gradient,
soft-thresholding) on nanoGPT (2 layers, n_embd 64: 15 tensors), a 2-layer MLP and the
existing lists, with ``backend="auto"`` as users call it:

* ``regfuse_auto`` in the benchmark's own process (Triton importable where installed);
* ``regfuse_auto_no_triton`` in a subprocess where ``import triton`` fails, as in an
  environment without Triton: a finder on ``sys.meta_path`` refuses it, so each import
  attempt pays what a missing package costs (a search of ``sys.path``).

Each process times its regfuse provider interleaved with the baselines (``naive`` and
``foreach``: ``clip_grad_norm_(foreach=True)``, ``torch._foreach_norm``,
``get_total_norm(foreach=True)``, ...), and the speed-ups are against the baselines
of the same process. The target (``targets.host_targets``): regfuse's time per call at
most torch's, on every list and operation, in both processes.

``python benchmarks/host_overhead.py --no-triton --json`` is the subprocess: it prints
its rows as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.abc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

WORKLOADS = ["nanogpt_2l", "mlp_2l", "tiny_2000x256", "resnet50"]
OPS = ["clip_grad_norm_", "penalty", "penalty_fwd_bwd", "norms_p2", "total_norm",
       "add_penalty_grad_", "prox_l1_"]
WITH_TRITON, WITHOUT_TRITON = "regfuse_auto", "regfuse_auto_no_triton"


class _NoTriton(importlib.abc.MetaPathFinder):
    """Makes ``import triton`` fail as for a package that is not installed: the normal
    search of ``sys.path`` runs (its cost is part of what is measured), then fails."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "triton" or fullname.startswith("triton."):
            from importlib.machinery import PathFinder
            PathFinder.find_spec(fullname, path)  # the search a missing package costs
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def block_triton() -> None:
    sys.meta_path.insert(0, _NoTriton())
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        del sys.modules[name]


def measure(device, rounds: int, budget: float, provider_name: str, log=None) -> list:
    """The rows of every (workload, op) of this section, timed in this process."""
    import providers as prov
    import report
    import timing
    import workloads

    rows = []
    for workload in workloads.select(WORKLOADS, largest_sweep=0, activation_batch=1, default=[]):
        tensors = workload.make(device)
        for name in OPS:
            op = prov.OPS[name]
            chosen = {k: v for k, v in prov.providers(op, ["auto"], False).items()
                      if k in ("naive", "foreach", "regfuse_auto")}
            state = prov.make_state(op, tensors)
            fns = {k: (lambda p=p: p(state)) for k, p in chosen.items()}
            timings = timing.measure(fns, device, rounds, budget)
            timings[provider_name] = timings.pop("regfuse_auto")
            rows += report.group_rows(workload, op, timings, {k: None for k in timings})
            if log:
                log(f"    host overhead {workload.name} {name}: " + " | ".join(
                    f"{k} {t.median * 1e6:.1f} us" for k, t in timings.items()))
    return rows


def measure_without_triton(device, rounds: int, budget: float) -> list:
    """:func:`measure` in a subprocess where Triton cannot be imported; its regfuse rows."""
    import report

    here = Path(__file__).resolve().parent
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(
        [sys.executable, str(here / "host_overhead.py"), "--no-triton", "--json", "--device", str(device),
         "--repeat", str(rounds), "--budget", str(budget)],
        capture_output=True, text=True, env=env, cwd=here, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"the host-overhead subprocess failed:\n{out.stderr[-3000:]}")
    rows = [report.Row(**row) for row in json.loads(out.stdout)]
    return [r for r in rows if r.provider == WITHOUT_TRITON]


def run(device, rounds: int, budget: float, log=None) -> list:
    """Both processes' rows: baselines and ``regfuse_auto`` here, ``regfuse_auto_no_triton``
    from the subprocess."""
    rows = measure(device, rounds, budget, WITH_TRITON, log)
    if log:
        log("    host overhead: the same without Triton (subprocess)...")
    return rows + measure_without_triton(device, rounds, budget)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--budget", type=float, default=2.0)
    parser.add_argument("--no-triton", action="store_true", help="make `import triton` fail first")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    if args.no_triton:
        block_triton()
    import torch
    import regfuse

    name = WITHOUT_TRITON if args.no_triton else WITH_TRITON
    log = None if args.json else print
    if log:
        log(f"backends for {args.device}: {regfuse.available_backends(args.device)}")
    rows = measure(torch.device(args.device), args.repeat, args.budget, name, log)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows]))


if __name__ == "__main__":
    main()
