"""Structured sparsity: prune whole filters and neurons with the group lasso.

L1 zeroes single weights, which rarely makes a network faster. The group lasso
(``sum_g sqrt(|g|) * ||w_g||_2`` over the output filters of a convolution and the output
neurons of a linear layer) zeroes *whole* filters, which can then be cut out of the
model: a smaller network with the same predictions.

This trains the same small CNN on scikit-learn's digits (8x8 images, no download)
three times, with SGD:

* without regularization;
* with the group lasso as a loss term (``WeightRegularizer(..., group_lasso=...)``): its
  subgradient pushes filters towards zero, where they hover without reaching it;
* with the proximal route (``regfuse.ProximalStep``): block soft-thresholding after
  every step, which leaves whole filters exactly zero.

It prints per epoch the test accuracy and the fraction of all-zero filters/neurons per
layer, then removes the zero ones physically (folding their constant output, the bias
through the ReLU, into the next layer's bias) and checks that the smaller model makes
the same predictions. A plot lands in examples/output/group_lasso_pruning.png.

    python examples/group_lasso_pruning.py
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402

import regfuse  # noqa: E402

EPOCHS, BATCH, LR, MOMENTUM = 30, 32, 0.05, 0.9
GROUP_LASSO = 2e-3
WIDTHS = (16, 32, 64)  # conv1 filters, conv2 filters, hidden neurons
OUTPUT = Path(__file__).parent / "output" / "group_lasso_pruning.png"


def load_data():
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0,
                                                        stratify=y)
    return x_train, y_train, x_test, y_test


class SmallCNN(nn.Module):
    """Two valid 3x3 convolutions (8x8 -> 6x6 -> 4x4) and two linear layers. Without
    padding, a filter that outputs a constant adds a constant to every output position
    of the next layer: exactly what that layer's bias can absorb."""

    def __init__(self, widths=WIDTHS):
        super().__init__()
        c1, c2, hidden = widths
        self.conv1 = nn.Conv2d(1, c1, 3)
        self.conv2 = nn.Conv2d(c1, c2, 3)
        self.fc1 = nn.Linear(c2 * 16, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)

    def grouped(self):
        """The weights whose output filters / neurons the group lasso acts on (not the
        classifier: its rows are the classes)."""
        return {"conv1": self.conv1.weight, "conv2": self.conv2.weight, "fc1": self.fc1.weight}


@torch.no_grad()
def prune(model: SmallCNN) -> SmallCNN:
    """A smaller SmallCNN without the all-zero filters and neurons of ``model``.

    A zero filter outputs its bias b everywhere, relu(b) after the ReLU: the next layer
    receives a constant, which is folded into its bias (for a convolution, times the sum
    of the kernel over that input channel) before the channel is removed.
    """
    keep = {name: regfuse.group_norms([w], p=float("inf"))[0] != 0 for name, w in model.grouped().items()}
    small = SmallCNN(tuple(int(k.sum()) for k in keep.values()))
    # conv1: drop zero filters; their constant output goes into conv2's bias.
    k1, k2, k3 = keep["conv1"], keep["conv2"], keep["fc1"]
    conv2_bias = model.conv2.bias + (model.conv2.weight[:, ~k1].sum((2, 3)) @ F.relu(model.conv1.bias[~k1]))
    # conv2: the same, into fc1's bias; channel c of conv2 is fc1's inputs [16c, 16c + 16).
    fc1_columns = k2.repeat_interleave(16)
    dropped = F.relu(conv2_bias[~k2]).repeat_interleave(16)
    fc1_bias = model.fc1.bias + model.fc1.weight[:, ~fc1_columns] @ dropped
    # fc1: dropped neurons output relu(bias): into fc2's bias.
    fc2_bias = model.fc2.bias + model.fc2.weight[:, ~k3] @ F.relu(fc1_bias[~k3])

    small.conv1.weight.copy_(model.conv1.weight[k1])
    small.conv1.bias.copy_(model.conv1.bias[k1])
    small.conv2.weight.copy_(model.conv2.weight[k2][:, k1])
    small.conv2.bias.copy_(conv2_bias[k2])
    small.fc1.weight.copy_(model.fc1.weight[k3][:, fc1_columns])
    small.fc1.bias.copy_(fc1_bias[k3])
    small.fc2.weight.copy_(model.fc2.weight[:, k3])
    small.fc2.bias.copy_(fc2_bias)
    return small


@torch.no_grad()
def accuracy(model, x, y):
    return (model(x).argmax(1) == y).float().mean().item()


def zero_fractions(model):
    """Per grouped layer, the fraction of all-zero output filters / neurons."""
    report = regfuse.sparsity_report(model.grouped())
    return {row.name: row.group_sparsity for row in report.rows}


def train(route, data, seed=0):
    """One run: route is None, "loss" (penalty in the loss) or "prox" (ProximalStep)."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    # The proximal step reads the scheduled lr of every step: threshold = lr * GROUP_LASSO.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    # The same selection for both routes: the loss term, or the proximal step on its params.
    weights = regfuse.WeightRegularizer(list(model.grouped().values()), group_lasso=GROUP_LASSO)
    prox = regfuse.ProximalStep(optimizer, group_lasso=GROUP_LASSO, params=weights.params) \
        if route == "prox" else None
    history = []
    for epoch in range(1, EPOCHS + 1):
        model.train()
        order = torch.randperm(len(x_train))
        for start in range(0, len(order), BATCH):
            batch = order[start:start + BATCH]
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            if route == "loss":
                loss = loss + weights.penalty()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()  # with route == "prox", the block soft-threshold runs here
        scheduler.step()
        model.eval()
        history.append(dict(epoch=epoch, accuracy=accuracy(model, x_test, y_test), **zero_fractions(model)))
    if prox is not None:
        prox.remove()
    return model, history


def plot(runs, path):
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for name, (_, history) in runs.items():
        epochs = [r["epoch"] for r in history]
        axes[0].plot(epochs, [r["accuracy"] for r in history], marker="o", markersize=3, label=name)
        if "proximal" in name:  # the other runs have none
            for layer, style in zip(("conv1", "conv2", "fc1"), ("-", "--", ":")):
                axes[1].plot(epochs, [r[layer] for r in history], style,
                             color=axes[0].lines[-1].get_color(), label=layer)
    axes[0].set_title("test accuracy")
    axes[1].set_title("all-zero filters / neurons, proximal run (others: none)")
    for ax in axes[:2]:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    floor = 1e-8  # exact zeros, drawn at the bottom of the log scale
    for name, (model, _) in runs.items():
        norms = torch.sort(regfuse.group_norms([model.conv2.weight.detach()])[0]).values
        axes[2].semilogy(norms.clamp_min(floor).numpy(), marker=".", label=name)
    axes[2].set_title(f"conv2 filter norms, sorted (exact 0 drawn at {floor:g})")
    axes[2].set_xlabel("filter")
    axes[2].grid(alpha=0.3)
    axes[2].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    data = load_data()
    x_test, y_test = data[2], data[3]
    runs = {"no regularization": train(None, data),
            f"group lasso {GROUP_LASSO:g}, loss term": train("loss", data),
            f"group lasso {GROUP_LASSO:g}, proximal": train("prox", data)}

    print(f"{'epoch':>5} | " + " | ".join(f"{name:^36}" for name in runs))
    print(f"{'':>5} | " + " | ".join(f"{'acc':>7} {'conv1':>8} {'conv2':>8} {'fc1':>8}" for _ in runs))
    for rows in zip(*(history for _, history in runs.values())):
        cells = [f"{r['accuracy']:>7.2%} {r['conv1']:>8.0%} {r['conv2']:>8.0%} {r['fc1']:>8.0%}" for r in rows]
        print(f"{rows[0]['epoch']:>5} | " + " | ".join(cells))

    print("\nafter removing the all-zero filters and neurons:")
    for name, (model, _) in runs.items():
        small = prune(model)
        with torch.no_grad():
            logits, small_logits = model(x_test), small(x_test)
        same = bool((logits.argmax(1) == small_logits.argmax(1)).all())
        params = sum(p.numel() for p in model.parameters())
        small_params = sum(p.numel() for p in small.parameters())
        widths = (small.conv1.out_channels, small.conv2.out_channels, small.fc1.out_features)
        print(f"  {name}: widths {WIDTHS} -> {widths}, "
              f"parameters {params:,} -> {small_params:,}; accuracy {accuracy(model, x_test, y_test):.2%} -> "
              f"{accuracy(small, x_test, y_test):.2%}; same predictions: {same} "
              f"(max |logit difference| {(logits - small_logits).abs().max().item():.1e})")
    plot(runs, OUTPUT)
    print(f"\nplot: {OUTPUT}")


if __name__ == "__main__":
    main()
