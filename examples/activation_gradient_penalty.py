"""A penalty on the gradient of the loss with respect to activations.

The question's loop called ``loss.backward(retain_graph=True)`` and then
``grad_norm.backward()``: two backward passes, activation gradients kept on
``retain_grad()`` tensors that were never zeroed. The correct recipe takes the
activation gradients with ``torch.autograd.grad(..., create_graph=True)``, adds
``weight * sum(g.pow(2).sum())`` to the loss and calls ``backward()`` once.
``regfuse.gradient_penalty`` is that answer in one call (one fused reduction over the
gradients); the activations are captured with forward hooks, so the model's
``forward`` stays as it is.

    python examples/activation_gradient_penalty.py
"""
import torch
from torch import nn

import regfuse

PENALTY_WEIGHT = 10.0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=5)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5)
        self.pool = nn.MaxPool2d(2, 2)
        self.relu = nn.ReLU()
        self.linear = nn.Linear(64 * 5 * 5, 10)

    def forward(self, x):
        x = self.relu(self.pool(self.conv1(x)))
        x = self.relu(self.pool(self.conv2(x)))
        return self.linear(x.flatten(1))


def answer_loss(model, activations, inputs, labels):
    """The accepted answer, for comparison (activations taken from the same hooks)."""
    loss = nn.functional.cross_entropy(model(inputs), labels)
    grads = torch.autograd.grad(loss, activations(), create_graph=True)
    return loss + PENALTY_WEIGHT * sum(g.pow(2).sum() for g in grads)


def main():
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs, labels = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    # l1 = l2 = 0: used only to capture the two ReLU outputs of each forward.
    relu_outputs = regfuse.ActivationRegularizer(model.relu)

    answer_loss(model, lambda: relu_outputs.captured, inputs, labels).backward()
    answer_grads = [p.grad.clone() for p in model.parameters()]
    relu_outputs.clear()

    for step in range(6):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), labels)
        penalty = regfuse.gradient_penalty(loss, relu_outputs.captured, PENALTY_WEIGHT)
        (loss + penalty).backward()
        relu_outputs.clear()
        if step == 0:
            worst = max((p.grad - g).abs().max().item()
                        for p, g in zip(model.parameters(), answer_grads))
            print(f"largest parameter-gradient difference from the answer's code: {worst:.1e}")
        optimizer.step()
        print(f"step {step}: cross-entropy {loss.item():.4f}, "
              f"{PENALTY_WEIGHT:g} * ||d loss / d activations||^2 = {penalty.item():.3e}")


if __name__ == "__main__":
    main()
