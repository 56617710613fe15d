"""Supervised fine-tuning of causal language models around a small callback system.

    from app.sft import SFTConfig, SFTTrainer, ValidationCallback, CheckpointCallback
"""

from app.sft.callbacks import (
    CallbackHandler,
    CheckpointCallback,
    EarlyStoppingCallback,
    GenerationEvalCallback,
    SFTCallback,
    TensorBoardCallback,
    ValidationCallback,
    WandBCallback,
)
from app.sft.config import ConfigError, SFTConfig
from app.sft.data import DataError
from app.sft.metrics_log import MetricsLog, read_metrics
from app.sft.report import render_report
from app.sft.templates import PromptTemplate, TemplateRegistry
from app.sft.trainer import SFTTrainer

__all__ = [
    "CallbackHandler",
    "CheckpointCallback",
    "ConfigError",
    "DataError",
    "EarlyStoppingCallback",
    "GenerationEvalCallback",
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
