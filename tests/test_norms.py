"""regfuse.norms against torch.linalg.vector_norm in float64, for every backend.

Every order: the fast paths (1, 2, inf, squared 2), the general kernel (p = 0.5, 3, and
more in ``test_general_p``), the count of nonzeros (0) and min |x| (-inf).
"""
import math

import pytest
import torch

import regfuse
from cases import (BF16, CASES, F16, F32, F64, INF, NORM_IDS, NORM_KINDS, assert_close,
                   assert_lists_close, case, dtype_id, is_interpreted, oracle_norm_grads, oracle_norms,
                   overflowed_to, result_dtype, with_specials)

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
    expected = [overflowed_to(e, t.dtype) for e, t in zip(oracle_norm_grads(leaves, p, squared, grad_out), leaves)]
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
    if p == -INF:  # the min of an empty tensor is inf, which finite differences cannot take
        inputs = tuple(t for t in inputs if t.numel())

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
    # The case bites: NaN (and, for the max and the sums, Inf) reach the result; a count
    # of nonzeros counts NaN and Inf as nonzero.
    if p == 0:
        assert expected.tolist() == [9.0] * 5  # no zero among the 9 values; NaN, Inf counted
    else:
        assert bool(expected[:4].isnan().any()) and (p == -INF or bool(expected[:4].isinf().any()))
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
    tensors[1][2, 3] = 0.0  # a zero for p=0 to skip
    for p in (1, 2, INF, 0.5, 1.5, 3, 7, 0, -INF):
        expected = torch.stack(torch._foreach_norm(tensors, p))
        assert_close(regfuse.norms(tensors, p, backend=backend), expected, what=f"p={p}")


GENERAL_ORDERS = [0.25, 0.5, 1.5, 2.5, 3, 4.75, 10]


@pytest.mark.parametrize("p", GENERAL_ORDERS)
def test_general_p(backend, device, p):
    # Orders that only the general kernel computes, on odd sizes, mixed dtypes and float64.
    for name in ("odd_sizes-f32", "mixed_half", "mixed_dtypes", "empty_and_zero-bf16"):
        tensors = case(name).tensors(device)
        assert_close(regfuse.norms(tensors, p, backend=backend), oracle_norms(tensors, p),
                     what=f"{name} p={p}")


@pytest.mark.parametrize("p", [0.5, 1.5, 3])
def test_general_p_gradient_at_zeros_is_zero(backend, device, p):
    # |x|**(p-1) is infinite at 0 for p < 1, and the norm of zeros is 0: torch gives 0 for
    # both, and so must the first and the second derivative (no 0 * inf = NaN).
    x = torch.tensor([0.0, 1.5, -2.0, 0.0], dtype=F64, device=device, requires_grad=True)
    zeros = torch.zeros(3, dtype=F64, device=device, requires_grad=True)
    out = regfuse.norms([x, zeros], p, backend=backend)
    grad_x, grad_zeros = torch.autograd.grad(out.sum(), [x, zeros], create_graph=True)
    expected_x = torch.autograd.grad(torch.linalg.vector_norm(x, p), x)[0]
    assert_close(grad_x, expected_x, what="gradient")
    assert grad_x[0].item() == 0 and grad_x[3].item() == 0
    assert torch.equal(grad_zeros, torch.zeros_like(zeros))
    second = torch.autograd.grad(grad_x.sum() + grad_zeros.sum(), [x, zeros])
    assert all(bool(torch.isfinite(g).all()) for g in second)


def test_neg_inf_norm_of_an_empty_tensor_is_inf(backend, device):
    # vector_norm(-inf) refuses empty input; regfuse gives the identity of min.
    out = regfuse.norms([torch.empty(0, device=device), torch.tensor([-3.0, 2.0], device=device)],
                        -INF, backend=backend)
    assert out.tolist() == [math.inf, 2.0]


def test_count_of_nonzeros_has_zero_gradient(backend, device):
    x = torch.tensor([0.0, 1.5, -2.0], device=device, requires_grad=True)
    out = regfuse.norms([x], 0, backend=backend)
    assert out.tolist() == [2.0]
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("p", [0.5, 3, -INF])
def test_general_p_accepts_any_number_type(backend, device, p):
    tensors = case("single-f32").tensors(device)
    expected = regfuse.norms(tensors, float(p), backend=backend)
    for same in (torch.tensor(p).item(), str(float(p))):
        assert torch.equal(regfuse.norms(tensors, same, backend=backend), expected)
