"""Visible progress for the slow steps outside the training loop (GGUF conversion, model loading,
tokenizing, evaluation, generation, merging).

    with phase("Tokenizing train.jsonl", total=len(rows), unit="rows") as progress:
        for chunk in chunks:
            ...
            progress.update(len(chunk))

On a terminal a phase with a `total` shows a tqdm bar (rate and ETA); every phase ends with one INFO log line
naming it and its duration (and its rate when it counted something), so logs and CI output show where the time
went. Set `LLM_PLAYGROUND_NO_PROGRESS=1` to hide the bars (the log lines stay).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger("app.sft.progress")

NO_PROGRESS_ENV_VAR = "LLM_PLAYGROUND_NO_PROGRESS"


class Phase:
    """A running phase: count its work with `update(n)`; `count` and `elapsed` read back what was done."""

    def __init__(self, name: str, total: int | None, unit: str, bar: Any) -> None:
        self.name = name
        self.total = total
        self.unit = unit
        self.count = 0
        self._bar = bar
        self._started = time.perf_counter()

    def update(self, n: int = 1) -> None:
        """Add `n` units of work done."""
        self.count += n
        if self._bar is not None:
            self._bar.update(n)

    @property
    def elapsed(self) -> float:
        """Seconds since the phase started."""
        return time.perf_counter() - self._started


def bars_enabled() -> bool:
    """Whether progress bars are drawn: stderr is a terminal and `LLM_PLAYGROUND_NO_PROGRESS` is not set."""
    return sys.stderr.isatty() and not os.environ.get(NO_PROGRESS_ENV_VAR)


@contextmanager
def phase(name: str, *, total: int | None = None, unit: str = "it") -> Iterator[Phase]:
    """Run a named phase: a tqdm bar on a terminal when `total` is known, then one log line with the duration.

    The log line is written only when the phase finishes without an error (an error explains itself).
    """
    bar = None
    if total is not None and bars_enabled():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=name, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
    progress = Phase(name, total, unit, bar)
    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()
    elapsed = progress.elapsed
    if progress.count:
        rate = progress.count / elapsed if elapsed > 0 else float("inf")
        logger.info("%s: %s %s in %.1f s (%.0f %s/s)", name, f"{progress.count:,}", unit, elapsed, rate, unit)
    else:
        logger.info("%s: done in %.1f s", name, elapsed)
