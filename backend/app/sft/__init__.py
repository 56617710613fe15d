"""Supervised fine-tuning of causal language models around a small callback system.

    from app.sft import SFTConfig, SFTTrainer, ValidationCallback, CheckpointCallback

The names below are imported on first use (PEP 562 `__getattr__`), so `import app.sft.cli` (the `sft`
command) starts without loading torch and transformers; `from app.sft import SFTTrainer` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CallbackHandler": "app.sft.callbacks",
    "CheckpointCallback": "app.sft.callbacks",
    "ConfigError": "app.sft.config",
    "DataError": "app.sft.data",
    "EarlyStoppingCallback": "app.sft.callbacks",
    "GenerationEvalCallback": "app.sft.callbacks",
    "MLflowCallback": "app.sft.callbacks",
    "MetricsLog": "app.sft.metrics_log",
    "PromptTemplate": "app.sft.templates",
    "SFTCallback": "app.sft.callbacks",
    "SFTConfig": "app.sft.config",
    "SFTTrainer": "app.sft.trainer",
    "TemplateRegistry": "app.sft.templates",
    "TensorBoardCallback": "app.sft.callbacks",
    "ValidationCallback": "app.sft.callbacks",
    "WandBCallback": "app.sft.callbacks",
    "read_metrics": "app.sft.metrics_log",
    "render_report": "app.sft.report",
}
"""Public name -> the module that defines it."""

__all__ = [
    "CallbackHandler",
    "CheckpointCallback",
    "ConfigError",
    "DataError",
    "EarlyStoppingCallback",
    "GenerationEvalCallback",
    "MLflowCallback",
    "MetricsLog",
    "PromptTemplate",
    "SFTCallback",
    "SFTConfig",
    "SFTTrainer",
    "TemplateRegistry",
    "TensorBoardCallback",
    "ValidationCallback",
    "WandBCallback",
    "read_metrics",
    "render_report",
]

if TYPE_CHECKING:
    from app.sft.callbacks import (
        CallbackHandler,
        CheckpointCallback,
        EarlyStoppingCallback,
        GenerationEvalCallback,
        MLflowCallback,
        SFTCallback,
        TensorBoardCallback,
        ValidationCallback,
        WandBCallback,
    )
    from app.sft.config import ConfigError, SFTConfig
    from app.sft.errors import DataError
    from app.sft.metrics_log import MetricsLog, read_metrics
    from app.sft.report import render_report
    from app.sft.templates import PromptTemplate, TemplateRegistry
    from app.sft.trainer import SFTTrainer


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and cache the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'app.sft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
