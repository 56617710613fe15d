"""Fixtures shared by every test file. The builders behind them live in `tests/helpers.py`.

- `tiny_tokenizer`: a fresh word-level tokenizer with ChatML specials and a chat template.
- `tiny_llama`: a factory, `tiny_llama(seed=0, **config_overrides)`, for a fresh random 2-layer Llama.
- `tiny_model_dir`: a session-wide Hugging Face model folder (tiny Llama + tokenizer); treat it as read-only.
- `write_jsonl`: `write_jsonl(rows, name="data.jsonl")` writes rows under the test's `tmp_path`.
- `wandb_offline`: the real `wandb` package in offline, silent mode, all its files under `tmp_path`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import helpers  # noqa: E402


@pytest.fixture
def tiny_tokenizer():
    """A new tiny tokenizer (cheap to build, so each test may modify its own)."""
    return helpers.build_tiny_tokenizer()


@pytest.fixture
def tiny_llama() -> Callable[..., Any]:
    """The `helpers.tiny_llama` factory: call it for a fresh, seeded random Llama."""
    return helpers.tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face model folder (config, safetensors weights, tokenizer) shared by the whole session."""
    return helpers.save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """A function `write_jsonl(rows, name="data.jsonl") -> Path` that writes JSON lines into `tmp_path`."""

    def write(rows: Iterable[Mapping[str, Any]], name: str = "data.jsonl") -> Path:
        return helpers.write_jsonl(tmp_path / name, rows)

    return write


@pytest.fixture
def wandb_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """Make the real `wandb` run offline and silently in `tmp_path`; yields the `WANDB_DIR`.

    wandb reads its environment once per process and caches it, so this fixture resets wandb
    (`wandb.teardown()`) before and after the test. Read the finished runs back with
    `helpers.read_wandb_runs(wandb_dir)`.
    """
    import wandb

    wandb_dir = tmp_path / "wandb_home"
    for name, sub in (
        ("WANDB_DIR", ""),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        (wandb_dir / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(name, str(wandb_dir / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))
    wandb.teardown()
    yield wandb_dir
    wandb.teardown()


@pytest.fixture(autouse=True)
def _tokenized_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the tokenized-data cache of in-process tests out of the user's home (one folder per session)."""
    from app.sft import token_cache

    directory = tmp_path_factory.getbasetemp() / "tokenized-cache"
    monkeypatch.setattr(token_cache, "tokenized_cache_dir", lambda: directory)
    return directory


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need CUDA: skipped (with the reason shown) on machines without it, such as CI."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
