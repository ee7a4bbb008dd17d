"""regfuse.clip_grad_norm_ against a float64 oracle and against
torch.nn.utils.clip_grad_norm_ (foreach and loop), for every backend."""
import math
import warnings

import pytest
import torch

import regfuse
from cases import (BF16, F16, F32, F64, INF, ORDER_IDS, ORDERS, assert_close, assert_lists_close, case,
                   oracle_total_norm, result_dtype, tolerance, with_specials)

orders = pytest.mark.parametrize("p", ORDERS, ids=ORDER_IDS)
CASE_NAMES = ["odd_sizes-f32", "odd_sizes-bf16", "zero_d-f64", "empty_and_zero-f32", "non_contiguous-f16",
              "mixed_dtypes", "mixed_half", "many_tiny-f32", "many_chunks-f32"]
some_cases = pytest.mark.parametrize("case", [case(name) for name in CASE_NAMES], ids=str)
# Clipping (the norms of these lists are far above 0.5), no clipping, and the usual
# "just give me the norm" of max_norm=inf.
MAX_NORMS = pytest.mark.parametrize("max_norm", [0.5, 1e9, INF], ids=["clips", "below", "inf"])

NONFINITE = r"The total norm of order .* for gradients from `parameters` is non-finite, so it cannot be clipped"


def _params(case, device, without_grad: int = 3) -> list[torch.Tensor]:
    """The case's tensors as parameters whose gradients are the same case drawn with another
    seed (same shapes, dtypes and strides); every ``without_grad``-th one has no gradient."""
    params = case.leaves(device)
    for i, (p, g) in enumerate(zip(params, case.tensors(device, seed=1))):
        if i % without_grad != without_grad - 1:
            p.grad = 3 * g
    return params


def _copy(params: list[torch.Tensor]) -> list[torch.Tensor]:
    copies = [p.detach().clone().requires_grad_() for p in params]
    for c, p in zip(copies, params):
        c.grad = None if p.grad is None else p.grad.clone()
    return copies


def _grads(params):
    return [p.grad for p in params if p.grad is not None]


def _oracle(params, max_norm: float, p: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Total norm and clipped gradients in float64: torch's formula on exact values."""
    grads = [g.to(F64) for g in _grads(params)]
    total = oracle_total_norm(grads, p)
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return total, [g * coefficient for g in grads]


def _low_precision(params) -> bool:
    return any(g.dtype in (F16, BF16) for g in _grads(params))


@MAX_NORMS
@orders
@some_cases
def test_against_float64(backend, device, case, p, max_norm, skip_if_too_big):
    params = _params(case, device)
    skip_if_too_big(params)
    total_expected, grads_expected = _oracle(params, max_norm, p)
    untouched = [i for i, q in enumerate(params) if q.grad is None]
    total = regfuse.clip_grad_norm_(params, max_norm, p, backend=backend)
    assert total.shape == () and total.device == device
    assert total.dtype == result_dtype(_grads(params))
    assert_close(total, total_expected, what="returned norm")
    assert all(params[i].grad is None for i in untouched)
    grads = _grads(params)
    magnitudes = [max(1.0, e.abs().max().item()) if e.numel() else 0.0 for e in grads_expected]
    assert_lists_close(grads, grads_expected, what="clipped grads", magnitudes=magnitudes)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@MAX_NORMS
@orders
@pytest.mark.parametrize("name", ["odd_sizes-f32", "mixed_half", "non_contiguous-f32", "few_tiny-f32"])
def test_same_as_torch(backend, device, name, p, max_norm, foreach):
    ours = _params(case(name), device)
    ours = [q for q in ours if q.numel()]  # torch refuses empty gradients at p=+-inf
    theirs = _copy(ours)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, p, foreach=foreach)
    total = regfuse.clip_grad_norm_(ours, max_norm, p, foreach=foreach, backend=backend)
    # torch rounds per-tensor norms to each gradient's dtype; and its p=0 counts tensors
    # with a nonzero gradient, not nonzero elements (see test_total_norm.py).
    tol = tolerance(BF16) if _low_precision(ours) else None
    if p != 0:
        assert_close(total, expected.to(total.dtype), tol, what="returned norm vs torch")
        if tol is None:
            assert_lists_close(_grads(ours), _grads(theirs), what="grads vs torch")
        else:
            for i, (a, b) in enumerate(zip(_grads(ours), _grads(theirs))):
                assert_close(a, b, tol, what=f"grad {i} vs torch")
    assert [q.grad is None for q in ours] == [q.grad is None for q in theirs]


def test_unclipped_gradients_keep_their_bits(backend, device):
    # A coefficient of exactly 1 leaves every gradient as it was, bit for bit (torch
    # multiplies by 1, which changes nothing either); the version counters still move.
    params = _params(case("mixed_half"), device, without_grad=10)
    before = [g.clone() for g in _grads(params)]
    versions = [g._version for g in _grads(params)]
    total = regfuse.clip_grad_norm_(params, INF, backend=backend)
    assert_close(total, oracle_total_norm(before, 2), what="returned norm")
    for g, b in zip(_grads(params), before):
        assert torch.equal(g.view(torch.int16 if g.element_size() == 2 else torch.int32),
                           b.view(torch.int16 if b.element_size() == 2 else torch.int32))
    assert all(g._version > v for g, v in zip(_grads(params), versions))


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=["f32", "f64", "bf16"])
def test_non_finite_gradients(backend, device, dtype):
    specials = with_specials(device, dtype)
    for bad in ([specials[0], specials[4]], [specials[1], specials[4]]):  # NaN; +Inf
        params = [t.clone().requires_grad_() for t in bad]
        for q, g in zip(params, bad):
            q.grad = g.clone()
        theirs = _copy(params)
        before = [g.clone() for g in _grads(params)]
        with pytest.raises(RuntimeError, match=NONFINITE):
            regfuse.clip_grad_norm_(params, 1.0, error_if_nonfinite=True, backend=backend)
        assert_lists_close(_grads(params), before, what="grads after the error")  # untouched
        total = regfuse.clip_grad_norm_(params, 1.0, backend=backend)
        expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, foreach=True)
        assert_close(total, expected.to(total.dtype), what="non-finite norm")
        # NaN everywhere after a NaN norm; after an Inf norm the coefficient is 0 (Inf * 0 = NaN).
        assert_lists_close(_grads(params), _grads(theirs), what="grads vs torch")


def test_nonfinite_message_is_torchs(backend, device):
    nan = with_specials(device, F32)[0]
    ours, theirs = nan.clone().requires_grad_(), nan.clone().requires_grad_()
    ours.grad, theirs.grad = nan.clone(), nan.clone()
    with pytest.raises(RuntimeError) as mine:
        regfuse.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True, backend=backend)
    with pytest.raises(RuntimeError) as torchs:
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True)
    assert str(mine.value) == str(torchs.value)


def test_one_bare_tensor(backend, device):
    x = torch.randn(50, device=device, requires_grad=True)
    x.grad = torch.randn(50, device=device) * 10
    y = x.detach().clone().requires_grad_()
    y.grad = x.grad.clone()
    total = regfuse.clip_grad_norm_(x, 2.0, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_(y, 2.0)
    assert_close(total, expected, what="returned norm")
    assert_close(x.grad, y.grad, what="grad")
    assert abs(regfuse.total_norm(x.grad).item() - 2.0) < 1e-5


def test_nothing_to_clip(backend, device):
    no_grads = [torch.randn(3, device=device, requires_grad=True), torch.randn(2, device=device)]
    for params in ([], no_grads):
        total = regfuse.clip_grad_norm_(params, 1.0, backend=backend)
        assert torch.equal(total, torch.nn.utils.clip_grad_norm_(params, 1.0))
        assert total.dtype == F32 and total.device.type == "cpu"
    assert all(p.grad is None for p in no_grads)


def test_empty_generator_warns_like_torch(backend):
    with pytest.warns(UserWarning, match="empty generator, no gradient clipping will occur"):
        regfuse.clip_grad_norm_((p for p in []), 1.0, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        regfuse.clip_grad_norm_([], 1.0, backend=backend)  # a list is not a generator: silent


def test_model_parameters_mixed_dtypes(backend, device):
    # A bfloat16 body with float32 norm layers: one call, one norm over both dtypes.
    model = torch.nn.Sequential(torch.nn.Linear(9, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)).to(device)
    model[0].to(BF16)
    model[2].to(BF16)
    x = torch.randn(5, 9, device=device, dtype=BF16)
    model[2](model[1](model[0](x).float()).to(BF16)).float().pow(2).sum().backward()
    params = list(model.parameters())
    total_expected, grads_expected = _oracle(params, 0.25, 2)
    total = regfuse.clip_grad_norm_(model.parameters(), 0.25, backend=backend)
    assert total.dtype == F32
    assert_close(total, total_expected, what="returned norm")
    assert_lists_close(_grads(params), grads_expected, what="clipped grads")


@pytest.mark.parametrize("max_norm", [math.nan, -1.0, "x"])
def test_bad_max_norm(backend, device, max_norm):
    params = _params(case("odd_sizes-f32"), device)
    before = [g.clone() for g in _grads(params)]
    with pytest.raises(ValueError, match="max_norm"):
        regfuse.clip_grad_norm_(params, max_norm, backend=backend)
    assert_lists_close(_grads(params), before, what="untouched grads")


@pytest.mark.parametrize("norm_type", [-1.0, math.nan, "fro"])
def test_bad_norm_type(backend, device, norm_type):
    params = _params(case("odd_sizes-f32"), device)
    before = [g.clone() for g in _grads(params)]
    with pytest.raises(ValueError, match="p="):
        regfuse.clip_grad_norm_(params, 1.0, norm_type, backend=backend)
    assert_lists_close(_grads(params), before, what="untouched grads")


def test_shared_gradient_is_refused(backend, device):
    # Two parameters holding one gradient tensor: an in-place scale would race with itself.
    a = torch.randn(4, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    a.grad = torch.randn(4, device=device) * 10
    b.grad = a.grad
    before = a.grad.clone()
    with pytest.raises(ValueError, match="share memory"):
        regfuse.clip_grad_norm_([a, b], 1.0, backend=backend)
    assert torch.equal(a.grad, before)


def test_gradients_on_two_devices_are_refused(backend, device):
    a = torch.randn(4, device=device, requires_grad=True)
    b = torch.randn(4, device="meta", requires_grad=True)
    a.grad, b.grad = torch.randn(4, device=device), torch.randn(4, device="meta")
    with pytest.raises(ValueError, match="one device"):
        regfuse.clip_grad_norm_([a, b], 1.0, backend=backend)


def test_repeated_clipping_in_a_training_loop(backend, device):
    # The same parameters every step (cached launch tables), new gradients each step.
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(device)
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    gen = torch.Generator().manual_seed(4)
    for step in range(3):
        x = (torch.randn(16, 6, generator=gen) * (step + 1)).to(device)
        model.zero_grad()
        model(x).pow(2).sum().backward()
        for r, p in zip(reference, model.parameters()):
            r.grad = p.grad.clone()
        total = regfuse.clip_grad_norm_(model.parameters(), 1.0, backend=backend)
        expected = torch.nn.utils.clip_grad_norm_(reference, 1.0)
        assert_close(total, expected, what=f"step {step} norm")
        assert_lists_close([p.grad for p in model.parameters()], [r.grad for r in reference],
                           what=f"step {step} grads")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("gpu_backend", ["cuda", "triton"])
def test_no_host_synchronization_on_cuda(gpu_backend):
    reason = regfuse.backends.unavailable_reason(gpu_backend, torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    params = _params(case("mixed_half"), "cuda")
    regfuse.clip_grad_norm_(params, 0.5, backend=gpu_backend)  # builds and caches the launch table
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        regfuse.clip_grad_norm_(params, 0.5, backend=gpu_backend)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def test_runs_without_autograd(backend, device):
    # Like torch, clipping records no graph, even for gradients that require grad
    # (a create_graph=True backward).
    x = torch.randn(5, dtype=F64, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(x.pow(3).sum(), x, create_graph=True)
    x.grad = g
    expected = torch.linalg.vector_norm(3 * x.detach() ** 2)
    total = regfuse.clip_grad_norm_(x, 0.1, backend=backend)
    assert not total.requires_grad
    assert_close(total, expected, what="returned norm")
    assert_close(x.grad, 3 * x.detach() ** 2 * (0.1 / (expected + 1e-6)), what="clipped grad")
