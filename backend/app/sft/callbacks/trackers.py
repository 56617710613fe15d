"""What the experiment trackers (W&B, TensorBoard, MLflow) share: numbers out of metric values, the run config,
URLs without their credentials."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any


def scalar(value: Any) -> float | None:
    """`value` as a float if it is a number (bools, strings and non-scalars give None)."""
    if isinstance(value, (bool, str)):
        return None
    try:
        return float(value)  # ints, floats, numpy scalars, one-element tensors
    except (TypeError, ValueError, RuntimeError):
        return None


def config_dict(config: Any) -> dict[str, Any] | None:
    """A trainer config as a plain dict: pydantic models dumped (an `SFTConfig` with the values this machine
    resolved, e.g. the chosen `mixed_precision`), mappings copied, others dropped."""
    if hasattr(config, "model_dump"):
        return config.model_dump(mode="json")
    if isinstance(config, Mapping):
        return dict(config)
    return None


def without_credentials(text: str) -> str:
    """`text` with the user and password of every URL in it removed (`postgresql://bob:pw@host/db` ->
    `postgresql://host/db`), whatever the scheme."""
    return re.sub(r"//[^/\s]+@", "//", text)
