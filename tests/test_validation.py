"""Bad input raises the documented exception before any kernel runs, and modifies nothing.

Each bad input is placed last in an otherwise valid list, so that an implementation
that processed tensors one at a time would already have changed the first ones.
"""
import math
from typing import Callable, NamedTuple, Optional

import pytest
import torch
from torch import nn

import regfuse
from regfuse import backends
from torch.testing._internal.two_tensor import TwoTensor

L1, L2, THRESHOLD = 0.5, 0.25, 0.1

# The four public ops, called with valid strengths; bad arguments come through **kwargs.
OPS: dict[str, Callable] = {
    "norms": lambda tensors, **kw: regfuse.norms(tensors, **kw),
    "penalty": lambda tensors, **kw: regfuse.penalty(tensors, kw.pop("l1", L1), kw.pop("l2", L2), **kw),
    "add_penalty_grad_": lambda tensors, **kw: regfuse.add_penalty_grad_(
        tensors, kw.pop("l1", L1), kw.pop("l2", L2), **kw),
    "prox_l1_": lambda tensors, **kw: regfuse.prox_l1_(tensors, kw.pop("threshold", THRESHOLD), **kw),
}
WITH_COEFFICIENTS = ("penalty", "add_penalty_grad_", "prox_l1_")
WITH_STRENGTHS = ("penalty", "add_penalty_grad_")


def _valid_params(device) -> list[torch.Tensor]:
    """Mixed dtypes and layouts; the first has a gradient, the second none."""
    params = [torch.randn(4, 3, device=device, requires_grad=True),
              torch.randn(5, device=device, dtype=torch.float16, requires_grad=True),
              torch.randn(6, 2, device=device, dtype=torch.float64).t().detach().requires_grad_()]
    params[0].grad = torch.randn(4, 3, device=device)
    params[2].grad = torch.randn(6, 2, device=device, dtype=torch.float64).t()
    return params


class Snapshot(NamedTuple):
    values: list[torch.Tensor]
    grads: list[Optional[torch.Tensor]]
    versions: list[int]

    @classmethod
    def of(cls, tensors) -> "Snapshot":
        tensors = [t for t in tensors
                   if isinstance(t, torch.Tensor) and t.device.type != "meta" and not t.is_nested]
        return cls([t.detach().to_dense().clone() for t in tensors],
                   [None if t.grad is None else t.grad.to_dense().clone() for t in tensors],
                   [t._version for t in tensors])

    def assert_unchanged(self, tensors) -> None:
        now = Snapshot.of(tensors)
        assert now.versions == self.versions, "a version counter moved"
        for i, (before, after) in enumerate(zip(self.values, now.values)):
            assert torch.equal(before, after), f"tensor {i} was modified"
        for i, (before, after) in enumerate(zip(self.grads, now.grads)):
            assert (before is None) == (after is None), f"gradient {i} was created or dropped"
            assert before is None or torch.equal(before, after), f"gradient {i} was modified"


def _assert_raises_and_keeps(op: str, tensors, error: type, match: str, **kwargs) -> None:
    snapshot = Snapshot.of(tensors) if isinstance(tensors, list) else None
    with pytest.raises(error, match=match):
        OPS[op](tensors, **kwargs)
    if snapshot is not None:
        snapshot.assert_unchanged(tensors)


def _other_device() -> torch.device:
    # Shape-only "meta" tensors stand in for a second device where there is no GPU.
    return torch.device("cuda" if torch.cuda.is_available() else "meta")


BAD_ELEMENTS = {
    "int tensor": (lambda d: torch.arange(3, device=d), TypeError, "dtype"),
    "bool tensor": (lambda d: torch.ones(2, dtype=torch.bool, device=d), TypeError, "dtype"),
    "complex tensor": (lambda d: torch.ones(2, dtype=torch.complex64, device=d), TypeError, "dtype"),
    "not a tensor": (lambda d: 1.5, TypeError, "not a torch.Tensor"),
    "other device": (lambda d: torch.ones(2, device=_other_device()), ValueError, "one device"),
    "sparse tensor": (lambda d: torch.ones(2, 2, device=d).to_sparse(), TypeError, "layout"),
    # No storage of their own (data_ptr() is 0) or none the kernels can interpret.
    "wrapper subclass": (lambda d: TwoTensor(torch.ones(3, device=d), torch.ones(3, device=d)),
                         TypeError, "TwoTensor"),
    "nested tensor": (lambda d: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], device=d,
                                                           layout=torch.jagged), TypeError, "nested"),
    "strided nested tensor": (lambda d: torch.nested.as_nested_tensor(
        [torch.ones(2, device=d), torch.ones(3, device=d)], layout=torch.strided), TypeError, "nested"),
}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", BAD_ELEMENTS)
def test_bad_element_last(backend, device, op, bad):
    make, error, match = BAD_ELEMENTS[bad]
    if bad == "other device" and _other_device() == device:
        pytest.skip("needs a second device")
    tensors = _valid_params(device) + [make(device)]
    _assert_raises_and_keeps(op, tensors, error, match, backend=backend)


@pytest.mark.parametrize("op", OPS)
def test_a_single_tensor_is_a_list_of_one(op):
    # As torch's utilities: one tensor, a list of it and a generator give the same
    # result and the same effect (values, and the gradient add_penalty_grad_ creates).
    t = torch.randn(3, 2, requires_grad=True)
    alone, listed, generated = (t.detach().clone().requires_grad_() for _ in range(3))
    results = [OPS[op](alone), OPS[op]([listed]), OPS[op](x for x in [generated])]
    for result in results[1:]:
        assert (result is None) == (results[0] is None)
        if result is not None:
            assert torch.equal(result, results[0])
    for other in (listed, generated):
        assert torch.equal(other.detach(), alone.detach())
        assert (other.grad is None) == (alone.grad is None)
        assert other.grad is None or torch.equal(other.grad, alone.grad)
    assert op != "add_penalty_grad_" or alone.grad is not None
    assert op != "prox_l1_" or not torch.equal(alone.detach(), t.detach())


def test_custom_ops_refuse_aliased_tensors(backend, device):
    # What regfuse.api checks before calling them, checked again by the ops themselves: a
    # compiled graph calls them without that pass (its tracing sees no memory).
    t = torch.randn(6, device=device)
    values = torch.ones(2, device=device)
    for call in (lambda: torch.ops.regfuse.prox_l1_([t, t[2:]], values, backend),
                 lambda: torch.ops.regfuse.scale_([t[:4], t[3:]], values, backend),
                 lambda: torch.ops.regfuse.add_grad_([t, t], [t.clone(), t.clone()],
                                                     torch.ones(2, 2, device=device), backend)):
        before = t.clone()
        with pytest.raises(ValueError, match="share memory"):
            call()
        assert torch.equal(t, before)


@pytest.mark.parametrize("op", OPS)
def test_not_iterable(op):
    _assert_raises_and_keeps(op, 3, TypeError, "iterable")


@pytest.mark.parametrize("op", OPS)
def test_unknown_backend_name(op):
    _assert_raises_and_keeps(op, _valid_params("cpu"), ValueError, "unknown backend", backend="fastest")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", backends.NAMES)
def test_unavailable_backend_says_why(op, name):
    reason = backends.unavailable_reason(name, torch.device("cpu"))
    if reason is None:
        pytest.skip(f"{name} is available for cpu tensors here")
    _assert_raises_and_keeps(op, _valid_params("cpu"), RuntimeError, f"'{name}'.*not available",
                             backend=name)


@pytest.mark.parametrize("p, squared", [(-1, False), (-0.5, False), ("fro", False), (None, False),
                                        (math.nan, False), (1, True), (math.inf, True), (3, True),
                                        (0, True)])
def test_norms_unsupported_p(backend, device, p, squared):
    _assert_raises_and_keeps("norms", _valid_params(device), ValueError, "p=", p=p, squared=squared,
                             backend=backend)


@pytest.mark.parametrize("op", WITH_STRENGTHS)
@pytest.mark.parametrize("strengths", [{"l1": -0.1}, {"l2": -1e-9}, {"l1": math.nan}, {"l2": -math.inf}],
                         ids=["l1<0", "l2<0", "l1 nan", "l2 -inf"])
def test_negative_strength(backend, device, op, strengths):
    _assert_raises_and_keeps(op, _valid_params(device), ValueError, "non-negative", backend=backend,
                             **strengths)


@pytest.mark.parametrize("bad", BAD_ELEMENTS)
def test_total_norm_bad_element_last(backend, device, bad):
    make, error, match = BAD_ELEMENTS[bad]
    if bad == "other device" and _other_device() == device:
        pytest.skip("needs a second device")
    with pytest.raises(error, match=match):
        regfuse.total_norm(_valid_params(device) + [make(device)], backend=backend)


@pytest.mark.parametrize("p", [-1, -0.5, math.nan, "fro", None])
def test_total_norm_unsupported_p(backend, device, p):
    with pytest.raises(ValueError, match="p="):
        regfuse.total_norm(_valid_params(device), p, backend=backend)


@pytest.mark.parametrize("op", WITH_STRENGTHS)
@pytest.mark.parametrize("strengths", [{"l1": math.inf}, {"l2": math.inf}, {"l1": -math.inf}],
                         ids=["l1 inf", "l2 inf", "l1 -inf"])
def test_infinite_strength(backend, device, op, strengths):
    _assert_raises_and_keeps(op, _valid_params(device), ValueError, "finite non-negative",
                             backend=backend, **strengths)


def test_infinite_l1_of_zeros_is_refused_not_nan(backend, device):
    # inf * 0 would make the penalty of all-zero weights NaN; Keras refuses inf, so does regfuse.
    with pytest.raises(ValueError, match="l1 must be a finite non-negative number, got inf"):
        regfuse.penalty([torch.zeros(3, device=device)], l1=math.inf, backend=backend)


@pytest.mark.parametrize("threshold", [-0.1, math.nan, math.inf])
def test_prox_negative_threshold(backend, device, threshold):
    _assert_raises_and_keeps("prox_l1_", _valid_params(device), ValueError, "non-negative",
                             threshold=threshold, backend=backend)


BAD_COEFFICIENTS = {
    "negative": ([1.0, -0.5, 1.0], "non-negative"),
    "nan": ([1.0, math.nan, 1.0], "non-negative"),
    "inf": ([1.0, math.inf, 1.0], "finite"),
    "inf tensor": (torch.tensor([1.0, 2.0, math.inf]), "finite"),
    "nan float64 tensor": (torch.tensor([math.nan, 2.0, 1.0], dtype=torch.float64), "finite"),
    "too short": ([1.0, 1.0], "one per tensor"),
    "too long": ([1.0, 1.0, 1.0, 1.0], "one per tensor"),
    "2-d tensor": (torch.ones(3, 1), "one per tensor"),
    "complex": (torch.ones(3, dtype=torch.complex64), "real"),
}


@pytest.mark.parametrize("op", WITH_COEFFICIENTS)
@pytest.mark.parametrize("bad", BAD_COEFFICIENTS)
def test_bad_coefficients(backend, device, op, bad):
    coefficients, match = BAD_COEFFICIENTS[bad]
    _assert_raises_and_keeps(op, _valid_params(device), ValueError, match, coefficients=coefficients,
                             backend=backend)


def test_penalty_empty_list_with_coefficients():
    with pytest.raises(ValueError, match="coefficients"):
        regfuse.penalty([], L1, coefficients=[1.0])


def _param_with_stale_grad(change, device) -> torch.Tensor:
    """A parameter whose ``.data`` was swapped after its gradient was set (how a gradient of
    another shape or dtype can arise: torch checks ``.grad`` assignments themselves)."""
    p = torch.randn(4, device=device, requires_grad=True)
    p.grad = torch.randn(4, device=device)
    p.data = change(p.data)
    return p


@pytest.mark.parametrize("change", [lambda d: d.new_zeros(5), lambda d: d.double()], ids=["shape", "dtype"])
def test_add_grad_mismatched_gradient(backend, device, change):
    tensors = _valid_params(device) + [_param_with_stale_grad(change, device)]
    _assert_raises_and_keeps("add_penalty_grad_", tensors, ValueError, "gradient", backend=backend)


def test_add_grad_sparse_gradient(backend, device):
    p = torch.randn(4, 3, device=device, requires_grad=True)
    p.grad = torch.randn(4, 3, device=device).to_sparse()
    tensors = _valid_params(device) + [p]
    _assert_raises_and_keeps("add_penalty_grad_", tensors, TypeError, "sparse", backend=backend)


def test_add_grad_wrapper_subclass_gradient(backend, device):
    p = torch.randn(3, device=device, requires_grad=True)
    p.grad = TwoTensor(torch.ones(3, device=device), torch.ones(3, device=device))
    tensors = _valid_params(device) + [p]
    _assert_raises_and_keeps("add_penalty_grad_", tensors, TypeError, "TwoTensor", backend=backend)


class _FunctionOnlySubclass(torch.Tensor):
    """A subclass with real storage and no __torch_dispatch__: an ordinary tensor to the kernels."""


@pytest.mark.parametrize("op", OPS)
def test_parameters_and_plain_subclasses_are_accepted(backend, device, op):
    values = [torch.randn(4, 3, device=device), torch.randn(5, device=device)]
    plain = [v.clone() for v in values]
    subclassed = [nn.Parameter(values[0].clone()), values[1].clone().as_subclass(_FunctionOnlySubclass)]
    for ts in (plain, subclassed):
        for t in ts:
            t.grad = torch.ones_like(t)
    expected = OPS[op](plain, backend=backend)
    got = OPS[op](subclassed, backend=backend)
    if expected is not None:
        torch.testing.assert_close(torch.as_tensor(got), expected)
    for a, b in zip(subclassed, plain):
        torch.testing.assert_close(torch.as_tensor(a.detach()), b)
        torch.testing.assert_close(torch.as_tensor(a.grad), b.grad)


@pytest.mark.parametrize("op", ["add_penalty_grad_", "prox_l1_"])
@pytest.mark.parametrize("alias", ["same tensor", "overlapping view"])
def test_in_place_ops_refuse_aliased_tensors(backend, device, op, alias):
    params = _valid_params(device)
    first = params[0]
    params.append(first if alias == "same tensor" else first.detach()[1:3])
    _assert_raises_and_keeps(op, params, ValueError, "share memory", backend=backend)


@pytest.mark.parametrize("op", WITH_COEFFICIENTS)
def test_scalar_coefficients(op):
    _assert_raises_and_keeps(op, _valid_params("cpu"), ValueError, "sequence of 3 numbers",
                             coefficients=0.5)


@pytest.mark.parametrize("coefficients", [[], torch.tensor([])], ids=["list", "tensor"])
def test_empty_list_takes_empty_coefficients(coefficients):
    assert regfuse.penalty([], 0.5, 0.5, coefficients=coefficients).item() == 0
    with pytest.raises(ValueError, match="sequence of 0 numbers"):
        regfuse.penalty([], 0.5, 0.5, coefficients=torch.tensor([1.0]))


def test_empty_list_results_are_float32_whatever_the_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert regfuse.norms([]).dtype == torch.float32
        assert regfuse.penalty([]).dtype == torch.float32
    finally:
        torch.set_default_dtype(previous)


def test_a_call_under_inference_mode_does_not_break_later_training(backend, device):
    weight = torch.randn(5, device=device, requires_grad=True)
    with torch.inference_mode():
        regfuse.penalty([weight.detach()], 0.125, 0.375, backend=backend)  # same cached weights
    regfuse.penalty([weight], 0.125, 0.375, backend=backend).backward()
    expected = 0.125 * torch.sign(weight.detach()) + 0.75 * weight.detach()
    torch.testing.assert_close(weight.grad, expected)
