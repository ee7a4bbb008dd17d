"""regfuse.integrations.lightning against Lightning's own clipping.

A small regression module, 3 optimizer steps of 2 accumulated batches. The reference
is the stock Trainer (``gradient_clip_val``, torch's clipping) with the penalty added to
the loss by hand and the proximal step written as an optimizer post-hook by hand; the
callback must give the same trained weights (the same exact zeros), log the same
gradient norms and the penalty, and have run regfuse's functions.
"""
import pytest
import torch
from torch import nn

import regfuse
import regfuse.proximal

pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed (pip install lightning)")
from regfuse.integrations.lightning import RegfuseCallback  # noqa: E402

STEPS, ACCUMULATION, BATCH = 3, 2, 4
L1, L2, PROX_L1, LR, MAX_NORM = 1e-3, 1e-2, 0.1, 0.1, 0.05


class MemoryLogger(pl.loggers.Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict] = []

    name, version = "memory", 0

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def values(self, key: str) -> list[float]:
        return [m[key] for m in self.metrics if key in m]


class Regression(pl.LightningModule):
    def __init__(self, by_hand: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.by_hand = by_hand
        self.norms, self.penalties = [], []

    def weights(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.dim() > 1]  # what WeightRegularizer selects

    def training_step(self, batch, index):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.by_hand:
            penalty = sum(L1 * p.abs().sum() + L2 * p.square().sum() for p in self.weights())
            self.penalties.append(float(penalty.detach()))
            loss = loss + penalty
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.by_hand:  # before Lightning clips
            self.norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in self.parameters()])))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=LR)
        if self.by_hand:
            def soft_threshold(opt, args, kwargs):
                with torch.no_grad():
                    for p in self.weights():
                        p.copy_(p.sign() * (p.abs() - LR * PROX_L1).clamp_min(0))
            optimizer.register_step_post_hook(soft_threshold)
        return optimizer

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        n = STEPS * ACCUMULATION * BATCH
        data = torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g))
        return torch.utils.data.DataLoader(data, batch_size=BATCH)


def fit(module, **trainer_args) -> MemoryLogger:
    logger = MemoryLogger()
    trainer = pl.Trainer(max_steps=STEPS, accumulate_grad_batches=ACCUMULATION, accelerator="cpu",
                         devices=1, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, **trainer_args)
    trainer.fit(module)
    return logger


@pytest.fixture(scope="module")
def runs():
    stock = Regression(by_hand=True)
    fit(stock, gradient_clip_val=MAX_NORM)

    calls = {"clip": 0, "prox": 0}
    clip, prox = regfuse.clip_grad_norm_, regfuse.proximal.prox_l1_

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    regfuse.clip_grad_norm_ = counting("clip", clip)
    regfuse.proximal.prox_l1_ = counting("prox", prox)
    try:
        fused = Regression(by_hand=False)
        logger = fit(fused, callbacks=[RegfuseCallback(max_norm=MAX_NORM, l1=L1, l2=L2, prox_l1=PROX_L1)])
    finally:
        regfuse.clip_grad_norm_, regfuse.proximal.prox_l1_ = clip, prox
    return stock, fused, logger, calls


def test_regfuse_clipped_and_logged_the_stock_norms(runs):
    stock, _, logger, calls = runs
    assert calls == {"clip": STEPS, "prox": STEPS}
    assert len(stock.norms) == STEPS and min(stock.norms) > MAX_NORM  # every step clips
    assert logger.values("grad_norm") == pytest.approx(stock.norms, rel=1e-5)


def test_penalty_was_applied_and_logged(runs):
    stock, _, logger, _ = runs
    # The hand-written loss has the penalty at every batch; the parameters change once a step.
    per_step = stock.penalties[::ACCUMULATION]
    assert logger.values("penalty") == pytest.approx(per_step, rel=1e-5)


def test_same_trained_weights_and_exact_zeros(runs):
    stock, fused, _, _ = runs
    for (name, p), q in zip(fused.named_parameters(), stock.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        if p.dim() > 1:
            assert torch.equal(p == 0, q == 0), name
    assert sum(int((p == 0).sum()) for p in fused.weights()) > 0  # the proximal step acted


class ConfiguredClipping(Regression):
    """The docs' recipe: the module's clipping hook calls regfuse, Lightning's setting kept."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self.log("grad_norm", regfuse.clip_grad_norm_(params, gradient_clip_val))
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def test_configure_gradient_clipping_recipe(runs, monkeypatch):
    stock = runs[0]
    calls = []
    clip = regfuse.clip_grad_norm_
    monkeypatch.setattr(regfuse, "clip_grad_norm_", lambda *a, **k: calls.append(1) or clip(*a, **k))
    module = ConfiguredClipping(by_hand=True)
    logger = fit(module, gradient_clip_val=MAX_NORM)
    assert len(calls) == STEPS
    assert logger.values("grad_norm") == pytest.approx(stock.norms, rel=1e-5)
    for p, q in zip(module.parameters(), stock.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clipping_twice_is_refused():
    with pytest.raises(ValueError, match="leave Trainer\\(gradient_clip_val=...\\) unset"):
        fit(Regression(by_hand=False), gradient_clip_val=1.0, callbacks=[RegfuseCallback(max_norm=1.0)])
