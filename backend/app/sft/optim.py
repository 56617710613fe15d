"""The optimizer and the learning-rate schedule of a run, built from its config."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from transformers import get_scheduler

from app.sft.config import SFTConfig

_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: weight matrices decay, biases and norms do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if _decays(name, param) else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def apply_weight_decay(optimizer: torch.optim.Optimizer, model: nn.Module, weight_decay: float) -> None:
    """Set `weight_decay` on the optimizer's groups of decaying parameters and 0 on the others (after loading a
    checkpoint, whose groups hold the interrupted run's value); each group is recognised by its parameters."""
    decaying = {id(param) for name, param in model.named_parameters() if param.requires_grad and _decays(name, param)}
    for group in optimizer.param_groups:
        group["weight_decay"] = weight_decay if any(id(param) in decaying for param in group["params"]) else 0.0


def _decays(name: str, param: nn.Parameter) -> bool:
    """Whether a trainable parameter decays: weight matrices do, biases and norms don't."""
    return param.ndim >= 2 and "norm" not in name.lower()


def build_optimizer(model: nn.Module, config: SFTConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `config.optimizer_type` names.

    - `adamw`: torch's AdamW, its fused kernel on CUDA (the fastest torch implementation for the device);
    - `adamw_fused`: the fused kernel explicitly (CUDA only; `resolve_for_hardware` falls back to `adamw`);
    - `adamw_8bit`, `paged_adamw_8bit`, `paged_adamw_32bit`: bitsandbytes' (CUDA only);
    - `sgd`: SGD with momentum 0.9.
    """
    groups = parameter_groups(model, config.weight_decay)
    name = config.optimizer_type
    if name == "sgd":
        return torch.optim.SGD(groups, lr=config.learning_rate, momentum=0.9)
    if name in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        import bitsandbytes as bnb  # resolve_for_hardware guarantees it is importable

        optimizer_class = {
            "adamw_8bit": bnb.optim.AdamW8bit,
            "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
            "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        }[name]
        return optimizer_class(groups, lr=config.learning_rate)
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, config: SFTConfig, total_steps: int,
                    current_step: int = 0) -> torch.optim.lr_scheduler.LRScheduler:
    """Warmup (`warmup_ratio` of `total_steps`) then `config.scheduler_type`, at base rate `learning_rate`.

    With `current_step` > 0 (a resume) the schedule is the one this config defines, advanced to that step: the
    optimizer's rate becomes the schedule's value there, whatever the interrupted run used.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = config.learning_rate
        group["lr"] = config.learning_rate
    scheduler = get_scheduler(
        _SCHEDULES[config.scheduler_type],
        optimizer,
        num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    with warnings.catch_warnings():  # stepping the schedule alone is the point here
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step\\(\\)", category=UserWarning)
        for _ in range(current_step):
            scheduler.step()
    return scheduler
