"""L1 through a gradient hook, done right.

The article's hook is a module *backward* hook: it runs when the gradients with
respect to the module's inputs are ready, which says nothing about its parameters'
gradients. On a first layer (inputs that do not require grad) it even runs when the
gradient of the *outputs* is ready, before the parameters' gradients exist: with
``optimizer.zero_grad()`` (``set_to_none=True``, the default) every ``param.grad`` is
still ``None`` there and the penalty is silently skipped.

The right moment is after each parameter's gradient has accumulated
(``register_post_accumulate_grad_hook``). ``WeightRegularizer.attach()`` uses it, and
applies the penalty gradient to every parameter of the backward in one fused launch
when the backward ends.

    python examples/l1_grad_hook.py
"""
import warnings

import torch
from torch import nn

import regfuse

L1 = 0.001


def make_layer():
    torch.manual_seed(0)
    return nn.Conv2d(3, 32, 3)


def weight_grad(layer, inputs, with_penalty_in_loss=False):
    layer.zero_grad()  # set_to_none=True
    loss = layer(inputs).pow(2).mean()
    if with_penalty_in_loss:
        loss = loss + L1 * sum(p.abs().sum() for p in layer.parameters())
    loss.backward()
    return layer.weight.grad.clone()


def max_diff(a, b):
    return (a - b).abs().max().item()


def article_hook(module, grad_input, grad_output):
    for param in module.parameters():
        if param.grad is not None:
            param.grad += L1 * torch.sign(param.data)


def main():
    torch.manual_seed(1)
    inputs = torch.randn(8, 3, 16, 16)  # data: no requires_grad, as for any first layer
    expected = weight_grad(make_layer(), inputs, with_penalty_in_loss=True)
    without = weight_grad(make_layer(), inputs)

    layer = make_layer()
    layer.register_full_backward_hook(article_hook)
    with warnings.catch_warnings():  # torch warns that this hook fires on the outputs
        warnings.simplefilter("ignore")
        article = weight_grad(layer, inputs)
    print(f"module backward hook: difference from the L1 gradient {max_diff(article, expected):.1e}, "
          f"from no penalty at all {max_diff(article, without):.1e}")

    layer = make_layer()
    # All the layer's parameters, bias included, as the article's hook did.
    handle = regfuse.WeightRegularizer(layer.parameters(), l1=L1).attach()
    attached = weight_grad(layer, inputs)
    print(f"WeightRegularizer.attach(): difference from the L1 gradient {max_diff(attached, expected):.1e}")
    handle.remove()
    print(f"after handle.remove(): difference from no penalty "
          f"{max_diff(weight_grad(layer, inputs), without):.1e}")


if __name__ == "__main__":
    main()
