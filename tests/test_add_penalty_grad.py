"""regfuse.add_penalty_grad_: ``p.grad += c_i * (l1 * sign(p) + 2 * l2 * p)`` in place."""
import pytest
import torch

import regfuse
from cases import (CASES, F32, F64, assert_lists_close, max_abs, oracle_penalty_grads,
                   sample_coefficients)

all_cases = pytest.mark.parametrize("case", CASES, ids=str)
L1, L2 = 0.5, 0.25


def _with_grads(params: list[torch.Tensor], seed: int = 3) -> list[torch.Tensor]:
    """Gives every third parameter no gradient and the others a random one (laid out
    like the parameter, as autograd would make it)."""
    gen = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        if i % 3 != 1:
            values = torch.randn(p.shape, generator=gen, dtype=F64)
            p.grad = torch.empty_like(p, requires_grad=False).copy_(values)
    return params


def _magnitudes(grads, terms) -> list[float]:
    # A sum of two terms is only as exact as the larger of them allows.
    return [max(max_abs(g), max_abs(t)) for g, t in zip(grads, terms)]


@pytest.mark.parametrize("form", ["list", "tensor"])
@all_cases
def test_adds_the_penalty_gradient(backend, device, case, form, skip_if_too_big):
    params = _with_grads(case.leaves(device))
    skip_if_too_big(params)
    before = [None if p.grad is None else p.grad.clone() for p in params]
    grad_objects = [p.grad for p in params]
    values = sample_coefficients(len(params))
    coefficients = values if form == "list" else torch.tensor(values, device=device)

    regfuse.add_penalty_grad_(params, L1, L2, coefficients=coefficients, backend=backend)

    terms = oracle_penalty_grads(params, L1, L2, values)
    expected = [t if g is None else g.to(F64) + t for g, t in zip(before, terms)]
    assert_lists_close([p.grad for p in params], expected, what="grad",
                       magnitudes=_magnitudes(before, terms))
    for p, g in zip(params, grad_objects):
        assert p.grad.dtype == p.dtype and p.grad.shape == p.shape and p.grad.device == p.device
        assert g is None or p.grad is g, "an existing gradient must be updated in place"
        assert p.grad.grad_fn is None and not p.grad.requires_grad


@all_cases
def test_equals_autograd_of_penalty(backend, device, case, skip_if_too_big):
    fused = _with_grads(case.leaves(device))
    skip_if_too_big(fused)
    through_autograd = _with_grads(case.leaves(device))
    before = [None if p.grad is None else p.grad.clone() for p in fused]
    coefficients = sample_coefficients(len(fused))

    regfuse.add_penalty_grad_(fused, L1, L2, coefficients=coefficients, backend=backend)
    regfuse.penalty(through_autograd, L1, L2, coefficients=coefficients, backend=backend).backward()

    terms = oracle_penalty_grads(fused, L1, L2, coefficients)
    assert_lists_close([p.grad for p in fused], [p.grad for p in through_autograd],
                       what="add_penalty_grad_ vs autograd", magnitudes=_magnitudes(before, terms))


def test_bumps_version_counter(backend, device):
    p = torch.randn(7, device=device, requires_grad=True)
    p.grad = torch.randn(7, device=device)
    weight = torch.ones(7, device=device, requires_grad=True)
    uses_grad = (p.grad * weight).sum()  # saves p.grad for its backward
    version = p.grad._version
    regfuse.add_penalty_grad_([p], L1, L2, backend=backend)
    assert p.grad._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        uses_grad.backward()


def test_writes_only_through_a_strided_gradient(backend, device):
    p = torch.randn(10, device=device, requires_grad=True)
    storage = torch.randn(20, device=device)
    p.grad = storage[::2]
    untouched = storage[1::2].clone()
    expected = storage[::2].double() + oracle_penalty_grads([p], L1, L2)[0]
    regfuse.add_penalty_grad_([p], L1, L2, backend=backend)
    assert torch.equal(storage[1::2], untouched)
    assert_lists_close([storage[::2]], [expected], what="strided grad", magnitudes=[max_abs(expected)])


def test_zero_strengths_leave_grads_unchanged(backend, device):
    params = _with_grads([torch.randn(5, 3, device=device, requires_grad=True) for _ in range(3)])
    before = [None if p.grad is None else p.grad.clone() for p in params]
    regfuse.add_penalty_grad_(params, backend=backend)
    for p, g in zip(params, before):
        assert torch.equal(p.grad, torch.zeros_like(p) if g is None else g)


def test_empty_list_is_a_no_op(backend):
    assert regfuse.add_penalty_grad_([], L1, L2, backend=backend) is None


def test_accepts_parameters_generator(backend, device):
    model = torch.nn.Linear(6, 4).to(device)
    regfuse.add_penalty_grad_(model.parameters(), 0.0, 0.5, backend=backend)
    expected = [(2 * 0.5 * p.detach()).to(F32) for p in model.parameters()]
    assert_lists_close([p.grad for p in model.parameters()], expected, what="grad")
