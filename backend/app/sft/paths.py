"""Where the library keeps files of its own outside runs: one cache root for converted models, tokenized data and
the precision measurements."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "LLM_PLAYGROUND_CACHE"
"""The environment variable that moves the cache root."""


def cache_root() -> Path:
    """The library's user cache folder: `$LLM_PLAYGROUND_CACHE`, default `~/.cache/llm-playground`."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "llm-playground").expanduser()
