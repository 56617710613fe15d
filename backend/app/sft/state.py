"""The training loop's own state, small enough to read and saved as JSON beside every checkpoint."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_RETIRED_FIELDS = ("best_checkpoint_metric",)
"""Written by earlier versions; ignored on resume."""


@dataclass
class TrainerState:
    """Where the loop is and what it has seen.

    `epoch` and `batch_in_epoch` give the data position in the run's sample order (see `layout`): the epoch's
    first `batch_in_epoch` micro-batches of its deterministic plan (`data.epoch_batches`) are trained on, over
    all processes together, which is what makes a resumed run, on any number of processes, see exactly the
    batches an uninterrupted run would have seen.

    `best_metric`, `best_step` and `best_checkpoint` are the run's one record of the best: the best value of
    the monitored metric, the step of the evaluation that produced it, and the path of the checkpoint written
    while that evaluation was the newest one (None until one is); `trainer_state.json` keeps its folder name
    only, so a copied or moved run stays portable, and the trainer roots it in its checkpoint folder again.
    `log_history` holds every logged training record and every evaluation (`"type": "train" | "eval"`).
    """

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    train_tokens: int = 0
    train_loss_sum: float = 0.0
    epoch_loss_sum: float = 0.0
    epoch_tokens: int = 0
    max_steps: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_checkpoint: str | None = None
    stop_reason: str | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        data = {key: value for key, value in data.items() if key not in _RETIRED_FIELDS}
        if data.get("best_checkpoint"):  # earlier versions stored an absolute path: keep its name only
            data["best_checkpoint"] = Path(str(data["best_checkpoint"])).name
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"trainer state has unknown fields: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def type_problem(cls, data: dict[str, Any]) -> str | None:
        """`field: must be ..., got ...` for the first field of `data` whose value has the wrong type, else None."""
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            hint = hints.get(name)
            if hint is None:
                continue
            allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
            allowed = tuple(typing.get_origin(kind) or kind for kind in allowed)
            ok = any(
                value is None if kind is type(None)
                else isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
                else isinstance(value, int) and not isinstance(value, bool) if kind is int
                else isinstance(value, kind)
                for kind in allowed
            )
            if not ok:
                expected = " or ".join("null" if kind is type(None) else kind.__name__ for kind in allowed)
                return f"field {name!r} must be {expected}, got {value!r}"
        return None
