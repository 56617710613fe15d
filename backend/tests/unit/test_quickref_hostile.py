"""The quick reference's promises, driven the way its users drive them: from their own hand-written training loop
(a trainer object with little more than `model` and `device`) as well as through the callback handler.

The scaffolding (a plain `nn.Module` language model, batches, the loop trainer) is the contract file's.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_sft_callbacks import TRAIN_BATCHES, VAL_BATCHES, TinyLM, token_weighted_loss

from app.sft import ValidationCallback
from app.sft.loss import causal_lm_loss_sum


def train_one_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One epoch of a user's own loop over the training batches."""
    model.train()
    for batch in TRAIN_BATCHES:
        loss_sum, n_tokens = causal_lm_loss_sum(model, batch)
        (loss_sum / n_tokens).backward()
        optimizer.step()
        optimizer.zero_grad()


# ---------------------------------------------------------------- ValidationCallback


@pytest.mark.parametrize("fires_step_end", [False, True])
def test_epoch_end_validation_of_a_trainer_without_global_step_is_fresh_each_epoch(fires_step_end: bool) -> None:
    """A loop whose trainer has only model, device and data validates the current model at every epoch end."""
    model = TinyLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
    callback = ValidationCallback(eval_steps=1000, eval_on_epoch_end=True)
    trainer = SimpleNamespace(model=model, device="cpu", val_dataloader=VAL_BATCHES)  # no global_step
    callback.on_train_begin(trainer)
    step, reported, expected = 0, [], []
    for epoch in range(3):
        train_one_epoch(model, optimizer)
        if fires_step_end:
            step += len(TRAIN_BATCHES)
            callback.on_step_end(trainer, step=step, metrics={"loss": 1.0})
        metrics = {"loss": 1.0}
        callback.on_epoch_end(trainer, epoch=epoch, metrics=metrics)
        reported.append(metrics["val_loss"])
        model.eval()
        expected.append(token_weighted_loss(model, VAL_BATCHES))

    assert reported == pytest.approx(expected, rel=1e-5)
    assert len(set(reported)) == 3  # training changed the model, so every epoch's loss differs
    assert callback.best_val_loss == pytest.approx(min(expected), rel=1e-5)
