"""TensorBoard logging of training, validation and epoch metrics, through `torch.utils.tensorboard`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.sft.callbacks.base import SFTCallback, epoch_end_step, trainer_api
from app.sft.callbacks.generation_eval import samples_of
from app.sft.callbacks.trackers import scalar, without_credentials_in
from app.sft.paths import TENSORBOARD_DIR
from app.sft.run_dir import linked_folder_problem

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

logger = logging.getLogger(__name__)


class TensorBoardCallback(SFTCallback):
    """Writes metrics as TensorBoard scalars; view them with `tensorboard --logdir <output_dir>/tensorboard`.

    Tags, all at the global step:
    - a step's training metrics as `train/<name>` (`train/loss`, `train/learning_rate`, ...);
    - each evaluation's metrics (`on_evaluate`) as `eval/<name>`, a `val_` prefix dropped (`eval/loss`,
      `eval/perplexity`, `eval/gen_exact_match`); a hand-written loop, which fires no `on_evaluate`, has the
      `val_*` keys of its step metrics written so;
    - epoch-end metrics as `epoch/<name>`, at the newest step.
    The run config (when `trainer.config` has `to_dict()`) is written as a text table and as hparams, without
    the credentials of URLs in it.

    Only the main process writes. When resuming (`trainer.global_step > 0` at train begin), events that
    the interrupted run wrote after that step are purged, so curves do not double back. A `tensorboard` folder
    in the run folder that is a symbolic link is not written through. Any writer
    failure (a bad `log_dir`, a full disk) logs one warning and turns the callback off; training goes on.
    """

    order = 90

    def __init__(self, log_dir: str | None = None) -> None:
        self.log_dir = log_dir
        self.writer: SummaryWriter | None = None
        self._last_step = 0  # the newest step of on_step_end: a hand-written loop's trainer may keep no global_step

    def _fail(self, err: Exception) -> None:
        logger.warning("TensorBoard logging failed (%s); training goes on without it.", err)
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # the writer is already broken; the warning above said so
                pass

    def on_train_begin(self, trainer: Any, **kwargs: Any) -> None:
        api = trainer_api(trainer)
        if not api.is_main_process:
            return
        log_dir = self.log_dir or str(Path(api.output_dir or "runs") / TENSORBOARD_DIR)
        step = int(api.global_step or 0)
        problem = None if self.log_dir else linked_folder_problem(Path(log_dir))
        if problem is not None:
            self._fail(OSError(problem))
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir, purge_step=step + 1 if step > 0 else None)
            if hasattr(api.config, "to_dict"):
                self._write_config(without_credentials_in(api.config.to_dict()))
        except ImportError as err:
            self._fail(ImportError(f"{err}; install it with pip install 'llm-playground-sft[tensorboard]'"))
        except Exception as err:  # OSError, or anything else the writer raises
            self._fail(err)

    def _write_config(self, config: Mapping[str, Any]) -> None:
        """The config as a markdown table (TEXT tab) and as hparams (HPARAMS tab, to compare runs)."""
        from torch.utils.tensorboard.summary import hparams

        rows = "\n".join(f"| {key} | `{value!r}` |" for key, value in config.items())
        self.writer.add_text("config", f"| setting | value |\n|---|---|\n{rows}", global_step=0)
        simple = {
            key: value if isinstance(value, (bool, int, float, str)) else repr(value)
            for key, value in config.items()
        }
        shown_metrics = dict.fromkeys(("train/loss", "eval/loss"))  # the scalars the hparams table shows
        for summary in hparams(simple, shown_metrics):
            self.writer.file_writer.add_summary(summary)

    def _add_scalars(self, metrics: Mapping[str, Any], step: int, tag_of: Callable[[str], str]) -> None:
        if self.writer is None:
            return
        try:
            for name, value in metrics.items():
                number = scalar(value)
                if number is not None:
                    self.writer.add_scalar(tag_of(name), number, global_step=step)
        except Exception as err:
            self._fail(err)

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float], **kwargs: Any) -> None:
        api = trainer_api(trainer)
        self._last_step = step
        train = api.train_metrics(metrics)
        self._add_scalars(train, step, lambda name: f"train/{name}")
        if not api.managed:
            evaluated = {k: v for k, v in metrics.items() if k not in train and k.startswith("val_")}
            self._add_scalars(evaluated, step, _eval_tag)

    def on_evaluate(self, trainer: Any, step: int, metrics: dict[str, float], **kwargs: Any) -> None:
        self._add_scalars({k: v for k, v in metrics.items() if not k.startswith("best_")}, step, _eval_tag)
        self._add_samples(samples_of(trainer, step), step)

    def _add_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        """An evaluation by generation's samples as a markdown table (TEXT tab, `generations`)."""
        if self.writer is None or not samples:
            return

        def cell(text: Any) -> str:
            return str(text).replace("|", "\\|").replace("\n", " ")

        rows = "\n".join(f"| {s['index']} | {cell(s['prompt'])} | {cell(s['reference'])} | {cell(s['prediction'])} "
                         f"| {s['stopped']} |" for s in samples)
        try:
            self.writer.add_text("generations", "| index | prompt | reference | prediction | stopped |\n"
                                 f"|---|---|---|---|---|\n{rows}", global_step=step)
        except Exception as err:
            self._fail(err)

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float], **kwargs: Any) -> None:
        step = epoch_end_step(trainer, self._last_step)
        self._add_scalars(metrics, step, lambda name: f"epoch/{name}")

    def on_train_end(self, trainer: Any, **kwargs: Any) -> None:
        if self.writer is None:
            return
        try:
            self.writer.flush()
            self.writer.close()
        except Exception as err:
            self._fail(err)
        self.writer = None


def _eval_tag(name: str) -> str:
    return f"eval/{name.removeprefix('val_')}"
