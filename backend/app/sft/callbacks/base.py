"""The callback base class, the contract a callback may rely on, and the one dispatcher that fires every event.

`TrainerAPI` names everything a callback may use of the trainer it is given. `SFTTrainer` implements all of
it. A hand-written loop may pass any object with `model` and `device` instead (a stand-in, the way the quick
reference's own tests drive callbacks): `trainer_api(obj)` wraps it with single-process defaults, so the
built-in callbacks work against one typed surface either way (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)


class TrainerAPI:
    """What a callback may use of the trainer. The defaults describe a single-process hand-written loop.

    Attributes:
        model, device: the model being trained and where its batches go (every trainer has these two).
        tokenizer, config, output_dir: the run's tokenizer, `SFTConfig` and output folder (None when unknown).
        val_dataloader: batches of the run's validation data, or None.
        eval_batch_size: examples per evaluation batch.
        global_step, epoch: optimizer steps taken so far (1-based once a step is done) and the 0-based epoch.
        is_main_process, process_index, num_processes: the process layout (only the main process writes).
        should_stop: set True to stop after the current step (`request_stop` also says why).
        metrics: the latest value of every metric the trainer has seen, training and evaluation alike
            (`metric_step(name)` says from which step, `history(name)` gives every recorded value).
        best_metric, best_step, best_checkpoint: the one record of the best: the best value of the monitored
            metric, the step of that evaluation, and the checkpoint that holds it (`best_of` reads the best
            of any evaluated metric).
        managed: True when the trainer fires `on_evaluate`, keeps `metrics` and the best record, and writes
            the checkpoints that `CheckpointCallback` asks for (SFTTrainer). False for a hand-written loop:
            there CheckpointCallback writes its own files, decisions read the step's `metrics` argument and
            each callback keeps the best it saw itself (`BestRecord`, `MonitoringCallback.loop_value`).
    """

    model: torch.nn.Module
    device: torch.device | str
    tokenizer: Any = None
    config: Any = None
    output_dir: Any = None
    val_dataloader: Iterable[Mapping[str, Any]] | None = None
    eval_batch_size: int = 8
    global_step: int = 0
    epoch: int = 0
    is_main_process: bool = True
    process_index: int = 0
    num_processes: int = 1
    should_stop: bool = False
    managed: bool = False

    @property
    def metrics(self) -> dict[str, float]:
        return {}

    @property
    def best_metric(self) -> float | None:
        return None

    @property
    def best_step(self) -> int | None:
        return None

    @property
    def best_checkpoint(self) -> str | None:
        """The path of the best checkpoint (inside the checkpoint folder), or None."""
        return None

    def metric_step(self, name: str) -> int | None:
        """The step of the newest value of metric `name` in `metrics`, or None."""
        return None

    def best_of(self, name: str, mode: str = "min", *, before: int | None = None) -> tuple[float, int] | None:
        """The best `(value, step)` of metric `name` over the recorded evaluations (only those before step
        `before`, when given), by `mode`; None while there is none. A hand-written loop records none."""
        return None

    def history(self, name: str) -> list[tuple[int, float]]:
        """Every recorded `(step, value)` of metric `name`, oldest first."""
        return []

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over all processes (unchanged on one process)."""
        return tensor

    def autocast(self) -> contextlib.AbstractContextManager:
        """The configured mixed-precision context (a no-op by default)."""
        return contextlib.nullcontext()

    def make_eval_dataloader(self, dataset: Any) -> Iterable[Mapping[str, Any]] | None:
        """Batches of `dataset` (raw or tokenized rows) with the trainer's collation; None if it has none."""
        return None

    def request_stop(self, reason: str) -> None:
        """Stop after the current step, recording `reason` (e.g. "early_stopping")."""
        self.should_stop = True

    def train_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The training part of a step's `metrics`, without what evaluations added to it.

        A hand-written loop fires no `on_evaluate`, so by convention its evaluation metrics are the `val_*`
        and `best_val*` keys; SFTTrainer knows which keys this step's evaluations reported.
        """
        return {key: value for key, value in metrics.items() if not key.startswith(("val_", "best_val"))}

    def record_evaluation(self, step: int, metrics: Mapping[str, float]) -> None:
        """Take in an evaluation's results: the trainer keeps them, updates the best and fires `on_evaluate`."""


_STAND_IN_FIELDS = (
    "tokenizer", "config", "output_dir", "val_dataloader", "eval_batch_size", "global_step", "epoch",
    "is_main_process", "all_reduce_sum", "make_eval_dataloader",
)
"""The attributes a stand-in trainer may set itself (as instance attributes) to replace TrainerAPI's defaults."""


class _StandInTrainer(TrainerAPI):
    """A TrainerAPI view of an object with `model` and `device` (plus any of `_STAND_IN_FIELDS`); without
    `device`, batches go where the model's parameters are.

    Only attributes the object holds itself are taken over, so a `unittest.mock.Mock`'s automatic attributes
    are never mistaken for real ones.
    """

    def __init__(self, trainer: Any) -> None:
        self._trainer = trainer
        self.model = getattr(trainer, "model", None)  # a logger's stand-in may have no model
        self.device = getattr(trainer, "device", None) or _device_of(self.model)
        own = getattr(trainer, "__dict__", {})
        for name in _STAND_IN_FIELDS:
            if name in own:
                setattr(self, name, own[name])

    def request_stop(self, reason: str) -> None:
        self._trainer.should_stop = True


def _device_of(model: Any) -> torch.device:
    """Where `model`'s first parameter is (a stand-in without `device` validates there); CPU without one."""
    parameter = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    return torch.device("cpu") if parameter is None else parameter.device


def trainer_api(trainer: Any) -> TrainerAPI:
    """`trainer` itself when it implements TrainerAPI, else a single-process view of its `model` and `device`."""
    return trainer if isinstance(trainer, TrainerAPI) else _StandInTrainer(trainer)


def epoch_end_step(trainer: Any, last_step: int) -> int:
    """The step an epoch's end belongs to: the trainer's `global_step`, or `last_step`, the newest step the
    callback saw, when that is later (a hand-written loop's trainer may keep no global_step)."""
    return max(int(trainer_api(trainer).global_step or 0), last_step)


def publish_evaluation(trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
    """Hand an evaluation's results to the trainer (which fires `on_evaluate`); a no-op for a stand-in."""
    trainer_api(trainer).record_evaluation(step, dict(metrics))


class Monitor:
    """The metric a deciding callback watches, in the vocabulary every callback shares (Keras, Lightning).

    Args:
        monitor: the metric's name as evaluations report it (`val_loss`, `gen_exact_match`, ...).
        mode: `"min"` when lower is better (losses), `"max"` when higher is better (accuracies).
        min_delta: how much better than the best a value must be to count as an improvement.
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "min", min_delta: float = 0.0) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a metric name, got {monitor!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        self.name, self.mode, self.min_delta = monitor, mode, float(min_delta)
        self._warned = False

    @property
    def worst(self) -> float:
        """The value every finite value improves on (+inf for `min`, -inf for `max`)."""
        return math.inf if self.mode == "min" else -math.inf

    def improves(self, value: float, best: float | None) -> bool:
        """Whether `value` is better than `best` by more than `min_delta` (a NaN or infinity never is)."""
        if not math.isfinite(value):
            return False
        if best is None or not math.isfinite(best):
            return True
        return value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta

    def warn_missing(self, owner: str, seen: Iterable[str]) -> None:
        """One warning (per Monitor) that `owner` watches a metric nobody reported, listing those that exist."""
        if not self._warned:
            self._warned = True
            logger.warning("%s monitors %r, which no evaluation has reported; metrics seen: %s", owner, self.name,
                           ", ".join(sorted(seen)) or "none")


class SFTCallback:
    """Base class of every callback: override only the hooks you need; all of them do nothing by default.

    Hooks, in the order the trainer fires them:

    - `on_train_begin(trainer)`: once, before the first step (also when resuming).
    - `on_epoch_begin(trainer, epoch)`: at the start of each epoch (0-based).
    - `on_step_end(trainer, step, metrics)`: after each optimizer step; `step` is the global step (1-based)
      and `metrics` the dict of this step's values (`loss`, `learning_rate`, ...). At a step that evaluated,
      `metrics` also holds the evaluation's values (`val_loss`, ...).
    - `on_evaluate(trainer, step, metrics)`: once per evaluation (every `eval_steps` or at an epoch end),
      with that evaluation's metrics only (`val_loss`, `val_perplexity`, `gen_*`, ...), fired by whatever
      evaluated, from inside its own `on_step_end`/`on_epoch_end`.
    - `on_epoch_end(trainer, epoch, metrics)`: at the end of each epoch, after its last `on_step_end`.
    - `on_save(trainer, step, checkpoint_path)`: after a checkpoint was written, once the step's
      `on_step_end` (and, at an epoch's last step, `on_epoch_end`) has reached every callback.
    - `on_train_end(trainer, error=None)`: once, last, also when training failed (`error` is the exception).

    `order` sets where the callback runs among the others (lower runs first; see `CallbackHandler`).
    Callbacks that must survive a resume override `state_dict()`/`load_state_dict()`; the state is stored
    in checkpoints as JSON, so it must hold only JSON types (another state is left out, with a warning).
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

    def on_evaluate(self, trainer: Any, step: int, metrics: dict[str, float], **kwargs: Any) -> None:
        """Called once per evaluation with that evaluation's metrics."""

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float], **kwargs: Any) -> None:
        """Called at the end of each epoch with the epoch's metrics."""

    def on_save(self, trainer: Any, step: int, checkpoint_path: str, **kwargs: Any) -> None:
        """Called after a checkpoint was written to `checkpoint_path`."""

    def on_train_end(self, trainer: Any, **kwargs: Any) -> None:
        """Called once when training ends, also after a failure (`kwargs["error"]` is the exception)."""


HOOK_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "on_train_begin": (), "on_epoch_begin": ("epoch",), "on_step_end": ("step", "metrics"),
    "on_evaluate": ("step", "metrics"), "on_epoch_end": ("epoch", "metrics"), "on_save": ("step", "checkpoint_path"),
    "on_train_end": (),
}
"""The keyword arguments the trainer passes to each hook, after the trainer itself (the quick reference's table)."""
OPTIONAL_ARGUMENTS: dict[str, tuple[str, ...]] = {"on_train_end": ("error",)}
"""Keyword arguments passed beyond the table, only to a hook that takes them: `def on_train_end(self, trainer)`,
as the table reads, is called without `error`."""


def _check_hooks(callback: SFTCallback) -> None:
    """A TypeError, before training, naming a hook of `callback` that cannot take what the trainer passes it."""
    for event, names in HOOK_ARGUMENTS.items():
        hook = getattr(callback, event)
        if not callable(hook):
            raise TypeError(f"{type(callback).__name__}.{event} is {hook!r}, not a method: define it or leave it out")
        try:
            signature = inspect.signature(hook)
        except ValueError:  # no signature to read (a builtin): it is called and judged then
            continue
        if not any(_binds(signature, (*names, *extra)) for extra in (OPTIONAL_ARGUMENTS.get(event, ()), ())):
            wanted = ", ".join(("self", "trainer", *names, "**kwargs"))
            raise TypeError(
                f"{type(callback).__name__}.{event}{signature} cannot take the arguments the trainer passes "
                f"(trainer, {', '.join(f'{name}=...' for name in names) or 'nothing else'}): define it as "
                f"`def {event}({wanted})`"
            )


def _binds(signature: inspect.Signature, names: tuple[str, ...]) -> bool:
    try:
        signature.bind(None, **dict.fromkeys(names))
    except TypeError:
        return False
    return True


def _taken(hook: Any, optional: tuple[str, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` without those of the `optional` names that `hook` takes neither by name nor by `**kwargs`."""
    if not optional:
        return kwargs
    try:
        parameters = inspect.signature(hook).parameters
    except ValueError:  # no signature to read (a builtin): it gets everything
        return kwargs
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return kwargs
    return {name: value for name, value in kwargs.items() if name not in optional or name in parameters}


class CallbackHandler:
    """Holds the callbacks and fires each event to all of them, in one fixed order.

    Order rule: callbacks run sorted by their `order` attribute, lowest first, in the order they were
    added when equal. The built-ins are ValidationCallback (0), EarlyStoppingCallback (10), your own
    callbacks (50 by default), CheckpointCallback (60), loggers such as WandBCallback and
    TensorBoardCallback (90). Decisions do not depend on this order: the trainer keeps the newest value
    of every metric (`trainer.metrics`), and checkpointing and early stopping read it from there.

    `current` is the callback whose hook is running (None between hooks), so the trainer can tell which
    callback asked it to stop.
    """

    def __init__(self, callbacks: Iterable[SFTCallback] = ()) -> None:
        self.callbacks: list[SFTCallback] = []
        self.current: SFTCallback | None = None
        self._unsaved: set[str] = set()  # state keys already warned about as not JSON
        for callback in callbacks:
            self.add(callback)

    def add(self, callback: SFTCallback) -> None:
        """Add a callback instance at the place its `order` gives it; a hook of it that cannot take the arguments
        the trainer passes (`HOOK_ARGUMENTS`) is a TypeError now, not a crash when the trainer first calls it."""
        if not isinstance(callback, SFTCallback):
            raise TypeError(
                f"callbacks must be SFTCallback instances, got {callback!r} of type {type(callback).__name__}"
            )
        _check_hooks(callback)
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
        outer = self.current  # an event fired from inside another one's hook (on_evaluate) nests
        try:
            for callback in self.callbacks:
                self.current = callback
                hook = getattr(callback, event)
                hook(trainer, **_taken(hook, OPTIONAL_ARGUMENTS.get(event, ()), kwargs))
        finally:
            self.current = outer

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
        """Every callback's state, keyed by its unique state key. A state that is not JSON (a tensor, a set) is
        left out with one warning naming the callback, so that the checkpoint holding the rest is still written."""
        states = {}
        for key, callback in zip(self._keys(), self.callbacks, strict=True):
            state = callback.state_dict()
            try:
                json.dumps(state, allow_nan=True)
            except (TypeError, ValueError) as error:
                if key not in self._unsaved:
                    self._unsaved.add(key)
                    logger.warning("Not saving the state of callback %r in checkpoints: %s.state_dict() must return "
                                   "JSON types only (%s); it starts afresh on resume", key, type(callback).__name__,
                                   error)
                continue
            states[key] = state
        return states

    def load_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        """Give each callback its saved state; a state with no matching callback is logged and skipped."""
        by_key = dict(zip(self._keys(), self.callbacks, strict=True))
        for key, state in states.items():
            if key in by_key:
                by_key[key].load_state_dict(state)
            else:
                logger.warning("Ignoring saved state of callback %r: no such callback is registered", key)


class BestRecord:
    """The best of one metric as a callback reports it (`best_val_loss`, `best`, `best_checkpoint`).

    In a run managed by SFTTrainer the trainer's record is the only one: this reads it (`trainer.best_of`,
    `trainer.best_checkpoint`) and keeps nothing. In a hand-written loop nothing else keeps a best, so this
    keeps what its callback saw itself (`offer`), as the quick reference describes. This class is the one
    place where the two differ; `attach` (at `on_train_begin`) says which one applies.
    """

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.trainer: TrainerAPI | None = None  # the managing trainer of the current run, if any
        self.value: float | None = None  # a hand-written loop's own record: value, step and checkpoint
        self.step: int | None = None
        self.checkpoint: str | None = None

    def attach(self, trainer: Any) -> TrainerAPI:
        """Read the trainer's record from now on when it keeps one (SFTTrainer); returns its TrainerAPI view."""
        api = trainer_api(trainer)
        self.trainer = api if api.managed else None
        return api

    @property
    def managed(self) -> bool:
        return self.trainer is not None

    def best(self, before: int | None = None) -> tuple[float | None, int | None]:
        """The best `(value, step)` so far (in a managed run: over the evaluations before step `before`)."""
        if self.trainer is None:
            return self.value, self.step
        return self.trainer.best_of(self.monitor.name, self.monitor.mode, before=before) or (None, None)

    def offer(self, value: float, step: int) -> bool:
        """Whether `value`, seen at `step`, improves on the best before it (by more than `min_delta`). A
        hand-written loop keeps it as its best when it does; a managed run's trainer has recorded it already."""
        improved = self.monitor.improves(value, self.best(before=step)[0])
        if improved and self.trainer is None:
            self.value, self.step, self.checkpoint = value, step, None
        return improved

    def saved(self) -> tuple[float | None, int | None, str | None]:
        """The hand-written loop's record, to `restore` when what it describes failed to happen."""
        return self.value, self.step, self.checkpoint

    def restore(self, record: tuple[float | None, int | None, str | None]) -> None:
        self.value, self.step, self.checkpoint = record


class MonitoringCallback(SFTCallback):
    """A callback that decides by one monitored metric (`self._monitor`, a `Monitor`): its `monitor` and `mode`;
    `self._best` is its view of the best of that metric (`BestRecord`)."""

    _monitor: Monitor
    _best: BestRecord

    def loop_value(self, trainer: Any, metrics: Mapping[str, float]) -> float | None:
        """The monitored value in a hand-written loop's step or epoch `metrics` (such a loop fires no
        `on_evaluate`, so its evaluations arrive there); None when absent, and always in a managed run, whose
        evaluations arrive through `on_evaluate`."""
        if trainer_api(trainer).managed or self.monitor not in metrics:
            return None
        return float(metrics[self.monitor])

    @property
    def monitor(self) -> str:
        return self._monitor.name

    @property
    def mode(self) -> str:
        return self._monitor.mode
