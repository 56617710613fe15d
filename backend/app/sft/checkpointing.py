"""Checkpoint files: atomic writes, safe loads, and the `latest` / `best` pointers.

A checkpoint is a directory `checkpoint_step_<N>/` holding:

- weights: `adapter_model.safetensors` + `adapter_config.json` (LoRA) or `model*.safetensors` + `config.json`;
- `optimizer.pt`, `scheduler.pt`: optimizer and LR-scheduler state, tensors and plain containers only
  (read back with `torch.load(weights_only=True)`); the optimizer state is keyed by parameter name and full
  (gathered from FSDP shards), so it loads whatever the wrapping or sharding;
- `rng_state_<rank>.json` + `rng_state_<rank>.safetensors`: python/numpy and torch/CUDA random states per process;
- `sft_config.json`: the resolved run config;
- `manifest.json`: the size and xxh3-64 checksum of every other file (`write_manifest`), so a truncated or damaged
  file is found before it is loaded (`verify_checkpoint`); checkpoints of older versions have none and still load;
- `trainer_state.json`: the loop state (step, epoch, data position, tokens, best metric, log history) and every
  callback's `state_dict()`, written last: its presence marks the checkpoint complete.

Everything is written into a hidden sibling directory (`.tmp-checkpoint_step_<N>`), flushed to disk, then renamed
into place, so a process killed at any instant leaves either the complete checkpoint or none. The small `latest` and
`best` files name the newest and best complete checkpoints by folder name and are replaced atomically too; a
pointer is only followed to a checkpoint directly inside its own checkpoint folder (symlinks and `..` resolved).
Loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import contextlib
import errno
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
import xxhash
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from app.sft import atomic
from app.sft.atomic import write_json, write_text
from app.sft.layout import Layout
from app.sft.modeling import quiet_missing_base_config
from app.sft.state import TrainerState

logger = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"
CONFIG_FILE = "sft_config.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"
LATEST_POINTER = "latest"
BEST_POINTER = "best"
_CHECKPOINT_NAME = re.compile(r"^checkpoint_step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the checkpoint and the file."""


# --- writing ---------------------------------------------------------------------------------------------------


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """`atomic.atomic_directory` for a checkpoint: a failed write is a `CheckpointError` naming the file being
    written (a full disk said as such), and nothing of the checkpoint is left."""
    final = Path(final)

    def explain(tmp: Path, exc: Exception) -> None:
        if isinstance(exc, CheckpointError):
            return
        message = _write_failure(final, tmp, exc)
        if message is not None:
            raise CheckpointError(message) from exc

    with atomic.atomic_directory(final, on_failure=explain) as tmp:
        yield tmp


def _write_failure(final: Path, tmp: Path, exc: BaseException) -> str | None:
    """One line for a failed checkpoint write naming the file being written; None for a failure that is not
    about writing files (a bug, which keeps its traceback).

    torch reports a full disk as `RuntimeError: ... unexpected pos`, safetensors as `os error 28`: a failure while
    the file system has no space left is reported as what it is.
    """
    named = Path(exc.filename) if isinstance(exc, OSError) and exc.filename else None
    written = [p for p in tmp.rglob("*") if p.is_file()] if tmp.is_dir() else []
    newest = named if named is not None else max(written, key=lambda p: p.stat().st_mtime_ns, default=None)
    file = final / newest.relative_to(tmp) if newest is not None and newest.is_relative_to(tmp) else newest or final
    where = f" while writing {file}"
    text = str(exc)
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "no space left" in text.lower()
    if not full:
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(final.parent).free < 1 << 20
    earlier = list_checkpoints(final.parent)
    if full:
        return (f"no space left on device{where} (errno ENOSPC: {os.strerror(errno.ENOSPC)}). "
                + ("Earlier checkpoints are untouched; free some space, then resume." if earlier else
                   "There is no checkpoint to resume from: no checkpoint was saved yet; free some space, then "
                   "start the run again."))
    if isinstance(exc, OSError) or "unexpected pos" in text or "serializ" in text.lower():
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else text.splitlines()[0] if text else exc
        return (f"could not write checkpoint {final}{where}: {reason}. "
                + ("Earlier checkpoints are untouched." if earlier else "No checkpoint was saved yet."))
    return None


def write_pointer(checkpoint_dir: str | os.PathLike, name: str, target: str | os.PathLike) -> None:
    """Atomically make `checkpoint_dir/name` (e.g. `latest`) name the checkpoint directory `target`, by its
    folder name (so the run folder can be copied or moved and still resumes)."""
    write_text(Path(checkpoint_dir) / name, Path(target).name + "\n")


def remove_pointer(checkpoint_dir: str | os.PathLike, name: str) -> None:
    """Remove the pointer file `checkpoint_dir/name` (e.g. `best` once no checkpoint holds the best)."""
    (Path(checkpoint_dir) / name).unlink(missing_ok=True)


def save_weights(model: nn.Module, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write a model's weights in safetensors: a PEFT adapter or a transformers model via `save_pretrained`,
    any other module as `model.safetensors`."""
    if hasattr(model, "save_pretrained"):
        with quiet_missing_base_config():
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
    write_manifest(directory)
    write_json(directory / TRAINER_STATE_FILE, {"trainer": trainer_state, "callbacks": callback_states})


def write_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None,
    rng_states: list[dict[str, Any]],
    optimizer_state: dict[str, Any] | None,
    lr_scheduler: Any | None,
    trainer_state: dict[str, Any],
    callback_states: dict[str, dict[str, Any]],
    config: dict[str, Any] | None,
    best: bool,
) -> None:
    """Write the complete checkpoint `path` atomically (weights, every process's random states, the training
    state), then point `latest`, and `best` when it holds the run's best, at it. Main process only."""
    with atomic_directory(path) as tmp:
        save_weights(model, tmp, state_dict)
        for rank, rng in enumerate(rng_states):
            write_rng_state(tmp, rank, rng)
        save_training_state(tmp, optimizer_state=optimizer_state, lr_scheduler=lr_scheduler,
                            trainer_state=trainer_state, callback_states=callback_states, config=config)
    write_pointer(path.parent, LATEST_POINTER, path)
    if best:
        write_pointer(path.parent, BEST_POINTER, path)


def write_manifest(directory: Path) -> None:
    """Record the size and checksum of every file of a checkpoint being written in `manifest.json`.

    Called after all files but the trainer state (written last, it is checked as JSON when read).
    """
    files = {
        path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "xxh3_64": file_checksum(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name not in (MANIFEST_FILE, TRAINER_STATE_FILE)
    }
    write_json(directory / MANIFEST_FILE, {"version": 1, "files": files})


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
    """True for a finished checkpoint directory (its trainer state is written last) whose files have the sizes
    its manifest recorded."""
    return (Path(path) / TRAINER_STATE_FILE).is_file() and verify_checkpoint(path, checksums=False) is None


def verify_checkpoint(path: str | os.PathLike, *, checksums: bool = True) -> str | None:
    """None when every file in the checkpoint's manifest is there with its recorded size (and, with `checksums`,
    its checksum); else the problem, naming the file. A checkpoint without a manifest (older versions) passes."""
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        return None
    try:
        files = json.loads(manifest_file.read_bytes().decode("utf-8"))["files"]
        entries = [(str(name), int(entry["size"]), entry.get("xxh3_64")) for name, entry in files.items()]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return f"{manifest_file} is damaged (not a manifest of file sizes)"
    for name, size, checksum in entries:
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not file.is_file():
            return f"{file} is missing"
        try:
            actual = file.stat().st_size
            if actual != size:
                return f"{file} is corrupt: it has {actual} bytes where {MANIFEST_FILE} recorded {size} (truncated?)"
            if checksums and checksum is not None and file_checksum(file) != checksum:
                return f"{file} is corrupt: its checksum differs from the one {MANIFEST_FILE} recorded"
        except FileNotFoundError:  # deleted while we looked (a running training rotating its checkpoints)
            return f"{file} is missing"
    return None


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints directly inside `checkpoint_dir`, oldest step first; temporary directories and
    links to folders elsewhere are never listed."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and checkpoint_step(p) is not None and is_inside(p, root) and is_complete(p)]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def read_pointer(checkpoint_dir: str | os.PathLike, name: str) -> tuple[Path | None, str | None]:
    """(the checkpoint the pointer file `name` names, None) or (None, why it is not usable).

    A pointer may only name a checkpoint folder directly inside `checkpoint_dir`, after resolving symlinks and
    `..`. An absolute path (older versions wrote those) is accepted when it is inside, else re-rooted by its
    folder name when this folder has a checkpoint of that name (a copied or moved run).
    """
    root = Path(checkpoint_dir)
    pointer = root / name
    if pointer.is_symlink():  # never read through it: it may lead to any file
        return None, f"the pointer file {pointer} is a symbolic link, not a pointer written by a run"
    if not pointer.is_file():
        return None, f"there is no '{name}' pointer"
    try:
        text = pointer.read_bytes()[:4096].decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None, f"the pointer file {pointer} is not text"
    named = Path(text)
    # An absolute path (older versions) is re-rooted by its folder name; a relative one must be a bare name.
    candidate = root / named.name if named.is_absolute() or len(named.parts) == 1 else None
    if candidate is None or "\x00" in text or checkpoint_step(candidate) is None or not is_inside(candidate, root):
        return None, f"the pointer file {pointer} names {text[:200]!r}, which is not a checkpoint inside {root}"
    if not (candidate / TRAINER_STATE_FILE).is_file():
        return None, f"the pointer file {pointer} names {candidate.name}, which is incomplete or missing"
    return candidate, None


def resolve_checkpoint(checkpoint_dir: str | os.PathLike, spec: str | os.PathLike | bool) -> Path:
    """Find the checkpoint to resume from.

    `spec` is `"latest"` or `True` (the `latest` pointer in `checkpoint_dir`, falling back with a warning to the
    newest complete checkpoint whose files match its manifest and whose trainer state reads when the pointer is
    missing or a link, names anything but a complete checkpoint inside `checkpoint_dir`, or names one with a
    damaged file) or a checkpoint path (whose files the loaders and then `check_manifest` check, naming a damaged
    one in a `CheckpointError`).
    """
    if spec is True or spec == "latest":
        root = Path(checkpoint_dir)
        named, reason = read_pointer(root, LATEST_POINTER)
        candidates = [named] if named is not None else []
        candidates += [p for p in reversed(list_checkpoints(root)) if p != named]
        for candidate in candidates:
            problem = verify_checkpoint(candidate) or _trainer_state_problem(candidate)
            if problem is None:
                if reason is not None:
                    logger.warning("%s; resuming from the newest complete checkpoint, %s", reason, candidate.name)
                return candidate
            reason = f"checkpoint {candidate.name} is damaged: {problem}"
        raise CheckpointError(f"no complete checkpoint to resume from in {root}" + (f" ({reason})" if reason and
                                                                                    candidates else ""))
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    if not (path / TRAINER_STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {TRAINER_STATE_FILE} is missing")
    return path


def _trainer_state_problem(path: Path) -> str | None:
    """Why the trainer state of checkpoint `path` cannot be read (naming the file), or None."""
    try:
        read_trainer_state(path)
    except CheckpointError as exc:
        return str(exc)
    return None


def check_manifest(path: str | os.PathLike) -> None:
    """Raise a `CheckpointError` naming the file when a checkpoint's files differ from its manifest (sizes and
    checksums): damage the loaders cannot see, such as a changed byte inside a tensor."""
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")


def read_trainer_state(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The loop state and the callback states stored in a checkpoint."""
    data = _read_json(path / TRAINER_STATE_FILE)
    if not isinstance(data, dict) or not isinstance(data.get("trainer"), dict):
        raise CheckpointError(f"{path / TRAINER_STATE_FILE} does not hold a trainer state")
    trainer = data["trainer"]
    problem = TrainerState.type_problem(trainer)
    if problem is None:
        problem = _value_problem(trainer)
    if problem is None and not isinstance(trainer.get("num_processes", 1), int):
        problem = f"field 'num_processes' must be int, got {trainer['num_processes']!r}"
    if problem is None and "layout" in trainer:
        problem = _layout_problem(trainer["layout"], trainer.get("num_processes", 1))
    if problem is None and not isinstance(data.get("callbacks", {}), dict):
        problem = f"field 'callbacks' must be an object, got {data['callbacks']!r}"
    if problem is not None:
        raise CheckpointError(f"{path / TRAINER_STATE_FILE}: {problem} (the file is damaged or was edited)")
    best = trainer.get("best_checkpoint")
    if best is not None and checkpoint_step(Path(best).name) is None:  # edited: the best is kept by no checkpoint
        logger.warning("%s: 'best_checkpoint' %.200r names no checkpoint folder (checkpoint_step_<N>); no "
                       "checkpoint is taken as the best", path / TRAINER_STATE_FILE, best)
        trainer = {**trainer, "best_checkpoint": None}
    return trainer, data.get("callbacks", {})


def _value_problem(trainer: dict[str, Any]) -> str | None:
    """A counter of the trainer state below zero or a `log_history` record without its step, or None."""
    for name in ("global_step", "epoch", "batch_in_epoch", "train_tokens", "epoch_tokens", "max_steps"):
        if trainer.get(name, 0) < 0:
            return f"field {name!r} must not be negative, got {trainer[name]!r}"
    for index, record in enumerate(trainer.get("log_history", [])):
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
            return f"field 'log_history' entry {index} must be an object with an integer 'step', got {record!r:.200}"
    return None


def _layout_problem(data: Any, processes: int) -> str | None:
    """What is wrong with a saved layout (see `layout.Layout`), or None."""
    try:
        layout = Layout.from_dict(data)
    except ValueError as exc:
        return str(exc)
    if layout.processes != processes:
        return f"field 'layout.processes' is {layout.processes} but 'num_processes' is {processes}"
    return None


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
    file = path / f"rng_state_{process_index}.json"
    state = _read_json(file)
    try:
        version, internal, gauss = state["python"]
        kind, keys, pos, has_gauss, cached = state["numpy"]
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise CheckpointError(f"{file} does not hold random states (the file is damaged or was edited)") from exc
    file = path / f"rng_state_{process_index}.safetensors"
    tensors = _load_safetensors(file)
    try:
        torch.set_rng_state(tensors["torch_cpu"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{file} does not hold random states (the file is damaged or was edited)") from exc
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)


# --- helpers ---------------------------------------------------------------------------------------------------


def is_inside(path: Path, root: Path) -> bool:
    """Whether `path` is directly inside folder `root`, after resolving symlinks and `..` of both."""
    return path.resolve().parent == root.resolve()


def file_checksum(path: Path) -> str:
    """xxh3-64 of a file's bytes, as hex (about 10 GB/s: sha256 would add ~0.75 s per GB to every save)."""
    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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
