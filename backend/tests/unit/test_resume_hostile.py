"""Hostile resumes: checkpoints edited by hand or damaged give one clear error naming the file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from app.sft.checkpointing import CheckpointError, capture_rng_state, load_rng_state, write_rng_state


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
