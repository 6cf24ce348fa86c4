"""What the agent keeps on disk: two model slots, the active pointer, the floors, bad bundles.

Layout under the data directory:

    pointer.json          {"active": "a"|"b"|null, "previous": ...}: the atomic pointer swap
    slots/a/, slots/b/    one verified bundle each:
        bundle/           the bundle's files, exactly as its manifest lists them
        envelope.json     its signed manifest (re-verified when the slot is reused)
        slot.json         the slot record (sha256 and size of the `.ekb`, the manifest's files)
    slots/.a.new/         a slot being staged: extracted and verified, not yet in place
    floor.json            DirectiveFloor (last accepted sequence, epoch floor) + last digest
    truststore.json       the highest trust store version this device accepted (its floor)
    bad.json              bundle sha256 -> sequence and reason it failed at (a record for
                          operators; the directive floor is what prevents a retry)
    journal.json          the update journal (`edgekit.agent.journal`)
    probation.json        while an update is in activating/probation: the replaced model's
                          latency baseline and the probation time already observed, so a
                          restart resumes the window and the p95 check; removed at the end
    downloads/            partial and complete bundle downloads
    queue/                unsent telemetry and events

The slot's bookkeeping lives beside the bundle's folder, never in it: a bundle may hold files
of any name. Every file is replaced atomically (`write_json_atomic`); a slot is staged beside
its final name and renamed into place, so a slot is either complete or absent. A slot
written by an earlier agent (files and `slot.json` in one folder) is still read.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.agent.journal import (
    StorageError,
    fault_point,
    read_json,
    write_json_atomic,
)

from edgekit import files
from edgekit.bundle import (
    FILE_ROLES,
    MANIFEST_PAYLOAD_TYPE,
    BundleFile,
    FileRole,
    Limits,
    Manifest,
    VerifiedBundle,
    extract_bundle,
)
from edgekit.errors import BundleError
from edgekit.messages import BundleId
from edgekit.trust import (
    DEFAULT_MAX_ENVELOPE_BYTES,
    DirectiveFloor,
    EpochError,
    TrustStore,
    check_signatures,
    parse_envelope,
)

__all__ = ["SLOTS", "SLOT_SCHEMA", "Pointer", "SlotError", "SlotInfo", "Store"]

log = logging.getLogger(__name__)

SLOTS = ("a", "b")
SLOT_SCHEMA = "edgekit.agent-slot/v2"
_RECORD = "slot.json"
_ENVELOPE = "envelope.json"
_BUNDLE_DIR = "bundle"
_LEGACY_ENVELOPE = "slot.envelope.json"  # agents before v2 kept it among the bundle's files


class SlotError(BundleError):
    """A slot's files are missing or no longer match the bundle they were verified from."""


@dataclass(frozen=True)
class Pointer:
    """Which slot serves, and which served before it (the rollback target)."""

    active: str | None = None
    previous: str | None = None


@dataclass(frozen=True)
class SlotInfo:
    """The verified bundle a slot holds: its identity and size, what its manifest says, and
    the folder its files are in (`directory`)."""

    slot: str
    directory: Path
    bundle: BundleId
    size_bytes: int
    profile: str
    security_epoch: int
    files: tuple[BundleFile, ...]
    installed_at: float
    envelope_path: Path

    @property
    def model_path(self) -> Path:
        for entry in self.files:
            if entry.role == "model":
                return self.directory / entry.path
        raise SlotError(f"slot {self.slot} lists no model file")

    def path_of(self, role: str) -> Path | None:
        """The first file of `role` (golden, reference_stats, report), if the bundle has one."""
        for entry in self.files:
            if entry.role == role:
                return self.directory / entry.path
        return None


class Store:
    """The agent's data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.slots_dir = self.root / "slots"
        self.downloads_dir = self.root / "downloads"
        self.queue_dir = self.root / "queue"
        self.journal_path = self.root / "journal.json"
        self._pointer_path = self.root / "pointer.json"
        self._floor_path = self.root / "floor.json"
        self._bad_path = self.root / "bad.json"
        self._trust_path = self.root / "truststore.json"
        self.probation_path = self.root / "probation.json"

    def ensure_layout(self) -> None:
        """Create the directories; raises `StorageError` naming the directory if it cannot."""
        for directory in (self.root, self.slots_dir, self.downloads_dir, self.queue_dir):
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StorageError(
                    f"cannot create data directory {directory}: {e.strerror or e}; create it "
                    "and give the agent write access (systemd: StateDirectory=)"
                ) from e

    def remove_leftovers(self, *, keep_staging: bool) -> list[str]:
        """Remove what a killed write left behind: temp files of atomic replacements (never
        visible under their final name) and, unless an install is in progress
        (`keep_staging`), staging folders. Returns the names removed."""
        removed = []
        for folder in (self.root, self.slots_dir, *(self.slot_dir(s) for s in SLOTS)):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    files.remove_file(entry, sync=False)
                    removed.append(entry.name)
        if not keep_staging:
            for slot in SLOTS:
                if self.staging_dir(slot).exists():
                    self.clear_staging(slot)
                    removed.append(self.staging_dir(slot).name)
        return removed

    # -- pointer -------------------------------------------------------------------------

    def pointer(self) -> Pointer:
        document = read_json(self._pointer_path, what="slot pointer")
        if document is None:
            return Pointer()
        active, previous = document.get("active"), document.get("previous")
        return Pointer(active if active in SLOTS else None, previous if previous in SLOTS else None)

    def set_pointer(self, pointer: Pointer) -> None:
        """The atomic pointer swap: one rename decides which slot serves."""
        write_json_atomic(
            self._pointer_path, {"active": pointer.active, "previous": pointer.previous}
        )

    def idle_slot(self) -> str:
        """The slot that does not serve (the one an update installs into)."""
        active = self.pointer().active
        return "b" if active == "a" else "a"

    # -- slots ---------------------------------------------------------------------------

    def slot_dir(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise ValueError(f"unknown slot {slot!r}")
        return self.slots_dir / slot

    def staging_dir(self, slot: str) -> Path:
        """Where a bundle for `slot` is extracted and verified before it moves into place."""
        return self.slots_dir / f".{self.slot_dir(slot).name}.new"

    def slot_info(self, slot: str) -> SlotInfo | None:
        """What `slot` holds, or None if it is empty or was never completed."""
        return _read_slot(slot, self.slot_dir(slot))

    def staged_info(self, slot: str) -> SlotInfo | None:
        """What is staged for `slot` (complete: its record is written last), or None."""
        return _read_slot(slot, self.staging_dir(slot))

    def verify_slot(self, slot: str) -> SlotInfo:
        """Re-hash every file of `slot` against its record; raises `SlotError` on any change."""
        info = self.slot_info(slot)
        if info is None:
            raise SlotError(f"slot {slot} holds no installed bundle")
        for entry in info.files:
            target = info.directory / entry.path
            try:
                found_size, found_sha = files.hash_file(target)
            except OSError as e:
                raise SlotError(f"slot {slot}: cannot read {entry.path}: {e.strerror or e}") from e
            if (found_size, found_sha) != (entry.size_bytes, entry.sha256):
                raise SlotError(
                    f"slot {slot}: {entry.path} no longer matches its verified hash (disk "
                    "corruption?)"
                )
        return info

    def has_envelope(self, slot: str) -> bool:
        """True if `slot` keeps its signed manifest (installed by this agent version)."""
        info = self.slot_info(slot)
        return info is not None and info.envelope_path.is_file()

    def reverify_slot(self, slot: str, *, trust: TrustStore, min_security_epoch: int) -> SlotInfo:
        """`verify_slot`, then check the slot against today's trust and epoch floor.

        The kept signed manifest must still carry a threshold of signatures by the trust
        store's `bundles` keys (a key removed since the install no longer counts), describe
        exactly the files the slot record lists, and have a security epoch at or above
        `min_security_epoch`. A slot installed by an older agent may keep no manifest: only
        its recorded epoch is checked. Raises a `BundleError` subclass naming the rule.
        """
        info = self.verify_slot(slot)
        path = info.envelope_path
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            log.warning("slot %s keeps no signed manifest; checking its recorded epoch only", slot)
            data = None
        except OSError as e:
            raise SlotError(f"slot {slot}: cannot read {path.name}: {e.strerror or e}") from e
        epoch = info.security_epoch
        if data is not None:
            envelope = parse_envelope(data, max_envelope_bytes=DEFAULT_MAX_ENVELOPE_BYTES)
            if envelope.payload_type != MANIFEST_PAYLOAD_TYPE:
                raise SlotError(f"slot {slot}: {path.name} does not hold a bundle manifest")
            check_signatures(envelope, trust.policy("bundles"))
            manifest = Manifest.from_payload(envelope.payload)
            described = (manifest.name, manifest.version, manifest.profile, manifest.security_epoch)
            recorded = (
                info.bundle.name,
                info.bundle.version,
                info.profile,
                info.security_epoch,
            )
            if described != recorded or sorted(manifest.files, key=_path) != sorted(
                info.files, key=_path
            ):
                raise SlotError(
                    f"slot {slot}: its record does not match its signed manifest; the slot is "
                    "unusable (it is downloaded again when a directive names it)"
                )
            epoch = manifest.security_epoch
        if epoch < min_security_epoch:
            raise EpochError(
                f"slot {slot} holds {info.bundle.name} {info.bundle.version} of security epoch "
                f"{epoch}, below this device's floor {min_security_epoch}: refusing to run it "
                "again"
            )
        return info

    def stage(
        self,
        slot: str,
        bundle_path: Path,
        *,
        trust: TrustStore,
        min_security_epoch: int,
        expected_sha256: str,
        limits: Limits,
    ) -> tuple[SlotInfo, VerifiedBundle]:
        """Verify-while-extracting `bundle_path` into `slot`'s staging folder, then write its
        signed manifest and, last, its record. The one verification of an install: the
        caller checks the manifest against the directive and `commit_staged` moves it."""
        staging = self.staging_dir(slot)
        files.remove_tree(staging)
        try:
            staging.mkdir(parents=True)
            with open(bundle_path, "rb") as source:
                verified = extract_bundle(
                    source,
                    staging / _BUNDLE_DIR,
                    trust=trust,
                    min_security_epoch=min_security_epoch,
                    limits=limits,
                    expected_sha256=expected_sha256,
                )
            fault_point("installing/extracted")
            files.write_new(staging / _ENVELOPE, verified.envelope)
            write_json_atomic(
                staging / _RECORD, _slot_record(verified, expected_sha256, time.time())
            )
            files.fsync_dir(self.slots_dir)
            fault_point("installing/recorded")
        except OSError as e:
            files.remove_tree(staging)
            raise StorageError(
                f"cannot stage a bundle for slot {slot} in {staging}: {e.strerror or e} "
                "(disk full?)"
            ) from e
        except BaseException:
            files.remove_tree(staging)
            raise
        info = self.staged_info(slot)
        if info is None:  # pragma: no cover - written just above
            raise SlotError(f"slot {slot} lost its staged record")
        return info, verified

    def commit_staged(self, slot: str) -> SlotInfo:
        """Move the staged bundle into `slot`, replacing what it held (idempotent: if the
        move happened before a restart, the slot already holds it)."""
        final, staging = self.slot_dir(slot), self.staging_dir(slot)
        staged = self.staged_info(slot)
        if staged is None:
            done = self.slot_info(slot)
            if done is None:
                raise SlotError(f"nothing is staged for slot {slot}")
            return done
        try:
            if final.exists():
                # Remove the old record first: a slot without slot.json counts as empty.
                files.remove_file(final / _RECORD)
                files.remove_tree(final)
            fault_point("installing/removed")
            files.rename(staging, final)
            files.fsync_dir(self.slots_dir)
        except OSError as e:
            raise StorageError(
                f"cannot install into slot {slot} at {final}: {e.strerror or e} (disk full?)"
            ) from e
        info = self.slot_info(slot)
        if info is None:  # pragma: no cover - renamed just above
            raise SlotError(f"slot {slot} lost its record while installing")
        return info

    def clear_slot(self, slot: str) -> None:
        """Forget what `slot` holds and what is staged for it (a refused bundle)."""
        files.remove_file(self.slot_dir(slot) / _RECORD)
        files.remove_tree(self.slot_dir(slot))
        files.remove_tree(self.staging_dir(slot))

    def clear_staging(self, slot: str) -> None:
        """Forget what is staged for `slot` (a refused bundle, before it moved into place)."""
        files.remove_tree(self.staging_dir(slot))

    # -- floor and bad bundles -----------------------------------------------------------

    def floor(self) -> tuple[DirectiveFloor, str]:
        """The directive floor and the sha256 of the last accepted directive envelope."""
        document = read_json(self._floor_path, what="directive floor")
        if document is None:
            return DirectiveFloor(), ""
        try:
            return (
                DirectiveFloor(
                    last_sequence=int(document["last_sequence"]),
                    min_security_epoch=int(document["min_security_epoch"]),
                ),
                str(document.get("directive_sha256", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StorageError(f"directive floor {self._floor_path} is malformed ({e})") from None

    def set_floor(self, floor: DirectiveFloor, *, directive: bytes) -> None:
        write_json_atomic(
            self._floor_path,
            {
                "last_sequence": floor.last_sequence,
                "min_security_epoch": floor.min_security_epoch,
                "directive_sha256": hashlib.sha256(directive).hexdigest(),
            },
        )

    def bad_bundles(self) -> dict[str, dict[str, Any]]:
        document = read_json(self._bad_path, what="bad bundle list")
        return dict(document) if isinstance(document, dict) else {}

    def mark_bad(self, sha256: str, *, sequence: int, reason: str) -> None:
        """Remember that `sha256` failed under directive `sequence` (a newer one may retry it)."""
        bad = self.bad_bundles()
        entry = bad.get(sha256)
        if isinstance(entry, Mapping) and entry.get("sequence") == sequence:
            return  # recorded already (a rollback finished after a restart)
        bad[sha256] = {"sequence": sequence, "reason": reason[:500], "ts": time.time()}
        write_json_atomic(self._bad_path, bad)

    def is_bad(self, sha256: str, *, sequence: int) -> str | None:
        """The reason `sha256` failed under directive `sequence` or a later one, or None.

        Informational: a directive at or below a recorded sequence is already refused by the
        directive floor (replay), and a newer directive may name the bundle again.
        """
        entry = self.bad_bundles().get(sha256)
        if isinstance(entry, Mapping) and int(entry.get("sequence", 0)) >= sequence:
            return str(entry.get("reason", "marked bad"))
        return None

    # -- trust floor -----------------------------------------------------------------------

    def trust_floor(self) -> bytes | None:
        """The highest trust store version this device accepted (its envelope), or None."""
        try:
            return self._trust_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(f"cannot read {self._trust_path}: {e.strerror or e}") from e

    def set_trust_floor(self, envelope: bytes) -> None:
        """Replace the trust floor durably (temp file, fsync, rename, fsync of the folder)."""
        try:
            files.write_atomic(self._trust_path, envelope)
        except OSError as e:
            raise StorageError(
                f"cannot write {self._trust_path}: {e.strerror or e} (free space on the data disk?)"
            ) from e

    # -- probation baseline ----------------------------------------------------------------

    def probation(self) -> dict[str, Any] | None:
        """The probation record (`set_probation`), None if there is none; raises
        `JournalError` if it is corrupt."""
        document = read_json(self.probation_path, what="probation record")
        return dict(document) if isinstance(document, dict) else None

    def set_probation(self, document: Mapping[str, Any]) -> None:
        """Replace the probation record durably (temp file, fsync, rename, fsync dir)."""
        write_json_atomic(self.probation_path, dict(document))

    def clear_probation(self) -> None:
        """Remove the probation record (the update committed or rolled back)."""
        try:
            files.remove_file(self.probation_path)
        except OSError as e:
            raise StorageError(f"cannot remove {self.probation_path}: {e.strerror or e}") from e

    # -- downloads -----------------------------------------------------------------------

    def download_path(self, sha256: str) -> Path:
        return self.downloads_dir / f"{sha256}.ekb"

    def clean_downloads(self, *, keep: str | None = None) -> None:
        """Delete downloads except those of bundle `keep`."""
        for entry in self.downloads_dir.iterdir():
            if keep is not None and entry.name.startswith(keep):
                continue
            if entry.is_dir():
                files.remove_tree(entry)
            else:
                files.remove_file(entry, sync=False)


def _path(entry: BundleFile) -> str:
    return entry.path


def _role(value: object) -> FileRole:
    for role in FILE_ROLES:
        if value == role:
            return role
    raise ValueError(f"unknown file role {value!r}")


def _slot_record(verified: VerifiedBundle, sha256: str, installed_at: float) -> dict[str, Any]:
    manifest = verified.manifest
    return {
        "schema": SLOT_SCHEMA,
        "sha256": sha256,
        "size": verified.size_bytes,
        "name": manifest.name,
        "version": manifest.version,
        "profile": manifest.profile,
        "security_epoch": manifest.security_epoch,
        "files": [
            {"path": f.path, "size": f.size_bytes, "sha256": f.sha256, "role": f.role}
            for f in manifest.files
        ],
        "installed_at": installed_at,
    }


def _read_slot(slot: str, directory: Path) -> SlotInfo | None:
    """The record of a slot folder (this layout or an earlier agent's), None without one."""
    document = read_json(directory / _RECORD, what=f"slot {slot} record")
    if document is None:
        return None
    try:
        legacy = document.get("schema") != SLOT_SCHEMA
        listed = tuple(
            BundleFile(str(f["path"]), int(f["size"]), str(f["sha256"]), _role(f["role"]))
            for f in document["files"]
        )
        return SlotInfo(
            slot=slot,
            directory=directory if legacy else directory / _BUNDLE_DIR,
            bundle=BundleId(
                str(document["name"]), str(document["version"]), str(document["sha256"])
            ),
            size_bytes=int(document["size"]),
            profile=str(document["profile"]),
            security_epoch=int(document["security_epoch"]),
            files=listed,
            installed_at=float(document.get("installed_at", 0.0)),
            envelope_path=directory / (_LEGACY_ENVELOPE if legacy else _ENVELOPE),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise SlotError(f"slot {slot} record is malformed ({e}); the slot is unusable") from None
