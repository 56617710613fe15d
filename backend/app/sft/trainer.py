"""SFTTrainer: supervised fine-tuning of a causal LM, one readable loop that fires the callbacks' events.

    trainer = SFTTrainer(config, callbacks=[...])     # or model=, tokenizer=, train_dataset=, eval_dataset=
    trainer.add_callback(CheckpointCallback(output_dir=...))
    result = trainer.train()                           # or train(resume_from_checkpoint="latest")

Features and the config field that controls each:
- model: a Hub id, a local Hugging Face directory or a `.gguf` file (`base_model`); LoRA (`use_lora`, `lora_*`),
  QLoRA on CUDA (`use_qlora`), gradient checkpointing (`gradient_checkpointing`), full fine-tuning otherwise.
- data: alpaca / chat / completion rows (`dataset_format`), prompt templates (`template_name`), loss on responses
  only (`train_on_inputs` to train on everything), padded or padding-free packed micro-batches (`packing`).
- loop: accelerate for device placement, mixed precision (`mixed_precision`) and DDP/FSDP; AdamW, warmup then
  cosine/linear/constant (`scheduler_type`, `warmup_ratio`), gradient accumulation, clipping (`max_grad_norm`);
  `max_steps` overrides `num_epochs`.
- one step is one optimizer step; its loss is the token-weighted mean over every micro-batch and process.
- events: `on_train_begin`, `on_epoch_begin`, `on_step_end`, `on_evaluate`, `on_epoch_end`, `on_save`,
  `on_train_end` (always, also after a failure), fired through one `CallbackHandler` in callback `order`.
- metrics and the best: the trainer keeps the newest value of every metric (`metrics`) and the one record of
  the best (`state.best_metric`, `best_step`, `best_checkpoint`) for the monitored metric (`best_metric`,
  `best_metric_mode`); CheckpointCallback decides when to save and what to keep, the trainer writes.
- checkpoints hold the full training state (`checkpointing.py`); `train(resume_from_checkpoint=...)` continues
  exactly where a run stopped, also on another number of processes (the sample order is the run's: `layout.py`);
  SIGTERM/SIGINT finish the step, save, and stop (a second signal aborts).
- outputs in `output_dir` (`outputs.py`): the adapter or full model and the tokenizer, `merged/` (`save_merged_model`),
  `metrics.jsonl`, `report.html` + `loss.png`, `training_summary.json`, `config.yaml`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers.integrations.neftune import activate_neftune, deactivate_neftune

from app.sft import checkpointing, optim, resume
from app.sft.attention import register_document_attention
from app.sft.audit import run_audit
from app.sft.callbacks import CheckpointCallback, SFTCallback
from app.sft.callbacks.base import CallbackHandler, Monitor, TrainerAPI
from app.sft.callbacks.defaults import decide_monitor, default_callbacks
from app.sft.config import SFTConfig
from app.sft.data.batching import PackedCollator, PaddedCollator, epoch_batches, make_loader, with_label_positions
from app.sft.data.formatting import resolve_template
from app.sft.data.splitting import build_datasets
from app.sft.data.tokenizing import prepare_dataset
from app.sft.distributed import agree_on_stop, make_accelerator
from app.sft.hardware import resolve_for_hardware, warn_beyond_positions
from app.sft.layout import Layout, deal
from app.sft.loss import causal_lm_loss_sum
from app.sft.metrics_log import MetricsLog
from app.sft.modeling import (
    apply_liger_kernels,
    apply_lora,
    compile_decoder_layers,
    dropout_in,
    load_model,
    load_tokenizer,
)
from app.sft.outputs import SUMMARY_FILE, run_summary, save_outputs, write_summary_and_report
from app.sft.run_dir import run_folder
from app.sft.signals import StopSignals
from app.sft.state import TrainerState
from app.sft.tokenized import TokenizedDataset

logger = logging.getLogger(__name__)


class SFTTrainer(TrainerAPI):
    """Fine-tunes `config.base_model` on `config.dataset_name` (or on the objects passed in) and drives callbacks.

    Args:
        config: the run's `SFTConfig`.
        callbacks: callbacks to add now; more can be added with `add_callback` before `train()`.
        model, tokenizer: already-built objects that replace what the config would load (LoRA is still applied
            to `model` when `config.use_lora` is set and it is not a PEFT model yet).
        train_dataset, eval_dataset: a `datasets.Dataset`, a torch `Dataset` or a list of dicts, raw rows in
            `config.dataset_format` or already tokenized (`input_ids`, optional `labels`); they replace the
            config's dataset. With `train_dataset` given, validation data comes from `eval_dataset` only.

    At `train()`, a `ValidationCallback` (every `eval_steps`) is added when there is validation data and none
    was given, a `CheckpointCallback` (`save_steps`, `save_total_limit`, `checkpoint_dir`, monitoring
    `best_metric`/`best_metric_mode`) unless one was given, an `EarlyStoppingCallback` when
    `early_stopping_patience` is set, a `GenerationEvalCallback` when `generation_eval_metrics` is set, and
    W&B / TensorBoard / MLflow loggers from `wandb_project` / `report_to`.
    """

    managed = True

    def __init__(
        self,
        config: SFTConfig,
        callbacks: Iterable[SFTCallback] | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any | None = None,
        train_dataset: Any | None = None,
        eval_dataset: Any | None = None,
    ) -> None:
        if not isinstance(config, SFTConfig):
            raise TypeError(f"config must be an SFTConfig, got {type(config).__name__}")
        self.config = resolve_for_hardware(config, model_config=getattr(model, "config", None))
        self.accelerator: Accelerator = make_accelerator(self.config)
        set_seed(self.config.seed)
        self.layout = Layout.from_config(self.config, self.num_processes)  # a resume may choose another
        self.output_dir = Path(self.config.output_dir)
        self.checkpoint_dir = Path(self.config.resolved_checkpoint_dir)
        self.callback_handler = CallbackHandler(callbacks or ())
        self.state = TrainerState()
        self.monitor, self.monitor_mode = self.config.best_metric, self.config.best_metric_mode
        self._best = Monitor(self.monitor, self.monitor_mode)
        self._metrics: dict[str, float] = {}  # newest value of every metric seen
        self._metric_steps: dict[str, int] = {}  # the step each of those values is from
        self._step_eval_keys: set[str] = set()  # metrics that evaluations reported during the current step
        self._stop_requested: str | None = None  # why a callback asked to stop, once one did
        self._signals = StopSignals()
        self.metrics_log: MetricsLog | None = None  # written by the main process during train()

        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.config)
        self._setup_data(train_dataset, eval_dataset)
        self._setup_model(model)
        self._setup_optimizer()
        self.train_dataloader: DataLoader | None = None
        self.val_dataloader = self.make_eval_dataloader(self.val_data) if self.val_data is not None else None

    # --- setup ---------------------------------------------------------------------------------------------------

    def _setup_data(self, train_dataset: Any | None, eval_dataset: Any | None) -> None:
        """Tokenize the training and validation data and choose the collation (padded or packed)."""
        cfg = self.config
        if train_dataset is None:
            if eval_dataset is not None:
                raise ValueError("eval_dataset was given without train_dataset; pass both, or neither")
            if cfg.dataset_name is None:
                raise ValueError("no training data: set dataset_name in the config or pass train_dataset=")
            self.train_data, self.val_data = build_datasets(cfg, self.tokenizer)
        else:
            self.train_data = prepare_dataset(train_dataset, cfg, self.tokenizer, source="train_dataset")
            self.val_data = (prepare_dataset(eval_dataset, cfg, self.tokenizer, source="eval_dataset")
                             if eval_dataset is not None else None)
        self._eval_rows = eval_dataset  # raw validation rows for generation_eval_metrics (None: the config's)
        if len(self.train_data) == 0:
            raise ValueError("the training data has no example with a trainable token")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer is not None else 0
        self.collate_fn = PackedCollator() if cfg.packing else PaddedCollator(pad_id)

    def _setup_model(self, model: torch.nn.Module | None) -> None:
        """Load the model (unless given), apply LoRA (or unfreeze it for full fine-tuning) and gradient
        checkpointing, and place it with accelerate."""
        cfg = self.config
        if model is None:
            model = load_model(cfg)
        warn_beyond_positions(cfg, getattr(model, "config", None))
        if cfg.packing and cfg.attn_implementation is None and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(register_document_attention())  # packed rows without a dense mask
        if cfg.use_liger_kernel:
            model = apply_liger_kernels(model)
        model = apply_lora(model, cfg)
        if cfg.torch_compile:
            compile_decoder_layers(model, dynamic=cfg.packing)
        # FSDP2 shards the model together with the optimizer (`_setup_optimizer`); DDP wraps it now.
        self.model = model if self.accelerator.is_fsdp2 else self.accelerator.prepare_model(model)

    def _setup_optimizer(self) -> None:
        """The optimizer (`optim.build_optimizer`) and the warmup + decay schedule over the run's steps."""
        optimizer = optim.build_optimizer(self.model, self.config, self.accelerator.device)
        if self.accelerator.is_fsdp2:  # shards the model and points the optimizer at the shards
            self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        else:
            self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        self.state.max_steps = self._total_steps()
        self.lr_scheduler = optim.build_scheduler(self.optimizer, self.config, self.state.max_steps)

    def _total_steps(self) -> int:
        """Optimizer steps in the run: `max_steps`, or the steps taken plus those the rest of the epochs make."""
        if self.config.max_steps is not None:
            return self.config.max_steps
        state, per_step = self.state, self.layout.units_per_step
        left = [len(self._epoch_units(e)) for e in range(state.epoch, self.config.num_epochs)]
        if left:
            left[0] = max(left[0] - state.batch_in_epoch, 0)
        return state.global_step + sum(math.ceil(units / per_step) for units in left)

    # --- what callbacks see (TrainerAPI) -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def global_step(self) -> int:
        return self.state.global_step

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def metrics(self) -> dict[str, float]:
        """The newest value of every metric seen so far (training and evaluation), read-only by convention."""
        return self._metrics

    def metric_step(self, name: str) -> int | None:
        """The step of the newest value of metric `name`, or None if it was never reported."""
        return self._metric_steps.get(name)

    def history(self, name: str) -> list[tuple[int, float]]:
        """Every recorded `(step, value)` of metric `name`, oldest first (logged steps and evaluations)."""
        return [(record["step"], record[name]) for record in self.state.log_history if name in record]

    def best_of(self, name: str, mode: str = "min", *, before: int | None = None) -> tuple[float, int] | None:
        """The best `(value, step)` of metric `name` by `mode` over the recorded evaluations (those before step
        `before`, when given): the record of the best for the monitored metric, else the best in the history."""
        if (name, mode, before) == (self.monitor, self.monitor_mode, None):
            return None if self.state.best_step is None else (self.state.best_metric, self.state.best_step)
        judge, best = Monitor(name, mode), None
        for record in self.state.log_history:
            value, step = record.get(name), record["step"]
            if (record.get("type") == "eval" and value is not None and (before is None or step < before)
                    and judge.improves(float(value), None if best is None else best[0])):
                best = (float(value), step)
        return best

    @property
    def best_metric(self) -> float | None:
        return self.state.best_metric

    @property
    def best_step(self) -> int | None:
        return self.state.best_step

    @property
    def best_checkpoint(self) -> str | None:
        """The path of the best checkpoint (inside `checkpoint_dir`), or None while no checkpoint holds the best."""
        return self.state.best_checkpoint

    @property
    def should_stop(self) -> bool:
        return self._stop_requested is not None

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        """`trainer.should_stop = True` from a callback is recorded as a stop by that callback."""
        if not value:
            self._stop_requested = None
        elif self._stop_requested is None:
            current = self.callback_handler.current
            self._stop_requested = f"callback:{type(current).__name__}" if current is not None else "callback"

    def request_stop(self, reason: str) -> None:
        """Stop after the current step; `reason` ends up in the summary and `trainer_state.json`."""
        if self._stop_requested is None:
            self._stop_requested = reason

    @property
    def callbacks(self) -> list[SFTCallback]:
        return self.callback_handler.callbacks

    @property
    def eval_batch_size(self) -> int:
        return self.config.eval_batch_size or self.config.batch_size

    def add_callback(self, callback: SFTCallback) -> None:
        """Add a callback; it runs at the place its `order` gives it."""
        self.callback_handler.add(callback)

    def remove_callback(self, callback: SFTCallback | type[SFTCallback]) -> None:
        """Remove a callback instance, or every callback of a class."""
        self.callback_handler.remove(callback)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The configured mixed-precision context (a no-op in fp32)."""
        return self.accelerator.autocast()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes (returned unchanged on one process)."""
        if self.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor, reduction="sum")

    def make_eval_dataloader(self, dataset: Any) -> DataLoader:
        """Batches of `dataset` (raw rows or tokenized) with the trainer's collation, this process's share only.

        Every process gets the same number of batches (a short share is topped up with fully masked copies that
        add no tokens), so distributed forwards stay in step and the summed loss is exact. The loader has its
        own random generator, so evaluating never moves the training's random streams.
        """
        data = (dataset if isinstance(dataset, TokenizedDataset)
                else prepare_dataset(dataset, self.config, self.tokenizer, source="validation data"))
        budget = self.eval_batch_size * self.config.max_seq_length if self.config.packing else None
        plan = epoch_batches(data.lengths, batch_size=self.eval_batch_size, epoch=0, seed=self.config.seed,
                             shuffle=False, token_budget=budget)
        shard = deal(plan, self.process_index, self.num_processes)  # topped up with masked copies
        return make_loader(data, shard, self.collate_fn, seed=self.config.seed,
                           num_workers=self.config.dataloader_num_workers)

    def train_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """A step's metrics without the ones this step's evaluations reported."""
        return {key: value for key, value in metrics.items() if key not in self._step_eval_keys}

    def record_evaluation(self, step: int, metrics: Mapping[str, float]) -> None:
        """Take in one evaluation's results: keep them, update the best record, log them, fire `on_evaluate`."""
        values = {name: float(value) for name, value in metrics.items()}
        self._metrics.update(values)
        self._metric_steps.update(dict.fromkeys(values, step))
        self._step_eval_keys.update(values)
        value = values.get(self.monitor)
        if value is not None and self._best.improves(value, self.state.best_metric):
            self.state.best_metric, self.state.best_step, self.state.best_checkpoint = value, step, None
            if self.is_main_process:  # until a checkpoint holds this evaluation's model, none is the best
                checkpointing.remove_pointer(self.checkpoint_dir, checkpointing.BEST_POINTER)
        self.state.log_history.append({"type": "eval", "step": step, **values})
        if self.metrics_log is not None:
            self.metrics_log.write("eval", step, values, epoch=self._metrics.get("epoch"))
        self.callback_handler.fire("on_evaluate", self, step=step, metrics=dict(values))

    # --- the loop ------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *,
              continue_after_stop: bool = False, overwrite: bool | None = None) -> dict[str, Any]:
        """Run training (from a checkpoint if asked) and return a summary of the run.

        A resumed run that a callback or early stopping ended stays ended unless `continue_after_stop` is set;
        one that reached its last step only completes what it had not written yet (final weights, summary,
        report). The data audit runs first (a failed check stops before any file is touched); the run holds
        `output_dir`'s lock throughout, and a new run refuses a folder that already holds
        one unless `overwrite` (default: `config.overwrite_output_dir`) deletes that run's files (see `run_dir`).
        """
        audit = run_audit(self.train_data, self.val_data, self.config, self.tokenizer, warn=self.is_main_process)
        overwrite = self.config.overwrite_output_dir if overwrite is None else overwrite
        with run_folder(self.config, resuming=bool(resume_from_checkpoint), overwrite=overwrite,
                        accelerator=self.accelerator, checkpoint_dirs=[saver.output_dir for saver in self._savers()]):
            return self._train(resume_from_checkpoint, continue_after_stop, audit)

    def _train(self, resume_from_checkpoint: str | bool | None, continue_after_stop: bool,
               audit: Any) -> dict[str, Any]:
        self._decide_monitor()
        for callback in default_callbacks(self.config, self.callbacks, validation=self.val_dataloader is not None,
                                          checkpoint_dir=self.checkpoint_dir, monitor=self.monitor,
                                          mode=self.monitor_mode, eval_rows=self._eval_rows):
            self.add_callback(callback)
        if resume_from_checkpoint:
            self._resume(resume_from_checkpoint)
            if resume.nothing_left_to_train(self.state, self.config, continue_after_stop):
                return self._finish_ended_run()
        started = time.perf_counter()
        if self.is_main_process:
            logger.info("%s", self.config.precision_choice.describe())
            resume_step = self.state.global_step if resume_from_checkpoint else None
            self.metrics_log = MetricsLog(self.output_dir / "metrics.jsonl", resume_from_step=resume_step)
        error: BaseException | None = None
        alpha = self.config.neftune_noise_alpha  # noise on the input embeddings in train mode only (transformers')
        neftune = activate_neftune(self.model, alpha, self.accelerator) if alpha is not None else None
        try:
            with self._signals, logging_redirect_tqdm():
                self.callback_handler.fire("on_train_begin", self)
                self._run_epochs()
                finished = self.state.stop_reason != "signal"
                if finished:
                    self._save_outputs()
                summary = self._summary(time.perf_counter() - started)
                summary["audit"] = audit.to_dict() if audit is not None else None
                if finished and self.is_main_process:  # before on_train_end: trackers log the summary, report
                    write_summary_and_report(self.output_dir, summary)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if neftune is not None:
                deactivate_neftune(self.model, neftune, self.accelerator)
            self.callback_handler.fire("on_train_end", self, error=error)
            if self.metrics_log is not None:
                self.metrics_log.close()
        if self.state.stop_reason == "signal":
            logger.warning("Training stopped by %s at step %d; checkpoint saved. Resume with "
                           "train(resume_from_checkpoint='latest') or `sft train CONFIG --resume`.",
                           self._signals.name, self.state.global_step)
        return summary

    def _run_epochs(self) -> None:
        """Optimizer steps, epoch after epoch, until the last step or a stop; each step in this order:

        train → `on_step_end` (evaluations due fire `on_evaluate`) → log → agree on a stop → at an epoch's
        end (or the run's) `on_epoch_end` → the checkpoints due (`on_save`, rotation).
        """
        state = self.state
        with self._progress_bar() as progress:
            while state.stop_reason is None:
                units = self._epoch_units(state.epoch)
                if state.batch_in_epoch >= len(units):  # a checkpoint of an earlier version, saved before epoch end
                    self._end_epoch(advance=True)
                    continue
                if state.batch_in_epoch == 0:
                    self.callback_handler.fire("on_epoch_begin", self, epoch=state.epoch)
                steps = self._shares(units, start=state.batch_in_epoch)
                batches = iter(self._train_loader([batch for share in steps for batch in share]))
                for share in steps:
                    window = list(islice(batches, len(share)))
                    metrics = self._training_step(window, epoch_length=len(units))
                    self._step_eval_keys = set()
                    self.callback_handler.fire("on_step_end", self, step=state.global_step, metrics=metrics)
                    self._log_step(metrics, progress)
                    state.stop_reason = self._stop_reason()
                    epoch_done = state.batch_in_epoch >= len(units)
                    if epoch_done or state.stop_reason not in (None, "signal"):
                        self._end_epoch(advance=epoch_done)
                        state.stop_reason = state.stop_reason or self._stop_reason()
                    self._save_due_checkpoints()
                    if state.stop_reason is not None:
                        break

    def _train_loader(self, batch_plan: list[list[int]]) -> DataLoader:
        collate = functools.partial(with_label_positions, collate=self.collate_fn)
        return make_loader(self.train_data, batch_plan, collate, seed=self.config.seed,
                           num_workers=self.config.dataloader_num_workers, pin_memory=self.device.type == "cuda")

    def _training_step(self, window: list[dict[str, torch.Tensor]], epoch_length: int) -> dict[str, float]:
        """One optimizer step over the micro-batches in `window` (this process's share of the step's units, of
        `epoch_length` in the epoch); returns the step's metrics."""
        state = self.state
        started = time.perf_counter()
        # The step's loss is a mean over every labelled token of every micro-batch on every process, so each
        # micro-batch's summed loss is divided by the step's total token count (DDP then averages the gradients
        # over processes, which the factor num_processes undoes).
        local_tokens = sum(len(batch["label_positions"]) for batch in window)  # counted on the host
        tokens = (local_tokens if self.num_processes == 1
                  else int(self.all_reduce_sum(torch.tensor(local_tokens, device=self.device))))
        scale = self.num_processes / max(tokens, 1)
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(window):
            batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            last = i == len(window) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                micro_loss, _ = causal_lm_loss_sum(self.model, batch)
                self.accelerator.backward(micro_loss * scale)
            loss_sum += micro_loss.detach()
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        loss = float(self.all_reduce_sum(loss_sum)) / max(tokens, 1)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the training loss is {loss} at step {state.global_step + 1}; stopping before the optimizer "
                "step (checkpoints already saved are intact). Try a lower learning_rate or fp32."
            )
        learning_rate = self.lr_scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        state.global_step += 1
        state.batch_in_epoch = min(state.batch_in_epoch + self.layout.units_per_step, epoch_length)
        state.train_tokens += tokens
        state.train_loss_sum += loss * tokens
        state.epoch_loss_sum += loss * tokens
        state.epoch_tokens += tokens
        elapsed = time.perf_counter() - started
        metrics = {
            "loss": loss,
            "learning_rate": learning_rate,
            "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "tokens": tokens,
            "tokens_per_second": tokens / elapsed if elapsed > 0 else 0.0,
            "step_time_s": elapsed,
            "epoch": state.epoch + state.batch_in_epoch / max(epoch_length, 1),
        }
        self._metrics.update(metrics)
        self._metric_steps.update(dict.fromkeys(metrics, state.global_step))
        return metrics

    def _stop_reason(self) -> str | None:
        """Why the run ends after this step (the same on every process), or None to go on."""
        self._stop_requested, signalled = agree_on_stop(self.accelerator, self._stop_requested,
                                                        self._signals.received is not None)
        if signalled:
            self._signals.received = self._signals.received or signal.SIGTERM
            return "signal"
        if self._stop_requested is not None:
            return self._stop_requested
        if self.state.global_step >= self.state.max_steps:
            return "max_steps" if self.config.max_steps is not None else "completed"
        return None

    def _end_epoch(self, advance: bool) -> None:
        """Fire `on_epoch_end` with the epoch's token-weighted mean loss (also for a partial last epoch);
        with `advance`, move the data position to the start of the next epoch."""
        state = self.state
        if state.epoch_tokens > 0:
            metrics = {"loss": state.epoch_loss_sum / state.epoch_tokens, "tokens": state.epoch_tokens,
                       "epoch": state.epoch}
            self.callback_handler.fire("on_epoch_end", self, epoch=state.epoch, metrics=metrics)
            if self.metrics_log is not None:
                self.metrics_log.write("epoch", state.global_step, metrics, epoch=state.epoch + 1)
        state.epoch_loss_sum = 0.0
        state.epoch_tokens = 0
        if advance:
            state.epoch += 1
            state.batch_in_epoch = 0

    def _log_step(self, metrics: Mapping[str, float], progress: tqdm) -> None:
        """Record the step's training metrics in the log history and `metrics.jsonl`; update the progress bar."""
        state = self.state
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}",
                             tok_s=f"{metrics['tokens_per_second']:.0f}", refresh=False)
        progress.update(1)  # after the postfix, so the bar shows the step that just finished
        evaluated = bool(self._step_eval_keys)
        if state.global_step % self.config.logging_steps == 0 or state.global_step == 1 or evaluated:
            train_metrics = self.train_metrics(metrics)
            state.log_history.append({"type": "train", "step": state.global_step, **train_metrics})
            if self.metrics_log is not None:
                self.metrics_log.write("train", state.global_step, train_metrics, epoch=metrics["epoch"])
            if progress.disable and self.is_main_process:
                extra = "".join(f" {k} {metrics[k]:.4f}" for k in sorted(self._step_eval_keys) if k in metrics)
                logger.info("step %d/%d loss %.4f lr %.2e %.0f tok/s%s", state.global_step, state.max_steps,
                            metrics["loss"], metrics["learning_rate"], metrics["tokens_per_second"], extra)

    def _progress_bar(self) -> tqdm:
        return tqdm(total=self.state.max_steps, initial=self.state.global_step, desc="training", unit="step",
                    disable=not self.is_main_process or self.config.disable_progress_bar
                    or not sys.stderr.isatty())

    def _epoch_units(self, epoch: int, unit_size: int | None = None) -> list[list[int]]:
        """The run's sample order for `epoch`: its units (lists of example indices, `unit_size` those of the
        run's layout unless given), the same on every layout."""
        cfg, size = self.config, unit_size or self.layout.unit_size
        return epoch_batches(self.train_data.lengths, batch_size=size, epoch=epoch, seed=cfg.seed, shuffle=True,
                             token_budget=size * cfg.max_seq_length if cfg.packing else None)

    def _shares(self, units: list[list[int]], start: int = 0) -> list[list[list[int]]]:
        """This process's micro-batches of each step that trains on `units[start:]` (-1-i: a masked copy of
        example i)."""
        return [self.layout.share(units[first:end], self.process_index)
                for first, end in self.layout.steps(units, start=start)]

    def _epoch_plan(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches of `epoch`, step after step (what a callback can inspect)."""
        return [batch for share in self._shares(self._epoch_units(epoch)) for batch in share]

    # --- callbacks and checkpoints -------------------------------------------------------------------------------

    def _savers(self) -> list[CheckpointCallback]:
        """The attached CheckpointCallbacks; the first one's folder is the run's checkpoint folder."""
        return [cb for cb in self.callbacks if isinstance(cb, CheckpointCallback)]

    def _decide_monitor(self) -> None:
        """Decide once, before the default callbacks are built from it, the metric the run's one record of the
        best follows, and the run's checkpoint folder (`callbacks.defaults.decide_monitor`)."""
        self.monitor, self.monitor_mode, self.checkpoint_dir = decide_monitor(self.config, self._savers(),
                                                                              log=self.is_main_process)
        self._best = Monitor(self.monitor, self.monitor_mode)

    def _save_due_checkpoints(self) -> None:
        """Write the checkpoints the CheckpointCallbacks ask for at this step (a signal always gets one)."""
        step, final = self.state.global_step, self.state.stop_reason is not None
        for index, saver in enumerate(self._savers()):
            due = saver.should_save(self, step, final=final)
            if due or (index == 0 and self.state.stop_reason == "signal"):
                path = saver.checkpoint_path(step)
                if index == 0 and self._holds_best():
                    self.state.best_checkpoint = str(path)
                self.save_checkpoint(path)
                self.callback_handler.fire("on_save", self, step=step, checkpoint_path=str(path))
                saver.rotate(self)

    def _holds_best(self) -> bool:
        """Whether a checkpoint written now holds the best evaluation: it is the newest and no checkpoint has it."""
        state = self.state
        return (state.best_step is not None and state.best_checkpoint is None
                and self.metric_step(self.monitor) == state.best_step)

    def save_checkpoint(self, path: str | Path) -> str:
        """Write the full training state into the checkpoint directory `path`, atomically; returns the path.

        Every process must call it (random states and sharded weights are gathered); the main process writes,
        and points `latest` (and `best`, when it is the run's best checkpoint) at it.
        """
        path = Path(path)
        rng_states = gather_object([checkpointing.capture_rng_state()])
        full_state = self.accelerator.get_state_dict(self.model) if self._is_sharded() else None
        optimizer_state = checkpointing.full_optimizer_state(self.model, self.optimizer.optimizer)
        if self.is_main_process:
            checkpointing.write_checkpoint(
                path, model=self._unwrapped_model(), state_dict=full_state, rng_states=rng_states,
                optimizer_state=optimizer_state, lr_scheduler=self.lr_scheduler,
                trainer_state={**self.state.to_dict(), "best_checkpoint": self._best_name(),
                               "num_processes": self.num_processes, "layout": self.layout.to_dict(),
                               "data": {**self._data_record, "epoch_units": len(self._epoch_units(self.state.epoch))}},
                callback_states=self.callback_handler.state_dict(), config=self.config.to_dict(),
                best=self._best_name() == path.name)
        self.accelerator.wait_for_everyone()
        return str(path)

    # --- resume --------------------------------------------------------------------------------------------------

    def _resume(self, spec: str | bool) -> None:
        """Apply the `resume.plan` for checkpoint `spec`: weights, optimizer, schedule, random states, loop state,
        metrics and callback states, on this launch's processes and layout."""
        path, checksummed = resume.find(self.checkpoint_dir, spec)
        plan = resume.plan(path, self.config, self.num_processes, self.process_index, self._data_record,
                           lambda epoch, size: len(self._epoch_units(epoch, size)),
                           checkpoint_dir=self.checkpoint_dir, checksummed=checksummed)
        checkpointing.load_weights(self._unwrapped_model(), path)
        checkpointing.load_optimizer_and_scheduler(path, self.model, self.optimizer.optimizer, None)
        self.layout, self.state = plan.layout, plan.state
        self.state.max_steps = self._total_steps()
        old_rate = self.optimizer.param_groups[0]["lr"]
        optim.apply_weight_decay(self.optimizer, self.model, self.config.weight_decay)  # not the interrupted run's
        self.lr_scheduler = optim.build_scheduler(self.optimizer, self.config, self.state.max_steps,
                                                  current_step=self.state.global_step)
        if plan.schedule_changed:
            logger.warning("Learning rate at step %d: %.3g before, %.3g with the new schedule (%d steps in all)",
                           self.state.global_step, old_rate, self.lr_scheduler.get_last_lr()[0], self.state.max_steps)
        self._metrics.update(plan.metrics)
        self._metric_steps.update(plan.metric_steps)
        self.callback_handler.load_state_dict(plan.callback_states)
        if plan.derived_seed is None:
            checkpointing.load_rng_state(path, self.process_index)
        else:  # a process the checkpoint's run did not have
            set_seed(plan.derived_seed)
        if not plan.checksummed:  # after the loaders, whose messages say more about what they refuse
            checkpointing.check_manifest(path)
        self._stop_requested = None
        if self.is_main_process:
            logger.info("%s", plan.summary(dropout_in(self._unwrapped_model())))

    @functools.cached_property
    def _data_record(self) -> dict[str, Any]:
        """What a checkpoint records of the training and validation data (`resume.data_record`)."""
        return resume.data_record(self.train_data, self.val_data)

    def _finish_ended_run(self) -> dict[str, Any]:
        """The summary of a resumed run that trains no further, writing the outputs it never wrote (a run killed
        after its last checkpoint) from the checkpoint."""
        summary = self._summary(0.0)
        if not (self.output_dir / SUMMARY_FILE).is_file():
            logger.warning("The run's outputs were never written; writing them from the last checkpoint.")
            self._save_outputs()
            if self.is_main_process:
                write_summary_and_report(self.output_dir, summary)
        return summary

    # --- outputs ---------------------------------------------------------------------------------------------

    def _save_outputs(self) -> None:
        """Write the trained adapter or model, the tokenizer, the config and (if asked) the merged model."""
        full_state = self.accelerator.get_state_dict(self.model) if self._is_sharded() else None
        if self.is_main_process:
            template = resolve_template(self.config, self.tokenizer) if self.train_data.facts.templated else None
            save_outputs(self._unwrapped_model(), self.tokenizer, self.config, state_dict=full_state,
                         template=template)
        self.accelerator.wait_for_everyone()

    def _summary(self, runtime_s: float) -> dict[str, Any]:
        state = self.state
        epochs = state.epoch + state.batch_in_epoch / max(len(self._epoch_units(state.epoch)), 1)
        return run_summary(state, self.config, monitor=self.monitor, mode=self.monitor_mode,
                           final_train_loss=self._metrics.get("loss"), best_val_loss=self.best_of("val_loss"),
                           epochs=epochs, runtime_s=runtime_s)

    def _best_name(self) -> str | None:
        """The best checkpoint's folder name (what `trainer_state.json` keeps), or None."""
        return Path(self.state.best_checkpoint).name if self.state.best_checkpoint else None

    def _unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _is_sharded(self) -> bool:
        return self.accelerator.distributed_type.name == "FSDP"
