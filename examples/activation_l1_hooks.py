"""L1 on ReLU activations through forward hooks (the question "how to add an L1
regularizer to activations?").

The plain-PyTorch answer keeps the ReLU outputs with a forward hook, sums their L1 norms
in a Python loop and must remember to clear the list after every step (and not to
capture during evaluation). ``regfuse.ActivationRegularizer`` does the hooking, the
capture rule and the clearing, and computes the penalty in one fused launch.

    python examples/activation_l1_hooks.py
"""
import torch
import torch.nn.functional as F
from torch import nn

import regfuse

L1_LAMBDA = 1e-3


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = nn.Linear(128, 32)
        self.linear2 = nn.Linear(32, 16)
        self.linear3 = nn.Linear(16, 2)
        self.relu = nn.ReLU()  # a module, so that a hook can see its outputs (called twice)

    def forward(self, x):
        return self.linear3(self.relu(self.linear2(self.relu(self.linear1(x)))))


def plain_step(model, inputs, targets):
    """The accepted answer's loop, kept for comparison: a list filled by a hook."""
    captured = []
    handle = model.relu.register_forward_hook(lambda module, args, out: captured.append(out))
    outputs = model(inputs)
    l1_penalty = L1_LAMBDA * sum(out.abs().sum() for out in captured)
    loss = F.cross_entropy(outputs, targets) + l1_penalty
    loss.backward()
    handle.remove()
    return loss


def main():
    torch.manual_seed(0)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    inputs, targets = torch.rand(64, 128), torch.randint(0, 2, (64,))

    plain_loss = plain_step(model, inputs, targets)
    plain_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    with regfuse.ActivationRegularizer(model.relu, l1=L1_LAMBDA) as activity:
        for step in range(8):
            optimizer.zero_grad()
            outputs = model(inputs)
            penalty = activity.penalty()  # over both calls of model.relu in this forward
            loss = F.cross_entropy(outputs, targets) + penalty
            loss.backward()
            if step == 0:
                worst = max((p.grad - g).abs().max().item()
                            for p, g in zip(model.parameters(), plain_grads))
                print(f"step 0: loss {loss.item():.6f} (plain hook loop: {plain_loss.item():.6f}), "
                      f"largest gradient difference {worst:.1e}")
            optimizer.step()
            zeros = sum((a == 0).sum().item() for a in activity.captured)
            total = sum(a.numel() for a in activity.captured)
            print(f"step {step}: penalty {penalty.item():.4f}, "
                  f"ReLU outputs exactly 0: {zeros / total:.1%}")
            activity.clear()  # one step's activations are not kept into the next
        with torch.no_grad():
            model(inputs)  # evaluation: nothing is captured
        print(f"captured under no_grad: {len(activity.captured)} tensors")


if __name__ == "__main__":
    main()
