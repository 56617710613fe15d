"""Evaluation by generation: the model answers held-out prompts during training and the answers are scored.

Validation loss says little about whether a fine-tune does its job; `gen_exact_match`, `gen_json_valid` or
`gen_stopped` say how many answers are right, parse, or end. The results are published as an evaluation
(`on_evaluate`), so `CheckpointCallback(monitor="gen_exact_match", mode="max")` keeps the checkpoint with the
most right answers and `EarlyStoppingCallback(monitor="gen_json_valid", mode="max")` stops on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from app.sft import atomic
from app.sft.callbacks.base import SFTCallback, TrainerAPI, publish_evaluation, trainer_api
from app.sft.config import ConfigError
from app.sft.data.formatting import resolve_template
from app.sft.data.loading import EVAL_SPLITS, load_rows
from app.sft.data.splitting import split_train_val
from app.sft.gen_metrics import Generation, Metric, MetricFunction, resolve_metrics, score_generations
from app.sft.generation import (
    GenerationPrompt,
    generate_batch,
    generation_prompts,
    length_batches,
    load_run_config,
    load_trained_model,
    stop_token_ids,
)
from app.sft.modeling import load_tokenizer
from app.sft.paths import GENERATIONS_DIR
from app.sft.run_dir import linked_folder_problem

logger = logging.getLogger(__name__)

"""Samples of each evaluation go to `output_dir/generations/step_<N>.jsonl`."""


class GenerationEvalCallback(SFTCallback):
    """Generates answers to evaluation prompts every `eval_steps` steps (and at epoch ends) and scores them.

    Args:
        eval_dataset: rows in the run's `dataset_format` (alpaca; chat, where the last assistant turn is the
            reference), or `{"prompt" or "messages", "reference"}` rows; a list, a `datasets.Dataset`, or a
            data file path. Completion rows have no reference and are refused.
        metrics: built-in metric names (`app.sft.gen_metrics`: exact_match, exact_match_normalized, json_valid,
            json_match, contains, stopped, rougeL, bleu) and/or callables `f(prediction, reference) -> float`,
            reported as `gen_<name>` (a callable under its function name).
        eval_steps: evaluate when `step % eval_steps == 0`; None: the trainer config's `eval_steps`, or only at
            epoch ends without one.
        eval_on_epoch_end: also evaluate at the end of each epoch (once per step: not again when the epoch
            ends at a step that just evaluated).
        max_new_tokens: the answer length limit; an answer that reaches it without a stop token has not stopped.
        num_samples: how many rows to evaluate (None: all); the first `num_samples`, or a random sample drawn
            with `sample_seed` when it is given. The selection is fixed at the first evaluation and kept in the
            callback state, so every evaluation and every resume asks the same prompts.
        batch_size: prompts generated at once.
        temperature: 0 for greedy decoding; above 0 samples, from a random state of its own (seeded by the
            step), so the training's random numbers are unaffected.

    Each evaluation publishes `gen_<metric>` means over the samples plus `gen_tokens_per_second` and
    `gen_time_s`, and the main process writes each sample (prompt, reference, prediction, stopped, scores) to
    `output_dir/generations/step_<N>.jsonl`. Several processes split the prompts and sum their scores, so the
    means are those one process would compute. A metric that raises on a sample scores 0 there, with one
    warning naming the metric and the sample.
    """

    order = 5  # after ValidationCallback (0), so both evaluations of a step are in before anyone decides

    def __init__(
        self,
        eval_dataset: Any,
        metrics: str | MetricFunction | Sequence[str | MetricFunction] = ("exact_match",),
        eval_steps: int | None = None,
        eval_on_epoch_end: bool = True,
        max_new_tokens: int = 128,
        num_samples: int | None = None,
        batch_size: int = 16,
        temperature: float = 0.0,
        *,
        sample_seed: int | None = None,
    ) -> None:
        problems = []
        if eval_steps is not None and not _positive_int(eval_steps):
            problems.append(f"eval_steps must be an integer >= 1 or None, got {eval_steps!r}")
        if not _positive_int(max_new_tokens):
            problems.append(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if num_samples is not None and not _positive_int(num_samples):
            problems.append(f"num_samples must be an integer >= 1 or None (all rows), got {num_samples!r}")
        if not _positive_int(batch_size):
            problems.append(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not (isinstance(temperature, (int, float)) and temperature >= 0):
            problems.append(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
        if eval_dataset is None or (hasattr(eval_dataset, "__len__") and len(eval_dataset) == 0):
            problems.append("eval_dataset is empty: give at least one row to generate an answer for")
        if problems:
            raise ConfigError("GenerationEvalCallback: " + "; ".join(problems), problems)
        self.metrics: list[Metric] = resolve_metrics(metrics)
        self.eval_dataset = eval_dataset
        self.eval_steps = eval_steps
        self.eval_on_epoch_end = eval_on_epoch_end
        self.max_new_tokens = max_new_tokens
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.temperature = float(temperature)
        self.sample_seed = sample_seed
        self.history: list[dict[str, Any]] = []
        """One entry per evaluation: `{"step": N, "gen_...": value, ...}`, kept across resumes."""
        self.selection: list[int] | None = None
        """Indices of the evaluated rows, fixed at the first evaluation (or restored on resume)."""
        self.latest_samples: list[dict[str, Any]] = []
        """The samples of the latest evaluation (main process; every process on one process)."""
        self._prompts: list[GenerationPrompt] | None = None
        self._warned: set[str] = set()

    @classmethod
    def from_config(cls, config: Any, eval_rows: Any = None) -> GenerationEvalCallback:
        """The callback the config's `generation_eval_*` fields describe, on `eval_rows` (the raw validation
        rows given to the trainer) or else the config's own validation rows (`generation_eval_rows`)."""
        rows = eval_rows if eval_rows is not None else generation_eval_rows(config)
        if rows is None or len(rows) == 0:
            raise ConfigError(
                "generation_eval_metrics: no validation rows to answer; set eval_dataset_name or validation_split "
                "(or give the trainer an eval_dataset)"
            )
        return cls(
            rows,
            metrics=list(config.generation_eval_metrics),
            eval_steps=config.generation_eval_steps or config.eval_steps,
            max_new_tokens=config.generation_max_new_tokens,
            num_samples=config.generation_eval_samples,
            batch_size=config.eval_batch_size or config.batch_size,
        )

    # --- events --------------------------------------------------------------------------------------------------

    def on_train_begin(self, trainer: Any, **kwargs: Any) -> None:
        self._prompts = None  # a new run may come with another tokenizer or template: render again lazily

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float], **kwargs: Any) -> None:
        every = self.eval_steps if self.eval_steps is not None else _config_value(trainer, "eval_steps")
        if every and step % every == 0:
            self._evaluate_once(trainer, step, metrics)

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float], **kwargs: Any) -> None:
        step = trainer_api(trainer).global_step
        if self.eval_on_epoch_end and step:
            self._evaluate_once(trainer, step, metrics)

    def _evaluate_once(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        if self.history and self.history[-1]["step"] == step:
            return  # this step was evaluated already (its eval step is also an epoch end, or before a resume)
        api = trainer_api(trainer)
        results = self.evaluate(trainer, step)
        if not api.managed:  # a hand-written loop sees the results in the step's metrics
            metrics.update(results)
        publish_evaluation(trainer, step, results)

    # --- evaluation ----------------------------------------------------------------------------------------------

    def evaluate(self, trainer: Any, step: int, *, samples_file: str | Path | None = None) -> dict[str, float]:
        """Generate and score the answers now; returns the `gen_*` metrics (also kept in `history`) and, on
        the main process, writes the samples to `samples_file` (default: `generations/step_<step>.jsonl` in
        the trainer's output_dir). Does not publish the metrics (`on_step_end` does)."""
        api = trainer_api(trainer)
        prompts = self._selected_prompts(api)
        rows = self.selection or []  # the row (in eval_dataset) of each prompt
        model = _generating_model(api.model)
        world, rank = api.num_processes, api.process_index
        batches = length_batches([len(p.input_ids) for p in prompts], self.batch_size)
        per_process = math.ceil(len(batches) / world)
        mine = batches[rank::world]
        dummies = per_process - len(mine)  # every process runs as many generate calls (collective forwards)
        stop_ids = stop_token_ids(model, api.tokenizer, self._template(api))

        started = time.perf_counter()
        local: list[tuple[int, GenerationPrompt, Any]] = []
        with _own_random_state(api.device, _seed(api, step), enabled=self.temperature > 0):
            for number, batch in enumerate(mine + [batches[0]] * dummies):
                answers = generate_batch(
                    model, api.tokenizer, [prompts[i].input_ids for i in batch],
                    max_new_tokens=self.max_new_tokens, stop_ids=stop_ids, temperature=self.temperature,
                    autocast=api.autocast, synced_gpus=world > 1,
                )
                if number < len(mine):  # the answers of a dummy batch only kept the processes in step
                    local += [(rows[i], prompts[i], answer) for i, answer in zip(batch, answers, strict=True)]
        elapsed = time.perf_counter() - started

        generations = [Generation(answer.text, prompt.reference, answer.stopped) for _, prompt, answer in local]
        scores = self._score(generations, [index for index, _, _ in local])
        totals = torch.tensor(
            [sum(s[m.key] for s in scores) for m in self.metrics]
            + [len(local), sum(answer.num_tokens for _, _, answer in local)],
            dtype=torch.float64,
        )
        totals = api.all_reduce_sum(totals.to(api.device)).cpu().tolist()
        count, tokens = totals[-2], totals[-1]
        results = {m.key: total / count for m, total in zip(self.metrics, totals, strict=False)}
        results["gen_tokens_per_second"] = tokens / elapsed if elapsed > 0 else 0.0
        results["gen_time_s"] = elapsed
        self.history.append({"step": step, **results})

        samples = [
            {"index": index, "prompt": prompt.prompt, "reference": prompt.reference, "prediction": answer.text,
             "stopped": answer.stopped, "scores": score}
            for (index, prompt, answer), score in zip(local, scores, strict=True)
        ]
        samples = _gather_on_main(samples, world)
        if api.is_main_process:
            self.latest_samples = sorted(samples, key=lambda sample: sample["index"])
            if samples_file is None and api.output_dir is not None:
                samples_file = Path(api.output_dir) / GENERATIONS_DIR / f"step_{step}.jsonl"
            if samples_file is not None:
                self._write_samples(Path(samples_file), step)
        summary = ", ".join(f"{m.key} {results[m.key]:.4f}" for m in self.metrics)
        logger.info("Generation evaluation at step %d: %s (%d prompts, %.1f s)", step, summary, int(count), elapsed)
        return results

    def _selected_prompts(self, api: TrainerAPI) -> list[GenerationPrompt]:
        """The prompts of the selected rows, rendered once per run with the run's tokenizer and template."""
        if self._prompts is None:
            config = api.config
            rows = _rows(self.eval_dataset)
            if not rows:
                raise ConfigError("GenerationEvalCallback: eval_dataset is empty: give at least one row")
            if self.selection is None or max(self.selection, default=-1) >= len(rows):
                self.selection = _select(len(rows), self.num_samples, self.sample_seed)
            chosen = [rows[i] for i in self.selection]
            if api.tokenizer is None:
                raise ConfigError("GenerationEvalCallback needs the trainer's tokenizer (trainer.tokenizer)")
            self._prompts = generation_prompts(
                chosen, api.tokenizer,
                dataset_format=getattr(config, "dataset_format", "alpaca"),
                template=self._template(api),
                text_field=getattr(config, "dataset_text_field", "text"),
                source="GenerationEvalCallback eval_dataset",
            )
        return self._prompts

    def _template(self, api: TrainerAPI) -> Any:
        config = api.config
        if config is None:  # a hand-written loop without a config: alpaca rows, the alpaca template
            from app.sft.templates import default_registry

            return default_registry.get("alpaca")
        return resolve_template(config, api.tokenizer)

    def _score(self, generations: list[Generation], indices: list[int]) -> list[dict[str, float]]:
        """Each sample's scores; a failing metric is warned about once per run of this callback."""
        scores, warnings = score_generations(self.metrics, generations, indices)
        for name, warning in warnings.items():
            if name not in self._warned:
                self._warned.add(name)
                logger.warning("%s", warning)
        return scores

    def _write_samples(self, path: Path, step: int) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            text = "".join(json.dumps({"step": step, **sample}) + "\n" for sample in self.latest_samples)
            atomic.write_text(path, text)
        except OSError as error:
            logger.warning("Cannot write the generation samples of step %d to %s (%s); training goes on.",
                           step, path, error)

    # --- state ---------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(entry) for entry in self.history], "selection": self.selection}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [dict(entry) for entry in state.get("history", [])]
        selection = state.get("selection")
        self.selection = None if selection is None else [int(i) for i in selection]
        self._prompts = None


def evaluate_by_generation(
    target: str | Path,
    overrides: Sequence[str] = (),
    *,
    metrics: Sequence[str] | None = None,
    num_samples: int | None = None,
) -> tuple[dict[str, float], Path]:
    """`sft eval --generate`: the generation metrics of a run directory, a checkpoint or a config (its base
    model) on the config's validation rows, and the samples file written (`generations/eval_<what>.jsonl` in
    the run's folder).

    `metrics` default to the config's `generation_eval_metrics` (else exact_match), `num_samples` to its
    `generation_eval_samples`; `generation_max_new_tokens` and `eval_batch_size` apply as in training.
    """
    target = Path(target)
    config = load_run_config(target, overrides)
    settings: dict[str, Any] = {"generation_eval_metrics": list(metrics or config.generation_eval_metrics
                                                                or ["exact_match"])}
    if num_samples is not None:
        settings["generation_eval_samples"] = num_samples
    callback = GenerationEvalCallback.from_config(config.model_copy(update=settings))  # checks the names itself
    if target.is_file():
        run_dir, label = Path(config.output_dir), "base"
    elif (target / "config.yaml").is_file():
        run_dir, label = target, "final"
    else:
        run_dir, label = Path(config.output_dir), target.name
    samples_file = run_dir / GENERATIONS_DIR / f"eval_{label}.jsonl"
    problem = linked_folder_problem(samples_file.parent)
    if problem is not None:
        raise ConfigError(problem)
    model = load_trained_model(target, config)
    evaluation = _Evaluation(model, load_tokenizer(config), config)
    return callback.evaluate(evaluation, 0, samples_file=samples_file), samples_file


class _Evaluation(TrainerAPI):
    """The one-process trainer view `evaluate_by_generation` evaluates with (no training, nothing published)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: Any) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.device = next(model.parameters()).device


def samples_of(trainer: Any, step: int) -> list[dict[str, Any]]:
    """The generation samples a GenerationEvalCallback of `trainer` produced at `step` (for loggers), or []."""
    for callback in getattr(trainer, "callbacks", ()):
        if isinstance(callback, GenerationEvalCallback) and callback.history and callback.history[-1]["step"] == step:
            return callback.latest_samples
    return []


def generation_eval_rows(config: Any) -> list[Mapping[str, Any]] | None:
    """The raw validation rows of `config`: `eval_dataset_name`, else the `validation_split` of `dataset_name`
    (the same seeded split as the tokenized validation set, when no training row was dropped); None if none."""
    if config.eval_dataset_name is not None:
        return list(load_rows(config.eval_dataset_name, EVAL_SPLITS))
    if config.dataset_name is None or not config.validation_split:
        return None
    rows = list(load_rows(config.dataset_name, config.dataset_split))
    return split_train_val(rows, config.validation_split, config.seed)[1]


def _rows(dataset: Any) -> list[Mapping[str, Any]]:
    if isinstance(dataset, (str, Path)):
        return list(load_rows(str(dataset)))
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        return [dataset[i] for i in range(len(dataset))]
    return list(dataset)


def _select(total: int, num_samples: int | None, seed: int | None) -> list[int]:
    """The first `num_samples` of `total` rows, or (with `seed`) a seeded random sample in row order."""
    if num_samples is None or num_samples >= total:
        return list(range(total))
    if seed is None:
        return list(range(num_samples))
    return sorted(random.Random(seed).sample(range(total), num_samples))


def _generating_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model that `generate`s: DDP's wrapped module (its forward would sync gradients), else the model."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _gather_on_main(samples: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    """Every process's samples, on the main process (each process keeps its own elsewhere)."""
    if world == 1 or not torch.distributed.is_initialized():
        return samples
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, samples)
    return [sample for part in gathered for sample in part]


@contextlib.contextmanager
def _own_random_state(device: Any, seed: int, enabled: bool) -> Iterator[None]:
    """A random state of its own for sampled generation, leaving the training's random numbers untouched."""
    if not enabled:
        yield
        return
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _seed(api: TrainerAPI, step: int) -> int:
    return int(_config_value(api, "seed") or 0) + step + 1000 * api.process_index


def _config_value(trainer: Any, name: str) -> Any:
    return getattr(trainer_api(trainer).config, name, None)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1

