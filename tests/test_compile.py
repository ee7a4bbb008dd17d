"""The torch.library ops pass ``opcheck``, and ``torch.compile(fullgraph=True)`` traces
every public function (with backward) without a graph break or a Dynamo warning, with
the results of eager mode, up to a whole training step (forward, loss with a penalty,
backward, the in-place gradient penalty, clipping, an update and the proximal steps)."""
import contextlib
import copy
import logging
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

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


@contextlib.contextmanager
def _one_graph_and_no_warning():
    """Asserts that what is compiled inside is traced as graphs without any break (also
    where fullgraph=True is not given) and that neither Dynamo nor regfuse warns."""
    counters.clear()
    logged: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: logged.append(record.getMessage())
    dynamo_log = logging.getLogger("torch._dynamo")
    dynamo_log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        dynamo_log.removeHandler(handler)
    assert not logged, f"Dynamo logged warnings: {logged}"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    # torch's own deprecation notice, raised while it imports its compiler backends.
    ours = [str(w.message) for w in caught if "torch.jit.script_method" not in str(w.message)]
    assert not ours, f"warnings while compiling: {ours}"


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
    with _one_graph_and_no_warning():
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
def test_compile_total_norm_fullgraph(device):
    # total_norm traces without a break (general p, one tensor, a generator), backward too.
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(7)
    eager = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in [(7, 3), (4,), ()]]
    compiled = [p.detach().clone().requires_grad_() for p in eager]

    def norms_loss(params):
        return regfuse.total_norm(params, backend="cpu" if device.type == "cpu" else "auto") + \
            regfuse.total_norm(iter(params), 3) + regfuse.norms(params, 0.5).sum() + \
            regfuse.norms(params[0], 1)[0]

    expected = norms_loss(eager)
    expected.backward()
    with _one_graph_and_no_warning():
        got = torch.compile(norms_loss, fullgraph=True)(compiled)
        got.backward()
    assert_close(got, expected, what="compiled total norms")
    assert_lists_close([p.grad for p in compiled], [p.grad for p in eager], what="compiled grad")


def _training_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """One step as training code writes it, every in-place utility of regfuse included."""
    loss = torch.nn.functional.mse_loss(model(x), y) + regfuse.penalty(model.parameters(), 1e-2, 1e-3)
    loss.backward()
    params = list(model.parameters())
    regfuse.add_penalty_grad_(params, 1e-3, coefficients=[1.0, 0.0, 2.0, 0.5])
    logged = regfuse.grad_norms(model)  # before clipping, as Lightning logs them
    norm = regfuse.clip_grad_norm_(model.parameters(), 0.1)
    single = regfuse.clip_grad_norm_(params[1], 0.01)  # one tensor, as torch takes it
    stage_norm = regfuse.total_norm([p.grad for p in params[2:]])
    regfuse.clip_grads_with_norm_(params[2:], 0.005, stage_norm)
    with torch.no_grad():  # SGD: torch.optim's step() breaks the graph on purpose (_use_grad)
        torch._foreach_add_(params, [p.grad for p in params], alpha=-0.5)
    regfuse.prox_l1_(params, 1e-3)
    regfuse.prox_group_lasso_(params[::2], 1e-2)
    for p in params:
        p.grad = None
    return loss.detach(), norm, single, stage_norm, logged["grad_2.0_norm_total"], logged["grad_2.0_norm/0.weight"]


@pytest.mark.slow
def test_compile_a_whole_training_step_fullgraph(device):
    # Forward, loss + penalty, backward, add_penalty_grad_, grad_norms, clip_grad_norm_,
    # clip_grads_with_norm_, an update, prox_l1_ and prox_group_lasso_ in one graph; two steps (the second reuses the graph),
    # parameters equal to eager's after each.
    torch._dynamo.reset()
    torch.manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).to(device)
    twin = copy.deepcopy(model)
    x, y = torch.randn(5, 4, device=device), torch.randn(5, 2, device=device)
    # Dynamo traces loss.backward() only with trace_autograd_ops (else it breaks the graph).
    with torch._dynamo.config.patch(trace_autograd_ops=True), _one_graph_and_no_warning():
        step = torch.compile(_training_step, fullgraph=True)
        for k in range(2):
            got, expected = step(model, x, y), _training_step(twin, x, y)
            assert_lists_close(list(got), list(expected), what=f"step {k}: loss and norms")
            assert_lists_close([p.detach() for p in model.parameters()],
                               [p.detach() for p in twin.parameters()], what=f"step {k}: parameters")
    assert counters["stats"]["unique_graphs"] == 1


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
    with _one_graph_and_no_warning():
        got = torch.compile(_group_loss, fullgraph=True)(compiled, backend)
        got.backward()
    assert_close(got, expected, what="compiled group loss")
    assert_lists_close([p.grad for p in compiled], [p.grad for p in eager], what="compiled grad")
