"""The update journal: the one record of where an update stands, written before each step.

Each transition is written with `write_json_atomic` (temp file, fsync, rename, fsync of the
directory), so after a power loss the journal holds either the old record or the new one,
never a torn mix. `Journal.read` raises `JournalError` on a corrupt file; the agent then keeps
serving its last good model and reports the error.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgekit.bundle import fsync_dir
from edgekit.errors import EdgekitError
from edgekit.topics import AGENT_STATES, ActiveBundle

__all__ = [
    "CRASH_ENV",
    "JOURNAL_SCHEMA",
    "Journal",
    "JournalError",
    "JournalRecord",
    "StorageError",
    "fault_point",
    "read_json",
    "write_json_atomic",
]

log = logging.getLogger(__name__)

JOURNAL_SCHEMA = "edgekit.agent-journal/v1"
CRASH_ENV = "EDGEKIT_AGENT_CRASH_AT"
"""Fault injection for crash tests: `<state>/<step>` names where the agent SIGKILLs itself."""


class StorageError(EdgekitError):
    """The agent cannot write its state (disk full, read-only or missing data directory)."""


class JournalError(StorageError):
    """The journal file is unreadable or corrupt."""


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL if `EDGEKIT_AGENT_CRASH_AT` names `name` (tests only)."""
    wanted = os.environ.get(CRASH_ENV)
    if wanted and name in wanted.split(","):
        log.warning("fault injection: SIGKILL at %s", name)
        os.kill(os.getpid(), signal.SIGKILL)


def write_json_atomic(path: Path, document: Any) -> None:
    """Replace `path` with `document` as JSON: temp file, fsync, rename, fsync directory."""
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, path)
        fsync_dir(path.parent)
    except OSError as e:
        Path(temp_name).unlink(missing_ok=True)
        raise StorageError(
            f"cannot write {path}: {e.strerror or e} (free space on the data disk?)"
        ) from e


def read_json(path: Path, *, what: str) -> Any:
    """The JSON document at `path`, or None if the file does not exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StorageError(f"cannot read {what} {path}: {e.strerror or e}") from e
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise JournalError(f"{what} {path} is corrupt ({e}); it will be rewritten") from None


@dataclass(frozen=True)
class JournalRecord:
    """Where an update stands: the state it is entering and what it is about."""

    state: str = "idle"
    sequence: int = 0
    rollout_id: str | None = None
    bundle: ActiveBundle | None = None
    bundle_size: int = 0
    directive: bytes = b""  # the verified directive envelope, to resume after a restart
    slot: str | None = None  # the slot being installed or activated
    previous_slot: str | None = None  # the slot that served before activation
    reason: str | None = None
    probation_restarts: int = 0
    attempts: int = 0  # restarts that resumed this (pre-activation) state; reset per state
    ts: float = field(default_factory=time.time)

    def advance(self, state: str, **changes: Any) -> JournalRecord:
        """The record for the next state (same update); a new state starts at 0 attempts."""
        if state != self.state:
            changes.setdefault("attempts", 0)
        return replace(self, state=state, ts=time.time(), **changes)

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["bundle"] = self.bundle.to_dict() if self.bundle is not None else None
        document["directive"] = base64.b64encode(self.directive).decode()
        document["schema"] = JOURNAL_SCHEMA
        return document

    @classmethod
    def from_json(cls, document: Any) -> JournalRecord:
        if not isinstance(document, dict) or document.get("schema") != JOURNAL_SCHEMA:
            raise JournalError(f"journal is not an {JOURNAL_SCHEMA} record")
        try:
            state = document["state"]
            if state not in AGENT_STATES:
                raise JournalError(f"journal names unknown state {state!r}")
            bundle = ActiveBundle.from_json(document.get("bundle"))
            return cls(
                state=state,
                sequence=int(document["sequence"]),
                rollout_id=document.get("rollout_id"),
                bundle=bundle,
                bundle_size=int(document.get("bundle_size", 0)),
                directive=base64.b64decode(document.get("directive", ""), validate=True),
                slot=document.get("slot"),
                previous_slot=document.get("previous_slot"),
                reason=document.get("reason"),
                probation_restarts=int(document.get("probation_restarts", 0)),
                attempts=int(document.get("attempts", 0)),
                ts=float(document.get("ts", 0.0)),
            )
        except JournalError:
            raise
        except (KeyError, TypeError, ValueError, EdgekitError) as e:
            raise JournalError(f"journal record is malformed: {e}") from None


class Journal:
    """The update journal at `<data_dir>/journal.json`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> JournalRecord:
        """The last record written (an idle record if there is none)."""
        document = read_json(self.path, what="journal")
        if document is None:
            return JournalRecord()
        return JournalRecord.from_json(document)

    def write(self, record: JournalRecord) -> None:
        """Persist `record` durably; raises `StorageError` if the disk refuses."""
        write_json_atomic(self.path, record.to_json())
        log.debug("journal: %s seq=%d", record.state, record.sequence)
