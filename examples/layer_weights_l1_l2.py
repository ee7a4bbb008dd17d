"""L1 on one layer's parameters, L2 on another's (the first answers to "how to add a
regularizer only to particular layers").

The answers concatenate each layer's parameters (``torch.cat([x.view(-1) ...])``, a
copy of every weight each step) and call ``torch.norm``; one of them accumulates
``torch.norm(param, 1) ** 2`` into ``torch.tensor(0)``, an integer tensor (the square
of the L1 norm is not the L1 penalty, and the in-place add fails or truncates). The
L2 penalty of weight decay is the *sum of squares*; ``torch.norm(..., 2)`` is its square
root. ``regfuse.penalty`` takes the parameters as they are, no copy, one launch each.

    python examples/layer_weights_l1_l2.py
"""
import torch
import torch.nn.functional as F
from torch import nn

import regfuse

LAMBDA1, LAMBDA2 = 0.5, 0.01


def main():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                          nn.Linear(16, 2))
    linear1, linear2 = model[0], model[2]
    inputs, targets = torch.rand(4, 128), torch.ones(4, dtype=torch.long)
    cross_entropy = F.cross_entropy(model(inputs), targets)

    # Plain PyTorch, corrected: L1 of linear1's parameters, sum of squares of linear2's.
    plain_l1 = LAMBDA1 * torch.cat([p.view(-1) for p in linear1.parameters()]).abs().sum()
    plain_l2 = LAMBDA2 * sum(p.pow(2).sum() for p in linear2.parameters())

    l1_term = regfuse.penalty(linear1.parameters(), l1=LAMBDA1)
    l2_term = regfuse.penalty(linear2.parameters(), l2=LAMBDA2)
    print(f"L1 on linear1: regfuse {l1_term.item():.6f}  plain {plain_l1.item():.6f}")
    print(f"L2 on linear2: regfuse {l2_term.item():.6f}  plain {plain_l2.item():.6f}")

    # Where the un-squared Euclidean norm of the concatenation is really wanted:
    concat_norm = regfuse.norms(linear2.parameters(), squared=True).sum().sqrt()
    plain_norm = torch.norm(torch.cat([p.view(-1) for p in linear2.parameters()]), 2)
    print(f"||cat(linear2)||_2: regfuse {concat_norm.item():.6f}  plain {plain_norm.item():.6f}")

    # The weights only (no bias), as WeightRegularizer selects them from a module:
    weights_only = regfuse.WeightRegularizer(linear1, l1=LAMBDA1)
    print(f"linear1 weights only: {weights_only.penalty().item():.6f} "
          f"(plain {LAMBDA1 * linear1.weight.abs().sum().item():.6f})")

    loss = cross_entropy + l1_term + l2_term
    loss.backward()
    print(f"loss {loss.item():.6f}; linear1.weight.grad norm {linear1.weight.grad.norm().item():.4f}")


if __name__ == "__main__":
    main()
