"""Property tests: on random tensor lists, every backend agrees with the reference backend
run on the same values upcast to float64."""
import pytest
import torch

# hypothesis is a test tool, not a requirement: where it cannot be installed (an offline
# GPU machine) this file is skipped, not an error at collection.
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import regfuse  # noqa: E402
from cases import (BF16, F16, F32, F64, NORM_KINDS, assert_close, assert_lists_close, max_abs,
                   oracle_prox)

# The backend fixture does not change between examples, so sharing it is safe.
PROPERTY_SETTINGS = settings(
    max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _build(spec, gen: torch.Generator, device) -> torch.Tensor:
    shape, dtype, scale, zero_fraction, layout = spec
    base_shape, view = shape, (lambda t: t)
    if layout == "transposed" and len(shape) >= 2:
        base_shape, view = shape[::-1], (lambda t: t.transpose(0, -1))
    elif layout == "stepped" and len(shape) >= 1:
        base_shape, view = (2 * shape[0],) + shape[1:], (lambda t: t[::2])
    base = torch.randn(base_shape, generator=gen, dtype=F64) * scale
    zeros = torch.rand(base_shape, generator=gen, dtype=F64) < zero_fraction
    # The view is taken on the device, after the cast, so that the layout is kept.
    return view(base.masked_fill(zeros, 0.0).to(device=device, dtype=dtype))


@st.composite
def tensor_lists(draw, max_tensors: int = 6) -> list:
    """Specs of up to ``max_tensors`` tensors: 0-d (shape ()), empty (a 0 in the shape),
    any of the four dtypes, three magnitudes, some exact zeros, three layouts."""
    spec = st.tuples(st.lists(st.integers(0, 6), max_size=3).map(tuple),
                     st.sampled_from([F32, F64, F16, BF16]),
                     st.sampled_from([1e-3, 1.0, 30.0]),
                     st.sampled_from([0.0, 0.3]),
                     st.sampled_from(["contiguous", "transposed", "stepped"]))
    return draw(st.lists(spec, max_size=max_tensors)), draw(st.integers(0, 2**31 - 1))


def _tensors(drawn, device) -> list[torch.Tensor]:
    specs, seed = drawn
    gen = torch.Generator().manual_seed(seed)
    return [_build(spec, gen, device) for spec in specs]


def _upcast(tensors, requires_grad: bool = False) -> list[torch.Tensor]:
    # copy=True: a float64 input must not share memory with its upcast copy.
    return [t.detach().to(F64, copy=True).requires_grad_(requires_grad) for t in tensors]


strengths = st.tuples(st.sampled_from([0.0, 1e-3, 0.5]), st.sampled_from([0.0, 1e-2, 2.0]))


@PROPERTY_SETTINGS
@given(drawn=tensor_lists(), kind=st.sampled_from(NORM_KINDS))
def test_norms(backend, device, drawn, kind):
    p, squared = kind
    tensors = _tensors(drawn, device)
    out = regfuse.norms(tensors, p, squared=squared, backend=backend)
    expected = regfuse.norms(_upcast(tensors), p, squared=squared, backend="reference")
    assert_close(out, expected, what=f"norms p={p} squared={squared}")


@PROPERTY_SETTINGS
@given(drawn=tensor_lists(), l1_l2=strengths, data=st.data())
def test_penalty_and_its_gradient(backend, device, drawn, l1_l2, data):
    l1, l2 = l1_l2
    leaves = [t.requires_grad_() for t in _tensors(drawn, device)]
    coefficients = data.draw(st.lists(st.sampled_from([0.0, 0.5, 3.0]), min_size=len(leaves),
                                      max_size=len(leaves)))
    exact = _upcast(leaves, requires_grad=True)
    out = regfuse.penalty(leaves, l1, l2, coefficients=coefficients, backend=backend)
    expected = regfuse.penalty(exact, l1, l2, coefficients=coefficients, backend="reference")
    assert_close(out, expected, what="penalty")
    if not leaves:
        return
    out.backward()
    expected.backward()
    assert_lists_close([t.grad for t in leaves], [t.grad for t in exact], what="grad")


@PROPERTY_SETTINGS
@given(drawn=tensor_lists(), l1_l2=strengths)
def test_add_penalty_grad(backend, device, drawn, l1_l2):
    l1, l2 = l1_l2
    params = _tensors(drawn, device)
    for i, p in enumerate(params):
        p.grad = None if i % 2 else torch.full_like(p, 0.25)
    exact = _upcast(params)
    for p, e in zip(params, exact):
        e.grad = None if p.grad is None else p.grad.to(F64, copy=True)
    regfuse.add_penalty_grad_(params, l1, l2, backend=backend)
    regfuse.add_penalty_grad_(exact, l1, l2, backend="reference")
    assert_lists_close([p.grad for p in params], [e.grad for e in exact], what="grad",
                       magnitudes=[max(0.25, max_abs(e.grad)) for e in exact])


@PROPERTY_SETTINGS
@given(drawn=tensor_lists(), threshold=st.sampled_from([0.0, 1e-3, 0.5, 40.0]))
def test_prox_l1(backend, device, drawn, threshold):
    params = _tensors(drawn, device)
    exact = _upcast(params)
    zeros_expected = [e == 0 for e in oracle_prox(params, threshold)]
    regfuse.prox_l1_(params, threshold, backend=backend)
    regfuse.prox_l1_(exact, threshold, backend="reference")
    assert_lists_close(params, exact, what="prox")
    for i, (p, z) in enumerate(zip(params, zeros_expected)):
        assert torch.equal(p == 0, z), f"tensor {i}: exact zeros differ"
