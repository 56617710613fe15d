"""Checkpoint files: atomic writes, safe loads, and the `latest` / `best` pointers.

A checkpoint is a directory `checkpoint_step_<N>/` holding:

- weights: `adapter_model.safetensors` + `adapter_config.json` (LoRA) or `model*.safetensors` + `config.json`;
- `optimizer.pt`, `scheduler.pt`: optimizer and LR-scheduler state, tensors and plain containers only
  (read back with `torch.load(weights_only=True)`); the optimizer state is keyed by parameter name and full
  (gathered from FSDP shards), so it loads whatever the wrapping or sharding;
- `rng_state_<rank>.json` + `rng_state_<rank>.safetensors`: python/numpy and torch/CUDA random states per process;
- `sft_config.json`: the resolved run config;
- `trainer_state.json`: the loop state (step, epoch, data position, tokens, best metric, log history) and every
  callback's `state_dict()`, written last: its presence marks the checkpoint complete.

Everything is written into a hidden sibling directory (`.tmp-checkpoint_step_<N>`), flushed to disk, then renamed
into place, so a process killed at any instant leaves either the complete checkpoint or none. The small `latest` and
`best` files name the newest and best complete checkpoints and are replaced atomically too. Loading never
unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

logger = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"
CONFIG_FILE = "sft_config.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
LATEST_POINTER = "latest"
BEST_POINTER = "best"
_CHECKPOINT_NAME = re.compile(r"^checkpoint_step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the checkpoint and the file."""


# --- writing ---------------------------------------------------------------------------------------------------


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success flush it and rename it to `final`, else remove it."""
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step (after a resume): swap, then drop the old copy
            old = final.parent / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {final}: {exc.strerror or exc}. Earlier checkpoints are untouched."
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_pointer(checkpoint_dir: str | os.PathLike, name: str, target: str | os.PathLike) -> None:
    """Atomically make `checkpoint_dir/name` (e.g. `latest`) name the checkpoint directory `target`."""
    pointer = Path(checkpoint_dir) / name
    tmp = pointer.with_name(f".tmp-{name}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(Path(target).name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, pointer)


def remove_pointer(checkpoint_dir: str | os.PathLike, name: str) -> None:
    """Remove the pointer file `checkpoint_dir/name` (e.g. `best` once no checkpoint holds the best)."""
    (Path(checkpoint_dir) / name).unlink(missing_ok=True)


def save_weights(model: nn.Module, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write a model's weights in safetensors: a PEFT adapter or a transformers model via `save_pretrained`,
    any other module as `model.safetensors`."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    else:
        tensors = state_dict if state_dict is not None else model.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, directory / "model.safetensors")


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, in full on the main process (empty on the others).

    Every process must call it: under FSDP the shards are gathered. `model` may be DDP- or FSDP-wrapped.
    """
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_training_state(
    directory: Path,
    *,
    optimizer_state: dict[str, Any] | None,
    lr_scheduler: Any | None,
    trainer_state: dict[str, Any],
    callback_states: dict[str, dict[str, Any]],
    config: dict[str, Any] | None,
) -> None:
    """Write the optimizer, scheduler, config and, last, the trainer state that marks the checkpoint complete."""
    if optimizer_state is not None:
        torch.save(optimizer_state, directory / OPTIMIZER_FILE)
    if lr_scheduler is not None:
        torch.save(lr_scheduler.state_dict(), directory / SCHEDULER_FILE)
    if config is not None:
        write_json(directory / CONFIG_FILE, config)
    write_json(directory / TRAINER_STATE_FILE, {"trainer": trainer_state, "callbacks": callback_states})


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch and CUDA random states (what `write_rng_state` stores)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "tensors": tensors,
    }


def write_rng_state(directory: Path, process_index: int, state: dict[str, Any]) -> None:
    """Store one process's random states as `rng_state_<rank>.json` + `.safetensors`."""
    write_json(directory / f"rng_state_{process_index}.json", {k: state[k] for k in ("python", "numpy")})
    save_file(state["tensors"], directory / f"rng_state_{process_index}.safetensors")


# --- reading ---------------------------------------------------------------------------------------------------


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step number in a checkpoint directory's name, or None if it is not one."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: str | os.PathLike) -> bool:
    """True for a finished checkpoint directory (its trainer state is written last)."""
    return (Path(path) / TRAINER_STATE_FILE).is_file()


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `checkpoint_dir`, oldest step first; temporary directories are never listed."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None and is_complete(p)]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def resolve_checkpoint(checkpoint_dir: str | os.PathLike, spec: str | os.PathLike | bool) -> Path:
    """Find the checkpoint to resume from.

    `spec` is `"latest"` or `True` (the `latest` pointer in `checkpoint_dir`, falling back to the newest complete
    checkpoint when the pointer is missing or names an incomplete one, with a warning) or a checkpoint path.
    """
    if spec is True or spec == "latest":
        root = Path(checkpoint_dir)
        pointer = root / LATEST_POINTER
        named = root / pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
        if named is not None and is_complete(named):
            return named
        candidates = list_checkpoints(root)
        if not candidates:
            raise CheckpointError(f"no complete checkpoint to resume from in {root}")
        reason = f"'latest' names {named.name}, which is incomplete" if named else "there is no 'latest' pointer"
        logger.warning("%s in %s; resuming from the newest complete checkpoint, %s", reason, root,
                       candidates[-1].name)
        return candidates[-1]
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path} is incomplete: {TRAINER_STATE_FILE} is missing")
    return path


def read_trainer_state(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The loop state and the callback states stored in a checkpoint."""
    data = _read_json(path / TRAINER_STATE_FILE)
    if not isinstance(data, dict) or not isinstance(data.get("trainer"), dict):
        raise CheckpointError(f"{path / TRAINER_STATE_FILE} does not hold a trainer state")
    return data["trainer"], data.get("callbacks", {})


def read_config(path: Path) -> dict[str, Any] | None:
    """The config saved with a checkpoint, or None if it has none."""
    file = path / CONFIG_FILE
    return _read_json(file) if file.is_file() else None


def load_weights(model: nn.Module, path: Path) -> None:
    """Load the weights of checkpoint `path` into `model` (PEFT adapter or full model, FSDP-sharded or not);
    report mismatches by name."""
    with _loading_full_tensors_into_shards(model):
        _load_weights(model, path)


def _load_weights(model: nn.Module, path: Path) -> None:
    adapter = path / ADAPTER_WEIGHTS_FILE
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        _apply(path, lambda: set_peft_model_state_dict(model, _load_safetensors(adapter)))
        return
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {path} has no weights ({ADAPTER_WEIGHTS_FILE} or model.safetensors)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(_load_safetensors(file))
    result = _apply(path, lambda: model.load_state_dict(state, strict=False))
    params = model.state_dict(keep_vars=True)
    loaded = {id(params[k]) for k in state if k in params}
    missing = [k for k in result.missing_keys if id(params[k]) not in loaded]  # tied weights count as loaded
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}"
        )


def load_optimizer_and_scheduler(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, lr_scheduler: Any
) -> None:
    """Restore optimizer and scheduler state (each FSDP process keeps its shards of the full optimizer state);
    refuses files holding anything but tensors and plain containers."""
    if optimizer is not None:
        state = _safe_torch_load(path / OPTIMIZER_FILE)
        options = StateDictOptions(full_state_dict=True)
        _apply(path, lambda: set_optimizer_state_dict(model, optimizer, state, options=options))
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(_safe_torch_load(path / SCHEDULER_FILE))


def load_rng_state(path: Path, process_index: int = 0) -> None:
    """Restore this process's random states, as stored by `write_rng_state`."""
    state = _read_json(path / f"rng_state_{process_index}.json")
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = _load_safetensors(path / f"rng_state_{process_index}.safetensors")
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)


# --- helpers ---------------------------------------------------------------------------------------------------


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON through a temporary sibling, so `path` is never left half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path} is not valid JSON: {exc}") from exc


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"checkpoint file {path} is corrupt: {exc}") from exc


def _safe_torch_load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code with UnpicklingError; corrupt zips raise others
        raise CheckpointError(
            f"refusing to load {path}: it is corrupt or holds objects other than tensors and plain containers "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc


@contextmanager
def _loading_full_tensors_into_shards(model: nn.Module) -> Iterator[None]:
    """While loading a state dict into `model`, turn each full tensor meant for a sharded (DTensor, FSDP2)
    parameter into this process's shard of it; a model without sharded parameters is left alone."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        yield
        return

    def shard(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        targets = module.state_dict(keep_vars=True)
        for key, value in state_dict.items():
            target = targets.get(key.removeprefix(prefix))
            if isinstance(target, DTensor) and not isinstance(value, DTensor):
                state_dict[key] = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements,
                                                    src_data_rank=None)  # every process holds the full tensor

    handle = model.register_load_state_dict_pre_hook(shard)
    try:
        yield
    finally:
        handle.remove()


def _apply(path: Path, load: Any) -> Any:
    """Run a state-dict load, turning shape mismatches into an error that names the checkpoint."""
    try:
        return load()
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} does not match this run: {exc}") from exc


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
