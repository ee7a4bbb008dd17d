"""regfuse.norms against torch.linalg.vector_norm in float64, for every backend."""
import pytest
import torch

import regfuse
from cases import (BF16, CASES, F16, F32, F64, NORM_IDS, NORM_KINDS, assert_close,
                   assert_lists_close, dtype_id, is_interpreted, oracle_norm_grads, oracle_norms,
                   result_dtype, with_specials)

norm_kinds = pytest.mark.parametrize("p, squared", NORM_KINDS, ids=NORM_IDS)
all_cases = pytest.mark.parametrize("case", CASES, ids=str)


@norm_kinds
@all_cases
def test_values(backend, device, case, p, squared, skip_if_too_big):
    tensors = case.tensors(device)
    skip_if_too_big(tensors)
    out = regfuse.norms(tensors, p, squared=squared, backend=backend)
    assert out.shape == (len(tensors),)
    assert out.dtype == result_dtype(tensors)
    assert out.device == device
    assert_close(out, oracle_norms(tensors, p, squared), what="norms")


@norm_kinds
@all_cases
def test_gradients(backend, device, case, p, squared, skip_if_too_big):
    leaves = case.leaves(device)
    skip_if_too_big(leaves)
    out = regfuse.norms(leaves, p, squared=squared, backend=backend)
    # The autograd path goes through the registered custom op: same values expected.
    assert_close(out, oracle_norms(leaves, p, squared), what="norms (with grad)")
    # Distinct weights per tensor catch a gradient routed to the wrong tensor.
    grad_out = torch.linspace(0.5, 2.0, len(leaves), dtype=out.dtype, device=device)
    (out * grad_out).sum().backward()
    expected = oracle_norm_grads(leaves, p, squared, grad_out)
    assert [t.grad.dtype for t in leaves] == [t.dtype for t in leaves]
    assert_lists_close([t.grad for t in leaves], expected, what="grad")


def _small_float64(device):
    """Tiny float64 leaves (0-d and empty included) for finite-difference checks."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(3,), (2, 2), (), (0,), (3, 2)]
    return tuple(torch.randn(s, generator=gen, dtype=F64).to(device).requires_grad_() for s in shapes)


@norm_kinds
def test_gradcheck_and_gradgradcheck(backend, device, p, squared):
    inputs = _small_float64(device)

    def fn(*tensors):
        return regfuse.norms(tensors, p, squared=squared, backend=backend)

    # The interpreter is slow: check a random projection of the Jacobian there.
    fast = is_interpreted(backend, device)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast)


@norm_kinds
@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=dtype_id)
def test_nan_and_inf_propagate_like_vector_norm(backend, device, p, squared, dtype):
    tensors = with_specials(device, dtype)
    out = regfuse.norms(tensors, p, squared=squared, backend=backend)
    expected = oracle_norms(tensors, p, squared)
    assert bool(expected[:4].isnan().any()) and bool(expected[:4].isinf().any())  # the case bites
    assert_close(out, expected, what="norms with NaN/Inf")


def test_zero_norm_has_zero_gradient(backend, device):
    x = torch.zeros(5, device=device, requires_grad=True)
    regfuse.norms([x], 2, backend=backend).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_squared_gradient_is_two_x(backend, device):
    x = torch.tensor([0.0, -1.5, 3.0], device=device, requires_grad=True)
    regfuse.norms([x], 2, squared=True, backend=backend).sum().backward()
    assert torch.equal(x.grad, 2 * x.detach())


def test_empty_list_gives_empty_vector(backend):
    out = regfuse.norms([], backend=backend)
    assert out.shape == (0,) and out.dtype == F32


def test_accepts_any_iterable(backend, device):
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3)).to(device)
    expected = oracle_norms(list(model.parameters()), 2)
    assert_close(regfuse.norms(model.parameters(), backend=backend), expected, what="generator")
    assert_close(regfuse.norms(tuple(model.parameters()), backend=backend), expected, what="tuple")


def test_drop_in_for_foreach_norm(backend, device):
    tensors = [torch.randn(s, device=device) for s in [(31,), (4, 9), ()]]
    for p in (1, 2, float("inf")):
        expected = torch.stack(torch._foreach_norm(tensors, p))
        assert_close(regfuse.norms(tensors, p, backend=backend), expected, what=f"p={p}")
