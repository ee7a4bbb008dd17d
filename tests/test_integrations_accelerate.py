"""regfuse.integrations.accelerate against Accelerate's own ``clip_grad_norm_``."""
import copy

import pytest
import torch
from torch import nn

import regfuse

accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")
from accelerate.state import AcceleratorState  # noqa: E402

from regfuse.integrations.accelerate import use_regfuse_clipping  # noqa: E402

SCALE = 1024.0  # what a gradient scaler multiplies the loss by


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(True)  # Accelerate keeps one state per process
    yield accelerate.Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


def prepared(accelerator, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return accelerator.prepare(model, optimizer)


def backward(accelerator, model, loss_scale: float = 1.0) -> None:
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    accelerator.backward(model(x).square().sum() * loss_scale)


def fake_scaler(model, calls: list):
    """An ``unscale_gradients`` standing in for fp16 AMP's (not available on a CPU)."""
    def unscale_gradients(optimizer=None):
        calls.append(len(calls))
        for p in model.parameters():
            p.grad.div_(SCALE)
    return unscale_gradients


@pytest.mark.parametrize("max_norm", [0.5, float("inf")])
def test_same_norm_and_clipped_gradients_as_accelerate_with_unscaling(accelerator, monkeypatch, max_norm):
    model, _ = prepared(accelerator)
    backward(accelerator, model, SCALE)
    stock_model = copy.deepcopy(model)
    for p, q in zip(model.parameters(), stock_model.parameters()):
        q.grad = p.grad.clone()
    stock_calls, fused_calls, regfuse_calls = [], [], []

    stock = copy.copy(accelerator)  # an unpatched twin sharing the state
    stock.unscale_gradients = fake_scaler(stock_model, stock_calls)
    want = stock.clip_grad_norm_(stock_model.parameters(), max_norm)

    clip = regfuse.clip_grad_norm_
    monkeypatch.setattr(regfuse, "clip_grad_norm_",
                        lambda *a, **k: regfuse_calls.append(1) or clip(*a, **k))
    use_regfuse_clipping(accelerator)
    accelerator.unscale_gradients = fake_scaler(model, fused_calls)
    got = accelerator.clip_grad_norm_(model.parameters(), max_norm)

    assert regfuse_calls == [1] and fused_calls == stock_calls == [0]  # unscaled once, first
    torch.testing.assert_close(got, want)
    for p, q in zip(model.parameters(), stock_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    if max_norm < float("inf"):
        assert float(want) > max_norm  # the case clips
        torch.testing.assert_close(regfuse.total_norm([p.grad for p in model.parameters()]),
                                   torch.tensor(max_norm), rtol=1e-5, atol=0)


def test_accelerates_own_method_for_norm_type_zero(accelerator, monkeypatch):
    model, _ = prepared(accelerator)
    backward(accelerator, model)
    monkeypatch.setattr(regfuse, "clip_grad_norm_", lambda *a, **k: pytest.fail("regfuse called"))
    use_regfuse_clipping(accelerator)
    counted = accelerator.clip_grad_norm_(model.parameters(), float("inf"), norm_type=0)
    assert float(counted) == 4  # Accelerate counts the tensors with a nonzero gradient


def test_refuses_what_is_not_an_accelerator():
    with pytest.raises(TypeError, match="expected an accelerate.Accelerator"):
        use_regfuse_clipping(object())

