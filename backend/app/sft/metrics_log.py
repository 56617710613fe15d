"""The run's metrics log, `output_dir/metrics.jsonl`: one JSON object per line, the source of truth for plots.

The trainer writes one record per logging step (`type="train"`), per validation (`type="eval"`) and per
epoch end (`type="epoch"`). Every record has:

- `type`, `step` (global optimizer step), `epoch` (fractional, or null when unknown),
- `time` (unix seconds when written) and `elapsed_s` (seconds of training so far, carried over on resume),
- the metric values under their own names (`loss`, `learning_rate`, `val_loss`, ...).

Metric values are kept when they are numbers, bools or strings; tensors and numpy scalars become floats;
anything else is dropped. NaN and infinite floats are written as `null`, so every line is strict JSON that
any reader (pandas, jq, a browser) accepts. Metric names that clash with the record fields above are
dropped, as the record fields say the same thing.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from app.sft.atomic import write_text

logger = logging.getLogger(__name__)

RECORD_TYPES = ("train", "eval", "epoch")
_RECORD_FIELDS = ("type", "step", "epoch", "time", "elapsed_s")
_DROP = object()  # what `_json_value` returns for a value the log does not keep


def _json_value(value: Any) -> Any:
    """`value` as a JSON bool/int/float/string (NaN and inf as None), or `_DROP` when it is none of those."""
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    try:
        number = float(value)  # floats, numpy scalars, one-element tensors
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor with several elements
        return _DROP
    return number if math.isfinite(number) else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics log, in file order.

    A last line cut short by a crash (no final newline, not valid JSON) is ignored; a malformed line
    anywhere else (or one that is not a JSON object) raises `ValueError` naming the file and line, since it
    means the file was damaged.
    """
    return [record for _, record in numbered_records(path)]


def numbered_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """`read_metrics` with the line number of each record."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}): the file is damaged") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # the final, unterminated line of an interrupted write
                break
            raise ValueError(f"{path}:{number}: malformed metrics record: {err}") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: a record must be a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


class MetricsLog:
    """Appends records to a JSON-lines metrics file, flushing each one so a crash loses nothing written.

    Without `resume_from_step` the file starts empty. With it, records of steps after `resume_from_step`
    (written by the interrupted run after its last checkpoint) are dropped by rewriting the file
    atomically, so the log describes exactly the run being resumed; `elapsed_s` continues from the
    last kept record. A failure to write (disk full, permissions) logs one warning and disables the
    log: training must never stop because of it.
    """

    def __init__(self, path: str | Path, *, resume_from_step: int | None = None) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None
        self._failed = False
        self._elapsed_before = 0.0
        self._started = time.monotonic()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_symlink():  # not a log of ours: replaced by our own file, never read or written through
                self.path.unlink()
            if resume_from_step is not None and self.path.exists():
                self._elapsed_before = self._truncate_after(resume_from_step)
                self._file = self.path.open("a", encoding="utf-8")
            else:
                self._file = self.path.open("w", encoding="utf-8")
        except (OSError, ValueError) as err:
            self._fail(err)

    def _truncate_after(self, step: int) -> float:
        """Atomically rewrite the file keeping records up to `step`; return the last kept `elapsed_s`."""
        kept = [record for record in read_metrics(self.path) if record.get("step", 0) <= step]
        write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))
        return max((record.get("elapsed_s") or 0.0 for record in kept), default=0.0)

    def _fail(self, err: Exception) -> None:
        if not self._failed:
            logger.warning("Cannot write the metrics log %s (%s); training goes on.", self.path, err)
        self._failed = True
        self.close()

    def write(self, type: str, step: int, metrics: Mapping[str, Any], epoch: float | None) -> None:
        """Append one record of `type` ("train", "eval" or "epoch") for global `step` and flush it."""
        if type not in RECORD_TYPES:
            raise ValueError(f"type must be one of {RECORD_TYPES}, got {type!r}")
        if self._file is None:
            return
        record: dict[str, Any] = {
            "type": type,
            "step": int(step),
            "epoch": None if epoch is None else _json_value(float(epoch)),
            "time": time.time(),
            "elapsed_s": self._elapsed_before + time.monotonic() - self._started,
        }
        for name, value in metrics.items():
            converted = _json_value(value)
            if name not in _RECORD_FIELDS and converted is not _DROP:
                record[name] = converted
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except (OSError, ValueError) as err:
            self._fail(err)

    def close(self) -> None:
        """Flush and close the file; later writes are ignored. Safe to call more than once."""
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as err:
                self._fail(err)
