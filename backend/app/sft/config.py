"""`SFTConfig`: every setting of a fine-tuning run, validated in one place.

A config comes from Python keyword arguments, a dict, a YAML file, or any of those plus command-line
`--set key=value` overrides. Every route validates the same way and reports every problem at once in a
single `ConfigError` (`field: message` lines, with a did-you-mean for misspelt keys), so a user fixes a
config in one go. `resolve_for_hardware` then turns settings this machine cannot honour into ones it can,
warning once per change, or refuses with a clear message where no honest fallback exists (QLoRA).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    from app.sft.precision import PrecisionChoice

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config that cannot be used; the message lists every problem, one `field: message` per line."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = problems if problems is not None else [message]
        """The individual `field: message` problems."""


class ConfigWarning(UserWarning):
    """A setting was changed to one this machine can run (see `SFTConfig.resolve_for_hardware`)."""


_STRICT = ConfigDict(extra="forbid", validate_assignment=True)

ReportTarget = Literal["wandb", "tensorboard"]
_ALL_REPORT_TARGETS: list[str] = ["wandb", "tensorboard"]
_BITSANDBYTES_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


class DistributedConfig(BaseModel):
    """How a multi-process run (`accelerate launch` / `torchrun`) shards the model."""

    model_config = _STRICT

    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """`auto`: DDP when several processes are launched (or what the accelerate config says)."""
    fsdp_version: Literal[1, 2] = 2
    fsdp_auto_wrap: bool = True
    """Wrap each transformer block in its own FSDP unit (the model's `_no_split_modules`)."""


class SFTConfig(BaseModel):
    """All settings of one supervised fine-tuning run, with the names users' YAML files use."""

    model_config = _STRICT

    # Model
    base_model: str
    """A Hub id, a local Hugging Face model directory, or a `.gguf` file."""
    trust_remote_code: bool = False
    device_map: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None

    # Data
    dataset_name: str | None = None
    """A `.jsonl`/`.json`/`.csv`/`.parquet` file, a `datasets.save_to_disk` directory, or a Hub id."""
    dataset_format: Literal["alpaca", "chat", "completion"] = "alpaca"
    dataset_split: str = "train"
    dataset_text_field: str = "text"
    eval_dataset_name: str | None = None
    """A separate validation set (its `validation` or `test` split for Hub/DatasetDict sources).
    When set, `validation_split` is not used."""
    template_name: str | None = None
    """None: `alpaca` for alpaca data; for chat data the tokenizer's own chat template if it has one,
    else `chatml`. Not used by `completion` data."""
    validation_split: float = Field(0.1, ge=0.0, lt=1.0)
    max_seq_length: int = Field(1024, ge=16)
    train_on_inputs: bool = False
    """Train on every token (prompts and user turns too), not only on the responses."""
    packing: bool = False
    """Padding-free packing: several examples per row, attention kept within each example."""

    # Adapters
    use_lora: bool = True
    use_qlora: bool = False
    """4-bit base weights through bitsandbytes (CUDA only); implies `use_lora`."""
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target_modules: list[str] | None = None
    """None: every linear projection of the model except the output head."""

    # Optimisation
    batch_size: int = Field(4, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    """None: same as `batch_size`."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0.0)
    num_epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps; overrides `num_epochs` when set."""
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    """None: no gradient clipping."""
    optimizer_type: Literal[
        "adamw", "adamw_torch", "adamw_fused", "sgd", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"
    ] = "adamw"
    scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    mixed_precision: Literal["auto", "fp16", "bf16"] | None = "auto"
    """`auto`: the faster of fp32 and bf16 on this machine, measured once (see `app.sft.precision`); None (also
    accepted: "no", "fp32"): full fp32."""
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    dataloader_num_workers: int = Field(0, ge=0)
    seed: int = Field(42, ge=0)

    # Evaluation, checkpoints, early stopping
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(500, ge=1)
    eval_steps: int = Field(500, ge=1)
    save_total_limit: int | None = Field(3, ge=1)
    save_best_only: bool = False
    early_stopping_patience: int | None = Field(None, ge=1)
    early_stopping_min_delta: float = Field(0.0, ge=0.0)

    # Outputs and tracking
    output_dir: str = "outputs/sft"
    checkpoint_dir: str | None = None
    """None: `<output_dir>/checkpoints` (see `resolved_checkpoint_dir`)."""
    save_merged_model: bool = False
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_run_name: str | None = None
    report_to: list[ReportTarget] = Field(default_factory=list)
    """Like Hugging Face's `report_to`: a list, one name, "all" or "none"."""
    run_name: str | None = None
    disable_progress_bar: bool = False

    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    _precision_choice: Any = PrivateAttr(default=None)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise _invalid(_problems(error), source=None) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as error:
            raise _invalid(_problems(error), source=None) from None

    # ------------------------------------------------------------------ validation

    @field_validator("report_to", mode="before")
    @classmethod
    def _normalise_report_to(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            if "all" in value:
                return list(_ALL_REPORT_TARGETS)
            return list(dict.fromkeys(item for item in value if item != "none"))
        return value

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _normalise_mixed_precision(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.lower() in ("no", "none", "fp32") else value

    @model_validator(mode="after")
    def _check_combinations(self) -> SFTConfig:
        if self.use_qlora and not self.use_lora:
            raise ValueError("use_qlora trains LoRA adapters on a 4-bit base; it needs use_lora: true")
        if self.dataset_format == "completion" and self.template_name is not None:
            raise ValueError(
                f"template_name {self.template_name!r} is not used with dataset_format 'completion' "
                "(plain text); remove it or use the alpaca/chat format"
            )
        return self

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> SFTConfig:
        """Validate `data`; every problem is listed in one `ConfigError` that names `source`."""
        if not isinstance(data, Mapping):
            raise _invalid([f"expected a mapping of settings, got {type(data).__name__}"], source)
        odd_keys = [repr(key) for key in data if not isinstance(key, str)]
        if odd_keys:
            raise _invalid([f"{key}: setting names must be strings" for key in odd_keys], source)
        try:
            return cls(**data)
        except ConfigError as error:
            raise _invalid(error.problems, source) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> SFTConfig:
        """Load and validate a YAML config file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error)
            raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
        if data is None:
            raise ConfigError(f"{path}: the file is empty; expected a mapping of settings (base_model: ...)")
        if not isinstance(data, dict):
            kind = type(data).__name__
            raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {kind}")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (YAML/JSON-safe), nested `distributed` included.

        A `mixed_precision` that `auto` chose (`precision_choice`) is written as `auto`, so a saved config asks for
        the same rule wherever it runs; the choice itself is in `training_summary.json`."""
        data = self.model_dump(mode="json")
        if self._precision_choice is not None and self._precision_choice.source != "config":
            data["mixed_precision"] = "auto"
        return data

    def to_yaml(self, path: str | Path) -> Path:
        """Write the config as YAML that `from_yaml` reads back to an equal config."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        return path

    def with_overrides(self, overrides: list[str]) -> SFTConfig:
        """A copy with command-line `key=value` overrides applied (dotted keys: `distributed.strategy`).

        Values are parsed as YAML (`3`, `1e-4`, `true`, `null`, `[q_proj, v_proj]`), then the whole config is
        validated again, exactly like a YAML file.
        """
        data = self.to_dict()
        for override in overrides:
            key, sep, raw = override.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"--set {override!r}: expected key=value, e.g. --set learning_rate=1e-4")
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as error:
                raise ConfigError(f"--set {override!r}: the value is not valid YAML: {error}") from None
            *parents, leaf = key.split(".")
            section = data
            for depth, part in enumerate(parents):
                child = section.setdefault(part, {})
                if not isinstance(child, dict):
                    dotted = ".".join(parents[: depth + 1])
                    raise ConfigError(f"--set {override!r}: {dotted!r} is a value, not a section")
                section = child
            section[leaf] = value
        return self.from_dict(data, source="--set overrides")

    # ------------------------------------------------------------------ derived values

    @property
    def resolved_checkpoint_dir(self) -> str:
        """Where checkpoints go: `checkpoint_dir`, or `<output_dir>/checkpoints`."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        return str(Path(self.output_dir) / "checkpoints")

    def diff(self, other: SFTConfig) -> dict[str, tuple[Any, Any]]:
        """Settings that differ, as `{field: (self's value, other's value)}`; nested keys are dotted."""
        mine, theirs = _flatten(self.to_dict()), _flatten(other.to_dict())
        keys = list(mine) + [key for key in theirs if key not in mine]
        return {key: (mine.get(key), theirs.get(key)) for key in keys if mine.get(key) != theirs.get(key)}

    @property
    def precision_choice(self) -> PrecisionChoice:
        """How `mixed_precision` was chosen: by `resolve_for_hardware` for `auto` (with the measured rates) or a
        fallback, else as set in the config."""
        from app.sft.precision import PrecisionChoice

        if self._precision_choice is not None:
            return self._precision_choice
        return PrecisionChoice(self.mixed_precision, "config", "set in the config")  # type: ignore[arg-type]

    def resolve_for_hardware(
        self,
        *,
        cuda: bool | None = None,
        bf16_supported: bool | None = None,
        bitsandbytes: bool | None = None,
        model_config: Any | None = None,
    ) -> SFTConfig:
        """A copy whose settings this machine can run, with one `ConfigWarning` per setting changed.

        Each argument left as None is detected (torch for CUDA and bf16, an import for bitsandbytes).
        `mixed_precision: auto` becomes the faster precision of this machine (`precision.choose_mixed_precision`,
        which times `model_config`'s products; None: the base model's config, if it is available locally), recorded
        in `precision_choice` (the trainer logs it in one line when training starts).
        Falls back: bf16 without bf16 support and fp16 without
        CUDA to fp32; 8-bit/paged optimizers without bitsandbytes and CUDA, and the fused AdamW without CUDA, to
        `adamw`. Raises `ConfigError` for QLoRA without CUDA and bitsandbytes: 4-bit training cannot be emulated.
        """
        from app.sft.precision import PrecisionChoice, choose_mixed_precision

        cuda = _cuda_available() if cuda is None else cuda
        changes: dict[str, Any] = {}

        def has_bitsandbytes() -> bool:
            return _bitsandbytes_importable() if bitsandbytes is None else bitsandbytes

        if self.use_qlora:
            missing = [] if cuda else ["a CUDA GPU"]
            if not has_bitsandbytes():
                missing.append("the bitsandbytes package")
            if missing:
                raise ConfigError(
                    f"use_qlora: QLoRA needs {' and '.join(missing)} (4-bit weights cannot be emulated "
                    "here); set use_qlora: false to train plain LoRA"
                )
        precision = None  # recorded only when mixed_precision changes (so a config that needs no change is equal)
        if self.mixed_precision == "auto":
            precision = choose_mixed_precision(
                cuda=cuda,
                bf16_supported=_bf16_supported(cuda) if bf16_supported is None else bf16_supported,
                model_config=model_config if model_config is not None else lambda: _local_model_config(self),
                tokens=self.batch_size * self.max_seq_length,
            )
            changes["mixed_precision"] = precision.mixed_precision
            logger.debug("%s", precision.describe())  # the trainer says it at the start of training
        elif self.mixed_precision == "bf16":
            supported = _bf16_supported(cuda) if bf16_supported is None else bf16_supported
            if not supported:
                changes["mixed_precision"] = None
                precision = PrecisionChoice(None, "config", "bf16 was set but is not supported here")
                _warn("mixed_precision 'bf16' is not supported on this machine; training in fp32 instead")
        elif self.mixed_precision == "fp16" and not cuda:
            changes["mixed_precision"] = None
            precision = PrecisionChoice(None, "config", "fp16 was set but needs a CUDA GPU")
            _warn("mixed_precision 'fp16' needs a CUDA GPU; training in fp32 instead")
        if self.optimizer_type in _BITSANDBYTES_OPTIMIZERS and not (cuda and has_bitsandbytes()):
            changes["optimizer_type"] = "adamw"
            _warn(f"optimizer_type {self.optimizer_type!r} needs bitsandbytes and a CUDA GPU; using 'adamw'")
        elif self.optimizer_type == "adamw_fused" and not cuda:
            changes["optimizer_type"] = "adamw"
            _warn("optimizer_type 'adamw_fused' needs a CUDA GPU; using 'adamw' instead")
        resolved = self.model_copy(update=changes, deep=True)
        if precision is not None:
            resolved._precision_choice = precision
        return resolved


def _invalid(problems: list[str], source: str | None) -> ConfigError:
    """One `ConfigError` listing `problems` under a header naming the source."""
    where = f" in {source}" if source else ""
    count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
    message = f"Invalid SFT config{where} ({count}):\n" + "\n".join(f"  {line}" for line in problems)
    return ConfigError(message, problems)


def _problems(error: ValidationError) -> list[str]:
    """One `field: message` line per problem pydantic found."""
    lines = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"])
        kind = problem["type"]
        if kind == "extra_forbidden":
            lines.append(f"{location}: unknown setting{_did_you_mean(problem['loc'])}")
        elif kind == "missing":
            lines.append(f"{location}: required setting is missing")
        elif kind == "value_error" and not location:
            lines.append(problem["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"{location}: {problem['msg']} (got {problem['input']!r})")
    return lines


def _did_you_mean(location: tuple[Any, ...]) -> str:
    """`; did you mean 'x'?` for the closest valid key of the section the unknown key is in."""
    model: type[BaseModel] = SFTConfig
    for part in location[:-1]:
        annotation = model.model_fields[str(part)].annotation if str(part) in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    matches = difflib.get_close_matches(str(location[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {matches[0]!r}?" if matches else ""


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _warn(message: str) -> None:
    warnings.warn(message, ConfigWarning, stacklevel=3)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _bf16_supported(cuda: bool) -> bool:
    """bf16 support: the GPU's on CUDA; on a CPU, native bf16 instructions (AVX512-BF16 or AMX)."""
    import torch

    if cuda:
        return torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def _local_model_config(config: SFTConfig) -> Any | None:
    """The base model's transformers config when it is on this machine (a directory, a GGUF file, the Hub
    cache), else None; never downloads."""
    try:
        from app.sft.modeling import base_model_config

        return base_model_config(config, local_files_only=True)
    except Exception as error:  # any unreadable model: auto then trains in fp32 and says why
        logger.debug("mixed_precision auto: cannot read the shapes of %s (%s)", config.base_model, error)
        return None


def _bitsandbytes_importable() -> bool:
    try:
        importlib.import_module("bitsandbytes")
    except Exception:  # bitsandbytes raises various errors when its native library cannot load
        return False
    return True
