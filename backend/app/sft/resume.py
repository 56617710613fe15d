"""Resuming a run: `plan` turns a checkpoint, this launch's config and processes into a `ResumePlan` (what is
restored, what changed, the data position, the random states to load or derive) that the trainer applies.

Also what a resumed run may change: fields that are refused, fields that are honoured, fields only noted, and the
layout of processes and micro-batches that keeps the global batch."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.sft import checkpointing
from app.sft.checkpointing import CONFIG_FILE, CheckpointError
from app.sft.config import SFTConfig
from app.sft.layout import Layout, count_processes, keeping_global_batch
from app.sft.state import TrainerState
from app.sft.tokenized import TokenizedDataset

logger = logging.getLogger(__name__)

LOCKED_FIELDS = (
    "base_model", "use_lora", "use_qlora", "lora_r", "lora_alpha", "lora_target_modules", "use_dora", "use_rslora",
    "max_seq_length",
    "dataset_format", "template_name", "train_on_inputs", "packing", "seed",
)
"""Fields a resumed run may not change: they change the model, its trainable shape or what a step means."""

SCHEDULE_FIELDS = ("learning_rate", "max_steps", "num_epochs", "warmup_ratio", "scheduler_type")
"""Fields a resumed run honours by recomputing the learning-rate schedule for the new values: the rate from the
step reached on is the new schedule's value there, as if the run had been configured so from the start."""

SAFE_FIELDS = (
    "logging_steps", "eval_steps", "save_steps", "save_total_limit", "output_dir", "checkpoint_dir",
    "wandb_project", "wandb_entity", "wandb_run_name", "run_name", "report_to", "disable_progress_bar",
    "mlflow_tracking_uri", "mlflow_experiment", "mlflow_log_model",
    "eval_batch_size", "dataloader_num_workers", "save_merged_model", "overwrite_output_dir",
    "allow_global_batch_change", "allow_data_change",
)
"""Fields whose change on resume is expected and only noted at info level."""

LAYOUT_FIELDS = ("batch_size", "gradient_accumulation_steps")
"""Fields a resumed run adapts to keep the global batch (`resume_layout`): their change is reported with it."""


@dataclass(frozen=True)
class ResumePlan:
    """What a resume restores and what it changes, for one process of this launch.

    `state` is the loop state to continue from: its `epoch` and `batch_in_epoch` are the data position in this
    run's sample order (converted from a checkpoint of an earlier version, rebuilt after an allowed data change),
    its `best_checkpoint` a path in the run's checkpoint folder. `derived_seed` is None when this process loads
    its own random states from the checkpoint, else the seed it starts from (a process the checkpoint's run did
    not have). `checksummed`: the checkpoint's files were already checked against its manifest when it was found.
    """

    path: Path
    state: TrainerState
    callback_states: dict[str, dict[str, Any]]
    then: Layout
    layout: Layout
    layout_change: str | None
    config_changes: dict[str, tuple[Any, Any]]
    data_changes: list[str]
    epoch_units: int
    metrics: dict[str, float]
    metric_steps: dict[str, int]
    derived_seed: int | None
    checksummed: bool

    @property
    def schedule_changed(self) -> bool:
        """Whether the learning-rate schedule differs from the checkpoint's run (its fields, the global batch or
        the data changed)."""
        return (any(key in SCHEDULE_FIELDS for key in self.config_changes)
                or self.then.global_batch != self.layout.global_batch or bool(self.data_changes))

    def summary(self, dropout: str | None) -> str:
        """What the resume continues: checkpoint, step, data position, processes then and now, global batch, what
        was changed to keep it, and where the random states come from (`dropout`: the model's, in words; the
        step count is `state.max_steps`, which the trainer sets for this launch)."""
        state, then, now = self.state, self.then, self.layout
        lines = [
            f"Resumed from {self.path} at step {state.global_step} of {state.max_steps}: epoch {state.epoch}, "
            f"{state.batch_in_epoch} of its {self.epoch_units} micro-batches of {now.unit_size} trained on",
            f"  processes: {then.processes} then, {now.processes} now; global batch {now.per_step()} per step "
            f"({now.describe()})",
            f"  changed to keep it: {self.layout_change or 'nothing'}",
        ]
        if then.processes == now.processes:
            lines.append("  random states: every process's own, from the checkpoint")
        else:
            kept = min(then.processes, now.processes)
            source = (f"{_ranks(0, kept)} from the checkpoint (those of {_ranks(kept, then.processes)} are not used)"
                      if now.processes < then.processes else
                      f"{_ranks(0, kept)} from the checkpoint, {_ranks(kept, now.processes)} derived from the seed "
                      "(seed + 1000003 × process + step)")
            lines.append(
                f"  random states: {source}; "
                + (f"the model has dropout ({dropout}), so the run continues correctly but not bit for bit"
                   if dropout else "the step draws no random numbers (no dropout), so the run continues exactly "
                   "(up to the order of floating-point sums)"))
        return "\n".join(lines)


def find(checkpoint_dir: str | os.PathLike, spec: str | os.PathLike | bool) -> tuple[Path, bool]:
    """The checkpoint `spec` names (`checkpointing.resolve_checkpoint`) and whether finding it checked its files'
    checksums (the `latest` search does; a path given is checked after loading, whose messages say more)."""
    return checkpointing.resolve_checkpoint(checkpoint_dir, spec), spec is True or spec == "latest"


def plan(path: Path, config: SFTConfig, processes: int, process_index: int, data: dict[str, Any],
         epoch_length: Callable[[int, int], int], *, checkpoint_dir: Path, checksummed: bool = False) -> ResumePlan:
    """The plan for resuming from checkpoint `path` with `config` on `processes` processes (this one
    `process_index`), with the data recorded as `data` (`data_record`); `epoch_length(epoch, unit_size)` counts
    an epoch's units in this run's sample order. Raises a `CheckpointError` for a resume that the config, the
    launch or the data refuse (see `check_config`, `data_changes`) or a checkpoint that does not read."""
    trainer_state, callback_states = checkpointing.read_trainer_state(path)
    saved_config = checkpointing.read_config(path)
    then = _saved_layout(path, trainer_state, saved_config, config)
    changes, layout, layout_change = check_config(path, saved_config, config, then, processes)
    saved_data = trainer_state.pop("data", None)
    changed_data = data_changes(path, saved_data, data, config.allow_data_change)
    state = TrainerState.from_dict(trainer_state)
    if state.best_checkpoint:  # saved as a name (a copied run stays portable), used as a path
        state.best_checkpoint = str(Path(checkpoint_dir) / state.best_checkpoint)
    units = epoch_length(state.epoch, layout.unit_size)
    if changed_data:
        _rebuild_position(state, units, saved_data.get("epoch_units"), changed_data)
    metrics: dict[str, float] = {}
    metric_steps: dict[str, int] = {}
    for record in state.log_history:  # the newest value of every metric, as the run had them
        values = {k: v for k, v in record.items() if k not in ("type", "step")}
        metrics.update(values)
        metric_steps.update(dict.fromkeys(values, record["step"]))
    derived = None if process_index < then.processes else derived_seed(config.seed, process_index,
                                                                          state.global_step)
    return ResumePlan(path, state, callback_states, then, layout, layout_change, changes, changed_data, units,
                      metrics, metric_steps, derived, checksummed)


def derived_seed(seed: int, process_index: int, step: int) -> int:
    """The seed of a process the checkpoint has no random state for: `seed + 1000003 × process + step`."""
    return seed + 1_000_003 * process_index + step


def _saved_layout(path: Path, trainer_state: dict[str, Any], saved_config: dict[str, Any] | None,
                  config: SFTConfig) -> Layout:
    """The layout the checkpoint's run trained with (taken out of `trainer_state`). Checkpoints of earlier
    versions have none: it is the one their config gives, and their data position, counted then in this
    process's micro-batches, is converted to the run's."""
    processes = trainer_state.pop("num_processes", 1)
    if "layout" in trainer_state:
        return Layout.from_dict(trainer_state.pop("layout"))
    if saved_config is not None:
        config = SFTConfig.from_dict(saved_config, source=str(path))
    trainer_state["batch_in_epoch"] = trainer_state.get("batch_in_epoch", 0) * processes
    return Layout.from_config(config, processes)


def _rebuild_position(state: TrainerState, units: int, units_then: Any, changes: list[str]) -> None:
    """After `allow_data_change`: the epoch's sample order is the new data's; the run continues after the same
    share of the epoch as it had trained (what changed and where it continues are logged)."""
    before = state.batch_in_epoch
    if isinstance(units_then, int) and units_then > 0:
        state.batch_in_epoch = min(units, round(before * units / units_then))
    else:
        state.batch_in_epoch = min(before, units)
    logger.warning("Resuming on changed data (allow_data_change):\n  %s\n  the sample order is rebuilt for the new "
                   "data: epoch %d continues after %d of its %d micro-batches (%s of %s before)",
                   "\n  ".join(changes), state.epoch, state.batch_in_epoch, units, before, units_then)


def nothing_left_to_train(state: TrainerState, config: SFTConfig, continue_after_stop: bool) -> bool:
    """True (and says why) when the resumed run in `state` has nothing left to train; clears its stop reason
    when it trains on."""
    stopped_by = state.stop_reason or ""
    if stopped_by == "early_stopping" or stopped_by.startswith("callback"):
        if not continue_after_stop:
            logger.warning(
                "The run was stopped at step %d by %s; not training further. To train on, pass "
                "continue_after_stop=True to train() (`sft train CONFIG --resume --continue`).",
                state.global_step, stopped_by.replace("callback:", "the callback "))
            return True
        logger.info("Continuing a run that %s stopped at step %d", stopped_by, state.global_step)
    if state.global_step >= state.max_steps:
        logger.warning("The run already reached its last step (%d); nothing to train.", state.global_step)
        state.stop_reason = state.stop_reason or ("max_steps" if config.max_steps else "completed")
        return True
    state.stop_reason = None
    return False


def _ranks(first: int, end: int) -> str:
    """`process 2` or `processes 2-3`: the process indices first..end-1."""
    return f"process {first}" if end - first == 1 else f"processes {first}-{end - 1}"


def check_config(path: Path, saved: dict[str, Any] | None, config: SFTConfig, then: Layout,
                 processes: int) -> tuple[dict[str, tuple[Any, Any]], Layout, str | None]:
    """Refuse a resume whose config changes a locked field or whose launch can't keep the global batch; return
    every other change, the layout to train with (see `resume_layout`) and what it changed, if anything.

    Every returned change is applied from the resumed step on (schedule fields by a recomputed schedule); the
    log says so field by field.
    """
    changed = SFTConfig.from_dict(saved, source=str(path / CONFIG_FILE)).diff(config) if saved is not None else {}
    problems = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items() if key in LOCKED_FIELDS]
    layout, note = resume_layout(then, config, processes)
    if layout is None:
        asked = Layout.from_config(config, processes)
        problems.append(
            f"{note}\n  global batch: the checkpoint trained with {then.describe()}; this launch asks for "
            f"{asked.describe()}. Set allow_global_batch_change: true to train on with the launch's global batch "
            "(the learning-rate schedule is recomputed for the new step count, and the rest of the run is no "
            "longer the one an uninterrupted run would train)")
    if problems:
        lines = "\n".join(f"  {line}" for line in problems)
        raise CheckpointError(f"cannot resume from {path}: the config changes what a resumed run must keep:\n{lines}")
    for key, (old, new) in changed.items():
        if key in LAYOUT_FIELDS:
            continue  # the layout's note says what the run trains with
        if key in SAFE_FIELDS:
            logger.info("Resuming with a changed config: %s %r -> %r", key, old, new)
        elif key in SCHEDULE_FIELDS:
            logger.warning("Resuming with a changed config: %s %r -> %r (the learning-rate schedule is "
                           "recomputed for the new values from the step reached)", key, old, new)
        else:
            logger.warning("Resuming with a changed config: %s %r -> %r (applied from the resumed step on)",
                           key, old, new)
    return changed, layout, note


def resume_layout(then: Layout, config: SFTConfig, processes: int) -> tuple[Layout | None, str | None]:
    """The layout a resumed run trains with on `processes` processes, and one line saying what it changed.

    The checkpoint's global batch is kept whenever the config asks for it (its batch_size ×
    gradient_accumulation_steps × processes, counted with the processes of then or of now): on another number
    of processes the accumulation, or the micro-batch, is chosen to keep it. Otherwise, or when no integer
    choice keeps it, the layout is None and the line says why, unless `config.allow_global_batch_change`, which
    trains on with the config's accumulation on micro-batches of the checkpoint's size.
    """
    asked = Layout.from_config(config, processes)
    if asked == then:
        return then, None
    if then.global_batch in (asked.global_batch, Layout.from_config(config, then.processes).global_batch):
        kept = keeping_global_batch(then, config, processes)
        if kept is not None:
            changes = [f"{name} {old} -> {new}" for name, old, new in (
                ("batch_size", config.batch_size, kept.micro_batch_size),
                ("gradient_accumulation_steps", config.gradient_accumulation_steps, kept.accumulation)) if old != new]
            return kept, (f"{', '.join(changes)} to keep the global batch of {kept.per_step()} per step on "
                          f"{count_processes(processes)}" if changes else None)
        problem = (f"processes: {then.processes} -> {processes}: {then.per_step()} per step can't be shared by "
                   f"{count_processes(processes)} in equal whole micro-batches of at most batch_size "
                   f"{config.batch_size}")
    else:
        problem = (f"batch_size x gradient_accumulation_steps: {then.global_batch / then.processes:g} -> "
                   f"{config.batch_size * config.gradient_accumulation_steps}")
    if not config.allow_global_batch_change:
        return None, problem
    changed = dataclasses.replace(then, processes=processes, split=1,
                                  units_per_step=config.gradient_accumulation_steps * processes)
    logger.warning("Resuming with another global batch (allow_global_batch_change): %s; the learning-rate "
                   "schedule is recomputed for the new step count, and the run differs from an uninterrupted one "
                   "from here on", changed.describe())
    return changed, f"global batch {then.global_batch} -> {changed.global_batch} (allow_global_batch_change)"


DATA_SPLITS = ("train", "validation")


def data_record(train: TokenizedDataset, val: TokenizedDataset | None) -> dict[str, Any]:
    """What a checkpoint records of the data it trained on: per split, the examples and a fingerprint of their
    tokens and labels (None for no validation data)."""
    return {name: None if data is None else {"examples": len(data), "fingerprint": _fingerprint(data)}
            for name, data in zip(DATA_SPLITS, (train, val), strict=True)}


def _fingerprint(data: TokenizedDataset) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for ids, labels in zip(data.input_ids, data.labels, strict=True):
        digest.update(len(ids).to_bytes(4, "little"))
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def data_changes(path: Path, saved: Any, now: dict[str, Any], allow: bool) -> list[str]:
    """How the data differs from what checkpoint `path` trained on (one line per changed split; [] when it does
    not, or when the checkpoint, of an earlier version, recorded none). Refused with a `CheckpointError` saying
    what changed unless `allow` (`allow_data_change`)."""
    if saved is None:
        return []
    if not isinstance(saved, dict) or not all(
            saved.get(name) is None or (isinstance(saved[name], dict) and isinstance(saved[name].get("examples"), int)
                                        and isinstance(saved[name].get("fingerprint"), str)) for name in DATA_SPLITS):
        raise CheckpointError(f"{path}: the data record of its trainer_state.json is damaged or was edited")
    changes = []
    for name in DATA_SPLITS:
        then, current = saved.get(name), now[name]
        if then == current:
            continue
        label = "training data" if name == "train" else "validation data"
        old, new = (record["examples"] if record else 0 for record in (then, current))
        if old != new:
            changes.append(f"{label}: {old} examples then, {new} now ({'shrunk' if new < old else 'grown'})")
        else:
            changes.append(f"{label}: {old} examples then and now, but their content changed (edited)")
    if changes and not allow:
        lines = "\n".join(f"  {line}" for line in changes)
        raise CheckpointError(
            f"cannot resume from {path}: the data changed since it was saved:\n{lines}\nResume with the data the run "
            "trained on, or train on with the new data (its sample order is rebuilt, and the run no longer matches "
            "an uninterrupted one) with --allow-data-change (allow_data_change: true)")
    return changes
