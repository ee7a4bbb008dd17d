"""regfuse.grad_norms / weight_norms: Lightning's ``grad_norm`` dict from one fused launch.

Checked against a per-parameter torch loop (always) and against
``lightning.pytorch.utilities.grad_norm`` itself where Lightning is installed: same keys
in the same order, same value types, dtypes and devices, same values up to the summation
order.
"""
import importlib.util
import math

import pytest
import torch
from torch import nn

import regfuse
import regfuse.norm_logging

ORDERS = [2, 1.0, "inf", 3]
HAS_LIGHTNING = importlib.util.find_spec("lightning") is not None


class Mixed(nn.Module):
    """Parameters of four dtypes, a 0-d one, an empty one and one without a gradient."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def make(*shape: int, dtype: torch.dtype = torch.float32) -> nn.Parameter:
            return nn.Parameter(torch.randn(shape, generator=g).to(device=device, dtype=dtype))

        self.linear = nn.Linear(7, 5).to(device)
        self.scale = make()  # 0-d
        self.f16 = make(3, 4, dtype=torch.float16)
        self.bf16 = make(33, dtype=torch.bfloat16)
        self.empty = make(0, 2)
        self.frozen = make(6)
        for p in self.parameters():
            if p is not self.frozen:
                p.grad = torch.randn(p.shape, generator=g).to(device=device, dtype=p.dtype)


def loop_norms(named, prefix: str, norm_type) -> dict:
    """The per-parameter loop people write: one ``norm`` per tensor, the total on the host
    (the norm of an empty tensor is 0, also for ``inf``, where torch raises)."""
    p = float(norm_type)
    out = {f"{prefix}_{p}_norm/{name}": t.detach().norm(p) if t.numel() else t.new_zeros(())
           for name, t in named}
    if out:
        out[f"{prefix}_{p}_norm_total"] = torch.tensor(list(out.values())).norm(p)
    return out


def assert_same_dict(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key, w in want.items():
        g = got[key]
        assert isinstance(g, torch.Tensor) and g.dim() == 0, key
        assert (g.dtype, g.device) == (w.dtype, w.device), key
        assert not g.requires_grad, key
        low = w.dtype in (torch.float16, torch.bfloat16)
        tol = {"rtol": 1e-2, "atol": 0} if low else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(g, w, **tol, msg=key)


@pytest.mark.parametrize("norm_type", ORDERS)
def test_grad_norms_match_the_per_parameter_loop(backend, device, norm_type):
    model = Mixed(device)
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    got = regfuse.grad_norms(model, norm_type, backend=backend)
    assert_same_dict(got, loop_norms(named, "grad", norm_type))
    assert f"grad_{float(norm_type)}_norm/frozen" not in got


def test_weight_norms_match_the_per_parameter_loop(backend, device):
    model = Mixed(device)
    got = regfuse.weight_norms(model, 2.0, backend=backend)
    assert_same_dict(got, loop_norms(list(model.named_parameters()), "weight", 2.0))
    assert "weight_2.0_norm/frozen" in got


@pytest.mark.skipif(not HAS_LIGHTNING, reason="lightning is not installed (pip install lightning)")
@pytest.mark.parametrize("norm_type", ORDERS)
@pytest.mark.parametrize("separator", ["/", "."])
def test_grad_norms_is_lightnings_grad_norm(device, norm_type, separator):
    from lightning.pytorch.utilities import grad_norm

    model = Mixed(device)
    if float(norm_type) == math.inf:
        model.empty.grad = None  # Lightning raises for the inf norm of an empty tensor
    assert_same_dict(regfuse.grad_norms(model, norm_type, separator),
                     grad_norm(model, norm_type, separator))


def test_one_fused_launch_and_other_inputs(monkeypatch):
    model = Mixed(torch.device("cpu"))
    want = regfuse.grad_norms(model)
    calls = []

    def counting_norms(*args, **kwargs):
        calls.append(len(args[0]))
        return regfuse.api.norms(*args, **kwargs)

    monkeypatch.setattr(regfuse.norm_logging, "norms", counting_norms)
    from_pairs = regfuse.grad_norms(model.named_parameters())
    from_mapping = regfuse.grad_norms(dict(model.named_parameters()))
    assert calls == [6, 6]  # one reduction over the six gradients, each time
    assert_same_dict(from_pairs, want)
    assert_same_dict(from_mapping, want)


def test_no_gradient_gives_an_empty_dict():
    model = nn.Linear(3, 2)
    assert regfuse.grad_norms(model) == {}
    assert regfuse.weight_norms([]) == {}


@pytest.mark.parametrize("norm_type", [0, -1.0])
def test_non_positive_order_is_refused_with_lightnings_message(norm_type):
    with pytest.raises(ValueError, match="`norm_type` must be a positive number"):
        regfuse.grad_norms(Mixed(torch.device("cpu")), norm_type)


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="grad_norms takes a module"):
        regfuse.grad_norms([torch.zeros(2)])


def test_non_finite_gradients_propagate():
    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    model.bias.grad[0] = math.inf
    got = regfuse.grad_norms(model)
    assert got["grad_2.0_norm/bias"] == math.inf
    assert got["grad_2.0_norm_total"] == math.inf
    assert torch.isfinite(got["grad_2.0_norm/weight"])
