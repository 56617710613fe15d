"""Stop training when a monitored validation metric stops improving."""

from __future__ import annotations

import logging
import math
from typing import Any

from app.sft.callbacks.base import SFTCallback

logger = logging.getLogger(__name__)


class EarlyStoppingCallback(SFTCallback):
    """Asks the trainer to stop (`trainer.should_stop = True`) when `monitor` has not improved for a while.

    Args:
        patience: how many validation checks in a row without improvement end training. It counts checks
            (steps whose metrics contain `monitor`, i.e. every `eval_steps` steps and epoch ends), not epochs.
        min_delta: how much better than the best so far a value must be to count as an improvement.
        monitor: the metric to watch, as ValidationCallback writes it (`val_loss` by default).
        mode: `"min"` when lower is better (losses), `"max"` when higher is better (accuracies).

    A NaN or infinite value stops training at once. It runs after ValidationCallback (`order = 10`), so it
    sees the validation result of the same step. All processes see the same all-reduced validation loss, so
    they all decide alike. A run resumed after early stopping stops again before training.
    """

    order = 10

    def __init__(
        self, patience: int = 3, min_delta: float = 0.0, monitor: str = "val_loss", mode: str = "min"
    ) -> None:
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        if not min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.patience = patience
        self.min_delta = float(min_delta)
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None
        self.wait_count = 0
        self.stopped_step: int | None = None
        self._last_checked_step: int | None = None

    def on_train_begin(self, trainer: Any, **kwargs: Any) -> None:
        if self.stopped_step is not None:
            logger.info(
                "Early stopping ended this run at step %d already; not training further",
                self.stopped_step,
            )
            trainer.should_stop = True

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float], **kwargs: Any) -> None:
        self._check(trainer, step, metrics)

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float], **kwargs: Any) -> None:
        self._check(trainer, getattr(trainer, "global_step", None), metrics)

    def _check(self, trainer: Any, step: int | None, metrics: dict[str, float]) -> None:
        """Count one validation check; the epoch end of a step already checked is not counted again."""
        if self.monitor not in metrics:
            return
        if step is not None and step == self._last_checked_step:
            return
        self._last_checked_step = step
        value = float(metrics[self.monitor])
        if not math.isfinite(value):
            self._stop(trainer, step, f"{self.monitor} is {value}")
        elif self._improved(value):
            self.best, self.wait_count = value, 0
        else:
            self.wait_count += 1
            logger.info(
                "%s did not improve on %.4f (%d of %d checks)",
                self.monitor,
                self.best,
                self.wait_count,
                self.patience,
            )
            if self.wait_count >= self.patience:
                reason = f"{self.monitor} did not improve on {self.best:.4f} in {self.patience} checks"
                self._stop(trainer, step, reason)

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def _stop(self, trainer: Any, step: int | None, reason: str) -> None:
        logger.info("Early stopping at step %s: %s", step, reason)
        self.stopped_step = step
        trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait_count": self.wait_count, "stopped_step": self.stopped_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.wait_count = int(state.get("wait_count", 0))
        self.stopped_step = state.get("stopped_step")
