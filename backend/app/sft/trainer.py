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
- events: `on_train_begin`, `on_epoch_begin`, `on_step_end`, `on_save`, `on_epoch_end`, `on_train_end`
  (always, also after a failure), fired through one `CallbackHandler` in callback `order`.
- checkpoints hold the full training state (`checkpointing.py`); `train(resume_from_checkpoint=...)` continues
  exactly where a run stopped; SIGTERM/SIGINT finish the step, save, and stop (a second signal aborts).
- outputs in `output_dir`: the adapter or full model and the tokenizer, `merged/` (`save_merged_model`),
  `metrics.jsonl`, `report.html` + `loss.png`, `training_summary.json`, `config.yaml`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import get_scheduler

from app.sft import checkpointing
from app.sft.attention import register_document_attention
from app.sft.callbacks import (
    CheckpointCallback,
    EarlyStoppingCallback,
    SFTCallback,
    TensorBoardCallback,
    ValidationCallback,
    WandBCallback,
)
from app.sft.callbacks.base import CallbackHandler
from app.sft.config import SFTConfig
from app.sft.data import (
    PackedCollator,
    PaddedCollator,
    TokenizedDataset,
    build_datasets,
    epoch_batches,
    resolve_template,
    tokenize_dataset,
)
from app.sft.distributed import make_accelerator
from app.sft.loss import IGNORE_INDEX, causal_lm_loss_sum, count_label_tokens
from app.sft.metrics_log import MetricsLog
from app.sft.modeling import apply_lora, load_model, load_tokenizer, merge_lora, save_final_model
from app.sft.report import render_report
from app.sft.state import TrainerState

logger = logging.getLogger(__name__)

# Config fields a resumed run may not change: they change the model, its trainable shape or what a step means.
RESUME_LOCKED_FIELDS = (
    "base_model", "use_lora", "use_qlora", "lora_r", "lora_alpha", "lora_target_modules", "max_seq_length",
    "dataset_format", "template_name", "train_on_inputs", "packing", "seed",
)
# Fields whose change on resume is expected and only noted at info level.
RESUME_SAFE_FIELDS = (
    "logging_steps", "eval_steps", "save_steps", "save_total_limit", "output_dir", "checkpoint_dir",
    "wandb_project", "wandb_entity", "wandb_run_name", "run_name", "report_to", "disable_progress_bar",
    "eval_batch_size", "dataloader_num_workers", "save_merged_model",
)


class SFTTrainer:
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
    was given, a `CheckpointCallback` (`save_steps`, `save_total_limit`, `checkpoint_dir`) unless one was given,
    an `EarlyStoppingCallback` when `early_stopping_patience` is set, and W&B / TensorBoard loggers from
    `wandb_project` / `report_to`.
    """

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
        self.config = config.resolve_for_hardware(model_config=getattr(model, "config", None))
        self.accelerator: Accelerator = make_accelerator(self.config)
        set_seed(self.config.seed)
        self.output_dir = Path(self.config.output_dir)
        self.checkpoint_dir = Path(self.config.resolved_checkpoint_dir)
        self.callback_handler = CallbackHandler(callbacks or ())
        self.state = TrainerState()
        self.should_stop = False
        self._stop_signal: int | None = None
        self._last_metrics: dict[str, float] = {}
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
            self.train_data = self._tokenize(train_dataset, "train_dataset")
            self.val_data = self._tokenize(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        if len(self.train_data) == 0:
            raise ValueError("the training data has no example with a trainable token")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer is not None else 0
        self.collate_fn = PackedCollator() if cfg.packing else PaddedCollator(pad_id)

    def _tokenize(self, dataset: Any, source: str) -> TokenizedDataset:
        cfg = self.config
        return tokenize_dataset(
            dataset,
            self.tokenizer,
            dataset_format=cfg.dataset_format,
            template=resolve_template(cfg, self.tokenizer),
            max_seq_length=cfg.max_seq_length,
            train_on_inputs=cfg.train_on_inputs,
            text_field=cfg.dataset_text_field,
            source=source,
        )

    def _setup_model(self, model: torch.nn.Module | None) -> None:
        """Load the model (unless given), apply LoRA (or unfreeze it for full fine-tuning) and gradient
        checkpointing, and place it with accelerate."""
        cfg = self.config
        if model is None:
            model = load_model(cfg)
        if cfg.packing and cfg.attn_implementation is None and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(register_document_attention())  # packed rows without a dense mask
        model = apply_lora(model, cfg)
        if cfg.torch_compile:
            _compile_decoder_layers(model)
        # FSDP2 shards the model together with the optimizer (`_setup_optimizer`); DDP wraps it now.
        self.model = model if self.accelerator.is_fsdp2 else self.accelerator.prepare_model(model)

    def _setup_optimizer(self) -> None:
        """AdamW (fused on CUDA) or SGD over trainable parameters, and warmup followed by the chosen schedule."""
        cfg = self.config
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        if not decay and not no_decay:
            raise ValueError("the model has no trainable parameters")
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if cfg.optimizer_type == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=0.9)
        elif cfg.optimizer_type in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
            import bitsandbytes as bnb  # resolve_for_hardware guarantees it is importable

            optimizer_class = {
                "adamw_8bit": bnb.optim.AdamW8bit,
                "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
            }[cfg.optimizer_type]
            optimizer = optimizer_class(groups, lr=cfg.learning_rate)
        else:
            fused = self.accelerator.device.type == "cuda"
            optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=fused or None)
        if self.accelerator.is_fsdp2:  # shards the model and points the optimizer at the shards
            self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        else:
            self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        self.state.max_steps = self._total_steps()
        schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.scheduler_type]
        self.lr_scheduler = get_scheduler(
            schedule,
            self.optimizer,
            num_warmup_steps=math.ceil(cfg.warmup_ratio * self.state.max_steps),
            num_training_steps=self.state.max_steps,
        )

    def _total_steps(self) -> int:
        """Optimizer steps in the run: `max_steps`, or every epoch's micro-batches over the accumulation."""
        if self.config.max_steps is not None:
            return self.config.max_steps
        accumulation = self.config.gradient_accumulation_steps
        return sum(math.ceil(len(self._epoch_plan(e)) / accumulation) for e in range(self.config.num_epochs))

    # --- what callbacks see --------------------------------------------------------------------------------------

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
        add no tokens), so distributed forwards stay in step and the summed loss is exact.
        """
        data = dataset if isinstance(dataset, TokenizedDataset) else self._tokenize(dataset, "validation data")
        budget = self.eval_batch_size * self.config.max_seq_length if self.config.packing else None
        plan = epoch_batches(data.lengths, batch_size=self.eval_batch_size, epoch=0, seed=self.config.seed,
                             shuffle=False, token_budget=budget)
        world, rank = self.num_processes, self.process_index
        per_process = math.ceil(len(plan) / world)
        shard = plan[rank::world]
        shard += [[-1 - i for i in plan[0]]] * (per_process - len(shard))  # negative index: masked copy
        return DataLoader(_MaskedPadding(data), batch_sampler=shard, collate_fn=self.collate_fn,
                          num_workers=self.config.dataloader_num_workers)

    # --- the loop ------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None) -> dict[str, Any]:
        """Run training (from a checkpoint if asked) and return a summary of the run."""
        self._add_default_callbacks()
        if resume_from_checkpoint:
            self._resume(resume_from_checkpoint)
            if self._already_finished():
                return self._summary(0.0)
        started = time.perf_counter()
        if self.is_main_process:
            logger.info("%s", self.config.precision_choice.describe())
            resume_step = self.state.global_step if resume_from_checkpoint else None
            self.metrics_log = MetricsLog(self.output_dir / "metrics.jsonl", resume_from_step=resume_step)
        error: BaseException | None = None
        previous_handlers = self._install_signal_handlers()
        try:
            with logging_redirect_tqdm():
                self.callback_handler.fire("on_train_begin", self)
                self._run_epochs()
                self._save_last_checkpoint()
                if self.state.stop_reason != "signal":
                    self._save_outputs()
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._restore_signal_handlers(previous_handlers)
            self.callback_handler.fire("on_train_end", self, error=error)
            if self.metrics_log is not None:
                self.metrics_log.close()
        summary = self._summary(time.perf_counter() - started)
        if self.is_main_process and self.state.stop_reason != "signal":
            _write_json(self.output_dir / "training_summary.json", summary)
            self._render_report()
        if self.state.stop_reason == "signal":
            logger.warning("Training stopped by %s at step %d; checkpoint saved. Resume with "
                           "train(resume_from_checkpoint='latest') or `sft train CONFIG --resume`.",
                           signal.Signals(self._stop_signal).name, self.state.global_step)
        return summary

    def _run_epochs(self) -> None:
        """Epochs of optimizer steps until `max_steps`, the end of the last epoch, or a stop request."""
        state = self.state
        progress = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                        disable=not self.is_main_process or self.config.disable_progress_bar
                        or not sys.stderr.isatty())
        with progress:
            while state.global_step < state.max_steps:
                plan = self._epoch_plan(state.epoch)
                if not plan:
                    raise ValueError(f"{len(self.train_data)} training examples make no micro-batch for each of "
                                     f"{self.num_processes} processes")
                if state.batch_in_epoch == 0:
                    self.callback_handler.fire("on_epoch_begin", self, epoch=state.epoch)
                self.train_dataloader = DataLoader(
                    self.train_data,
                    batch_sampler=plan[state.batch_in_epoch:],
                    collate_fn=self.collate_fn,
                    num_workers=self.config.dataloader_num_workers,
                    pin_memory=self.device.type == "cuda",
                    generator=torch.Generator().manual_seed(self.config.seed),  # keeps the global RNG untouched
                )
                batches = iter(self.train_dataloader)
                while state.global_step < state.max_steps and not self.should_stop:
                    window = list(islice(batches, self.config.gradient_accumulation_steps))
                    if not window:
                        break
                    metrics = self._training_step(window, epoch_length=len(plan))
                    self._last_metrics = metrics
                    self.callback_handler.fire("on_step_end", self, step=state.global_step, metrics=metrics)
                    self._agree_on_stop()
                    self._log_step(metrics, progress)
                    if self._stop_signal is not None:
                        state.stop_reason = "signal"
                        return
                ended_early = state.batch_in_epoch < len(plan)
                self._end_epoch()
                if self.should_stop:
                    state.stop_reason = "early_stopping"
                    return
                if not ended_early:
                    state.epoch += 1
                    state.batch_in_epoch = 0
                elif state.global_step >= state.max_steps:
                    break
            state.stop_reason = "max_steps" if self.config.max_steps is not None else "completed"

    def _training_step(self, window: list[dict[str, torch.Tensor]], epoch_length: int) -> dict[str, float]:
        """One optimizer step over the micro-batches in `window`; returns the step's metrics."""
        state = self.state
        started = time.perf_counter()
        # The step's loss is a mean over every labelled token of every micro-batch on every process, so each
        # micro-batch's summed loss is divided by the step's total token count (DDP then averages the gradients
        # over processes, which the factor num_processes undoes).
        local_tokens = sum(count_label_tokens(batch["labels"]) for batch in window)
        tokens = int(self.all_reduce_sum(torch.tensor(local_tokens, device=self.device)))
        scale = self.num_processes / max(tokens, 1)
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(window):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k != "seq_lens"}
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
        state.batch_in_epoch += len(window)
        state.train_tokens += tokens
        state.train_loss_sum += loss * tokens
        state.epoch_loss_sum += loss * tokens
        state.epoch_tokens += tokens
        elapsed = time.perf_counter() - started
        return {
            "loss": loss,
            "learning_rate": learning_rate,
            "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "tokens": tokens,
            "tokens_per_second": tokens / elapsed if elapsed > 0 else 0.0,
            "step_time_s": elapsed,
            "epoch": state.epoch + state.batch_in_epoch / max(epoch_length, 1),
        }

    def _agree_on_stop(self) -> None:
        """Make every process stop at the same step when any one of them was asked to stop."""
        if self.num_processes == 1:
            return
        flags = torch.tensor([float(self.should_stop), float(self._stop_signal is not None)], device=self.device)
        flags = self.all_reduce_sum(flags)
        self.should_stop = bool(flags[0] > 0)
        if flags[1] > 0 and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM

    def _end_epoch(self) -> None:
        """Fire `on_epoch_end` with the epoch's token-weighted mean loss (also for a partial last epoch)."""
        state = self.state
        if state.epoch_tokens == 0:
            return
        metrics = {"loss": state.epoch_loss_sum / state.epoch_tokens, "tokens": state.epoch_tokens,
                   "epoch": state.epoch}
        self.callback_handler.fire("on_epoch_end", self, epoch=state.epoch, metrics=metrics)
        self._track_best(metrics)
        if "val_loss" in metrics:  # the final checkpoint records an epoch-end validation as its metric
            self._last_metrics = {**self._last_metrics, "val_loss": metrics["val_loss"]}
        if self.metrics_log is not None:
            self.metrics_log.write("epoch", state.global_step, metrics, epoch=state.epoch + 1)
        state.epoch_loss_sum = 0.0
        state.epoch_tokens = 0

    def _log_step(self, metrics: Mapping[str, float], progress: tqdm) -> None:
        """Record the step in the log history and `metrics.jsonl`, and update the progress bar."""
        state = self.state
        self._track_best(metrics)
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}",
                             tok_s=f"{metrics['tokens_per_second']:.0f}", refresh=False)
        evaluated = "val_loss" in metrics
        if state.global_step % self.config.logging_steps == 0 or state.global_step == 1 or evaluated:
            state.log_history.append({"step": state.global_step, **metrics})
            if self.metrics_log is not None:
                train_metrics = {k: v for k, v in metrics.items() if not k.startswith(("val_", "best_val"))}
                self.metrics_log.write("train", state.global_step, train_metrics, epoch=metrics["epoch"])
                if evaluated:
                    val_metrics = {k: v for k, v in metrics.items() if k.startswith(("val_", "best_val"))}
                    self.metrics_log.write("eval", state.global_step, val_metrics, epoch=metrics["epoch"])
            if progress.disable and self.is_main_process:
                extra = f" val_loss {metrics['val_loss']:.4f}" if evaluated else ""
                logger.info("step %d/%d loss %.4f lr %.2e %.0f tok/s%s", state.global_step, state.max_steps,
                            metrics["loss"], metrics["learning_rate"], metrics["tokens_per_second"], extra)

    def _track_best(self, metrics: Mapping[str, float]) -> None:
        val = metrics.get("val_loss")
        if val is not None and math.isfinite(val) and (self.state.best_metric is None or val < self.state.best_metric):
            self.state.best_metric = float(val)
            self.state.best_step = self.state.global_step

    def _epoch_plan(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches (lists of example indices) for `epoch`, the same on every run."""
        cfg = self.config
        plan = epoch_batches(
            self.train_data.lengths,
            batch_size=cfg.batch_size,
            epoch=epoch,
            seed=cfg.seed,
            shuffle=True,
            token_budget=cfg.batch_size * cfg.max_seq_length if cfg.packing else None,
        )
        world = self.num_processes
        usable = len(plan) - len(plan) % world  # every process takes the same number of micro-batches
        return plan[self.process_index:usable:world]

    # --- callbacks, checkpoints and resume ------------------------------------------------------------------------

    def _add_default_callbacks(self) -> None:
        """Add the callbacks the config asks for, unless one of that kind was given."""
        cfg = self.config

        def missing(kind: type) -> bool:
            return not any(isinstance(cb, kind) for cb in self.callbacks)

        if self.val_dataloader is not None and missing(ValidationCallback):
            self.add_callback(ValidationCallback(eval_steps=cfg.eval_steps))
        if cfg.early_stopping_patience is not None and missing(EarlyStoppingCallback):
            self.add_callback(EarlyStoppingCallback(patience=cfg.early_stopping_patience,
                                                    min_delta=cfg.early_stopping_min_delta))
        if missing(CheckpointCallback):
            self.add_callback(CheckpointCallback(self.checkpoint_dir, save_steps=cfg.save_steps,
                                                 save_total_limit=cfg.save_total_limit,
                                                 save_best_only=cfg.save_best_only))
        if (cfg.wandb_project or "wandb" in cfg.report_to) and missing(WandBCallback):
            self.add_callback(WandBCallback(project=cfg.wandb_project or "llm-playground-sft",
                                            run_name=cfg.wandb_run_name or cfg.run_name,
                                            config=cfg.to_dict(), entity=cfg.wandb_entity))
        if "tensorboard" in cfg.report_to and missing(TensorBoardCallback):
            self.add_callback(TensorBoardCallback(log_dir=str(self.output_dir / "tensorboard")))

    def save_checkpoint(self, path: str | Path) -> str:
        """Write the full training state into the checkpoint directory `path`, atomically; returns the path.

        Every process must call it (stop requests are agreed on, random states and sharded weights gathered);
        the main process writes, and points `latest` (and `best`, when the CheckpointCallback that asked for
        this save recorded it as its best) at it.
        """
        path = Path(path)
        self._agree_on_stop()  # a stop asked for on another process this step is part of the saved state
        # The CheckpointCallback that asked for this save has recorded it already (on every process alike).
        is_best = any(saver.best_checkpoint is not None and Path(saver.best_checkpoint) == path
                      for saver in self._checkpoint_savers())
        rng_states = gather_object([checkpointing.capture_rng_state()])
        full_state = self.accelerator.get_state_dict(self.model) if self._is_sharded() else None
        optimizer_state = checkpointing.full_optimizer_state(self.model, self.optimizer.optimizer)
        if self.is_main_process:
            with checkpointing.atomic_directory(path) as tmp:
                checkpointing.save_weights(self._unwrapped_model(), tmp, full_state)
                for rank, rng in enumerate(rng_states):
                    checkpointing.write_rng_state(tmp, rank, rng)
                checkpointing.save_training_state(
                    tmp,
                    optimizer_state=optimizer_state,
                    lr_scheduler=self.lr_scheduler,
                    trainer_state={
                        **self.state.to_dict(),
                        "stop_reason": "early_stopping" if self.should_stop else self.state.stop_reason,
                        "num_processes": self.num_processes,
                    },
                    callback_states=self.callback_handler.state_dict(),
                    config=self.config.to_dict(),
                )
            checkpointing.write_pointer(path.parent, checkpointing.LATEST_POINTER, path)
            if is_best:
                checkpointing.write_pointer(path.parent, checkpointing.BEST_POINTER, path)
        self.accelerator.wait_for_everyone()
        return str(path)

    def _resume(self, spec: str | bool) -> None:
        """Restore weights, optimizer, scheduler, random states, loop state and callback states."""
        path = checkpointing.resolve_checkpoint(self.checkpoint_dir, spec)
        trainer_state, callback_states = checkpointing.read_trainer_state(path)
        self._check_resume_config(path, checkpointing.read_config(path))
        saved_processes = trainer_state.pop("num_processes", 1)
        if saved_processes != self.num_processes:
            raise checkpointing.CheckpointError(
                f"checkpoint {path} was written by {saved_processes} processes and this run has "
                f"{self.num_processes}: each step's batch is spread over the processes, each with its own random "
                f"state, so an exact resume needs the same number; launch {saved_processes} processes "
                f"(`torchrun --nproc_per_node {saved_processes} ...` or `accelerate launch --num_processes "
                f"{saved_processes} ...`)"
            )
        checkpointing.load_weights(self._unwrapped_model(), path)
        checkpointing.load_optimizer_and_scheduler(path, self.model, self.optimizer.optimizer, self.lr_scheduler)
        self.state = TrainerState.from_dict(trainer_state)
        self.state.max_steps = self._total_steps()
        self.callback_handler.load_state_dict(callback_states)
        checkpointing.load_rng_state(path, self.process_index)
        logger.info("Resumed from %s at step %d (epoch %d, batch %d)", path, self.state.global_step,
                    self.state.epoch, self.state.batch_in_epoch)

    def _check_resume_config(self, path: Path, saved: dict[str, Any] | None) -> None:
        """Refuse a resume whose config changes the model or the step; note the harmless changes."""
        if saved is None:
            return
        saved_config = SFTConfig.from_dict(saved, source=str(path / checkpointing.CONFIG_FILE))
        changed = saved_config.diff(self.config)
        locked = {k: v for k, v in changed.items() if k in RESUME_LOCKED_FIELDS}
        before = saved_config.batch_size * saved_config.gradient_accumulation_steps
        after = self.config.batch_size * self.config.gradient_accumulation_steps
        if before != after:
            locked["batch_size x gradient_accumulation_steps"] = (before, after)
        if locked:
            lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in locked.items())
            raise checkpointing.CheckpointError(
                f"cannot resume from {path}: the config changes what a resumed run must keep:\n{lines}"
            )
        for key, (old, new) in changed.items():
            log = logger.info if key in RESUME_SAFE_FIELDS else logger.warning
            log("Resuming with a changed config: %s %r -> %r", key, old, new)

    def _already_finished(self) -> bool:
        """True (and says why) when the resumed run has nothing left to train."""
        state = self.state
        if state.stop_reason == "early_stopping":
            logger.warning("The run stopped early at step %d (early stopping); not training further.",
                           state.global_step)
            return True
        if state.global_step >= state.max_steps:
            logger.warning("The run already reached its last step (%d); nothing to train.", state.global_step)
            return True
        state.stop_reason = None
        return False

    def _save_last_checkpoint(self) -> None:
        """Checkpoint the final step (unless it was just saved), so a resume sees where and why the run stopped.

        With `save_best_only`, only a run stopped by a signal gets this extra save.
        """
        saver = next(iter(self._checkpoint_savers()), None)
        if saver is None or self.state.global_step == 0:
            return
        if saver.save_best_only and self.state.stop_reason != "signal":
            return
        path = Path(saver._get_checkpoint_path(self.state.global_step)).with_suffix("")
        if not checkpointing.is_complete(path):
            saver._save_checkpoint(self, self.state.global_step, self._last_metrics)

    def _checkpoint_savers(self) -> list[CheckpointCallback]:
        """The attached CheckpointCallbacks; the first one saves the final step and names the best checkpoint."""
        return [cb for cb in self.callbacks if isinstance(cb, CheckpointCallback)]

    def _install_signal_handlers(self) -> dict[int, Any]:
        """On SIGTERM/SIGINT finish the step, save and stop; a second signal aborts at once."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum: int, _frame: Any) -> None:
            if self._stop_signal is not None:
                raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without saving")
            self._stop_signal = signum
            logger.warning("%s received: finishing this step, saving a checkpoint, then stopping "
                           "(send it again to abort at once)", signal.Signals(signum).name)

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, request_stop)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    # --- outputs ---------------------------------------------------------------------------------------------

    def _save_outputs(self) -> None:
        """Write the trained adapter or model, the tokenizer, the config and (if asked) the merged model."""
        full_state = self.accelerator.get_state_dict(self.model) if self._is_sharded() else None
        if self.is_main_process:
            model = self._unwrapped_model()
            save_final_model(model, self.tokenizer, self.output_dir, state_dict=full_state)
            self.config.to_yaml(self.output_dir / "config.yaml")
            if self.config.save_merged_model and hasattr(model, "peft_config"):
                merge_lora(self.output_dir, self.output_dir / "merged")
        self.accelerator.wait_for_everyone()

    def _render_report(self) -> None:
        """`report.html` and `loss.png` from `metrics.jsonl`; a missing plotting library only warns."""
        try:
            render_report(self.output_dir)
        except ImportError as exc:
            logger.warning("No training report: %s", exc)

    def _summary(self, runtime_s: float) -> dict[str, Any]:
        state = self.state
        return {
            "train_loss": state.train_loss_sum / state.train_tokens if state.train_tokens else None,
            "best_val_loss": state.best_metric,
            "best_step": state.best_step,
            "best_checkpoint": next((saver.best_checkpoint for saver in self._checkpoint_savers()), None),
            "global_step": state.global_step,
            "epochs": state.epoch + state.batch_in_epoch / max(len(self._epoch_plan(state.epoch)), 1),
            "train_tokens": state.train_tokens,
            "runtime_s": round(runtime_s, 3),
            "stop_reason": state.stop_reason,
            "mixed_precision": self.config.precision_choice.to_dict(),
            "output_dir": str(self.output_dir),
        }

    def _unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _is_sharded(self) -> bool:
        return self.accelerator.distributed_type.name == "FSDP"


class _MaskedPadding(Dataset):
    """A tokenized dataset where index -1-i is example i with every label masked (it adds no tokens)."""

    def __init__(self, data: TokenizedDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index >= 0:
            return self.data[index]
        example = dict(self.data[-1 - index])
        example["labels"] = [IGNORE_INDEX] * len(example["input_ids"])
        return example


def _compile_decoder_layers(model: torch.nn.Module) -> None:
    """Compile each transformer block on its own (regional compilation: fast to compile, hook-friendly)."""
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            module.compile()


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
