"""regfuse.ProximalStep against hand-written proximal SGD and AdamW steps."""
import math

import pytest
import torch

import regfuse
from cases import F64, assert_lists_close

STEPS = 4
LRS = (0.1, 0.03)  # two parameter groups with different learning rates


def _params(device):
    gen = torch.Generator().manual_seed(21)
    shapes = [[(6, 3, 3, 3), (6,)], [(4, 6), (5, 0), ()]]  # group 1: conv + bias; group 2
    return [[torch.randn(s, generator=gen, dtype=F64).mul_(0.2).to(device).requires_grad_() for s in group]
            for group in shapes]


def _gradients(groups, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [[torch.randn(p.shape, generator=gen, dtype=F64).mul_(0.5).to(p.device) for p in group]
            for group in groups]


def _prox_by_hand(w: torch.Tensor, lr: float, l1: float, group_lasso: float) -> torch.Tensor:
    """Soft-threshold by lr * l1, then shrink each row by max(0, 1 - lr * gl * sqrt(size) / norm)."""
    w = torch.sign(w) * torch.clamp_min(w.abs() - lr * l1, 0)
    if group_lasso == 0 or w.numel() == 0:
        return w
    rows = w.reshape(1, 1) if w.dim() == 0 else w.reshape(w.shape[0], -1)
    size = 1 if w.dim() <= 1 else rows.shape[1]
    norms = rows.norm(dim=1, keepdim=True)
    factor = torch.where(norms == 0, 0.0, torch.clamp_min(1 - lr * group_lasso * math.sqrt(size) / norms, 0))
    return (rows * factor).reshape(w.shape)


class _SGDByHand:
    def __init__(self, lrs):
        self.lrs = lrs

    def step(self, groups, grads, step):
        return [[w - lr * g for w, g in zip(ws, gs)] for ws, gs, lr in zip(groups, grads, self.lrs)]


class _AdamWByHand:
    """torch.optim.AdamW's update, written out (betas 0.9/0.999, eps 1e-8)."""

    def __init__(self, lrs, weight_decay):
        self.lrs, self.wd = lrs, weight_decay
        self.m, self.v = {}, {}

    def step(self, groups, grads, step):
        out = []
        for gi, (ws, gs, lr) in enumerate(zip(groups, grads, self.lrs)):
            new = []
            for pi, (w, g) in enumerate(zip(ws, gs)):
                key = (gi, pi)
                m = 0.9 * self.m.get(key, torch.zeros_like(w)) + 0.1 * g
                v = 0.999 * self.v.get(key, torch.zeros_like(w)) + 0.001 * g * g
                self.m[key], self.v[key] = m, v
                m_hat, v_hat = m / (1 - 0.9 ** step), v / (1 - 0.999 ** step)
                w = w * (1 - lr * self.wd)
                new.append(w - lr * m_hat / (v_hat.sqrt() + 1e-8))
            out.append(new)
        return out


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("l1, group_lasso", [(0.0, 0.5), (0.2, 0.5), (0.3, 0.0)],
                         ids=["group", "sparse_group", "l1"])
def test_matches_proximal_step_by_hand(backend, device, kind, l1, group_lasso):
    groups = _params(device)
    if kind == "sgd":
        optimizer = torch.optim.SGD([{"params": g, "lr": lr} for g, lr in zip(groups, LRS)])
        by_hand = _SGDByHand(LRS)
    else:
        optimizer = torch.optim.AdamW([{"params": g, "lr": lr} for g, lr in zip(groups, LRS)],
                                      weight_decay=0.01)
        by_hand = _AdamWByHand(LRS, 0.01)
    prox = regfuse.ProximalStep(optimizer, l1=l1, group_lasso=group_lasso, backend=backend)
    expected = [[p.detach().clone() for p in g] for g in groups]
    for step in range(1, STEPS + 1):
        grads = _gradients(groups, step)
        for ps, gs in zip(groups, grads):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
        optimizer.step()
        expected = by_hand.step(expected, grads, step)
        expected = [[_prox_by_hand(w, lr, l1, group_lasso) for w in ws] for ws, lr in zip(expected, LRS)]
        flat_got = [p.detach() for g in groups for p in g]
        flat_expected = [w for ws in expected for w in ws]
        assert_lists_close(flat_got, flat_expected, what=f"{kind} step {step}")
        for got, want in zip(flat_got, flat_expected):
            assert torch.equal(got == 0, want == 0), f"{kind} step {step}: exact zeros differ"
    assert any(bool((p == 0).any()) for g in groups for p in g)  # the steps did zero something
    prox.remove()


def test_honours_the_scheduler_and_adam(backend, device):
    w = torch.randn(5, 4, dtype=F64, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    regfuse.ProximalStep(optimizer, group_lasso=0.4, backend=backend)
    for step in range(3):
        w.grad = torch.full_like(w, 0.0)  # Adam's update is then 0: only the prox moves w
        before = w.detach().clone()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        assert_lists_close([w.detach()], [_prox_by_hand(before, lr, 0.0, 0.4)], what=f"step {step}")
        scheduler.step()


def test_selected_params_only_and_none_grads_left_alone(backend, device):
    a = torch.randn(4, 3, device=device, requires_grad=True)
    b = torch.randn(4, 3, device=device, requires_grad=True)
    c = torch.randn(4, 3, device=device, requires_grad=True)
    optimizer = torch.optim.SGD([a, b, c], lr=1.0)
    regfuse.ProximalStep(optimizer, group_lasso=100.0, params=[a, c], backend=backend)
    a.grad = torch.zeros_like(a)
    b.grad = torch.zeros_like(b)  # c has no gradient: SGD skips it, and so does the prox
    before_b, before_c = b.detach().clone(), c.detach().clone()
    optimizer.step()
    assert torch.equal(a, torch.zeros_like(a))
    assert torch.equal(b, before_b) and torch.equal(c, before_c)


def test_remove_stops_it(backend, device):
    w = torch.randn(4, 3, device=device, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=1.0)
    prox = regfuse.ProximalStep(optimizer, l1=100.0, backend=backend)
    prox.remove()
    prox.remove()  # idempotent
    w.grad = torch.zeros_like(w)
    before = w.detach().clone()
    optimizer.step()
    assert torch.equal(w, before)


def test_same_selection_as_weight_regularizer(backend, device):
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3)).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand_like(p) + 0.5)  # nothing starts at zero (BatchNorm's bias does)
    weights = regfuse.WeightRegularizer(model, group_lasso=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=10.0)
    regfuse.ProximalStep(optimizer, group_lasso=weights.group_lasso, params=weights.params, backend=backend)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    selected = {id(p) for p in weights.params}
    for p in model.parameters():
        assert torch.equal(p, torch.zeros_like(p)) == (id(p) in selected)


def test_bad_arguments_are_refused(device):
    w = torch.randn(4, 3, device=device, requires_grad=True)
    bias = torch.randn(4, device=device, requires_grad=True)
    optimizer = torch.optim.SGD([w, bias], lr=0.1)
    with pytest.raises(IndexError, match="tensor 1"):
        regfuse.ProximalStep(optimizer, group_lasso=1.0, dim=1)
    regfuse.ProximalStep(optimizer, group_lasso=1.0, dim=1, params=[w]).remove()  # fine without the bias
    regfuse.ProximalStep(optimizer, l1=1.0, dim=1).remove()  # dim is unused without the group lasso
    with pytest.raises(ValueError, match="not a parameter of the optimizer"):
        regfuse.ProximalStep(optimizer, l1=1.0, params=[torch.randn(3)])
    with pytest.raises(ValueError, match="l1"):
        regfuse.ProximalStep(optimizer, l1=-1.0)
    with pytest.raises(ValueError, match="group_lasso"):
        regfuse.ProximalStep(optimizer, group_lasso=float("nan"))
    with pytest.raises(TypeError, match="Optimizer"):
        regfuse.ProximalStep([w], l1=1.0)
    with pytest.raises(ValueError, match="unknown backend"):
        regfuse.ProximalStep(optimizer, l1=1.0, backend="fastest")
    assert not optimizer._optimizer_step_post_hooks  # refused constructions left no hook
