"""regfuse.group_penalty (the sparse group lasso) against float64 formulas, every backend."""
import math

import pytest
import torch

import regfuse
from cases import (BF16, CASES, F16, F32, F64, assert_close, assert_lists_close, case, dtype_id,
                   is_interpreted, oracle_group_penalty, oracle_group_penalty_grads, result_dtype,
                   sample_coefficients, with_specials)

all_cases = pytest.mark.parametrize("case", CASES, ids=str)
DIMS = pytest.mark.parametrize("dim", [0, -1])  # -1: the movedim route for 2-D and up
# (weight, l1): the group lasso alone, and the sparse group lasso.
STRENGTHS = pytest.mark.parametrize("weight, l1", [(0.3, 0.0), (0.3, 0.05)], ids=["group", "sparse_group"])


@STRENGTHS
@DIMS
@pytest.mark.parametrize("scale_by_size", [True, False], ids=["scaled", "unscaled"])
@all_cases
def test_values(backend, device, case, weight, l1, dim, scale_by_size, skip_if_too_many_groups):
    tensors = case.tensors(device)
    skip_if_too_many_groups(tensors, dim)
    out = regfuse.group_penalty(tensors, weight, dim=dim, l1=l1, scale_by_size=scale_by_size,
                                backend=backend)
    assert out.shape == () and out.dtype == result_dtype(tensors) and out.device == device
    assert_close(out, oracle_group_penalty(tensors, weight, dim, l1, scale_by_size), what="group penalty")


@pytest.mark.parametrize("form", ["list", "tensor"])
@all_cases
def test_coefficients(backend, device, case, form, skip_if_too_many_groups):
    tensors = case.tensors(device)
    skip_if_too_many_groups(tensors)
    values = sample_coefficients(len(tensors))
    coefficients = values if form == "list" else torch.tensor(values, device=device)
    out = regfuse.group_penalty(tensors, 0.3, l1=0.05, coefficients=coefficients, backend=backend)
    assert_close(out, oracle_group_penalty(tensors, 0.3, 0, 0.05, True, values), what="with coefficients")


@STRENGTHS
@DIMS
@all_cases
def test_gradients(backend, device, case, weight, l1, dim, skip_if_too_many_groups):
    leaves = case.leaves(device)
    skip_if_too_many_groups(leaves, dim)
    coefficients = sample_coefficients(len(leaves))
    out = regfuse.group_penalty(leaves, weight, dim=dim, l1=l1, coefficients=coefficients, backend=backend)
    assert_close(out, oracle_group_penalty(leaves, weight, dim, l1, True, coefficients), what="with grad")
    (1.75 * out).backward()  # a non-unit upstream gradient catches a backward that ignores it
    expected = [1.75 * g for g in oracle_group_penalty_grads(leaves, weight, dim, l1, True, coefficients)]
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    assert [g.dtype for g in grads] == [t.dtype for t in leaves]
    assert_lists_close(grads, expected, what="grad")


@pytest.mark.parametrize("l1", [0.0, 0.2], ids=["group", "sparse_group"])
@pytest.mark.parametrize("dim", [0, 1], ids=["dim0", "dim1"])
def test_gradcheck_and_gradgradcheck(backend, device, l1, dim):
    gen = torch.Generator().manual_seed(12)
    shapes = [(3, 2, 2), (2, 3), (4, 1), (2, 0), (0, 3)] + ([(), (3,)] if dim == 0 else [])
    inputs = tuple(torch.randn(s, generator=gen, dtype=F64).to(device).requires_grad_() for s in shapes)

    def fn(*tensors):
        return regfuse.group_penalty(tensors, 0.7, dim=dim, l1=l1,
                                     coefficients=[1.0, 0.5, 2.0, 1.0, 0.0, 1.5, 0.25][:len(tensors)],
                                     backend=backend)

    fast = is_interpreted(backend, device)  # a random projection of the Jacobian there
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast)


def test_all_zero_group_gets_zero_gradient(backend, device):
    w = torch.randn(4, 3, device=device)
    w[2] = 0
    w.requires_grad_()
    regfuse.group_penalty([w], 1.0, l1=0.5, backend=backend).backward()
    assert torch.equal(w.grad[2], torch.zeros(3, device=device))
    expected = oracle_group_penalty_grads([w.detach()], 1.0, 0, 0.5)
    assert_lists_close([w.grad], expected, what="grad")


@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=dtype_id)
def test_nan_and_inf_propagate(backend, device, dtype):
    tensors = [t.reshape(3, 3) for t in with_specials(device, dtype)]
    assert math.isnan(regfuse.group_penalty(tensors, 0.5, l1=0.1, backend=backend).item())
    infinite = [tensors[2], tensors[4]]  # -Inf and a clean tensor
    assert regfuse.group_penalty(infinite, 0.5, l1=0.1, backend=backend).item() == math.inf


def test_equals_the_loop_people_write(backend, device):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2)).to(device)
    weights = [p for p in model.parameters() if p.dim() > 1]
    loop = sum(1e-2 * math.sqrt(w[0].numel()) * w.flatten(1).norm(dim=1).sum() + 1e-3 * w.abs().sum()
               for w in weights)
    loop.backward()
    expected_grads = [w.grad.clone() for w in weights]
    model.zero_grad(set_to_none=True)
    fused = regfuse.group_penalty(weights, 1e-2, l1=1e-3, backend=backend)
    fused.backward()
    assert_close(fused, loop, what="group penalty")
    assert_lists_close([w.grad for w in weights], expected_grads, what="grad")


def test_zero_strengths_give_zero(backend, device):
    tensors = case("zero_groups-f32").tensors(device)
    assert regfuse.group_penalty(tensors, 0.0, backend=backend).item() == 0.0


def test_no_group_at_all(backend, device):
    x = torch.randn(0, 3, device=device, requires_grad=True)
    out = regfuse.group_penalty([x], 1.0, l1=1.0, backend=backend)
    assert out.item() == 0.0
    out.backward()
    assert x.grad.shape == x.shape


def test_empty_list_gives_zero(backend):
    out = regfuse.group_penalty([], 0.5, l1=0.5, backend=backend)
    assert out.shape == () and out.item() == 0.0 and out.dtype == F32


def test_bad_arguments_are_refused(backend, device):
    tensors = [torch.randn(4, 3, device=device), torch.randn(5, device=device)]
    with pytest.raises(ValueError, match="weight"):
        regfuse.group_penalty(tensors, -1.0, backend=backend)
    with pytest.raises(ValueError, match="l1"):
        regfuse.group_penalty(tensors, 1.0, l1=float("nan"), backend=backend)
    with pytest.raises(IndexError):
        regfuse.group_penalty(tensors, 1.0, dim=1, backend=backend)
    with pytest.raises(ValueError, match="coefficients"):
        regfuse.group_penalty(tensors, 1.0, coefficients=[1.0], backend=backend)
    with pytest.raises(ValueError, match="non-negative"):
        regfuse.group_penalty(tensors, 1.0, coefficients=[1.0, -1.0], backend=backend)
