"""Durable file operations: hash a file, replace one atomically, make a rename survive a crash.

Every step that changes what is on disk (`write`, `fsync`, `rename`, `fsync_dir`, `unlink`,
`rmtree`) is announced to an optional *step hook* before it happens. Nothing in edgekit
depends on the hook; fault-injection tests install one (`set_step_hook`) to stop a process
before any chosen step and prove that every prefix of the sequence recovers. Stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "Step",
    "StepHook",
    "fsync_dir",
    "hash_file",
    "remove_file",
    "remove_tree",
    "rename",
    "set_step_hook",
    "step",
    "write_atomic",
    "write_json_atomic",
    "write_new",
]

DEFAULT_CHUNK_BYTES = 1 << 20
Step = Literal["write", "fsync", "rename", "fsync_dir", "unlink", "rmtree"]
StepHook = Callable[[Step, Path], None]
"""Called with the kind of a step and the path it changes, before the step happens."""

_hook: StepHook | None = None


def set_step_hook(hook: StepHook | None) -> StepHook | None:
    """Install `hook` (None removes it); returns the hook it replaces."""
    global _hook  # one process-wide hook, by design (fault injection)
    previous, _hook = _hook, hook
    return previous


def step(kind: Step, path: Path) -> None:
    """Announce a step to the hook (code that changes the disk without this module calls it)."""
    hook = _hook
    if hook is not None:
        hook(kind, Path(path))


def hash_file(path: Path, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[int, str]:
    """Size in bytes and hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    size = 0
    buffer = memoryview(bytearray(chunk_bytes))
    with open(path, "rb") as f:
        while count := f.readinto(buffer):
            digest.update(buffer[:count])
            size += count
    return size, digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename, creation or unlink in the folder `path` durable."""
    step("fsync_dir", path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace `path` with `data`: temp file beside it, fsync, rename, fsync of the folder.

    After a crash at any instant `path` holds the old bytes or the new ones, never a mix.
    The temp file is created with O_EXCL and mode 0600 (`mkstemp`) and gets `mode` before
    the rename. Raises `OSError`; on failure the temp file is removed.
    """
    path = Path(path)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            step("write", temp)
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            step("fsync", temp)
            os.fsync(f.fileno())
        rename(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, document: Any) -> None:
    """`write_atomic` of `document` as compact, sorted JSON and a newline (NaN refused)."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)
    write_atomic(path, text.encode() + b"\n")


def write_new(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist) holding `data`, fsync'd; the folder is not synced."""
    path = Path(path)
    step("write", path)
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        step("fsync", path)
        os.fsync(f.fileno())


def rename(source: Path, destination: Path) -> None:
    """`os.replace`, announced (fsync the destination's folder to make it durable)."""
    step("rename", Path(destination))
    os.replace(source, destination)


def remove_file(path: Path, *, sync: bool = True) -> bool:
    """Remove a file if it exists (then fsync its folder); False if it was absent."""
    path = Path(path)
    if not path.exists():
        return False
    step("unlink", path)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    if sync:
        fsync_dir(path.parent)
    return True


def remove_tree(path: Path) -> None:
    """Remove a directory tree if it exists (errors ignored: leftovers are retried later)."""
    path = Path(path)
    if not path.exists():
        return
    step("rmtree", path)
    shutil.rmtree(path, ignore_errors=True)
