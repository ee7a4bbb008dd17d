"""The cuda backend on CPU tensors (``REGFUSE_CUDA_EMULATE=1``, csrc/cuda/simt_cpu.h): the
switch itself, and what only the CUDA kernels need: several chunks, misaligned inputs and
outputs, reruns, any grid and any block order giving the same bits, threads giving the
bits fibers give, one launch per reduction, and the kernel bugs the emulation found.

The backend-parametrized op tests run the emulated cuda backend too (tests/conftest.py
sets the variable where there is no GPU); this file adds the cases those do not cover.
"""
import math

import pytest
import torch

import regfuse
from regfuse import backends
from regfuse.backends import cuda as cuda_backend
from regfuse.backends.base import Reduction
from cases import BF16, F16, F32, F64, assert_bitwise_equal, assert_close, assert_lists_close

_C = pytest.importorskip("regfuse._C")
pytestmark = pytest.mark.skipif(not _C.built_with_cuda_emulation(),
                                reason="the extension has real CUDA kernels, not emulated ones")

CHUNK = 16384  # csrc/cuda/launchers.h::kChunkSize


@pytest.fixture
def emulation():
    """The emulation's settings, restored to the defaults (fibers, grid order) afterwards."""
    yield _C.configure_cuda_emulation
    _C.configure_cuda_emulation()


def _chunky(seed: int = 0) -> list[torch.Tensor]:
    """Three chunks and a tail, float64 among them; a 4-byte-misaligned float32 view (the
    element-wise path next to the vector path), half types with odd tails, an empty and a
    0-d tensor."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3 * CHUNK + 5, generator=g),
            torch.randn(CHUNK + 9, generator=g)[1:],  # one element off: not 16-byte aligned
            torch.randn(2 * CHUNK + 3, generator=g, dtype=F64),
            torch.randn(CHUNK + 1, generator=g).to(F16)[1:],
            torch.randn(777, generator=g).to(BF16),
            torch.randn(0), torch.randn((), generator=g)]


def _every_reduction(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    out = [regfuse.norms(tensors, p, backend="cuda") for p in (1, 2, math.inf, 0.5, 3, 0, -math.inf)]
    out.append(regfuse.norms(tensors, 2, squared=True, backend="cuda"))
    out.append(regfuse.penalty(tensors, 0.3, 0.2, coefficients=[0.5 + i for i in range(len(tensors))],
                               backend="cuda"))
    out.append(regfuse.total_norm(tensors, 2, backend="cuda"))
    return out


def test_the_variable_switches_cuda_on_cpu(monkeypatch):
    # Read when the backends are first resolved in a process (as Triton reads
    # TRITON_INTERPRET on import); backends.forget() has them read again.
    try:
        monkeypatch.setenv("REGFUSE_CUDA_EMULATE", "1")
        backends.forget()
        assert "cuda" in regfuse.available_backends("cpu")
        assert regfuse.available_backends("cpu")[0] != "cuda"  # "auto" never picks the emulation
        assert backends.resolve("auto", torch.device("cpu")) is not cuda_backend
        monkeypatch.setenv("REGFUSE_CUDA_EMULATE", "0")
        backends.forget()
        assert "cuda" not in regfuse.available_backends("cpu")
        with pytest.raises(RuntimeError, match="REGFUSE_CUDA_EMULATE=1"):
            regfuse.norms([torch.ones(3)], backend="cuda")
    finally:
        monkeypatch.undo()
        backends.forget()


def test_chunk_size_and_result_dtypes_are_the_cuda_ones():
    tensors = [torch.randn(CHUNK + 1), torch.randn(3, dtype=F16)]
    meta, num_chunks = _C.metadata(tensors, CHUNK)
    assert num_chunks == 3
    out = _C.reduce(tensors, int(Reduction.L2), None, False, emulated_cuda=True)
    assert out.dtype == F32 and out.shape == (2,)
    grads = _C.grad(tensors, torch.ones(2, 2), False, emulated_cuda=True)
    assert [g.dtype for g in grads] == [F32, F16]
    # The gradients are views of one flat buffer per dtype, as the CUDA path allocates them.
    assert grads[0]._base is not None


def test_several_chunks_and_misaligned_inputs_match_the_reference():
    tensors = _chunky()
    for got, p in zip(_every_reduction(tensors)[:7], (1, 2, math.inf, 0.5, 3, 0, -math.inf)):
        assert_close(got, regfuse.norms(tensors, p, backend="reference"), what=f"p={p}")
    leaves = [t.clone().requires_grad_() for t in tensors]
    regfuse.penalty(leaves, 0.3, 0.2, backend="cuda").backward()
    ref = [t.clone().requires_grad_() for t in tensors]
    regfuse.penalty(ref, 0.3, 0.2, backend="reference").backward()
    assert_lists_close([t.grad for t in leaves], [t.grad for t in ref], "penalty grad")


def test_misaligned_outputs_match_the_reference():
    """Gradients accumulated into, and tensors updated in place, one element off a 16-byte
    boundary: every chunk takes the element-wise path while its input is aligned."""
    def params() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(3)
        out = []
        for n, dtype in ((2 * CHUNK + 7, F32), (CHUNK + 3, BF16), (40, F64)):
            p = torch.randn(n, generator=g).to(dtype)
            p.grad = torch.randn(n + 1, generator=g).to(dtype)[1:]
            out.append(p)
        return out

    got, want = params(), params()
    regfuse.add_penalty_grad_(got, 0.1, 0.7, backend="cuda")
    regfuse.add_penalty_grad_(want, 0.1, 0.7, backend="reference")
    assert_lists_close([p.grad for p in got], [p.grad for p in want], "grad", [4.0] * 3)
    got = [p.grad for p in params()]  # the misaligned views themselves, updated in place
    want = [g.clone() for g in got]
    regfuse.prox_l1_(got, 0.3, backend="cuda")
    regfuse.prox_l1_(want, 0.3, backend="reference")
    assert_lists_close(got, want, "prox_l1_")


def test_two_runs_give_the_same_bits():
    tensors = _chunky()
    for i, (a, b) in enumerate(zip(_every_reduction(tensors), _every_reduction(tensors))):
        assert_bitwise_equal(a, b, f"reduction {i}, run twice")
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in tensors]
        regfuse.norms(leaves, 2, backend="cuda").sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert_bitwise_equal(a, b, "norm gradient, run twice")


@pytest.mark.parametrize("grid", [1, 2, 200])  # fewer blocks than chunks, and more (200 > 8 + 7)
def test_any_grid_gives_the_same_bits(emulation, grid):
    tensors = _chunky()
    want = _every_reduction(tensors)
    emulation(grid=grid)
    for i, (a, b) in enumerate(zip(_every_reduction(tensors), want)):
        assert_bitwise_equal(a, b, f"reduction {i} with a grid of {grid}")
    got = [t.clone() for t in tensors]
    emulation()
    expected = [t.clone() for t in tensors]
    regfuse.prox_l1_(expected, 0.5, backend="cuda")
    emulation(grid=grid)
    regfuse.prox_l1_(got, 0.5, backend="cuda")
    for a, b in zip(got, expected):
        assert_bitwise_equal(a, b, "prox_l1_")


@pytest.mark.parametrize("order, seed", [("reversed", 0), ("shuffled", 1), ("shuffled", 2)])
def test_the_last_block_finishes_the_same_whatever_the_block_order(emulation, order, seed):
    tensors = _chunky()
    rows = [torch.randn(5, CHUNK + 3), torch.randn(4, 3, dtype=F64)]  # kL1L2 over rows
    want = _every_reduction(tensors) + [regfuse.group_penalty(rows, 0.2, l1=0.1, backend="cuda")]
    emulation(block_order=order, seed=seed)
    got = _every_reduction(tensors) + [regfuse.group_penalty(rows, 0.2, l1=0.1, backend="cuda")]
    for i, (a, b) in enumerate(zip(got, want)):
        assert_bitwise_equal(a, b, f"reduction {i}, blocks {order} (seed {seed})")


def test_threads_give_the_same_bits_as_fibers(emulation):
    tensors = [torch.randn(CHUNK + 100), torch.randn(33, dtype=F16), torch.randn(0)]
    want = _every_reduction(tensors)
    emulation(threads=True)
    for i, (a, b) in enumerate(zip(_every_reduction(tensors), want)):
        assert_bitwise_equal(a, b, f"reduction {i} on threads")


def _launches(fn) -> int:
    before = _C.cuda_emulation_launches()
    fn()
    return _C.cuda_emulation_launches() - before


@pytest.mark.parametrize("p", [1, 2, math.inf, 0.5, 0, -math.inf])
def test_one_launch_per_reduction(p):
    tensors = _chunky()
    assert _launches(lambda: regfuse.norms(tensors, p, backend="cuda")) == 1
    assert _launches(lambda: regfuse.total_norm(tensors, p, backend="cuda")) == 1
    assert _launches(lambda: regfuse.penalty(tensors, 0.1, 0.2, backend="cuda")) == 1
    assert _launches(lambda: regfuse.norms([torch.randn(0)], p, backend="cuda")) == 1  # no chunk at all
    assert _launches(lambda: regfuse.group_norms([torch.randn(6, 7)], backend="cuda")) == 1


def test_one_launch_per_gradient_and_in_place_op():
    leaves = [t.clone().requires_grad_() for t in _chunky()]
    loss = regfuse.penalty(leaves, 0.1, 0.2, backend="cuda")
    assert _launches(loss.backward) == 1
    assert _launches(lambda: regfuse.add_penalty_grad_(leaves, 0.1, 0.2, backend="cuda")) == 1
    assert _launches(lambda: regfuse.prox_l1_([t.detach() for t in leaves], 0.1, backend="cuda")) == 1
    # clip_grad_norm_: the total norm, then the scale.
    assert _launches(lambda: regfuse.clip_grad_norm_(leaves, 1e-3, backend="cuda")) == 2


@pytest.mark.parametrize("weight", [math.inf, math.nan])
@pytest.mark.parametrize("acc_dtype", [F32, F64])
def test_a_non_finite_weight_of_an_empty_tensor_gives_nan(weight, acc_dtype):
    """Found by the emulation: an empty tensor owns no chunk, so its weight was never
    applied and an inf or NaN weight gave a finite penalty where the reference gives
    w * 0 = NaN (reachable with a CUDA coefficients tensor, which is not checked on the
    host)."""
    device = torch.device("cpu")
    tensors = [torch.randn(5, dtype=acc_dtype), torch.randn(0, dtype=acc_dtype)]
    weights = torch.tensor([[1.0, weight], [0.5, 0.0]], dtype=acc_dtype)
    reference = backends.resolve("reference", device)
    want = reference.reduce(tensors, Reduction.PENALTY, weights, acc_dtype)
    assert want.isnan()
    assert cuda_backend.reduce(tensors, Reduction.PENALTY, weights, acc_dtype).isnan()
    weights[0, 1] = 2.0  # a finite weight of an empty tensor changes nothing
    assert_close(cuda_backend.reduce(tensors, Reduction.PENALTY, weights, acc_dtype),
                 reference.reduce(tensors, Reduction.PENALTY, weights, acc_dtype))
