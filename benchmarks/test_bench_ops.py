"""pytest-benchmark suite: the operations of ``run.py``, every provider, three lists.

Run with ``.venv/bin/python -m pytest benchmarks -q --benchmark-only`` (``pytest tests``
does not collect it). Each test first checks that its provider computes what the naive
loop computes (the naive loop itself is checked against the reference backend), then
times it; ``--benchmark-group-by=group`` (the default) puts the providers of one
(workload, operation) pair side by side. ``torch.compile`` is left to ``run.py``.
"""
from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("pytest_benchmark")  # its `benchmark` fixture; skipped where not installed

import regfuse  # noqa: E402
from providers import OPS, make_state, mismatch, providers  # noqa: E402
from timing import synchronize  # noqa: E402
from workloads import model_workloads  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [b for b in regfuse.available_backends(DEVICE)
            if not (DEVICE.type == "cpu" and b == "triton")]  # the interpreter is too slow
WORKLOADS = model_workloads(activation_batch=2)
BENCHED = ("resnet50", "tiny_2000x256", "activations")


def _cases():
    for name in BENCHED:
        for op in OPS.values():
            if WORKLOADS[name].kind in op.kinds:
                for provider in providers(op, BACKENDS, with_compile=False):
                    yield pytest.param(name, op.name, provider, id=f"{name}-{op.name}-{provider}")


@functools.lru_cache(maxsize=1)  # one list in memory at a time; cases come grouped by list
def _tensors(name: str) -> list[torch.Tensor]:
    return WORKLOADS[name].make(DEVICE)


@pytest.mark.parametrize("workload, op_name, provider_name", list(_cases()))
def test_op(benchmark, workload: str, op_name: str, provider_name: str) -> None:
    op = OPS[op_name]
    tensors = _tensors(workload)
    candidates = providers(op, BACKENDS, with_compile=False)
    reference = "regfuse_reference" if provider_name == "naive" else "naive"
    problem = mismatch(op, tensors, candidates[provider_name], candidates[reference])
    assert problem is None, f"{provider_name} disagrees with {reference}: {problem}"

    provider, state = candidates[provider_name], make_state(op, tensors)

    def call() -> object:
        out = provider(state)
        synchronize(DEVICE)  # CUDA: time the work, not its launch
        return out

    benchmark.group = f"{workload} {op_name}"
    benchmark.extra_info["bytes_moved"] = op.passes * WORKLOADS[workload].nbytes
    benchmark(call)
