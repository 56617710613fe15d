"""Hostile resumes: checkpoints edited by hand or damaged give one clear error naming the file."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from app.sft.checkpointing import (
    CheckpointError,
    capture_rng_state,
    load_rng_state,
    read_trainer_state,
    write_rng_state,
)


@pytest.mark.parametrize("edit", [
    lambda folder: (folder / "rng_state_0.json").write_text('{"python": 1}'),
    lambda folder: (folder / "rng_state_0.json").write_text('{"python": [3, [1, 2], null], "numpy": []}'),
    lambda folder: save_file({"other": torch.zeros(2)}, folder / "rng_state_0.safetensors"),
    lambda folder: save_file({"torch_cpu": torch.zeros(3)}, folder / "rng_state_0.safetensors"),
], ids=["python-not-a-list", "numpy-empty", "no-torch-state", "torch-state-wrong-size"])
def test_edited_random_state_files_are_named_not_a_traceback(tmp_path, edit):
    """A checkpoint without a manifest (older versions, or the manifest removed) whose random-state files were
    edited: the resume is refused with a CheckpointError naming the file, not a KeyError or RuntimeError."""
    write_rng_state(tmp_path, 0, capture_rng_state())
    edit(tmp_path)
    with pytest.raises(CheckpointError, match=r"rng_state_0\.(json|safetensors) does not hold random states"):
        load_rng_state(tmp_path, 0)


def test_intact_random_state_files_still_load(tmp_path):
    write_rng_state(tmp_path, 0, capture_rng_state())
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_rng_state(tmp_path, 0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(("field", "value", "said"), [
    ("global_step", -5, "'global_step' must not be negative"),
    ("batch_in_epoch", -1, "'batch_in_epoch' must not be negative"),
    ("log_history", [1, 2], "'log_history' entry 0 must be an object"),
    ("log_history", [{"type": "train", "loss": 1.0}], "'log_history' entry 0 must be an object with an integer 'step'"),
])
def test_trainer_state_edited_with_impossible_values_is_named(tmp_path, field, value, said):
    """trainer_state.json edited by hand with a negative counter or log records without their step: one
    CheckpointError naming the file and the field (before, the resume failed later with a KeyError or
    AttributeError, or trained from a negative step)."""
    trainer = {"global_step": 4, "epoch": 0, "batch_in_epoch": 4, "max_steps": 4,
               "log_history": [{"type": "train", "step": 1, "loss": 2.0}], field: value}
    (tmp_path / "trainer_state.json").write_text(json.dumps({"trainer": trainer, "callbacks": {}}))
    with pytest.raises(CheckpointError, match=rf"trainer_state\.json: field {said}"):
        read_trainer_state(tmp_path)


@pytest.mark.parametrize("best", ["..", "/etc", "../../victim"])
def test_a_best_checkpoint_naming_no_checkpoint_is_dropped_with_a_warning(tmp_path, best, caplog):
    """`best_checkpoint` edited to `..` or a folder that is no checkpoint: the run keeps no best checkpoint (it
    was taken as `checkpoint_dir/..`, the run folder, and reported so in the summary) and goes on."""
    trainer = {"global_step": 4, "best_metric": 0.5, "best_step": 2, "best_checkpoint": best}
    (tmp_path / "trainer_state.json").write_text(json.dumps({"trainer": trainer, "callbacks": {}}))
    with caplog.at_level(logging.WARNING):
        assert read_trainer_state(tmp_path)[0]["best_checkpoint"] is None
    assert "'best_checkpoint'" in caplog.text and "names no checkpoint folder" in caplog.text


def test_best_checkpoint_of_an_earlier_version_still_reads(tmp_path):
    trainer = {"global_step": 4, "best_checkpoint": "/elsewhere/run/checkpoint_step_2"}
    (tmp_path / "trainer_state.json").write_text(json.dumps({"trainer": trainer, "callbacks": {}}))
    assert read_trainer_state(tmp_path)[0]["best_checkpoint"] == "/elsewhere/run/checkpoint_step_2"
