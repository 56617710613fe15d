"""The run's sample order and its layout over processes: what makes a resume on another number of processes see
the same examples in the same optimizer steps. (The end-to-end runs on 1 and 2 processes are in
`test_distributed.py`; the trainer-level resume cases are at the end of this file.)"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_resume import SignalAt, run
from test_trainer import make_config

from app.sft.checkpointing import CheckpointError
from app.sft.config import SFTConfig
from app.sft.layout import Layout, keeping_global_batch
from app.sft.resume import resume_layout


def config(**overrides) -> SFTConfig:
    return SFTConfig(**{"base_model": "unused", "dataset_name": "unused", **overrides})


def dealt(layout: Layout, units: list[list[int]]) -> list[list[list[int]]]:
    """Every process's micro-batches of one step."""
    return [layout.share(units, rank) for rank in range(layout.processes)]


STEP = [[0, 1, 2, 3], [4, 5, 6, 7]]  # one step of two micro-batches of four examples


def test_every_layout_of_a_step_trains_on_the_same_examples():
    layouts = [Layout(1, 2, 4), Layout(2, 2, 4), Layout(2, 2, 4, split=2), Layout(4, 2, 4, split=2),
               Layout(3, 2, 4, split=3)]
    for layout in layouts:
        shares = dealt(layout, STEP)
        assert sorted(i for share in shares for batch in share for i in batch if i >= 0) == list(range(8))
        assert len({len(share) for share in shares}) == 1  # the same number of forward passes everywhere


def test_micro_batches_are_dealt_round_robin_in_step_order():
    assert dealt(Layout(2, 2, 4), STEP) == [[[0, 1, 2, 3]], [[4, 5, 6, 7]]]
    assert dealt(Layout(1, 2, 4, split=2), STEP) == [[[0, 1], [2, 3], [4, 5], [6, 7]]]
    assert dealt(Layout(2, 2, 4, split=2), STEP) == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]


def test_a_short_step_gives_processes_without_examples_a_masked_copy():
    shares = dealt(Layout(2, 2, 4), [[8, 9]])  # the epoch's last step holds one micro-batch of two
    assert shares == [[[8, 9]], [[-1 - 8]]]  # -1-i: example i with every label masked, which adds no token
    assert dealt(Layout(3, 1, 2, split=3), [[5, 6]]) == [[[5]], [[6]], [[-1 - 5]]]  # an empty piece


def test_steps_cover_the_epoch_from_the_position_reached():
    layout = Layout(2, 4, 2)
    assert layout.steps(list(range(10))) == [(0, 4), (4, 8), (8, 10)]
    assert layout.steps(list(range(10)), start=4) == [(4, 8), (8, 10)]


def test_the_layout_that_keeps_the_global_batch_changes_the_accumulation_first():
    then = Layout(2, 4, 2)  # 2 processes × batch 2 × accumulation 2
    assert keeping_global_batch(then, config(batch_size=2), 1) == Layout(1, 4, 2)  # accumulation 4
    assert keeping_global_batch(then, config(batch_size=2), 4) == Layout(4, 4, 2)  # accumulation 1
    cut = keeping_global_batch(Layout(1, 1, 4), config(batch_size=4), 2)  # one micro-batch of 4 on 2 processes
    assert (cut.split, cut.micro_batch_size, cut.accumulation) == (2, 2, 1)
    smaller = keeping_global_batch(Layout(1, 2, 4), config(batch_size=2), 1)  # a config asking for batch 2
    assert (smaller.micro_batch_size, smaller.accumulation, smaller.global_batch) == (2, 4, 8)
    assert keeping_global_batch(Layout(1, 1, 1), config(batch_size=1), 2) is None  # 1 example, 2 processes
    assert keeping_global_batch(Layout(1, 1, 3), config(batch_size=3), 2) is None  # 3 examples: 1.5 each
    assert keeping_global_batch(Layout(1, 1, 6), config(batch_size=6), 4) is None  # 6 on 4: no whole batch
    assert keeping_global_batch(Layout(1, 2, 6), config(batch_size=6), 4).micro_batch_size == 3  # 12 on 4


def test_packing_keeps_the_packs_and_cuts_them_when_processes_outnumber_them():
    then = Layout(1, 1, 4, packed=True)
    kept = keeping_global_batch(then, config(batch_size=4, packing=True), 2)
    assert (kept.split, kept.accumulation, kept.per_step()) == (2, 1, "1 packs of up to 4 × max_seq_length tokens")
    assert dealt(kept, [[3, 1, 4]]) == [[[3, 1]], [[4]]]


def test_resume_layout_says_what_it_changed_in_one_line():
    two = config(batch_size=2, gradient_accumulation_steps=2)
    layout, note = resume_layout(Layout(2, 4, 2), two, 1)
    assert layout == Layout(1, 4, 2)
    assert note == "gradient_accumulation_steps 2 -> 4 to keep the global batch of 8 examples per step on 1 process"
    assert resume_layout(Layout(2, 4, 2), two, 2) == (Layout(2, 4, 2), None)  # the same layout
    adapted = config(batch_size=2, gradient_accumulation_steps=4)  # the user already doubled the accumulation
    assert resume_layout(Layout(2, 4, 2), adapted, 1) == (Layout(1, 4, 2), None)


def test_resume_layout_refuses_what_it_cannot_keep_unless_allowed():
    tiny = config(batch_size=1, gradient_accumulation_steps=1)
    layout, problem = resume_layout(Layout(1, 1, 1), tiny, 2)
    assert layout is None and "processes: 1 -> 2" in problem
    layout, problem = resume_layout(Layout(1, 1, 4), config(batch_size=2), 1)  # the config halves the batch
    assert layout is None and problem == "batch_size x gradient_accumulation_steps: 4 -> 2"
    allowed = tiny.model_copy(update={"allow_global_batch_change": True})
    layout, note = resume_layout(Layout(1, 1, 1), allowed, 2)
    assert layout == Layout(2, 2, 1) and note == "global batch 1 -> 2 (allow_global_batch_change)"


@pytest.mark.parametrize("data", [
    None, {"processes": 0, "units_per_step": 1, "unit_size": 1, "split": 1, "packed": False},
    {"processes": 1, "units_per_step": "2", "unit_size": 1, "split": 1, "packed": False},
    {"processes": 1, "units_per_step": 1, "unit_size": 10**18, "split": 1, "packed": False},
    {"processes": 1, "units_per_step": 1, "unit_size": 1, "split": 1, "packed": False, "path": "/etc"},
])
def test_a_saved_layout_that_is_not_one_is_refused_naming_the_field(data):
    with pytest.raises(ValueError, match="field 'layout"):
        Layout.from_dict(data)


# --- the trainer on one process ------------------------------------------------------------------------------


def small_run(tmp_path, tiny_model_dir, **overrides):
    settings = dict(max_steps=6, save_steps=1, save_total_limit=None, batch_size=2, gradient_accumulation_steps=2,
                    eval_steps=1000)
    return make_config(tmp_path / "run", tiny_model_dir, **{**settings, **overrides})


def test_a_crafted_layout_in_a_checkpoint_is_refused_naming_the_file_and_field(tmp_path, tiny_model_dir):
    config = small_run(tmp_path, tiny_model_dir, max_steps=2)
    run(config)
    state_file = Path(config.resolved_checkpoint_dir) / "checkpoint_step_2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["trainer"]["layout"]["unit_size"] = -3
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"trainer_state.json: field 'layout.unit_size' must be an integer from"):
        # named explicitly: `latest` falls back past a checkpoint whose trainer_state.json is damaged
        run(config.model_copy(update={"max_steps": 3}), resume=str(state_file.parent))


def test_a_checkpoint_without_a_layout_resumes_exactly_as_before(tmp_path, tiny_model_dir):
    config = small_run(tmp_path, tiny_model_dir)
    _, full, _ = run(small_run(tmp_path / "full", tiny_model_dir))
    _, first, _ = run(config, callbacks=[SignalAt(3)])
    state_file = Path(config.resolved_checkpoint_dir) / "checkpoint_step_3" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["trainer"]["layout"]  # as written by the versions before the layout was saved
    state_file.write_text(json.dumps(state))
    _, second, _ = run(config, resume="latest")
    losses = [m["loss"] for m in first.step_metrics() + second.step_metrics()]
    assert losses == [m["loss"] for m in full.step_metrics()]


@pytest.mark.parametrize("packing", [False, True])
def test_resume_with_a_smaller_micro_batch_keeps_the_global_batch_and_the_losses(tmp_path, tiny_model_dir, caplog,
                                                                                packing):
    settings = dict(batch_size=4, gradient_accumulation_steps=1, packing=packing, max_steps=None, num_epochs=2)
    config = small_run(tmp_path, tiny_model_dir, **settings)
    _, full, full_result = run(small_run(tmp_path / "full", tiny_model_dir, **settings))
    _, first, _ = run(config, callbacks=[SignalAt(3)])
    smaller = config.model_copy(update={"batch_size": 2, "gradient_accumulation_steps": 2})  # less memory
    caplog.set_level(logging.INFO, logger="app.sft")
    _, second, result = run(smaller, resume="latest")
    for key in ("loss", "learning_rate"):  # the same examples in the same steps, on the same schedule
        got = [m[key] for m in first.step_metrics() + second.step_metrics()]
        assert got == pytest.approx([m[key] for m in full.step_metrics()], rel=1e-5)
    assert result["global_step"] == full_result["global_step"] > 3 and result["epochs"] == full_result["epochs"]
    assert "batch_size 2 (micro-batches of 4 cut in 2) × gradient_accumulation_steps 2" in caplog.text
