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
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgekit import files
from edgekit.errors import EdgekitError
from edgekit.messages import AGENT_STATES, BundleId

__all__ = [
    "CRASH_ENV",
    "CRASH_STEP_ENV",
    "JOURNAL_SCHEMA",
    "STEP_TRACE_ENV",
    "Journal",
    "JournalError",
    "JournalRecord",
    "StorageError",
    "fault_point",
    "install_step_hook",
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


CRASH_STEP_ENV = "EDGEKIT_AGENT_CRASH_STEP"
"""Fault injection: SIGKILL the agent just before its N-th durable step (1-based)."""
STEP_TRACE_ENV = "EDGEKIT_AGENT_STEP_TRACE"
"""Fault injection: append one line per durable step (`index kind path`) to this file."""
# Written by other threads at times of their own: counting them would make step N mean a
# different step in every run.
_UNCOUNTED = ("queue", "telemetry.json", "agent.json")


def install_step_hook(data_dir: Path, environ: Mapping[str, str] | None = None) -> bool:
    """Arm the crash hook tests use (`EDGEKIT_AGENT_CRASH_STEP`, `EDGEKIT_AGENT_STEP_TRACE`).

    Every durable step under `data_dir` (journal, floor, pointer, slot, bad list, trust store
    and probation writes; fsyncs, renames, removals), announced by `edgekit.files`, is
    counted; the hook records it in the trace and SIGKILLs the process before step N. The
    message queue and the telemetry counter (other threads) are not counted. Returns True if
    a hook was installed (the variables were set).
    """
    env = os.environ if environ is None else environ
    crash_text, trace_text = env.get(CRASH_STEP_ENV), env.get(STEP_TRACE_ENV)
    if not crash_text and not trace_text:
        return False
    crash_at = int(crash_text) if crash_text else 0
    trace = Path(trace_text) if trace_text else None
    root = Path(data_dir).resolve()
    count = 0
    lock = threading.Lock()

    def hook(kind: str, path: Path) -> None:
        nonlocal count
        try:
            relative = path.resolve().relative_to(root)
        except ValueError:
            return
        name = relative.as_posix()
        if any(name == skip or name.startswith(skip + "/") or skip in relative.name
               for skip in _UNCOUNTED):  # fmt: skip
            return
        with lock:
            count += 1
            index = count
            if trace is not None:
                with trace.open("a") as lines:
                    kill = " KILL" if index == crash_at else ""
                    lines.write(f"{index} {kind} {name}{kill}\n")
            if index == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)

    files.set_step_hook(hook)
    return True


def write_json_atomic(path: Path, document: Any) -> None:
    """Replace `path` with `document` as JSON (`edgekit.files.write_json_atomic`: temp file,
    fsync, rename, fsync of the directory); raises `StorageError` naming the file."""
    try:
        files.write_json_atomic(path, document)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise StorageError(f"cannot write {path}: {reason} (free space on the data disk?)") from e


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
    bundle: BundleId | None = None
    directive: bytes = b""  # the verified directive envelope, to resume after a restart
    slot: str | None = None  # the slot being installed or activated
    previous_slot: str | None = None  # the slot that served before activation
    reason: str | None = None
    bundle_at_fault: bool = False  # rolled_back: the bundle failed (it goes in bad.json)
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
            bundle = BundleId.from_json(document.get("bundle"))
            return cls(
                state=state,
                sequence=int(document["sequence"]),
                rollout_id=document.get("rollout_id"),
                bundle=bundle,
                directive=base64.b64decode(document.get("directive", ""), validate=True),
                slot=document.get("slot"),
                previous_slot=document.get("previous_slot"),
                reason=document.get("reason"),
                bundle_at_fault=bool(document.get("bundle_at_fault", False)),
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
