"""DDP, FSDP2 and DTensor lists with a real 2-rank gloo process group on the CPU, and 2-D /
3-D parallelism (FSDP2 + tensor parallelism, expert-like meshes, pipeline stages) with 4.

Each group of ranks is spawned once for the whole file (tests/distributed_checks.py and
tests/distributed_checks_2d.py run every check in every rank and report each outcome);
each test below asserts one check's outcome on every rank. A hang fails the tests after ``TIMEOUT_S`` instead of blocking.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import distributed_checks  # noqa: E402
import distributed_checks_2d  # noqa: E402

TIMEOUT_S = 240
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(script: str, size: int, out: Path) -> list[tuple[dict, str]]:
    """Runs ``script`` in ``size`` ranks; each rank's ``{check id: None or what failed}`` and
    the end of its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE / script), str(rank),
                               str(size), str(port), str(out / f"rank{rank}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(size)]
    logs = []
    for rank, proc in enumerate(procs):
        try:
            log = proc.communicate(timeout=TIMEOUT_S)[0]
        except subprocess.TimeoutExpired:  # a hang: stop every rank, report what finished
            for p in procs:
                p.kill()
            log = proc.communicate()[0] + f"\n(killed after {TIMEOUT_S} s)"
        if proc.returncode != 0:
            log += f"\n(exit status {proc.returncode})"
        logs.append(log[-4000:])
    results = []
    for rank, log in enumerate(logs):
        path = out / f"rank{rank}.json"
        results.append((json.loads(path.read_text()) if path.exists() else {}, log))
    return results


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> list[tuple[dict, str]]:
    return spawn("distributed_checks.py", distributed_checks.WORLD_SIZE, tmp_path_factory.mktemp("ranks"))


@pytest.fixture(scope="module")
def outcomes_2d(tmp_path_factory) -> list[tuple[dict, str]]:
    return spawn("distributed_checks_2d.py", distributed_checks_2d.WORLD_SIZE,
                 tmp_path_factory.mktemp("ranks_2d"))


def assert_passed(outcomes: list, check: str) -> None:
    failures = []
    for rank, (result, log) in enumerate(outcomes):
        if check not in result:
            failures.append(f"rank {rank} did not run it; its output ends with:\n{log}")
        elif result[check] is not None:
            failures.append(f"rank {rank}:\n{result[check]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("check", list(distributed_checks.CHECKS))
def test_distributed(outcomes, check):
    assert_passed(outcomes, check)


@pytest.mark.parametrize("check", list(distributed_checks_2d.CHECKS))
def test_distributed_2d(outcomes_2d, check):
    assert_passed(outcomes_2d, check)
