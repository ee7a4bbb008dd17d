"""The backend registry, ``backend="auto"``, determinism and float32 accuracy."""
import pytest
import torch

import regfuse
from regfuse import backends
from cases import F32, F64, assert_bitwise_equal, case, is_interpreted


def test_reference_is_always_available(device):
    assert "reference" in regfuse.available_backends(device)
    assert backends.unavailable_reason("reference", device) is None


def test_available_backends_can_run(device):
    names = regfuse.available_backends(device)
    assert names and len(set(names)) == len(names)
    for name in names:
        assert name in backends.NAMES
        assert backends.unavailable_reason(name, device) is None


def test_auto_picks_the_first_available(device):
    assert backends.resolve("auto", device) is backends.resolve(regfuse.available_backends(device)[0], device)


def test_unknown_backend_name_is_refused():
    with pytest.raises(ValueError, match="unknown backend"):
        backends.unavailable_reason("fastest", torch.device("cpu"))


def test_auto_gives_the_same_bits_as_the_backend_it_picks(device):
    tensors = case("mixed_dtypes").tensors(device)
    chosen = regfuse.available_backends(device)[0]
    for p in (1, 2, float("inf")):
        assert_bitwise_equal(regfuse.norms(tensors, p), regfuse.norms(tensors, p, backend=chosen), f"p={p}")
    assert_bitwise_equal(regfuse.penalty(tensors, 0.3, 0.2),
                         regfuse.penalty(tensors, 0.3, 0.2, backend=chosen))


def _every_result(tensors: list[torch.Tensor], backend: str) -> list[torch.Tensor]:
    """Everything the four ops produce on ``tensors`` (which stay unmodified)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = [regfuse.norms(tensors, p, backend=backend) for p in (1, 2, float("inf"))]
    out.append(regfuse.norms(tensors, 2, squared=True, backend=backend))
    loss = regfuse.penalty(leaves, 0.3, 0.2, coefficients=[0.5 + i % 3 for i in range(len(leaves))],
                           backend=backend)
    loss.backward()
    out += [loss] + [t.grad for t in leaves]
    regfuse.add_penalty_grad_(leaves, 0.1, 0.7, backend=backend)
    out += [t.grad for t in leaves]
    regfuse.prox_l1_(leaves, 0.4, backend=backend)
    return out + [t.detach() for t in leaves]


@pytest.mark.parametrize("name", ["odd_sizes-f32", "mixed_half", "many_chunks-bf16", "many_tiny-f32"])
def test_deterministic(backend, device, name, skip_if_too_big):
    tensors = case(name).tensors(device)
    skip_if_too_big(tensors)
    first, second = _every_result(tensors, backend), _every_result(tensors, backend)
    for i, (a, b) in enumerate(zip(first, second)):
        assert_bitwise_equal(a, b, what=f"result {i}")


@pytest.mark.slow
def test_float32_accuracy_on_4m_elements(backend, device):
    """Fused float32 accumulation must stay within 1e-6 of float64 on 4M elements."""
    if is_interpreted(backend, device):
        pytest.skip("4M elements is too slow for the Triton interpreter")
    if backend == "reference":
        pytest.skip("the bound is for the fused kernels; the reference runs torch's own reductions")
    gen = torch.Generator().manual_seed(4)
    x = (torch.rand(4 * 2**20, generator=gen, dtype=F64) + 0.5).to(device=device, dtype=F32)
    tensors, exact = [x], [x.to(F64)]
    checks = {
        "l1": (regfuse.norms(tensors, 1, backend=backend), regfuse.norms(exact, 1, backend="reference")),
        "l2": (regfuse.norms(tensors, 2, backend=backend), regfuse.norms(exact, 2, backend="reference")),
        "squared": (regfuse.norms(tensors, 2, squared=True, backend=backend),
                    regfuse.norms(exact, 2, squared=True, backend="reference")),
        "penalty": (regfuse.penalty(tensors, 0.5, 0.25, backend=backend),
                    regfuse.penalty(exact, 0.5, 0.25, backend="reference")),
    }
    for what, (got, expected) in checks.items():
        assert got.dtype == F32
        relative = ((got.double() - expected) / expected).abs().max().item()
        assert relative < 1e-6, f"{what}: relative error {relative:.2e} against float64"
