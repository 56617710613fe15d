"""Validation during training: the token-weighted validation loss, its perplexity and the best so far."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from app.sft.callbacks.base import BestRecord, Monitor, SFTCallback, epoch_end_step, publish_evaluation, trainer_api
from app.sft.data.batching import PaddedCollator
from app.sft.loss import IGNORE_INDEX, evaluation_totals

logger = logging.getLogger(__name__)

MAX_LOG_PERPLEXITY = 100.0
"""`val_perplexity` is exp(min(val_loss, this)), so a diverged model reports a large finite number."""


class ValidationCallback(SFTCallback):
    """Computes the validation loss every `eval_steps` steps and at each epoch end, and tracks the best one.

    The loss is the mean cross-entropy per labelled (non-masked) token over the whole validation set, summed
    over all processes. Each validation is handed to the trainer (`publish_evaluation`: the trainer keeps it
    in `trainer.metrics`, updates its best record and fires `on_evaluate`) and written into the step's (or
    epoch's) `metrics` dict as `val_loss`, `val_perplexity` and `best_val_loss`, the lowest validation loss so
    far (also the attribute `best_val_loss`, with its step in `best_step`: with SFTTrainer they read the
    trainer's record, in a hand-written loop the callback keeps them itself). An epoch end that falls on a
    step that was just validated reuses that result: one evaluation, one `on_evaluate`.

    Data: `val_dataset` (a `datasets.Dataset` or torch `Dataset`) is batched by the trainer's
    `make_eval_dataloader` when it has one (raw text/alpaca/chat rows or tokenized rows), otherwise by a
    padding collate that needs tokenized rows (`input_ids`, optional `labels` and `attention_mask`). Either is
    built at `on_train_begin` (the padding collate also collates the first batch), so unusable rows fail before
    training, not at the first evaluation.
    Without `val_dataset`, `trainer.val_dataloader` is used; with neither, the callback does nothing.

    The model's train/eval mode is restored after validation, also when it raises. Evaluation draws nothing
    from the global random generators, so it never changes what training does next.
    """

    order = 0

    def __init__(
        self, val_dataset: Any = None, eval_steps: int = 500, eval_on_epoch_end: bool = True
    ) -> None:
        if not isinstance(eval_steps, int) or eval_steps < 1:
            raise ValueError(f"eval_steps must be an integer >= 1, got {eval_steps!r}")
        if isinstance(val_dataset, Iterator):  # a generator, map(...), iter(list): empty after one validation
            raise ValueError(f"val_dataset is a one-shot iterator ({type(val_dataset).__name__}), but validation "
                             "reads it every time: pass a list, a datasets.Dataset or a torch Dataset")
        self.val_dataset = val_dataset
        self.eval_steps = eval_steps
        self.eval_on_epoch_end = eval_on_epoch_end
        self._best = BestRecord(Monitor("val_loss", "min"))
        self._loader: Iterable[Mapping[str, Any]] | None = None  # built once from val_dataset
        self._last_result: tuple[int, dict[str, float]] | None = None  # a step end's result, for its epoch end
        self._last_step = 0  # the newest step seen: a hand-written loop's trainer may have no global_step

    @property
    def best_val_loss(self) -> float:
        """The lowest validation loss so far; +inf before one."""
        best = self._best.best()[0]
        return math.inf if best is None else best

    @property
    def best_step(self) -> int | None:
        """The step of `best_val_loss`, or None."""
        return self._best.best()[1]

    def on_train_begin(self, trainer: Any, **kwargs: Any) -> None:
        self._loader = None  # a new run may come with a different trainer: rebuild the loader lazily
        self._last_result, self._last_step = None, 0
        self._best.attach(trainer)
        self._dataloader(trainer)  # unusable validation data fails now, not after `eval_steps` steps of training

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float], **kwargs: Any) -> None:
        self._last_step = step
        if step % self.eval_steps == 0:
            self._validate(trainer, step, metrics)

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float], **kwargs: Any) -> None:
        if self.eval_on_epoch_end:
            self._validate(trainer, epoch_end_step(trainer, self._last_step), metrics)
            self._last_result = None  # only a step end's result is reused, by the epoch end at that step

    def _validate(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        """Validate (or reuse this step's result), publish a new result, and write it into `metrics`."""
        if self._dataloader(trainer) is None:
            return
        if self._last_result is not None and self._last_result[0] == step:
            metrics.update(self._last_result[1])
            return
        val_loss = self._run_validation(trainer)
        previous = self.best_val_loss
        if self._best.offer(val_loss, step):
            logger.info("Validation loss improved to %.4f at step %s (previous best %.4f)", val_loss, step,
                        previous)
            best = val_loss
        else:
            logger.info("Validation loss %.4f at step %s (best %.4f)", val_loss, step, previous)
            best = previous
        result = {
            "val_loss": val_loss,
            "val_perplexity": math.exp(min(val_loss, MAX_LOG_PERPLEXITY)),
            "best_val_loss": best,
        }
        self._last_result = (step, result)
        metrics.update(result)
        publish_evaluation(trainer, step, result)

    def _dataloader(self, trainer: Any) -> Iterable[Mapping[str, Any]] | None:
        """The batches to validate on: built once from `val_dataset`, else the trainer's `val_dataloader`."""
        api = trainer_api(trainer)
        if self.val_dataset is None:
            return api.val_dataloader
        if self._loader is None:
            self._loader = api.make_eval_dataloader(self.val_dataset)
        if self._loader is None:
            pad_id = getattr(api.tokenizer, "pad_token_id", None)
            collate = functools.partial(_pad_collate, collate=PaddedCollator(pad_id if pad_id is not None else 0))
            loader = DataLoader(self.val_dataset, batch_size=api.eval_batch_size, collate_fn=collate,
                                generator=torch.Generator())
            if next(iter(loader), None) is None:  # collating the first batch checks its rows
                raise ValueError("ValidationCallback's val_dataset is empty: give it at least one tokenized example")
            self._loader = loader
        return self._loader

    def _run_validation(self, trainer: Any) -> float:
        """The validation loss: summed token cross-entropy / number of labelled tokens, over all processes."""
        loader = self._dataloader(trainer)
        if loader is None:
            raise ValueError(
                "ValidationCallback has no validation data: pass val_dataset or give the trainer a "
                "val_dataloader"
            )
        api = trainer_api(trainer)
        totals = evaluation_totals(api.model, (_on_device(batch, api.device) for batch in loader), api.autocast)
        loss_sum, n_tokens = api.all_reduce_sum(totals.to(api.device)).tolist()
        if n_tokens == 0:
            raise ValueError("the validation data has no labelled tokens (every label is -100 or padding)")
        return loss_sum / n_tokens


def _on_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move a batch's tensors to `device`; without `labels`, every attended token is a label."""
    moved = {key: val.to(device) if isinstance(val, torch.Tensor) else val for key, val in batch.items()}
    if "labels" not in moved:
        labels = moved["input_ids"]
        if moved.get("attention_mask") is not None:
            labels = labels.masked_fill(moved["attention_mask"] == 0, IGNORE_INDEX)
        moved["labels"] = labels
    return moved


def _pad_collate(examples: Sequence[Mapping[str, Any]], collate: PaddedCollator) -> dict[str, torch.Tensor]:
    """Right-pad tokenized examples (labels default to `input_ids`); other rows get a message saying what to do."""
    wanted = ("pass tokenized examples: dicts with 'input_ids' (optionally 'labels' and 'attention_mask'), or use "
              "SFTTrainer (or a trainer with make_eval_dataloader), which tokenizes raw text, alpaca and chat rows")
    rows = []
    for example in examples:
        if not isinstance(example, Mapping):
            raise ValueError(f"validation example is a {type(example).__name__}, not a dict; {wanted}")
        row = {key: value for key, value in example.items() if value is not None}  # a column this row lacks
        if "input_ids" not in row:
            raise ValueError(f"validation example has no 'input_ids' (its keys: {sorted(example)}); {wanted}")
        length = len(row["input_ids"])
        if length == 0:
            raise ValueError(f"validation example has an empty 'input_ids'; {wanted}")
        for key in ("labels", "attention_mask"):
            if key in row and len(row[key]) != length:
                raise ValueError(f"validation example has {len(row[key])} '{key}' for its {length} 'input_ids'; "
                                 "they must be equally long")
        rows.append(row)
    return collate(rows)
