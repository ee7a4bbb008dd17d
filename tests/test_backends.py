"""The backend registry, ``backend="auto"``, determinism and float32 accuracy."""
import os
import subprocess
import sys
from pathlib import Path

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


def test_resolution_is_decided_once_failures_included(monkeypatch):
    # A backend that cannot run is asked once per device type, not on every call
    # (a failed Triton import would otherwise be retried by every "auto" call).
    from regfuse.backends import triton as triton_backend
    asked = []

    def unavailable(device):
        asked.append(device.type)
        return "no Triton here"

    backends.forget()
    monkeypatch.setattr(triton_backend, "unavailable_reason", unavailable)
    try:
        for _ in range(3):
            assert "triton" not in regfuse.available_backends("cpu")
            assert backends.resolve("auto", torch.device("cpu")).name == regfuse.available_backends("cpu")[0]
            assert backends.unavailable_reason("triton", torch.device("cpu")) == "no Triton here"
        assert asked == ["cpu"]
        with pytest.raises(RuntimeError, match="no Triton here"):
            backends.resolve("triton", torch.device("cpu"))
    finally:
        backends.forget()


def test_a_missing_extension_warns_once_with_the_fix():
    # A checkout without a build: the import says so once, and the reference backend runs.
    code = ("import sys, warnings; sys.modules['regfuse._C'] = None; warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    import regfuse, regfuse.api, importlib\n"
            "print(len([w for w in caught if 'regfuse._C cannot be imported' in str(w.message)]))\n"
            "print([str(w.message) for w in caught if 'regfuse._C' in str(w.message)][0])\n"
            "print(regfuse.available_backends('cpu'), float(regfuse.norms(regfuse.api.torch.ones(4))))\n")
    root = Path(regfuse.__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    env.pop("TRITON_INTERPRET", None)  # no Triton interpreter: only what the import leaves
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=env, cwd=root, check=True).stdout.splitlines()
    assert out[0] == "1"
    assert "source checkout" in out[1] and "pip install --no-build-isolation -e ." in out[1]
    assert out[2] == "['reference'] 2.0"


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
