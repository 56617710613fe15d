"""Stop training when a monitored validation metric stops improving."""

from __future__ import annotations

import logging
import math
from typing import Any

from app.sft.callbacks.base import BestRecord, Monitor, MonitoringCallback, epoch_end_step, trainer_api

logger = logging.getLogger(__name__)


class EarlyStoppingCallback(MonitoringCallback):
    """Asks the trainer to stop when `monitor` has not improved for `patience` evaluations in a row.

    Args:
        patience: how many evaluations in a row without improvement end training. It counts evaluations that
            report `monitor` (every `eval_steps` steps and epoch ends), not epochs.
        min_delta: how much better than the best so far a value must be to count as an improvement.
        monitor: the metric to watch (`val_loss` by default; any evaluated metric, e.g. `gen_json_valid`).
        mode: `"min"` when lower is better (losses), `"max"` when higher is better (accuracies).

    With SFTTrainer it decides on each `on_evaluate` and stops with `trainer.request_stop("early_stopping")`;
    an evaluation improves when it beats the best of the earlier ones by more than `min_delta`, and `best` is
    that best as the trainer records it (`trainer.best_of`: the run's one record for the monitored metric).
    In a hand-written loop it reads `monitor` from the `metrics` of `on_step_end`/`on_epoch_end` (an epoch end
    on a step already checked is not counted twice), keeps `best` itself (the last value that improved by more
    than `min_delta`, as in Keras) and sets `trainer.should_stop = True`. A NaN or infinite value stops at once.
    The patience count survives a resume (and a hand-written loop's `best`); a run it stopped stays stopped
    unless the resume asks to continue, which starts the count afresh.
    """

    order = 10

    def __init__(
        self, patience: int = 3, min_delta: float = 0.0, monitor: str = "val_loss", mode: str = "min"
    ) -> None:
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        self._monitor = Monitor(monitor, mode, min_delta)
        self._best = BestRecord(self._monitor)
        self.patience = patience
        self.wait_count = 0
        self.stopped_step: int | None = None
        self._last_checked_step: int | None = None
        self._last_step = 0  # the newest step seen: a hand-written loop's trainer may have no global_step

    @property
    def min_delta(self) -> float:
        return self._monitor.min_delta

    @property
    def best(self) -> float | None:
        """The best value of `monitor` so far (None before one)."""
        return self._best.best()[0]

    def on_train_begin(self, trainer: Any, **kwargs: Any) -> None:
        self._best.attach(trainer)
        if self.stopped_step is None:
            return
        if self._best.managed:  # the trainer resumed a run this callback stopped: it asked to go on
            logger.info("Continuing after early stopping at step %d; patience starts afresh", self.stopped_step)
            self.stopped_step, self.wait_count = None, 0
        else:
            logger.info("Early stopping ended this run at step %d already; not training further",
                        self.stopped_step)
            trainer.should_stop = True

    def on_evaluate(self, trainer: Any, step: int, metrics: dict[str, float], **kwargs: Any) -> None:
        if self.monitor in metrics:
            self._check(trainer, step, float(metrics[self.monitor]))

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float], **kwargs: Any) -> None:
        self._last_step = step
        value = self.loop_value(trainer, metrics)
        if value is not None:
            self._check(trainer, step, value)

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float], **kwargs: Any) -> None:
        api = trainer_api(trainer)
        value = self.loop_value(trainer, metrics)
        if value is not None:
            self._check(trainer, epoch_end_step(api, self._last_step), value)
            self._last_checked_step = None  # only a step end's check is shared, with the epoch end at that step
        elif api.managed and self.monitor not in api.metrics:
            self._monitor.warn_missing(type(self).__name__, api.metrics)

    def _check(self, trainer: Any, step: int, value: float) -> None:
        """Count one evaluation; a second one at the same step (an epoch end just validated) is not counted."""
        if step == self._last_checked_step:
            return
        self._last_checked_step = step
        if not math.isfinite(value):
            self._stop(trainer, step, f"{self.monitor} is {value}")
        elif self._best.offer(value, step):
            self.wait_count = 0
        else:
            self.wait_count += 1
            logger.info("%s did not improve on %.4f (%d of %d checks)", self.monitor, self.best,
                        self.wait_count, self.patience)
            if self.wait_count >= self.patience:
                self._stop(trainer, step, f"{self.monitor} did not improve on {self.best:.4f} in "
                                          f"{self.patience} checks")

    def _stop(self, trainer: Any, step: int, reason: str) -> None:
        logger.info("Early stopping at step %s: %s", step, reason)
        self.stopped_step = step
        trainer_api(trainer).request_stop("early_stopping")

    def state_dict(self) -> dict[str, Any]:
        """The patience count, and a hand-written loop's `best` (a managed run's best is the trainer's)."""
        state = {"wait_count": self.wait_count, "stopped_step": self.stopped_step}
        return state if self._best.managed else {"best": self._best.value, **state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._best.value = state.get("best")
        self.wait_count = int(state.get("wait_count", 0))
        self.stopped_step = state.get("stopped_step")
