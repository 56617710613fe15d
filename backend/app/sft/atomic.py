"""The one way this library writes a file or a folder: so that a reader never finds half of one.

A file is written to a fresh temporary sibling (created exclusively, never through a link), flushed to disk,
renamed over its name, and the folder's entry is flushed too (the fsync rule, the same for every write). After a
crash, a kill or a full disk the path holds the previous file or the whole new one, and a link at the path is
replaced, never written through. `atomic_directory` does the same for a folder (checkpoints, merges, caches).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def discard_leftover(path: str | os.PathLike[str]) -> None:
    """Remove a leftover of an interrupted write or deletion (a `.tmp-`, `.old-` or `.deleting-` name): a folder
    with its files, a file, or a link itself (never what it points to); a missing one is fine."""
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


@contextmanager
def replacing_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """The path of a new, empty temporary file beside `path` for a writer that opens files itself; when the block
    succeeds the file replaces `path` (see the module's rule), when it fails `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    discard_leftover(tmp)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))  # ours, never a link
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        discard_leftover(tmp)
        raise
    fsync_dir(path.parent)


@contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A binary file to write `path`'s new content into; when the block succeeds it replaces `path` (see the
    module's rule), when it fails `path` is left as it was."""
    with replacing_path(path) as tmp, os.fdopen(os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW), "wb") as file:
        yield file


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically (`replacing`)."""
    with replacing(path) as file:
        file.write(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (`replacing`)."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write `data` as indented JSON to `path` atomically (`replacing`)."""
    write_text(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


@contextmanager
def atomic_directory(
    final: str | os.PathLike[str],
    *,
    shared: bool = False,
    on_failure: Callable[[Path, Exception], None] | None = None,
) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; when the block succeeds its files are flushed and it is renamed to
    `final` (an existing `final` is swapped out, then removed), when it fails it is removed.

    `shared`: several processes may write `final` at once (a cache): each writes its own uniquely named folder,
    and finding `final` already made by another is fine. Otherwise the folder is `.tmp-<name>` (a leftover of a
    killed write is recognised and removed). `on_failure(tmp, error)` runs before the temporary folder is removed
    and may raise a clearer error from `error`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if shared:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    else:
        tmp = final.parent / f".tmp-{final.name}"
        discard_leftover(tmp)
        tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists() and not final.is_symlink():  # replacing a folder: swap, then drop the old copy
            old = final.parent / f".old-{tmp.name.removeprefix('.tmp-')}"
            discard_leftover(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if final.is_symlink():
                final.unlink()  # a link is replaced, never written through
            try:
                os.replace(tmp, final)
            except OSError:
                if not (shared and final.is_dir()):  # another process stored the same entry first
                    raise
        fsync_dir(final.parent)
    except Exception as error:
        if on_failure is not None:
            on_failure(tmp, error)
        raise
    finally:  # the temporary folder, unless it became `final` (or another process's entry won the race)
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """Flush every file under `root`, and every folder's entries, to disk."""
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as file:
                os.fsync(file.fileno())
        fsync_dir(folder)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
