"""regfuse.penalty against float64 PyTorch formulas, for every backend."""
import math

import pytest
import torch

import regfuse
from cases import (BF16, CASES, F16, F32, F64, assert_close, assert_lists_close, case, dtype_id,
                   is_interpreted, oracle_penalty, oracle_penalty_grads, result_dtype,
                   sample_coefficients, with_specials)

all_cases = pytest.mark.parametrize("case", CASES, ids=str)
# (l1, l2): pure L1, pure squared L2, and elastic net.
STRENGTHS = pytest.mark.parametrize("l1, l2", [(0.01, 0.0), (0.0, 0.003), (0.5, 0.25)],
                                    ids=["l1", "l2", "elastic"])


@STRENGTHS
@all_cases
def test_values(backend, device, case, l1, l2, skip_if_too_big):
    tensors = case.tensors(device)
    skip_if_too_big(tensors)
    out = regfuse.penalty(tensors, l1, l2, backend=backend)
    assert out.shape == ()
    assert out.dtype == result_dtype(tensors)
    assert out.device == device
    assert_close(out, oracle_penalty(tensors, l1, l2), what="penalty")


@pytest.mark.parametrize("form", ["list", "tuple", "tensor", "float64 tensor"])
@all_cases
def test_coefficients(backend, device, case, form, skip_if_too_big):
    tensors = case.tensors(device)
    skip_if_too_big(tensors)
    values = sample_coefficients(len(tensors))
    coefficients = {
        "list": values,
        "tuple": tuple(values),
        "tensor": torch.tensor(values, device=device),
        "float64 tensor": torch.tensor(values, dtype=F64, device=device),
    }[form]
    out = regfuse.penalty(tensors, 0.5, 0.25, coefficients=coefficients, backend=backend)
    assert_close(out, oracle_penalty(tensors, 0.5, 0.25, values), what="penalty with coefficients")


@all_cases
def test_gradients(backend, device, case, skip_if_too_big):
    leaves = case.leaves(device)
    skip_if_too_big(leaves)
    coefficients = sample_coefficients(len(leaves))
    out = regfuse.penalty(leaves, 0.5, 0.25, coefficients=coefficients, backend=backend)
    assert_close(out, oracle_penalty(leaves, 0.5, 0.25, coefficients), what="penalty (with grad)")
    # A non-unit upstream gradient catches a backward that ignores grad_output.
    (1.75 * out).backward()
    expected = [1.75 * g for g in oracle_penalty_grads(leaves, 0.5, 0.25, coefficients)]
    assert_lists_close([t.grad for t in leaves], expected, what="grad")


def test_gradcheck_and_gradgradcheck(backend, device):
    gen = torch.Generator().manual_seed(2)
    inputs = tuple(torch.randn(s, generator=gen, dtype=F64).to(device).requires_grad_()
                   for s in [(3,), (2, 2), (), (0,), (4,)])

    def fn(*tensors):
        return regfuse.penalty(tensors, 0.3, 0.7, coefficients=[1.0, 0.5, 2.0, 1.0, 0.0], backend=backend)

    fast = is_interpreted(backend, device)  # a random projection of the Jacobian there
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast)


@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=dtype_id)
def test_nan_and_inf_propagate(backend, device, dtype):
    tensors = with_specials(device, dtype)
    assert math.isnan(regfuse.penalty(tensors, 0.5, 0.5, backend=backend).item())
    infinite = [tensors[2], tensors[4]]  # -Inf and a clean tensor
    assert regfuse.penalty(infinite, 0.5, 0.5, backend=backend).item() == math.inf


def test_zero_strengths_give_zero(backend, device):
    tensors = case("odd_sizes-f32").tensors(device)
    assert regfuse.penalty(tensors, backend=backend).item() == 0.0


def test_empty_list_gives_zero(backend):
    out = regfuse.penalty([], 0.5, 0.5, backend=backend)
    assert out.shape == () and out.item() == 0.0
    assert regfuse.penalty([], 0.5, coefficients=[], backend=backend).item() == 0.0


def test_equals_the_loop_people_write(backend, device):
    model = torch.nn.Sequential(torch.nn.Linear(9, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2)).to(device)
    params = list(model.parameters())
    loop = sum(1e-2 * p.abs().sum() + 1e-3 * p.pow(2).sum() for p in params)
    loop.backward()
    expected_grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    fused = regfuse.penalty(model.parameters(), l1=1e-2, l2=1e-3, backend=backend)
    fused.backward()
    assert_close(fused, loop, what="penalty")
    assert_lists_close([p.grad for p in params], expected_grads, what="grad")


def test_gradient_buffers_are_reused_only_when_free(backend, device):
    # Backends may recycle their gradient buffers between calls: a gradient the caller
    # kept (torch.autograd.grad), or one that became a .grad, must never be overwritten,
    # and gradients added into existing .grad must stay right step after step.
    gen = torch.Generator().manual_seed(5)
    x = [torch.randn(n, generator=gen).to(device).requires_grad_() for n in (100, 7, 33)]
    first = torch.autograd.grad(regfuse.penalty(x, 0.5, 0.25, backend=backend), x)
    kept = [g.clone() for g in first]
    regfuse.penalty(x, 0.5, 0.25, backend=backend).backward()  # .grad is None: it adopts the views
    adopted = [t.grad.clone() for t in x]
    with torch.no_grad():
        for t in x:
            t.mul_(-3)  # a different gradient from here on
    for _ in range(3):
        regfuse.penalty(x, 0.5, 0.25, backend=backend).backward()
    assert_lists_close(list(first), kept, what="kept gradients")
    expected = [a + 3 * oracle_penalty_grads([t.detach()], 0.5, 0.25)[0] for a, t in zip(adopted, x)]
    assert_lists_close([t.grad for t in x], expected, what="accumulated .grad")
