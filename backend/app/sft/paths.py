"""Where the library keeps files of its own: one cache root outside runs (converted models, tokenized data, the
precision measurements), and the names of the folders the run's callbacks write into inside `output_dir`."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "LLM_PLAYGROUND_CACHE"
"""The environment variable that moves the cache root."""


def cache_root() -> Path:
    """The library's user cache folder: `$LLM_PLAYGROUND_CACHE`, default `~/.cache/llm-playground`."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "llm-playground").expanduser()


GENERATIONS_DIR = "generations"
"""The samples of evaluation by generation: `generations/step_<N>.jsonl`, `sft eval --generate`'s `eval_*.jsonl`."""
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
MLFLOW_DIR = "mlflow"
"""The default local MLflow store: `mlflow.db` (sqlite) and `artifacts/`."""
LOGGER_FOLDERS = (GENERATIONS_DIR, TENSORBOARD_DIR, WANDB_DIR, MLFLOW_DIR)
"""The folders inside `output_dir` that callbacks write into; a link there is refused (`run_dir.check_run_paths`)."""
