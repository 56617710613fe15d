"""The training loop's own state, small enough to read and saved as JSON beside every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_RETIRED_FIELDS = ("best_checkpoint_metric",)
"""Written by earlier versions; ignored on resume."""


@dataclass
class TrainerState:
    """Where the loop is and what it has seen.

    `epoch` and `batch_in_epoch` give the data position: the next micro-batch to train on is number
    `batch_in_epoch` of epoch `epoch`'s deterministic plan (see `data.epoch_batches`), which is what makes a
    resumed run see exactly the batches an uninterrupted run would have seen.

    `best_metric`, `best_step` and `best_checkpoint` are the run's one record of the best: the best value of
    the monitored metric, the step of the evaluation that produced it, and the name (inside the checkpoint
    folder) of the checkpoint written while that evaluation was the newest one (None until one is).
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
