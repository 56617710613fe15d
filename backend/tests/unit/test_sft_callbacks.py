"""The quick reference's callbacks (SFTCallback, Validation, WandB, Checkpoint), early stopping, the handler.

Everything runs on real objects: a plain `nn.Module` language model, a tiny random Llama with a real PEFT LoRA
adapter, checkpoints written to and deleted from disk, and the real `wandb` package in offline mode.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from helpers import read_wandb_runs, tiny_llama, wandb_offline_runs
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from app.sft import (
    CallbackHandler,
    CheckpointCallback,
    EarlyStoppingCallback,
    SFTCallback,
    ValidationCallback,
    WandBCallback,
)
from app.sft.callbacks.wandb_logger import _has_wandb_credentials
from app.sft.loss import causal_lm_loss_sum

VOCAB = 24


# ---------------------------------------------------------------- test scaffolding (not product code)


class TinyLM(nn.Module):
    """A plain nn.Module language model without any Hugging Face API: embedding, dropout, linear head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(VOCAB, 16)
            self.dropout = nn.Dropout(0.5)
            self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.dropout(self.embed(input_ids)))


def random_batch(batch_size: int, length: int, seed: int, pad_last: int = 0) -> dict[str, torch.Tensor]:
    """A batch of random tokens; the last `pad_last` positions of row 0 are padding (mask 0, label -100)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if pad_last:
        attention_mask[0, -pad_last:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, 0] = -100  # a "prompt" token that is never trained on
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


TRAIN_BATCHES = [random_batch(2, 6, seed) for seed in range(2)]
VAL_BATCHES = [random_batch(1, 12, 10), random_batch(3, 3, 11, pad_last=1)]  # 11 and 5 labelled tokens


class LoopTrainer:
    """The smallest trainer object the callbacks accept, plus a plain loop that fires every event."""

    def __init__(self, model: nn.Module, callbacks: Any = (), **attributes: Any) -> None:
        self.model = model
        self.device = torch.device("cpu")
        self.val_dataloader: Any = None
        self.should_stop = False
        self.global_step = 0
        self.callback_handler = CallbackHandler(callbacks)
        self.step_metrics: list[dict[str, float]] = []
        for name, value in attributes.items():
            setattr(self, name, value)

    def train(self, batches: list[dict[str, torch.Tensor]], epochs: int = 1, fail_at_step: int = 0) -> None:
        optimizer = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=0.5)
        fire = self.callback_handler.fire
        error = None
        fire("on_train_begin", self)
        try:
            for epoch in range(epochs):
                fire("on_epoch_begin", self, epoch=epoch)
                losses = []
                for batch in batches:
                    self.model.train()
                    loss_sum, n_tokens = causal_lm_loss_sum(self.model, batch)
                    (loss_sum / n_tokens).backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    self.global_step += 1
                    if self.global_step == fail_at_step:
                        raise RuntimeError("training failed")
                    metrics = {"loss": (loss_sum / n_tokens).item()}
                    fire("on_step_end", self, step=self.global_step, metrics=metrics)
                    self.step_metrics.append(metrics)
                    losses.append(metrics["loss"])
                    if self.should_stop:
                        break
                fire("on_epoch_end", self, epoch=epoch, metrics={"loss": sum(losses) / len(losses)})
                if self.should_stop:
                    break
        except BaseException as exc:
            error = exc
            raise
        finally:
            fire("on_train_end", self, error=error)


def bare_trainer(model: nn.Module | None = None, **attributes: Any) -> SimpleNamespace:
    """A trainer object with nothing but `model` and `device` (plus what a test adds)."""
    return SimpleNamespace(model=model if model is not None else TinyLM(), device="cpu", **attributes)


def token_weighted_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Reference validation loss, computed independently of the library: sum of token CE / labelled tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            output = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
            logits = output if isinstance(output, torch.Tensor) else output.logits
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
            ).item()
            count += int((labels != -100).sum())
    return total / count


def lora_llama() -> nn.Module:
    """A tiny random Llama with a real LoRA adapter."""
    return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


# ---------------------------------------------------------------- SFTCallback and CallbackHandler


def test_custom_callback_like_the_quick_reference(capsys: pytest.CaptureFixture[str]) -> None:
    class MyCallback(SFTCallback):
        def on_train_begin(self, trainer, **kwargs):
            print("Training started!")

        def on_step_end(self, trainer, step: int, metrics: dict[str, float], **kwargs):
            if step % 2 == 0:
                print(f"Step {step}: loss={metrics.get('loss', 0):.4f}")

        def on_train_end(self, trainer, **kwargs):
            print("Training finished!")

    trainer = LoopTrainer(TinyLM(), [MyCallback()])
    trainer.train(TRAIN_BATCHES, epochs=2)

    losses = [m["loss"] for m in trainer.step_metrics]
    assert capsys.readouterr().out.splitlines() == [
        "Training started!",
        f"Step 2: loss={losses[1]:.4f}",
        f"Step 4: loss={losses[3]:.4f}",
        "Training finished!",
    ]


def test_base_hooks_do_nothing_and_handler_passes_arguments() -> None:
    calls = []

    class OnlyEpochs(SFTCallback):
        def on_epoch_end(self, trainer, epoch, metrics, **kwargs):
            calls.append((trainer, epoch, metrics, kwargs))

    handler = CallbackHandler([OnlyEpochs(), SFTCallback()])
    trainer = bare_trainer()
    for event, kwargs in [
        ("on_train_begin", {}),
        ("on_epoch_begin", {"epoch": 0}),
        ("on_step_end", {"step": 1, "metrics": {"loss": 1.0}}),
        ("on_save", {"step": 1, "checkpoint_path": "x"}),
        ("on_epoch_end", {"epoch": 0, "metrics": {"loss": 1.0}, "extra": True}),
        ("on_train_end", {"error": None}),
    ]:
        handler.fire(event, trainer, **kwargs)

    assert calls == [(trainer, 0, {"loss": 1.0}, {"extra": True})]
    with pytest.raises(ValueError, match="on_step_begin"):
        handler.fire("on_step_begin", trainer)


def test_handler_orders_callbacks_by_order_then_insertion(tmp_path: Path) -> None:
    wandb_cb, first, checkpoint = WandBCallback(), SFTCallback(), CheckpointCallback(tmp_path)
    second, validation, early = SFTCallback(), ValidationCallback(), EarlyStoppingCallback()
    handler = CallbackHandler([wandb_cb, first, checkpoint, second])
    handler.add(validation)
    handler.add(early)

    assert handler.callbacks == [validation, early, first, second, checkpoint, wandb_cb]


def test_handler_rejects_non_callbacks_and_removes_by_instance_or_class(tmp_path: Path) -> None:
    def print_step(trainer):
        pass

    with pytest.raises(TypeError, match="print_step"):
        CallbackHandler([print_step])

    one, two, keep = ValidationCallback(), ValidationCallback(), CheckpointCallback(tmp_path)
    handler = CallbackHandler([one, two, keep])
    handler.remove(one)
    assert handler.callbacks == [two, keep]
    handler.remove(ValidationCallback)
    assert handler.callbacks == [keep]
    with pytest.raises(ValueError, match="not registered"):
        handler.remove(ValidationCallback)


def test_handler_state_round_trip_with_duplicate_keys(caplog: pytest.LogCaptureFixture) -> None:
    first, second = EarlyStoppingCallback(), EarlyStoppingCallback(monitor="loss")
    first.load_state_dict({"best": 0.5, "wait_count": 1, "stopped_step": None})
    second.load_state_dict({"best": 2.0, "wait_count": 2, "stopped_step": None})
    states = CallbackHandler([first, second, SFTCallback()]).state_dict()

    assert set(states) == {"EarlyStoppingCallback", "EarlyStoppingCallback_1", "SFTCallback"}
    restored_first, restored_second = EarlyStoppingCallback(), EarlyStoppingCallback(monitor="loss")
    handler = CallbackHandler([restored_first, restored_second])
    with caplog.at_level(logging.WARNING):
        handler.load_state_dict(json.loads(json.dumps(states)))  # checkpoints store the states as JSON

    assert (restored_first.best, restored_first.wait_count) == (0.5, 1)
    assert (restored_second.best, restored_second.wait_count) == (2.0, 2)
    assert "SFTCallback" in caplog.text


# ---------------------------------------------------------------- ValidationCallback


def test_validation_loss_is_token_weighted_over_all_batches() -> None:
    model = TinyLM()
    callback = ValidationCallback()
    loss = callback._run_validation(bare_trainer(model, val_dataloader=VAL_BATCHES))

    model.eval()
    expected = token_weighted_loss(model, VAL_BATCHES)
    mean_of_batch_means = sum(token_weighted_loss(model, [b]) for b in VAL_BATCHES) / len(VAL_BATCHES)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert abs(expected - mean_of_batch_means) > 1e-3  # the two batches differ, so the weighting matters


def test_validation_sums_over_processes_with_all_reduce() -> None:
    model = TinyLM()
    reduced = []

    def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
        reduced.append(tensor.clone())
        other_rank = torch.tensor([30.0, 10.0])  # (loss sum, tokens) of another process
        return tensor + other_rank

    trainer = bare_trainer(model, val_dataloader=VAL_BATCHES, all_reduce_sum=all_reduce_sum)
    loss = ValidationCallback()._run_validation(trainer)

    local_sum, local_tokens = reduced[0].tolist()
    assert local_tokens == 16
    assert loss == pytest.approx((local_sum + 30.0) / (local_tokens + 10.0))


@pytest.mark.parametrize("was_training", [True, False])
def test_validation_runs_in_eval_mode_without_grad_and_restores_modes(was_training: bool) -> None:
    model = TinyLM().train(was_training)
    model.dropout.train(True)  # a mixed state must come back exactly as it was
    seen = []
    model.head.register_forward_hook(
        lambda *_: seen.append((model.dropout.training, torch.is_grad_enabled()))
    )
    trainer = bare_trainer(model, val_dataloader=VAL_BATCHES)

    first = ValidationCallback()._run_validation(trainer)
    second = ValidationCallback()._run_validation(trainer)

    assert first == second  # dropout was off: validation is deterministic
    assert seen and all(state == (False, False) for state in seen)
    assert model.training is was_training and model.embed.training is was_training
    assert model.dropout.training is True


def test_validation_restores_mode_when_the_model_fails() -> None:
    model = TinyLM().train()
    bad_batches = [{"input_ids": torch.full((1, 4), VOCAB + 5), "labels": torch.ones(1, 4, dtype=torch.long)}]

    with pytest.raises(IndexError):
        ValidationCallback()._run_validation(bare_trainer(model, val_dataloader=bad_batches))
    assert model.training and model.dropout.training


def test_validation_every_eval_steps_writes_metrics_for_later_callbacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[tuple[int, dict[str, float]]] = []

    class Spy(SFTCallback):
        def on_step_end(self, trainer, step, metrics, **kwargs):
            seen.append((step, dict(metrics)))

    validation = ValidationCallback(eval_steps=2, eval_on_epoch_end=False)
    trainer = LoopTrainer(TinyLM(), [Spy(), validation], val_dataloader=VAL_BATCHES)
    with caplog.at_level(logging.INFO, logger="app.sft.callbacks.validation"):
        trainer.train(TRAIN_BATCHES, epochs=3)

    assert [step for step, metrics in seen if "val_loss" in metrics] == [2, 4, 6]
    val_losses = [metrics["val_loss"] for _, metrics in seen if "val_loss" in metrics]
    for step, metrics in seen:
        if step % 2:
            assert set(metrics) == {"loss"}
        else:
            assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
            assert metrics["best_val_loss"] == min(val_losses[: step // 2])
    assert validation.best_val_loss == min(val_losses)
    assert validation.best_step == 2 * (val_losses.index(min(val_losses)) + 1)
    assert "Validation loss improved" in caplog.text


def test_validation_without_data_does_nothing() -> None:
    callback = ValidationCallback(eval_steps=1)
    trainer = bare_trainer()  # only model and device
    metrics = {"loss": 1.0}

    callback.on_train_begin(trainer)
    callback.on_step_end(trainer, step=1, metrics=metrics)
    callback.on_epoch_end(trainer, epoch=0, metrics=metrics)

    assert metrics == {"loss": 1.0}
    assert callback.best_val_loss == float("inf")


def test_validation_at_epoch_end_reuses_the_result_of_the_same_step() -> None:
    class CountingValidation(ValidationCallback):
        runs = 0

        def _run_validation(self, trainer):
            self.runs += 1
            return 10.0 - self.runs

    epoch_metrics = []

    class EpochSpy(SFTCallback):
        def on_epoch_end(self, trainer, epoch, metrics, **kwargs):
            epoch_metrics.append(metrics)

    callback = CountingValidation(eval_steps=2)
    trainer = LoopTrainer(TinyLM(), [EpochSpy(), callback], val_dataloader=VAL_BATCHES)
    trainer.train(
        TRAIN_BATCHES + TRAIN_BATCHES[:1], epochs=2
    )  # 3 steps per epoch: epoch ends at steps 3 and 6

    assert callback.runs == 4  # steps 2, 3 (epoch end), 4 and 6 (step and epoch end share one run)
    assert [m["val_loss"] for m in epoch_metrics] == [8.0, 6.0]
    assert callback.best_val_loss == 6.0


def test_validation_with_dataset_pads_tokenized_rows(tiny_tokenizer) -> None:
    model = lora_llama()
    texts = ["hello world", "what is the capital of france ? paris .", "one two three four five six seven"]
    rows = [{"input_ids": tiny_tokenizer(text)["input_ids"]} for text in texts]
    callback = ValidationCallback(val_dataset=Dataset.from_list(rows))
    trainer = bare_trainer(model, tokenizer=tiny_tokenizer, eval_batch_size=2)

    loss = callback._run_validation(trainer)

    unpadded = [
        {"input_ids": torch.tensor([r["input_ids"]]), "labels": torch.tensor([r["input_ids"]])} for r in rows
    ]
    model.eval()
    assert loss == pytest.approx(token_weighted_loss(model, unpadded), rel=1e-4)
    assert loss == pytest.approx(ValidationCallback(val_dataset=rows)._run_validation(trainer), rel=1e-5)


def test_validation_builds_its_loader_once_with_the_trainer_collation() -> None:
    requests = []

    def make_eval_dataloader(dataset):
        requests.append(dataset)
        return VAL_BATCHES

    raw_rows = [{"text": "hello world"}]
    callback = ValidationCallback(val_dataset=raw_rows, eval_steps=1)
    trainer = bare_trainer(make_eval_dataloader=make_eval_dataloader, global_step=1)
    for step in (1, 2):
        callback.on_step_end(trainer, step=step, metrics={})

    assert requests == [raw_rows]


def test_validation_of_raw_rows_needs_a_trainer_collation() -> None:
    callback = ValidationCallback(val_dataset=[{"text": "hello world"}])
    with pytest.raises(ValueError, match="input_ids.*text"):
        callback._run_validation(bare_trainer())


@pytest.mark.parametrize("eval_steps", [0, -5, 1.5])
def test_validation_rejects_bad_eval_steps(eval_steps: Any) -> None:
    with pytest.raises(ValueError, match="eval_steps"):
        ValidationCallback(eval_steps=eval_steps)


def test_validation_keeps_no_state_of_its_own_the_trainer_has_the_history() -> None:
    callback = ValidationCallback(eval_steps=1)
    callback.on_step_end(bare_trainer(val_dataloader=VAL_BATCHES), step=3, metrics={})
    assert callback.best_step == 3 and math.isfinite(callback.best_val_loss)
    assert callback.state_dict() == {}  # the one record of the best is the trainer's (trainer_state.json)


# ---------------------------------------------------------------- EarlyStoppingCallback


def feed(callback: EarlyStoppingCallback, values: list[float | None]) -> SimpleNamespace:
    """Give `callback` one step per value (None: a step without validation); returns the trainer."""
    trainer = bare_trainer(should_stop=False)
    for step, value in enumerate(values, start=1):
        callback.on_step_end(trainer, step=step, metrics={} if value is None else {"val_loss": value})
    return trainer


def test_early_stopping_counts_validation_checks_without_improvement() -> None:
    callback = EarlyStoppingCallback(patience=3)
    trainer = feed(callback, [1.0, None, 0.9, 0.95, None, 0.91, None])
    assert not trainer.should_stop and callback.wait_count == 2

    trainer = feed(callback, [0.92])
    assert trainer.should_stop
    assert callback.best == 0.9 and callback.stopped_step == 1


def test_early_stopping_min_delta_and_max_mode() -> None:
    callback = EarlyStoppingCallback(patience=2, min_delta=0.1)
    assert not feed(callback, [1.0, 0.95, 0.85]).should_stop  # 0.85 beats 1.0 by more than 0.1
    assert feed(callback, [0.8, 0.78]).should_stop  # neither beats 0.85 by more than 0.1
    assert callback.best == 0.85

    accuracy = EarlyStoppingCallback(patience=1, monitor="accuracy", mode="max")
    trainer = bare_trainer(should_stop=False)
    for step, value in enumerate([0.5, 0.7, 0.6], start=1):
        accuracy.on_step_end(trainer, step=step, metrics={"accuracy": value})
    assert trainer.should_stop and accuracy.best == 0.7 and accuracy.stopped_step == 3


def test_early_stopping_stops_on_non_finite_value(caplog: pytest.LogCaptureFixture) -> None:
    callback = EarlyStoppingCallback(patience=5)
    with caplog.at_level(logging.INFO):
        trainer = feed(callback, [1.0, float("nan")])
    assert trainer.should_stop and callback.stopped_step == 2
    assert "nan" in caplog.text


def test_early_stopping_counts_a_step_and_its_epoch_end_once() -> None:
    callback = EarlyStoppingCallback(patience=2)
    trainer = bare_trainer(should_stop=False, global_step=2)
    callback.on_step_end(trainer, step=1, metrics={"val_loss": 1.0})
    callback.on_step_end(trainer, step=2, metrics={"val_loss": 1.5})
    callback.on_epoch_end(trainer, epoch=0, metrics={"val_loss": 1.5})
    assert callback.wait_count == 1 and not trainer.should_stop


def test_early_stopping_state_survives_resume_and_stopped_runs_stay_stopped() -> None:
    callback = EarlyStoppingCallback(patience=2)
    feed(callback, [1.0, 1.1])
    resumed = EarlyStoppingCallback(patience=2)
    resumed.load_state_dict(json.loads(json.dumps(callback.state_dict())))
    assert feed(resumed, [1.2]).should_stop

    again = EarlyStoppingCallback(patience=2)
    again.load_state_dict(resumed.state_dict())
    trainer = bare_trainer(should_stop=False)
    again.on_train_begin(trainer)
    assert trainer.should_stop


def test_early_stopping_ends_a_real_training_loop() -> None:
    validation = ValidationCallback(eval_steps=1)
    stop = EarlyStoppingCallback(patience=1, min_delta=100.0)  # no change can be an improvement of 100
    trainer = LoopTrainer(TinyLM(), [stop, validation], val_dataloader=VAL_BATCHES)
    trainer.train(TRAIN_BATCHES, epochs=5)
    assert trainer.global_step == 2 and stop.stopped_step == 2


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"patience": 0}, "patience"), ({"min_delta": -0.1}, "min_delta"), ({"mode": "avg"}, "mode")],
)
def test_early_stopping_rejects_bad_arguments(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        EarlyStoppingCallback(**kwargs)


# ---------------------------------------------------------------- CheckpointCallback


def steps_on_disk(directory: Path) -> list[int]:
    return sorted(
        int(p.name.removeprefix("checkpoint_step_").removesuffix(".pt")) for p in directory.iterdir()
    )


def test_checkpoint_of_a_plain_module_is_a_weights_only_state_dict(tmp_path: Path) -> None:
    output_dir = tmp_path / "nested" / "checkpoints"
    callback = CheckpointCallback(output_dir, save_steps=2, save_total_limit=None)
    assert output_dir.is_dir()  # created at construction
    trainer = LoopTrainer(TinyLM(), [callback])
    trainer.train(TRAIN_BATCHES, epochs=2)

    assert callback.checkpoints == [callback._get_checkpoint_path(2), callback._get_checkpoint_path(4)]
    assert callback._get_checkpoint_path(4) == os.path.join(str(output_dir), "checkpoint_step_4.pt")
    saved = torch.load(callback.checkpoints[-1], weights_only=True)
    restored = TinyLM(seed=1)
    restored.load_state_dict(saved)
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor)


def test_checkpoint_of_a_peft_model_is_a_reloadable_adapter_folder(tmp_path: Path) -> None:
    model = lora_llama()
    callback = CheckpointCallback(tmp_path, save_steps=1, save_total_limit=2)
    trainer = LoopTrainer(model, [callback])
    batch = random_batch(2, 5, seed=3)
    trainer.train([batch, batch, batch])

    assert steps_on_disk(tmp_path) == [2, 3]  # step 1 rotated away
    newest = tmp_path / "checkpoint_step_3"
    assert callback.checkpoints[-1] == str(newest)
    assert (newest / "adapter_model.safetensors").is_file() and (newest / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(tiny_llama(), newest).eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, model(**batch).logits, atol=1e-6)


def test_rotation_deletes_oldest_first_but_keeps_the_best(tmp_path: Path) -> None:
    callback = CheckpointCallback(tmp_path, save_steps=1, save_total_limit=2)
    trainer = bare_trainer()
    for step, val_loss in enumerate([3.0, 1.0, 2.0, 2.5, 2.2], start=1):
        callback.on_step_end(trainer, step=step, metrics={"val_loss": val_loss})

    assert steps_on_disk(tmp_path) == [2, 5]
    assert callback.checkpoints == [callback._get_checkpoint_path(2), callback._get_checkpoint_path(5)]
    assert callback.best_checkpoint == callback._get_checkpoint_path(2) and callback.best_val_loss == 1.0

    one = CheckpointCallback(tmp_path / "one", save_steps=1, save_total_limit=1)
    for step, val_loss in enumerate([1.0, 2.0, 3.0], start=1):
        one.on_step_end(trainer, step=step, metrics={"val_loss": val_loss})
    assert steps_on_disk(tmp_path / "one") == [1, 3]  # the best and the newest: a limit of 1 can leave 2


def test_save_best_only_saves_improvements_and_steps_without_val_loss(tmp_path: Path) -> None:
    callback = CheckpointCallback(tmp_path, save_steps=2, save_best_only=True, save_total_limit=None)
    trainer = bare_trainer()
    for step, val_loss in [(2, 1.0), (3, 0.1), (4, 1.5), (6, None), (8, 0.8), (10, float("nan"))]:
        callback.on_step_end(trainer, step=step, metrics={} if val_loss is None else {"val_loss": val_loss})

    assert steps_on_disk(tmp_path) == [2, 6, 8]
    assert callback.best_checkpoint == callback._get_checkpoint_path(8)


def test_validation_result_reaches_a_checkpoint_added_before_it(tmp_path: Path) -> None:
    checkpoint = CheckpointCallback(tmp_path, save_steps=1, save_best_only=True, save_total_limit=None)
    validation = ValidationCallback(eval_steps=1)
    trainer = LoopTrainer(TinyLM(), [checkpoint, validation], val_dataloader=VAL_BATCHES)
    trainer.train(TRAIN_BATCHES, epochs=3)

    val_losses = [m["val_loss"] for m in trainer.step_metrics]
    improved = [
        s for s, v in enumerate(val_losses, start=1) if all(v < before for before in val_losses[: s - 1])
    ]
    assert steps_on_disk(tmp_path) == improved
    assert checkpoint.best_val_loss == validation.best_val_loss == min(val_losses)
    assert checkpoint.best_checkpoint == checkpoint._get_checkpoint_path(improved[-1])


def test_a_replaced_write_still_sees_the_best_follow_the_quick_reference(tmp_path: Path) -> None:
    written = []

    class UploadElsewhere(CheckpointCallback):
        def _save_checkpoint(self, trainer, step, metrics):
            written.append(step)

    callback = UploadElsewhere(tmp_path, save_steps=1, save_best_only=True)
    trainer = bare_trainer()
    callback.on_step_end(trainer, step=1, metrics={"val_loss": 1.0})
    assert (written, callback.best_val_loss) == ([1], 1.0)  # the first save sets it
    callback.on_step_end(trainer, step=2, metrics={"val_loss": 2.0})
    assert (written, callback.best_val_loss) == ([1], 1.0)  # a worse loss neither saves nor changes it
    callback.on_step_end(trainer, step=3, metrics={"val_loss": 0.5})
    assert (written, callback.best_val_loss) == ([1, 3], 0.5)  # a better one saves and lowers it
    assert list(tmp_path.iterdir()) == []


def test_only_the_main_process_writes_in_a_hand_written_loop(tmp_path: Path) -> None:
    callback = CheckpointCallback(tmp_path, save_steps=1, save_best_only=True)
    trainer = bare_trainer(is_main_process=False)
    for step, val_loss in [(1, 1.0), (2, 0.5), (3, 0.7)]:
        callback.on_step_end(trainer, step=step, metrics={"val_loss": val_loss})
    assert list(tmp_path.iterdir()) == []
    assert callback.best_val_loss == 0.5  # the same decisions as the main process


def test_rotation_never_deletes_what_is_not_its_own(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep me")
    folder = tmp_path / "ckpt"
    callback = CheckpointCallback(folder, save_steps=1, save_total_limit=1)
    callback.load_state_dict({"checkpoints": [str(victim), "../precious", "checkpoint_step_1"]})  # crafted
    (folder / "checkpoint_step_9").symlink_to(victim, target_is_directory=True)
    callback._written.append(str(folder / "checkpoint_step_9"))  # a link named like ours
    trainer = bare_trainer()
    for step in (2, 3, 4):
        callback.on_step_end(trainer, step=step, metrics={})
    assert (victim / "notes.txt").read_text() == "keep me"
    assert steps_on_disk(folder) == [4, 9]  # our rotated checkpoints went, the link was left alone
    assert "Not deleting" in caplog.text


def test_rotation_of_checkpoints_listed_by_hand_like_the_quick_reference(tmp_path: Path) -> None:
    """The quick reference's own test: five `torch.save` checkpoints listed in `checkpoints`, then rotation."""
    callback = CheckpointCallback(output_dir=str(tmp_path), save_total_limit=3)
    for step in (10, 20, 30, 40, 50):
        path = os.path.join(str(tmp_path), f"checkpoint_step_{step}.pt")
        torch.save({"step": step}, path)
        callback.checkpoints.append(path)
    foreign = tmp_path / "mine" / "checkpoint_step_5.pt"
    foreign.parent.mkdir()
    foreign.write_text("mine")
    callback.checkpoints.append(str(foreign))  # not a checkpoint of ours: dropped from the list, left on disk
    callback._rotate_checkpoints()

    assert callback.checkpoints == [os.path.join(str(tmp_path), f"checkpoint_step_{s}.pt") for s in (30, 40, 50)]
    assert not os.path.exists(os.path.join(str(tmp_path), "checkpoint_step_10.pt"))
    assert not os.path.exists(os.path.join(str(tmp_path), "checkpoint_step_20.pt"))
    assert foreign.read_text() == "mine"

    callback.checkpoints = [str(tmp_path / "checkpoint_step_40.pt"), str(tmp_path / "checkpoint_step_50.pt")]
    callback.save_total_limit = 1
    callback._rotate_checkpoints()  # an assigned list rotates the same way
    assert callback.checkpoints == [str(tmp_path / "checkpoint_step_50.pt")]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_step_*")) == ["checkpoint_step_30.pt",
                                                                          "checkpoint_step_50.pt"]


def test_checkpoint_state_round_trip_drops_deleted_checkpoints(tmp_path: Path) -> None:
    callback = CheckpointCallback(tmp_path, save_steps=1, save_total_limit=None)
    trainer = bare_trainer()
    for step, val_loss in enumerate([2.0, 1.0, 1.5], start=1):
        callback.on_step_end(trainer, step=step, metrics={"val_loss": val_loss})
    state = json.loads(json.dumps(callback.state_dict()))
    os.remove(callback._get_checkpoint_path(1))

    resumed = CheckpointCallback(tmp_path, save_steps=1, save_total_limit=None)
    resumed.load_state_dict(state)
    assert resumed.checkpoints == [callback._get_checkpoint_path(2), callback._get_checkpoint_path(3)]
    assert (resumed.best_val_loss, resumed.best_checkpoint) == (1.0, callback._get_checkpoint_path(2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"save_steps": 0}, "save_steps"),
        ({"save_total_limit": 0}, "save_total_limit"),
        ({"output_dir": "FILE"}, "output_dir .* is not a directory"),
        ({"output_dir": "FILE/sub"}, "output_dir .* cannot be created"),
    ],
)
def test_checkpoint_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    if "output_dir" in kwargs:
        kwargs["output_dir"] = kwargs["output_dir"].replace("FILE", str(a_file))
    with pytest.raises(ValueError, match=message):
        CheckpointCallback(**{"output_dir": tmp_path / "ok", **kwargs})


# ---------------------------------------------------------------- WandBCallback (real wandb, offline)


def test_wandb_logs_config_steps_validation_epochs_and_summary(wandb_offline: Path) -> None:
    wandb_cb = WandBCallback("sft-tests", run_name="tiny-run", config={"lr": 0.5, "epochs": 2}, entity="team")
    trainer = LoopTrainer(TinyLM(), [wandb_cb, ValidationCallback(eval_steps=2)], val_dataloader=VAL_BATCHES)
    trainer.train(TRAIN_BATCHES, epochs=2)

    assert wandb_cb.run is None  # finished
    log = read_wandb_runs(wandb_offline)[-1]
    assert (log.project, log.entity, log.name) == ("sft-tests", "team", "tiny-run")
    assert log.run_id == wandb_cb.run_id
    assert log.config == {"lr": 0.5, "epochs": 2}
    assert sorted(log.history) == [1, 2, 3, 4]
    for step, metrics in enumerate(trainer.step_metrics, start=1):
        assert {k: log.history[step][k] for k in metrics} == pytest.approx(metrics)
    val_losses = [trainer.step_metrics[1]["val_loss"], trainer.step_metrics[3]["val_loss"]]
    assert log.history[4]["epoch/val_loss"] == pytest.approx(val_losses[1])
    assert log.history[2]["epoch"] == 0 and log.history[4]["epoch"] == 1
    assert "epoch/loss" in log.history[2] and "val_loss" not in log.history[3]
    assert log.summary["best_val_loss"] == pytest.approx(min(val_losses))
    assert log.exit_code == 0


def test_wandb_run_fails_with_training_and_resumes_with_the_same_id(wandb_offline: Path) -> None:
    first = WandBCallback()
    with pytest.raises(RuntimeError, match="training failed"):
        LoopTrainer(TinyLM(), [first], config={"seed": 7}).train(TRAIN_BATCHES, fail_at_step=2)
    state = json.loads(json.dumps(first.state_dict()))

    resumed = WandBCallback()
    resumed.load_state_dict(state)
    trainer = LoopTrainer(TinyLM(), [resumed], global_step=1)
    trainer.train(TRAIN_BATCHES[1:])

    crashed, continued = read_wandb_runs(wandb_offline)
    assert crashed.exit_code == 1 and crashed.config == {"seed": 7}  # trainer.config is logged by default
    assert crashed.run_id == continued.run_id == first.run_id
    assert sorted(crashed.history) == [1] and sorted(continued.history) == [2]
    assert continued.exit_code == 0


def test_wandb_without_credentials_logs_offline_and_says_how_to_sync(
    wandb_offline: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("WANDB_MODE")
    wandb_cb = WandBCallback()
    with caplog.at_level(logging.WARNING):
        LoopTrainer(TinyLM(), [wandb_cb]).train(TRAIN_BATCHES)

    (run_dir,) = wandb_offline_runs(wandb_offline)
    assert f"wandb sync {run_dir}" in caplog.text
    (log,) = read_wandb_runs(wandb_offline)
    assert sorted(log.history) == [1, 2]


def test_wandb_credentials_come_from_api_key_or_netrc(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc_file = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert not _has_wandb_credentials()
    netrc_file.write_text("machine example.com login user password secret\n")
    assert not _has_wandb_credentials()
    netrc_file.write_text("machine api.wandb.ai login user password secret\n")
    assert _has_wandb_credentials()
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    monkeypatch.setenv("WANDB_API_KEY", "secret")
    assert _has_wandb_credentials()


def test_wandb_missing_package_warns_once_and_training_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    wandb_cb = WandBCallback()
    with caplog.at_level(logging.WARNING):
        trainer = LoopTrainer(TinyLM(), [wandb_cb])
        trainer.train(TRAIN_BATCHES)
        trainer.train(TRAIN_BATCHES)

    assert wandb_cb.run is None and trainer.global_step == 4
    assert caplog.text.count("wandb is not installed") == 1


def test_wandb_init_failure_warns_and_training_goes_on(
    wandb_offline: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WANDB_MODE", "not-a-mode")  # the real wandb.init rejects it
    wandb_cb = WandBCallback()
    with caplog.at_level(logging.WARNING):
        trainer = LoopTrainer(TinyLM(), [wandb_cb])
        trainer.train(TRAIN_BATCHES)

    assert wandb_cb.run is None and trainer.global_step == 2
    assert caplog.text.count("wandb.init failed") == 1


def test_wandb_logging_failure_warns_once(wandb_offline: Path, caplog: pytest.LogCaptureFixture) -> None:
    wandb_cb = WandBCallback()
    trainer = bare_trainer(global_step=3)
    wandb_cb.on_train_begin(trainer)
    with caplog.at_level(logging.WARNING):
        wandb_cb.on_step_end(trainer, step=1, metrics={"loss": 1.0, "not_json": object()})
        wandb_cb.on_step_end(trainer, step=2, metrics={"loss": 1.0, "not_json": object()})
        wandb_cb.on_step_end(trainer, step=3, metrics={"loss": 0.5})
    wandb_cb.on_train_end(trainer, error=None)

    assert caplog.text.count("logging to W&B failed") == 1
    log = read_wandb_runs(wandb_offline)[-1]
    assert log.history[3] == {"loss": 0.5} and log.exit_code == 0


def test_wandb_only_the_main_process_logs(wandb_offline: Path) -> None:
    wandb_cb = WandBCallback()
    LoopTrainer(TinyLM(), [wandb_cb], is_main_process=False).train(TRAIN_BATCHES)
    assert wandb_cb.run is None and wandb_cb.run_id is None
    assert wandb_offline_runs(wandb_offline) == []
