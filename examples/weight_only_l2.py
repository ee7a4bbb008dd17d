"""L2 on the weights only, biases and normalization layers excluded, as a loss term
(the "Regularization" class people write because ``optimizer(weight_decay=...)`` decays
every parameter, biases included, and does not show in the loss).

``regfuse.WeightRegularizer`` selects the weights the way timm's weight-decay groups
do. Its ``l2`` multiplies the sum of squares, so ``l2 = weight_decay / 2`` gives SGD's
``weight_decay`` gradient ``weight_decay * w`` on exactly those weights: this script
checks it against SGD with two parameter groups. (The class in the article also
matched BatchNorm weights by name ``'weight' in name``, and used the norm, not its
square; and it called ``.backward()`` on ``loss.item()``, a float.)

    python examples/weight_only_l2.py
"""
import torch
import torch.nn.functional as F
from torch import nn

import regfuse

WEIGHT_DECAY, LR = 0.1, 0.05


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 10))


def sgd_step(model, optimizer, inputs, targets, regularizer=None):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(inputs), targets)
    total = loss + regularizer.penalty() if regularizer else loss
    total.backward()
    optimizer.step()
    return loss.item(), total.item()


def main():
    torch.manual_seed(1)
    inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))

    model = make_model()
    regularizer = regfuse.WeightRegularizer(model, l2=WEIGHT_DECAY / 2)
    print("regularized:", ", ".join(regularizer.names))
    ce, total = sgd_step(model, torch.optim.SGD(model.parameters(), lr=LR), inputs, targets,
                         regularizer)
    print(f"cross-entropy {ce:.6f}, with the L2 term {total:.6f}: the penalty shows in the loss")

    # Plain PyTorch: SGD's coupled weight decay on the same weights only (two groups).
    reference = make_model()
    decayed = {id(p) for p in regfuse.WeightRegularizer(reference).params}
    groups = [{"params": [p for p in reference.parameters() if id(p) in decayed],
               "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in reference.parameters() if id(p) not in decayed],
               "weight_decay": 0.0}]
    sgd_step(reference, torch.optim.SGD(groups, lr=LR), inputs, targets)
    worst = max((a - b).abs().max().item()
                for a, b in zip(model.parameters(), reference.parameters()))
    print(f"after one step, largest difference from SGD weight_decay on the weights: {worst:.1e}")

    everything = make_model()
    sgd_step(everything, torch.optim.SGD(everything.parameters(), lr=LR,
                                         weight_decay=WEIGHT_DECAY), inputs, targets)
    bias_shift = (everything[4].bias - model[4].bias).abs().max().item()
    print(f"SGD weight_decay on every parameter moves the biases too: {bias_shift:.1e}")


if __name__ == "__main__":
    main()
