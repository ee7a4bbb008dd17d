"""regfuse.integrations.transformers against the stock ``transformers.Trainer``.

A tiny GPT-2 built from a config (nothing downloaded), random tokens, 3 optimizer steps
with 2 accumulated micro-batches each and a max_grad_norm that clips every step. The
reference is the stock Trainer with the penalty added to the loss by hand (a torch
loop): the logged ``grad_norm`` and ``loss``, and the trained weights, must be the same,
regfuse's clipping must have run, and the penalty must be in the loss and logged.
"""
import pytest
import torch

import regfuse

transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(pip install transformers)")
pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")
from regfuse.integrations.transformers import RegfuseTrainer  # noqa: E402

STEPS, ACCUMULATION, BATCH, SEQ = 3, 2, 2, 8
L1, L2 = 1e-3, 1e-2
MAX_GRAD_NORM = 0.05


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=SEQ,
                                    bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def token_dataset():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (STEPS * ACCUMULATION * BATCH, SEQ), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def arguments(tmp_path):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATION, learning_rate=1e-2, max_grad_norm=MAX_GRAD_NORM,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True)


def naive_penalty(params) -> torch.Tensor:
    return sum(L1 * p.abs().sum() + L2 * p.square().sum() for p in params)


class HandPenalizedTrainer(transformers.Trainer):
    """The stock Trainer with the penalty a user adds by hand, counted once per step."""

    def __init__(self, *args, params, **kwargs):
        super().__init__(*args, **kwargs)
        self.params, self.penalties = params, []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        penalty = naive_penalty(self.params)
        self.penalties.append(float(penalty.detach()))
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # GPT-2 normalized its loss over the accumulated batch: the Trainer does not
            # divide it by the accumulation steps, so the penalty is divided here.
            return loss + penalty / self.current_gradient_accumulation_steps
        return loss + penalty  # a per-batch mean: the Trainer divides the whole loss


def train_logs(trainer, normalized_loss: bool) -> list[dict]:
    # Without loss kwargs the model returns a per-batch mean that the Trainer divides by
    # the accumulation steps; with them (GPT-2's default) a loss over the accumulated batch.
    trainer.model_accepts_loss_kwargs = normalized_loss
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module", params=[True, False], ids=["normalized-loss", "mean-loss"])
def runs(request, tmp_path_factory):
    """The stock and the regfuse Trainer, trained once for every test of this file."""
    stock_model, fused_model = tiny_gpt2(), tiny_gpt2()
    stock = HandPenalizedTrainer(
        model=stock_model, args=arguments(tmp_path_factory.mktemp("stock")),
        train_dataset=token_dataset(), params=regfuse.WeightRegularizer(stock_model).params)
    stock_logs = train_logs(stock, request.param)

    calls = []
    clip = regfuse.clip_grad_norm_
    regfuse.clip_grad_norm_ = lambda *a, **k: calls.append(1) or clip(*a, **k)
    try:
        fused = RegfuseTrainer(model=fused_model, args=arguments(tmp_path_factory.mktemp("fused")),
                               train_dataset=token_dataset(),
                               regularizer=regfuse.WeightRegularizer(fused_model, l1=L1, l2=L2))
        fused_logs = train_logs(fused, request.param)
    finally:
        regfuse.clip_grad_norm_ = clip
    return {"stock": stock, "stock_logs": stock_logs, "fused": fused, "fused_logs": fused_logs,
            "clip_calls": calls}


def test_clipping_is_regfuses_with_the_stock_grad_norm(runs):
    assert len(runs["clip_calls"]) == STEPS  # one fused clip per optimizer step
    stock, fused = runs["stock_logs"], runs["fused_logs"]
    assert len(stock) == len(fused) == STEPS
    for s, f in zip(stock, fused):
        assert s["grad_norm"] > MAX_GRAD_NORM  # every step clips
        assert f["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-5)


def test_penalty_is_in_the_loss_and_logged(runs):
    stock, fused = runs["stock_logs"], runs["fused_logs"]
    # The stock Trainer computed the same penalty at each micro-batch; the mean per step.
    per_step = torch.tensor(runs["stock"].penalties).reshape(STEPS, ACCUMULATION).mean(1)
    for s, f, want in zip(stock, fused, per_step.tolist()):
        assert f["loss"] == pytest.approx(s["loss"], rel=1e-5)
        assert f["penalty"] == pytest.approx(want, rel=1e-5)
        assert 0.01 * f["loss"] < f["penalty"] < f["loss"]  # a visible share of the loss


def test_same_trained_weights(runs):
    stock = dict(runs["stock"].model.named_parameters())
    for name, p in runs["fused"].model.named_parameters():
        torch.testing.assert_close(p, stock[name], rtol=1e-4, atol=1e-6, msg=name)


def test_evaluation_loss_has_no_penalty(runs):
    fused = runs["fused"]
    batch = fused.data_collator(token_dataset()[:BATCH])
    fused.model.eval()
    with torch.no_grad():
        plain = fused.model(**batch).loss
        loss = fused.compute_loss(fused.model, batch)
    torch.testing.assert_close(loss, plain)
