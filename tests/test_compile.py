"""The torch.library ops pass ``opcheck``, and ``torch.compile(fullgraph=True)`` traces
code calling ``regfuse.norms`` and ``regfuse.penalty`` (with backward) without a break."""
import pytest
import torch

import regfuse
from regfuse.backends.base import Reduction
from cases import F16, F64, assert_close, assert_lists_close, is_interpreted

def _sample(device, requires_grad: bool = True) -> list[torch.Tensor]:
    # Mixed dtypes, a 0-d and an empty tensor: the op schema takes any of them.
    shapes_dtypes = [((5,), torch.float32), ((2, 3), F16), ((), torch.float32), ((0,), F64), ((4,), F64)]
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(s, generator=gen, dtype=F64).to(device=device, dtype=d).requires_grad_(requires_grad)
            for s, d in shapes_dtypes]


def _weights(n: int, device) -> torch.Tensor:
    return torch.rand(2, n, dtype=F64, device=device)  # the sample accumulates in float64


@pytest.mark.parametrize("op", list(Reduction), ids=lambda op: op.name)
def test_opcheck_reduce(backend, device, op):
    tensors = _sample(device)
    weights = _weights(len(tensors), device) if op == Reduction.PENALTY else None
    p = 2.5 if op == Reduction.LP else 0.0  # the order, which only LP reads
    torch.library.opcheck(torch.ops.regfuse.reduce.default, (tensors, int(op), weights, backend, p))


def test_opcheck_reduce_backward(backend, device):
    tensors = _sample(device, requires_grad=False)
    n = len(tensors)
    norms = torch.rand(n, dtype=F64, device=device) + 0.5
    grad_norms = torch.rand(n, dtype=F64, device=device)
    grad_penalty = torch.tensor(1.5, dtype=F64, device=device)
    reduce_backward = torch.ops.regfuse.reduce_backward.default
    torch.library.opcheck(reduce_backward, (tensors, int(Reduction.L2), grad_norms, norms, None, backend))
    torch.library.opcheck(reduce_backward, (tensors, int(Reduction.PENALTY), grad_penalty, None,
                                            _weights(n, device), backend))


def test_opcheck_in_place_ops(backend, device):
    tensors = _sample(device, requires_grad=False)
    grads = [torch.randn_like(t) for t in tensors]
    weights = _weights(len(tensors), device)
    torch.library.opcheck(torch.ops.regfuse.add_grad_.default, (grads, tensors, weights, backend))
    thresholds = torch.rand(len(tensors), dtype=F64, device=device)
    params = [t.clone() for t in tensors]
    torch.library.opcheck(torch.ops.regfuse.prox_l1_.default, (params, thresholds, backend))
    factors = torch.rand(len(tensors), dtype=F64, device=device)
    factors[1] = 1.0  # a tensor left untouched
    torch.library.opcheck(torch.ops.regfuse.scale_.default, ([t.clone() for t in tensors], factors, backend))


def _loss(params: list[torch.Tensor], backend: str, coefficients=None) -> torch.Tensor:
    penalty = regfuse.penalty(params, 1e-2, 1e-3, coefficients=coefficients, backend=backend)
    l2_norms = regfuse.norms(params, 2, backend=backend)
    return penalty + l2_norms.sum() + regfuse.norms(params, 1, backend=backend)[0]


def _check_compiled_matches_eager(backend: str, device, coefficients=None) -> None:
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(6)
    eager = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in [(7, 3), (4,), ()]]
    compiled = [p.detach().clone().requires_grad_() for p in eager]

    expected = _loss(eager, backend, coefficients)
    expected.backward()
    # fullgraph=True: any graph break is an error.
    got = torch.compile(_loss, fullgraph=True)(compiled, backend, coefficients)
    got.backward()

    assert_close(got, expected, what="compiled loss")
    assert_lists_close([p.grad for p in compiled], [p.grad for p in eager], what="compiled grad")


@pytest.mark.slow
def test_compile_fullgraph_with_backward(backend, device):
    # Compiling takes tens of seconds on a small CPU machine: one compile per backend, and
    # none for the Triton interpreter, which nobody compiles for.
    if is_interpreted(backend, device):
        pytest.skip("torch.compile is not checked through the Triton interpreter")
    _check_compiled_matches_eager(backend, device)


@pytest.mark.slow
def test_compile_fullgraph_with_coefficients(device):
    # One backend suffices: the coefficients are checked and scaled before any backend runs.
    _check_compiled_matches_eager("reference", device, coefficients=[1.0, 0.5, 2.0])


@pytest.mark.slow
def test_compile_total_norm_fullgraph_and_clip(device):
    # total_norm traces without a break (general p included), backward too; clip_grad_norm_
    # compiles with a break at the aliasing check of its in-place scale, and clips right.
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(7)
    eager = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in [(7, 3), (4,), ()]]
    compiled = [p.detach().clone().requires_grad_() for p in eager]

    def norms_loss(params):
        return regfuse.total_norm(params, backend="cpu" if device.type == "cpu" else "auto") + \
            regfuse.total_norm(params, 3) + regfuse.norms(params, 0.5).sum()

    expected = norms_loss(eager)
    expected.backward()
    got = torch.compile(norms_loss, fullgraph=True)(compiled)
    got.backward()
    assert_close(got, expected, what="compiled total norms")
    assert_lists_close([p.grad for p in compiled], [p.grad for p in eager], what="compiled grad")

    reference = [p.detach().clone().requires_grad_() for p in eager]
    for r, p in zip(reference, compiled):
        r.grad = p.grad.clone()
    total = torch.compile(lambda params: regfuse.clip_grad_norm_(params, 0.5))(compiled)
    assert_close(total, torch.nn.utils.clip_grad_norm_(reference, 0.5), what="compiled clip norm")
    assert_lists_close([p.grad for p in compiled], [r.grad for r in reference], what="compiled clip")


def _group_sample(device) -> list[torch.Tensor]:
    # Rows of a matrix, elements of a 1-D tensor, a 0-d tensor and a tensor without rows.
    gen = torch.Generator().manual_seed(7)
    shapes_dtypes = [((3, 4), torch.float32), ((5,), F16), ((), torch.float32), ((0, 2), F64), ((2, 3), F64)]
    return [torch.randn(s, generator=gen, dtype=F64).to(device=device, dtype=d).requires_grad_()
            for s, d in shapes_dtypes]


@pytest.mark.parametrize("op", [Reduction.L1, Reduction.L2, Reduction.INF, Reduction.LP, Reduction.L1_L2],
                         ids=lambda op: op.name)
def test_opcheck_reduce_over_rows(backend, device, op):
    p = 3.0 if op == Reduction.LP else 0.0
    torch.library.opcheck(torch.ops.regfuse.reduce.default,
                          (_group_sample(device), int(op), None, backend, p, True))


def test_opcheck_reduce_backward_and_scale_over_rows(backend, device):
    tensors = [t.detach() for t in _group_sample(device)]
    rows = sum(t.shape[0] if t.dim() else 1 for t in tensors)
    norms = torch.rand(2, rows, dtype=F64, device=device) + 0.5
    grad_out = torch.rand(2, rows, dtype=F64, device=device)
    torch.library.opcheck(torch.ops.regfuse.reduce_backward.default,
                          (tensors, int(Reduction.L1_L2), grad_out, norms, None, backend, True))
    torch.library.opcheck(torch.ops.regfuse.reduce_backward.default,
                          (tensors, int(Reduction.L2), grad_out[1], norms[1], None, backend, True))
    factors = torch.rand(rows, dtype=F64, device=device)
    torch.library.opcheck(torch.ops.regfuse.scale_.default, ([t.clone() for t in tensors], factors, backend, True))


def _group_loss(params: list[torch.Tensor], backend: str) -> torch.Tensor:
    norms = regfuse.group_norms(params, dim=-1, backend=backend)
    return regfuse.group_penalty(params, 1e-2, l1=1e-3, backend=backend) + sum(n.sum() for n in norms)


@pytest.mark.slow
def test_compile_fullgraph_group_ops(device):
    # One backend suffices for the graph: the group ops reach the backends through the
    # same custom ops as the others, with rows=True.
    backend = regfuse.available_backends(device)[0]
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(8)
    eager = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in [(6, 3, 2), (4,), ()]]
    compiled = [p.detach().clone().requires_grad_() for p in eager]
    expected = _group_loss(eager, backend)
    expected.backward()
    got = torch.compile(_group_loss, fullgraph=True)(compiled, backend)
    got.backward()
    assert_close(got, expected, what="compiled group loss")
    assert_lists_close([p.grad for p in compiled], [p.grad for p in eager], what="compiled grad")
