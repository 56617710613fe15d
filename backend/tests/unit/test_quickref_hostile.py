"""The quick reference's promises, driven the way its users drive them: from their own hand-written training loop
(a trainer object with little more than `model` and `device`) as well as through the callback handler.

The scaffolding (a plain `nn.Module` language model, batches, the loop trainer) is the contract file's.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_sft_callbacks import TRAIN_BATCHES, VAL_BATCHES, LoopTrainer, TinyLM, token_weighted_loss

from app.sft import CallbackHandler, SFTCallback, ValidationCallback
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


# ---------------------------------------------------------------- SFTCallback and the handler


def test_a_hook_written_as_the_lifecycle_table_reads_is_refused_when_added_not_at_the_end() -> None:
    """The table lists `on_train_end(trainer)`; the trainer also passes `error=`. Adding such a callback says so
    at once, instead of a TypeError after the whole training ran."""

    class Done(SFTCallback):
        def on_train_end(self, trainer):
            pass

    class Renamed(SFTCallback):
        def on_step_end(self, trainer, global_step, logs, **kwargs):
            pass

    with pytest.raises(TypeError, match=r"Done\.on_train_end\(trainer\) .*error=.*def on_train_end\(self, trainer, "
                                        r"error, \*\*kwargs\)"):
        CallbackHandler([Done()])
    with pytest.raises(TypeError, match=r"Renamed\.on_step_end.*step=\.\.\., metrics=\.\.\."):
        CallbackHandler().add(Renamed())


def test_a_callback_with_only_some_hooks_and_without_kwargs_runs_a_whole_loop() -> None:
    """Hooks that name exactly the documented arguments (no **kwargs) are fine; the others are the base's no-ops."""
    seen = []

    class Steps(SFTCallback):
        def on_step_end(self, trainer, step, metrics):
            seen.append(step)

        def on_train_end(self, trainer, error):
            seen.append(error)

    trainer = LoopTrainer(TinyLM(), [Steps()])
    trainer.train(TRAIN_BATCHES, epochs=2)
    assert seen == [1, 2, 3, 4, None]
