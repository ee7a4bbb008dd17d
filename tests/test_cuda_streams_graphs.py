"""On a GPU: a training step never synchronizes with the host, cached tables and weights
are safe on any stream, and the ops can be captured in a CUDA graph and replayed after
the caches have moved on. Skipped where there is no CUDA device.

What could go wrong without the hardening (regfuse/device_cache.py): a cache miss
uploading from pageable memory stalls the step; a table cached on one stream and used on
another is freed on eviction and its block handed out again while a kernel on the other
stream still reads it; a captured kernel replays with the address of an evicted table.
The checks below make those hazards observable: kernels are held back behind a GPU sleep
while the caches are flushed and the freed memory is overwritten with zeros (a table of
zeros reads nothing, so a stale read shows as a wrong result rather than a crash).
"""
import math

import pytest
import torch

import regfuse
from cases import (F16, F32, F64, assert_close, assert_lists_close, max_abs, oracle_norms,
                   oracle_penalty, oracle_penalty_grads, oracle_prox)
from regfuse import backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

L1, L2, THRESHOLD = 0.5, 0.25, 0.125
CUDA = torch.device("cuda")


@pytest.fixture(params=backends.NAMES)
def cuda_backend(request) -> str:
    """Each backend that runs CUDA tensors here."""
    reason = backends.unavailable_reason(request.param, CUDA)
    if reason is not None:
        pytest.skip(f"backend {request.param!r} unavailable on cuda: {reason}")
    return request.param


def _params(seed: int, sizes=(37, 40_000, 3_000, 5), half_sizes=(1_000, 17)) -> list[torch.Tensor]:
    """Leaves on the GPU: several chunks, sizes that are not multiples of 16 bytes, float16."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(s, F32) for s in sizes] + [(s, F16) for s in half_sizes]
    return [torch.randn(s, generator=gen, dtype=F64).to(device=CUDA, dtype=d).requires_grad_()
            for s, d in shapes]


def _coefficients(n: int, offset: float) -> list[float]:
    return [offset + 0.125 * i for i in range(n)]


def _flush_caches_and_overwrite_freed_memory(backend: str) -> list[torch.Tensor]:
    """Pushes every evictable cache entry out (more new lists than any cache holds), then
    fills small freed blocks with zeros. Returns the filler, to keep it alive."""
    for i in range(100):
        tensors = [torch.zeros(8 + i, device=CUDA)]
        regfuse.norms(tensors, backend=backend)
        regfuse.penalty(tensors, L1, L2, coefficients=[1.0 + i], backend=backend)
        regfuse.prox_l1_(tensors, 0.5 + i, backend=backend)
    return [torch.zeros(size, dtype=torch.int64, device=CUDA)
            for size in (64, 128, 256, 512, 1024) for _ in range(200)]


def _step(params: list[torch.Tensor], backend: str, coefficients: list[float]) -> torch.Tensor:
    """What a training step calls: norms, a penalty with its backward, the in-place ops."""
    loss = regfuse.penalty(params, L1, L2, coefficients=coefficients, backend=backend)
    loss = loss + regfuse.norms(params, 2, backend=backend).sum() + regfuse.norms(params, 1, backend=backend).sum()
    loss = loss + regfuse.norms(params, math.inf, backend=backend).sum()
    loss.backward()
    regfuse.add_penalty_grad_(params, L1, L2, coefficients=coefficients, backend=backend)
    regfuse.prox_l1_(params, THRESHOLD, coefficients=coefficients, backend=backend)
    return loss.detach()


def test_no_host_synchronization_on_new_lists_and_numbers(cuda_backend):
    _step(_params(seed=0), cuda_backend, _coefficients(6, 1.0))  # compiles, initializes
    torch.cuda.synchronize()
    # Cache misses everywhere: new tensors (new addresses, another length) and
    # coefficients never seen before, as Python numbers.
    params = _params(seed=1, sizes=(37, 50_000, 9, 4_096, 33), half_sizes=(2_000,))
    values = [p.detach().clone() for p in params]
    coefficients = _coefficients(len(params), 2.5)
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        loss = _step(params, cuda_backend, coefficients)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = (oracle_penalty(values, L1, L2, coefficients)
                + sum(oracle_norms(values, p).sum().cpu() for p in (2, 1, math.inf)))
    assert_close(loss, expected.to(loss.dtype), what="loss")


def test_cached_buffers_are_safe_on_another_stream(cuda_backend):
    params = _params(seed=2)
    coefficients = _coefficients(len(params), 0.5)
    for p in params:
        p.grad = torch.zeros_like(p)
    values = [p.detach().clone() for p in params]
    with torch.no_grad():  # cached on the default stream first
        regfuse.norms(params, backend=cuda_backend)
        regfuse.penalty(params, L1, L2, coefficients=coefficients, backend=cuda_backend)
        regfuse.add_penalty_grad_(params, L1, L2, coefficients=coefficients, backend=cuda_backend)
    for p in params:
        p.grad.zero_()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time: what follows runs late
        norms = regfuse.norms(params, backend=cuda_backend)
        penalty = regfuse.penalty(params, L1, L2, coefficients=coefficients, backend=cuda_backend)
        regfuse.add_penalty_grad_(params, L1, L2, coefficients=coefficients, backend=cuda_backend)
    filler = _flush_caches_and_overwrite_freed_memory(cuda_backend)  # meanwhile, on the default stream
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    del filler

    assert_close(norms, oracle_norms(values, 2).to(norms.dtype), what="norms")
    assert_close(penalty, oracle_penalty(values, L1, L2, coefficients).to(penalty.dtype), what="penalty")
    assert_lists_close([p.grad for p in params], oracle_penalty_grads(values, L1, L2, coefficients),
                       what="grad")


def _graph_step(params, backend, coefficients):
    norms = regfuse.norms(params, 2, backend=backend)
    penalty = regfuse.penalty(params, L1, L2, coefficients=coefficients, backend=backend)
    grads = torch.autograd.grad(penalty, params)
    with torch.no_grad():
        regfuse.add_penalty_grad_(params, L1, L2, coefficients=coefficients, backend=backend)
        regfuse.prox_l1_(params, THRESHOLD, coefficients=coefficients, backend=backend)
    return norms.detach(), penalty.detach(), grads


def _check_replays(graph, outputs, params, coefficients, backend, seed: int) -> None:
    """Flushes the caches, then twice: new values into the captured tensors, replay, and
    every output must follow the new values."""
    filler = _flush_caches_and_overwrite_freed_memory(backend)
    gen = torch.Generator().manual_seed(seed)
    norms, penalty, grads = outputs
    for replay in range(2):
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
                p.grad.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
        values = [p.detach().clone() for p in params]
        old_grads = [p.grad.clone() for p in params]
        graph.replay()
        torch.cuda.synchronize()
        what = f"replay {replay}"
        terms = oracle_penalty_grads(values, L1, L2, coefficients)
        assert_close(norms, oracle_norms(values, 2).to(norms.dtype), what=f"{what}: norms")
        assert_close(penalty, oracle_penalty(values, L1, L2, coefficients).to(penalty.dtype),
                     what=f"{what}: penalty")
        assert_lists_close(grads, terms, what=f"{what}: autograd grad")
        assert_lists_close([p.grad for p in params], [g.to(F64) + t for g, t in zip(old_grads, terms)],
                           what=f"{what}: add_penalty_grad_",
                           magnitudes=[max(max_abs(g), max_abs(t)) for g, t in zip(old_grads, terms)])
        assert_lists_close([p.detach() for p in params], oracle_prox(values, THRESHOLD, coefficients),
                           what=f"{what}: prox_l1_")
    del filler


def test_cuda_graph_after_warm_up_on_a_side_stream(cuda_backend):
    params = _params(seed=3)
    for p in params:
        p.grad = torch.zeros_like(p)
    coefficients = _coefficients(len(params), 0.75)
    side = torch.cuda.Stream()  # the warm-up torch's CUDA-graph docs ask for
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _graph_step(params, cuda_backend, coefficients)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _graph_step(params, cuda_backend, coefficients)
    _check_replays(graph, outputs, params, coefficients, cuda_backend, seed=4)


def test_cuda_graph_of_a_list_first_seen_during_capture(cuda_backend):
    # Compile and initialize with another list, so that only this list's tables and
    # weights are new during capture (as for activations captured by forward hooks).
    warm = _params(seed=5)
    for p in warm:
        p.grad = torch.zeros_like(p)
    _graph_step(warm, cuda_backend, _coefficients(len(warm), 0.25))
    torch.cuda.synchronize()

    params = _params(seed=6, sizes=(41, 20_000, 7))
    for p in params:
        p.grad = torch.zeros_like(p)
    coefficients = _coefficients(len(params), 1.375)  # numbers not seen before either
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _graph_step(params, cuda_backend, coefficients)
    _check_replays(graph, outputs, params, coefficients, cuda_backend, seed=7)


def _norm_lists() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two lists of many chunks each, with different norms."""
    gen = torch.Generator().manual_seed(8)
    return ([torch.randn(300_000, generator=gen).to(CUDA), torch.randn(70_000, generator=gen).to(CUDA)],
            [3 * torch.randn(500_000, generator=gen).to(CUDA)])


def test_reductions_at_once_on_two_streams(cuda_backend):
    """A reduction is one launch whose last block finishes (a device counter): launches
    running at once on two streams must not share a counter."""
    lists = _norm_lists()
    want = [oracle_norms(tensors, 2) for tensors in lists]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    results: list[list[torch.Tensor]] = [[], []]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    for _ in range(20):
        for k, s in enumerate(streams):
            with torch.cuda.stream(s):
                results[k].append(regfuse.norms(lists[k], backend=cuda_backend))
    for s in streams:
        torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    for k in range(2):
        for i, got in enumerate(results[k]):
            assert_close(got, want[k].to(got.dtype), what=f"stream {k}, call {i}")


def test_two_graphs_of_one_capture_stream_replayed_at_once(cuda_backend):
    """torch.cuda.graph captures every graph on one stream by default: two such graphs
    replayed at once on two streams must not share a reduction counter either."""
    lists = _norm_lists()
    for tensors in lists:  # warm-up: tables cached, kernels compiled
        regfuse.norms(tensors, backend=cuda_backend)
    torch.cuda.synchronize()
    graphs, outputs = [], []
    for tensors in lists:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs.append(regfuse.norms(tensors, backend=cuda_backend))
        graphs.append(graph)
    want = [oracle_norms(tensors, 2) for tensors in lists]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for replay in range(20):
        for s in streams:
            s.wait_stream(torch.cuda.current_stream())
        for graph, s in zip(graphs, streams):
            with torch.cuda.stream(s):
                graph.replay()
        for s in streams:
            torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        for k in range(2):
            assert_close(outputs[k], want[k].to(outputs[k].dtype), what=f"graph {k}, replay {replay}")
