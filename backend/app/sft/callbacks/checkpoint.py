"""When to save a checkpoint and which ones to keep: rotation that never deletes the best or the newest one."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel

from app.sft import atomic, checkpointing
from app.sft.callbacks.base import BestRecord, Monitor, MonitoringCallback, TrainerAPI, trainer_api

logger = logging.getLogger(__name__)

_OWN_NAME = re.compile(r"^checkpoint_step_\d+(\.pt)?$")


class CheckpointCallback(MonitoringCallback):
    """Saves a checkpoint every `save_steps` steps into `output_dir` and keeps the newest few.

    Args:
        output_dir: folder of the checkpoints; created (with its parents) now.
        save_steps: save when `step % save_steps == 0` (and at the run's last step).
        save_total_limit: how many checkpoints to keep; `None` keeps all. The oldest are deleted first, but
            the best one and the newest one are always kept, so a limit of 1 can leave 2.
        save_best_only: save only when the newest evaluation of `monitor` is better than every earlier one
            (also when that evaluation ran at a step that saved nothing); while no evaluation has reported
            `monitor`, save steps save.
        monitor, mode: the metric that decides the best checkpoint and whether lower (`min`) or higher (`max`)
            is better; `val_loss`/`min` by default, or e.g. `monitor="gen_exact_match", mode="max"`.

    With `SFTTrainer` the callback decides and the trainer writes: after every callback's `on_step_end` the
    trainer asks `should_save(trainer, step)`, writes its full training state into `checkpoint_path(step)`,
    fires `on_save`, and calls `rotate(trainer)`. The best is the trainer's one record
    (`trainer.state.best_*`), which `best_val_loss` and `best_checkpoint` read; a CheckpointCallback given to
    the trainer makes its `monitor`/`mode` the run's (over the config's `best_metric`, said in the log).

    In a hand-written loop (a stand-in trainer with `model` and `device`), `on_step_end` decides, updates
    `best_val_loss` and `best_checkpoint` from the step's `metrics`, and calls `_save_checkpoint`, which writes
    a model with `save_pretrained` (Hugging Face, PEFT/LoRA) into the folder `checkpoint_step_<N>` and any
    other module's state dict into `checkpoint_step_<N>.pt` (load it with `torch.load(path,
    weights_only=True)`); then `_rotate_checkpoints()` deletes the oldest. Only the main process writes and
    deletes.

    Rotation only ever deletes checkpoints of ours: entries directly inside `output_dir` (after resolving
    links), named `checkpoint_step_<N>`, not links themselves; anything else is skipped with a warning.
    """

    order = 60

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        save_steps: int = 500,
        save_total_limit: int | None = 3,
        save_best_only: bool = False,
        monitor: str = "val_loss",
        mode: str = "min",
    ) -> None:
        if not isinstance(save_steps, int) or save_steps < 1:
            raise ValueError(f"save_steps must be an integer >= 1, got {save_steps!r}")
        if save_total_limit is not None and (not isinstance(save_total_limit, int) or save_total_limit < 1):
            raise ValueError(
                f"save_total_limit must be an integer >= 1 or None (keep all), got {save_total_limit!r}"
            )
        self._monitor = Monitor(monitor, mode)
        self.output_dir = os.fspath(output_dir)
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise ValueError(f"output_dir {self.output_dir!r} exists and is not a directory")
        try:
            os.makedirs(self.output_dir, exist_ok=True)
        except OSError as error:
            raise ValueError(f"output_dir {self.output_dir!r} cannot be created: {error}") from error
        self.save_steps = save_steps
        self.save_total_limit = save_total_limit
        self.save_best_only = save_best_only
        self._best = BestRecord(self._monitor)
        self._written: list[str] = []  # what this callback wrote itself in a hand-written loop, oldest first
        self._warned_unmonitored = False  # said once that save_best_only saved a step without `monitor`

    @property
    def best_val_loss(self) -> float:
        """The best value of `monitor` (the name is the quick reference's); +inf (-inf for `max`) before one."""
        best = self._best.best()[0]
        return self._monitor.worst if best is None else best

    @best_val_loss.setter
    def best_val_loss(self, value: float) -> None:
        self._best.value = value

    @property
    def best_checkpoint(self) -> str | None:
        """The path of the best checkpoint, or None while none holds the best evaluation."""
        if self._best.trainer is not None:
            best = self._best.trainer.best_checkpoint
            return os.path.join(self.output_dir, os.path.basename(best)) if best else None
        return self._best.checkpoint

    @property
    def checkpoints(self) -> list[str]:
        """The checkpoints kept, oldest first. In a hand-written loop this is the callback's own list: paths
        appended to it (or a list assigned to it) are rotated by `_rotate_checkpoints()`; with SFTTrainer it is
        a fresh list of the checkpoints on disk."""
        if self._best.managed:
            return [str(path) for path in self._own_checkpoints()]
        return self._written

    @checkpoints.setter
    def checkpoints(self, paths: list[str | os.PathLike[str]]) -> None:
        self._written = [os.fspath(path) for path in paths]

    def on_train_begin(self, trainer: Any, **kwargs: Any) -> None:
        self._best.attach(trainer)

    # --- decisions, asked by the trainer -----------------------------------------------------------------------

    def should_save(self, trainer: Any, step: int, *, final: bool = False) -> bool:
        """Whether to checkpoint `step`: every `save_steps` steps and at the run's last step (`final`); with
        `save_best_only`, only when the newest evaluation of `monitor` is the best and no checkpoint holds it."""
        if step % self.save_steps != 0 and not final:
            return False
        if not self.save_best_only:
            return True
        api = trainer_api(trainer)
        evaluated_at = api.metric_step(self.monitor)
        if evaluated_at is None:
            if final:
                self._monitor.warn_missing(type(self).__name__, api.metrics)
            return True
        return api.best_checkpoint is None and evaluated_at == api.best_step

    def checkpoint_path(self, step: int) -> Path:
        """The folder the trainer writes step `step`'s checkpoint into."""
        return Path(self.output_dir) / f"checkpoint_step_{step}"

    def rotate(self, trainer: Any) -> None:
        """Delete the oldest checkpoints beyond `save_total_limit`, sparing the best and the newest."""
        api = trainer_api(trainer)
        if self.save_total_limit is None or not api.is_main_process:
            return
        self._delete_oldest([str(path) for path in self._own_checkpoints()], api.best_checkpoint)

    def _own_checkpoints(self) -> list[Path]:
        """Complete checkpoints of ours on disk in `output_dir`, oldest first (never links)."""
        return [path for path in checkpointing.list_checkpoints(self.output_dir) if self._is_own(str(path))]

    def _is_own(self, path: str) -> bool:
        """True for an entry directly inside `output_dir` (links and `..` resolved) named like a checkpoint."""
        if os.path.islink(path) or not _OWN_NAME.match(os.path.basename(path)):
            return False
        return checkpointing.is_inside(Path(path), Path(self.output_dir))

    # --- a hand-written loop: decide, record and write here ----------------------------------------------------

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float], **kwargs: Any) -> None:
        api = trainer_api(trainer)
        if api.managed or step % self.save_steps != 0:
            return
        value = self.loop_value(api, metrics)
        previous = self._best.saved()
        improved = value is not None and self._best.offer(value, step)
        if self.save_best_only and value is not None and not improved:
            logger.info("Not saving step %d: %s %.4f is not better than %.4f", step, self.monitor, value,
                        self.best_val_loss)
            return
        if self.save_best_only and value is None and not self._warned_unmonitored:
            self._warned_unmonitored = True
            logger.warning("CheckpointCallback(save_best_only=True) saves step %d, whose metrics have no %r (they "
                           "have: %s), so it cannot tell whether it is the best; validate at the save steps "
                           "(eval_steps dividing save_steps) to save only improvements", step, self.monitor,
                           ", ".join(sorted(metrics)) or "none")
        target = self._target(api, step)
        if improved:
            self._best.checkpoint = target
        try:
            self._save_checkpoint(trainer, step, metrics)
        except BaseException:
            self._best.restore(previous)
            raise
        if target in self._written:  # the same step saved again: it is the newest now
            self._written.remove(target)
        self._written.append(target)
        if api.is_main_process:  # another process may run ahead of the main one: it must not delete its files
            self._rotate_checkpoints()

    def _get_checkpoint_path(self, step: int) -> str:
        """Where step `step` is saved: `<output_dir>/checkpoint_step_<step>.pt` (folders drop the `.pt`)."""
        return os.path.join(self.output_dir, f"checkpoint_step_{step}.pt")

    def _target(self, api: TrainerAPI, step: int) -> str:
        file_path = self._get_checkpoint_path(step)
        return file_path.removesuffix(".pt") if hasattr(_unwrapped(api.model), "save_pretrained") else file_path

    def _save_checkpoint(self, trainer: Any, step: int, metrics: dict[str, float]) -> str | None:
        """Write the model of `step` (main process only) and return its path; other processes return None."""
        api = trainer_api(trainer)
        if not api.is_main_process:
            return None
        target = self._target(api, step)
        _write_model(api.model, target)
        logger.info("Saved checkpoint %s", target)
        return target

    def _rotate_checkpoints(self) -> None:
        """Delete the oldest checkpoints listed in `checkpoints` beyond `save_total_limit`, sparing the best and
        the newest; entries that are not checkpoints of ours are dropped from the list and left on disk."""
        self._written[:] = [os.fspath(path) for path in self._written]
        for path in [p for p in self._written if not self._is_own(p)]:
            logger.warning("Not deleting %s: it is not a checkpoint inside %s", path, self.output_dir)
            self._written.remove(path)
        if self.save_total_limit is None:
            return
        for path in self._delete_oldest(self._written, self._best.checkpoint):
            self._written.remove(path)

    def _delete_oldest(self, checkpoints: list[str], best: str | None) -> list[str]:
        """The one rotation: delete the oldest of `checkpoints` (oldest first, all ours) beyond
        `save_total_limit`, sparing the best and the newest; returns the deleted ones."""
        spared = {os.path.basename(best) if best else None, os.path.basename(checkpoints[-1]) if checkpoints else None}
        excess = len(checkpoints) - self.save_total_limit
        doomed = [path for path in checkpoints if os.path.basename(path) not in spared][: max(excess, 0)]
        for path in doomed:
            logger.info("Deleting old checkpoint %s (save_total_limit=%d)", path, self.save_total_limit)
            _remove(path)
        return doomed

    def state_dict(self) -> dict[str, Any]:
        """A hand-written loop's record (names inside `output_dir`); with SFTTrainer the trainer holds the best
        and the checkpoints are what is on disk, so there is nothing to save."""
        if self._best.managed:
            return {}
        best = self._best.checkpoint
        return {
            "checkpoints": [os.path.basename(path) for path in self._written],
            "best_val_loss": self._best.value,
            "best_checkpoint": os.path.basename(best) if best else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a hand-written loop's record; names (or older absolute paths, re-rooted by their name) that
        are no checkpoint of ours inside `output_dir` any more are dropped."""
        names = [os.path.basename(str(path)) for path in state.get("checkpoints", [])]
        self._written = [path for path in (os.path.join(self.output_dir, name) for name in names)
                         if os.path.exists(path) and self._is_own(path)]
        best = state.get("best_val_loss")
        self._best.value = None if best is None else float(best)
        best_name = state.get("best_checkpoint")
        best_path = os.path.join(self.output_dir, os.path.basename(best_name)) if best_name else None
        self._best.checkpoint = best_path if best_path in self._written else None


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, out of `torch.compile` and (Distributed)DataParallel wrappers, so that its checkpoint
    loads into the model's own class (no `_orig_mod.`/`module.` prefixes on its keys)."""
    return extract_model_from_parallel(model, keep_torch_compile=False)


def _write_model(model: torch.nn.Module, target: str) -> None:
    """Save `model` (unwrapped) to `target` atomically (`atomic`): a folder through `save_pretrained`, else a
    `torch.save` file of its state dict; `target` is never left half written."""
    model = _unwrapped(model)
    if hasattr(model, "save_pretrained"):
        with atomic.atomic_directory(target) as tmp:
            model.save_pretrained(tmp)
    else:
        with atomic.replacing(target) as file:
            torch.save(model.state_dict(), file)


def _remove(path: str) -> None:
    """Delete a checkpoint file or folder; a missing one is fine.

    A folder is first renamed to a hidden sibling (one atomic step), then deleted: a process killed halfway
    through the deletion leaves a hidden leftover, never a checkpoint folder with some of its files gone.
    """
    if os.path.isdir(path) and not os.path.islink(path):
        doomed = os.path.join(os.path.dirname(path), f".deleting-{os.path.basename(path)}")
        atomic.discard_leftover(doomed)
        os.replace(path, doomed)
        shutil.rmtree(doomed)
    elif os.path.lexists(path):
        os.remove(path)
