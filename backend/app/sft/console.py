"""What the `sft` command prints to a terminal besides its answers: its logging set-up (this package's INFO lines
on the main process), Python warnings as log lines, data statistics and a text histogram of lengths."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch stays unimported until a command needs it (a fast `sft --help`)
    from app.sft.tokenized import TokenizedDataset

_LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def print_data_stats(name: str, source: str | None, data: TokenizedDataset) -> None:
    """One line: how many examples and tokens `data` (from `source`) holds, dropped, truncated, trained."""
    from app.sft.loss import IGNORE_INDEX

    trained = sum(sum(label != IGNORE_INDEX for label in labels) for labels in data.labels)
    total = sum(data.lengths)
    print(f"{name}: {len(data)} examples from {source}; {data.num_dropped} dropped, "
          f"{data.num_truncated} truncated; {trained:,} of {total:,} tokens trained")


def histogram(lengths: Sequence[int], bins: int = 8, width: int = 40) -> list[str]:
    """Text histogram lines: `  lo-hi | ####  count`, plus the min/median/max line."""
    low, high = min(lengths), max(lengths)
    step = max(1, math.ceil((high - low + 1) / bins))
    counts = [0] * math.ceil((high - low + 1) / step)
    for length in lengths:
        counts[(length - low) // step] += 1
    digits = len(str(high))
    lines = [
        f"{low + i * step:>{digits}}-{min(low + (i + 1) * step - 1, high):>{digits}} | "
        f"{'#' * math.ceil(width * count / max(counts)):<{width}} {count}"
        for i, count in enumerate(counts)
    ]
    lines.append(f"min {low}, median {statistics.median(lengths):g}, max {high} tokens")
    return lines


def is_main_process() -> bool:
    """RANK 0, or no launcher at all (`accelerate launch` and `torchrun` set RANK)."""
    return os.environ.get("RANK", "0") == "0"


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever `sys.stderr` is when a record is emitted (tests swap it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


@contextlib.contextmanager
def console_logging(debug: bool) -> Iterator[None]:
    """INFO (DEBUG with --debug) from this package to stderr on the main process, WARNING elsewhere and from
    other libraries; restored afterwards."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt="%H:%M:%S"))
    root, package = logging.getLogger(), logging.getLogger("app")
    saved = root.level, package.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    package.setLevel(logging.DEBUG if debug else logging.INFO if is_main_process() else logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        package.setLevel(saved[1])


def log_warning(message: Warning | str, *_args: Any, **_kwargs: Any) -> None:
    """Show Python warnings (config fallbacks, dropped examples) as one log line each."""
    logging.getLogger("app.sft").warning("%s", message)
