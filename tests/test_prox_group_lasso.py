"""regfuse.prox_group_lasso_: in-place block soft-thresholding that zeroes whole groups."""
import math

import pytest
import torch

import regfuse
from regfuse import backends
from regfuse.backends.base import Reduction, row_counts
from regfuse.groups import _shrink_factors
from regfuse.validation import inspect
from cases import (BF16, CASES, F16, F32, F64, _by_group, _from_groups, assert_lists_close, case, dtype_id,
                   group_thresholds, oracle_group_norms, oracle_prox, oracle_prox_group_lasso,
                   sample_coefficients, with_specials)

all_cases = pytest.mark.parametrize("case", CASES, ids=str)
DIMS = pytest.mark.parametrize("dim", [0, -1])  # -1: the movedim route for 2-D and up


def _zero_groups(tensors, dim):
    """Per tensor, which groups are entirely zero."""
    return [(_by_group(t, dim)[0] == 0).all(dim=1) for t in tensors]


def _borderline(tensors, thresholds, dim, margin=1e-3):
    """Per tensor, the groups whose float64 norm is within ``margin`` (relative) of the
    threshold: there the kernels' accumulation-dtype norm may decide either way."""
    return [(norms - limit).abs() <= margin * limit
            for norms, limit in zip(oracle_group_norms(tensors, dim, 2), thresholds)]


def _zero_where(tensors, masks, dim):
    """Copies of ``tensors`` with the flagged groups set to zero."""
    out = []
    for t, mask in zip(tensors, masks):
        matrix, moved = _by_group(t, dim)
        matrix = torch.where(mask.unsqueeze(1).to(matrix.device), 0.0, matrix)
        out.append(_from_groups(matrix, moved, t, dim).to(t.dtype))
    return out


@pytest.mark.parametrize("threshold, l1_threshold", [(0.3, 0.0), (1.5, 0.0), (0.3, 0.2)],
                         ids=["group", "strong", "sparse_group"])
@DIMS
@all_cases
def test_block_soft_thresholds(backend, device, case, threshold, l1_threshold, dim,
                               skip_if_too_many_groups):
    params = case.tensors(device)
    skip_if_too_many_groups(params, dim)
    coefficients = sample_coefficients(len(params))
    after_l1 = oracle_prox(params, l1_threshold, coefficients) if l1_threshold else params
    thresholds = group_thresholds(after_l1, threshold, dim, True, coefficients)
    borderline = _borderline(after_l1, thresholds, dim)
    expected = oracle_prox_group_lasso(params, threshold, dim, l1_threshold, True, coefficients)

    regfuse.prox_group_lasso_(params, threshold, dim=dim, l1_threshold=l1_threshold,
                              coefficients=coefficients, backend=backend)

    # A group on its threshold is zeroed or shrunk to almost nothing: either is right.
    for norms, mask, limit in zip(oracle_group_norms(params, dim, 2), borderline, thresholds):
        assert bool((norms[mask.to(norms.device)] <= 2e-3 * limit).all())
    params, expected = _zero_where(params, borderline, dim), _zero_where(expected, borderline, dim)
    assert_lists_close(params, expected, what="prox")
    for i, (got, want) in enumerate(zip(_zero_groups(params, dim), _zero_groups(expected, dim))):
        assert torch.equal(got, want), f"tensor {i}: the zero groups differ"


@all_cases
def test_unscaled_and_coefficient_tensor(backend, device, case, skip_if_too_many_groups):
    by_list, by_tensor = case.tensors(device), case.tensors(device)
    skip_if_too_many_groups(by_list)
    values = sample_coefficients(len(by_list))
    expected = oracle_prox_group_lasso(by_list, 0.4, 0, 0.0, False, values)
    regfuse.prox_group_lasso_(by_list, 0.4, scale_by_size=False, coefficients=values, backend=backend)
    regfuse.prox_group_lasso_(by_tensor, 0.4, scale_by_size=False,
                              coefficients=torch.tensor(values, dtype=F64, device=device), backend=backend)
    assert_lists_close(by_list, expected, what="prox, unscaled")
    for a, b in zip(by_list, by_tensor):
        assert torch.equal(a, b)


def test_zeroes_exactly_the_groups_below_threshold(backend, device):
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [-6.0, 8.0]], device=device)  # norms 5, .5, 0, 10
    regfuse.prox_group_lasso_([w], 1.0, scale_by_size=False, backend=backend)
    expected = torch.tensor([[2.4, 3.2], [0.0, 0.0], [0.0, 0.0], [-5.4, 7.2]], device=device)
    assert torch.allclose(w, expected) and torch.equal(w[1:3], torch.zeros(2, 2, device=device))
    assert not bool(w.isnan().any())  # the all-zero group: no 0/0


def test_zero_threshold_keeps_values(backend, device):
    params = case("zero_groups-f64").tensors(device) + case("zero_groups-bf16").tensors(device, seed=1)
    before = [p.clone() for p in params]
    regfuse.prox_group_lasso_(params, 0.0, backend=backend)
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_large_threshold_gives_all_zeros(backend, device):
    params = case("zero_groups-f32").tensors(device)
    regfuse.prox_group_lasso_(params, 1e6, dim=-1, backend=backend)
    for p in params:
        assert torch.equal(p, torch.zeros_like(p))


@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=dtype_id)
def test_nan_and_inf(backend, device, dtype):
    params = [t.reshape(3, 3) for t in with_specials(device, dtype)]
    expected = oracle_prox_group_lasso(params, 0.5, 0)
    regfuse.prox_group_lasso_(params, 0.5, backend=backend)
    assert_lists_close(params, expected, what="prox")
    assert bool(params[0][1].isnan().all())  # the group holding the NaN
    assert params[1][0, 2].item() == math.inf and params[1][0, 0].item() == -2.0  # shrunk by 0


def test_non_contiguous_and_other_dims_write_through(backend, device):
    storage = torch.randn(8, 12, device=device)
    view = storage[:, ::2]  # groups along dim 1 of a strided view
    untouched = storage[:, 1::2].clone()
    transposed = torch.randn(5, 4, device=device).t()
    expected = oracle_prox_group_lasso([view, transposed], 0.8, 1)
    regfuse.prox_group_lasso_([view, transposed], 0.8, dim=1, backend=backend)
    assert torch.equal(storage[:, 1::2], untouched)
    assert_lists_close([view, transposed], expected, what="prox through views")


def test_bad_dim_is_refused_before_anything_changes(backend, device):
    params = [torch.randn(4, 3, device=device), torch.randn(5, device=device)]
    before = [p.clone() for p in params]
    with pytest.raises(IndexError, match="tensor 1"):
        regfuse.prox_group_lasso_(params, 10.0, dim=1, l1_threshold=1.0, backend=backend)
    with pytest.raises(ValueError, match="share memory"):
        regfuse.prox_group_lasso_([params[0], params[0][:2]], 10.0, backend=backend)
    with pytest.raises(ValueError, match="threshold"):
        regfuse.prox_group_lasso_(params, -1.0, backend=backend)
    with pytest.raises(ValueError, match="coefficients"):
        regfuse.prox_group_lasso_(params, 10.0, coefficients=[1.0, -1.0], backend=backend)
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_parameters_and_version_counter(backend, device):
    model = torch.nn.Linear(8, 5).to(device)
    loss = sum((p * p).sum() for p in model.parameters())  # saves the parameters for backward
    expected = oracle_prox_group_lasso(list(model.parameters()), 0.5, 0)
    regfuse.prox_group_lasso_(model.parameters(), 0.5, backend=backend)
    assert_lists_close([p.detach() for p in model.parameters()], expected, what="prox")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_minimizes_the_proximal_objective(backend, device):
    # The prox of h = t * sum_g s_g ||w_g||: argmin_z 0.5 ||z - w||^2 + h(z). The result
    # must beat small perturbations of itself (a check that shares no formula with it).
    gen = torch.Generator().manual_seed(13)
    w = torch.randn(6, 4, generator=gen, dtype=F64).to(device)
    w[2] *= 0.1
    t = 0.3

    def objective(z):
        return 0.5 * ((z - w) ** 2).sum() + t * 2.0 * z.norm(dim=1).sum()

    z = w.clone()
    regfuse.prox_group_lasso_([z], t, backend=backend)
    assert bool((z[2] == 0).all())
    best = objective(z)
    for _ in range(50):
        assert objective(z + 1e-3 * torch.randn(z.shape, generator=gen, dtype=F64).to(device)) >= best


def test_empty_list_is_a_no_op(backend):
    assert regfuse.prox_group_lasso_([], 0.5, backend=backend) is None


@pytest.mark.parametrize("sparse", [False, True], ids=["group", "sparse_group"])
@pytest.mark.parametrize("case", [*CASES, case("wide_rows")], ids=str)
def test_one_pass_is_the_two_pass_route_bit_for_bit(backend, device, case, sparse):
    # A backend's one-pass block soft-threshold must give the bits of its own
    # soft-threshold (sparse) and row norms followed by its per-row scale, the route
    # every other backend takes.
    impl = backends.resolve(backend, device)
    if not hasattr(impl, "block_shrink_"):
        pytest.skip(f"the {backend} backend has no one-pass block soft-threshold")
    one_pass = [t.contiguous() for t in case.tensors(device)]
    if not one_pass or sum(row_counts(one_pass)) == 0:
        pytest.skip("no group")
    two_pass = [t.clone() for t in one_pass]
    acc_dtype = inspect(one_pass).acc_dtype
    gen = torch.Generator().manual_seed(3)
    l1_thresholds = None
    if sparse:  # per tensor, some 0; the one-pass kernel takes them per row
        per_tensor = (torch.rand(len(two_pass), generator=gen, dtype=F64) * 0.5).to(device, acc_dtype)
        per_tensor[::3] = 0
        impl.prox_l1_(two_pass, per_tensor)
        l1_thresholds = per_tensor.repeat_interleave(torch.tensor(row_counts(two_pass), device=device))
    norms = impl.reduce(two_pass, Reduction.L2, None, acc_dtype, rows=True)
    # Thresholds from 0 to twice each norm: groups kept whole, shrunk and zeroed.
    thresholds = (torch.rand(norms.shape, generator=gen, dtype=F64).to(device) * 2
                  * norms.nan_to_num(1.0, 1.0)).to(acc_dtype)
    thresholds[::7] = 0
    impl.scale_(two_pass, _shrink_factors(norms.clone(), thresholds.clone()), rows=True)
    impl.block_shrink_(one_pass, thresholds, l1_thresholds)
    for got, want in zip(one_pass, two_pass):  # the bits, signed zeros and NaNs included
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
    if any(t.numel() for t in one_pass):  # some group was zeroed
        assert any(bool((t == 0).any()) for t in one_pass if t.numel())


@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=dtype_id)
def test_one_pass_nan_and_inf(backend, device, dtype):
    impl = backends.resolve(backend, device)
    if not hasattr(impl, "block_shrink_"):
        pytest.skip(f"the {backend} backend has no one-pass block soft-threshold")
    params = [t.reshape(3, 3) for t in with_specials(device, dtype)]
    acc_dtype = F64 if dtype == F64 else F32
    expected = oracle_prox_group_lasso(params, 0.5, 0, scale_by_size=False)
    impl.block_shrink_(params, torch.full((3 * len(params),), 0.5, dtype=acc_dtype, device=device))
    assert_lists_close(params, expected, what="one-pass prox")
    assert bool(params[0][1].isnan().all())
