"""DDP, FSDP2 and DTensor lists with a real 2-rank gloo process group on the CPU.

The two ranks are spawned once for the whole file (tests/distributed_checks.py runs every
check in every rank and reports each outcome); each test below asserts one check's
outcome on both ranks. A hang fails the tests after ``TIMEOUT_S`` instead of blocking.
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

TIMEOUT_S = 240
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> list[tuple[dict, str]]:
    """Each rank's ``{check id: None or what failed}`` and the end of its output."""
    out = tmp_path_factory.mktemp("ranks")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    size = distributed_checks.WORLD_SIZE
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE / "distributed_checks.py"), str(rank),
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


@pytest.mark.parametrize("check", list(distributed_checks.CHECKS))
def test_distributed(outcomes, check):
    failures = []
    for rank, (result, log) in enumerate(outcomes):
        if check not in result:
            failures.append(f"rank {rank} did not run it; its output ends with:\n{log}")
        elif result[check] is not None:
            failures.append(f"rank {rank}:\n{result[check]}")
    assert not failures, "\n".join(failures)
