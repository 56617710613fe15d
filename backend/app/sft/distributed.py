"""Device placement and distribution: one `Accelerator` built from the config.

Launch several processes with `accelerate launch` or `torchrun`; accelerate reads the process group from the
environment (NCCL on GPUs, gloo on CPUs). `distributed.strategy`:

- `auto`: what the accelerate launch config says (`accelerate launch --use_fsdp ...`), else DDP.
- `ddp`: every process holds the whole model; gradients are averaged.
- `fsdp`: parameters, gradients and optimizer state are sharded over the processes. `fsdp_version: 2` uses
  torch's `fully_shard` (also on CPU processes over gloo, which accelerate leaves to GPUs; this module turns it on).

Checkpoints hold full (gathered) weights and optimizer state whatever the strategy; see `checkpointing.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedType, gather_object, get_cpu_distributed_information

if TYPE_CHECKING:
    from app.sft.config import SFTConfig


def make_accelerator(config: SFTConfig) -> Accelerator:
    """An Accelerator with the config's mixed precision and strategy, checked against how the run was launched.

    Processes launched on a machine without an accelerator device (CUDA, XPU, ...) run on CPU over gloo.
    Raises `RuntimeError` when accelerate did not join every launched process, and `ValueError` when the config
    and the accelerate launch config ask for different strategies.
    """
    settings = config.distributed
    launched = get_cpu_distributed_information().world_size  # WORLD_SIZE from torchrun / accelerate launch
    fsdp_plugin = None
    if settings.strategy == "fsdp":
        fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=settings.fsdp_version,
            auto_wrap_policy="transformer_based_wrap" if settings.fsdp_auto_wrap else None,
            state_dict_type="FULL_STATE_DICT",
        )
    accelerator = Accelerator(
        cpu=launched > 1 and not _has_accelerator_device(),
        mixed_precision=config.mixed_precision or "no",
        fsdp_plugin=fsdp_plugin,
    )
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"{launched} processes were launched but accelerate joined {accelerator.num_processes} "
            f"(distributed type {accelerator.distributed_type.value}, device {accelerator.device}); "
            "launch with `accelerate launch` or `torchrun` on machines whose devices accelerate supports"
        )
    if fsdp_plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        _enable_fsdp_on_cpu(accelerator, fsdp_plugin)
    if settings.strategy == "ddp" and accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            "distributed.strategy is 'ddp' but the accelerate launch config asks for FSDP; set "
            "distributed.strategy to 'fsdp' or 'auto', or launch without --use_fsdp"
        )
    return accelerator


def agree_on_stop(accelerator: Accelerator, reason: str | None, signalled: bool) -> tuple[str | None, bool]:
    """The stop every process takes after this step, `(reason, signalled)`: when any process was asked to stop
    (`reason`: the first one given wins) or received a signal, all of them are. Every process must call it."""
    if accelerator.num_processes == 1:
        return reason, signalled
    flags = torch.tensor([float(reason is not None), float(signalled)], device=accelerator.device)
    flags = accelerator.reduce(flags, reduction="sum")
    if flags[0] > 0:  # the same on every process, so all of them join this collective
        reasons = gather_object([reason])
        reason = reason or next(given for given in reasons if given)
    return reason, signalled or bool(flags[1] > 0)


def _has_accelerator_device() -> bool:
    """Whether torch sees a device accelerate runs processes on (CUDA, XPU, ...), not just CPUs."""
    if hasattr(torch, "accelerator"):  # torch >= 2.6
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def _enable_fsdp_on_cpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """Switch a multi-CPU accelerator to FSDP: accelerate enables FSDP for GPUs only, torch's FSDP2 runs on gloo."""
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP on CPU processes needs distributed.fsdp_version: 2 (FSDP1 needs GPUs)")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
