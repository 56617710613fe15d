"""Loading: a file, a `save_to_disk` directory or a Hub id becomes a `datasets.Dataset` (`load_rows`), and a
source's columns are renamed to the fields its format reads (`map_columns`). Problems name the file and line."""

from __future__ import annotations

import csv
import io
import json
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from app.sft.config import FORMAT_COLUMNS
from app.sft.errors import DataError, DataWarning

EVAL_SPLITS = ("validation", "test")
"""Splits tried, in order, for `eval_dataset_name` when it is a Hub dataset or a saved `DatasetDict`."""


def load_rows(source: str, split: str | Sequence[str] = "train") -> datasets.Dataset:
    """The rows of a local file, a `save_to_disk` directory or a Hub dataset.

    `split` picks the split of a Hub dataset or a saved `DatasetDict` (a sequence: the first that exists);
    a file is a single split. Raises `DataError` for a missing file, malformed content or no rows.
    """
    return load_rows_and_lines(source, split)[0]


def load_rows_and_lines(
    source: str, split: str | Sequence[str]
) -> tuple[datasets.Dataset, list[int] | None]:
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
    """The file as UTF-8 text, without the byte order mark that Windows editors and Excel put first."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
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
        repeated = sorted({name for name in reader.fieldnames or [] if reader.fieldnames.count(name) > 1})
        if repeated:
            raise DataError(f"{path}:1: the header names column {', '.join(map(repr, repeated))} more than once; "
                            "rename one (only one column's cells could be read)")
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
            _refuse_one_object(path, text)
            raise DataError(f"{path}:{number}: invalid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
        lines.append(number)
    return records, lines


def _refuse_one_object(path: Path, text: str) -> None:
    """Raise a `DataError` saying so when `text` is one JSON object written over several lines (as for
    `datasets.load_dataset("json", field=...)`), not records."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return
    if isinstance(whole, dict):
        lists = [key for key, value in whole.items() if isinstance(value, list)]
        held = f"; its {lists[0]!r} holds a list: save that list as the file" if lists else ""
        raise DataError(f"{path}: one JSON object over several lines, not records; expected a JSON array of "
                        f"records ([{{...}}, ...]) or one record per line (JSON lines){held}")


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
    if records and not columns:
        raise DataError(f"{source}: its {len(records)} records are all empty objects ({{}}); no field to train on")
    table = {key: [record.get(key) for record in records] for key in columns}
    return _via_datasets(source, lambda: datasets.Dataset.from_dict(table, on_mixed_types="use_json"))


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
