"""What a resumed run may change: fields that are refused, fields that are honoured, fields only noted, and the
layout of processes and micro-batches that keeps the global batch."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from app.sft.checkpointing import CONFIG_FILE, CheckpointError
from app.sft.config import SFTConfig
from app.sft.layout import Layout, count_processes, keeping_global_batch
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
