"""Device placement and distribution: one `Accelerator` built from the config.

Launch with `accelerate launch` or `torchrun`; accelerate reads the process group from the environment. DDP is
the default with several processes; `distributed.strategy: fsdp` shards parameters, gradients and optimizer
state (FSDP2 where the installed accelerate supports it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from accelerate import Accelerator

if TYPE_CHECKING:
    from app.sft.config import SFTConfig


def make_accelerator(config: SFTConfig) -> Accelerator:
    """An Accelerator with the config's mixed precision and, when asked, an FSDP plugin."""
    kwargs = {}
    if config.distributed.strategy == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=config.distributed.fsdp_version,
            auto_wrap_policy="transformer_based_wrap" if config.distributed.fsdp_auto_wrap else None,
            state_dict_type="FULL_STATE_DICT",
        )
    return Accelerator(mixed_precision=config.mixed_precision or "no", **kwargs)
