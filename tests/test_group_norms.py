"""regfuse.group_norms against torch.linalg.vector_norm of every slice, in float64."""
import math

import pytest
import torch

import regfuse
from cases import (BF16, CASES, F16, F32, F64, assert_close, assert_lists_close, case, dtype_id,
                   is_interpreted, oracle_group_norm_grads, oracle_group_norms, result_dtype,
                   with_specials)

P_VALUES = pytest.mark.parametrize("p", [1, 2, 3, math.inf], ids=["l1", "l2", "l3", "linf"])
all_cases = pytest.mark.parametrize("case", CASES, ids=str)
# dim=-1 is valid for every tensor of every case (0-d included) and is not dim 0 for any
# tensor of two or more dimensions: the movedim route.
DIMS = pytest.mark.parametrize("dim", [0, -1])


@P_VALUES
@DIMS
@all_cases
def test_values(backend, device, case, p, dim, skip_if_too_many_groups):
    tensors = case.tensors(device)
    skip_if_too_many_groups(tensors, dim)
    out = regfuse.group_norms(tensors, dim=dim, p=p, backend=backend)
    expected = oracle_group_norms(tensors, dim, p)
    assert [tuple(g.shape) for g in out] == [tuple(e.shape) for e in expected]
    assert all(g.dtype == result_dtype(tensors) and g.device == device for g in out)
    assert_lists_close(out, expected, what="group norms")


@P_VALUES
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_each_norm_is_that_of_a_select(backend, device, p, dim):
    # Straight from the definition, one slice at a time (the oracle above is vectorized).
    tensors = [t for t in case("zero_groups-f64").tensors(device) if t.dim() >= 2]
    out = regfuse.group_norms(tensors, dim=dim, p=p, backend=backend)
    for norms, t in zip(out, tensors):
        expected = [torch.linalg.vector_norm(t.select(dim, j), p) if t.select(dim, j).numel()
                    else torch.zeros((), dtype=F64, device=device) for j in range(t.shape[dim])]
        assert_close(norms, torch.stack(expected) if expected else norms.new_zeros(0), what="select")


def test_results_are_views_of_one_buffer(backend, device):
    tensors = case("zero_groups-f32").tensors(device)
    out = regfuse.group_norms(tensors, backend=backend)
    storages = {g.untyped_storage().data_ptr() for g in out}
    assert len(storages) == 1 and all(g._base is not None for g in out)


@P_VALUES
@DIMS
@all_cases
def test_gradients(backend, device, case, p, dim, skip_if_too_many_groups):
    leaves = case.leaves(device)
    skip_if_too_many_groups(leaves, dim)
    out = regfuse.group_norms(leaves, dim=dim, p=p, backend=backend)
    assert_lists_close(out, oracle_group_norms(leaves, dim, p), what="group norms (with grad)")
    # Distinct upstream gradients per group catch a gradient routed to the wrong group.
    grad_outs = [torch.linspace(0.5, 2.0, len(g), dtype=g.dtype, device=device) for g in out]
    if not any(g.requires_grad for g in out):
        pytest.skip("no group to differentiate")
    torch.autograd.backward([g for g in out if len(g)], [w for w in grad_outs if len(w)])
    expected = oracle_group_norm_grads(leaves, dim, p, grad_outs)
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    assert [g.dtype for g in grads] == [t.dtype for t in leaves]
    assert_lists_close(grads, expected, what="grad")


def _small_float64(device, zero_group: bool = False):
    """Tiny float64 leaves: a conv-like weight, a matrix, 0-d, 1-D, empty and groupless."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(3, 2, 2), (2, 3), (), (3,), (2, 0), (0, 2)]
    tensors = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    if zero_group:
        tensors[0][1] = 0
    return tuple(t.to(device).requires_grad_() for t in tensors)


@P_VALUES
@pytest.mark.parametrize("dim", [0, -1, 1], ids=["dim0", "dim-1", "dim1"])
def test_gradcheck_and_gradgradcheck(backend, device, p, dim):
    inputs = _small_float64(device)
    if dim == 1:  # every tensor must have the dim: leave out the 0-d and 1-D ones
        inputs = tuple(t for t in inputs if t.dim() >= 2)

    def fn(*tensors):
        return torch.cat(regfuse.group_norms(tensors, dim=dim, p=p, backend=backend))

    fast = is_interpreted(backend, device)  # a random projection of the Jacobian there
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast)


def test_all_zero_group_has_norm_and_gradient_zero(backend, device):
    inputs = _small_float64(device, zero_group=True)
    norms = regfuse.group_norms(inputs, backend=backend)
    assert norms[0][1].item() == 0.0
    # gradcheck through the kink is meaningless; the subgradient 0 is the convention.
    torch.cat(norms).sum().backward()
    assert torch.equal(inputs[0].grad[1], torch.zeros_like(inputs[0][1]))
    assert bool((inputs[0].grad[0] != 0).any())


@P_VALUES
@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=dtype_id)
def test_nan_and_inf_propagate_like_vector_norm(backend, device, p, dtype):
    # Each special value alone in its own group of a 2-D tensor, as rows of 3.
    tensors = [t.reshape(3, 3) for t in with_specials(device, dtype)]
    out = regfuse.group_norms(tensors, p=p, backend=backend)
    expected = oracle_group_norms(tensors, 0, p)
    assert bool(torch.cat(expected).isnan().any()) and bool(torch.cat(expected).isinf().any())
    assert_lists_close(out, expected, what="group norms with NaN/Inf")


def test_equals_the_loop_people_write(backend, device):
    convs = [torch.randn(8, 3, 3, 3, device=device), torch.randn(16, 8, 1, 1, device=device),
             torch.randn(10, 16, device=device)]
    for p in (1, 2, math.inf):
        loop = [w.flatten(1).norm(p=p, dim=1) for w in convs]
        assert_lists_close(regfuse.group_norms(convs, p=p, backend=backend), loop, what=f"p={p}")
    per_input_feature = [w.transpose(0, 1).flatten(1).norm(dim=1) for w in convs]
    assert_lists_close(regfuse.group_norms(convs, dim=1, backend=backend), per_input_feature, what="dim=1")


def test_accepts_any_iterable(backend, device):
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3)).to(device)
    expected = oracle_group_norms(list(model.parameters()), 0, 2)
    assert_lists_close(regfuse.group_norms(model.parameters(), backend=backend), expected, what="generator")


def test_empty_list_gives_empty_list(backend):
    assert regfuse.group_norms([], backend=backend) == []


def test_bad_arguments_are_refused(backend, device):
    tensors = [torch.randn(4, 3, device=device), torch.randn(5, device=device)]
    with pytest.raises(IndexError, match="tensor 1 of shape"):
        regfuse.group_norms(tensors, dim=1, backend=backend)
    with pytest.raises(IndexError, match="out of range"):
        regfuse.group_norms([torch.randn((), device=device)], dim=1, backend=backend)
    with pytest.raises(TypeError, match="integer"):
        regfuse.group_norms(tensors, dim=0.0, backend=backend)
    with pytest.raises(ValueError, match="unsupported p"):
        regfuse.group_norms(tensors, p=-1, backend=backend)
    with pytest.raises(TypeError):
        regfuse.group_norms([torch.ones(3, dtype=torch.int64, device=device)], backend=backend)
    assert len(regfuse.group_norms([torch.randn((), device=device)], dim=-1, backend=backend)[0]) == 1
