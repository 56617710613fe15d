"""Other tools' names for our config fields: configs written for TRL / Hugging Face or Axolotl mostly work as
they are, their common names read as ours (`per_device_train_batch_size` -> `batch_size`, `bf16: true` ->
`mixed_precision: bf16`, `sequence_len` -> `max_seq_length`, ...)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


_SKIP = object()
"""An alias value that sets nothing (`bf16: false` leaves mixed_precision as it is)."""


_BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "t": True, "y": True, "1": True,
                  "false": False, "no": False, "off": False, "f": False, "n": False, "0": False}


def _boolean(value: Any) -> Any:
    """`value` as a bool when our boolean fields would read it as one ("yes", "false", 0, ...), else unchanged."""
    if isinstance(value, str):
        return _BOOLEAN_WORDS.get(value.strip().lower(), value)
    if type(value) is int and value in (0, 1):
        return bool(value)
    return value


def _precision(name: str) -> Callable[[Any], Any]:
    """`bf16: true` -> "bf16"; `bf16: auto` (Axolotl) -> "bf16" (resolve_for_hardware falls back); false -> nothing."""
    def convert(value: Any) -> Any:
        value = _boolean(value)
        return name if value is True or value == "auto" else _SKIP if value in (False, None) else value
    return convert


_HF_OPTIMIZERS = {"adamw_torch_fused": "adamw_fused", "adamw_bnb_8bit": "adamw_8bit", "adamw_hf": "adamw"}


@dataclass(frozen=True)
class Alias:
    """Another tool's name for one of our fields."""

    field: str
    note: str
    """Where the name comes from, one line."""
    convert: Callable[[Any], Any] | None = None
    """Turns the alias's value into the field's (None: the same value)."""


ALIASES: dict[str, Alias] = {
    "model_name_or_path": Alias("base_model", "TRL/HF name"),
    "per_device_train_batch_size": Alias("batch_size", "TRL/HF name"),
    "micro_batch_size": Alias("batch_size", "Axolotl name"),
    "per_device_eval_batch_size": Alias("eval_batch_size", "TRL/HF name"),
    "num_train_epochs": Alias("num_epochs", "TRL/HF name"),
    "lr_scheduler_type": Alias("scheduler_type", "TRL/HF name"),
    "lr_scheduler": Alias("scheduler_type", "Axolotl name"),
    "optim": Alias("optimizer_type", "TRL/HF name", lambda value: _HF_OPTIMIZERS.get(value, value)),
    "optimizer": Alias("optimizer_type", "Axolotl name", lambda value: _HF_OPTIMIZERS.get(value, value)),
    "bf16": Alias("mixed_precision", "TRL/HF and Axolotl name; bf16: true = mixed_precision: bf16", _precision("bf16")),
    "fp16": Alias("mixed_precision", "TRL/HF and Axolotl name; fp16: true = mixed_precision: fp16", _precision("fp16")),
    "torch_dtype": Alias("dtype", "TRL/HF model_init_kwargs name"),
    "sequence_len": Alias("max_seq_length", "Axolotl name"),
    "max_seq_len": Alias("max_seq_length", "common short name"),
    "max_length": Alias("max_seq_length", "TRL SFTConfig name"),
    "val_set_size": Alias("validation_split", "Axolotl name (a fraction)"),
    "chat_template": Alias("template_name", "Axolotl name; tokenizer_default is our 'tokenizer'",
                           lambda value: "tokenizer" if value == "tokenizer_default" else value),
    "sample_packing": Alias("packing", "Axolotl name"),
    "load_in_4bit": Alias("use_qlora", "Axolotl name"),
    "lora_target_linear": Alias("lora_target_modules", "Axolotl name; lora_target_linear: true = all-linear",
                                lambda value: "all-linear" if _boolean(value) is True
                                else _SKIP if _boolean(value) in (False, None) else value),
    "peft_use_dora": Alias("use_dora", "Axolotl name"),
    "peft_use_rslora": Alias("use_rslora", "Axolotl name"),
    "completion_only_loss": Alias("train_on_inputs", "TRL name; completion_only_loss: false = train_on_inputs: true",
                                  lambda value: not _boolean(value) if isinstance(_boolean(value), bool) else value),
}
"""Names that TRL/Hugging Face and Axolotl configs use, each read as one of our fields."""

HINTS: dict[str, str] = {
    "train_batch_size": "batch_size",
    "epochs": "num_epochs",
    "lr": "learning_rate",
    "model": "base_model",
    "model_name": "base_model",
    "dataset": "dataset_name",
    "warmup_steps": "warmup_ratio",
    "lora_rank": "lora_r",
    "rank": "lora_r",
    "max_tokens": "max_seq_length",
    "seq_len": "max_seq_length",
    "gradient_accumulation": "gradient_accumulation_steps",
}
"""Unknown names whose meaning is clear: did-you-mean suggests the field (they are not accepted as aliases)."""


def apply_aliases(data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` with aliases renamed to our fields (values converted), logging one note per alias used.

    Raises `ValueError` naming both when an alias and its field (or two aliases of one field) are given.
    """
    result = dict(data)
    given: dict[str, str] = {}  # field -> the key that set it
    clashes = []
    for key in data:
        alias = ALIASES.get(key) if isinstance(key, str) else None
        if alias is None:
            continue
        value = result.pop(key)
        value = alias.convert(value) if alias.convert is not None else value
        if value is _SKIP:
            continue
        other = given.get(alias.field) or (alias.field if alias.field in data else None)
        if other is not None:
            clashes.append(f"{key} and {other} are both set ({key} is the {alias.note} for {alias.field}); keep one")
            continue
        given[alias.field] = key
        result[alias.field] = value
        logger.info("Config: read %s as %s (%s)", key, alias.field, alias.note)
    if clashes:
        raise ValueError("\n".join(clashes))
    return result
