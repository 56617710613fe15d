"""Periodic checkpoints with rotation that never deletes the best or the newest one."""

from __future__ import annotations

import logging
import math
import os
import shutil
from typing import Any

import torch

from app.sft.callbacks.base import SFTCallback

logger = logging.getLogger(__name__)


class CheckpointCallback(SFTCallback):
    """Saves a checkpoint every `save_steps` steps into `output_dir` and keeps the newest few.

    Args:
        output_dir: folder of the checkpoints; created (with its parents) now.
        save_steps: save when `step % save_steps == 0`.
        save_total_limit: how many checkpoints to keep; `None` keeps all. The oldest are deleted first, but
            the best one (lowest `val_loss`) and the newest one are always kept, so a limit of 1 can leave 2.
        save_best_only: save only when `val_loss` improved on the best saved checkpoint; a save step with no
            `val_loss` in its metrics still saves.

    What a checkpoint is depends on the trainer: a trainer with `save_checkpoint(path)` (SFTTrainer)
    writes its full training state into the folder `checkpoint_step_<N>`; otherwise a model with
    `save_pretrained` (Hugging Face, PEFT/LoRA) is saved into that folder, and any other `nn.Module` has its
    state dict written to `checkpoint_step_<N>.pt` (load it with `torch.load(path, weights_only=True)`).

    Only the main process writes files (SFTTrainer's `save_checkpoint` is called on every process, as it
    gathers state from all of them). It runs after validation and early stopping (`order = 60`), so it sees
    the step's `val_loss`, and fires `on_save` through `trainer.callback_handler` after each save.
    """

    order = 60

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        save_steps: int = 500,
        save_total_limit: int | None = 3,
        save_best_only: bool = False,
    ) -> None:
        if not isinstance(save_steps, int) or save_steps < 1:
            raise ValueError(f"save_steps must be an integer >= 1, got {save_steps!r}")
        if save_total_limit is not None and (not isinstance(save_total_limit, int) or save_total_limit < 1):
            raise ValueError(
                f"save_total_limit must be an integer >= 1 or None (keep all), got {save_total_limit!r}"
            )
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
        self.best_val_loss = float("inf")
        self.best_checkpoint: str | None = None
        self.checkpoints: list[str] = []

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float], **kwargs: Any) -> None:
        if step % self.save_steps != 0:
            return
        val_loss = metrics.get("val_loss")
        if self.save_best_only and val_loss is not None and not val_loss < self.best_val_loss:
            logger.info(
                "Not saving step %d: val_loss %.4f is not below %.4f",
                step,
                val_loss,
                self.best_val_loss,
            )
            return
        self._save_checkpoint(trainer, step, metrics)

    def on_train_end(self, trainer: Any, **kwargs: Any) -> None:
        if self.best_checkpoint is not None:
            logger.info("Best checkpoint: %s (val_loss %.4f)", self.best_checkpoint, self.best_val_loss)

    def _get_checkpoint_path(self, step: int) -> str:
        """Where step `step` is saved: `<output_dir>/checkpoint_step_<step>.pt` (folders drop the `.pt`)."""
        return os.path.join(self.output_dir, f"checkpoint_step_{step}.pt")

    def _save_checkpoint(self, trainer: Any, step: int, metrics: dict[str, float]) -> str | None:
        """Write the checkpoint of `step`, record it, rotate old ones and fire `on_save`; returns its path.

        Every process records the checkpoint (so `save_best_only` decides alike everywhere) and takes part in
        the trainer's `save_checkpoint`, which gathers state from all processes. Only the main process writes
        a model itself, deletes old checkpoints and fires `on_save`; the others return None.
        """
        is_main = getattr(trainer, "is_main_process", True)
        save_checkpoint = getattr(trainer, "save_checkpoint", None)
        file_path = self._get_checkpoint_path(step)
        folder = file_path.removesuffix(".pt")
        model = trainer.model
        target = file_path if save_checkpoint is None and not hasattr(model, "save_pretrained") else folder

        # Record the checkpoint before writing it, so the callback state stored inside it already lists it.
        previous = (list(self.checkpoints), self.best_val_loss, self.best_checkpoint)
        self._record(target, metrics.get("val_loss"))
        try:
            if save_checkpoint is not None:
                saved = os.fspath(save_checkpoint(folder))
            elif is_main:
                _write_model(model, target)
                saved = target
        except BaseException:
            self.checkpoints, self.best_val_loss, self.best_checkpoint = previous
            raise
        if not is_main:
            return None
        if saved != target:
            self.checkpoints[-1] = saved
            if self.best_checkpoint == target:
                self.best_checkpoint = saved
        logger.info("Saved checkpoint %s", saved)
        self._rotate_checkpoints()
        handler = getattr(trainer, "callback_handler", None)
        if handler is not None:
            handler.fire("on_save", trainer, step=step, checkpoint_path=saved)
        return saved

    def _record(self, path: str, val_loss: float | None) -> None:
        if path in self.checkpoints:  # the same step saved again (e.g. after a resume): it is the newest now
            self.checkpoints.remove(path)
        self.checkpoints.append(path)
        if val_loss is not None and val_loss < self.best_val_loss:
            self.best_val_loss, self.best_checkpoint = float(val_loss), path

    def _rotate_checkpoints(self) -> None:
        """Delete the oldest checkpoints beyond `save_total_limit`, sparing the best and the newest."""
        if self.save_total_limit is None:
            return
        excess = len(self.checkpoints) - self.save_total_limit
        protected = {self.best_checkpoint, self.checkpoints[-1] if self.checkpoints else None}
        for path in [p for p in self.checkpoints if p not in protected][: max(excess, 0)]:
            logger.info("Deleting old checkpoint %s (save_total_limit=%d)", path, self.save_total_limit)
            _remove(path)
            self.checkpoints.remove(path)

    def state_dict(self) -> dict[str, Any]:
        return {
            "checkpoints": list(self.checkpoints),
            "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
            "best_checkpoint": self.best_checkpoint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state; checkpoints that no longer exist on disk are dropped from the list."""
        self.checkpoints = [path for path in state.get("checkpoints", []) if os.path.exists(path)]
        best = state.get("best_val_loss")
        self.best_val_loss = float("inf") if best is None else float(best)
        best_checkpoint = state.get("best_checkpoint")
        self.best_checkpoint = best_checkpoint if best_checkpoint in self.checkpoints else None


def _write_model(model: torch.nn.Module, target: str) -> None:
    """Save `model` to `target` through a temporary sibling, so `target` is never left half written."""
    partial = target + ".partial"
    _remove(partial)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(partial)
    else:
        torch.save(model.state_dict(), partial)
    _remove(target)
    os.replace(partial, target)


def _remove(path: str) -> None:
    """Delete a checkpoint file or folder; a missing one is fine.

    A folder is first renamed to a hidden sibling (one atomic step), then deleted: a process killed halfway
    through the deletion leaves a hidden leftover, never a checkpoint folder with some of its files gone.
    """
    if os.path.isdir(path):
        doomed = os.path.join(os.path.dirname(path), f".deleting-{os.path.basename(path)}")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed)
    elif os.path.exists(path):
        os.remove(path)
