"""Training data: load rows, turn them into conversations, tokenize them with label masks, batch them.

The pipeline, one function per step:

1. `load_rows`: a `.jsonl`/`.json`/`.csv`/`.parquet` file, a `datasets.save_to_disk` directory or a Hub id
   becomes a `datasets.Dataset`. Problems name the file and line.
2. `format_row`: an alpaca, chat (OpenAI `messages` or ShareGPT `conversations`) or completion row becomes
   a list of messages (or the plain text of a completion row).
3. `tokenize_dataset`: a prompt template renders each conversation into `(text, trainable)` segments; the
   joined text is tokenized once and a token is trained when it ends inside a trainable segment. Labels are
   -100 elsewhere. Examples are truncated to `max_seq_length`; those left with nothing to train on are
   dropped and counted in one warning.
4. `epoch_batches` plans each epoch's micro-batches deterministically from the seed; `PaddedCollator` and
   `PackedCollator` (padding-free) turn a micro-batch into tensors.

`build_datasets` runs steps 1-3 for a config: one `dataset_name`, or several `datasets:` sources (each with its
own format, split, column mapping and mixing weight), each tokenized source kept in the tokenized-data cache
(`token_cache`) unless `cache_tokenized` is false.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
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

from app.sft.config import FORMAT_COLUMNS, DatasetSource, SFTConfig
from app.sft.errors import ConfigError, DataError, DataWarning
from app.sft.loss import IGNORE_INDEX
from app.sft.progress import phase
from app.sft.templates import (
    Message,
    PromptTemplate,
    Segment,
    TemplateError,
    TokenizerChatTemplate,
    default_registry,
)
from app.sft.tokenized import BoundaryToken, DataFacts, TokenizedDataset

"""The label of a token the loss ignores."""

EVAL_SPLITS = ("validation", "test")
"""Splits tried, in order, for `eval_dataset_name` when it is a Hub dataset or a saved `DatasetDict`."""

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}
CHAT_ROLES = ("system", "user", "assistant")
"""The roles a chat row's messages may have (ShareGPT speakers are mapped to these)."""
_ENCODE_CHUNK = 512  # texts tokenized per call to the fast tokenizer


# ---------------------------------------------------------------------------------------------- loading


def load_rows(source: str, split: str | Sequence[str] = "train") -> datasets.Dataset:
    """The rows of a local file, a `save_to_disk` directory or a Hub dataset.

    `split` picks the split of a Hub dataset or a saved `DatasetDict` (a sequence: the first that exists);
    a file is a single split. Raises `DataError` for a missing file, malformed content or no rows.
    """
    return _load(source, split)[0]


def _load(source: str, split: str | Sequence[str]) -> tuple[datasets.Dataset, list[int] | None]:
    """The rows, and for JSON/JSONL files the line each row starts on (to name it in errors)."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    lines: list[int] | None = None
    if path.is_dir():
        rows = _load_directory(path, split)
    elif suffix in (".jsonl", ".json", ".csv", ".parquet"):
        if not path.is_file():
            raise DataError(f"Dataset file not found: {path}")
        if suffix == ".parquet":
            rows = _via_datasets(source, lambda: datasets.Dataset.from_parquet(str(path)))
        else:
            records, lines = _read_csv(path) if suffix == ".csv" else _read_json_records(path)
            rows = _records_to_dataset(records, source)
    elif path.exists():
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; use .jsonl, .json, .csv or .parquet"
        )
    else:
        rows = _load_with_datasets(source, split)
    if len(rows) == 0:
        raise DataError(f"{source}: the dataset is empty (no rows)")
    return rows, lines


def _via_datasets(source: str, load: Callable[[], datasets.Dataset]) -> datasets.Dataset:
    """Run a `datasets` loader, reporting its failure as a `DataError` naming `source`."""
    try:
        return load()
    except DataError:
        raise
    except Exception as error:  # datasets/pyarrow/pandas raise many kinds; the cause stays chained
        raise DataError(f"{source}: could not load the dataset: {error}") from error


def _load_directory(path: Path, split: str | Sequence[str]) -> datasets.Dataset:
    """A `save_to_disk` directory, or else a folder of data files that `datasets.load_dataset` reads."""
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        return _load_with_datasets(str(path), split)
    return _pick_split(loaded, split, str(path))


def _load_with_datasets(source: str, split: str | Sequence[str]) -> datasets.Dataset:
    """`datasets.load_dataset(source)`: a Hub id, or a local folder of data files."""
    if isinstance(split, str):
        return _via_datasets(source, lambda: datasets.load_dataset(source, split=split))
    return _via_datasets(source, lambda: _pick_split(datasets.load_dataset(source), split, source))


def _pick_split(
    loaded: datasets.Dataset | datasets.DatasetDict, split: str | Sequence[str], source: str
) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    candidates = [split] if isinstance(split, str) else list(split)
    for name in candidates:
        if name in loaded:
            return loaded[name]
    wanted = " or ".join(repr(name) for name in candidates)
    raise DataError(f"{source}: no split {wanted}; available splits: {', '.join(loaded)}")


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} at column {column}); save the file "
            "as UTF-8"
        ) from None


def _read_csv(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """CSV records (a header row, then one record per row; cells are strings) with the line each ends on."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    records, lines = [], []
    try:
        for record in reader:
            if None in record:  # DictReader's key for cells beyond the header
                raise DataError(f"{path}:{reader.line_num}: more cells than the header has columns")
            records.append(record)
            lines.append(reader.line_num)
    except csv.Error as error:
        raise DataError(f"{path}:{reader.line_num}: invalid CSV ({error})") from None
    return records, lines


def _read_json_records(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Records of a JSON array file (possibly cut off mid-record) or a JSON-lines file, with line numbers."""
    text = _read_text(path)
    start = len(text) - len(text.lstrip())
    if text.startswith("[", start):
        return _read_json_array(path, text, start + 1)
    return _read_json_lines(path, text)


def _read_json_lines(path: Path, text: str) -> tuple[list[dict[str, Any]], list[int]]:
    records, lines = [], []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: invalid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
        lines.append(number)
    return records, lines


_WHITESPACE = re.compile(r"\s*")


def _read_json_array(path: Path, text: str, pos: int) -> tuple[list[dict[str, Any]], list[int]]:
    """Decode a JSON array record by record, so that a file cut off mid-record keeps its complete records."""
    decoder = json.JSONDecoder()
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    line, line_pos = 1, 0  # the line number of offset `line_pos`, advanced as records are read
    while True:
        pos = _WHITESPACE.match(text, pos).end()
        line += text.count("\n", line_pos, pos)
        line_pos = pos
        if text.startswith("]", pos):
            if text[pos + 1 :].strip():
                raise DataError(f"{path}:{line}: unexpected data after the closing ']' of the JSON array")
            return records, lines
        if records and pos < len(text):
            if not text.startswith(",", pos):
                raise DataError(f"{path}:{line}: expected ',' or ']' after a record of the JSON array")
            pos = _WHITESPACE.match(text, pos + 1).end()
            line += text.count("\n", line_pos, pos)
            line_pos = pos
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            if pos < len(text) and not _is_cut_off(text, pos):
                raise DataError(
                    f"{path}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno})"
                ) from None
            ignored = len(text[pos:].encode("utf-8"))
            warnings.warn(
                f"{path}: the JSON array is cut off (the file looks truncated); kept {len(records)} complete "
                f"records and ignored the last {ignored} bytes",
                DataWarning,
                stacklevel=5,
            )
            return records, lines
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
        lines.append(line)
        pos = end


_JSON_STRUCTURE = re.compile(r'"(?:[^"\\]|\\.)*"|"|[\[\]{}]', re.DOTALL)


def _is_cut_off(text: str, pos: int) -> bool:
    """Whether the JSON object/array starting at `pos` is still open when the text ends."""
    depth = 0
    for match in _JSON_STRUCTURE.finditer(text, pos):
        token = match.group()
        if token == '"':  # a string with no closing quote
            return True
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
        if depth <= 0:
            return False
    return depth > 0


def _records_to_dataset(records: list[dict[str, Any]], source: str) -> datasets.Dataset:
    """A `datasets.Dataset` with the union of the records' keys (missing values are None)."""
    columns = list(dict.fromkeys(key for record in records for key in record))
    table = {key: [record.get(key) for record in records] for key in columns}
    return _via_datasets(source, lambda: datasets.Dataset.from_dict(table, on_mixed_types="use_json"))


# ---------------------------------------------------------------------------------------------- formatting


def format_row(
    row: Mapping[str, Any], dataset_format: str, *, text_field: str = "text", where: str = "row 1"
) -> list[Message] | str:
    """An alpaca or chat row as messages, or a completion row's text; `where` names the row in errors.

    Alpaca: `instruction`, optional `input`, `output` -> a user message (with `input`) and an assistant
    message. Chat: `messages: [{role, content}]`, or ShareGPT `conversations: [{from, value}]` with
    human/gpt/system mapped to user/assistant/system. Completion: the `text_field` string.
    """
    if dataset_format == "alpaca":
        instruction = _string_field(row, "instruction", where)
        extra = _string_field(row, "input", where, required=False)
        output = _string_field(row, "output", where)
        user: dict[str, str] = {"role": "user", "content": instruction}
        if extra:
            user["input"] = extra
        return [user, {"role": "assistant", "content": output}]
    if dataset_format == "chat":
        return _chat_messages(row, where)
    if dataset_format == "completion":
        return _string_field(row, text_field, where)
    raise ValueError(f"unknown dataset_format {dataset_format!r}; expected alpaca, chat or completion")


def _string_field(row: Mapping[str, Any], name: str, where: str, *, required: bool = True) -> str:
    value = row.get(name)
    if value is None:
        if required:
            present = ", ".join(repr(key) for key, item in row.items() if item is not None)
            raise DataError(f"{where}: missing field {name!r} (the row has {present or 'no fields'})")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _chat_messages(row: Mapping[str, Any], where: str) -> list[Message]:
    if row.get("messages") is not None:
        field, role_key, content_key, aliases = "messages", "role", "content", None
    elif row.get("conversations") is not None:
        field, role_key, content_key, aliases = "conversations", "from", "value", _SHAREGPT_ROLES
    else:
        raise DataError(f"{where}: missing field 'messages' (or ShareGPT's 'conversations')")
    turns = row[field]
    if not isinstance(turns, list):
        raise DataError(f"{where}: field {field!r} must be a list of messages, got {type(turns).__name__}")
    messages: list[Message] = []
    for index, turn in enumerate(turns):
        at = f"{where}: {field}[{index}]"
        if not isinstance(turn, Mapping):
            raise DataError(f"{at} must be an object with {role_key!r} and {content_key!r}")
        role, content = turn.get(role_key), turn.get(content_key)
        if not isinstance(role, str) or not role:
            raise DataError(f"{at}: field {role_key!r} is missing or not a string")
        if not isinstance(content, str):
            kind = "missing" if content is None else f"a {type(content).__name__}, not a string"
            raise DataError(f"{at}: field {content_key!r} is {kind}")
        if aliases is not None:
            if role.lower() not in aliases:
                raise DataError(
                    f"{at}: unknown speaker {role!r} in field 'from' (expected human, gpt or system)"
                )
            role = aliases[role.lower()]
        elif role not in CHAT_ROLES:
            raise DataError(
                f"{at}: unknown role {role!r} in field 'role' (accepted roles: {', '.join(CHAT_ROLES)})"
            )
        messages.append({"role": role, "content": content})
    return messages


def prompt_and_reference(
    row: Mapping[str, Any], dataset_format: str, *, text_field: str = "text", where: str = "row 1"
) -> tuple[list[Message] | str, str]:
    """What to ask and the answer to expect, for evaluation by generation; `where` names the row in errors.

    A row with `reference` gives its `prompt` (a user message, or plain text for `completion` runs) or its
    `messages` (the conversation so far). Otherwise an alpaca row's `output`, or a chat row's last assistant
    turn, is the reference, and everything before it the prompt (as `format_row` reads it for training).
    Completion rows (`text`) have no reference answer and are refused.
    """
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a mapping of fields, got {type(row).__name__}")
    if row.get("reference") is not None:
        reference = _string_field(row, "reference", where)
        if row.get("messages") is not None:
            if dataset_format == "completion":
                raise DataError(f"{where}: 'messages' need a chat or alpaca run; a completion run takes a 'prompt'")
            return _chat_messages(row, where), reference
        prompt = _string_field(row, "prompt", where)
        return (prompt if dataset_format == "completion" else [{"role": "user", "content": prompt}]), reference
    if dataset_format == "completion":
        raise DataError(
            f"{where}: completion rows ({text_field!r}) have no reference answer to compare with; give rows "
            "with 'prompt' and 'reference'"
        )
    formatted = format_row(row, dataset_format, where=where)
    assert not isinstance(formatted, str)  # alpaca and chat rows are conversations
    messages, _ = _without_leading_replies(formatted)
    last = max((i for i, message in enumerate(messages) if message["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise DataError(f"{where}: no assistant reply to compare with (or give 'prompt'/'messages' and 'reference')")
    return messages[:last], str(messages[last]["content"])


def _without_leading_replies(messages: list[Message]) -> tuple[list[Message], bool]:
    """Drop assistant messages that come before the first user message (nothing prompted them)."""
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    kept = [m for i, m in enumerate(messages) if i >= first_user or m["role"] != "assistant"]
    return kept, len(kept) != len(messages)


# ---------------------------------------------------------------------------------------------- templates


def default_template(dataset_format: str, tokenizer: PreTrainedTokenizerBase) -> PromptTemplate | None:
    """alpaca -> `alpaca`; chat -> the tokenizer's own chat template, else `chatml`; completion -> None."""
    if dataset_format == "completion":
        return None
    if dataset_format == "chat":
        return default_registry.get("tokenizer" if getattr(tokenizer, "chat_template", None) else "chatml")
    return default_registry.get("alpaca")


def resolve_template(config: SFTConfig, tokenizer: PreTrainedTokenizerBase) -> PromptTemplate | None:
    """The template `config.template_name` names, or the default for the data format (None: plain text)."""
    if config.template_name is None:
        return default_template(config.dataset_format, tokenizer)
    try:
        template = default_registry.get(config.template_name)
    except TemplateError as error:
        raise ConfigError(f"template_name: {error}") from None
    if isinstance(template, TokenizerChatTemplate) and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"template_name: 'tokenizer' needs a chat template; tokenizer {tokenizer.name_or_path!r} has none"
        )
    return template


# ---------------------------------------------------------------------------------------------- tokenizing


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
    messages, trimmed = _without_leading_replies(formatted)
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


# ---------------------------------------------------------------------------------------------- splits


_D = TypeVar("_D")


def split_train_val(dataset: _D, validation_split: float, seed: int) -> tuple[_D, _D | None]:
    """Split off a random `validation_split` fraction (at least one example) as validation data.

    Identical examples (the same tokens, or the same row) go to the same side, so copies in the data never
    leak into validation: groups of copies are taken in a seeded random order while they fit the fraction
    (without copies, exactly a seeded permutation's first examples). The same seed gives the same split; both
    parts keep the original order. Works on anything with `select` (`datasets.Dataset`, `TokenizedDataset`) or
    on a list. `validation_split` 0 returns `(dataset, None)`.
    """
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
    if validation_split == 0.0:
        return dataset, None
    total = len(dataset)  # type: ignore[arg-type]
    num_val = max(1, round(total * validation_split))
    if num_val >= total:
        raise DataError(
            f"validation_split={validation_split} of {total} examples leaves nothing to train on; "
            "add data or lower validation_split"
        )
    groups = _copies(dataset)
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    picked: list[int] = []
    for group in order:
        if len(picked) + len(groups[group]) <= num_val:
            picked += groups[group]
            if len(picked) == num_val:
                break
    if not picked:  # every group is larger than the fraction: the smallest one
        picked = min((groups[group] for group in order), key=len)
    if len(picked) == total:
        raise DataError(f"validation_split={validation_split}: every example is the same, so none can be held out "
                        "without training on it too; add data or set validation_split: 0")
    held = set(picked)
    return _subset(dataset, [i for i in range(total) if i not in held]), _subset(dataset, sorted(picked))


def _copies(dataset: Any) -> list[list[int]]:
    """The indices of `dataset` grouped by identical content (tokens of a `TokenizedDataset`, else the row),
    groups in the order of their first example."""
    if isinstance(dataset, TokenizedDataset):
        keys: Iterable[Any] = map(tuple, dataset.input_ids)
    else:
        keys = (json.dumps(dataset[i], sort_keys=True, default=str) for i in range(len(dataset)))
    groups: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def _subset(dataset: _D, indices: list[int]) -> _D:
    if hasattr(dataset, "select"):
        return dataset.select(indices)
    return [dataset[i] for i in indices]  # type: ignore[index, return-value]


def build_datasets(
    config: SFTConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Training and validation data as `config` describes them.

    Training data is `dataset_name`, or the `datasets:` sources mixed by weight. Validation data is
    `eval_dataset_name` when set, else a `validation_split` fraction of the tokenized training examples
    (deterministic for `seed`; for `datasets:`, of each source before weighting, so no example is in both),
    else None. Each tokenized source comes from the tokenized-data cache when `cache_tokenized` allows.
    """
    if config.dataset_name is None and not config.datasets:
        raise ConfigError(
            "dataset_name: required to load training data (or give the trainer a train_dataset)"
        )
    val: TokenizedDataset | None = None
    if config.datasets:
        train, val = _mixed_sources(config, tokenizer)
    else:
        train = _tokenized_source(config, tokenizer, config.dataset_name, config.dataset_split)
    if config.eval_dataset_name is not None:
        return train, _tokenized_source(config, tokenizer, config.eval_dataset_name, EVAL_SPLITS)
    if config.datasets:
        return train, val
    return split_train_val(train, config.validation_split, config.seed)


def _tokenized_source(
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
        rows, lines = _load(path, split)
        if entry is not None:
            rows = map_columns(rows, columns, data_format, config.dataset_text_field, label)
        return prepare_dataset(rows, config, tokenizer, source=path, line_numbers=lines)

    if not config.cache_tokenized:
        return build()
    from app.sft import token_cache

    template = resolve_template(config, tokenizer)
    file = Path(path).expanduser()
    content = token_cache.file_digest(file) if file.is_file() else _load(path, split)[0]._fingerprint
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


def map_columns(
    rows: datasets.Dataset, columns: Mapping[str, str], data_format: str, text_field: str = "text",
    label: str = "dataset",
) -> datasets.Dataset:
    """Rename a source's columns to the fields its format reads (`columns`: our field -> its column), and
    check that the fields the format needs are there; errors name the entry and list the columns it has."""
    have = ", ".join(rows.column_names)
    missing = {ours: theirs for ours, theirs in columns.items() if theirs not in rows.column_names}
    if missing:
        ours, theirs = next(iter(missing.items()))
        raise DataError(f"{label}: no column {theirs!r} (mapped to {ours} in columns); its columns are: {have}")
    renames = {theirs: ours for ours, theirs in columns.items() if theirs != ours}
    replaced = [name for name in renames.values() if name in rows.column_names and name not in renames]
    rows = rows.remove_columns(replaced).rename_columns(renames) if renames else rows
    needed = {"alpaca": [("instruction",), ("output",)], "chat": [FORMAT_COLUMNS["chat"]],
              "completion": [(text_field,)]}[data_format]
    for alternatives in needed:
        if not any(name in rows.column_names for name in alternatives):
            wanted = " or ".join(repr(name) for name in alternatives)
            raise DataError(f"{label}: no column {wanted} for {data_format} rows; its columns are: {have} "
                            f"(map one with columns: {{{alternatives[0]}: COLUMN}})")
    return rows


def _mixed_sources(
    config: SFTConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """The `datasets:` sources tokenized, split (when validation comes from the training data) and mixed:
    each source's training part repeated or subsampled by its weight (seeded), then concatenated in order."""
    trains, vals = [], []
    for index, entry in enumerate(config.datasets):
        data = _tokenized_source(config, tokenizer, entry.path, entry.split, entry, index)
        val = None
        if config.eval_dataset_name is None:
            data, val = split_train_val(data, config.validation_split, config.seed + index)
        trains.append(data.select(_weighted_indices(len(data), entry.weight, config.seed + index)))
        if val is not None:
            vals.append(val)
    return _concatenate(trains), _concatenate(vals) if vals else None


def _weighted_indices(count: int, weight: float, seed: int) -> list[int]:
    """Indices for `weight` passes over `count` examples: every index `int(weight)` times, then a seeded random
    `weight % 1` fraction of them once more (in order); at least one example."""
    whole = int(weight)
    extra = round((weight - whole) * count)
    indices = list(range(count)) * whole
    if extra:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
        indices += sorted(order[:extra])
    return indices or [0]


def _concatenate(parts: list[TokenizedDataset]) -> TokenizedDataset:
    """One dataset holding `parts` in order: every per-example list is joined, the counters are summed."""
    if len(parts) == 1:
        return parts[0]
    joined = TokenizedDataset.__new__(TokenizedDataset)
    for name, first in vars(parts[0]).items():
        values = [vars(part)[name] for part in parts]
        if isinstance(first, list):
            setattr(joined, name, [item for value in values for item in value])
        elif isinstance(first, int) and not isinstance(first, bool):
            setattr(joined, name, sum(values))
        else:
            setattr(joined, name, first)
    return joined


# ---------------------------------------------------------------------------------------------- batching


def epoch_batches(
    lengths: Sequence[int],
    *,
    batch_size: int,
    epoch: int,
    seed: int,
    shuffle: bool = True,
    token_budget: int | None = None,
    drop_last: bool = False,
) -> list[list[int]]:
    """The micro-batches (lists of example indices) of one epoch; the same arguments give the same plan.

    The order is a permutation from `torch.Generator().manual_seed(seed + epoch)` (or the dataset order
    when `shuffle` is False). Without `token_budget`: consecutive groups of `batch_size` (`drop_last` drops
    a short last group). With `token_budget` (packing): examples in that order fill each micro-batch up to
    `token_budget` tokens in total; an example longer than the budget gets a micro-batch of its own.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if token_budget is not None and token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if token_budget is not None and drop_last:
        raise ValueError("drop_last applies to fixed-size batches, not to token_budget packing")
    count = len(lengths)
    if shuffle:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = list(range(count))
    if token_budget is None:
        batches = [order[i : i + batch_size] for i in range(0, count, batch_size)]
        if drop_last and batches and len(batches[-1]) < batch_size:
            batches.pop()
        return batches
    batches, current, used = [], [], 0
    for index in order:
        if current and used + lengths[index] > token_budget:
            batches.append(current)
            current, used = [], 0
        current.append(index)
        used += lengths[index]
    if current:
        batches.append(current)
    return batches


def _ids(value: Any) -> list[int]:
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


class PaddedCollator:
    """Examples -> right-padded `input_ids`, `attention_mask` and `labels` (-100 on padding) LongTensors."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        ids = [_ids(example["input_ids"]) for example in examples]
        labels = [_ids(example.get("labels", ids[i])) for i, example in enumerate(examples)]
        width = max(len(row) for row in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(ids), width), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(ids), width), dtype=torch.long),
            "labels": torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long),
        }
        for row, (row_ids, row_labels) in enumerate(zip(ids, labels, strict=True)):
            mask = examples[row].get("attention_mask")  # a tokenized example may bring its own (0 = padding)
            batch["input_ids"][row, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
            batch["attention_mask"][row, : len(row_ids)] = 1 if mask is None else torch.tensor(_ids(mask))
            batch["labels"][row, : len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
        batch["labels"][batch["attention_mask"] == 0] = IGNORE_INDEX  # padding is never a label
        return batch


class PackedCollator:
    """Examples -> ONE unpadded row: `input_ids`, `position_ids` and `labels` of shape [1, T], plus where the
    examples start.

    Positions restart at 0 for each example and its first token's label is -100, so no example is trained
    to predict across a boundary; attention is kept within each example (`attention.document_causal_sdpa`).
    There is no `attention_mask`. The examples' cumulative offsets `cu_seq_lens_q`/`cu_seq_lens_k` (int32,
    [examples + 1]) and the longest example `max_length_q`/`max_length_k` (an int) are computed here, on the
    host, under the names transformers' flash-attention kwargs use, so the GPU never has to be asked for them.
    """

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        ids, positions, labels, offsets = [], [], [], [0]
        for example in examples:
            example_ids = _ids(example["input_ids"])
            if not example_ids:
                raise ValueError("cannot pack an empty example")
            example_labels = _ids(example.get("labels", example_ids))
            ids += example_ids
            positions += range(len(example_ids))
            labels += [IGNORE_INDEX, *example_labels[1:]]
            offsets.append(len(ids))
        cu_seq_lens = torch.tensor(offsets, dtype=torch.int32)
        longest = max(end - start for start, end in itertools.pairwise(offsets))
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": longest,
            "max_length_k": longest,
        }
