"""The quick reference's promises, driven the way its users drive them: from their own hand-written training loop
(a trainer object with little more than `model` and `device`, the events fired through `CallbackHandler`) and
with `SFTTrainer`.

The scaffolding (a plain `nn.Module` language model, batches, the loop trainer) is the contract file's.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset as HFDataset
from helpers import read_wandb_runs, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from test_sft_callbacks import (
    TRAIN_BATCHES,
    VAL_BATCHES,
    LoopTrainer,
    TinyLM,
    bare_trainer,
    lora_llama,
    random_batch,
    token_weighted_loss,
)
from test_trainer import instruction_rows, make_config
from torch.utils.data import Dataset

from app.sft import (
    CallbackHandler,
    CheckpointCallback,
    EarlyStoppingCallback,
    SFTCallback,
    SFTTrainer,
    ValidationCallback,
    WandBCallback,
)
from app.sft.callbacks.base import trainer_api
from app.sft.errors import DataError
from app.sft.loss import causal_lm_loss_sum

# ---------------------------------------------------------------- ValidationCallback


def train_one_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One epoch of a user's own loop over the training batches."""
    model.train()
    for batch in TRAIN_BATCHES:
        loss_sum, n_tokens = causal_lm_loss_sum(model, batch)
        (loss_sum / n_tokens).backward()
        optimizer.step()
        optimizer.zero_grad()


def model_state(model: torch.nn.Module) -> dict[str, Any]:
    """Everything validation must leave as it found: modes, requires_grad, gradients, weights and the RNGs."""
    return {
        "modes": {name: module.training for name, module in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "grads": {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()},
        "weights": {name: p.detach().clone() for name, p in model.named_parameters()},
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
    }


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["modes"] == before["modes"] and after["requires_grad"] == before["requires_grad"]
    for kind in ("grads", "weights"):
        for name, value in before[kind].items():
            assert (value is None and after[kind][name] is None) or torch.equal(value, after[kind][name]), name
    assert torch.equal(before["rng"][0], after["rng"][0]) and before["rng"][1] == after["rng"][1]
    assert np.array_equal(before["rng"][2], after["rng"][2])


def test_validation_mid_accumulation_leaves_a_lora_model_as_it_found_it_also_when_it_fails(tiny_llama) -> None:
    """Validation between two micro-batches of a LoRA model in train mode (one module switched off by hand)."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj"]))
    model.train()
    next(m for m in model.modules() if isinstance(m, torch.nn.Dropout)).eval()
    batch = {"input_ids": torch.tensor([[1, 5, 7, 9, 2]]), "labels": torch.tensor([[-100, 5, 7, 9, 2]])}
    loss_sum, n_tokens = causal_lm_loss_sum(model, batch)
    (loss_sum / n_tokens).backward()  # gradients of the first micro-batch, not yet stepped
    rows = [{"input_ids": [1, 2, 3, 4]}, {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}]
    trainer = bare_trainer(model)
    before = model_state(model)

    callback = ValidationCallback(val_dataset=HFDataset.from_list(rows), eval_steps=1)
    callback.on_train_begin(trainer)
    metrics: dict[str, float] = {}
    callback.on_step_end(trainer, step=1, metrics=metrics)
    assert metrics["val_loss"] > 0
    assert_same_state(before, model_state(model))

    broken = ValidationCallback(val_dataset=[{"input_ids": [1, 10_000]}], eval_steps=1)  # an id past the vocabulary
    broken.on_train_begin(trainer)
    with pytest.raises(IndexError):
        broken.on_step_end(trainer, step=1, metrics={})
    assert_same_state(before, model_state(model))


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


def test_a_trainer_with_only_a_model_sends_batches_where_the_model_is() -> None:
    """`SimpleNamespace(model=model)` after `model.to(device)`: validation batches follow the model, not "cpu"."""
    on_meta = TinyLM().to("meta")  # a device other than the CPU that every machine has
    assert trainer_api(SimpleNamespace(model=on_meta)).device == torch.device("meta")
    assert trainer_api(SimpleNamespace(model=on_meta, device="cpu")).device == "cpu"  # a given device is kept
    model = TinyLM().to(torch.bfloat16)
    callback = ValidationCallback(eval_steps=1)
    metrics: dict[str, float] = {}
    callback.on_step_end(SimpleNamespace(model=model, val_dataloader=VAL_BATCHES), step=1, metrics=metrics)
    assert metrics["val_loss"] == pytest.approx(token_weighted_loss(model.eval(), VAL_BATCHES), rel=1e-2)


class TensorRows(Dataset):
    """A torch Dataset of token-id tensors, the way many hand-written loops keep their data."""

    def __init__(self, rows: list[list[int]], as_dicts: bool) -> None:
        self.rows, self.as_dicts = rows, as_dicts

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        ids = torch.tensor(self.rows[index])
        return {"input_ids": ids} if self.as_dicts else ids


ROWS = [[1, 5, 7, 9, 2], [3, 4, 4], [8, 8, 1, 2, 3, 4, 5]]


def test_the_same_tokenized_rows_validate_alike_in_every_container() -> None:
    """A list of dicts, a datasets.Dataset (plain, torch-formatted, with `labels` in only some rows) and a torch
    Dataset of dicts."""
    model = TinyLM()
    trainer = bare_trainer(model, eval_batch_size=2)
    dicts = [{"input_ids": row} for row in ROWS]
    with_labels = [row if i else dict(row, labels=row["input_ids"]) for i, row in enumerate(dicts)]
    containers = [dicts, HFDataset.from_list(dicts), HFDataset.from_list(dicts).with_format("torch"),
                  TensorRows(ROWS, as_dicts=True), HFDataset.from_list(with_labels)]  # rows 1 and 2: labels None
    losses = []
    for container in containers:
        callback = ValidationCallback(val_dataset=container, eval_steps=1)
        callback.on_train_begin(trainer)
        metrics: dict[str, float] = {}
        callback.on_step_end(trainer, step=1, metrics=metrics)
        losses.append(metrics["val_loss"])

    model.eval()
    expected = token_weighted_loss(model, [{"input_ids": torch.tensor([r]), "labels": torch.tensor([r])} for r in ROWS])
    assert losses == pytest.approx([expected] * 5, rel=1e-5)


@pytest.mark.parametrize(
    ("val_dataset", "message"),
    [
        ([{"text": "hello world"}], r"no 'input_ids' \(its keys: \['text'\]\); pass tokenized examples"),
        (HFDataset.from_list([{"instruction": "hi", "output": "hello"}]), r"its keys: \['instruction', 'output'\]"),
        (TensorRows(ROWS, as_dicts=False), r"validation example is a Tensor, not a dict; pass tokenized"),
        ([(torch.tensor([1, 2]), torch.tensor([1, 2]))], r"validation example is a (list|tuple), not a dict"),
        ([{"input_ids": []}], r"empty 'input_ids'"),
        ([], r"val_dataset is empty"),
        ([{"input_ids": [1, 2, 3], "labels": [1, 2, 3, 4, 5]}], r"has 5 'labels' for its 3 'input_ids'"),
        ([{"input_ids": [1, 2, 3, 4], "labels": [1, 2]}], r"has 2 'labels' for its 4 'input_ids'"),
        ([{"input_ids": [1, 2, 3], "attention_mask": [1, 1]}], r"has 2 'attention_mask' for its 3 'input_ids'"),
    ],
)
def test_unusable_validation_rows_fail_clearly_when_training_begins(val_dataset: Any, message: str) -> None:
    """A trainer with only model and device cannot tokenize: raw or odd rows are refused before the first step,
    with one message saying what to pass, not a tensor error from deep inside evaluation at step `eval_steps`."""
    callback = ValidationCallback(val_dataset=val_dataset, eval_steps=500)
    with pytest.raises(ValueError, match=message):
        callback.on_train_begin(bare_trainer())


@pytest.mark.parametrize("make", [lambda rows: (row for row in rows), iter, lambda rows: map(dict, rows)])
def test_a_one_shot_iterator_as_val_dataset_is_refused_when_the_callback_is_made(make: Any) -> None:
    """Validation reads its data many times; a generator would be a bare `has no len()` TypeError (or empty)."""
    rows = [{"input_ids": row} for row in ROWS]
    with pytest.raises(ValueError, match=r"val_dataset is a one-shot iterator \(\w+\).*pass a list"):
        ValidationCallback(val_dataset=make(rows))


# ---------------------------------------------------------------- EarlyStoppingCallback


def run_loop_without_global_step(trainer: SimpleNamespace, callbacks: list[SFTCallback], epochs: int) -> int:
    """A user's loop that fires the events but keeps its step count to itself; returns the steps it took."""
    handler = CallbackHandler(callbacks)
    optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.5)
    handler.fire("on_train_begin", trainer)
    step = 0
    for epoch in range(epochs):
        for batch in TRAIN_BATCHES:
            trainer.model.train()
            loss_sum, n_tokens = causal_lm_loss_sum(trainer.model, batch)
            (loss_sum / n_tokens).backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            handler.fire("on_step_end", trainer, step=step, metrics={"loss": (loss_sum / n_tokens).item()})
        handler.fire("on_epoch_end", trainer, epoch=epoch, metrics={"loss": 1.0})
        if trainer.should_stop:
            break
    handler.fire("on_train_end", trainer, error=None)
    return step


@pytest.mark.parametrize("eval_steps", [1000, 2])  # epoch ends only; every step end that ends an epoch too
def test_early_stopping_counts_each_epoch_end_once_without_global_step(eval_steps: int) -> None:
    """Patience 2 with no possible improvement: the checks at epochs 0, 1 and 2 stop training at step 6."""
    stop = EarlyStoppingCallback(patience=2, min_delta=100.0)
    trainer = SimpleNamespace(model=TinyLM(), device="cpu", val_dataloader=VAL_BATCHES, should_stop=False)
    steps = run_loop_without_global_step(trainer, [ValidationCallback(eval_steps=eval_steps), stop], epochs=5)
    assert (steps, stop.stopped_step, stop.wait_count) == (6, 6, 2)


# ---------------------------------------------------------------- SFTCallback and the handler


def test_a_hook_written_as_the_lifecycle_table_reads_runs_and_a_renamed_one_is_refused_when_added() -> None:
    """The table lists `on_train_end(trainer)`: such a hook is called without the trainer's extra `error=`. A hook
    that cannot take the table's arguments (renamed `step`/`metrics`) is refused when it is added, not after the
    whole training ran."""
    ended = []

    class Done(SFTCallback):
        def on_train_end(self, trainer):
            ended.append(trainer)

    class Renamed(SFTCallback):
        def on_step_end(self, trainer, global_step, logs, **kwargs):
            pass

    handler = CallbackHandler([Done()])
    handler.fire("on_train_end", "the trainer", error=None)
    assert ended == ["the trainer"]
    with pytest.raises(TypeError, match=r"Renamed\.on_step_end.*step=\.\.\., metrics=\.\.\..*"
                                        r"def on_step_end\(self, trainer, step, metrics, \*\*kwargs\)"):
        CallbackHandler().add(Renamed())


def test_a_hook_switched_off_with_none_is_refused_naming_it() -> None:
    class Quiet(SFTCallback):
        on_step_end = None

    with pytest.raises(TypeError, match=r"Quiet\.on_step_end is None, not a method"):
        CallbackHandler([Quiet()])


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


# ---------------------------------------------------------------- CheckpointCallback


@pytest.mark.parametrize("wrap", [lambda m: torch.compile(m, backend="eager"), torch.nn.DataParallel])
def test_checkpoint_of_a_wrapped_plain_module_loads_into_the_module_itself(tmp_path: Path, wrap: Any) -> None:
    """A hand-written loop trains `torch.compile(model)` (or a DataParallel one): its `.pt` checkpoint holds the
    model's own keys, so `TinyLM().load_state_dict(torch.load(...))` works as for an unwrapped model."""
    model = TinyLM()
    callback = CheckpointCallback(tmp_path / "run 1" / "ckpts", save_steps=2, save_total_limit=1)
    LoopTrainer(wrap(model), [callback]).train(TRAIN_BATCHES)

    (path,) = callback.checkpoints
    assert path == str(tmp_path / "run 1" / "ckpts" / "checkpoint_step_2.pt")
    restored = TinyLM(seed=1)
    restored.load_state_dict(torch.load(path, weights_only=True))
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor)


def test_checkpoint_of_a_wrapped_peft_model_is_its_adapter_folder(tmp_path: Path) -> None:
    """A DataParallel-wrapped LoRA model is still saved with `save_pretrained`: a reloadable adapter folder."""
    model = lora_llama()
    callback = CheckpointCallback(str(tmp_path), save_steps=1, save_total_limit=None)
    batch = random_batch(2, 5, seed=3)
    LoopTrainer(torch.nn.DataParallel(model), [callback]).train([batch])

    assert callback.checkpoints == [str(tmp_path / "checkpoint_step_1")]
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "checkpoint_step_1").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, model.eval()(**batch).logits, atol=1e-6)


def test_a_process_running_ahead_of_the_main_one_deletes_no_checkpoint(tmp_path: Path) -> None:
    """torchrun with a hand-written loop: process 1 reaches step 2 before process 0 has saved it. Rotating there
    would delete step 1, the only checkpoint on disk, before step 2 exists."""
    main = CheckpointCallback(tmp_path, save_steps=1, save_total_limit=1)
    other = CheckpointCallback(tmp_path, save_steps=1, save_total_limit=1)
    main_trainer, other_trainer = bare_trainer(), bare_trainer(is_main_process=False)
    main.on_step_end(main_trainer, step=1, metrics={})
    other.on_step_end(other_trainer, step=1, metrics={})
    other.on_step_end(other_trainer, step=2, metrics={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_step_1.pt"]

    main.on_step_end(main_trainer, step=2, metrics={})  # the main process saves step 2, then rotates step 1 away
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_step_2.pt"]


def test_save_best_only_says_once_when_save_steps_have_no_validation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Validation every 2 steps, saving every 3: steps 3 and 9 have no val_loss and are saved anyway (the contract),
    which the user who asked for the best only is told once, with the fix."""
    checkpoint = CheckpointCallback(tmp_path, save_steps=3, save_best_only=True, save_total_limit=None)
    trainer = LoopTrainer(TinyLM(), [ValidationCallback(eval_steps=2, eval_on_epoch_end=False), checkpoint],
                          val_dataloader=VAL_BATCHES)
    with caplog.at_level(logging.WARNING):
        trainer.train(TRAIN_BATCHES, epochs=5)

    saved = sorted(int(p.name.removeprefix("checkpoint_step_").removesuffix(".pt")) for p in tmp_path.iterdir())
    assert 3 in saved and 9 in saved
    assert caplog.text.count("saves step 3, whose metrics have no 'val_loss' (they have: loss)") == 1
    assert "eval_steps dividing save_steps" in caplog.text


# ---------------------------------------------------------------- WandBCallback (real wandb, offline)


def test_wandb_epoch_metrics_of_a_trainer_without_global_step_are_kept(wandb_offline: Path) -> None:
    """Epoch metrics are logged at the step the epoch ended; with step 0 W&B would drop them as out of order."""
    callback = WandBCallback()
    trainer = SimpleNamespace(model=TinyLM(), device="cpu")  # no global_step
    callback.on_train_begin(trainer)
    step = 0
    for epoch in range(2):
        for _ in range(2):
            step += 1
            callback.on_step_end(trainer, step=step, metrics={"loss": 1.0 / step})
        callback.on_epoch_end(trainer, epoch=epoch, metrics={"loss": 0.5 - epoch / 10})
    callback.on_train_end(trainer, error=None)

    log = read_wandb_runs(wandb_offline)[-1]
    assert log.history[2] == {"loss": 0.5, "epoch": 0, "epoch/loss": 0.5}
    assert log.history[4] == {"loss": 0.25, "epoch": 1, "epoch/loss": pytest.approx(0.4)}


def test_wandb_log_model_in_a_hand_written_loop_logs_what_on_save_reports_and_says_when_nothing_came(
    wandb_offline: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The quick reference's "Best Model Only + W&B Logging" in a hand-written loop: CheckpointCallback saves but
    cannot tell W&B; the run's end says so instead of silently logging no model. A loop that fires `on_save`
    gets its checkpoint uploaded."""
    silent = WandBCallback(log_model=True)
    with caplog.at_level(logging.WARNING):
        LoopTrainer(TinyLM(), [silent, CheckpointCallback(tmp_path / "a", save_steps=1)]).train(TRAIN_BATCHES)
    assert caplog.text.count("no checkpoint was reported to WandBCallback (on_save)") == 1

    caplog.clear()
    reporting = WandBCallback(log_model=True)
    trainer = SimpleNamespace(model=TinyLM(), device="cpu")
    checkpoint = CheckpointCallback(tmp_path / "b", save_steps=1)
    with caplog.at_level(logging.WARNING):
        reporting.on_train_begin(trainer)
        checkpoint.on_step_end(trainer, step=1, metrics={"loss": 1.0})
        reporting.on_save(trainer, step=1, checkpoint_path=checkpoint.checkpoints[-1])
        reporting.on_train_end(trainer, error=None)
    assert "no checkpoint was reported" not in caplog.text
    artifacts = {run.run_id: run.artifacts for run in read_wandb_runs(wandb_offline)}
    assert artifacts == {silent.run_id: [], reporting.run_id: [(f"model-{reporting.run_id}", "model")]}


def test_wandb_never_writes_through_a_wandb_link_in_the_loop_s_output_dir(
    wandb_offline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A hand-written loop's trainer with `output_dir` (no WANDB_DIR): W&B's files go into `<output_dir>/wandb`,
    but not through a link there to somewhere else; one warning says so and training goes on."""
    monkeypatch.delenv("WANDB_DIR")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "wandb").symlink_to(elsewhere, target_is_directory=True)
    callback = WandBCallback()
    with caplog.at_level(logging.WARNING):
        trainer = LoopTrainer(TinyLM(), [callback], output_dir=tmp_path / "run")
        trainer.train(TRAIN_BATCHES)

    assert list(elsewhere.iterdir()) == [] and trainer.global_step == 2
    assert caplog.text.count("W&B logging is off") == 1 and "symbolic link" in caplog.text


def test_wandb_logs_into_the_user_s_own_active_run_and_leaves_it_open(wandb_offline: Path) -> None:
    """A loop script that called `wandb.init` itself (to log its own test metrics after training) keeps a usable
    run: the callback logs into it and does not finish it."""
    import wandb

    mine = wandb.init(project="mine", config={"dataset": "v2"})
    callback = WandBCallback(project="ignored", config={"lr": 0.5})
    LoopTrainer(TinyLM(), [callback]).train(TRAIN_BATCHES)
    mine.log({"test_accuracy": 0.9}, step=3)  # raised "Run ... is finished" when the callback finished it
    mine.finish()

    (log,) = read_wandb_runs(wandb_offline)
    assert (log.project, log.run_id, callback.run_id) == ("mine", mine.id, mine.id)
    assert log.config == {"dataset": "v2", "lr": 0.5}
    assert sorted(log.history) == [1, 2, 3] and log.history[3] == {"test_accuracy": 0.9}


# ---------------------------------------------------------------- with SFTTrainer


def test_a_custom_callback_whose_state_is_not_json_does_not_stop_checkpointing(
    tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`state_dict()` returning a tensor (the best loss kept as the loss tensor itself) crashed the first checkpoint
    with "Object of type Tensor is not JSON serializable"; now that state alone is left out, said once."""

    class KeepsBestLoss(SFTCallback):
        def __init__(self) -> None:
            self.best = torch.tensor(float("inf"))

        def on_step_end(self, trainer, step, metrics, **kwargs):
            self.best = torch.minimum(self.best, torch.tensor(metrics["loss"]))

        def state_dict(self):
            return {"best": self.best}

    config = make_config(tmp_path, tiny_model_dir, max_steps=4, save_steps=2)
    trainer = SFTTrainer(config, callbacks=[KeepsBestLoss()], train_dataset=instruction_rows(16))
    with caplog.at_level(logging.WARNING):
        assert trainer.train()["global_step"] == 4

    checkpoint = Path(config.resolved_checkpoint_dir) / "checkpoint_step_4"
    states = json.loads((checkpoint / "trainer_state.json").read_text())["callbacks"]
    assert "KeepsBestLoss" not in states and "CheckpointCallback" in states
    assert caplog.text.count("Not saving the state of callback 'KeepsBestLoss'") == 1


@pytest.mark.parametrize(("val_data", "message"), [
    ([{"text": "hello"}], r"validation data row 1: missing field 'instruction' \(the row has 'text'\)"),
    ([], r"validation data: no usable examples"),
])
def test_sft_trainer_refuses_unusable_val_dataset_before_the_first_step(
    tmp_path: Path, tiny_model_dir: Path, val_data: list[dict[str, Any]], message: str
) -> None:
    """`trainer.add_callback(ValidationCallback(val_dataset=val_data))` with rows the run's format cannot read:
    the error comes before training, not after `eval_steps` steps of it."""
    trainer = SFTTrainer(make_config(tmp_path, tiny_model_dir, max_steps=4), train_dataset=instruction_rows(16))
    trainer.add_callback(ValidationCallback(val_dataset=val_data, eval_steps=2))
    with pytest.raises(DataError, match=message):
        trainer.train()
    assert trainer.state.global_step == 0
