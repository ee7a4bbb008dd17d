"""Proximal L1: exact zeros in the weights, and a report that counts them.

An L1 penalty in the loss (a subgradient step) makes weights oscillate around 0 but
rarely *equal* to 0. The proximal step, ``prox_l1_(weights, lr * l1)`` right after
``optimizer.step()``, soft-thresholds them and leaves exact zeros: a sparse model.
``regfuse.sparsity_report`` shows per layer the fraction of exact zeros and the L1 and
L2 norms, the numbers to log. The data: a regression that only uses 8 of 64 inputs.

    python examples/prox_l1_sparsity.py
"""
import torch
from torch import nn

import regfuse

L1, LR, STEPS = 0.01, 0.05, 300


def make_data():
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    true_w = torch.zeros(64)
    true_w[:8] = torch.randn(8)
    return x, x @ true_w + 0.01 * torch.randn(512)


def train(x, y, proximal):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))
    weights = regfuse.WeightRegularizer(model, l1=L1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = (model(x).squeeze(1) - y).pow(2).mean()
        if not proximal:
            loss = loss + weights.penalty()  # subgradient of |w|
        loss.backward()
        optimizer.step()
        if proximal:
            regfuse.prox_l1_(weights.params, threshold=LR * L1)
    mse = (model(x).squeeze(1) - y).pow(2).mean().item()
    named = [(name, p) for name, p in model.named_parameters() if name in weights.names]
    return mse, regfuse.sparsity_report(named)


def main():
    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    x, y = make_data()
    for proximal in (False, True):
        mse, report = train(x, y, proximal)
        recipe = "prox_l1_ after optimizer.step()" if proximal else "L1 penalty in the loss"
        print(f"{recipe}: training MSE {mse:.4f}\n{report}\n")


if __name__ == "__main__":
    main()
