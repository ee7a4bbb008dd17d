"""regfuse.prox_l1_: in-place soft-thresholding that leaves exact zeros."""
import math

import pytest
import torch

import regfuse
from cases import (BF16, CASES, F16, F32, F64, assert_lists_close, case, dtype_id, oracle_prox,
                   sample_coefficients, with_specials)

all_cases = pytest.mark.parametrize("case", CASES, ids=str)


def _assert_same_zeros(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for i, (a, e) in enumerate(zip(actual, expected)):
        differ = (a == 0) != (e == 0)
        assert not bool(differ.any()), (
            f"tensor {i}: {int(differ.sum())} elements disagree on being exactly zero, "
            f"first at {differ.nonzero()[0].tolist()}")


@pytest.mark.parametrize("threshold", [0.3, 1.0])
@all_cases
def test_soft_thresholds(backend, device, case, threshold, skip_if_too_big):
    params = case.tensors(device)
    skip_if_too_big(params)
    coefficients = sample_coefficients(len(params))
    expected = oracle_prox(params, threshold, coefficients)

    regfuse.prox_l1_(params, threshold, coefficients=coefficients, backend=backend)

    assert_lists_close(params, expected, what="prox")
    _assert_same_zeros(params, expected)


@all_cases
def test_coefficient_tensor_equals_list(backend, device, case, skip_if_too_big):
    by_list, by_tensor = case.tensors(device), case.tensors(device)
    skip_if_too_big(by_list)
    values = sample_coefficients(len(by_list))
    regfuse.prox_l1_(by_list, 0.5, coefficients=values, backend=backend)
    regfuse.prox_l1_(by_tensor, 0.5, coefficients=torch.tensor(values, dtype=F64, device=device),
                     backend=backend)
    for a, b in zip(by_list, by_tensor):
        assert torch.equal(a, b)


def test_parameters_and_leaves_requiring_grad(backend, device):
    model = torch.nn.Linear(8, 5).to(device)
    expected = oracle_prox(list(model.parameters()), 0.2)
    regfuse.prox_l1_(model.parameters(), 0.2, backend=backend)
    assert_lists_close([p.detach() for p in model.parameters()], expected, what="prox")


def test_zero_threshold_keeps_values(backend, device):
    params = case("mixed_dtypes").tensors(device)
    before = [p.clone() for p in params]
    regfuse.prox_l1_(params, 0.0, backend=backend)
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_large_threshold_gives_all_zeros(backend, device):
    params = case("mixed_half").tensors(device)
    regfuse.prox_l1_(params, 1e6, backend=backend)
    for p in params:
        assert torch.equal(p, torch.zeros_like(p))


@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=dtype_id)
def test_nan_and_inf(backend, device, dtype):
    params = with_specials(device, dtype)
    expected = oracle_prox(params, 0.5)
    regfuse.prox_l1_(params, 0.5, backend=backend)
    assert_lists_close(params, expected, what="prox")
    assert math.isnan(params[0][4].item()) and params[1][2].item() == math.inf


def test_writes_only_through_a_strided_view(backend, device):
    storage = torch.randn(30, device=device)
    view = storage[::3]
    untouched = [storage[1::3].clone(), storage[2::3].clone()]
    expected = oracle_prox([view], 0.4)
    regfuse.prox_l1_([view], 0.4, backend=backend)
    assert torch.equal(storage[1::3], untouched[0]) and torch.equal(storage[2::3], untouched[1])
    assert_lists_close([view], expected, what="prox through a view")


def test_bumps_version_counter(backend, device):
    p = torch.randn(6, device=device, requires_grad=True)
    loss = (p * p).sum()  # saves p for its backward
    version = p._version
    regfuse.prox_l1_([p], 0.1, backend=backend)
    assert p._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_empty_list_is_a_no_op(backend):
    assert regfuse.prox_l1_([], 0.5, backend=backend) is None
