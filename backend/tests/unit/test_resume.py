"""Checkpoints you can trust: exact resume, stop signals, safe and checked loading."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
from pathlib import Path

import pytest
import torch
from helpers import build_tiny_tokenizer, tiny_llama
from safetensors.torch import load_file
from test_trainer import Recorder, instruction_rows, make_config

from app.sft import SFTCallback, SFTTrainer
from app.sft.checkpointing import CheckpointError

STEPS = 12


def lora_config(tmp_path, model_dir, name: str, **overrides):
    """LoRA with dropout, so an exact resume also needs the random state restored."""
    settings = dict(
        use_lora=True,
        lora_r=4,
        lora_dropout=0.1,
        max_steps=STEPS,
        save_steps=1,
        save_total_limit=None,
        batch_size=4,
        learning_rate=5e-3,
        warmup_ratio=0.1,
        eval_steps=4,
    )
    settings.update(overrides)
    return make_config(tmp_path / name, model_dir, **settings)


def run(config, callbacks=(), resume=None):
    recorder = Recorder()
    trainer = SFTTrainer(
        config,
        callbacks=[recorder, *callbacks],
        model=tiny_llama(seed=0),
        tokenizer=build_tiny_tokenizer(),
        train_dataset=instruction_rows(20),
        eval_dataset=instruction_rows(8, seed=9),
    )
    result = trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder, result


def trained_weights(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class SignalAt(SFTCallback):
    """Sends this process a signal at the end of a step, as a scheduler preempting the job would."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_step_end(self, trainer, step, metrics, **kw):
        if step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("full")
    trainer, recorder, _ = run(lora_config(tmp, tiny_model_dir, "a"))
    return [m["loss"] for m in recorder.step_metrics()], trained_weights(trainer), recorder


def test_sigterm_saves_then_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_model_dir, uninterrupted):
    losses, weights, full_recorder = uninterrupted
    config = lora_config(tmp_path, tiny_model_dir, "b")
    trainer, first, result = run(config, callbacks=[SignalAt(5)])
    assert result["stop_reason"] == "signal" and result["global_step"] == 5
    assert first.events[-1] == ("train_end", None)
    assert (Path(config.resolved_checkpoint_dir) / "latest").read_text().strip() == "checkpoint_step_5"

    resumed, second, result = run(config, resume="latest")
    assert result["global_step"] == STEPS
    resumed_losses = [m["loss"] for m in first.step_metrics()] + [m["loss"] for m in second.step_metrics()]
    assert resumed_losses == losses  # bit for bit
    for name, tensor in trained_weights(resumed).items():
        assert torch.equal(tensor, weights[name]), name
    full_val = [m.get("val_loss") for m in full_recorder.step_metrics()]
    assert [m.get("val_loss") for m in first.step_metrics() + second.step_metrics()] == full_val


def test_resume_restores_callback_state(tmp_path, tiny_model_dir):
    from app.sft import CheckpointCallback, ValidationCallback

    config = lora_config(tmp_path, tiny_model_dir, "c", max_steps=8, save_total_limit=2)
    run(config, callbacks=[SignalAt(5)])
    trainer, _, _ = run(config, resume=True)
    validation = next(cb for cb in trainer.callbacks if isinstance(cb, ValidationCallback))
    saver = next(cb for cb in trainer.callbacks if isinstance(cb, CheckpointCallback))
    assert validation.best_val_loss < float("inf")
    assert [Path(p).name for p in saver.checkpoints][-1] == "checkpoint_step_8"
    assert len(saver.checkpoints) <= 3  # limit 2, plus the best one when it is older


def test_second_signal_aborts_at_once(tmp_path, tiny_model_dir):
    class SignalTwice(SFTCallback):
        def on_step_end(self, trainer, step, metrics, **kw):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)

    config = lora_config(tmp_path, tiny_model_dir, "d", save_steps=100)
    with pytest.raises(KeyboardInterrupt):
        run(config, callbacks=[SignalTwice()])
    assert not (Path(config.resolved_checkpoint_dir) / "checkpoint_step_2").exists()


class StopAt(SFTCallback):
    def on_step_end(self, trainer, step, metrics, **kw):
        if step == 3:
            trainer.should_stop = True


def test_a_run_a_callback_stopped_does_not_train_further_unless_asked(tmp_path, tiny_model_dir, caplog):
    config = lora_config(tmp_path, tiny_model_dir, "e", max_steps=5)
    _, _, result = run(config, callbacks=[StopAt()])
    assert result["global_step"] == 3 and result["stop_reason"] == "callback:StopAt"
    saved = json.loads((Path(config.resolved_checkpoint_dir) / "checkpoint_step_3" / "trainer_state.json").read_text())
    assert saved["trainer"]["stop_reason"] == "callback:StopAt"
    _, recorder, result = run(config, resume="latest")
    assert recorder.step_metrics() == [] and result["global_step"] == 3
    assert "stopped at step 3 by the callback StopAt" in caplog.text and "--continue" in caplog.text

    trainer = SFTTrainer(config, callbacks=[Recorder()], model=tiny_llama(seed=0), tokenizer=build_tiny_tokenizer(),
                         train_dataset=instruction_rows(20), eval_dataset=instruction_rows(8, seed=9))
    result = trainer.train(resume_from_checkpoint="latest", continue_after_stop=True)
    assert result["global_step"] == 5 and result["stop_reason"] == "max_steps"


def test_finished_run_says_so_on_resume(tmp_path, tiny_model_dir, caplog):
    config = lora_config(tmp_path, tiny_model_dir, "f", max_steps=2)
    run(config)
    _, recorder, result = run(config, resume="latest")
    assert recorder.step_metrics() == [] and result["global_step"] == 2
    assert "nothing to train" in caplog.text


def test_checkpoint_of_an_earlier_version_with_its_own_best_record_still_resumes(tmp_path, tiny_model_dir):
    config = lora_config(tmp_path, tiny_model_dir, "old", max_steps=4)
    run(config, callbacks=[SignalAt(2)])
    state_file = Path(config.output_dir) / "checkpoints" / "checkpoint_step_2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["trainer"].update(best_checkpoint=str(state_file.parent), best_checkpoint_metric=1.0)  # as before 11-26
    state_file.write_text(json.dumps(state))
    _, recorder, result = run(config, resume="latest")
    assert [e[1] for e in recorder.events if e[0] == "step_end"] == [3, 4] and result["global_step"] == 4


def test_resume_refuses_a_config_that_changes_the_model(tmp_path, tiny_model_dir):
    config = lora_config(tmp_path, tiny_model_dir, "g", max_steps=2)
    run(config)
    changed = config.model_copy(update={"lora_r": 8, "batch_size": 2, "max_steps": 4})
    with pytest.raises(CheckpointError) as error:
        run(changed, resume="latest")
    message = str(error.value)
    assert "lora_r: 4 -> 8" in message and "batch_size x gradient_accumulation_steps: 4 -> 2" in message


def test_resume_allows_safe_changes_and_notes_them(tmp_path, tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="app.sft")
    config = lora_config(tmp_path, tiny_model_dir, "h", max_steps=4)
    run(config, callbacks=[SignalAt(2)])
    changed = config.model_copy(update={"logging_steps": 3, "eval_steps": 2})
    _, _, result = run(changed, resume="latest")
    assert result["global_step"] == 4
    assert "eval_steps" in caplog.text


def test_latest_falls_back_to_newest_complete_checkpoint(tmp_path, tiny_model_dir, caplog):
    config = lora_config(tmp_path, tiny_model_dir, "i", max_steps=3)
    run(config, callbacks=[SignalAt(3)])
    root = Path(config.resolved_checkpoint_dir)
    (root / "checkpoint_step_3" / "trainer_state.json").unlink()  # as if the save never finished
    (root / ".tmp-checkpoint_step_4").mkdir()  # a half-written save is never taken for a checkpoint
    _, recorder, _ = run(config.model_copy(update={"max_steps": 4}), resume="latest")
    assert "checkpoint_step_2" in caplog.text
    assert [e[1] for e in recorder.events if e[0] == "step_end"] == [3, 4]  # it continued from step 2


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "optimizer.pt").unlink(), "optimizer.pt is missing"),
        (
            lambda p: (p / "trainer_state.json").write_text("{not json"),
            "trainer_state.json is not valid JSON",
        ),
        (
            lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x00" * 10),
            "adapter_model.safetensors is corrupt",
        ),
    ],
)
def test_corrupt_checkpoint_is_reported_by_file(tmp_path, tiny_model_dir, damage, message):
    config = lora_config(tmp_path, tiny_model_dir, "j", max_steps=2)
    run(config)
    checkpoint = Path(config.resolved_checkpoint_dir) / "checkpoint_step_2"
    damage(checkpoint)
    with pytest.raises(CheckpointError, match=message):
        run(config.model_copy(update={"max_steps": 3}), resume=str(checkpoint))


def test_weights_of_the_wrong_shape_are_reported(tmp_path, tiny_model_dir):
    config = lora_config(tmp_path, tiny_model_dir, "k", max_steps=2)
    run(config)
    checkpoint = Path(config.resolved_checkpoint_dir) / "checkpoint_step_2"
    weights = load_file(checkpoint / "adapter_model.safetensors")
    from safetensors.torch import save_file

    save_file(
        {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in weights.items()},
        checkpoint / "adapter_model.safetensors",
    )
    with pytest.raises(CheckpointError, match="does not match"):
        run(config.model_copy(update={"max_steps": 3}), resume=str(checkpoint))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the planted file's protocol
def test_checkpoint_with_a_pickled_object_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    config = lora_config(tmp_path, tiny_model_dir, "l", max_steps=2)
    run(config)
    checkpoint = Path(config.resolved_checkpoint_dir) / "checkpoint_step_2"
    with open(checkpoint / "optimizer.pt", "wb") as f:
        pickle.dump({"state": _RunsCode()}, f)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        run(config.model_copy(update={"max_steps": 3}), resume=str(checkpoint))
    assert not (tmp_path / "pwned").exists()


def test_full_disk_during_a_save_keeps_earlier_checkpoints(tmp_path, tiny_model_dir, monkeypatch):
    import errno

    from app.sft import checkpointing

    config = lora_config(tmp_path, tiny_model_dir, "m", max_steps=3)
    real_save = checkpointing.save_training_state

    def disk_full_at_step_3(directory, **kwargs):
        if kwargs["trainer_state"]["global_step"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(directory, **kwargs)

    monkeypatch.setattr(checkpointing, "save_training_state", disk_full_at_step_3)
    with pytest.raises(CheckpointError, match="No space left on device.*Earlier checkpoints are untouched"):
        run(config)
    root = Path(config.resolved_checkpoint_dir)
    assert [p.name for p in checkpointing.list_checkpoints(root)] == ["checkpoint_step_1", "checkpoint_step_2"]
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
    assert (root / "latest").read_text().strip() == "checkpoint_step_2"


def run_on(config, train_rows, eval_rows, callbacks=(), resume=None):
    trainer = SFTTrainer(config, callbacks=list(callbacks), model=tiny_llama(seed=0), tokenizer=build_tiny_tokenizer(),
                         train_dataset=train_rows, eval_dataset=eval_rows)
    return trainer, trainer.train(resume_from_checkpoint=resume)


@pytest.mark.parametrize(("train_rows", "eval_rows", "said"), [
    (instruction_rows(12), instruction_rows(8, seed=9), "training data: 20 examples then, 12 now (shrunk)"),
    (instruction_rows(28), instruction_rows(8, seed=9), "training data: 20 examples then, 28 now (grown)"),
    ([*instruction_rows(19), {"instruction": "add", "input": "1 plus 1", "output": "ten"}],
     instruction_rows(8, seed=9), "training data: 20 examples then and now, but their content changed (edited)"),
    (instruction_rows(20), instruction_rows(5, seed=9), "validation data: 8 examples then, 5 now (shrunk)"),
])
def test_resume_refuses_changed_data_and_says_what_changed(tmp_path, tiny_model_dir, train_rows, eval_rows, said):
    config = lora_config(tmp_path, tiny_model_dir, "data", max_steps=8)
    run_on(config, instruction_rows(20), instruction_rows(8, seed=9), callbacks=[SignalAt(3)])
    with pytest.raises(CheckpointError) as error:
        run_on(config, train_rows, eval_rows, resume="latest")
    message = str(error.value)
    assert "checkpoint_step_3" in message and said in message, message
    assert "--allow-data-change" in message and "allow_data_change: true" in message


def test_allow_data_change_rebuilds_the_sample_order_and_says_so(tmp_path, tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="app.sft")
    config = lora_config(tmp_path, tiny_model_dir, "grow", max_steps=8)
    run_on(config, instruction_rows(20), instruction_rows(8, seed=9), callbacks=[SignalAt(4)])  # 4 of 5 units
    allowed = config.model_copy(update={"allow_data_change": True})
    trainer, result = run_on(allowed, instruction_rows(8), instruction_rows(8, seed=9), resume="latest")
    assert result["global_step"] == 8
    assert "training data: 20 examples then, 8 now (shrunk)" in caplog.text
    rebuilt = "the sample order is rebuilt for the new data: epoch 0 continues after 2 of its 2 micro-batches"
    assert rebuilt in caplog.text
    assert "4 of its 5 micro-batches" not in caplog.text and "of its 2 micro-batches" in caplog.text


def test_a_resume_with_unchanged_data_says_nothing_of_it(tmp_path, tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="app.sft")
    config = lora_config(tmp_path, tiny_model_dir, "same", max_steps=4)
    run_on(config, instruction_rows(20), instruction_rows(8, seed=9), callbacks=[SignalAt(2)])
    state = json.loads((Path(config.resolved_checkpoint_dir) / "checkpoint_step_2" / "trainer_state.json").read_text())
    assert state["trainer"]["data"]["train"]["examples"] == 20
    _, result = run_on(config, instruction_rows(20), instruction_rows(8, seed=9), resume="latest")
    assert result["global_step"] == 4 and "data changed" not in caplog.text
