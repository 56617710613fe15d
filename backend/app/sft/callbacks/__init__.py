"""Training callbacks: the base class, the dispatcher and the built-in callbacks."""

from app.sft.callbacks.base import CallbackHandler, SFTCallback
from app.sft.callbacks.checkpoint import CheckpointCallback
from app.sft.callbacks.early_stopping import EarlyStoppingCallback
from app.sft.callbacks.generation_eval import GenerationEvalCallback
from app.sft.callbacks.mlflow_logger import MLflowCallback
from app.sft.callbacks.tensorboard import TensorBoardCallback
from app.sft.callbacks.validation import ValidationCallback
from app.sft.callbacks.wandb_logger import WandBCallback

__all__ = [
    "CallbackHandler",
    "CheckpointCallback",
    "EarlyStoppingCallback",
    "GenerationEvalCallback",
    "MLflowCallback",
    "SFTCallback",
    "TensorBoardCallback",
    "ValidationCallback",
    "WandBCallback",
]
