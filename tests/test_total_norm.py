"""regfuse.total_norm against the float64 norm of the concatenation and against
torch.nn.utils.get_total_norm, for every backend and every order."""
import math

import pytest
import torch

import regfuse
from cases import (BF16, F16, F32, F64, INF, ORDER_IDS, ORDERS, assert_close, assert_lists_close,
                   case, dtype_id, is_interpreted, oracle_total_norm, overflowed_to, result_dtype,
                   tolerance, with_specials)

orders = pytest.mark.parametrize("p", ORDERS, ids=ORDER_IDS)
# The per-tensor reductions meet every case in test_norms.py; these cover what the
# combination adds: dtypes, 0-d, empty, strided, mixed, thousands of tensors, many chunks.
CASE_NAMES = ["single-f32", "odd_sizes-f16", "zero_d-f64", "empty_and_zero-bf16", "all_empty-f32",
              "non_contiguous-f32", "mixed_dtypes", "mixed_half", "many_tiny-f32", "many_chunks-bf16"]
some_cases = pytest.mark.parametrize("case", [case(name) for name in CASE_NAMES], ids=str)

# torch's error_if_nonfinite message, for any order.
NONFINITE = r"The total norm of order .* for gradients from `parameters` is non-finite, so it cannot be clipped"


@orders
@some_cases
def test_values(backend, device, case, p, skip_if_too_big):
    tensors = case.tensors(device)
    skip_if_too_big(tensors)
    out = regfuse.total_norm(tensors, p, backend=backend)
    assert out.shape == ()
    assert out.dtype == result_dtype(tensors)
    assert out.device == device
    assert_close(out, oracle_total_norm(tensors, p), what=f"total norm p={p}")


@orders
@pytest.mark.parametrize("name", ["odd_sizes-f32", "mixed_half", "non_contiguous-f32", "zero_d-f32",
                                  "few_tiny-f32"])
def test_same_as_torch_get_total_norm(backend, device, name, p):
    tensors = [t for t in case(name).tensors(device) if t.numel()]  # torch refuses empty at +-inf
    expected = torch.nn.utils.get_total_norm(tensors, p)
    out = regfuse.total_norm(tensors, p, backend=backend)
    if p == 0:
        # torch's p=0 is the L0 "norm" of the per-tensor counts: how many tensors hold a
        # nonzero. regfuse counts the nonzero elements, as the norm of the concatenation.
        assert expected.item() == sum(bool(t.count_nonzero()) for t in tensors)
        assert out.item() == sum(int(t.count_nonzero()) for t in tensors)
    else:
        # torch rounds each per-tensor norm to its tensor's dtype: bfloat16 precision at best.
        low_precision = any(t.dtype in (F16, BF16) for t in tensors)
        assert_close(out, expected.to(out.dtype), tolerance(BF16) if low_precision else None,
                     what=f"p={p} vs torch")


@orders
@pytest.mark.parametrize("name", ["odd_sizes-f32", "mixed_dtypes", "empty_and_zero-bf16", "few_tiny-f32"])
def test_gradients(backend, device, name, p, skip_if_too_big):
    leaves = case(name).leaves(device)
    skip_if_too_big(leaves)
    out = regfuse.total_norm(leaves, p, backend=backend)
    (1.75 * out).backward()
    exact = [t.detach().to(F64).requires_grad_() for t in leaves]
    expected_out = oracle_total_norm(exact, p)
    assert_close(out, expected_out, what="total norm (with grad)")
    if expected_out.requires_grad:
        expected = torch.autograd.grad(1.75 * expected_out, exact, allow_unused=True, materialize_grads=True)
    else:  # nothing but empty tensors
        expected = [torch.zeros_like(t) for t in exact]
    expected = [overflowed_to(e, t.dtype) for e, t in zip(expected, leaves)]
    assert_lists_close([t.grad for t in leaves], expected, what="grad")


@orders
def test_gradcheck_and_gradgradcheck(backend, device, p):
    gen = torch.Generator().manual_seed(3)
    shapes = [(3,), (2, 2), (), (4,)] if p == -INF else [(3,), (2, 2), (), (0,), (4,)]
    inputs = tuple(torch.randn(s, generator=gen, dtype=F64).to(device).requires_grad_() for s in shapes)

    def fn(*tensors):
        return regfuse.total_norm(tensors, p, backend=backend)

    fast = is_interpreted(backend, device)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast)


def test_zero_total_has_zero_gradient(backend, device):
    # As torch.linalg.vector_norm: the gradient of a norm that is 0 is 0, not NaN.
    x = torch.zeros(4, dtype=F64, device=device, requires_grad=True)
    y = torch.zeros((), dtype=F64, device=device, requires_grad=True)
    for p in (2, 3, 0.5):
        gx, gy = torch.autograd.grad(regfuse.total_norm([x, y], p, backend=backend), [x, y])
        assert torch.equal(gx, torch.zeros_like(x)) and torch.equal(gy, torch.zeros_like(y)), p


@orders
@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=dtype_id)
def test_nan_and_inf(backend, device, p, dtype):
    tensors = with_specials(device, dtype)
    expected = oracle_total_norm(tensors, p)
    out = regfuse.total_norm(tensors, p, backend=backend)
    assert_close(out, expected, what="total norm with NaN/Inf")
    if p != 0:  # a count stays finite
        assert math.isnan(out.item())
        with pytest.raises(RuntimeError, match=NONFINITE):
            regfuse.total_norm(tensors, p, error_if_nonfinite=True, backend=backend)
    clean = regfuse.total_norm(tensors[4:], p, error_if_nonfinite=True, backend=backend)
    assert_close(clean, oracle_total_norm(tensors[4:], p), what="clean total")
    if p > 0:
        infinite = [tensors[2], tensors[4]]  # -Inf and a clean tensor
        assert regfuse.total_norm(infinite, p, backend=backend).item() == math.inf
        with pytest.raises(RuntimeError, match=NONFINITE):
            regfuse.total_norm(infinite, p, error_if_nonfinite=True, backend=backend)


def test_nonfinite_message_is_torchs(backend, device):
    tensors = with_specials(device, F32)
    with pytest.raises(RuntimeError) as ours:
        regfuse.total_norm(tensors, 2, error_if_nonfinite=True, backend=backend)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.get_total_norm(tensors, 2, error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)


def test_empty_list_gives_zero_like_torch(backend):
    for p in ORDERS:
        out = regfuse.total_norm([], p, backend=backend)
        assert out.shape == () and out.dtype == F32 and out.item() == 0.0
        assert torch.equal(out, torch.nn.utils.get_total_norm([], p))


def test_all_empty_tensors(backend, device):
    empty = [torch.empty(0, device=device), torch.empty(2, 0, device=device)]
    for p in ORDERS:
        expected = math.inf if p == -INF else 0.0  # min over nothing is inf (torch refuses)
        assert regfuse.total_norm(empty, p, backend=backend).item() == expected, p


def test_one_bare_tensor(backend, device):
    x = case("odd_sizes-f32").tensors(device)[1]
    for p in (2, 1, INF, 3):
        out = regfuse.total_norm(x, p, backend=backend)
        assert_close(out, torch.nn.utils.get_total_norm(x, p), what=f"bare tensor p={p}")


def test_accepts_any_iterable_and_string_orders(backend, device):
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3)).to(device)
    expected = oracle_total_norm(list(model.parameters()), 2)
    assert_close(regfuse.total_norm(model.parameters(), backend=backend), expected, what="generator")
    # torch.nn.utils takes norm_type="inf"; so does regfuse.
    assert_close(regfuse.total_norm(model.parameters(), "inf", backend=backend),
                 oracle_total_norm(list(model.parameters()), INF), what="'inf'")


@pytest.mark.slow
def test_float32_accuracy_on_a_large_list(backend, device, skip_if_too_big):
    # 4M float32 elements: torch's float32 sum is off by ~1e-5 here; regfuse stays within
    # 1e-6 of the float64 value (the target).
    gen = torch.Generator().manual_seed(9)
    tensors = [(torch.randn(n, generator=gen) * 0.02).to(device) for n in (2**22, 1000, 77)]
    skip_if_too_big(tensors)
    if backend == "reference":
        pytest.skip("the reference backend sums in float32 with torch's own sum")
    expected = oracle_total_norm(tensors, 2)
    out = regfuse.total_norm(tensors, backend=backend)
    assert abs(out.item() - expected.item()) / expected.item() <= 1e-6
