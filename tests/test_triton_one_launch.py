"""The Triton reductions are one launch whose result does not depend on the program order.

Every reduction, over tensors and over rows: one launch of the reduction kernel per call,
its arrival counters back at zero afterwards (the same buffer, so no memset per call),
and bitwise the same result when the interpreter runs the programs in order, reversed or
shuffled, checked against the float64 oracle. The interpreter runs a launch's programs
one after another, each after ``set_grid_idx`` tells it its program id; remapping that id
runs the same programs in another order, so the last program to arrive at a counter,
the one that combines, changes.
"""
from __future__ import annotations

import random
from typing import Callable, NamedTuple

import pytest
import torch

import regfuse
from cases import BF16, F16, F32, F64, INF, assert_bitwise_equal, assert_close, oracle_norms
from regfuse import backends
from regfuse.backends import triton as triton_backend
from regfuse.backends.base import Reduction, row_matrix

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(backends.unavailable_reason("triton", CPU) is not None,
                                reason="the Triton interpreter is not available")

P = 3.0  # the order of LP
# A program id for each position in the run order, for a launch of n programs.
ORDERS: dict[str, Callable[[int], list[int]]] = {
    "forward": lambda n: list(range(n)),
    "reversed": lambda n: list(range(n))[::-1],
    "shuffled": lambda n: random.Random(0).sample(range(n), n),
}


class Launch(NamedTuple):
    kernel: str
    grid: tuple
    args: dict


@pytest.fixture
def launches(monkeypatch) -> list[Launch]:
    """Every Triton kernel launch from now on, as it is made."""
    from triton.runtime.interpreter import InterpretedFunction

    recorded: list[Launch] = []
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        recorded.append(Launch(self.__name__, tuple(grid), dict(zip(self.arg_names, args))))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    return recorded


@pytest.fixture
def program_order(monkeypatch) -> Callable[[Callable[[int], list[int]]], list[int]]:
    """``use(order)`` makes the interpreter run the programs of each launch in ``order``
    (positions to program ids); it returns the list of program ids as they run."""
    from triton.runtime.interpreter import interpreter_builder

    set_grid_idx = interpreter_builder.set_grid_idx
    ran: list[int] = []

    def use(order: Callable[[int], list[int]]) -> list[int]:
        ids: dict[int, list[int]] = {}

        def reordered(x, y, z):
            n = interpreter_builder.grid_dim[0]
            program = ids.setdefault(n, order(n))[x]
            ran.append(program)
            set_grid_idx(program, y, z)

        monkeypatch.setattr(interpreter_builder, "set_grid_idx", reordered)
        ran.clear()
        return ran

    return use


def tensor_list() -> list[torch.Tensor]:
    """Mixed dtypes; entries of several chunks (512 elements in the interpreter), of one
    element past a chunk, empty and 0-d, both as tensors and as rows (no 1-D tensor: its
    rows would be one program each)."""
    gen = torch.Generator().manual_seed(0)

    def rand(shape, dtype, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=F64) * scale).to(dtype)

    return [rand((3, 700), F32), rand((0, 3), F32), rand((1, 1025), F32, 3.0), rand((2, 600), BF16),
            rand((4, 0), F32), rand((), F32), rand((5, 3), F16)]


def entries(tensors: list[torch.Tensor], rows: bool) -> list[torch.Tensor]:
    return [row for t in tensors for row in row_matrix(t)] if rows else tensors


def oracle(entry_list: list[torch.Tensor], op: Reduction, weights: torch.Tensor) -> torch.Tensor:
    """The float64 value of ``op`` over the entries."""
    l1, squares = oracle_norms(entry_list, 1), oracle_norms(entry_list, 2, squared=True)
    return {
        Reduction.L1: lambda: l1,
        Reduction.L2: lambda: oracle_norms(entry_list, 2),
        Reduction.SQ: lambda: squares,
        Reduction.INF: lambda: oracle_norms(entry_list, INF),
        Reduction.PENALTY: lambda: (weights[0].to(F64) * l1 + weights[1].to(F64) * squares).sum(),
        Reduction.LP: lambda: oracle_norms(entry_list, P),
        Reduction.L0: lambda: oracle_norms(entry_list, 0),
        Reduction.NEG_INF: lambda: oracle_norms(entry_list, -INF),
        Reduction.L1_L2: lambda: torch.stack([l1, oracle_norms(entry_list, 2)]),
    }[op]()


def reduce(tensors: list[torch.Tensor], op: Reduction, weights: torch.Tensor, rows: bool) -> torch.Tensor:
    return triton_backend.reduce(tensors, op, weights if op == Reduction.PENALTY else None, F32,
                                 P if op == Reduction.LP else 0.0, rows)


@pytest.mark.parametrize("rows", [False, True], ids=["tensors", "rows"])
@pytest.mark.parametrize("op", list(Reduction), ids=lambda op: op.name)
def test_one_launch_in_any_program_order(op, rows, launches, program_order):
    tensors = tensor_list()
    n = len(entries(tensors, rows))
    weights = torch.rand(2, n, generator=torch.Generator().manual_seed(1))
    results, counters = {}, set()
    for name, order in [*ORDERS.items(), ("forward again", ORDERS["forward"])]:
        launches.clear()
        ran = program_order(order)
        results[name] = reduce(tensors, op, weights, rows)
        (launch,) = launches
        assert launch.kernel == "_reduce_kernel"
        programs = launch.grid[0]
        assert programs > n, "several entries span chunks"
        assert ran == order(programs), f"{name}: the programs did not run in the order asked"
        assert not launch.args["counters"].any(), f"{name}: counters not reset"
        counters.add(launch.args["counters"].data_ptr())
    assert len(counters) == 1, "one counter buffer reused by every call"
    for name, result in results.items():
        assert_bitwise_equal(result, results["forward"], what=f"{op.name} {name} vs forward")
    assert_close(results["forward"], oracle(entries(tensors, rows), op, weights), what=op.name)


def test_failed_launch_leaves_counters_zero(launches, program_order):
    """A launch that stops part-way (an error in a program) leaves no count behind."""
    tensors = tensor_list()

    def failing(n):
        return list(range(n // 2)) + [n]  # program n does not exist: the interpreter raises

    program_order(failing)
    with pytest.raises(Exception):
        reduce(tensors, Reduction.L2, None, False)
    assert launches and not launches[-1].args["counters"].any()
    program_order(ORDERS["forward"])
    assert_close(reduce(tensors, Reduction.L2, None, False), oracle_norms(tensors, 2).to(F32))


@pytest.mark.parametrize("call", [
    lambda ts: regfuse.norms(ts, 2, backend="triton"),
    lambda ts: regfuse.norms(ts, 3, backend="triton"),
    lambda ts: regfuse.total_norm(ts, INF, backend="triton"),
    lambda ts: regfuse.penalty(ts, 0.1, 0.2, backend="triton"),
    lambda ts: regfuse.group_norms(ts, backend="triton"),
    lambda ts: regfuse.group_penalty(ts, 0.1, l1=0.2, backend="triton"),
], ids=["norms", "norms-p3", "total_norm", "penalty", "group_norms", "group_penalty"])
def test_public_reductions_are_one_launch(call, launches):
    tensors = tensor_list()
    call(tensors)  # the first call may build and cache tables
    launches.clear()
    call(tensors)
    assert [launch.kernel for launch in launches] == ["_reduce_kernel"]
