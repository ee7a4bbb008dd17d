"""ActivationRegularizer, WeightRegularizer and sparsity_report against plain PyTorch."""
import gc
import math
import weakref

import pytest
import torch
from torch import nn

import regfuse
import regfuse.training

L1, L2 = 0.03, 0.02


def plain_penalty(tensors, l1=L1, l2=L2):
    """The loop people write: the oracle for regfuse.penalty in these tests."""
    return sum(l1 * t.abs().sum() + l2 * t.pow(2).sum() for t in tensors)


def param_grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def assert_grads_close(actual, expected, **tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert (a is None) == (e is None)
        if a is not None:
            torch.testing.assert_close(a, e, **tol)


class TwoReLUNet(nn.Module):
    """One ReLU module called twice per forward, the case forward hooks must count twice."""

    def __init__(self, inplace=False):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 10), nn.Linear(10, 8), nn.Linear(8, 3)
        self.relu = nn.ReLU(inplace=inplace)

    def forward(self, x):
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))

    def activations(self, x):
        """The two ReLU outputs, computed without hooks."""
        a1 = torch.relu(self.fc1(x))
        return a1, torch.relu(self.fc2(a1))


@pytest.fixture
def net(device):
    torch.manual_seed(0)
    return TwoReLUNet().to(device)


# ---- ActivationRegularizer ---------------------------------------------------------------

def test_activation_penalty_and_gradients_match_plain(net, device, backend):
    x = torch.randn(5, 6, device=device)
    reg = regfuse.ActivationRegularizer(net.relu, l1=L1, l2=L2, backend=backend)
    loss = net(x).sum() + reg.penalty()
    loss.backward()
    got = param_grads(net)
    assert len(reg.captured) == 2  # the ReLU module is called twice

    net.zero_grad(set_to_none=True)
    reg.remove()
    expected = net(x).sum() + plain_penalty(net.activations(x))
    expected.backward()
    torch.testing.assert_close(loss, expected)
    assert_grads_close(got, param_grads(net))


class TupleOut(nn.Module):
    def forward(self, x):
        return x * 2, ({"b": x + 1}, torch.arange(3)), "label"


def test_tuple_output_contributes_its_floating_tensors():
    module = TupleOut()
    reg = regfuse.ActivationRegularizer([module, module], l1=1.0)  # one hook, not two
    x = torch.randn(4, requires_grad=True)
    module(x)
    assert len(reg.captured) == 2  # x * 2 and x + 1; the int64 arange and the str are skipped
    torch.testing.assert_close(reg.penalty(), (x * 2).abs().sum() + (x + 1).abs().sum())


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_nothing_captured_without_grad(net, context):
    reg = regfuse.ActivationRegularizer(net.relu, l1=L1)
    with context():
        net(torch.randn(3, 6))
    assert reg.captured == []
    assert reg.penalty().item() == 0.0


def test_clear_drops_every_reference(net):
    alive = []
    net.relu.register_forward_hook(lambda m, i, out: alive.append(weakref.ref(out)))
    reg = regfuse.ActivationRegularizer(net.relu, l1=L1)
    loss = net(torch.randn(3, 6)).sum() + reg.penalty()
    loss.backward()
    del loss
    gc.collect()
    assert len(alive) == 2 and all(ref() is not None for ref in alive)  # held by reg
    reg.clear()
    gc.collect()
    assert all(ref() is None for ref in alive)


def test_remove_and_context_manager_take_the_hooks_off(net):
    with regfuse.ActivationRegularizer([net.relu, net.fc3], l1=L1) as reg:
        net(torch.randn(2, 6))
        assert len(reg.captured) == 3
    assert reg.captured == []
    assert not net.relu._forward_hooks and not net.fc3._forward_hooks
    net(torch.randn(2, 6))
    assert reg.captured == []


def test_inplace_relu_captures_the_rectified_output(device, backend):
    torch.manual_seed(1)
    inplace = TwoReLUNet(inplace=True).to(device)
    x = torch.randn(5, 6, device=device)
    reg = regfuse.ActivationRegularizer(inplace.relu, l1=L1, l2=L2, backend=backend)
    loss = inplace(x).sum() + reg.penalty()
    loss.backward()
    assert all(bool((a >= 0).all()) for a in reg.captured)
    got = param_grads(inplace)

    inplace.zero_grad(set_to_none=True)
    reg.remove()
    expected = inplace(x).sum() + plain_penalty(inplace.activations(x))
    expected.backward()
    torch.testing.assert_close(loss, expected)
    assert_grads_close(got, param_grads(inplace))


def test_hook_before_an_inplace_relu_warns():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True))
    reg = regfuse.ActivationRegularizer(model[0], l1=1.0)
    out = model(torch.randn(8, 4))
    with pytest.warns(UserWarning, match="modified in place"):
        value = reg.penalty()
    torch.testing.assert_close(value, out.abs().sum())  # the rectified values, as documented


def test_bf16_autocast(net, backend):
    reg = regfuse.ActivationRegularizer(net.relu, l1=L1, l2=L2, backend=backend)
    x = torch.randn(4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert all(a.dtype == torch.bfloat16 for a in reg.captured)
    value = reg.penalty()
    assert value.dtype == torch.float32
    expected = plain_penalty([a.float() for a in reg.captured])
    torch.testing.assert_close(value, expected, rtol=1e-3, atol=1e-3)
    (out.float().sum() + value).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.slow
def test_torch_compile_of_the_hooked_model(net):
    # aot_eager runs what matters here (Dynamo tracing the hooks, AOTAutograd, the fake
    # implementations of the ops) without the minutes of C++ compilation of inductor.
    x = torch.randn(5, 6)
    reg = regfuse.ActivationRegularizer(net.relu, l1=L1, l2=L2)
    eager = net(x).sum() + reg.penalty()
    eager.backward()
    expected_grads = param_grads(net)
    net.zero_grad(set_to_none=True)
    reg.clear()

    compiled = torch.compile(net, backend="aot_eager")
    loss = compiled(x).sum() + reg.penalty()
    loss.backward()
    assert len(reg.captured) == 2
    torch.testing.assert_close(loss, eager)
    assert_grads_close(param_grads(net), expected_grads)


def test_activation_regularizer_rejects_bad_arguments(net):
    with pytest.raises(ValueError):
        regfuse.ActivationRegularizer(net.relu, l1=-1.0)
    with pytest.raises(ValueError):
        regfuse.ActivationRegularizer(net.relu, backend="nope")
    with pytest.raises(TypeError):
        regfuse.ActivationRegularizer([net.relu, "fc1"])
    assert not net.relu._forward_hooks  # a failed construction leaves no hook behind


# ---- WeightRegularizer -------------------------------------------------------------------

class ZooNet(nn.Module):
    """One of each layer kind that weight selection must sort."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 4, 3)
        self.bn = nn.BatchNorm1d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm1d(4, affine=True)
        self.ln = nn.LayerNorm([4, 3])  # a 2-D weight: excluded as a norm layer, not by shape
        self.rms = nn.RMSNorm(3)
        self.fc = nn.Linear(12, 2)
        self.scale = nn.Parameter(torch.ones(2, 2))
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)
        self.fc_tied = self.fc  # shared: selected once


def test_weight_selection_excludes_biases_norms_and_frozen():
    reg = regfuse.WeightRegularizer(ZooNet(), l2=1.0)
    assert reg.names == ["scale", "emb.weight", "conv.weight", "fc.weight"]  # own params first
    everything = regfuse.WeightRegularizer(ZooNet(), l2=1.0, exclude_bias_and_norm=False)
    model = ZooNet()
    expected = [n for n, p in model.named_parameters() if p.requires_grad]
    assert everything.names == expected and "ln.weight" in expected and "fc.bias" in expected


def test_iterable_selects_exactly_those():
    model = nn.Linear(3, 2)
    reg = regfuse.WeightRegularizer([model.bias, model.weight], l1=1.0)
    assert reg.names is None
    assert reg.params[0] is model.bias and reg.params[1] is model.weight
    with pytest.raises(TypeError):
        regfuse.WeightRegularizer([model.weight, 3.0])


def weight_model(device):
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).to(device)


def loss_and_grads(model, x, extra=lambda: 0):
    model.zero_grad(set_to_none=True)
    loss = model(x).pow(2).mean() + extra()
    loss.backward()
    return loss.detach(), param_grads(model)


def assert_three_routes(model, x, reg, by_hand):
    """``reg.penalty()`` in the loss, ``reg.add_grad_()`` after ``backward()`` and
    ``reg.attach()`` each give the gradient of the loss plus ``by_hand()``; returns the
    attach handle, still attached."""
    _, expected = loss_and_grads(model, x, by_hand)
    _, with_penalty = loss_and_grads(model, x, reg.penalty)
    assert_grads_close(with_penalty, expected)
    loss_and_grads(model, x)
    reg.add_grad_()
    assert_grads_close(param_grads(model), expected)
    handle = reg.attach()
    _, attached = loss_and_grads(model, x)
    assert_grads_close(attached, expected)
    return handle


def test_penalty_add_grad_and_attach_give_the_same_gradient(device, backend):
    model = weight_model(device)
    x = torch.randn(4, 6, device=device)
    reg = regfuse.WeightRegularizer(model, l1=L1, l2=L2, backend=backend)
    assert reg.names == ["0.weight", "3.weight"]
    weights = [model[0].weight, model[3].weight]

    torch.testing.assert_close(reg.penalty(), plain_penalty(weights))
    assert_three_routes(model, x, reg, lambda: plain_penalty(weights)).remove()
    _, detached = loss_and_grads(model, x)
    _, plain = loss_and_grads(model, x)
    assert_grads_close(detached, plain)


@pytest.mark.parametrize("l1, l2, group_dim", [(0.0, 0.0, 0), (L1, 0.0, 1), (L1, L2, 0)],
                         ids=["group", "sparse_group_dim1", "all_terms"])
def test_group_lasso_in_all_three_routes(device, backend, l1, l2, group_dim):
    model = weight_model(device)
    x = torch.randn(4, 6, device=device)
    with torch.no_grad():
        model[0].weight[2] = 0  # an all-zero group along dim 0 (its subgradient is 0)
    reg = regfuse.WeightRegularizer(model, l1=l1, l2=l2, group_lasso=0.05, group_dim=group_dim,
                                    backend=backend)
    weights = [model[0].weight, model[3].weight]

    def by_hand():
        rows = [w if group_dim == 0 else w.t() for w in weights]
        group = sum(0.05 * math.sqrt(r.shape[1]) * r.norm(dim=1).sum() for r in rows)
        return group + plain_penalty(weights, l1, l2)

    torch.testing.assert_close(reg.penalty(), by_hand())
    assert_three_routes(model, x, reg, by_hand).remove()
    assert "group_lasso=0.05" in repr(reg)


def test_group_lasso_needs_a_valid_group_dim():
    with pytest.raises(IndexError):
        regfuse.WeightRegularizer(nn.Linear(3, 2), group_lasso=1.0, group_dim=2)
    with pytest.raises(ValueError, match="group_lasso"):
        regfuse.WeightRegularizer(nn.Linear(3, 2), group_lasso=-1.0)
    regfuse.WeightRegularizer(nn.Linear(3, 2), group_dim=2)  # unused without group_lasso


def test_attach_is_one_fused_call_per_backward(monkeypatch):
    calls = []
    real = regfuse.training.add_penalty_grad_
    monkeypatch.setattr(regfuse.training, "add_penalty_grad_",
                        lambda params, *a, **k: (calls.append(len(params)), real(params, *a, **k)))
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])
    reg = regfuse.WeightRegularizer(model, l2=L2)
    reg.attach()
    model(torch.randn(2, 4)).sum().backward()
    assert calls == [6]


def test_attach_skips_params_without_a_gradient_and_accumulates_per_backward():
    model = weight_model("cpu")
    x = torch.randn(4, 6)
    reg = regfuse.WeightRegularizer(model, l2=L2)
    handle = reg.attach()
    hidden = model[:3](x).detach()  # backward through the last layer only
    model[3](hidden).sum().backward()
    assert model[0].weight.grad is None
    torch.testing.assert_close(model[3].weight.grad,
                               hidden.sum(0).expand(3, 8) + 2 * L2 * model[3].weight)

    model.zero_grad(set_to_none=True)
    for _ in range(2):  # two accumulated backward passes: the penalty gradient twice
        model(x).pow(2).mean().backward()
    accumulated = param_grads(model)
    handle.remove()
    _, once = loss_and_grads(model, x, lambda: plain_penalty([model[0].weight, model[3].weight], 0, L2))
    torch.testing.assert_close(accumulated[0], 2 * once[0])


def test_attach_rejects_twice_and_non_leaves():
    model = nn.Linear(3, 3)
    reg = regfuse.WeightRegularizer(model, l1=L1)
    handle = reg.attach()
    with pytest.raises(RuntimeError, match="already attached"):
        reg.attach()
    handle.remove()
    reg.attach().remove()
    with pytest.raises(ValueError, match="leaf"):
        regfuse.WeightRegularizer([model.weight * 2], l1=L1).attach()


# ---- sparsity_report ---------------------------------------------------------------------

def test_sparsity_report_counts_zeros_and_norms(backend, device):
    a = torch.tensor([[0.0, 1.5], [-2.0, 0.0]], device=device)
    b = torch.zeros(5, dtype=torch.float16, device=device)
    c = torch.randn(7, 3, device=device).t()  # non-contiguous
    report = regfuse.sparsity_report({"a": a, "b": b, "c": c}, backend=backend)
    assert [r.name for r in report.rows] == ["a", "b", "c"]
    assert [r.zeros for r in report.rows] == [2, 5, int((c == 0).sum())]
    assert report.rows[0].sparsity == 0.5 and report.rows[1].sparsity == 1.0
    assert report.zeros == 7 + int((c == 0).sum()) and report.numel == 4 + 5 + 21
    for r, t in zip(report.rows, (a, b, c)):
        assert r.l1 == pytest.approx(t.double().abs().sum().item(), rel=1e-6)
        assert r.l2 == pytest.approx(t.double().norm().item(), rel=1e-6)
    assert report.rows[0].mean_abs == pytest.approx(3.5 / 4)
    logged = report.as_dict("train/")
    assert logged["train/sparsity/b"] == 1.0 and logged["train/l1/a"] == pytest.approx(3.5)
    assert "total" in str(report) and "c" in str(report)


def test_sparsity_report_counts_zero_groups(backend, device):
    conv = torch.randn(6, 2, 3, device=device)
    conv[[1, 4]] = 0
    conv[0, 0] = 0  # zeros in a group that is not all zero
    bias = torch.tensor([0.0, 1.0, 0.0], device=device)
    report = regfuse.sparsity_report([("conv", conv), ("bias", bias), ("scalar", torch.zeros((), device=device)),
                                      ("empty", torch.zeros(0, 4, device=device))], backend=backend)
    assert [(r.groups, r.zero_groups) for r in report.rows] == [(6, 2), (3, 2), (1, 1), (0, 0)]
    assert report.rows[0].group_sparsity == pytest.approx(1 / 3) and report.rows[3].group_sparsity == 0.0
    assert report.as_dict()["zero_groups/bias"] == pytest.approx(2 / 3)
    assert "2/6" in str(report)


def test_sparsity_report_of_a_model_and_of_nothing():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.bias.zero_()
    report = regfuse.sparsity_report(model)
    assert [r.name for r in report.rows] == ["weight", "bias"] and report.rows[1].sparsity == 1.0
    assert regfuse.sparsity_report([]).rows == []
    with pytest.raises(TypeError):
        regfuse.sparsity_report([model.weight])
