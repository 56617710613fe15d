"""`SFTConfig`: every setting of a fine-tuning run, validated in one place.

A config comes from Python keyword arguments, a dict, a YAML file, or any of those plus command-line
`--set key=value` overrides. Every route validates the same way and reports every problem at once in a
single `ConfigError` (`field: message` lines, with a did-you-mean for misspelt keys), so a user fixes a
config in one go. `hardware.resolve_for_hardware` then turns settings this machine cannot honour into ones it can,
warning once per change, or refuses with a clear message where no honest fallback exists (QLoRA).

Configs written for TRL/Hugging Face or Axolotl mostly work as they are: their common names are read as
aliases of ours (`ALIASES`: `per_device_train_batch_size` -> `batch_size`, `bf16: true` ->
`mixed_precision: bf16`, `sequence_len` -> `max_seq_length`, ...). Each field's one-line help is its
docstring (pydantic's `description`), which `sft config --defaults` prints (`describe_fields`).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from app.sft.aliases import ALIASES, HINTS, apply_aliases
from app.sft.atomic import write_text
from app.sft.errors import ConfigError

if TYPE_CHECKING:
    from app.sft.precision import PrecisionChoice

logger = logging.getLogger(__name__)

_STRICT = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True, allow_inf_nan=False)

YAML_MAX_VALUES = 100_000
"""The most values (scalars, lists, mappings) a YAML config may hold once its aliases are expanded: a config
has hundreds; nested aliases (an "alias bomb") can stand for billions and exhaust memory when read."""

ReportTarget = Literal["wandb", "tensorboard", "mlflow"]
_ALL_REPORT_TARGETS: list[str] = ["wandb", "tensorboard", "mlflow"]


class DistributedConfig(BaseModel):
    """How a multi-process run (`accelerate launch` / `torchrun`) shards the model."""

    model_config = _STRICT

    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """`auto`: DDP when several processes are launched (or what the accelerate config says)."""
    fsdp_version: Literal[1, 2] = 2
    """FSDP 1 or FSDP 2 (per-parameter sharding)."""
    fsdp_auto_wrap: bool = True
    """Wrap each transformer block in its own FSDP unit (the model's `_no_split_modules`)."""


DatasetFormat = Literal["alpaca", "chat", "completion"]

FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages", "conversations"),
    "completion": ("text",),
}
"""The row fields each data format reads; `columns:` of a `datasets:` entry maps them to a file's columns."""


class DatasetSource(BaseModel):
    """One entry of `datasets:`: a source of training rows, its format, its columns and its share of the mix."""

    model_config = _STRICT

    path: str
    """A `.jsonl`/`.json`/`.csv`/`.parquet` file, a `datasets.save_to_disk` directory, or a Hub id."""
    format: DatasetFormat | None = None
    """None: the config's `dataset_format`."""
    split: str = "train"
    """The split of a Hub dataset or a saved `DatasetDict`."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Our field -> the source's column, e.g. `{instruction: question, output: answer}`."""
    weight: float = Field(1.0, gt=0.0)
    """Passes over this source per epoch: 0.5 takes a seeded random half of its rows, 2 takes them twice."""


class SFTConfig(BaseModel):
    """All settings of one supervised fine-tuning run, with the names users' YAML files use."""

    model_config = _STRICT

    # Model
    base_model: str
    """A Hub id, a local Hugging Face model directory, or a `.gguf` file."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code (only for models you trust)."""
    device_map: str | None = None
    """Where to place the weights (`auto`, `cpu`, `cuda:0`); None: accelerate decides."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The dtype the base model is loaded in; auto: half precision for a LoRA base on CUDA, else float32."""
    attn_implementation: str | None = None
    """`eager`, `sdpa`, `flash_attention_2`, ...; None: the model's default (with `packing`: one variable-length
    attention call per layer on CUDA, see `app.sft.attention`)."""
    use_kernels: bool = False
    """Let transformers swap in kernels downloaded from the Hugging Face Hub (needs the `kernels` package and the
    network at load time). Off: loading never reaches the network for kernels."""
    use_liger_kernel: bool = False
    """CUDA only: Liger's Triton kernels for RMSNorm, SwiGLU and RoPE (needs `liger-kernel`, in the `gpu` extra).
    The loss stays this library's own fused output layer + cross-entropy."""

    # Data
    dataset_name: str | None = None
    """A `.jsonl`/`.json`/`.csv`/`.parquet` file, a `datasets.save_to_disk` directory, or a Hub id."""
    dataset_format: DatasetFormat = "alpaca"
    """alpaca (instruction/input/output), chat (messages or ShareGPT conversations) or completion (text)."""
    dataset_split: str = "train"
    """The split of a Hub dataset or a saved `DatasetDict`."""
    dataset_text_field: str = "text"
    """The text column of completion data."""
    eval_dataset_name: str | None = None
    """A separate validation set (its `validation` or `test` split for Hub/DatasetDict sources).
    When set, `validation_split` is not used."""
    template_name: str | None = None
    """None: `alpaca` for alpaca data; for chat data the tokenizer's own chat template if it has one,
    else `chatml`. Not used by `completion` data."""
    validation_split: float = Field(0.1, ge=0.0, lt=1.0)
    """The fraction of the training examples held out for validation when there is no eval_dataset_name."""
    max_seq_length: int = Field(1024, ge=16)
    """Examples are truncated to this many tokens."""
    train_on_inputs: bool = False
    """Train on every token (prompts and user turns too), not only on the responses."""
    packing: bool = False
    """Padding-free packing: several examples per row, attention kept within each example."""

    # Data audit (app.sft.audit, docs/audit.md): checks of the tokenized data before the first step
    audit: Literal["error", "warn", "off"] = "error"
    """A failed check stops the run before training (`error`), or is one warning (`warn`); `off` skips the audit
    in `train()`."""
    audit_max_truncated_share: float = Field(0.05, ge=0.0, le=1.0)
    """The largest share of trained tokens that truncation to `max_seq_length` may cut away."""
    audit_max_duplicate_share: float = Field(0.01, ge=0.0, le=1.0)
    """The largest share of validation rows that may be exact copies of training rows."""

    # Data: several sources, and the tokenized-data cache
    datasets: list[DatasetSource] = Field(default_factory=list)
    """Several training sources mixed by weight (each: path, format, split, columns, weight); instead of
    dataset_name."""
    cache_tokenized: bool = True
    """Reuse tokenized data from the cache ($LLM_PLAYGROUND_CACHE/tokenized, default ~/.cache/llm-playground)."""

    # Adapters
    use_lora: bool = True
    """Train LoRA adapters on a frozen base; false: full fine-tuning."""
    use_qlora: bool = False
    """4-bit base weights through bitsandbytes (CUDA only); implies `use_lora`."""
    lora_r: int = Field(8, ge=1)
    """LoRA rank."""
    lora_alpha: int = Field(16, ge=1)
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA inputs."""
    lora_target_modules: list[str] | Literal["all-linear"] | None = None
    """Module names to put LoRA on; `all-linear`: peft's choice of every linear layer except the output head;
    None: every linear projection except the output head, by name."""
    use_dora: bool = False
    """DoRA (peft): each adapted weight is split into a magnitude, trained, and a LoRA-updated direction."""
    use_rslora: bool = False
    """Rank-stabilised LoRA (peft): the update is scaled by lora_alpha / sqrt(lora_r) instead of / lora_r."""
    neftune_noise_alpha: float | None = Field(None, gt=0.0)
    """NEFTune: uniform noise of this scale (alpha / sqrt(sequence length × hidden size)) on the input embeddings
    while training, never at evaluation or generation (transformers' hook); None: off. Papers use 5 to 15."""

    # Optimisation
    batch_size: int = Field(4, ge=1)
    """Examples per micro-batch on each process."""
    eval_batch_size: int | None = Field(None, ge=1)
    """None: same as `batch_size`."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step on each process. The global batch (examples per optimizer step) is
    batch_size × gradient_accumulation_steps × processes; a run resumed on another number of processes keeps
    it by choosing the accumulation (or a smaller micro-batch) itself."""
    allow_global_batch_change: bool = False
    """On resume: train on with the global batch this launch gives (the config's accumulation × processes) when
    it differs from the checkpoint's, instead of refusing. The learning-rate schedule is recomputed for the new
    step count, and the rest of the run no longer matches an uninterrupted one."""
    allow_data_change: bool = False
    """On resume: train on when the training or validation data differs from what the checkpoint trained on
    (shrunk, grown or edited), instead of refusing; the sample order is rebuilt for the new data."""
    learning_rate: float = Field(2e-4, gt=0.0)
    """The peak learning rate (after warmup)."""
    num_epochs: int = Field(1, ge=1)
    """Passes over the training data."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps; overrides `num_epochs` when set."""
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    """The fraction of the optimizer steps spent warming the learning rate up from 0."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    """None: no gradient clipping."""
    optimizer_type: Literal["adamw", "adamw_fused", "sgd", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = (
        "adamw"
    )
    """`adamw` is torch's AdamW (fused on CUDA; `adamw_torch` is another name for it); the 8-bit and paged ones
    need bitsandbytes and CUDA."""
    scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    """The learning-rate schedule after warmup."""
    mixed_precision: Literal["auto", "fp16", "bf16"] | None = "auto"
    """`auto`: the faster of fp32 and bf16 on this machine, measured once (see `app.sft.precision`); None (also
    accepted: "no", "fp32"): full fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    torch_compile: bool = False
    """Compile each decoder layer with torch.compile (regional compilation; CUDA only, ignored on a CPU, where it
    does not pay). Packed rows of changing length are compiled once with dynamic shapes."""
    dataloader_num_workers: int = Field(0, ge=0)
    """Worker processes that collate batches."""
    seed: int = Field(42, ge=0)
    """Seeds shuffling, the validation split, the data mix and initialisation."""

    # Evaluation, checkpoints, early stopping
    logging_steps: int = Field(10, ge=1)
    """Optimizer steps between log records."""
    save_steps: int = Field(500, ge=1)
    """Optimizer steps between checkpoints."""
    eval_steps: int = Field(500, ge=1)
    """Optimizer steps between validations."""
    save_total_limit: int | None = Field(3, ge=1)
    """Checkpoints kept (the best one always stays); None: all."""
    save_best_only: bool = False
    """Keep only checkpoints that improve the validation loss."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many validations without improvement; None: never."""
    early_stopping_min_delta: float = Field(0.0, ge=0.0)
    """How much an evaluation must beat the run's best of `best_metric` so far to count as an improvement (in its
    `best_metric_mode` direction)."""
    best_metric: str = Field("val_loss", min_length=1)
    """The metric that decides the best checkpoint (and early stopping): `val_loss`, or any metric an
    evaluation reports (e.g. `gen_exact_match`)."""
    best_metric_mode: Literal["min", "max"] = "min"
    """`min` when lower is better (losses), `max` when higher is better (accuracies)."""

    # Evaluation by generation (GenerationEvalCallback; docs/generation_eval.md)
    generation_eval_metrics: list[str] = Field(default_factory=list)
    """Metrics of answers generated for the validation prompts, e.g. [exact_match, json_valid]; empty: off."""
    generation_eval_samples: int | None = Field(None, ge=1)
    """How many validation rows to answer (the first N); None: all."""
    generation_max_new_tokens: int = Field(128, ge=1)
    """The longest answer generated for an evaluation prompt, in tokens."""
    generation_eval_steps: int | None = Field(None, ge=1)
    """None: every `eval_steps`."""

    @field_validator("generation_eval_metrics", mode="before")
    @classmethod
    def _split_generation_metrics(cls, value: Any) -> Any:
        """One name or a comma-separated string (`--set generation_eval_metrics=exact_match,stopped`) too."""
        return [name.strip() for name in value.split(",") if name.strip()] if isinstance(value, str) else value

    @field_validator("generation_eval_metrics")
    @classmethod
    def _known_generation_metrics(cls, value: list[str]) -> list[str]:
        from app.sft.gen_metrics import check_metric_names

        check_metric_names(value)
        return value

    # Outputs and tracking
    output_dir: str = "outputs/sft"
    """Where the trained weights, config.yaml, metrics.jsonl, the report and the model card go."""
    checkpoint_dir: str | None = None
    """None: `<output_dir>/checkpoints` (see `resolved_checkpoint_dir`)."""
    save_merged_model: bool = False
    """Also write the LoRA adapter merged into the base model to `<output_dir>/merged`."""
    wandb_project: str | None = None
    """The W&B project (setting it turns W&B logging on)."""
    wandb_entity: str | None = None
    """The W&B team or user."""
    wandb_run_name: str | None = None
    """The W&B run's name; None: run_name."""
    report_to: list[ReportTarget] = Field(default_factory=list)
    """Like Hugging Face's `report_to`: a list of wandb, tensorboard, mlflow; one name, "all" or "none"."""
    mlflow_tracking_uri: str | None = None
    """Where `report_to: [mlflow]` logs: a server (`http://host:5000`), `databricks`, `sqlite:///path.db`; None:
    the MLFLOW_TRACKING_URI environment variable, else a local store `sqlite:///<output_dir>/mlflow/mlflow.db`."""
    mlflow_experiment: str | None = None
    """The MLflow experiment (created when missing); None: MLFLOW_EXPERIMENT_NAME, else `llm-playground-sft`."""
    mlflow_log_model: bool = False
    """Also log the final adapter or model (with its tokenizer) as MLflow artifacts under `model/`."""
    run_name: str | None = None
    """A name for the run in logs and trackers."""
    disable_progress_bar: bool = False
    """No training progress bar (log lines only)."""

    # One run per folder (see run_dir.py)
    overwrite_output_dir: bool = False
    """A new run in an `output_dir` that holds a run deletes that run's own files first (never anything else);
    False: such a run is refused with a message offering resume, a new folder or this option."""

    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    """How a multi-process run shards the model."""

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

    @model_validator(mode="before")
    @classmethod
    def _read_aliases(cls, data: Any) -> Any:
        return apply_aliases(data) if isinstance(data, Mapping) else data

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

    @field_validator("optimizer_type", mode="before")
    @classmethod
    def _normalise_optimizer_type(cls, value: Any) -> Any:
        return "adamw" if value == "adamw_torch" else value

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
        if self.datasets and self.dataset_name is not None:
            raise ValueError("dataset_name and datasets are both set; give one source as dataset_name, or a "
                             "list of sources as datasets")
        problems = []
        for index, source in enumerate(self.datasets):
            data_format = source.format or self.dataset_format
            known = FORMAT_COLUMNS[data_format]
            unknown = [name for name in source.columns if name not in known]
            if unknown:
                problems.append(f"datasets[{index}].columns: {', '.join(map(repr, unknown))} is not a field of "
                                f"{data_format} rows (expected some of {', '.join(known)})")
        if problems:
            raise ValueError("\n".join(problems))
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
        data = load_yaml(path.read_text(encoding="utf-8"), str(path))
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
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
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
            value = load_yaml(raw, f"--set {override!r}")
            *parents, leaf = key.split(".")
            section = data
            for depth, part in enumerate(parents):
                child = section.setdefault(part, {})
                if not isinstance(child, dict):
                    dotted = ".".join(parents[: depth + 1])
                    raise ConfigError(f"--set {override!r}: {dotted!r} is a value, not a section")
                section = child
            if not parents and leaf in ALIASES:  # `--set bf16=true` replaces mixed_precision
                section.pop(ALIASES[leaf].field, None)
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
        mine, theirs = flatten(self.to_dict()), flatten(other.to_dict())
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


def load_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load(text)`, refusing in a `ConfigError` naming `source` invalid YAML and aliases that expand
    beyond `YAML_MAX_VALUES` values (or into themselves), before anything is expanded."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > YAML_MAX_VALUES:
            raise ConfigError(f"{source}: its aliases (*name) expand to more than {YAML_MAX_VALUES:,} values; a "
                              "config needs far fewer: write the values out, or use fewer nested aliases")
        _refuse_repeated_keys(node, source, set())
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{source}: invalid YAML{where}: {problem}") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values `node` stands for with every alias expanded (a shared node counts at each use and is
    measured once; an alias inside the value it names counts as more than `YAML_MAX_VALUES`)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:  # an alias inside the value it names: endless
        return YAML_MAX_VALUES + 1
    open_.add(key)
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, sizes, open_) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes, open_) + _expanded_size(v, sizes, open_) for k, v in node.value)
    else:
        size = 1
    open_.discard(key)
    sizes[key] = size
    return size


def _refuse_repeated_keys(node: yaml.Node, source: str, seen: set[int]) -> None:
    """Raise a `ConfigError` naming the key and both lines when a mapping in `node` sets a key twice (YAML
    loaders keep the last silently). Each node is visited once; `load_yaml` has refused endless aliases."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, Any], int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                first = lines.setdefault((key.tag, key.value), key.start_mark.line + 1)
                if first != key.start_mark.line + 1:
                    raise ConfigError(f"{source}: {key.value!r} is set twice (lines {first} and "
                                      f"{key.start_mark.line + 1}); keep one")
    children = node.value if isinstance(node, yaml.SequenceNode) else (
        [item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode) else [])
    for child in children:
        _refuse_repeated_keys(child, source, seen)


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
        location = _location(problem["loc"])
        kind = problem["type"]
        if kind == "extra_forbidden":
            lines.append(f"{location}: unknown setting{_did_you_mean(problem['loc'])}")
        elif kind == "missing":
            lines.append(f"{location}: required setting is missing")
        elif kind == "value_error" and not location:
            lines.extend(problem["msg"].removeprefix("Value error, ").split("\n"))
        else:
            lines.append(f"{location}: {problem['msg']} (got {problem['input']!r})")
    return lines


def _location(loc: tuple[Any, ...]) -> str:
    """`datasets[1].weight` for pydantic's `("datasets", 1, "weight")` (an entry of a list of sections);
    `report_to.0` for an item of a list of values."""
    text = ""
    for index, part in enumerate(loc):
        if isinstance(part, int) and index + 1 < len(loc):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _did_you_mean(location: tuple[Any, ...]) -> str:
    """`; did you mean 'x'?` for the field an unknown key most likely means: a name from another tool
    (`HINTS`), then the closest field or alias (an alias suggests its field), by string similarity."""
    model: type[BaseModel] = SFTConfig
    for part in location[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif str(part) == "datasets":
            model = DatasetSource
        else:
            return ""
    key = str(location[-1])
    top_level = model is SFTConfig
    if top_level and key.lower() in HINTS:
        return f"; did you mean {HINTS[key.lower()]!r}?"
    bare = key.lower().removeprefix("per_device_").removeprefix("train_")  # per_device_batch_size -> batch_size
    if top_level and bare != key and (bare in model.model_fields or bare in ALIASES):
        return f"; did you mean {ALIASES[bare].field if bare in ALIASES else bare!r}?"
    candidates = list(model.model_fields) + (list(ALIASES) if top_level else [])
    matches = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not matches:
        return ""
    match = ALIASES[matches[0]].field if matches[0] in ALIASES else matches[0]
    return f"; did you mean {match!r}?"


def describe_fields(model: type[BaseModel] | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """Every setting as `(dotted name, default as YAML, one-line help)`, nested sections included; the help
    is the field's description (its docstring), the same source the validation uses."""
    model = model or SFTConfig
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(describe_fields(annotation, f"{prefix}{name}."))
            continue
        default = field.get_default(call_default_factory=True)
        shown = "(required)" if field.is_required() else yaml.safe_dump(default, default_flow_style=True).strip()
        shown = shown.removesuffix("\n...").removesuffix(" ...")
        help_ = " ".join((field.description or "").split())
        rows.append((f"{prefix}{name}", shown, help_))
    return rows


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys (`{"distributed": {"strategy": "ddp"}}` ->
    `{"distributed.strategy": "ddp"}`)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
