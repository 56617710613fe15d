"""Tokenizing: a prompt template renders each conversation into `(text, trainable)` segments; the joined text is
tokenized once and a token is trained when it ends inside a trainable segment. Labels are -100 elsewhere.
Examples are truncated to `max_seq_length`; those left with nothing to train on are dropped and counted in one
warning. `tokenized_source` tokenizes one source of a config through the tokenized-data cache (`token_cache`)."""

from __future__ import annotations

import itertools
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import datasets
import jinja2
import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from transformers import PreTrainedTokenizerBase

from app.sft import token_cache
from app.sft.config import DatasetSource, SFTConfig
from app.sft.data.formatting import default_template, format_row, resolve_template, without_leading_replies
from app.sft.data.loading import load_rows, load_rows_and_lines, map_columns
from app.sft.errors import DataError, DataWarning
from app.sft.loss import IGNORE_INDEX
from app.sft.progress import phase
from app.sft.templates import PromptTemplate, Segment, TemplateError
from app.sft.tokenized import BoundaryToken, DataFacts, TokenizedDataset

_ENCODE_CHUNK = 512  # texts tokenized per call to the fast tokenizer


@dataclass
class _Outcome:
    """What became of one row: its tokens, or why it was dropped, and what the audit needs to know of it."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    dropped: str = ""  # "", "no_reply" (a conversation without assistant turn) or "nothing_to_train"
    trimmed: bool = False  # leading assistant messages were left out
    length: int = 0  # tokens before truncation
    response: int = 0  # trained tokens before truncation (first position left out)
    trained: int = 0  # trained tokens kept
    untrained_end: bool = False
    double_bos: bool = False
    boundary: BoundaryToken | None = None
    templated: bool = False  # rendered by a prompt template
    replies: int = 0  # assistant replies (a completion row's text counts as one)
    empty_replies: int = 0  # replies that are empty or whitespace
    special_text: str = ""  # the first special token typed as text in the row's data


def tokenize_dataset(
    dataset: datasets.Dataset | TorchDataset | Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    dataset_format: str = "alpaca",
    template: PromptTemplate | None = None,
    max_seq_length: int = 1024,
    train_on_inputs: bool = False,
    text_field: str = "text",
    source: str = "dataset",
    line_numbers: Sequence[int] | None = None,
) -> TokenizedDataset:
    """Tokenize every row into `input_ids` and `labels` (-100 where nothing is trained).

    Rows that already have `input_ids` (and optionally `labels`) are only truncated. `template` None means
    the default for `dataset_format`. Errors name `source` and the row (its line, when `line_numbers` gives
    the file line of each row). Dropped and truncated examples are counted in one `DataWarning`; a dataset
    with nothing usable left raises `DataError`.
    """
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    rows: list[int] = []
    counts: Counter[str] = Counter()
    outcomes: list[_Outcome] = []
    total = len(dataset) if hasattr(dataset, "__len__") else None
    with phase(f"Tokenizing {source}", total=total, unit="rows") as progress:
        for outcome in _tokenize_rows(
            _iter_rows(dataset),
            tokenizer,
            dataset_format=dataset_format,
            template=template,
            max_seq_length=max_seq_length,
            train_on_inputs=train_on_inputs,
            text_field=text_field,
            where=lambda i: (
                f"{source}:{line_numbers[i]}" if line_numbers is not None else f"{source} row {i + 1}"
            ),
        ):
            progress.update()
            counts["rows"] += 1
            counts["truncated"] += outcome.truncated
            counts["trimmed"] += outcome.trimmed
            if outcome.dropped:
                counts[outcome.dropped] += 1
            else:
                input_ids.append(outcome.input_ids)
                labels.append(outcome.labels)
                rows.append(len(outcomes))
            outcomes.append(outcome)
    summary = _summary(counts, max_seq_length)
    if not input_ids:
        raise DataError(f"{source}: no usable examples" + (f"; {summary}" if summary else " (no rows)"))
    if summary:
        warnings.warn(f"{source}: {summary}", DataWarning, stacklevel=2)
    dropped = counts["no_reply"] + counts["nothing_to_train"]
    return TokenizedDataset(
        input_ids,
        labels,
        num_dropped=dropped,
        num_truncated=counts["truncated"],
        facts=_facts(outcomes, source, max_seq_length),
        rows=rows,
    )


def _facts(outcomes: list[_Outcome], source: str, max_seq_length: int) -> DataFacts:
    def column(name: str, dtype: type) -> np.ndarray:
        return np.fromiter((getattr(outcome, name) for outcome in outcomes), dtype=dtype, count=len(outcomes))

    return DataFacts(
        source=source,
        max_seq_length=max_seq_length,
        length=column("length", np.int64),
        response=column("response", np.int64),
        trained=column("trained", np.int64),
        dropped=[outcome.dropped for outcome in outcomes],
        untrained_end=column("untrained_end", bool),
        double_bos=column("double_bos", bool),
        boundary={row: outcome.boundary for row, outcome in enumerate(outcomes) if outcome.boundary is not None},
        replies=column("replies", np.int64),
        empty_replies=column("empty_replies", np.int64),
        special_text={row: outcome.special_text for row, outcome in enumerate(outcomes) if outcome.special_text},
        templated=any(outcome.templated for outcome in outcomes),
    )


def tokenize_example(
    row: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    dataset_format: str = "alpaca",
    template: PromptTemplate | None = None,
    max_seq_length: int = 1024,
    train_on_inputs: bool = False,
    text_field: str = "text",
) -> dict[str, list[int]] | None:
    """One row as `{"input_ids", "labels"}`, like `tokenize_dataset`; None when it would be dropped."""
    (outcome,) = _tokenize_rows(
        [row],
        tokenizer,
        dataset_format=dataset_format,
        template=template,
        max_seq_length=max_seq_length,
        train_on_inputs=train_on_inputs,
        text_field=text_field,
        where=lambda i: "row",
    )
    return None if outcome.dropped else {"input_ids": outcome.input_ids, "labels": outcome.labels}


def prepare_dataset(
    dataset: datasets.Dataset | TorchDataset | Sequence[Mapping[str, Any]],
    config: SFTConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    source: str = "dataset",
    line_numbers: Sequence[int] | None = None,
) -> TokenizedDataset:
    """`tokenize_dataset` with the format, template, length and masking settings of `config`."""
    return tokenize_dataset(
        dataset,
        tokenizer,
        dataset_format=config.dataset_format,
        template=resolve_template(config, tokenizer),
        max_seq_length=config.max_seq_length,
        train_on_inputs=config.train_on_inputs,
        text_field=config.dataset_text_field,
        source=source,
        line_numbers=line_numbers,
    )


def _iter_rows(dataset: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(dataset, (datasets.Dataset, list, tuple)):
        yield from dataset
    elif isinstance(dataset, TorchDataset) and hasattr(dataset, "__len__"):
        for index in range(len(dataset)):
            yield dataset[index]
    else:
        raise TypeError(
            f"expected a datasets.Dataset, a torch Dataset with a length, or a list of dicts; "
            f"got {type(dataset).__name__}"
        )


_T = TypeVar("_T")


def _chunks(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _tokenize_rows(
    rows: Iterable[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    dataset_format: str,
    template: PromptTemplate | None,
    max_seq_length: int,
    train_on_inputs: bool,
    text_field: str,
    where: Callable[[int], str],
) -> Iterator[_Outcome]:
    """One `_Outcome` per row, in order; text rows are rendered, then tokenized a chunk at a time."""
    if dataset_format == "completion" and template is not None:
        raise ValueError(
            f"template {template.name!r} is not used with dataset_format 'completion' (plain text)"
        )
    if template is None:
        template = default_template(dataset_format, tokenizer)
    add_special_tokens = template.add_special_tokens if template is not None else True
    markers = _Markers.of(tokenizer)
    for chunk in _chunks(enumerate(rows), _ENCODE_CHUNK):
        outcomes: list[_Outcome | None] = []  # None: waits for the chunk's tokenizer call
        rendered: list[list[Segment]] = []
        trimmed_flags: list[bool] = []
        texts: list[_RowText] = []
        for index, row in chunk:
            if not isinstance(row, Mapping):
                raise DataError(f"{where(index)}: expected a mapping of fields, got {type(row).__name__}")
            if row.get("input_ids") is not None:
                outcomes.append(_pretokenized(row, where(index), max_seq_length, markers))
                continue
            segments, trimmed, text = _render(row, tokenizer, dataset_format, template, text_field, where(index),
                                              markers)
            if segments is None:
                outcomes.append(_Outcome([], [], dropped="no_reply", trimmed=trimmed))
                continue
            outcomes.append(None)
            rendered.append(segments)
            trimmed_flags.append(trimmed)
            texts.append(text)
        encoded = zip(
            _encode(
                tokenizer,
                rendered,
                add_special_tokens=add_special_tokens,
                train_on_inputs=train_on_inputs,
                markers=markers,
            ),
            trimmed_flags,
            texts,
            strict=True,
        )
        for outcome in outcomes:
            if outcome is None:
                (ids, ids_array, labels, boundary), trimmed, text = next(encoded)
                outcome = _finish(
                    ids, ids_array, labels, max_seq_length, markers, rendered=True, trimmed=trimmed, boundary=boundary
                )
                outcome.templated = template is not None
                outcome.replies, outcome.empty_replies, outcome.special_text = text
            yield outcome


END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "</s>",
)
"""Special tokens that end an assistant turn (besides the tokenizer's EOS), when the tokenizer has them."""


@dataclass
class _Markers:
    """What tokenization needs to know of the tokenizer for the audit's facts, looked up once."""

    tokenizer: PreTrainedTokenizerBase
    end_ids: np.ndarray
    bos_id: int | None
    pieces: dict[int, str]
    specials: re.Pattern[str] | None
    """Matches any special token's text (None: the tokenizer has none)."""

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> _Markers:
        added = tokenizer.get_added_vocab() if tokenizer is not None else {}
        ids = [added[name] for name in END_OF_TURN_TOKENS if name in added]
        eos = getattr(tokenizer, "eos_token_id", None)
        ids += [eos] if isinstance(eos, int) else []
        names = set(getattr(tokenizer, "all_special_tokens", None) or [])
        names |= {str(token) for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special}
        longest_first = sorted((name for name in names if name), key=len, reverse=True)
        specials = re.compile("|".join(map(re.escape, longest_first))) if longest_first else None
        return cls(tokenizer, np.array(sorted(set(ids)), dtype=np.int64), getattr(tokenizer, "bos_token_id", None), {},
                   specials)

    def special_in(self, texts: Iterable[str]) -> str:
        """The first special token written as text in `texts` ("" when there is none)."""
        if self.specials is not None:
            for text in texts:
                if found := self.specials.search(text):
                    return found.group()
        return ""

    def piece(self, token_id: int) -> str:
        """The token decoded alone (cached): its text with any leading space that offsets may leave out."""
        if token_id not in self.pieces:
            self.pieces[token_id] = self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        return self.pieces[token_id]


def _pretokenized(row: Mapping[str, Any], where: str, max_seq_length: int, markers: _Markers) -> _Outcome:
    """A row that already has `input_ids` (and maybe `labels`; default: every token trained)."""
    ids = _token_list(row, "input_ids", where)
    labels = _token_list(row, "labels", where) if row.get("labels") is not None else list(ids)
    if len(labels) != len(ids):
        raise DataError(f"{where}: field 'labels' has {len(labels)} entries but 'input_ids' has {len(ids)}")
    ids_array = np.asarray(ids, dtype=np.int64)
    return _finish(ids, ids_array, np.asarray(labels, dtype=np.int64), max_seq_length, markers, rendered=False)


def _token_list(row: Mapping[str, Any], name: str, where: str) -> list[int]:
    value = row[name]
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(token, int) and not isinstance(token, bool) for token in value
    ):
        raise DataError(f"{where}: field {name!r} must be a list of token ids (integers)")
    return list(value)


_RowText = tuple[int, int, str]
"""What the audit needs of a row's own text: its replies, how many are empty, the first special token typed in it
("" for none)."""


def _render(
    row: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    dataset_format: str,
    template: PromptTemplate | None,
    text_field: str,
    where: str,
    markers: _Markers,
) -> tuple[list[Segment] | None, bool, _RowText]:
    """The row's segments (None: a conversation with no assistant reply), whether replies were trimmed, and what
    the audit needs of the row's text."""
    formatted = format_row(row, dataset_format, text_field=text_field, where=where)
    if isinstance(formatted, str):
        eos = tokenizer.eos_token or ""
        own = formatted.removesuffix(eos) if eos else formatted  # a text may end with the EOS: that one is meant
        text = (1, int(not own.strip()), markers.special_in([own]))
        return [(formatted if formatted.endswith(eos) else formatted + eos, True)], False, text
    messages, trimmed = without_leading_replies(formatted)
    replies = [str(message["content"]) for message in messages if message["role"] == "assistant"]
    text = (len(replies), sum(not reply.strip() for reply in replies),
            markers.special_in(str(value) for message in messages for key, value in message.items() if key != "role"))
    if not replies:
        return None, trimmed, text
    assert template is not None  # alpaca/chat always have one (see default_template)
    try:
        return template.render(messages, tokenizer), trimmed, text
    except (TemplateError, jinja2.TemplateError) as error:
        raise DataError(f"{where}: template {template.name!r} cannot render this row: {error}") from None


def _encode(
    tokenizer: PreTrainedTokenizerBase,
    rendered: list[list[Segment]],
    *,
    add_special_tokens: bool,
    train_on_inputs: bool,
    markers: _Markers,
) -> list[tuple[list[int], np.ndarray, np.ndarray, BoundaryToken | None]]:
    """Tokenize each example's joined text; a token is trained when its last character is trained.

    Returns every token id (as a list and an array), the labels of every token, and the first token that spans
    trained and untrained text (None when there is none).
    """
    if not rendered:
        return []
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"tokenizer {tokenizer.name_or_path!r} is a slow (Python) tokenizer; label masks need the "
            "character offsets of a fast tokenizer (load it with use_fast=True)"
        )
    texts = ["".join(text for text, _ in segments) for segments in rendered]
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    examples = []
    for text, segments, ids, offsets in zip(
        texts, rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        ids_array = np.asarray(ids, dtype=np.int64)
        if train_on_inputs:
            examples.append((ids, ids_array, ids_array, None))
            continue
        bounds = np.cumsum([0] + [len(text) for text, _ in segments])
        trained = np.array([flag for _, flag in segments] + [False], dtype=bool)  # + a guard for no segments
        spans = np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets))
        spans = spans.reshape(-1, 2)
        last_char = spans[:, 1] - 1
        segment = np.searchsorted(bounds, last_char, side="right") - 1  # -1 for tokens without text (a BOS)
        is_trained = (last_char >= 0) & trained[segment.clip(0, len(trained) - 1)]
        labels = np.where(is_trained, ids_array, IGNORE_INDEX)
        boundary = _boundary_token(text, ids, spans, bounds, trained, is_trained, markers)
        examples.append((ids, ids_array, labels, boundary))
    return examples


def _boundary_token(
    text: str,
    ids: list[int],
    spans: np.ndarray,
    bounds: np.ndarray,
    trained: np.ndarray,
    is_trained: np.ndarray,
    markers: _Markers,
) -> BoundaryToken | None:
    """The first token whose characters are partly in trained and partly in untrained segments, if any.

    Such a token is where the labels change (trained from untrained or back): its neighbour on the other side
    lies wholly in text of the other kind. Only those positions are looked at. A token's characters are its
    offsets, extended back over whitespace its offsets leave out (byte-level BPE with `trim_offsets` reports
    ` Paris` as `Paris`) when the token, decoded alone, holds that whitespace.
    """
    changes = np.flatnonzero(is_trained[1:] != is_trained[:-1]) + 1
    if not len(changes):
        return None
    starts, ends = spans[changes, 0], spans[changes, 1]
    # segment indices run from -1 to len(segments): both ends land on `trained`'s untrained guard entry
    first_segment = np.searchsorted(bounds, starts, side="right") - 1
    end_segment = np.searchsorted(bounds, ends - 1, side="right") - 1
    before_segment = np.searchsorted(bounds, starts - 1, side="right") - 1
    has_text = ends > starts
    mixed = has_text & (trained[first_segment] != trained[end_segment])
    gap = has_text & (starts > spans[changes - 1, 1]) & (trained[before_segment] != trained[first_segment])
    for index in np.flatnonzero(mixed | gap):
        position, start, end = int(changes[index]), int(starts[index]), int(ends[index])
        if not mixed[index]:  # whitespace before the token, outside every token's offsets: is it the token's?
            piece = markers.piece(ids[position])
            extra = len(piece) - (end - start)
            if not (extra > 0 and piece.endswith(text[start:end]) and text[start - extra : start] == piece[:extra]):
                continue
            start -= extra
        return BoundaryToken(position, ids[position], text[start:end], bool(is_trained[position]))
    return None


def _finish(
    ids: list[int],
    ids_array: np.ndarray,
    labels: np.ndarray,
    max_seq_length: int,
    markers: _Markers,
    *,
    rendered: bool,
    trimmed: bool = False,
    boundary: BoundaryToken | None = None,
) -> _Outcome:
    """Truncate to `max_seq_length`; drop when no token after the first is trained (the first never is).

    Also records what the audit checks: lengths and trained tokens before and after truncation, whether a
    reply's end-of-turn token is left untrained (or, for rendered rows, no trained token ends a turn), and
    whether the row starts with two BOS tokens.
    """
    is_trained = labels != IGNORE_INDEX
    response = int(is_trained[1:].sum())
    kept = int(is_trained[1:max_seq_length].sum())
    is_end = np.zeros(len(ids), dtype=bool)
    for end_id in markers.end_ids:  # one or two ids: faster than np.isin
        is_end |= ids_array == end_id
    untrained_end = bool((is_trained[:-1] & ~is_trained[1:] & is_end[1:]).any()) or (
        rendered and response > 0 and not bool((is_trained & is_end).any())
    )
    facts = {
        "truncated": len(ids) > max_seq_length,
        "trimmed": trimmed,
        "length": len(ids),
        "response": response,
        "trained": kept,
        "untrained_end": untrained_end,
        "double_bos": markers.bos_id is not None and len(ids) > 1 and ids[0] == ids[1] == markers.bos_id,
        "boundary": boundary,
    }
    if kept == 0:
        return _Outcome([], [], dropped="nothing_to_train", **facts)
    return _Outcome(ids[:max_seq_length], labels[:max_seq_length].tolist(), **facts)


def _summary(counts: Counter[str], max_seq_length: int) -> str:
    """One sentence about dropped, truncated and trimmed examples ("" when there is nothing to say)."""
    parts = []
    reasons = []
    if counts["no_reply"]:
        reasons.append(f"{counts['no_reply']} conversations with no assistant reply")
    if counts["nothing_to_train"]:
        reasons.append(
            f"{counts['nothing_to_train']} with no trained token within max_seq_length={max_seq_length}"
        )
    if reasons:
        dropped = counts["no_reply"] + counts["nothing_to_train"]
        parts.append(f"dropped {dropped} of {counts['rows']} examples ({'; '.join(reasons)})")
    if counts["truncated"]:
        parts.append(f"truncated {counts['truncated']} examples to max_seq_length={max_seq_length} tokens")
    if counts["trimmed"]:
        parts.append(
            f"left out the opening assistant message of {counts['trimmed']} conversations "
            "(it came before any user message, so nothing prompted it)"
        )
    return "; ".join(parts)


def tokenized_source(
    config: SFTConfig,
    tokenizer: PreTrainedTokenizerBase,
    path: str,
    split: str | Sequence[str],
    entry: DatasetSource | None = None,
    index: int | None = None,
) -> TokenizedDataset:
    """One source tokenized with `config`'s settings (an `entry` of `datasets:` brings its own format and
    columns), through the tokenized-data cache."""
    data_format = entry.format if entry is not None and entry.format else config.dataset_format
    if data_format != config.dataset_format:
        config = config.model_copy(update={"dataset_format": data_format,
                                           "template_name": None if data_format == "completion"
                                           else config.template_name})
    columns = dict(entry.columns) if entry is not None else {}
    label = f"datasets[{index}] ({path})" if index is not None else path

    def build() -> TokenizedDataset:
        rows, lines = load_rows_and_lines(path, split)
        if entry is not None:
            rows = map_columns(rows, columns, data_format, config.dataset_text_field, label)
        return prepare_dataset(rows, config, tokenizer, source=path, line_numbers=lines)

    if not config.cache_tokenized:
        return build()
    template = resolve_template(config, tokenizer)
    file = Path(path).expanduser()
    content = token_cache.file_digest(file) if file.is_file() else load_rows(path, split)._fingerprint
    parts = {
        "content": content,
        "split": split if isinstance(split, str) else list(split),
        "tokenizer": token_cache.tokenizer_fingerprint(tokenizer),
        "template": token_cache.template_fingerprint(template),
        "format": data_format,
        "max_seq_length": config.max_seq_length,
        "train_on_inputs": config.train_on_inputs,
        "text_field": config.dataset_text_field,
        "columns": columns,
        "source": path,  # names the source in error messages and warnings
    }
    return token_cache.cached(parts, build, name=label)
