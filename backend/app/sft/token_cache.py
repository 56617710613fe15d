"""A disk cache of tokenized datasets, so a second `validate`/`preview`/`train` of the same data skips tokenizing.

An entry lives in `$LLM_PLAYGROUND_CACHE/tokenized/<key>/` (default root `~/.cache/llm-playground`). Its key
hashes everything that changes the tokens: the data's content (the file's bytes; for a folder or Hub dataset
the fingerprint `datasets` gives the loaded rows), the tokenizer (its serialized vocabulary, merges,
normalizer and post-processor, special tokens and chat template), the template (its name and code), the
format, `max_seq_length`, `train_on_inputs`, the text field, the split, the column mapping, and the source
code of the modules that tokenize. The full key is stored in the entry and compared on load, so an entry is
never used for a different key; an unreadable entry is rebuilt with a warning.

The whole `TokenizedDataset` is stored, whatever per-example columns it carries: per-example lists of numbers
as flat numpy arrays with offsets (`arrays.npz`, loaded without pickle), everything else as JSON (`meta.json`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from app.sft.atomic import atomic_directory
from app.sft.errors import DataWarning
from app.sft.paths import cache_root
from app.sft.tokenized import DataFacts, TokenizedDataset

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3
"""Bumped when the layout of an entry changes."""
_META_FILE, _ARRAYS_FILE = "meta.json", "arrays.npz"


class CacheWarning(UserWarning):
    """A cache entry could not be read and was rebuilt."""


def tokenized_cache_dir() -> Path:
    """`$LLM_PLAYGROUND_CACHE/tokenized` (default `~/.cache/llm-playground/tokenized`)."""
    return cache_root() / "tokenized"


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything in `tokenizer` that decides token ids (a fast tokenizer's full serialization)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "class": type(tokenizer).__name__,
        "backend": backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())),
        "special": {key: str(value) for key, value in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos": tokenizer.eos_token,
        "bos": tokenizer.bos_token,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def template_fingerprint(template: Any) -> str:
    """A hash of a prompt template: its name, its class and the class's code (None: plain text)."""
    if template is None:
        return "none"
    try:
        code = inspect.getsource(type(template))
    except (OSError, TypeError):  # defined interactively: its repr has to do
        code = repr(template)
    return hashlib.sha256(f"{template.name}|{type(template).__qualname__}|{code}".encode()).hexdigest()


def _tokenizing_sources() -> list[Path]:
    """The modules that turn rows into tokens, beside this one: every module of the `data` package (sorted),
    `templates.py` and `tokenized.py`. Hashed by path: importing them here would make the cache depend on the
    data pipeline that uses it."""
    here = Path(__file__).parent
    return [*sorted((here / "data").glob("*.py")), here / "templates.py", here / "tokenized.py"]


def code_fingerprint() -> str:
    """A hash of the source of the modules that turn rows into tokens (a code change invalidates entries)."""
    digest = hashlib.sha256(str(FORMAT_VERSION).encode())
    for path in _tokenizing_sources():
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(parts: Mapping[str, Any]) -> str:
    """The entry name for `parts` (a JSON-serialisable description of everything that changes the tokens)."""
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True, default=str).encode()).hexdigest()[:32]


def cached(parts: Mapping[str, Any], build: Callable[[], Any], *, name: str = "data") -> Any:
    """The `TokenizedDataset` stored under `parts`, or `build()`'s result, stored for next time.

    Warnings `build` emits (dropped or truncated examples) are stored with the entry and emitted again on a
    hit, so a cached run says the same. An entry that cannot be read is rebuilt with a `CacheWarning`.
    """
    parts = {"code": code_fingerprint(), **parts}
    key = cache_key(parts)
    directory = tokenized_cache_dir() / key
    if directory.is_dir():
        try:
            dataset, messages = _read(directory, parts)
        except Exception as error:  # any damage at all: never trust the entry
            warnings.warn(f"the tokenized-data cache {directory} is unreadable ({type(error).__name__}: "
                          f"{error}); tokenizing {name} again", CacheWarning, stacklevel=2)
        else:
            logger.info("Tokenized %s: %s examples from the cache (%s)", name, f"{len(dataset):,}", directory)
            for message in messages:
                warnings.warn(message, DataWarning, stacklevel=2)
            return dataset
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = build()
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    messages = [str(warning.message) for warning in caught if issubclass(warning.category, DataWarning)]
    try:
        _write(directory, parts, dataset, messages)
    except (OSError, TypeError, ValueError) as error:  # a full disk or an unusual column: run without it
        logger.warning("Could not store tokenized %s in the cache (%s); continuing without it", name, error)
    return dataset


def _write(directory: Path, parts: Mapping[str, Any], dataset: Any, messages: list[str]) -> None:
    """Store `dataset` in `directory`, atomically (a temporary folder renamed into place)."""
    arrays: dict[str, np.ndarray] = {}
    columns: dict[str, str] = {}
    scalars: dict[str, Any] = {}
    facts: dict[str, Any] = {}
    for attribute, value in vars(dataset).items():
        if isinstance(value, list) and value and all(isinstance(item, list) for item in value):
            flat = [x for item in value for x in item]
            arrays[f"{attribute}.values"] = np.asarray(flat) if flat else np.zeros(0, dtype=np.int64)
            arrays[f"{attribute}.offsets"] = np.cumsum([0] + [len(item) for item in value], dtype=np.int64)
            columns[attribute] = "ragged"
        elif isinstance(value, list) and all(isinstance(item, (int, float, bool)) for item in value):
            arrays[f"{attribute}.values"] = np.asarray(value)
            columns[attribute] = "flat"
        elif hasattr(value, "to_json"):  # the audit's DataFacts
            facts[attribute] = value.to_json()
        else:
            json.dumps(value)  # raises TypeError for anything JSON cannot hold: not cached then
            scalars[attribute] = value
    for name, array in arrays.items():
        if array.dtype == object:
            raise TypeError(f"column {name} mixes types")
        if array.dtype == np.int64 and array.size and -(2**31) <= array.min() and array.max() < 2**31:
            arrays[name] = array.astype(np.int32)  # token ids fit: half the disk and the read time
    meta = {"version": FORMAT_VERSION, "parts": dict(parts), "class": type(dataset).__qualname__,
            "columns": columns, "scalars": scalars, "facts": facts, "warnings": messages}
    # shared: a concurrent run that stores the same entry first is fine; a corrupt entry being rebuilt is replaced
    with atomic_directory(directory, shared=True) as tmp:
        with (tmp / _ARRAYS_FILE).open("wb") as file:
            np.savez(file, **arrays)
        (tmp / _META_FILE).write_text(json.dumps(meta, default=str), encoding="utf-8")


def _read(directory: Path, parts: Mapping[str, Any]) -> tuple[Any, list[str]]:
    """The dataset stored in `directory` and its warnings; raises on any mismatch or damage."""
    meta = json.loads((directory / _META_FILE).read_text(encoding="utf-8"))
    expected = json.loads(json.dumps(dict(parts), default=str))
    if meta.get("version") != FORMAT_VERSION or meta.get("parts") != expected:
        raise ValueError("the entry was written for a different key")
    if meta.get("class") != TokenizedDataset.__qualname__:
        raise ValueError(f"the entry holds a {meta.get('class')}, not a TokenizedDataset")
    dataset = TokenizedDataset.__new__(TokenizedDataset)
    with np.load(directory / _ARRAYS_FILE, allow_pickle=False) as arrays:
        for attribute, kind in meta["columns"].items():
            values = arrays[f"{attribute}.values"]
            if kind == "flat":
                setattr(dataset, attribute, values.tolist())
                continue
            offsets = arrays[f"{attribute}.offsets"]
            if offsets[0] != 0 or offsets[-1] != len(values) or np.any(np.diff(offsets) < 0):
                raise ValueError(f"column {attribute!r} is damaged")
            flat = values.tolist()
            setattr(dataset, attribute, [flat[start:end] for start, end in zip(offsets[:-1], offsets[1:], strict=True)])
    for attribute, value in meta["scalars"].items():
        setattr(dataset, attribute, value)
    for attribute, value in meta.get("facts", {}).items():
        setattr(dataset, attribute, DataFacts.from_json(value))
    sizes = {len(value) for value in vars(dataset).values() if isinstance(value, list)}
    if len(sizes) > 1:
        raise ValueError(f"columns of different lengths {sorted(sizes)}")
    return dataset, list(meta.get("warnings", []))
