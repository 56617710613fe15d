"""`resume.plan`: a checkpoint, the config and the launch in, a plain `ResumePlan` out (no trainer, no model)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from test_resume import lora_config, run

from app.sft import checkpointing, optim, resume
from app.sft.checkpointing import CheckpointError
from app.sft.config import SFTConfig
from app.sft.layout import Layout

DATA = {"train": {"examples": 40, "fingerprint": "a" * 32}, "validation": None}


def config(**overrides) -> SFTConfig:
    settings = {"base_model": "unused", "dataset_name": "unused", "batch_size": 4, "gradient_accumulation_steps": 2,
                "max_steps": 20, "seed": 7}
    return SFTConfig(**{**settings, **overrides})


def write_checkpoint(root: Path, step: int, saved: SFTConfig, trainer: dict, callbacks: dict | None = None) -> Path:
    """A checkpoint's trainer state and config as plain files (what `resume.plan` reads)."""
    path = root / f"checkpoint_step_{step}"
    path.mkdir(parents=True)
    (path / checkpointing.CONFIG_FILE).write_text(json.dumps(saved.to_dict()))
    (path / checkpointing.TRAINER_STATE_FILE).write_text(json.dumps({"trainer": trainer, "callbacks": callbacks or {}}))
    return path


def saved_state(step: int = 6, **fields) -> dict:
    return {"global_step": step, "epoch": 1, "batch_in_epoch": 4, "max_steps": 20, "best_metric": 0.5,
            "best_step": 4, "best_checkpoint": "checkpoint_step_4", "stop_reason": "signal",
            "log_history": [{"type": "train", "step": 5, "loss": 2.0},
                            {"type": "eval", "step": 4, "val_loss": 0.5},
                            {"type": "train", "step": 6, "loss": 1.5}],
            "num_processes": 1, "layout": Layout.from_config(config(), 1).to_dict(),
            "data": {**DATA, "epoch_units": 10}, **fields}


def plan(path: Path, now: SFTConfig, processes: int = 1, index: int = 0, data=DATA, units: int = 10):
    return resume.plan(path, now, processes, index, data, lambda epoch, size: units, checkpoint_dir=path.parent)


def test_a_plan_on_more_processes_keeps_the_global_batch_and_derives_the_new_processes_random_states(tmp_path):
    path = write_checkpoint(tmp_path, 6, config(), saved_state(), callbacks={"Recorder": {"seen": 3}})
    first, second = (plan(path, config(), processes=2, index=i) for i in (0, 1))
    assert first.then == Layout(1, 2, 4) and first.layout == Layout(2, 2, 4)
    assert first.layout.global_batch == first.then.global_batch == 8
    assert first.layout_change == "gradient_accumulation_steps 2 -> 1 to keep the global batch of 8 examples per " \
                                  "step on 2 processes"
    assert (first.derived_seed, second.derived_seed) == (None, 7 + 1_000_003 + 6)
    state = first.state
    assert (state.global_step, state.epoch, state.batch_in_epoch) == (6, 1, 4)
    assert state.best_checkpoint == str(tmp_path / "checkpoint_step_4")
    assert first.metrics == {"loss": 1.5, "val_loss": 0.5}
    assert first.metric_steps == {"loss": 6, "val_loss": 4}
    assert first.callback_states == {"Recorder": {"seen": 3}}
    assert first.config_changes == {} and first.data_changes == [] and not first.schedule_changed
    assert first.epoch_units == 10 and not first.checksummed
    state.max_steps = 20
    summary = second.summary("lora_dropout 0.1")
    assert "at step 6 of" in summary and "process 1 derived from the seed" in summary
    assert "not bit for bit" in summary


def test_a_checkpoint_of_an_earlier_version_has_its_position_counted_in_the_runs_micro_batches(tmp_path):
    old = saved_state(num_processes=2, batch_in_epoch=3)
    del old["layout"], old["data"]
    path = write_checkpoint(tmp_path, 6, config(), old)
    result = plan(path, config(), processes=2)
    assert result.then == Layout(2, 4, 4)
    assert result.state.batch_in_epoch == 6  # 3 micro-batches on each of 2 processes


def test_changed_data_is_refused_unless_allowed_and_then_the_position_keeps_the_share_of_the_epoch(tmp_path, caplog):
    path = write_checkpoint(tmp_path, 6, config(), saved_state())
    grown = {**DATA, "train": {"examples": 60, "fingerprint": "b" * 32}}
    with pytest.raises(CheckpointError, match="training data: 40 examples then, 60 now"):
        plan(path, config(), data=grown, units=15)
    with caplog.at_level(logging.WARNING):
        result = plan(path, config(allow_data_change=True), data=grown, units=15)
    assert result.state.batch_in_epoch == 6  # 4 of 10 micro-batches then, 6 of 15 now
    assert result.data_changes and result.schedule_changed
    assert "epoch 1 continues after 6 of its 15 micro-batches" in caplog.text


def test_a_locked_field_is_refused_and_a_schedule_field_changes_the_schedule(tmp_path):
    path = write_checkpoint(tmp_path, 6, config(), saved_state())
    with pytest.raises(CheckpointError, match="seed: 7 -> 8"):
        plan(path, config(seed=8))
    result = plan(path, config(learning_rate=1e-4))
    assert "learning_rate" in result.config_changes and result.schedule_changed


def test_the_latest_checkpoint_is_checksummed_when_found_and_a_given_path_after_loading(tmp_path):
    path = write_checkpoint(tmp_path, 6, config(), saved_state())
    checkpointing.write_pointer(tmp_path, checkpointing.LATEST_POINTER, path)
    assert resume.find(tmp_path, "latest") == (path, True)
    assert resume.find(tmp_path, True) == (path, True)
    assert resume.find(tmp_path, str(path)) == (path, False)


def test_a_resume_from_latest_checksums_each_file_once(tmp_path, tiny_model_dir, monkeypatch):
    first = lora_config(tmp_path, tiny_model_dir, "run", max_steps=2)
    run(first)
    checkpoint = Path(first.resolved_checkpoint_dir) / "checkpoint_step_2"
    files = json.loads((checkpoint / checkpointing.MANIFEST_FILE).read_text())["files"]
    checked = []
    real = checkpointing.file_checksum
    monkeypatch.setattr(checkpointing, "file_checksum", lambda path: checked.append(Path(path)) or real(path))
    run(first.model_copy(update={"max_steps": 3}), resume="latest")
    assert sorted(path.name for path in checked if path.parent == checkpoint) == sorted(files)


def test_weight_decay_is_reapplied_to_the_decaying_groups_whatever_their_order():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = optim.parameter_groups(model, 0.1)
    optimizer = torch.optim.AdamW([{**no_decay, "weight_decay": 0.3}, {**decay, "weight_decay": 0.0}])
    optim.apply_weight_decay(optimizer, model, 0.01)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.0, 0.01]


def test_a_resumed_run_trains_on_with_the_configs_weight_decay(tmp_path, tiny_model_dir):
    first = lora_config(tmp_path, tiny_model_dir, "run", max_steps=2, weight_decay=0.1)
    run(first)
    trainer, _, _ = run(first.model_copy(update={"max_steps": 3, "weight_decay": 0.05}), resume="latest")
    decays = {group["weight_decay"] for group in trainer.optimizer.param_groups if group["params"]}
    assert decays == {0.05}  # the LoRA matrices: the one non-empty group, and it decays
