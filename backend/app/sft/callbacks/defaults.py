"""The callbacks a config asks for (`SFTTrainer` adds them at the start of training), except those of a kind the
user already gave, and the metric the run's record of the best follows (`decide_monitor`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from app.sft.callbacks.base import SFTCallback
from app.sft.callbacks.checkpoint import CheckpointCallback
from app.sft.callbacks.early_stopping import EarlyStoppingCallback
from app.sft.callbacks.generation_eval import GenerationEvalCallback
from app.sft.callbacks.mlflow_logger import MLflowCallback
from app.sft.callbacks.tensorboard import TensorBoardCallback
from app.sft.callbacks.validation import ValidationCallback
from app.sft.callbacks.wandb_logger import WandBCallback
from app.sft.config import ConfigError, SFTConfig
from app.sft.paths import TENSORBOARD_DIR

logger = logging.getLogger(__name__)


def default_callbacks(
    config: SFTConfig,
    given: Iterable[SFTCallback],
    *,
    validation: bool,
    checkpoint_dir: Path,
    monitor: str,
    mode: str,
    eval_rows: Sequence[Any] | None,
) -> list[SFTCallback]:
    """Validation (when there is validation data), early stopping (`early_stopping_patience`), checkpoints, evaluation
    by generation (`generation_eval_metrics`) and the loggers of `report_to` / `wandb_project`, each unless a
    callback of its kind is in `given`; the deciding ones watch `monitor` in `mode` (the run's)."""
    given = list(given)
    cfg, added = config, []

    def missing(kind: type) -> bool:
        return not any(isinstance(callback, kind) for callback in given)

    if validation and missing(ValidationCallback):
        added.append(ValidationCallback(eval_steps=cfg.eval_steps))
    if cfg.early_stopping_patience is not None and not validation and missing(ValidationCallback):
        logger.warning("early_stopping_patience is set but there is no validation data (eval_dataset_name or "
                       "validation_split), so early stopping will never trigger")
    if cfg.early_stopping_patience is not None and missing(EarlyStoppingCallback):
        added.append(EarlyStoppingCallback(patience=cfg.early_stopping_patience, min_delta=cfg.early_stopping_min_delta,
                                           monitor=monitor, mode=mode))
    if missing(CheckpointCallback):
        added.append(CheckpointCallback(checkpoint_dir, save_steps=cfg.save_steps,
                                        save_total_limit=cfg.save_total_limit, save_best_only=cfg.save_best_only,
                                        monitor=monitor, mode=mode))
    if cfg.generation_eval_metrics and missing(GenerationEvalCallback):
        added.append(GenerationEvalCallback.from_config(cfg, eval_rows))
    if (cfg.wandb_project or "wandb" in cfg.report_to) and missing(WandBCallback):
        added.append(WandBCallback(project=cfg.wandb_project or "llm-playground-sft",
                                   run_name=cfg.wandb_run_name or cfg.run_name, config=cfg.to_dict(),
                                   entity=cfg.wandb_entity))
    if "tensorboard" in cfg.report_to and missing(TensorBoardCallback):
        added.append(TensorBoardCallback(log_dir=str(Path(cfg.output_dir) / TENSORBOARD_DIR)))
    if "mlflow" in cfg.report_to and missing(MLflowCallback):
        added.append(MLflowCallback(tracking_uri=cfg.mlflow_tracking_uri, experiment=cfg.mlflow_experiment,
                                    run_name=cfg.run_name, log_model=cfg.mlflow_log_model))
    return added


def decide_monitor(config: SFTConfig, savers: Sequence[CheckpointCallback], *, log: bool) -> tuple[str, str, Path]:
    """The metric the run's one record of the best follows, its mode, and the run's checkpoint folder: the
    config's `best_metric`/`best_metric_mode` and `checkpoint_dir`, unless CheckpointCallbacks were given to the
    trainer (`savers`, which must agree on the monitor): then theirs (said in the log when `log`), and the first
    one's folder."""
    choices = {(saver.monitor, saver.mode) for saver in savers}
    if len(choices) > 1:
        raise ConfigError("the CheckpointCallbacks monitor different metrics: "
                          + ", ".join(f"{m!r} ({mode})" for m, mode in sorted(choices))
                          + "; the run keeps one record of the best, so give them the same monitor and mode")
    monitor, mode = config.best_metric, config.best_metric_mode
    if not savers:
        return monitor, mode, Path(config.resolved_checkpoint_dir)
    saver = savers[0]
    if (saver.monitor, saver.mode) != (monitor, mode) and log:
        logger.info("The best follows %s (%s), the monitor of the CheckpointCallback given, not the config's "
                    "best_metric %s (%s)", saver.monitor, saver.mode, monitor, mode)
    return saver.monitor, saver.mode, Path(saver.output_dir)
