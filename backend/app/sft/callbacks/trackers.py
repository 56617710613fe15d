"""What the experiment trackers (W&B, TensorBoard, MLflow) share: numbers out of metric values, the run config,
URLs without their credentials."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any


def scalar(value: Any) -> float | None:
    """`value` as a float if it is a number (bools, strings, non-scalars and ints beyond a float give None)."""
    if isinstance(value, (bool, str)):
        return None
    try:
        return float(value)  # ints, floats, numpy scalars, one-element tensors
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return None


def config_dict(config: Any) -> dict[str, Any] | None:
    """A trainer config as a plain dict: pydantic models dumped (an `SFTConfig` with the values this machine
    resolved, e.g. the chosen `mixed_precision`), mappings copied, others dropped; credentials in URLs removed."""
    if hasattr(config, "model_dump"):
        return without_credentials_in(config.model_dump(mode="json"))
    if isinstance(config, Mapping):
        return without_credentials_in(config)
    return None


def without_credentials_in(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `config` whose strings, also in nested mappings and lists, are `without_credentials` (a
    `mlflow_tracking_uri` of `https://user:token@host` is logged as `https://host`)."""

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return without_credentials(value)
        if isinstance(value, Mapping):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(clean(item) for item in value)
        return value

    return clean(config)


def without_credentials(text: str) -> str:
    """`text` with the user and password of every URL in it removed (`postgresql://bob:pw@host/db` ->
    `postgresql://host/db`), whatever the scheme."""
    return re.sub(r"//[^/\s]+@", "//", text)
