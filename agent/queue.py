"""A bounded, crash-safe, ordered on-disk FIFO for MQTT messages the agent could not send yet.

Layout (one directory)::

    00000000000000000042.msg   one message per file, named by its id (zero-padded, so names
                               sort in id order)
    state.json                 {"dropped", "dropped_through", "last_id"}: written atomically
    .lock                      flock held while a DiskQueue has the directory open

Why one file per message rather than an append-only segment: a message becomes visible only
through `rename()` of a fully written, fsynced temporary file, so a SIGKILL or power cut can
never leave a torn record that later records depend on; removing an acknowledged message is
one `unlink()` instead of rewriting a segment or keeping a separate ack pointer; and a corrupt
file (an SD card that lost a block) costs that one message, not the rest of a segment. Agent
messages are small and few (one telemetry message per interval, events on transitions), so
the per-file overhead is noise. Each file carries a CRC32 over its header and payload; files
that fail it are logged, removed and counted in `corrupt`, never raised.

Delivery is at least once: an acknowledged message whose `unlink()` did not reach the disk
before a power cut is sent again (telemetry carries `seq` so consumers can discard repeats).
Overflow drops the oldest messages first and adds them to the persisted `dropped` counter;
`dropped_through` makes that count idempotent if the agent dies between counting and deleting.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.files import fsync_dir

__all__ = ["DiskQueue", "QueueError", "QueuedMessage"]

log = logging.getLogger(__name__)

_MAGIC = b"EKQ1"
_PREFIX = struct.Struct(">4sII")  # magic, crc32 of everything after the prefix, header length
_SUFFIX = ".msg"
_TEMP_SUFFIX = ".tmp"
_STATE = "state.json"
_LOCK = ".lock"
_ID_DIGITS = 20


class QueueError(EdgekitError):
    """The on-disk queue cannot be opened or cannot take a message (disk full, too large)."""


@dataclass(frozen=True)
class QueuedMessage:
    """One queued MQTT message; `id` increases with every `put` (also across restarts)."""

    id: int
    topic: str
    payload: bytes
    qos: int
    queued_at: float  # seconds since the epoch


def _encode(topic: str, payload: bytes, qos: int, queued_at: float) -> bytes:
    header = json.dumps({"topic": topic, "qos": qos, "ts": queued_at}).encode()
    body = header + payload
    crc = zlib.crc32(body)
    return _PREFIX.pack(_MAGIC, crc, len(header)) + body


def _decode(message_id: int, data: bytes) -> QueuedMessage:
    """Parse one file's bytes; ValueError when it is not an intact record."""
    if len(data) < _PREFIX.size:
        raise ValueError(f"{len(data)} bytes is shorter than the record prefix")
    magic, crc, header_length = _PREFIX.unpack_from(data)
    if magic != _MAGIC:
        raise ValueError(f"bad magic {magic!r}")
    body = data[_PREFIX.size :]
    if zlib.crc32(body) != crc:
        raise ValueError("checksum mismatch")
    if header_length > len(body):
        raise ValueError("header length beyond the end of the record")
    header = json.loads(body[:header_length])
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    topic, qos, queued_at = header.get("topic"), header.get("qos"), header.get("ts")
    if (
        not isinstance(topic, str)
        or qos not in (0, 1, 2)
        or not isinstance(queued_at, (int, float))
    ):
        raise ValueError("header lacks topic, qos or ts")
    return QueuedMessage(message_id, topic, bytes(body[header_length:]), qos, float(queued_at))


class DiskQueue:
    """Bounded FIFO of (topic, payload, qos) in `directory`; see the module docstring.

    `max_messages` and `max_bytes` (file sizes, headers included) bound the queue; a `put`
    beyond either drops the oldest messages. Thread-safe; one process at a time per directory.
    """

    def __init__(
        self, directory: Path, *, max_messages: int, max_bytes: int, fsync: bool = True
    ) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise QueueError(
                f"queue bounds must be positive; found max_messages={max_messages}, "
                f"max_bytes={max_bytes}"
            )
        self.directory = Path(directory)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._fsync = fsync
        self._lock = threading.Lock()
        self._sizes: dict[int, int] = {}  # id -> file size, in id order
        self._bytes = 0
        self._dropped = 0
        self._dropped_through = 0
        self._last_id = 0
        self.corrupt = 0
        """Messages found damaged and removed since this queue was opened."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_file = (self.directory / _LOCK).open("a+b")
        except OSError as error:
            raise QueueError(
                f"cannot open the message queue directory {self.directory}: {error.strerror}; "
                "check the agent's data_dir and its permissions"
            ) from error
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            self._lock_file.close()
            raise QueueError(
                f"message queue {self.directory} is in use by another process; run one agent "
                "per data_dir"
            ) from error
        self._load()

    # -- opening -------------------------------------------------------------------------

    def _load(self) -> None:
        self._read_state()
        found: list[tuple[int, int]] = []
        for entry in os.scandir(self.directory):
            name = entry.name
            if name.endswith(_TEMP_SUFFIX):
                # A put that was killed before its rename: never visible, never acknowledged.
                self._unlink(name)
                continue
            if not name.endswith(_SUFFIX):
                continue
            stem = name[: -len(_SUFFIX)]
            if not stem.isdecimal():
                log.warning("message queue %s: ignoring unexpected file %s", self.directory, name)
                continue
            message_id = int(stem)
            if message_id <= self._dropped_through:
                self._unlink(name)  # dropped and counted before a crash, not yet deleted
                continue
            try:
                size = entry.stat().st_size
            except OSError:
                continue
            found.append((message_id, size))
        found.sort()
        self._sizes = dict(found)
        self._bytes = sum(size for _, size in found)
        if found:
            self._last_id = max(self._last_id, found[-1][0])
        self._last_id = max(self._last_id, self._dropped_through)
        if found:
            log.info(
                "message queue %s: %d messages waiting (%d bytes), %d dropped so far",
                self.directory,
                len(found),
                self._bytes,
                self._dropped,
            )

    def _read_state(self) -> None:
        path = self.directory / _STATE
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as error:
            log.warning(
                "message queue state %s is unreadable (%s); the dropped count restarts at 0",
                path,
                error,
            )
            return
        values: dict[str, int] = {}
        for key in ("dropped", "dropped_through", "last_id"):
            value: Any = document.get(key, 0) if isinstance(document, dict) else 0
            values[key] = value if isinstance(value, int) and value >= 0 else 0
        self._dropped = values["dropped"]
        self._dropped_through = values["dropped_through"]
        self._last_id = values["last_id"]

    def _write_state(self) -> None:
        document = {
            "dropped": self._dropped,
            "dropped_through": self._dropped_through,
            "last_id": self._last_id,
        }
        temp = self.directory / (_STATE + _TEMP_SUFFIX)
        with temp.open("wb") as handle:
            handle.write(json.dumps(document).encode())
            handle.flush()
            if self._fsync:
                os.fsync(handle.fileno())
        os.replace(temp, self.directory / _STATE)
        if self._fsync:
            fsync_dir(self.directory)

    # -- public API ----------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._sizes)

    @property
    def dropped(self) -> int:
        """Messages discarded on overflow since the queue directory was created (persisted)."""
        with self._lock:
            return self._dropped

    @property
    def size_bytes(self) -> int:
        """Bytes the queued messages take on disk."""
        with self._lock:
            return self._bytes

    def put(self, topic: str, payload: bytes, qos: int = 1) -> int:
        """Append a message durably (fsync) and return its id; drops the oldest on overflow."""
        if qos not in (0, 1, 2):
            raise QueueError(f"qos must be 0, 1 or 2; found {qos}")
        record = _encode(topic, bytes(payload), qos, time.time())
        if len(record) > self.max_bytes:
            raise QueueError(
                f"message for {topic} is {len(record)} bytes, more than the queue's max_bytes "
                f"{self.max_bytes}; raise the queue budget or send smaller messages"
            )
        with self._lock:
            self._make_room(len(record))
            message_id = self._last_id + 1
            name = f"{message_id:0{_ID_DIGITS}d}{_SUFFIX}"
            temp = self.directory / (name + _TEMP_SUFFIX)
            try:
                with temp.open("wb") as handle:
                    handle.write(record)
                    handle.flush()
                    if self._fsync:
                        os.fsync(handle.fileno())
                os.replace(temp, self.directory / name)
                if self._fsync:
                    fsync_dir(self.directory)
            except OSError as error:
                with contextlib.suppress(OSError):
                    temp.unlink()
                raise QueueError(
                    f"cannot queue a message for {topic} in {self.directory}: {error.strerror}"
                    " (disk full or read-only?)"
                ) from error
            self._last_id = message_id
            self._sizes[message_id] = len(record)
            self._bytes += len(record)
            return message_id

    def _make_room(self, incoming: int) -> None:
        victims: list[int] = []
        count, size = len(self._sizes), self._bytes
        for message_id, message_size in self._sizes.items():
            if count + 1 <= self.max_messages and size + incoming <= self.max_bytes:
                break
            victims.append(message_id)
            count -= 1
            size -= message_size
        if not victims:
            return
        # Count first, then delete: `dropped_through` keeps a crash in between from counting
        # the same messages twice when the queue reopens.
        self._dropped += len(victims)
        self._dropped_through = max(self._dropped_through, victims[-1])
        try:
            self._write_state()
        except OSError as error:
            log.warning(
                "message queue %s: cannot persist the dropped count: %s", self.directory, error
            )
        for message_id in victims:
            self._bytes -= self._sizes.pop(message_id)
            self._unlink(f"{message_id:0{_ID_DIGITS}d}{_SUFFIX}")
        log.warning(
            "message queue %s full: dropped %d oldest message(s) (%d dropped in total)",
            self.directory,
            len(victims),
            self._dropped,
        )

    def peek(self, n: int = 1) -> list[QueuedMessage]:
        """The oldest `n` intact messages, in order, without removing them."""
        result: list[QueuedMessage] = []
        with self._lock:
            damaged: list[int] = []
            for message_id in self._sizes:
                if len(result) >= n:
                    break
                name = f"{message_id:0{_ID_DIGITS}d}{_SUFFIX}"
                try:
                    data = (self.directory / name).read_bytes()
                    result.append(_decode(message_id, data))
                except (OSError, ValueError) as error:
                    log.warning(
                        "message queue %s: skipping damaged message %s: %s",
                        self.directory,
                        name,
                        error,
                    )
                    damaged.append(message_id)
            for message_id in damaged:
                self._bytes -= self._sizes.pop(message_id)
                self._unlink(f"{message_id:0{_ID_DIGITS}d}{_SUFFIX}")
                self.corrupt += 1
        return result

    def ack(self, message_id: int) -> bool:
        """Remove a message the broker confirmed; False if it is not (or no longer) queued."""
        with self._lock:
            size = self._sizes.pop(message_id, None)
            if size is None:
                return False
            self._bytes -= size
            self._unlink(f"{message_id:0{_ID_DIGITS}d}{_SUFFIX}")
            if not self._sizes:
                # Keep ids increasing across a restart with an empty queue.
                try:
                    self._write_state()
                except OSError as error:
                    log.warning("message queue %s: cannot write state: %s", self.directory, error)
            return True

    def close(self) -> None:
        """Release the directory lock (the messages stay on disk)."""
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    def __enter__(self) -> DiskQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unlink(self, name: str) -> None:
        try:
            (self.directory / name).unlink()
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning("message queue %s: cannot remove %s: %s", self.directory, name, error)
