"""Forward-mode autodiff: dual tensors (torch.autograd.forward_ad) and torch.func.jvp give
the tangent of torch's own formulas, on every backend; transforms that regfuse cannot
follow (vmap, in-place updates of dual tensors) raise instead of dropping derivatives."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import regfuse
from cases import (F16, F32, F64, INF, NORM_IDS, NORM_KINDS, ORDER_IDS, ORDERS, assert_close, case,
                   oracle_group_norms, oracle_group_penalty, oracle_total_norm, result_dtype)

norm_kinds = pytest.mark.parametrize("p, squared", NORM_KINDS, ids=NORM_IDS)
orders = pytest.mark.parametrize("p", ORDERS, ids=ORDER_IDS)
CASE_NAMES = ["odd_sizes-f32", "zero_d-f64", "empty_and_zero-f32", "non_contiguous-f16", "mixed_dtypes"]
some_cases = pytest.mark.parametrize("name", CASE_NAMES)


def _tangents(tensors, seed: int = 7) -> list:
    """A tangent like each tensor (same dtype and strides), ``None`` for every third."""
    gen = torch.Generator().manual_seed(seed)
    tangents = []
    for i, t in enumerate(tensors):
        values = torch.randn(t.shape, generator=gen, dtype=F64)
        like = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        tangents.append(None if i % 3 == 2 else like.copy_(values))
    return tangents


def _dual_call(fn, tensors, tangents):
    """``fn`` of dual tensors: (primal, tangent) of its result."""
    with fwAD.dual_level():
        duals = [t if d is None else fwAD.make_dual(t, d) for t, d in zip(tensors, tangents)]
        out = fwAD.unpack_dual(fn(duals))
    return out.primal, out.tangent


def _oracle_tangent(fn64, tensors, tangents):
    """The tangent of ``fn64`` (plain torch ops) at the float64 inputs, by torch.func.jvp."""
    primals = tuple(t.detach().to(F64) for t in tensors)
    directions = tuple(torch.zeros_like(p) if d is None else d.to(F64) for p, d in zip(primals, tangents))
    return torch.func.jvp(lambda *xs: fn64(list(xs)), primals, directions)[1]


def _torch_norms(p, squared):
    def fn64(xs):
        if squared:
            return torch.stack([(x * x).sum() for x in xs])
        return torch.stack([torch.linalg.vector_norm(x, p) if x.numel() else x.new_full((), INF if p == -INF else 0.0)
                            for x in xs])
    return fn64


@norm_kinds
@some_cases
def test_norms_of_dual_tensors(backend, device, name, p, squared):
    tensors = case(name).tensors(device)
    tangents = _tangents(tensors)
    primal, tangent = _dual_call(lambda xs: regfuse.norms(xs, p, squared=squared, backend=backend),
                                 tensors, tangents)
    assert tangent is not None, "the tangent was dropped"
    assert tangent.dtype == primal.dtype == result_dtype(tensors)
    expected = _oracle_tangent(_torch_norms(p, squared), tensors, tangents)
    assert_close(tangent, expected, what=f"tangent p={p}")


@some_cases
def test_penalty_of_dual_tensors(backend, device, name):
    tensors = case(name).tensors(device)
    tangents = _tangents(tensors)
    c = [0.5 + i for i in range(len(tensors))]
    primal, tangent = _dual_call(
        lambda xs: regfuse.penalty(xs, 0.3, 0.7, coefficients=c, backend=backend), tensors, tangents)
    expected = _oracle_tangent(
        lambda xs: sum(ci * (0.3 * x.abs().sum() + 0.7 * (x * x).sum()) for ci, x in zip(c, xs)),
        tensors, tangents)
    assert tangent is not None, "the tangent was dropped"
    assert_close(tangent, expected, what="penalty tangent")


@orders
@some_cases
def test_total_norm_of_dual_tensors(backend, device, name, p):
    tensors = case(name).tensors(device)
    tangents = _tangents(tensors)
    primal, tangent = _dual_call(lambda xs: regfuse.total_norm(xs, p, backend=backend), tensors, tangents)
    expected = _oracle_tangent(lambda xs: oracle_total_norm(xs, p), tensors, tangents)
    assert tangent is not None, "the tangent was dropped"
    assert_close(tangent, expected.to(tangent.dtype), what=f"total norm tangent p={p}")


@pytest.mark.parametrize("p", [1, 2, 3, INF])
@pytest.mark.parametrize("dim", [0, -1])
@pytest.mark.parametrize("name", ["zero_groups-f32", "mixed_half", "zero_d-f64"])
def test_group_norms_of_dual_tensors(backend, device, name, p, dim):
    tensors = case(name).tensors(device)
    tangents = _tangents(tensors)
    primal, tangent = _dual_call(
        lambda xs: torch.cat(regfuse.group_norms(xs, dim=dim, p=p, backend=backend)), tensors, tangents)
    assert tangent is not None, "the tangent was dropped"
    expected = _oracle_tangent(lambda xs: torch.cat(oracle_group_norms(xs, dim, p)), tensors, tangents)
    assert_close(tangent, expected.to(tangent.dtype), what=f"group norms tangent p={p}")


@pytest.mark.parametrize("l1", [0.0, 0.2], ids=["group", "sparse_group"])
@pytest.mark.parametrize("name", ["zero_groups-f64", "mixed_half"])
def test_group_penalty_of_dual_tensors(backend, device, name, l1):
    tensors = case(name).tensors(device)
    tangents = _tangents(tensors)
    c = [0.5 + i for i in range(len(tensors))]
    primal, tangent = _dual_call(
        lambda xs: regfuse.group_penalty(xs, 0.3, l1=l1, coefficients=c, backend=backend), tensors, tangents)
    assert tangent is not None, "the tangent was dropped"
    expected = _oracle_tangent(lambda xs: oracle_group_penalty(xs, 0.3, 0, l1, True, c), tensors, tangents)
    assert_close(tangent, expected.to(tangent.dtype), what="group penalty tangent")


@pytest.mark.parametrize("p", [1, 2, 3, INF])
def test_torch_func_jvp(backend, device, p):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, 3, generator=gen, dtype=F64).to(device)
    y = torch.randn(4, generator=gen, dtype=F64).to(device)
    tx, ty = torch.randn_like(x), torch.randn_like(y)

    def ours(x, y):
        return regfuse.norms([x, y], p, backend=backend), regfuse.total_norm([x, y], p, backend=backend)

    def theirs(x, y):
        return (torch.stack([torch.linalg.vector_norm(x, p), torch.linalg.vector_norm(y, p)]),
                torch.linalg.vector_norm(torch.cat([x.flatten(), y]), p))

    got = torch.func.jvp(ours, (x, y), (tx, ty))
    expected = torch.func.jvp(theirs, (x, y), (tx, ty))
    for g, e, what in zip([*got[0], *got[1]], [*expected[0], *expected[1]],
                          ["norms", "total", "norms tangent", "total tangent"]):
        assert_close(g, e, what=what)


def test_dual_tensors_that_require_grad(backend, device):
    # Forward and reverse mode together: the tangent and the gradient are both right.
    x = torch.tensor([0.5, -2.0, 3.0], dtype=F64, device=device, requires_grad=True)
    t = torch.tensor([1.0, 0.25, -1.0], dtype=F64, device=device)
    with fwAD.dual_level():
        out = regfuse.penalty([fwAD.make_dual(x, t)], 0.5, 0.25, backend=backend)
        tangent = fwAD.unpack_dual(out).tangent
        out.backward()
    assert_close(tangent, (0.5 * torch.sign(x) + 0.5 * x).detach() @ t, what="tangent")
    assert_close(x.grad, 0.5 * torch.sign(x.detach()) + 0.5 * x.detach(), what="gradient")


@pytest.mark.parametrize("p", [2, 3])
def test_hessian_forward_over_reverse(backend, device, p):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, generator=gen, dtype=F64).to(device)
    ours = torch.func.hessian(lambda x: regfuse.total_norm([x, 2 * x[:2]], p, backend=backend))(x)
    theirs = torch.func.hessian(lambda x: torch.linalg.vector_norm(torch.cat([x, 2 * x[:2]]), p))(x)
    assert_close(ours, theirs, what="hessian")
    jac_fwd = torch.func.jacfwd(lambda x: regfuse.norms([x, x[1:]], p, backend=backend))(x)
    jac_rev = torch.func.jacrev(lambda x: regfuse.norms([x, x[1:]], p, backend=backend))(x)
    assert_close(jac_fwd, jac_rev, what="jacfwd vs jacrev")


@pytest.mark.parametrize("op", ["norms", "penalty", "total_norm", "group_norms", "group_penalty"])
def test_vmap_is_refused_clearly(backend, device, op):
    fn = {"norms": lambda x: regfuse.norms([x], backend=backend),
          "penalty": lambda x: regfuse.penalty([x], 0.5, backend=backend),
          "total_norm": lambda x: regfuse.total_norm([x], backend=backend),
          "group_norms": lambda x: regfuse.group_norms([x], backend=backend)[0],
          "group_penalty": lambda x: regfuse.group_penalty([x], 0.5, backend=backend)}[op]
    with pytest.raises(NotImplementedError, match="vmap"):
        torch.func.vmap(fn)(torch.randn(3, 4, device=device))


IN_PLACE = {
    "add_penalty_grad_": lambda params, backend: regfuse.add_penalty_grad_(params, 0.5, 0.5, backend=backend),
    "prox_l1_": lambda params, backend: regfuse.prox_l1_(params, 0.1, backend=backend),
    "prox_group_lasso_": lambda params, backend: regfuse.prox_group_lasso_(params, 0.1, backend=backend),
}


@pytest.mark.parametrize("op", IN_PLACE)
def test_in_place_ops_refuse_dual_tensors(backend, device, op):
    x = torch.tensor([0.5, -2.0, 3.0], device=device)
    before = x.clone()
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            IN_PLACE[op]([torch.ones(2, device=device), dual], backend)
    assert torch.equal(x, before)


def test_clip_grad_norm_refuses_dual_gradients(backend, device):
    p = torch.randn(3, device=device, requires_grad=True)
    grad = torch.tensor([3.0, 4.0, 0.0], device=device)
    with fwAD.dual_level():
        p.grad = fwAD.make_dual(grad, torch.ones_like(grad))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            regfuse.clip_grad_norm_(p, 1.0, backend=backend)
    assert torch.equal(grad, torch.tensor([3.0, 4.0, 0.0], device=device))


@pytest.mark.parametrize("op", IN_PLACE)
def test_in_place_ops_refuse_func_transforms(backend, device, op):
    def fn(x):
        y = x.clone()
        IN_PLACE[op]([y], backend)
        return y

    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.jvp(fn, (torch.randn(3, device=device),), (torch.randn(3, device=device),))


def test_dual_level_without_tangents_changes_nothing(backend, device):
    # Inside a dual level, tensors without tangents take the autograd.Function route: the
    # same values, and no tangent is invented.
    tensors = case("mixed_half").tensors(device)
    plain = regfuse.norms(tensors, backend=backend)
    with fwAD.dual_level():
        out = regfuse.norms(tensors, backend=backend)
        assert fwAD.unpack_dual(out).tangent is None
    assert torch.equal(out, plain)


def test_half_tangents_accumulate_in_float32(backend, device):
    x = torch.randn(300, device=device).to(F16)
    t = torch.randn(300, device=device).to(F16)
    primal, tangent = _dual_call(lambda xs: regfuse.norms(xs, 2, backend=backend), [x], [t])
    assert tangent.dtype == F32
    expected = (x.double() * t.double()).sum() / x.double().norm()
    assert_close(tangent, expected.reshape(1), what="float16 tangent")
