"""The callback base class and the one dispatcher that fires every training event.

A callback sees a `trainer` object. The built-in callbacks need only `trainer.model` and `trainer.device`;
everything else (`is_main_process`, `all_reduce_sum`, `callback_handler`, ...) is optional and read with
`getattr`, so a hand-written loop can use them too (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)


class SFTCallback:
    """Base class of every callback: override only the hooks you need; all of them do nothing by default.

    Hooks, in the order the trainer fires them:

    - `on_train_begin(trainer)`: once, before the first step (also when resuming).
    - `on_epoch_begin(trainer, epoch)`: at the start of each epoch (0-based).
    - `on_step_end(trainer, step, metrics)`: after each optimizer step; `step` is the global step (1-based)
      and `metrics` the dict of this step's values (`loss`, `learning_rate`, ...). Callbacks may add keys to
      it (ValidationCallback adds `val_loss`); later callbacks see them.
    - `on_save(trainer, step, checkpoint_path)`: after a checkpoint was written.
    - `on_epoch_end(trainer, epoch, metrics)`: at the end of each epoch.
    - `on_train_end(trainer, error=None)`: once, last, also when training failed (`error` is the exception).

    `order` sets where the callback runs among the others (lower runs first; see `CallbackHandler`).
    Callbacks that must survive a resume override `state_dict()`/`load_state_dict()`; the state is stored
    in checkpoints as JSON, so it must hold only JSON types.
    """

    order: int = 50

    @property
    def state_key(self) -> str:
        """The name this callback's state is stored under in a checkpoint (default: the class name)."""
        return type(self).__name__

    def state_dict(self) -> dict[str, Any]:
        """The JSON-serialisable state to restore on resume (default: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned (default: nothing to restore)."""

    def on_train_begin(self, trainer: Any, **kwargs: Any) -> None:
        """Called once before training starts."""

    def on_epoch_begin(self, trainer: Any, epoch: int, **kwargs: Any) -> None:
        """Called at the start of each epoch."""

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float], **kwargs: Any) -> None:
        """Called after each optimizer step with that step's metrics."""

    def on_save(self, trainer: Any, step: int, checkpoint_path: str, **kwargs: Any) -> None:
        """Called after a checkpoint was written to `checkpoint_path`."""

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float], **kwargs: Any) -> None:
        """Called at the end of each epoch with the epoch's metrics."""

    def on_train_end(self, trainer: Any, **kwargs: Any) -> None:
        """Called once when training ends, also after a failure (`kwargs["error"]` is the exception)."""


class CallbackHandler:
    """Holds the callbacks and fires each event to all of them, in one fixed order.

    Order rule: callbacks run sorted by their `order` attribute, lowest first, in the order they were
    added when equal. The built-ins are ValidationCallback (0), EarlyStoppingCallback (10), your own
    callbacks (50 by default), CheckpointCallback (60), loggers such as WandBCallback and
    TensorBoardCallback (90). So a validation result computed at step N is already in `metrics` when
    early stopping, checkpointing and logging look at step N, whatever order the callbacks were added in.
    """

    def __init__(self, callbacks: Iterable[SFTCallback] = ()) -> None:
        self.callbacks: list[SFTCallback] = []
        for callback in callbacks:
            self.add(callback)

    def add(self, callback: SFTCallback) -> None:
        """Add a callback instance at the place its `order` gives it."""
        if not isinstance(callback, SFTCallback):
            raise TypeError(
                f"callbacks must be SFTCallback instances, got {callback!r} of type {type(callback).__name__}"
            )
        self.callbacks.append(callback)
        self.callbacks.sort(key=lambda cb: cb.order)  # sort is stable: ties keep their insertion order

    def remove(self, callback: SFTCallback | type[SFTCallback]) -> None:
        """Remove this callback instance, or every callback of this class; ValueError if none matches."""
        if isinstance(callback, type):
            kept = [cb for cb in self.callbacks if not isinstance(cb, callback)]
        else:
            kept = [cb for cb in self.callbacks if cb is not callback]
        if len(kept) == len(self.callbacks):
            raise ValueError(f"callback {callback!r} is not registered")
        self.callbacks = kept

    def fire(self, event: str, trainer: Any, **kwargs: Any) -> None:
        """Call `callback.<event>(trainer, **kwargs)` on every callback, in order."""
        if not hasattr(SFTCallback, event) or not event.startswith("on_"):
            raise ValueError(f"unknown callback event {event!r}")
        for callback in self.callbacks:
            getattr(callback, event)(trainer, **kwargs)

    def _keys(self) -> list[str]:
        """Unique state keys: a repeated `state_key` gets `_1`, `_2`, ... in callback order."""
        seen: dict[str, int] = {}
        keys = []
        for callback in self.callbacks:
            key = callback.state_key
            count = seen.get(key, 0)
            seen[key] = count + 1
            keys.append(key if count == 0 else f"{key}_{count}")
        return keys

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Every callback's state, keyed by its unique state key."""
        return {key: cb.state_dict() for key, cb in zip(self._keys(), self.callbacks, strict=True)}

    def load_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        """Give each callback its saved state; a state with no matching callback is logged and skipped."""
        by_key = dict(zip(self._keys(), self.callbacks, strict=True))
        for key, state in states.items():
            if key in by_key:
                by_key[key].load_state_dict(state)
            else:
                logger.warning("Ignoring saved state of callback %r: no such callback is registered", key)
