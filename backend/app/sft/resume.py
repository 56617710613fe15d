"""What a resumed run may change: fields that are refused, fields that are honoured, fields only noted."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from app.sft.checkpointing import CONFIG_FILE, CheckpointError
from app.sft.config import SFTConfig

logger = logging.getLogger(__name__)

LOCKED_FIELDS = (
    "base_model", "use_lora", "use_qlora", "lora_r", "lora_alpha", "lora_target_modules", "max_seq_length",
    "dataset_format", "template_name", "train_on_inputs", "packing", "seed",
)
"""Fields a resumed run may not change: they change the model, its trainable shape or what a step means."""

SCHEDULE_FIELDS = ("learning_rate", "max_steps", "num_epochs", "warmup_ratio", "scheduler_type")
"""Fields a resumed run honours by recomputing the learning-rate schedule for the new values: the rate from the
step reached on is the new schedule's value there, as if the run had been configured so from the start."""

SAFE_FIELDS = (
    "logging_steps", "eval_steps", "save_steps", "save_total_limit", "output_dir", "checkpoint_dir",
    "wandb_project", "wandb_entity", "wandb_run_name", "run_name", "report_to", "disable_progress_bar",
    "eval_batch_size", "dataloader_num_workers", "save_merged_model",
)
"""Fields whose change on resume is expected and only noted at info level."""


def check_config(path: Path, saved: dict[str, Any] | None, config: SFTConfig) -> dict[str, tuple[Any, Any]]:
    """Refuse a resume whose config changes a locked field or the effective batch; return every other change.

    Every returned change is applied from the resumed step on (schedule fields by a recomputed schedule); the
    log says so field by field.
    """
    if saved is None:
        return {}
    saved_config = SFTConfig.from_dict(saved, source=str(path / CONFIG_FILE))
    changed = saved_config.diff(config)
    locked = {key: change for key, change in changed.items() if key in LOCKED_FIELDS}
    before = saved_config.batch_size * saved_config.gradient_accumulation_steps
    after = config.batch_size * config.gradient_accumulation_steps
    if before != after:
        locked["batch_size x gradient_accumulation_steps"] = (before, after)
    if locked:
        lines = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, (old, new) in locked.items())
        raise CheckpointError(f"cannot resume from {path}: the config changes what a resumed run must keep:\n{lines}")
    for key, (old, new) in changed.items():
        if key in SAFE_FIELDS:
            logger.info("Resuming with a changed config: %s %r -> %r", key, old, new)
        elif key in SCHEDULE_FIELDS:
            logger.warning("Resuming with a changed config: %s %r -> %r (the learning-rate schedule is "
                           "recomputed for the new values from the step reached)", key, old, new)
        else:
            logger.warning("Resuming with a changed config: %s %r -> %r (applied from the resumed step on)",
                           key, old, new)
    return changed
