"""The custom ops (``torch.ops.regfuse.*``) and the C++ binding (``regfuse._C``) check what
they are given: per-tensor tables of the wrong shape, dtype or device, gradients that do
not match their tensors, an empty list or an unknown reduction raise a clear exception
before any kernel runs (a kernel would read past a buffer, or dereference a host pointer
on the GPU), and nothing is modified."""
from typing import Callable

import pytest
import torch

from regfuse import _C as native
from regfuse.backends.base import Reduction

PENALTY, L2 = int(Reduction.PENALTY), int(Reduction.L2)
ops = torch.ops.regfuse


def _tensors(device) -> list[torch.Tensor]:
    """Two float32 tensors of different sizes: the accumulation dtype is float32, n = 2."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(10, generator=gen).to(device), torch.randn(5, generator=gen).to(device)]


def _wrong_device(device) -> str:
    # On a CPU-only machine the meta device stands in for "another device": its tensors
    # have no memory at all, so using their pointers would crash.
    return "cpu" if device.type == "cuda" else "meta"


def _bad_tables(device, shape: tuple) -> dict[str, torch.Tensor]:
    """Per-tensor tables that differ from a float32 ``shape`` tensor on ``device`` in one way."""
    *rows, n = shape
    reshaped = (rows[0] * n,) if rows else (n, 1)
    return {
        "too short": torch.ones(*rows, n - 1, device=device),
        "too long": torch.ones(*rows, n + 1, device=device),
        "reshaped": torch.ones(reshaped, device=device),
        "float64": torch.ones(shape, dtype=torch.float64, device=device),
        "other device": torch.ones(shape, device=_wrong_device(device)),
    }


BAD = ["too short", "too long", "reshaped", "float64", "other device"]


def _assert_refused(call: Callable[[], object], tensors: list[torch.Tensor], match: str,
                    error: type = ValueError) -> None:
    before = [t.clone() for t in tensors]
    with pytest.raises(error, match=match):
        call()
    for i, (b, t) in enumerate(zip(before, tensors)):
        assert torch.equal(b, t), f"tensor {i} was modified"


def test_the_reported_out_of_bounds_call_raises():
    # Weights of shape (2, 1) for two tensors: the penalty needs (2, 2).
    with pytest.raises(ValueError, match=r"weights must be a dense \(2, 2\)"):
        ops.reduce([torch.randn(10), torch.randn(5)], PENALTY, torch.ones(2, 1), "cpu", 0.0)


@pytest.mark.parametrize("bad", BAD)
def test_reduce_refuses_bad_weights(backend, device, bad):
    tensors = _tensors(device)
    weights = _bad_tables(device, (2, 2))[bad]
    _assert_refused(lambda: ops.reduce(tensors, PENALTY, weights, backend, 0.0), tensors, "weights")


def test_reduce_refuses_missing_or_stray_weights(backend, device):
    tensors = _tensors(device)
    _assert_refused(lambda: ops.reduce(tensors, PENALTY, None, backend, 0.0), tensors, "weights")
    weights = torch.ones(2, 2, device=device)
    _assert_refused(lambda: ops.reduce(tensors, L2, weights, backend, 0.0), tensors, "only taken by")


def test_unknown_reduction_and_empty_list(backend, device):
    tensors = _tensors(device)
    _assert_refused(lambda: ops.reduce(tensors, 99, None, backend, 0.0), tensors, "unknown reduction")
    _assert_refused(lambda: ops.reduce(tensors, int(Reduction.LP), None, backend, -1.0), tensors,
                    "finite order p > 0")
    with pytest.raises(ValueError, match="empty"):
        ops.reduce([], L2, None, backend, 0.0)


def test_scale_over_rows_needs_one_factor_per_row(backend, device):
    tensors = _tensors(device)
    # Over rows the factors are per row: 10 + 5 rows of the two 1-D tensors.
    per_tensor = torch.ones(2, dtype=tensors[0].dtype, device=device)
    _assert_refused(lambda: ops.scale_(tensors, per_tensor, backend, True), tensors, r"\(15,\)")


def test_penalty_over_rows_is_refused(backend, device):
    tensors = _tensors(device)
    weights = torch.ones(2, 2, device=device)
    _assert_refused(lambda: ops.reduce(tensors, PENALTY, weights, backend, 0.0, True), tensors, "rows")


@pytest.mark.parametrize("bad", BAD)
def test_reduce_backward_refuses_bad_norms(backend, device, bad):
    tensors = _tensors(device)
    norms = _bad_tables(device, (2,))[bad]
    grad_out = torch.ones(2, device=device)
    _assert_refused(lambda: ops.reduce_backward(tensors, L2, grad_out, norms, None, backend),
                    tensors, "norms")


def test_reduce_backward_refuses_bad_grad_out_weights_and_inf(backend, device):
    tensors = _tensors(device)
    norms, weights = torch.ones(2, device=device), torch.ones(2, 2, device=device)
    backward = ops.reduce_backward
    _assert_refused(lambda: backward(tensors, L2, torch.ones(3, device=device), norms, None, backend),
                    tensors, "grad_out")
    _assert_refused(lambda: backward(tensors, L2, torch.ones(2, device=_wrong_device(device)), norms,
                                     None, backend), tensors, "grad_out")
    _assert_refused(lambda: backward(tensors, PENALTY, torch.ones(2, device=device), None, weights,
                                     backend), tensors, "grad_out")
    _assert_refused(lambda: backward(tensors, L2, torch.ones(2, device=device), None, None, backend),
                    tensors, "norms")
    _assert_refused(lambda: backward(tensors, PENALTY, torch.ones((), device=device), None,
                                     torch.ones(2, 1, device=device), backend), tensors, "weights")
    _assert_refused(lambda: backward(tensors, int(Reduction.INF), torch.ones(2, device=device), norms,
                                     None, backend), tensors, "no fused backward")


@pytest.mark.parametrize("bad", BAD)
def test_add_grad_refuses_bad_weights(backend, device, bad):
    tensors = _tensors(device)
    grads = [torch.zeros_like(t) for t in tensors]
    weights = _bad_tables(device, (2, 2))[bad]
    _assert_refused(lambda: ops.add_grad_(grads, tensors, weights, backend), tensors + grads, "weights")


@pytest.mark.parametrize("bad", ["one too few", "smaller", "float64", "other device"])
def test_add_grad_refuses_mismatched_gradients(backend, device, bad):
    tensors = _tensors(device)
    grads = [torch.zeros_like(t) for t in tensors]
    if bad == "one too few":
        grads = grads[:1]
    elif bad == "smaller":  # a kernel would write 10 elements into 4
        grads[0] = torch.zeros(4, device=device)
    elif bad == "float64":  # a kernel would write float32 elements into a float64 buffer
        grads[1] = torch.zeros(5, dtype=torch.float64, device=device)
    else:
        grads[1] = torch.zeros(5, device=_wrong_device(device))
    weights = torch.ones(2, 2, device=device)
    checked = tensors + [g for g in grads if g.device.type != "meta"]
    _assert_refused(lambda: ops.add_grad_(grads, tensors, weights, backend), checked, "gradient")


@pytest.mark.parametrize("bad", BAD)
def test_prox_refuses_bad_thresholds(backend, device, bad):
    tensors = _tensors(device)
    thresholds = _bad_tables(device, (2,))[bad]
    _assert_refused(lambda: ops.prox_l1_(tensors, thresholds, backend), tensors, "thresholds")


# ---- the binding itself: it takes the raw pointers, so it checks again -------------------

needs_native = pytest.mark.skipif(native is None, reason="the C++ extension is not built")


@needs_native
def test_binding_checks_the_list():
    good = _tensors("cpu")
    weights = torch.ones(2, 2)
    with pytest.raises(ValueError, match="empty"):
        native.reduce([], L2, None, False)
    with pytest.raises(ValueError, match="not contiguous"):
        native.reduce([good[0], torch.randn(10)[::2]], L2, None, False)
    with pytest.raises(TypeError, match="dense float32"):
        native.reduce([good[0], torch.ones(3, dtype=torch.int32)], L2, None, False)
    with pytest.raises(ValueError, match="unknown reduction"):
        native.reduce(good, 99, None, False)
    with pytest.raises(ValueError, match="finite p > 0"):
        native.reduce(good, int(Reduction.LP), None, False, p=0.0)
    with pytest.raises(ValueError, match="tensor 1 is on meta"):
        native.reduce([good[0], torch.ones(3, device="meta")], PENALTY, weights, False)
    with pytest.raises(ValueError, match="multiple of 8"):
        native.metadata(good, 12)


@needs_native
@pytest.mark.parametrize("bad", BAD)
def test_binding_checks_weights_and_scales(bad):
    tensors = _tensors("cpu")
    table = _bad_tables(torch.device("cpu"), (2, 2))[bad]
    grads = [torch.zeros_like(t) for t in tensors]
    with pytest.raises(ValueError, match="weights must be"):
        native.reduce(tensors, PENALTY, table, False)
    with pytest.raises(ValueError, match="scales must be"):
        native.grad(tensors, table, False)
    _assert_refused(lambda: native.add_grad_(grads, tensors, table, False), grads, "scales must be")
    with pytest.raises(ValueError, match="weights are required"):
        native.reduce(tensors, PENALTY, None, False)


@needs_native
@pytest.mark.parametrize("bad", BAD)
def test_binding_checks_thresholds(bad):
    tensors = _tensors("cpu")
    thresholds = _bad_tables(torch.device("cpu"), (2,))[bad]
    _assert_refused(lambda: native.prox_l1_(tensors, thresholds, False), tensors, "thresholds must be")


@needs_native
def test_binding_checks_gradients():
    tensors = _tensors("cpu")
    scales = torch.ones(2, 2)
    cases = {"count": [torch.zeros(10)], "shape": [torch.zeros(10), torch.zeros(4)],
             "dtype": [torch.zeros(10), torch.zeros(5, dtype=torch.float64)],
             "contiguity": [torch.zeros(10), torch.zeros(10)[::2]]}
    for what, grads in cases.items():
        match = "not contiguous" if what == "contiguity" else "gradient"
        _assert_refused(lambda: native.add_grad_(grads, tensors, scales, False), grads, match)
