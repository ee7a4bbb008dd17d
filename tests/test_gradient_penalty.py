"""regfuse.gradient_penalty against torch.autograd.grad plus a sum of squares."""
import warnings

import pytest
import torch
from torch import nn

import regfuse

WEIGHT = 0.7


def plain_gradient_penalty(outputs, inputs, weight=WEIGHT):
    grads = torch.autograd.grad(outputs.sum(), inputs, create_graph=True)
    return weight * sum(g.pow(2).sum() for g in grads)


class Net(nn.Module):
    """Returns its hidden activations too, so that the test can take gradients at them."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 7), nn.Linear(7, 6), nn.Linear(6, 3)

    def forward(self, x):
        h1 = torch.tanh(self.fc1(x))
        h2 = torch.tanh(self.fc2(h1))
        return self.fc3(h2), (h1, h2)


@pytest.fixture
def net(device):
    torch.manual_seed(0)
    return Net().to(device)


def grads_after(net, make_loss):
    net.zero_grad(set_to_none=True)
    loss = make_loss()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in net.parameters()]


def test_value_and_training_gradient_match_plain(net, device, backend):
    x = torch.randn(4, 5, device=device)

    def loss_with(penalty_fn):
        out, hidden = net(x)
        return out.pow(2).mean() + penalty_fn(out.pow(2).mean(), list(hidden))

    got, got_grads = grads_after(net, lambda: loss_with(
        lambda o, h: regfuse.gradient_penalty(o, h, WEIGHT, backend=backend)))
    expected, expected_grads = grads_after(net, lambda: loss_with(plain_gradient_penalty))
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_no_stray_grad_on_activations_or_parameters(net):
    x = torch.randn(4, 5)
    out, (h1, h2) = net(x)
    value = regfuse.gradient_penalty(out, [h1, h2])
    assert all(p.grad is None for p in net.parameters())  # the call itself writes nothing
    value.backward()
    with warnings.catch_warnings():  # torch warns on reading .grad of a non-leaf
        warnings.simplefilter("ignore")
        assert h1.grad is None and h2.grad is None
    # d out / d h does not depend on the last bias: it alone gets no gradient.
    trained = {name for name, p in net.named_parameters() if p.grad is not None}
    assert trained == {name for name, _ in net.named_parameters()} - {"fc3.bias"}


def test_non_scalar_outputs_are_summed(net):
    out, hidden = net(torch.randn(4, 5))
    torch.testing.assert_close(regfuse.gradient_penalty(out, hidden),
                               regfuse.gradient_penalty(out.sum(), hidden))


def test_unused_inputs_contribute_zero(net):
    x = torch.randn(4, 5)
    out, (h1, h2) = net(x)
    unrelated = torch.randn(3, requires_grad=True)
    torch.testing.assert_close(regfuse.gradient_penalty(out, [h2, unrelated]),
                               plain_gradient_penalty(out, [h2], weight=1.0))
    only_unused = regfuse.gradient_penalty(out, unrelated)  # a single tensor works too
    assert only_unused.item() == 0.0 and not only_unused.requires_grad


def test_r1_penalty_on_inputs_is_twice_differentiable():
    # An R1-style penalty: gradient with respect to the (leaf) input of a critic.
    torch.manual_seed(3)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)

    def r1(weights):
        return regfuse.gradient_penalty(torch.tanh(x @ weights).sum(), x, weight=0.5)

    assert torch.autograd.gradcheck(r1, (w,))
    torch.testing.assert_close(r1(w), 0.5 * torch.autograd.grad(
        torch.tanh(x @ w).sum(), x, create_graph=True)[0].pow(2).sum())


def test_bad_arguments(net):
    out, hidden = net(torch.randn(2, 5))
    with pytest.raises(ValueError):
        regfuse.gradient_penalty(out, hidden, weight=-1.0)
    with pytest.raises(ValueError):
        regfuse.gradient_penalty(out, [])
    with pytest.raises(RuntimeError, match="autograd graph"):
        regfuse.gradient_penalty(out.detach(), hidden)
