"""The data and template audit: what the tokenized data looks like, and the checks that stop a doomed run.

The commonest ways a fine-tune goes wrong raise no error: the token that ends a reply is never trained (the
model never stops), a template marker merges with the first reply token (the mask is off by a token), two BOS
tokens start every row, truncation cuts the replies away, the validation set is a copy of the training set.
`audit_data` measures the tokenized training and validation data (from the facts `data.tokenize_dataset`
records per row) and runs one check per mistake; `run_audit` applies the config's `audit` mode (`error` raises
`AuditError`, `warn` warns once, `off` skips). `SFTTrainer.train()` runs it before the first step and stores the
result in `training_summary.json`; `sft validate` prints it. See docs/audit.md.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from app.sft.config import SFTConfig
from app.sft.data.batching import epoch_batches
from app.sft.errors import DataError
from app.sft.loss import IGNORE_INDEX
from app.sft.tokenized import DataFacts, TokenizedDataset

logger = logging.getLogger(__name__)

FIRST_ROWS = 5
"""How many row numbers a check's message names."""
_PERCENTILES = (50, 90, 99)
_HISTOGRAM_BINS = 30


class AuditError(DataError):
    """A data or template check failed under `audit: error`; the message names each check and its rows."""


class AuditWarning(UserWarning):
    """A data or template check failed under `audit: warn` (one warning lists every failed check)."""


@dataclass
class AuditCheck:
    """One check: whether it passed, how many rows fail it, the first of them (1-based) and what it means."""

    name: str
    passed: bool
    rows: int = 0
    first_rows: list[int] = field(default_factory=list)
    message: str = ""
    """Empty when the check passed."""
    warning: bool = False
    """A finding that only warns (whatever the mode) instead of failing the audit."""


@dataclass
class AuditReport:
    """Everything the audit found; `to_dict()` is JSON-serialisable (it goes into `training_summary.json`)."""

    mode: str
    seconds: float
    """How long the audit took (not in `to_dict()`)."""
    max_seq_length: int
    splits: dict[str, dict[str, Any]]
    """"train" (and "validation"): rows read, dropped and why, truncated, tokens and trained tokens per epoch."""
    lengths: dict[str, dict[str, int]]
    """p50/p90/p99/max of prompt, response and total tokens of the training rows, before truncation."""
    truncation: dict[str, Any]
    batching: dict[str, Any]
    leakage: dict[str, Any]
    histogram: dict[str, list[int]]
    """Total lengths of the training rows: `edges` (bin bounds) and `counts`."""
    examples: list[dict[str, Any]]
    """Two training examples as `spans`: [text, trained] pairs, for the report."""
    checks: list[AuditCheck]

    @property
    def failed(self) -> list[AuditCheck]:
        """The checks that failed (not those that only warn)."""
        return [check for check in self.checks if not check.passed and not check.warning]

    @property
    def warnings(self) -> list[AuditCheck]:
        """The findings that only warn."""
        return [check for check in self.checks if not check.passed and check.warning]

    def to_dict(self) -> dict[str, Any]:
        """Everything but the time taken (so that every process of a distributed run reports the same)."""
        data = asdict(self)
        del data["seconds"]
        return {**data, "passed": not self.failed}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def failure_message(self, checks: Sequence[AuditCheck] | None = None) -> str:
        """One line per failed check (or per one of `checks`): `name: message`."""
        return "\n".join(f"  {check.name}: {check.message}" for check in (self.failed if checks is None else checks))

    def format_table(self) -> str:
        """The audit as a short text table: per split counts, lengths, truncation, batching, leakage, checks."""
        lines = [f"Data audit ({self.seconds:.2f} s, audit: {self.mode}):"]
        names = list(self.splits)
        lines.append(f"  {'':<28}" + "".join(f"{name:>16}" for name in names))

        def row(label: str, values: Sequence[str]) -> None:
            lines.append(f"  {label:<28}" + "".join(f"{value:>16}" for value in values))

        splits = [self.splits[name] for name in names]
        row("rows read", [f"{s['rows_read']:,}" for s in splits])
        row("dropped", [f"{sum(s['dropped'].values()):,}" for s in splits])
        row("truncated", [f"{s['truncated']:,} ({s['truncated_share']:.1%})" for s in splits])
        row("examples", [f"{s['examples']:,}" for s in splits])
        row("tokens per epoch", [f"{s['tokens']:,}" for s in splits])
        row("trained tokens per epoch", [f"{s['trained_tokens']:,} ({s['trained_share']:.0%})" for s in splits])
        reasons = {reason: count for s in splits for reason, count in s["dropped"].items() if count}
        if reasons:
            lines.append("  dropped: " + ", ".join(f"{reason.replace('_', ' ')}" for reason in reasons))
        lines.append(f"  lengths of the training rows (tokens, before max_seq_length {self.max_seq_length}):")
        lines.append(f"  {'':<28}" + "".join(f"{key:>8}" for key in ("p50", "p90", "p99", "max")))
        for part, stats in self.lengths.items():
            lines.append(f"  {part:<28}" + "".join(f"{stats[key]:>8,}" for key in ("p50", "p90", "p99", "max")))
        cut = self.truncation
        lines.append(f"  truncation: {cut['rows_share']:.1%} of rows, {cut['trained_tokens_lost_share']:.1%} of "
                     f"trained tokens ({cut['trained_tokens_lost']:,}) lost; {cut['rows_response_cut_away']} rows "
                     "lose their whole response")
        batching = self.batching
        if batching["packing"]:
            lines.append(f"  batching: packed, fill rate {batching['fill_rate']:.1%}; "
                         f"{batching['steps_per_epoch']:,} steps per epoch")
        else:
            lines.append(f"  batching: padded, padding {batching['padding_share']:.1%} of batch tokens; "
                         f"{batching['steps_per_epoch']:,} steps per epoch")
        if self.leakage["validation_rows"]:
            lines.append(f"  leakage: {self.leakage['duplicate_validation_rows']:,} of "
                         f"{self.leakage['validation_rows']:,} validation rows also in the training data "
                         f"({self.leakage['training_rows_in_validation']:,} training rows); "
                         f"{self.leakage['duplicates_kept_together']:,} copies of rows kept on one side of the split")
        lines.append("  checks:")
        for check in self.checks:
            mark = "ok  " if check.passed else "warn" if check.warning else "FAIL"
            lines.append(f"    {mark} {check.name}" + (f": {check.message}" if check.message else ""))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- measuring


def audit_data(
    train: TokenizedDataset,
    val: TokenizedDataset | None,
    config: SFTConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> AuditReport:
    """Measure `train` and `val` and run every check (nothing is raised; see `run_audit`).

    `tokenizer` decodes the two examples the report shows (none without it).
    """
    started = time.perf_counter()
    sources = [("train", train)]
    if val is not None:
        sources.append(("validation", val))
    facts = train.facts
    tokenized = facts.length > 0
    prompt = facts.length - facts.response
    lengths = {
        "prompt": _percentiles(prompt[tokenized]),
        "response": _percentiles(facts.response[tokenized]),
        "total": _percentiles(facts.length[tokenized]),
    }
    lost = facts.response - facts.trained
    cut_away = np.flatnonzero((facts.response > 0) & (facts.trained == 0) & (facts.length > facts.max_seq_length))
    response_total = int(facts.response.sum())
    truncation = {
        "rows": int((facts.length > facts.max_seq_length).sum()),
        "rows_share": _share(int((facts.length > facts.max_seq_length).sum()), int(tokenized.sum())),
        "trained_tokens_lost": int(lost.sum()),
        "trained_tokens_lost_share": _share(int(lost.sum()), response_total),
        "rows_response_cut_away": len(cut_away),
    }
    batching = _batching(train, config)
    leakage = _leakage(train, val)
    top = max(int(facts.length.max(initial=0)), config.max_seq_length)
    counts, edges = np.histogram(facts.length[tokenized], bins=_HISTOGRAM_BINS, range=(0, top))
    checks = [
        *_row_checks(sources),
        _truncation_check(truncation, cut_away, facts, config),
        _leakage_check(leakage, val, config),
        _empty_replies_check(sources),
    ]
    report = AuditReport(
        mode=config.audit,
        seconds=0.0,
        max_seq_length=config.max_seq_length,
        splits={name: _split_stats(data) for name, data in sources},
        lengths=lengths,
        truncation=truncation,
        batching=batching,
        leakage={key: value for key, value in leakage.items() if key != "duplicate_rows"},
        histogram={"edges": [int(edge) for edge in edges], "counts": counts.tolist()},
        examples=_examples(train, tokenizer) if tokenizer is not None else [],
        checks=checks,
    )
    report.seconds = round(time.perf_counter() - started, 4)
    return report


def _percentiles(values: np.ndarray) -> dict[str, int]:
    if not len(values):
        return {f"p{q}": 0 for q in _PERCENTILES} | {"max": 0}
    points = np.percentile(values, _PERCENTILES)
    return {f"p{q}": int(round(point)) for q, point in zip(_PERCENTILES, points, strict=True)} | {
        "max": int(values.max())
    }


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _split_stats(data: TokenizedDataset) -> dict[str, Any]:
    """Rows read, dropped (by reason) and truncated of the data's source; examples and tokens of `data`."""
    facts = data.facts
    rows = np.asarray(data.rows, dtype=np.int64)
    tokens = int(sum(data.lengths))
    trained = int(facts.trained[rows].sum()) if len(rows) else 0
    read = len(facts.dropped)
    truncated = int((facts.length > facts.max_seq_length).sum())
    return {
        "source": facts.source,
        "rows_read": read,
        "dropped": {reason: facts.dropped.count(reason) for reason in ("no_reply", "nothing_to_train")},
        "truncated": truncated,
        "truncated_share": _share(truncated, read),
        "examples": len(data),
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_share": _share(trained, tokens),
    }


def _batching(train: TokenizedDataset, config: SFTConfig) -> dict[str, Any]:
    """Padding share (padded batches) or fill rate (packed) of the first epoch's plan, and steps per epoch."""
    budget = config.batch_size * config.max_seq_length if config.packing else None
    plan = epoch_batches(train.lengths, batch_size=config.batch_size, epoch=0, seed=config.seed, token_budget=budget)
    lengths = np.asarray(train.lengths, dtype=np.int64)
    real = int(lengths.sum())
    result: dict[str, Any] = {
        "packing": config.packing,
        "batch_size": config.batch_size,
        "micro_batches_per_epoch": len(plan),
        "steps_per_epoch": math.ceil(len(plan) / config.gradient_accumulation_steps),
    }
    if budget is not None:
        result["fill_rate"] = _share(real, len(plan) * budget)
    else:
        padded = sum(len(batch) * int(lengths[batch].max()) for batch in plan)
        result["padding_share"] = 1.0 - _share(real, padded)
    return result


def _leakage(train: TokenizedDataset, val: TokenizedDataset | None) -> dict[str, Any]:
    """Validation examples whose tokens are exactly those of a training example, and vice versa."""
    if val is None:
        return {"validation_rows": 0, "duplicate_validation_rows": 0, "training_rows_in_validation": 0,
                "duplicates_kept_together": 0, "duplicate_rows": []}
    val_keys: dict[tuple[int, ...], list[int]] = {}
    for index, ids in enumerate(val.input_ids):
        val_keys.setdefault(tuple(ids), []).append(index)
    train_hits = 0
    duplicated: set[int] = set()
    train_counts: Counter[tuple[int, ...]] = Counter()
    for ids in train.input_ids:
        key = tuple(ids)
        train_counts[key] += 1
        hit = val_keys.get(key)
        if hit is not None:
            train_hits += 1
            duplicated.update(hit)
    rows = sorted(val.rows[index] for index in duplicated)
    kept = sum(count for key, count in train_counts.items() if count > 1 and key not in val_keys)
    kept += sum(len(hit) for key, hit in val_keys.items() if len(hit) > 1 and key not in train_counts)
    return {
        "validation_rows": len(val),
        "duplicate_validation_rows": len(rows),
        "duplicate_share": _share(len(rows), len(val)),
        "training_rows_in_validation": train_hits,
        "duplicates_kept_together": kept,
        "duplicate_rows": rows,
    }


def _examples(train: TokenizedDataset, tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    """The first training example and the first truncated one (else the second), as labelled text spans."""
    facts = train.facts
    truncated = [i for i, row in enumerate(train.rows) if facts.length[row] > facts.max_seq_length]
    picked = [0] + ([truncated[0]] if truncated and truncated[0] != 0 else [1] if len(train) > 1 else [])
    return [
        {
            "row": train.rows[i] + 1,
            "truncated": bool(facts.length[train.rows[i]] > facts.max_seq_length),
            "spans": [[text, trained] for text, trained in label_spans(tokenizer, train.input_ids[i],
                                                                        train.labels[i])],
        }
        for i in picked
    ]


def label_spans(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], labels: Sequence[int]
) -> list[tuple[str, bool]]:
    """The decoded text as (text, trained) spans. Each span is the difference between decoding a prefix and a
    longer one, so tokenizers that decode words differently at the start of a text still read correctly."""
    flags = [label != IGNORE_INDEX for label in labels]
    ends = [i for i in range(1, len(ids)) if flags[i] != flags[i - 1]] + [len(ids)]
    spans, done, start = [], "", 0
    for end in ends:
        text = tokenizer.decode(list(ids[:end]), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        spans.append((text[len(done) :], flags[start]))
        done, start = text, end
    return spans


# ---------------------------------------------------------------------------------------------- checks


def _rows_named(source: str, rows: Sequence[int]) -> str:
    """`data.jsonl rows 3, 7, 9, ...` (1-based)."""
    shown = ", ".join(str(row + 1) for row in rows[:FIRST_ROWS])
    more = ", ..." if len(rows) > FIRST_ROWS else ""
    return f"{source} row{'s' if len(rows) > 1 else ''} {shown}{more}"


def _check(name: str, failing: list[tuple[str, np.ndarray | list[int]]], explain: str) -> AuditCheck:
    """A row check over one or more sources: passes when no row fails."""
    count = sum(len(rows) for _, rows in failing)
    if not count:
        return AuditCheck(name, True)
    named = "; ".join(_rows_named(source, list(rows)) for source, rows in failing if len(rows))
    first = [int(row) + 1 for _, rows in failing for row in list(rows)[:FIRST_ROWS]][:FIRST_ROWS]
    return AuditCheck(name, False, count, first, f"{count} row{'s' if count > 1 else ''} ({named}): {explain}")


def _row_checks(sources: list[tuple[str, TokenizedDataset]]) -> list[AuditCheck]:
    """The checks of single rows, over each distinct source (a validation split shares the training source)."""
    distinct: list[DataFacts] = []
    for _, data in sources:
        if all(data.facts is not seen for seen in distinct):
            distinct.append(data.facts)
    untrained_end = [(f.source, np.flatnonzero(f.untrained_end)) for f in distinct]
    double_bos = [(f.source, np.flatnonzero(f.double_bos)) for f in distinct]
    boundary = [(f.source, sorted(f.boundary)) for f in distinct]
    special = [(f.source, sorted(f.special_text)) for f in distinct]
    first_special = next(((f, sorted(f.special_text)[0]) for f in distinct if f.special_text), None)
    typed = (f" (row {first_special[1] + 1}: {first_special[0].special_text[first_special[1]]!r})"
             if first_special is not None else "")
    first_seam = next(((f, sorted(f.boundary)[0]) for f in distinct if f.boundary), None)
    seam = ""
    if first_seam is not None:
        facts, row = first_seam
        token = facts.boundary[row]
        how = ("trained, so the model learns a prompt character" if token.trained
               else "not trained, so a reply character is never learned")
        seam = (f" (e.g. {facts.source} row {row + 1}: token {token.position} {token.text!r}, id {token.token_id}, "
                f"is {how})")
    return [
        _check("end_of_reply_trained", untrained_end,
               "the EOS / end-of-turn token that ends an assistant reply carries no label (or no reply ends with "
               "one), so the model would never learn to stop; make the template's reply segment end with the "
               "tokenizer's EOS or end-of-turn token, trained"),
        _check("prompt_reply_boundary", boundary,
               "a token spans the boundary between prompt and reply (the template's marker merges with the first "
               f"reply token){seam}; end the marker with a newline or a space the tokenizer keeps apart"),
        _check("single_bos", double_bos,
               "the row starts with two BOS tokens: the template writes one and the tokenizer adds another; set "
               "the template's add_special_tokens to False or leave the BOS out of the template"),
        _check("special_tokens_in_text", special,
               f"the text holds a special token of the tokenizer{typed}, which becomes the control token itself "
               "(a reply could open a forged turn); remove or escape it in the data"),
    ]


def _empty_replies_check(sources: list[tuple[str, TokenizedDataset]]) -> AuditCheck:
    """A split whose replies are all empty trains on nothing but end-of-turn tokens: fails. Some empty replies
    (the model learns to answer with nothing to those prompts) only warn, with their share and rows."""
    found = []
    for name, data in sources:
        facts, rows = data.facts, np.asarray(data.rows, dtype=np.int64)
        replies, empty = int(facts.replies[rows].sum()), int(facts.empty_replies[rows].sum())
        if empty:
            found.append((name, data, replies, empty, sorted(int(row) for row in rows[facts.empty_replies[rows] > 0])))
    if not found:
        return AuditCheck("empty_replies", True)
    hopeless = [(name, data, replies) for name, data, replies, empty, _ in found if empty == replies]
    if hopeless:
        named = "; ".join(f"{data.facts.source}: all {replies} replies are empty" + (f" ({name} split)"
                          if name != "train" else "") for name, data, replies in hopeless)
        return AuditCheck("empty_replies", False, sum(len(rows) for *_, rows in found), [],
                          f"{named}, so no token of an answer is trained (only end-of-turn tokens); check the "
                          "reply field (output, or the assistant messages' content) of the data")
    parts = [f"{empty} of {replies} replies ({_share(empty, replies):.1%}, {_rows_named(data.facts.source, rows)})"
             for _, data, replies, empty, rows in found]
    first = [row + 1 for *_, rows in found for row in rows][:FIRST_ROWS]
    return AuditCheck("empty_replies", False, sum(len(rows) for *_, rows in found), first,
                      f"{'; '.join(parts)} are empty: the model learns to answer those prompts with nothing; "
                      "remove or fill those rows if that is not meant", warning=True)


def _truncation_check(truncation: dict[str, Any], cut_away: np.ndarray, facts: DataFacts,
                      config: SFTConfig) -> AuditCheck:
    """Too many trained tokens cut by `max_seq_length`, or any row whose response is cut away entirely."""
    share, limit = truncation["trained_tokens_lost_share"], config.audit_max_truncated_share
    truncated_rows = np.flatnonzero(facts.length > facts.max_seq_length)
    if share <= limit and not len(cut_away):
        return AuditCheck("truncation", True)
    parts = []
    if share > limit:
        parts.append(f"max_seq_length={config.max_seq_length} cuts {share:.1%} of the trained tokens "
                     f"({truncation['trained_tokens_lost']:,}), more than audit_max_truncated_share={limit}")
    if len(cut_away):
        parts.append(f"{len(cut_away)} rows lose their whole response ({_rows_named(facts.source, list(cut_away))})")
    rows = cut_away if len(cut_away) else truncated_rows
    return AuditCheck(
        "truncation", False, len(truncated_rows), [int(row) + 1 for row in rows[:FIRST_ROWS]],
        f"{len(truncated_rows)} rows truncated ({_rows_named(facts.source, list(truncated_rows))}): "
        + "; ".join(parts) + "; raise max_seq_length or shorten those rows",
    )


def _leakage_check(leakage: dict[str, Any], val: TokenizedDataset | None, config: SFTConfig) -> AuditCheck:
    """More than `audit_max_duplicate_share` of the validation rows are exact copies of training rows."""
    if val is None or leakage["duplicate_share"] <= config.audit_max_duplicate_share:
        return AuditCheck("validation_leakage", True)
    rows = leakage["duplicate_rows"]
    return AuditCheck(
        "validation_leakage", False, len(rows), [row + 1 for row in rows[:FIRST_ROWS]],
        f"{len(rows)} of {len(val)} validation rows ({leakage['duplicate_share']:.1%}, "
        f"{_rows_named(val.facts.source, rows)}) are identical to training rows, more than "
        f"audit_max_duplicate_share={config.audit_max_duplicate_share}: the validation loss would measure "
        "memorisation; deduplicate the data or use a separate validation set",
    )


# ---------------------------------------------------------------------------------------------- the mode


def run_audit(
    train: TokenizedDataset,
    val: TokenizedDataset | None,
    config: SFTConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    enforce: bool = True,
    warn: bool = True,
) -> AuditReport | None:
    """`audit_data`, then what `config.audit` says: `error` raises `AuditError` naming every failed check,
    `warn` gives one `AuditWarning` (when `warn`), `off` returns None without measuring.

    `enforce=False` measures even under `off` and raises nothing (for `sft validate`, which reports first).
    """
    if config.audit == "off" and enforce:
        return None
    report = audit_data(train, val, config, tokenizer)
    if warn:
        logger.info("Data audit: %d of %d checks passed in %.2f s", len(report.checks) - len(report.failed),
                    len(report.checks), report.seconds)
    if enforce:
        enforce_audit(report, warn=warn)
    return report


def enforce_audit(report: AuditReport, *, warn: bool = True) -> None:
    """Raise `AuditError` (mode `error`) or warn once (mode `warn`) when a check failed."""
    if report.mode == "off" or not (report.failed or report.warnings):
        return
    count = len(report.failed)
    header = f"data audit: {count} check{'s' if count > 1 else ''} failed"
    if report.failed and report.mode == "error":
        raise AuditError(f"{header} (nothing was trained):\n{report.failure_message()}\n"
                         "Fix the data or template, or set audit: warn to train anyway (audit: off skips the "
                         "audit); see docs/audit.md")
    if not warn:
        return
    if report.failed:
        warnings.warn(f"{header} (audit: warn, training anyway):\n"
                      f"{report.failure_message([*report.failed, *report.warnings])}", AuditWarning, stacklevel=3)
    else:
        warnings.warn(f"data audit: a finding to look at (training anyway):\n"
                      f"{report.failure_message(report.warnings)}", AuditWarning, stacklevel=3)
