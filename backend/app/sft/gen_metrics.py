"""Scores of generated answers against reference answers, for evaluation by generation.

Each metric scores one answer in [0, 1] (1 = right); an evaluation reports the mean over its samples under
`gen_<name>`. Built-ins, by name:

- `exact_match`: the answer equals the reference after stripping surrounding whitespace.
- `exact_match_normalized`: equal after folding case, whitespace and punctuation.
- `json_valid`: the answer parses as JSON.
- `json_match`: the parsed answer equals the parsed reference (key order ignored); 0 when either does not parse.
- `contains`: the (stripped) reference appears in the answer.
- `stopped`: the answer ended with EOS / the turn terminator before `max_new_tokens` ran out.
- `rougeL`, `bleu`: ROUGE-L F1 and sentence BLEU / 100, through the optional `rouge-score` and `sacrebleu`
  packages (`pip install 'llm-playground-sft[generation-metrics]'`).

A metric can also be any callable `f(prediction: str, reference: str) -> float`, reported as
`gen_<function name>`.
"""

from __future__ import annotations

import importlib.util
import json
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from app.sft.errors import ConfigError

MetricFunction = Callable[[str, str], float]
"""A user metric: `f(prediction, reference) -> float`."""

METRIC_PREFIX = "gen_"
"""Every generation metric is reported under `gen_<name>`."""


@dataclass(frozen=True)
class Generation:
    """One generated answer: what the model wrote, what it should have written, and whether it stopped."""

    prediction: str
    reference: str
    stopped: bool = True


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the answer equals the reference after stripping surrounding whitespace."""
    return float(prediction.strip() == reference.strip())


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, without punctuation (ASCII and Unicode), whitespace runs folded to one space."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_PUNCTUATION)
    text = "".join(char for char in text if not unicodedata.category(char).startswith("P"))
    return " ".join(text.split())


def exact_match_normalized(prediction: str, reference: str) -> float:
    """1.0 when the answer equals the reference once case, whitespace and punctuation are folded."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


_NOT_JSON = object()


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _NOT_JSON


def json_valid(prediction: str, reference: str) -> float:
    """1.0 when the answer parses as JSON."""
    return float(_parse_json(prediction) is not _NOT_JSON)


def json_match(prediction: str, reference: str) -> float:
    """1.0 when the answer and the reference parse to equal JSON values (object key order does not matter)."""
    predicted, expected = _parse_json(prediction), _parse_json(reference)
    return float(predicted is not _NOT_JSON and expected is not _NOT_JSON and predicted == expected)


def contains(prediction: str, reference: str) -> float:
    """1.0 when the stripped reference appears in the answer."""
    return float(reference.strip() in prediction)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of the answer against the reference (the `rouge-score` package)."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def bleu(prediction: str, reference: str) -> float:
    """Sentence BLEU of the answer against the reference, divided by 100 (the `sacrebleu` package)."""
    import sacrebleu

    return sacrebleu.sentence_bleu(prediction, [reference]).score / 100.0


_SCORER: Any = None


def _rouge_scorer() -> Any:
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _SCORER


BUILTIN_METRICS: dict[str, MetricFunction | None] = {
    "exact_match": exact_match,
    "exact_match_normalized": exact_match_normalized,
    "json_valid": json_valid,
    "json_match": json_match,
    "contains": contains,
    "stopped": None,  # scored from Generation.stopped, not from the text
    "rougeL": rouge_l,
    "bleu": bleu,
}
"""Built-in metrics by name (`stopped` has no text function: it reads whether the answer ended)."""

_NEEDS_PACKAGE = {"rougeL": "rouge_score", "bleu": "sacrebleu"}
_PIP_NAME = {"rouge_score": "rouge-score", "sacrebleu": "sacrebleu"}


@dataclass(frozen=True)
class Metric:
    """A resolved metric: its name (without `gen_`) and its scoring function."""

    name: str
    function: MetricFunction | None
    """None for `stopped`."""

    @property
    def key(self) -> str:
        """The metric's key in the evaluation's results: `gen_<name>`."""
        return METRIC_PREFIX + self.name

    def score(self, generation: Generation) -> float:
        """The score of one answer; exceptions of a user's function propagate (see `score_generations`)."""
        if self.function is None:
            return float(generation.stopped)
        return float(self.function(generation.prediction, generation.reference))


def resolve_metrics(metrics: str | MetricFunction | Sequence[str | MetricFunction]) -> list[Metric]:
    """Built-in names and/or callables as `Metric`s, in the order given.

    Raises `ConfigError` for an unknown name (listing the built-ins), a built-in whose optional package is
    missing (with the pip command), a value that is neither a name nor a callable, an empty list, or two
    metrics with the same name.
    """
    if isinstance(metrics, str) or callable(metrics):
        metrics = [metrics]
    resolved: list[Metric] = []
    for metric in metrics:
        if isinstance(metric, str):
            resolved.append(_builtin(metric))
        elif callable(metric):
            name = getattr(metric, "__name__", None) or type(metric).__name__
            resolved.append(Metric(name if name != "<lambda>" else "lambda", metric))
        else:
            raise ConfigError(
                f"generation metric {metric!r}: expected a metric name ({', '.join(BUILTIN_METRICS)}) or a "
                "callable f(prediction, reference) -> float"
            )
    if not resolved:
        raise ConfigError(f"no generation metrics given; built-in metrics: {', '.join(BUILTIN_METRICS)}")
    names = [metric.name for metric in resolved]
    doubled = sorted({name for name in names if names.count(name) > 1})
    if doubled:
        raise ConfigError(f"generation metrics named twice: {', '.join(doubled)} (each is reported as gen_<name>)")
    return resolved


def check_metric_names(names: Sequence[str]) -> None:
    """Raise `ConfigError` when a name is not a built-in metric (the message lists the built-ins)."""
    for name in names:
        _builtin(name, check_package=False)


def _builtin(name: str, *, check_package: bool = True) -> Metric:
    key = name.removeprefix(METRIC_PREFIX)
    if key not in BUILTIN_METRICS:
        raise ConfigError(
            f"unknown generation metric {name!r}; built-in metrics: {', '.join(BUILTIN_METRICS)} "
            "(or pass a callable f(prediction, reference) -> float)"
        )
    package = _NEEDS_PACKAGE.get(key)
    if check_package and package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"generation metric {key!r} needs the {_PIP_NAME[package]} package: "
            "pip install 'llm-playground-sft[generation-metrics]'"
        )
    return Metric(key, BUILTIN_METRICS[key])


def score_generations(
    metrics: Sequence[Metric], generations: Sequence[Generation], indices: Sequence[int] | None = None
) -> tuple[list[dict[str, float]], dict[str, str]]:
    """Every metric's score of every answer, and a warning for each metric that raised, by metric name.

    A metric that raises on a sample scores 0 for that sample; its warning names the metric, the first sample
    it failed on (`indices[position]`, so a shard reports indices of the whole evaluation set) and how many
    samples failed, so that training goes on.
    """
    indices = list(range(len(generations))) if indices is None else list(indices)
    scores: list[dict[str, float]] = [{} for _ in generations]
    warnings: dict[str, str] = {}
    for metric in metrics:
        failures: list[tuple[int, BaseException]] = []
        for position, generation in enumerate(generations):
            try:
                value = metric.score(generation)
            except Exception as error:  # a user's metric must not end training
                failures.append((indices[position], error))
                value = 0.0
            scores[position][metric.key] = value
        if failures:
            index, error = failures[0]
            more = f" (and on {len(failures) - 1} more)" if len(failures) > 1 else ""
            warnings[metric.name] = (
                f"generation metric {metric.name!r} raised on sample {index}{more}: "
                f"{type(error).__name__}: {error}; that sample scores 0"
            )
    return scores, warnings
