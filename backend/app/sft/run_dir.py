"""One run per folder: the checks on `output_dir` / `checkpoint_dir` and the exclusive run lock.

`SFTTrainer.train()` runs inside `run_folder(...)`, which, on the main process:

1. refuses folders that would clobber the user's own files (`check_run_paths`): the current directory or one
   of its parents, the base model's folder, the dataset's folder, a `checkpoint_dir` that is a file;
2. takes the lock file `output_dir/.sft-run.lock` for the whole run (`RunLock`, `fcntl.flock` on a file holding
   the holder's pid, host name and start time as JSON), and the same lock in every checkpoint folder, so two
   runs never share one. A second run on a locked folder is refused with one message naming the field and the
   holder; the lock of a process that died (same host, pid gone) is taken over with a
   warning; the lock is released on exit, also after an exception; a lock file that is a link is refused;
3. looks at what the folders hold (`prepare_run_folder`): a NEW run in a folder that already holds a run of ours
   is refused (offering `--resume`, a new `output_dir` or `--overwrite`); `overwrite` deletes only our own files
   (`clear_run_files`: the known output names, checkpoints named like ours); a non-empty folder holding no run
   of ours is refused either way. The empty folders the run's CheckpointCallbacks made are the run's own. The
   leftovers of an interrupted checkpoint deletion (`.deleting-checkpoint_step_<N>`) are removed.

Every refusal is a `ConfigError` (exit code 2 on the command line) naming the field and the reason.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from app.sft.atomic import discard_leftover
from app.sft.config import ConfigError, SFTConfig
from app.sft.paths import GENERATIONS_DIR, LOGGER_FOLDERS, TENSORBOARD_DIR

logger = logging.getLogger(__name__)

LOCK_FILE = ".sft-run.lock"
"""The run lock inside `output_dir`; it exists only while a run holds it (or after a process was killed)."""

RUN_MARKERS = ("metrics.jsonl", "training_summary.json")
"""Files in `output_dir` that show a run of ours started there (`metrics.jsonl` is opened at the first step)."""

OUTPUT_FILES = frozenset({
    "metrics.jsonl", "training_summary.json", "report.html", "loss.png", "config.yaml",
    "adapter_model.safetensors", "adapter_config.json", "README.md",
    "model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "sft_merge.json",
})
"""The files a run writes into `output_dir` (and `merged/`); `--overwrite` deletes these names only."""

RECORD_FILES = frozenset({"metrics.jsonl", "training_summary.json", "report.html", "loss.png", "config.yaml"})
"""The output names that record the run rather than hold its model (the rest of `OUTPUT_FILES`: `model_files`)."""

_MODEL_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_CHECKPOINT_ENTRY = re.compile(r"^(\.tmp-|\.old-|\.deleting-)?checkpoint_step_\d+(\.pt|\.pt\.partial)?$")
_DELETION_LEFTOVER = re.compile(r"^\.deleting-checkpoint_step_\d+(\.pt)?$")
_POINTER_FILES = frozenset({"latest", "best", ".tmp-latest", ".tmp-best"})
_TENSORBOARD_FILE = re.compile(r"^events\.out\.tfevents\.")
_METRICS_TMP = re.compile(r"^\.metrics\.jsonl\..*\.tmp$")
_GENERATIONS_FILE = re.compile(r"^(step_\d+|eval_[\w.-]+)\.jsonl$")
"""The samples of evaluation by generation (`generations/step_<N>.jsonl`, `sft eval --generate`'s `eval_*.jsonl`)."""


STAGING_DIR = ".tmp-outputs"
"""Where a run writes its final outputs before moving each file into `output_dir` (`staged_outputs`)."""


class RunLockedError(ConfigError):
    """Another live process holds the run folder's lock; the message names its pid, host and start time."""


# ---------------------------------------------------------------------------------------------- the whole run


@contextlib.contextmanager
def run_folder(config: SFTConfig, *, resuming: bool, overwrite: bool = False, accelerator: Any = None,
               checkpoint_dirs: Sequence[str | os.PathLike] = ()) -> Iterator[None]:
    """Check the run's folders, hold the run locks and (with `overwrite`) clear the previous run's files.

    `checkpoint_dirs` are the folders of the CheckpointCallbacks the run was given (the first one is the run's
    checkpoint folder); without any, the config's `checkpoint_dir`. Only the main process checks and locks
    (`accelerator.is_main_process`); under several processes its verdict is broadcast, so every process raises
    the same `ConfigError` instead of the others waiting forever.
    """
    is_main = accelerator is None or accelerator.is_main_process
    locks: list[RunLock] = []
    failure: Exception | None = None
    if is_main:
        folders = [Path(folder) for folder in checkpoint_dirs] or [Path(config.resolved_checkpoint_dir)]
        try:
            check_run_paths(config, explicit_checkpoint_dir=bool(checkpoint_dirs))
            for field, folder in _locked_folders(config, folders):
                locks.append(RunLock(folder, field=field))
                locks[-1].acquire()
            prepare_run_folder(config, resuming=resuming, overwrite=overwrite, checkpoint_dirs=folders)
        except Exception as error:  # every process must learn of it, or the others wait forever
            failure = error
            for lock in reversed(locks):
                lock.release()
            locks = []
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        verdict = [None if failure is None else (isinstance(failure, ConfigError), str(failure))]
        verdict = broadcast_object_list(verdict, from_process=0)[0]
        if verdict is not None and failure is None:
            is_config_error, message = verdict
            failure = ConfigError(message) if is_config_error else RuntimeError(f"the main process failed: {message}")
    if failure is not None:
        raise failure
    try:
        yield
    finally:
        for lock in reversed(locks):
            lock.release()


def _locked_folders(config: SFTConfig, checkpoint_dirs: list[Path]) -> list[tuple[str, Path]]:
    """(field, folder) of every folder the run locks: `output_dir` and each checkpoint folder (also the default
    one inside it, so that a run naming another run's checkpoint folder as its `checkpoint_dir` is refused)."""
    found = [("output_dir", Path(config.output_dir))]
    seen = {found[0][1].expanduser().resolve()}
    for folder in checkpoint_dirs:
        resolved = folder.expanduser().resolve()
        if resolved not in seen:
            seen.add(resolved)
            found.append(("checkpoint_dir", folder))
    return found


@contextlib.contextmanager
def staged_outputs(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder inside `folder`; when the block succeeds, move each file written there into
    `folder` with one rename (a link of the same name in `folder` is replaced, never written through)."""
    folder = Path(folder)
    staging = folder / STAGING_DIR
    discard_leftover(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
        _move_into(staging, folder)
    finally:
        discard_leftover(staging)


def _move_into(source: Path, target: Path) -> None:
    for entry in sorted(source.iterdir()):
        destination = target / entry.name
        if entry.is_dir() and destination.is_dir() and not destination.is_symlink():
            _move_into(entry, destination)
            continue
        if entry.is_dir() and destination.is_symlink():
            destination.unlink()  # a folder cannot be renamed over a link
        os.replace(entry, destination)


# ---------------------------------------------------------------------------------------------- path checks


def check_run_paths(config: SFTConfig, *, explicit_checkpoint_dir: bool = False) -> None:
    """Refuse an `output_dir` / `checkpoint_dir` that would overwrite the user's files, naming field and reason.

    Refused: the current directory or one of its parents; the folder of a local `base_model`, `dataset_name`
    or `eval_dataset_name` (or a parent of it); an existing file. `checkpoint_dir` is checked the same way when
    it is set, and reported under its own name. The default `<output_dir>/checkpoints` may not be a symbolic
    link (rotation and `--overwrite` delete in it; a folder elsewhere must be named as `checkpoint_dir`, which
    then gets its own lock); `explicit_checkpoint_dir` says the run's CheckpointCallback named its folder. Nor
    may the folders the loggers write into inside `output_dir` (`paths.LOGGER_FOLDERS`).
    """
    cwd = Path.cwd().resolve()
    inputs = _input_folders(config)
    problems = []
    folders = [("output_dir", config.output_dir)]
    checkpoint_field = "checkpoint_dir" if config.checkpoint_dir is not None else "checkpoint_dir (default)"
    folders.append((checkpoint_field, config.resolved_checkpoint_dir))
    for field, value in folders:
        folder = Path(value).expanduser().resolve()
        if folder.exists() and not folder.is_dir():
            problems.append(f"{field}: {value!r} exists and is a file, not a folder")
            continue
        if field != "output_dir" and config.checkpoint_dir is None:
            link = Path(value)
            if link.is_symlink() and not explicit_checkpoint_dir:
                problems.append(
                    f"{field}: {value!r} is a symbolic link to {os.path.realpath(link)}; a run deletes old "
                    "checkpoints in its checkpoint folder and never through a link it did not make. To keep the "
                    "checkpoints there, set checkpoint_dir to that folder (it is then locked for the run), or "
                    "remove the link"
                )
            continue  # the default <output_dir>/checkpoints is covered by the checks of output_dir
        if folder == cwd or folder in cwd.parents:
            where = "the current directory" if folder == cwd else f"a parent of the current directory {cwd}"
            problems.append(
                f"{field}: {value!r} is {where}; a run writes config.yaml, README.md, metrics.jsonl and weights "
                "into it and would overwrite your files there. Use a folder of its own, e.g. outputs/<run name>"
            )
            continue
        for input_field, input_folder in inputs:
            if folder == input_folder or folder in input_folder.parents:
                problems.append(
                    f"{field}: {value!r} is the folder of {input_field} ({input_folder}); the run's files would "
                    f"overwrite or mix with it. Use a folder of its own, e.g. outputs/<run name>"
                )
                break
    for name in LOGGER_FOLDERS:
        problem = linked_folder_problem(Path(config.output_dir) / name)
        if problem is not None:
            problems.append(f"output_dir: {problem}")
    if problems:
        raise ConfigError("\n".join(problems), problems)


def linked_folder_problem(folder: Path) -> str | None:
    """Why the run may not write into `folder` inside its run folder (a symbolic link), or None."""
    if not folder.is_symlink():
        return None
    return (f"{str(folder)!r} is a symbolic link to {os.path.realpath(folder)}; a run writes into its own folders "
            "and never through a link it did not make. Remove the link (a logger can be given another folder: "
            "TensorBoardCallback(log_dir=...), WANDB_DIR, mlflow_tracking_uri)")


def _input_folders(config: SFTConfig) -> list[tuple[str, Path]]:
    """(field, folder) of each local input: the base model's and the datasets' folders (a file: its folder)."""
    found = []
    for field in ("base_model", "dataset_name", "eval_dataset_name"):
        value = getattr(config, field)
        if not value:
            continue
        if field == "base_model" and value.startswith("package://"):
            from app.sft.modeling import package_file

            try:
                value = str(package_file(value))
            except (FileNotFoundError, ConfigError):
                continue  # reported when the model is loaded
        path = Path(value).expanduser()
        if path.exists():
            path = path.resolve()
            found.append((field, path if path.is_dir() else path.parent))
    return found


# ---------------------------------------------------------------------------------------------- what is there


def prepare_run_folder(config: SFTConfig, *, resuming: bool, overwrite: bool,
                       checkpoint_dirs: Sequence[Path] = ()) -> None:
    """Refuse a folder holding someone else's files, or (for a new run) a run of ours unless `overwrite`,
    which then deletes that run's files; then remove the leftovers of interrupted checkpoint deletions.

    `checkpoint_dirs`: the run's checkpoint folders, the first one the run's own (default: the config's)."""
    output_dir = Path(config.output_dir)
    own = list(checkpoint_dirs) or [Path(config.resolved_checkpoint_dir)]
    checkpoint_dir = own[0]
    has_run = holds_run(output_dir, checkpoint_dir)
    if has_run and not resuming and not overwrite:
        raise ConfigError(
            f"output_dir: {str(output_dir)!r} already holds a run (its metrics.jsonl, checkpoints, outputs). "
            "Continue it with --resume (train(resume_from_checkpoint='latest')), choose a new output_dir, or "
            "replace it with --overwrite (overwrite_output_dir: true), which deletes that run's files only."
        )
    if not has_run:
        for field, folder in (("output_dir", output_dir), ("checkpoint_dir", checkpoint_dir)):
            foreign = _foreign_entries(folder, own)
            if foreign:
                shown = ", ".join(sorted(foreign)[:5]) + (", ..." if len(foreign) > 5 else "")
                raise ConfigError(
                    f"{field}: {str(folder)!r} is not empty ({shown}) and holds no run of ours; a run would "
                    "overwrite or mix with those files. Use an empty or new folder."
                )
    elif not resuming:
        removed = clear_run_files(output_dir, checkpoint_dir)
        logger.warning("overwrite: deleted %d files and folders of the previous run in %s", removed, output_dir)
    for folder in own:
        for name in _names(folder):
            if _DELETION_LEFTOVER.match(name):
                logger.info("Removing %s, left by an interrupted checkpoint deletion", folder / name)
                discard_leftover(folder / name)


def holds_run(output_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike | None = None) -> bool:
    """Whether the folders hold a run of ours: its metrics log or summary, or checkpoints/pointers."""
    output_dir = Path(output_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else output_dir / "checkpoints"
    if any((output_dir / name).exists() for name in RUN_MARKERS):
        return True
    return any(_CHECKPOINT_ENTRY.match(name) or name in _POINTER_FILES for name in _names(checkpoint_dir))


def _holds_only_generations(path: Path) -> bool:
    """`path` is our `generations/` folder, holding nothing but samples files of ours."""
    return (path.name == GENERATIONS_DIR and path.is_dir() and not path.is_symlink()
            and all(_GENERATIONS_FILE.match(name) and (path / name).is_file() for name in _names(path)))


def _foreign_entries(folder: Path, own: list[Path]) -> list[str]:
    """Entries of `folder` that are not ours: anything but the lock, the empty checkpoint folders of the run
    (and folders holding nothing but those), and our own temporary files."""
    foreign = []
    own_resolved = {path.resolve() for path in own}
    for name in _names(folder):
        path = folder / name
        if name == LOCK_FILE or _METRICS_TMP.match(name):
            continue
        if _made_for_checkpoints(path, own_resolved):
            continue
        if _holds_only_generations(path):
            continue
        foreign.append(name)
    return foreign


def _made_for_checkpoints(path: Path, own: set[Path]) -> bool:
    """`path` is an empty checkpoint folder of the run, or a folder holding nothing but such folders (the
    parents a CheckpointCallback made with its folder); never a link."""
    if not path.is_dir() or path.is_symlink():
        return False
    names = [name for name in _names(path) if name != LOCK_FILE]
    if path.resolve() in own:
        return not names
    return bool(names) and all(_made_for_checkpoints(path / name, own) for name in names)


def clear_run_files(output_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike | None = None) -> int:
    """Delete a previous run's files, and nothing else: the known output names in `output_dir` and `merged/`,
    TensorBoard event files, and in `checkpoint_dir` the entries named like our checkpoints and pointers.

    A symlink is never followed (it is left, with a warning); a `config.yaml` or `README.md` is deleted only
    when it is the one a run writes (the full resolved config; peft's model card). Returns how many entries
    were deleted.
    """
    output_dir = Path(output_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else output_dir / "checkpoints"
    removed = 0
    for name in _names(checkpoint_dir):
        if _CHECKPOINT_ENTRY.match(name) or name in _POINTER_FILES:
            removed += _delete(checkpoint_dir / name, tree=True)
    removed += _clear_model_files(output_dir)
    merged = output_dir / "merged"
    if merged.is_dir() and not merged.is_symlink():
        removed += _clear_model_files(merged)
        _rmdir_if_empty(merged)
    generations = output_dir / GENERATIONS_DIR
    if _holds_only_generations(generations):
        for name in _names(generations):
            removed += _delete(generations / name, tree=False)
        _rmdir_if_empty(generations)
    tensorboard = output_dir / TENSORBOARD_DIR
    if tensorboard.is_dir() and not tensorboard.is_symlink():
        for name in _names(tensorboard):
            if _TENSORBOARD_FILE.match(name):
                removed += _delete(tensorboard / name, tree=False)
        _rmdir_if_empty(tensorboard)
    for name in _names(output_dir):
        if _METRICS_TMP.match(name):
            removed += _delete(output_dir / name, tree=False)
    if (output_dir / STAGING_DIR).is_dir():
        removed += _delete(output_dir / STAGING_DIR, tree=True)
    return removed


def model_files(folder: str | os.PathLike) -> list[Path]:
    """The saved adapter or model, its tokenizer and model card in `folder` (regular files only), sorted."""
    folder = Path(folder)
    names = [name for name in _names(folder)
             if (name in OUTPUT_FILES and name not in RECORD_FILES) or _MODEL_SHARD.match(name)]
    return sorted(folder / name for name in names if (folder / name).is_file() and not (folder / name).is_symlink())


def _clear_model_files(folder: Path) -> int:
    removed = 0
    for name in _names(folder):
        path = folder / name
        if not (name in OUTPUT_FILES or _MODEL_SHARD.match(name)):
            continue
        if name == "config.yaml" and not _is_written_config(path):
            continue
        if name == "README.md" and not _is_peft_model_card(path):
            continue
        removed += _delete(path, tree=False)
    return removed


def _is_written_config(path: Path) -> bool:
    """A `config.yaml` a run wrote holds every SFTConfig field (a user's own config names a few)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and set(data) == set(SFTConfig.model_fields)


def _is_peft_model_card(path: Path) -> bool:
    try:
        return "library_name: peft" in path.read_text(encoding="utf-8", errors="replace")[:2000]
    except OSError:
        return False


def _delete(path: Path, *, tree: bool) -> int:
    """Delete one entry of ours (a folder only when `tree`); symlinks are left alone, with a warning."""
    if path.is_symlink():
        logger.warning("overwrite: leaving %s alone: it is a symbolic link, not a file of this run", path)
        return 0
    if path.is_dir():
        if not tree:
            return 0
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    return 1


def _rmdir_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []


# ---------------------------------------------------------------------------------------------- the lock


class RunLock:
    """An exclusive lock on a run folder: `folder/.sft-run.lock`, held with `fcntl.flock` while the run lasts.

    The file holds the holder's `pid`, `host` and `started` time as JSON. `acquire()` raises `RunLockedError`
    naming the holder when a live process has it; a lock left by a dead process (same host, its pid gone, its
    flock released by the kernel) is taken over with a warning. A lock written on another host is never taken
    over (its process cannot be checked from here); the message says which file to delete if that run is gone.
    A lock file that is a symbolic link is refused (it is never written through). Messages name `field`, the
    config field of the folder. Usable as a context manager.
    """

    def __init__(self, folder: str | os.PathLike, field: str = "output_dir") -> None:
        self.folder = Path(folder)
        self.field = field
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._made_folder = False  # the folder did not exist: removed again on release when it stays empty

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise `RunLockedError` (`ConfigError`) naming the process that holds it."""
        import fcntl

        if self._fd is not None:
            return
        try:
            self._made_folder = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"{self.field}: {str(self.folder)!r} cannot be created: {error.strerror or error}"
                              ) from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as error:
                if self.path.is_symlink():
                    raise ConfigError(
                        f"{self.field}: the run lock {self.path} is a symbolic link (to {os.readlink(self.path)}); "
                        "a run's lock is a file of its own and is never written through a link. Remove the link"
                    ) from None
                raise ConfigError(f"{self.field}: cannot create the run lock {self.path}: "
                                  f"{error.strerror or error}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    logger.warning("The file system of %s cannot lock files; only the pid in the lock file keeps "
                                   "a second run out", self.path)
                else:
                    holder = _read_holder(fd)
                    os.close(fd)
                    if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                    raise RunLockedError(self._held_message(holder)) from None
            if not self._is_current_file(fd):  # the previous holder removed it as we opened it: try again
                os.close(fd)
                continue
            holder = _read_holder(fd)
            if holder is not None and not self._is_stale(holder):
                os.close(fd)
                raise RunLockedError(self._held_message(holder))
            if holder is not None:
                logger.warning("Taking over the stale run lock %s of process %s on %s (started %s): that process "
                               "is no longer running", self.path, holder.get("pid"), holder.get("host"),
                               holder.get("started"))
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": datetime.now().astimezone().isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
            self._fd = fd
            return

    def release(self) -> None:
        """Remove the lock file (and the folder when acquire made it and it stayed empty) and release the lock;
        safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._is_current_file(fd):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # closing releases the flock
        if self._made_folder:
            _rmdir_if_empty(self.folder)

    def _is_current_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _is_stale(holder: dict[str, Any]) -> bool:
        """A holder whose flock is gone: stale when it ran on this host and its pid is not running."""
        if holder.get("host") != socket.gethostname():
            return False
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return True
        if pid == os.getpid():
            return True  # this process left it (its flock is gone, so no RunLock of ours holds it)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _held_message(self, holder: dict[str, Any] | None) -> str:
        if holder is None:
            who = "another process"
        else:
            who = f"process {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')})"
        remote = holder is not None and holder.get("host") != socket.gethostname()
        hint = (f"; if that run is no longer running, delete {self.path}" if remote
                else "; wait for it to finish, or stop it (then resume with --resume)")
        return (f"{self.field}: {str(self.folder)!r} is in use by another training run: {who} holds {self.path}"
                f"{hint}, or use another {self.field}")


def _read_holder(fd: int) -> dict[str, Any] | None:
    """The JSON a lock file holds, or None when it is empty or not a holder record."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
