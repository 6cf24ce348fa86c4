"""edgekit.files: atomic replacement holds at every step, and the step hook sees each one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edgekit import files


class _Stop(BaseException):
    """Ends the writer at a chosen step, as a kill would (nothing after it runs)."""


def _steps_of(action: object) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    previous = files.set_step_hook(lambda kind, path: seen.append((kind, path.name)))
    try:
        assert callable(action)
        action()
    finally:
        files.set_step_hook(previous)
    return seen


def test_write_atomic_announces_write_fsync_rename_and_directory_sync(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    steps = _steps_of(lambda: files.write_atomic(target, b"new"))
    assert [kind for kind, _ in steps] == ["write", "fsync", "rename", "fsync_dir"]
    assert steps[2][1] == "state.json"
    assert target.read_bytes() == b"new"


def test_a_stop_before_any_step_leaves_the_old_bytes_or_the_new(tmp_path: Path) -> None:
    target = tmp_path / "truststore.json"
    target.write_bytes(b"old")
    count = len(_steps_of(lambda: files.write_atomic(tmp_path / "probe", b"x")))
    for index in range(count + 1):
        target.write_bytes(b"old")
        calls = [0]

        def hook(_kind: str, _path: Path, *, at: int = index, calls: list[int] = calls) -> None:
            calls[0] += 1
            if calls[0] > at:
                raise _Stop

        previous = files.set_step_hook(hook)
        try:
            files.write_atomic(target, b"new")
        except _Stop:
            pass
        finally:
            files.set_step_hook(previous)
        assert target.read_bytes() in (b"old", b"new"), index
        assert (target.read_bytes() == b"new") == (index >= 3), index  # the rename decides
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_write_new_refuses_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "envelope.json"
    files.write_new(target, b"a")
    with pytest.raises(FileExistsError):
        files.write_new(target, b"b")
    assert target.read_bytes() == b"a"


def test_hash_file_streams_in_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert files.hash_file(path, chunk_bytes=4096) == (
        len(data),
        hashlib.sha256(data).hexdigest(),
    )


def test_remove_file_reports_absence(tmp_path: Path) -> None:
    path = tmp_path / "probation.json"
    assert files.remove_file(path) is False
    path.write_bytes(b"{}")
    assert files.remove_file(path) is True
    assert not path.exists()
