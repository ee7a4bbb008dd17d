"""How do I know the regularization acted? L1 activity regularization, measured.

Trains the same small MLP on scikit-learn's digits (8x8 images, no download) twice,
without and with an L1 penalty on its ReLU outputs (Keras' ``activity_regularizer``),
and prints per epoch the loss, the test accuracy and the activation sparsity: the
fraction of ReLU outputs that are exactly 0 and their mean absolute value, measured on
the test set. A plot of the same lands in examples/output/digits_activity_l1.png.

    python examples/digits_activity_l1.py
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

EPOCHS, BATCH, LR = 15, 64, 2e-3
ACTIVITY_L1 = 2e-3  # per sample: the penalty is the summed |activation| / batch size
OUTPUT = Path(__file__).parent / "output" / "digits_activity_l1.png"


def load_data():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixels are 0..16
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0,
                                                        stratify=y)
    return x_train, y_train, x_test, y_test


def make_model():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 10))


@torch.no_grad()
def evaluate(model, x, y):
    """Test accuracy, and the sparsity report of the ReLU outputs on the test set."""
    relu_outputs = {}
    h = x
    for index, layer in enumerate(model):
        h = layer(h)
        if isinstance(layer, nn.ReLU):
            relu_outputs[f"relu{index}"] = h
    accuracy = (h.argmax(1) == y).float().mean().item()
    return accuracy, regfuse.sparsity_report(relu_outputs)


def train(activity_l1, data, seed=0):
    """One run; returns a list of per-epoch dicts."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    relus = [m for m in model if isinstance(m, nn.ReLU)]
    history = []
    with regfuse.ActivationRegularizer(relus, l1=activity_l1) as activity:
        for epoch in range(1, EPOCHS + 1):
            model.train()
            order = torch.randperm(len(x_train))
            total_ce = total_penalty = 0.0
            for start in range(0, len(order), BATCH):
                batch = order[start:start + BATCH]
                ce = F.cross_entropy(model(x_train[batch]), y_train[batch])
                penalty = activity.penalty() / len(batch)
                optimizer.zero_grad()
                (ce + penalty).backward()
                optimizer.step()
                activity.clear()  # the activations of this step are no longer needed
                total_ce += ce.item() * len(batch)
                total_penalty += penalty.item() * len(batch)
            model.eval()
            accuracy, report = evaluate(model, x_test, y_test)
            mean_abs = sum(r.l1 for r in report.rows) / report.numel
            history.append(dict(epoch=epoch, ce=total_ce / len(x_train),
                                penalty=total_penalty / len(x_train), accuracy=accuracy,
                                zeros=report.sparsity, mean_abs=mean_abs))
    return history, report


def print_table(runs):
    names = list(runs)
    header = f"{'epoch':>5} | " + " | ".join(
        f"{name:^38}" for name in names)
    sub = f"{'':>5} | " + " | ".join(
        f"{'CE':>6} {'penalty':>7} {'test acc':>8} {'zeros':>6} {'mean|a|':>7}" for _ in names)
    print(header)
    print(sub)
    for rows in zip(*(runs[name] for name in names)):
        cells = [f"{r['ce']:>6.3f} {r['penalty']:>7.3f} {r['accuracy']:>8.2%} "
                 f"{r['zeros']:>6.1%} {r['mean_abs']:>7.3f}" for r in rows]
        print(f"{rows[0]['epoch']:>5} | " + " | ".join(cells))


def plot(runs, path):
    fields = [("ce", "training cross-entropy"), ("accuracy", "test accuracy"),
              ("zeros", "ReLU outputs exactly 0 (test)"), ("mean_abs", "mean |ReLU output| (test)")]
    fig, axes = plt.subplots(1, len(fields), figsize=(16, 3.6))
    for ax, (key, title) in zip(axes, fields):
        for name, history in runs.items():
            ax.plot([r["epoch"] for r in history], [r[key] for r in history], marker="o",
                    markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    data = load_data()
    runs, reports = {}, {}
    for name, l1 in [("no regularization", 0.0), (f"activity L1 = {ACTIVITY_L1:g}", ACTIVITY_L1)]:
        runs[name], reports[name] = train(l1, data)
    print_table(runs)
    for name, report in reports.items():
        print(f"\nReLU outputs on the test set after training, {name}:\n{report}")
    plot(runs, OUTPUT)
    print(f"\nplot: {OUTPUT}")


if __name__ == "__main__":
    main()
