"""Rollout state in SQLite: rollouts, their waves and targets, known bundles, sequences.

One file in the operator's data dir (`$EDGEKIT_HOME/fleet.db`, `EDGEKIT_HOME` defaulting to
`~/.config/edgekit`), opened in WAL mode so `edgekit fleet status` reads while a controller
writes. Every change the controller must not repeat after a crash (a signed directive, a wave
decision) is committed before it takes effect on the broker: a controller killed at any point
resumes from here and re-sends only what the broker does not already hold.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgekit.errors import EdgekitError
from edgekit.messages import BundleId
from edgekit.trust.keys import HOME_ENV

__all__ = [
    "ACTIVE_STATES",
    "TERMINAL_STATES",
    "OwnershipLostError",
    "ReleaseBundle",
    "Request",
    "RolloutRecord",
    "RolloutState",
    "RolloutStore",
    "StoreError",
    "TargetOutcome",
    "TargetRecord",
    "WaveRecord",
    "default_db_path",
]

RolloutState = Literal["running", "paused", "reverting", "completed", "halted", "aborted"]
TERMINAL_STATES: frozenset[str] = frozenset({"completed", "halted", "aborted"})
ACTIVE_STATES: frozenset[str] = frozenset({"running", "paused", "reverting"})
TargetOutcome = Literal[
    "planned",  # in a wave not started yet
    "sent",  # directive signed, recorded and (being) published
    "succeeded",
    "failed",
    "skipped",  # already running the target bundle when the rollout started
    "reverting",
    "reverted",
    "revert_failed",
    # Halted or aborted with a revert: the device ran no model before the rollout, so there is
    # nothing to revert to; it keeps what the rollout gave it (or, if it failed, no model).
    "no_previous",
]
Request = Literal["pause", "resume", "abort", "abort_revert"]

# Additive changes (a new table, `IF NOT EXISTS`) keep the version: an older edgekit reads a
# newer file and ignores what it does not know; `_SCHEMA` brings an older file up on open.
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sequences (fleet TEXT PRIMARY KEY, last_sequence INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS bundles (
    sha256 TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL, profile TEXT NOT NULL,
    size INTEGER NOT NULL, security_epoch INTEGER NOT NULL, sources TEXT NOT NULL,
    path TEXT, recorded_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, fleet TEXT NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL,
    spec TEXT NOT NULL, current_wave INTEGER NOT NULL DEFAULT 0, reason TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, finished_at REAL,
    request TEXT, owner TEXT, heartbeat_at REAL, after_revert TEXT
);
CREATE TABLE IF NOT EXISTS waves (
    rollout_id TEXT NOT NULL, wave INTEGER NOT NULL, fraction REAL NOT NULL,
    state TEXT NOT NULL, started_at REAL, settled_at REAL, finished_at REAL, detail TEXT,
    PRIMARY KEY (rollout_id, wave)
);
CREATE TABLE IF NOT EXISTS targets (
    rollout_id TEXT NOT NULL, device TEXT NOT NULL, profile TEXT NOT NULL,
    wave INTEGER NOT NULL, bundle_sha256 TEXT NOT NULL, previous TEXT,
    sequence INTEGER, envelope BLOB, outcome TEXT NOT NULL, detail TEXT,
    revert_sequence INTEGER, revert_envelope BLOB, updated_at REAL NOT NULL,
    PRIMARY KEY (rollout_id, device)
);
CREATE INDEX IF NOT EXISTS targets_by_wave ON targets (rollout_id, wave);
CREATE TABLE IF NOT EXISTS baselines (
    rollout_id TEXT NOT NULL, device TEXT NOT NULL, bundle_sha256 TEXT NOT NULL,
    p95_ms REAL NOT NULL, observed_at REAL NOT NULL,
    PRIMARY KEY (rollout_id, device, bundle_sha256)
);
"""


class StoreError(EdgekitError):
    """The rollout database is unreadable, from a newer edgekit, or lacks what was asked."""


def default_db_path(environ: Mapping[str, str] | None = None) -> Path:
    """`$EDGEKIT_HOME/fleet.db`, with EDGEKIT_HOME defaulting to `~/.config/edgekit`."""
    env = os.environ if environ is None else environ
    home = env.get(HOME_ENV)
    base = Path(home).expanduser() if home else Path.home() / ".config" / "edgekit"
    return base / "fleet.db"


@dataclass(frozen=True)
class ReleaseBundle:
    """A bundle the controller ships: what its manifest says, its pin (sha256 and size of the
    `.ekb`), where its file is, and where devices fetch it (`BundleSource.to_json` entries,
    once published). The store keeps every one it used, to name it in a directive again."""

    sha256: str
    name: str
    version: str
    profile: str
    size_bytes: int
    security_epoch: int
    path: Path | None = None
    sources: tuple[Mapping[str, str], ...] = ()

    @property
    def id(self) -> BundleId:
        """The bundle's identity, as status and events carry it."""
        return BundleId(self.name, self.version, self.sha256)


@dataclass(frozen=True)
class RolloutRecord:
    id: str
    fleet: str
    kind: str
    state: str
    spec: Mapping[str, Any]
    current_wave: int
    reason: str | None
    created_at: float
    updated_at: float
    finished_at: float | None
    request: str | None
    owner: str | None
    heartbeat_at: float | None
    after_revert: str | None = None  # the state a revert in progress ends in

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class WaveRecord:
    rollout_id: str
    wave: int
    fraction: float
    state: str  # planned, publishing, soaking, passed, failed
    started_at: float | None
    settled_at: float | None
    finished_at: float | None
    detail: str | None


@dataclass(frozen=True)
class TargetRecord:
    rollout_id: str
    device: str
    profile: str
    wave: int
    bundle_sha256: str
    previous: Mapping[str, str] | None
    sequence: int | None
    envelope: bytes | None
    outcome: str
    detail: str | None
    revert_sequence: int | None
    revert_envelope: bytes | None
    updated_at: float = field(default=0.0)


def _new_owner() -> str:
    """`host:pid:token`: who drives a rollout; the token tells two controllers of one process
    apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _owner_alive(owner: str) -> bool:
    parts = owner.split(":")
    host, pid = (":".join(parts[:-2]), parts[-2]) if len(parts) >= 3 else (parts[0], parts[-1])
    if host != socket.gethostname() or not pid.isdecimal():
        return True  # another machine: only the heartbeat can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OwnershipLostError(StoreError):
    """Another controller took the rollout over: this one must stop driving it."""


class RolloutStore:
    """The SQLite file; one instance per thread (sqlite3 connections are not shared)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.owner = _new_owner()  # this instance, when it drives a rollout
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._db.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(_SCHEMA_VERSION),)
                )
            elif int(row[0]) > _SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} was written by a newer edgekit (schema {row[0]}); upgrade "
                    "edgekit or point --db at another file"
                )
        except sqlite3.Error as e:
            raise StoreError(f"cannot open rollout database {self.path}: {e}") from e

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RolloutStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (rolled back on error)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- sequences ------------------------------------------------------------------------------

    def allocate_sequences(self, fleet: str, count: int, *, at_least: int = 0) -> int:
        """Reserve `count` directive sequences for `fleet`; returns the first.

        The first is above everything allocated before, above `at_least` (the highest seen on
        the broker) and at least the current time in milliseconds, so a controller whose
        database was lost still issues sequences above the ones devices accepted.
        """
        if count < 1:
            raise ValueError("count must be >= 1")
        with self.transaction() as db:
            row = db.execute(
                "SELECT last_sequence FROM sequences WHERE fleet=?", (fleet,)
            ).fetchone()
            last = int(row[0]) if row else 0
            first = max(last + 1, at_least + 1, int(time.time() * 1000))
            db.execute(
                "INSERT INTO sequences VALUES (?, ?) ON CONFLICT(fleet) DO UPDATE SET "
                "last_sequence=excluded.last_sequence",
                (fleet, first + count - 1),
            )
        return first

    # -- bundles -------------------------------------------------------------------------------

    def record_bundle(self, bundle: ReleaseBundle) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO bundles VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(sha256) DO UPDATE SET "
                "sources=excluded.sources, path=coalesce(excluded.path, bundles.path)",
                (
                    bundle.sha256,
                    bundle.name,
                    bundle.version,
                    bundle.profile,
                    bundle.size_bytes,
                    bundle.security_epoch,
                    json.dumps([dict(s) for s in bundle.sources], sort_keys=True),
                    str(bundle.path) if bundle.path is not None else None,
                    time.time(),
                ),
            )

    def bundle(self, sha256: str) -> ReleaseBundle | None:
        row = self._db.execute("SELECT * FROM bundles WHERE sha256=?", (sha256,)).fetchone()
        return None if row is None else _bundle(row)

    def bundles_by_version(self, version: str, *, name: str | None = None) -> list[ReleaseBundle]:
        query = "SELECT * FROM bundles WHERE version=?"
        args: tuple[str, ...] = (version,)
        if name is not None:
            query += " AND name=?"
            args += (name,)
        return [_bundle(row) for row in self._db.execute(query + " ORDER BY profile", args)]

    # -- rollouts ------------------------------------------------------------------------------

    def create_rollout(
        self,
        *,
        rollout_id: str,
        fleet: str,
        kind: str,
        spec: Mapping[str, Any],
        waves: Sequence[tuple[float, Sequence[str]]],
        targets: Iterable[tuple[str, str, int, str, Mapping[str, str] | None, str]],
    ) -> None:
        """Record a new rollout, its waves (fraction, devices) and targets, owned by this process.

        `targets` are (device, profile, wave, bundle sha256, previous bundle, outcome).
        """
        now = time.time()
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM rollouts WHERE id=?", (rollout_id,)).fetchone():
                raise StoreError(f"rollout {rollout_id!r} already exists in {self.path}")
            db.execute(
                "INSERT INTO rollouts (id, fleet, kind, state, spec, current_wave, created_at, "
                "updated_at, owner, heartbeat_at) VALUES (?,?,?,?,?,0,?,?,?,?)",
                (rollout_id, fleet, kind, "running", json.dumps(spec), now, now, self.owner, now),
            )
            db.executemany(
                "INSERT INTO waves (rollout_id, wave, fraction, state) VALUES (?,?,?,'planned')",
                [(rollout_id, index, fraction) for index, (fraction, _) in enumerate(waves)],
            )
            db.executemany(
                "INSERT INTO targets (rollout_id, device, profile, wave, bundle_sha256, previous, "
                "outcome, updated_at) VALUES (?,?,?,?,?,?,?,?)",
                [
                    (
                        rollout_id,
                        device,
                        profile,
                        wave,
                        sha,
                        None if previous is None else json.dumps(dict(previous)),
                        outcome,
                        now,
                    )
                    for device, profile, wave, sha, previous, outcome in targets
                ],
            )

    def rollout(self, rollout_id: str) -> RolloutRecord:
        row = self._db.execute("SELECT * FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
        if row is None:
            raise StoreError(
                f"no rollout {rollout_id!r} in {self.path}: list them with `edgekit fleet history`"
            )
        return _rollout(row)

    def rollouts(self, *, fleet: str | None = None, limit: int = 50) -> list[RolloutRecord]:
        query = "SELECT * FROM rollouts"
        args: tuple[object, ...] = ()
        if fleet is not None:
            query += " WHERE fleet=?"
            args = (fleet,)
        query += " ORDER BY created_at DESC LIMIT ?"
        return [_rollout(row) for row in self._db.execute(query, (*args, limit))]

    def latest_rollout(self, *, fleet: str | None = None) -> RolloutRecord | None:
        found = self.rollouts(fleet=fleet, limit=1)
        return found[0] if found else None

    def set_state(
        self,
        rollout_id: str,
        state: RolloutState,
        *,
        reason: str | None = None,
        current_wave: int | None = None,
    ) -> None:
        now = time.time()
        finished = now if state in TERMINAL_STATES else None
        with self.transaction() as db:
            db.execute(
                "UPDATE rollouts SET state=?, reason=coalesce(?, reason), "
                "current_wave=coalesce(?, current_wave), updated_at=?, "
                "finished_at=coalesce(?, finished_at) WHERE id=?",
                (state, reason, current_wave, now, finished, rollout_id),
            )

    def request(self, rollout_id: str, request: Request) -> RolloutRecord:
        """Ask the controller driving `rollout_id` to pause, resume or abort (it polls)."""
        record = self.rollout(rollout_id)
        if record.terminal:
            raise StoreError(
                f"rollout {rollout_id} already {record.state}: nothing to {request.split('_')[0]}"
            )
        with self.transaction() as db:
            db.execute(
                "UPDATE rollouts SET request=?, updated_at=? WHERE id=?",
                (request, time.time(), rollout_id),
            )
        return self.rollout(rollout_id)

    def take_request(self, rollout_id: str) -> str | None:
        """The pending operator request for `rollout_id`, cleared."""
        with self.transaction() as db:
            row = db.execute("SELECT request FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
            if row is None or row[0] is None:
                return None
            db.execute("UPDATE rollouts SET request=NULL WHERE id=?", (rollout_id,))
            return str(row[0])

    def claim(self, rollout_id: str, *, stale_after_s: float = 15.0) -> None:
        """Become the controller of `rollout_id`, unless a live one holds it."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT owner, heartbeat_at, state FROM rollouts WHERE id=?", (rollout_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"no rollout {rollout_id!r} in {self.path}")
            owner, heartbeat = row[0], row[1]
            fresh = heartbeat is not None and time.time() - float(heartbeat) < stale_after_s
            if owner and owner != self.owner and fresh and _owner_alive(owner):
                raise StoreError(
                    f"rollout {rollout_id} is being driven by {owner} (heartbeat "
                    f"{time.time() - float(heartbeat):.0f} s ago): stop that controller first, "
                    "or use pause/abort"
                )
            db.execute(
                "UPDATE rollouts SET owner=?, heartbeat_at=? WHERE id=?",
                (self.owner, time.time(), rollout_id),
            )

    def heartbeat(self, rollout_id: str) -> None:
        """Say this controller still drives `rollout_id`; raises `OwnershipLostError` if
        another one took it over meanwhile."""
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE rollouts SET heartbeat_at=? WHERE id=? AND owner=?",
                (time.time(), rollout_id, self.owner),
            )
            if cursor.rowcount == 0:
                self._lost(db, rollout_id)

    def _lost(self, db: sqlite3.Connection, rollout_id: str) -> None:
        row = db.execute("SELECT owner FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
        holder = row[0] if row is not None else None
        raise OwnershipLostError(
            f"rollout {rollout_id} is now driven by {holder or 'no controller'}, not by this one "
            f"({self.owner}): this controller stops; see `edgekit fleet status {rollout_id}`"
        )

    def _check_owner(self, db: sqlite3.Connection, rollout_id: str) -> None:
        row = db.execute("SELECT owner FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
        if row is None or row[0] != self.owner:
            self._lost(db, rollout_id)

    def release(self, rollout_id: str) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE rollouts SET owner=NULL, heartbeat_at=NULL WHERE id=? AND owner=?",
                (rollout_id, self.owner),
            )

    def controller_alive(self, rollout_id: str, *, stale_after_s: float = 15.0) -> bool:
        record = self.rollout(rollout_id)
        if record.owner is None or record.heartbeat_at is None:
            return False
        return time.time() - record.heartbeat_at < stale_after_s and _owner_alive(record.owner)

    # -- waves ---------------------------------------------------------------------------------

    def waves(self, rollout_id: str) -> list[WaveRecord]:
        rows = self._db.execute(
            "SELECT * FROM waves WHERE rollout_id=? ORDER BY wave", (rollout_id,)
        )
        return [WaveRecord(**dict(row)) for row in rows]

    def update_wave(
        self,
        rollout_id: str,
        wave: int,
        *,
        state: str,
        started_at: float | None = None,
        settled_at: float | None = None,
        finished_at: float | None = None,
        detail: str | None = None,
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE waves SET state=?, started_at=coalesce(?, started_at), "
                "settled_at=coalesce(?, settled_at), finished_at=coalesce(?, finished_at), "
                "detail=coalesce(?, detail) WHERE rollout_id=? AND wave=?",
                (state, started_at, settled_at, finished_at, detail, rollout_id, wave),
            )

    # -- targets -------------------------------------------------------------------------------

    def targets(self, rollout_id: str, *, wave: int | None = None) -> list[TargetRecord]:
        query = "SELECT * FROM targets WHERE rollout_id=?"
        args: tuple[object, ...] = (rollout_id,)
        if wave is not None:
            query += " AND wave=?"
            args += (wave,)
        return [_target(row) for row in self._db.execute(query + " ORDER BY device", args)]

    def record_directives(
        self,
        rollout_id: str,
        directives: Sequence[tuple[str, int, bytes]],
        *,
        start_wave: int | None = None,
    ) -> None:
        """Persist signed directives (device, sequence, envelope) before they are published.

        With `start_wave`, that wave becomes active in the same transaction, so a wave is
        either not started or started with every directive recorded. Raises
        `OwnershipLostError` (recording nothing) if this instance no longer owns the rollout or
        a target is not `planned` any more.
        """
        now = time.time()
        with self.transaction() as db:
            self._check_owner(db, rollout_id)
            for device, seq, envelope in directives:
                cursor = db.execute(
                    "UPDATE targets SET sequence=?, envelope=?, outcome='sent', updated_at=? "
                    "WHERE rollout_id=? AND device=? AND outcome='planned'",
                    (seq, envelope, now, rollout_id, device),
                )
                if cursor.rowcount != 1:  # rolled back: nothing of this wave is recorded
                    raise OwnershipLostError(
                        f"rollout {rollout_id}: device {device} is no longer planned (another "
                        "controller sent it a directive): this controller stops"
                    )
            if start_wave is not None:
                db.execute(
                    "UPDATE waves SET state='active', started_at=? WHERE rollout_id=? AND wave=?",
                    (now, rollout_id, start_wave),
                )

    def begin_revert(
        self,
        rollout_id: str,
        *,
        reason: str,
        then: RolloutState,
        directives: Sequence[tuple[str, int, bytes]],
        unrevertable: Sequence[tuple[str, str]],
        no_previous: Sequence[tuple[str, str]] = (),
    ) -> None:
        """One transaction: state `reverting` (ending in `then`), the signed revert directives,
        the devices that cannot be reverted (device, why) and those that ran no model before
        the rollout (device, what they keep): nothing to revert to."""
        now = time.time()
        with self.transaction() as db:
            self._check_owner(db, rollout_id)
            db.execute(
                "UPDATE rollouts SET state='reverting', reason=?, after_revert=?, updated_at=? "
                "WHERE id=?",
                (reason, then, now, rollout_id),
            )
            for device, seq, envelope in directives:
                cursor = db.execute(
                    "UPDATE targets SET revert_sequence=?, revert_envelope=?, "
                    "outcome='reverting', updated_at=? WHERE rollout_id=? AND device=? "
                    "AND outcome IN ('sent', 'succeeded')",
                    (seq, envelope, now, rollout_id, device),
                )
                if cursor.rowcount != 1:
                    raise OwnershipLostError(
                        f"rollout {rollout_id}: device {device} is already being reverted or "
                        "done: another controller drives this rollout; this one stops"
                    )
            db.executemany(
                "UPDATE targets SET outcome='revert_failed', detail=?, updated_at=? "
                "WHERE rollout_id=? AND device=? AND outcome IN ('sent', 'succeeded')",
                [(why, now, rollout_id, device) for device, why in unrevertable],
            )
            db.executemany(
                "UPDATE targets SET outcome='no_previous', detail=?, updated_at=? "
                "WHERE rollout_id=? AND device=? AND outcome IN ('sent', 'succeeded')",
                [(why, now, rollout_id, device) for device, why in no_previous],
            )

    def set_outcomes(
        self, rollout_id: str, outcomes: Sequence[tuple[str, str, str | None]]
    ) -> None:
        """Record (device, outcome, detail) for targets of `rollout_id`."""
        if not outcomes:
            return
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "UPDATE targets SET outcome=?, detail=coalesce(?, detail), updated_at=? "
                "WHERE rollout_id=? AND device=?",
                [
                    (outcome, detail, now, rollout_id, device)
                    for device, outcome, detail in outcomes
                ],
            )

    # -- gate baselines ------------------------------------------------------------------------

    def record_baselines(
        self, rollout_id: str, observations: Sequence[tuple[str, str, float]]
    ) -> None:
        """Keep (device, bundle sha256, p95 ms) telemetry the gates compare a wave against.

        One row per device and bundle of `rollout_id` (the latest value wins), so a resumed
        controller has the baseline of devices that have since moved to the new version.
        """
        if not observations:
            return
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO baselines VALUES (?,?,?,?,?) "
                "ON CONFLICT(rollout_id, device, bundle_sha256) DO UPDATE SET "
                "p95_ms=excluded.p95_ms, observed_at=excluded.observed_at",
                [(rollout_id, device, sha, float(p95), now) for device, sha, p95 in observations],
            )

    def baselines(self, rollout_id: str) -> dict[str, tuple[str, float]]:
        """device -> (bundle sha256, p95 ms) recorded for `rollout_id` (latest per device)."""
        rows = self._db.execute(
            "SELECT device, bundle_sha256, p95_ms FROM baselines WHERE rollout_id=? "
            "ORDER BY observed_at",
            (rollout_id,),
        )
        return {str(row[0]): (str(row[1]), float(row[2])) for row in rows}


def _bundle(row: sqlite3.Row) -> ReleaseBundle:
    return ReleaseBundle(
        sha256=row["sha256"],
        name=row["name"],
        version=row["version"],
        profile=row["profile"],
        size_bytes=int(row["size"]),
        security_epoch=int(row["security_epoch"]),
        sources=tuple(json.loads(row["sources"])),
        path=Path(row["path"]) if row["path"] else None,
    )


def _rollout(row: sqlite3.Row) -> RolloutRecord:
    values = dict(row)
    values["spec"] = json.loads(values["spec"])
    return RolloutRecord(**values)


def _target(row: sqlite3.Row) -> TargetRecord:
    values = dict(row)
    values["previous"] = None if values["previous"] is None else json.loads(values["previous"])
    for key in ("envelope", "revert_envelope"):
        if values[key] is not None:
            values[key] = bytes(values[key])
    return TargetRecord(**values)
