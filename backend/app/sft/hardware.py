"""What this machine (and the model) can run: `resolve_for_hardware` turns a config's settings that this machine
cannot honour into ones it can, one `ConfigWarning` each, and chooses `mixed_precision: auto`; the checks of the
config against the model's shapes. Kept out of the schema (`config.py`), which only describes settings."""

from __future__ import annotations

import importlib
import logging
import warnings
from typing import Any

from app.sft.config import SFTConfig
from app.sft.errors import ConfigError, ConfigWarning
from app.sft.modeling import base_model_config
from app.sft.precision import PrecisionChoice, choose_mixed_precision

logger = logging.getLogger(__name__)

_BITSANDBYTES_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def resolve_for_hardware(
    config: SFTConfig,
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
    cuda = _cuda_available() if cuda is None else cuda
    changes: dict[str, Any] = {}

    def has_bitsandbytes() -> bool:
        return _bitsandbytes_importable() if bitsandbytes is None else bitsandbytes

    if config.use_qlora:
        missing = [] if cuda else ["a CUDA GPU"]
        if not has_bitsandbytes():
            missing.append("the bitsandbytes package")
        if missing:
            raise ConfigError(
                f"use_qlora: QLoRA needs {' and '.join(missing)} (4-bit weights cannot be emulated "
                "here); set use_qlora: false to train plain LoRA"
            )
    precision = None  # recorded only when mixed_precision changes (so a config that needs no change is equal)
    if config.mixed_precision == "auto":
        precision = choose_mixed_precision(
            cuda=cuda,
            bf16_supported=_bf16_supported(cuda) if bf16_supported is None else bf16_supported,
            model_config=model_config if model_config is not None else lambda: _local_model_config(config),
            tokens=config.batch_size * config.max_seq_length,
        )
        changes["mixed_precision"] = precision.mixed_precision
        logger.debug("%s", precision.describe())  # the trainer says it at the start of training
    elif config.mixed_precision == "bf16":
        supported = _bf16_supported(cuda) if bf16_supported is None else bf16_supported
        if not supported:
            changes["mixed_precision"] = None
            precision = PrecisionChoice(None, "config", "bf16 was set but is not supported here")
            _warn("mixed_precision 'bf16' is not supported on this machine; training in fp32 instead")
    elif config.mixed_precision == "fp16" and not cuda:
        changes["mixed_precision"] = None
        precision = PrecisionChoice(None, "config", "fp16 was set but needs a CUDA GPU")
        _warn("mixed_precision 'fp16' needs a CUDA GPU; training in fp32 instead")
    if config.optimizer_type in _BITSANDBYTES_OPTIMIZERS and not (cuda and has_bitsandbytes()):
        changes["optimizer_type"] = "adamw"
        _warn(f"optimizer_type {config.optimizer_type!r} needs bitsandbytes and a CUDA GPU; using 'adamw'")
    elif config.optimizer_type == "adamw_fused" and not cuda:
        changes["optimizer_type"] = "adamw"
        _warn("optimizer_type 'adamw_fused' needs a CUDA GPU; using 'adamw' instead")
    if config.torch_compile and not cuda:
        changes["torch_compile"] = False
        _warn("torch_compile is for CUDA GPUs (on a CPU it costs compile time and gains nothing); off here")
    if config.use_liger_kernel and not cuda:
        changes["use_liger_kernel"] = False
        _warn("use_liger_kernel needs a CUDA GPU (Triton kernels); using the stock layers instead")
    resolved = config.model_copy(update=changes, deep=True)
    if precision is not None:
        resolved._precision_choice = precision
    return resolved


def warn_beyond_positions(config: SFTConfig, model_config: Any) -> None:
    """A `ConfigWarning` when `max_seq_length` is longer than the model's `max_position_embeddings`: positions
    past that were never trained (and some models fail on them)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if isinstance(limit, int) and config.max_seq_length > limit:
        _warn(f"max_seq_length {config.max_seq_length} is longer than the model's max_position_embeddings "
              f"{limit}: tokens past position {limit} are outside what the model was trained on (and some models "
              f"fail on them); set max_seq_length: {limit} or less")


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
