"""What the agent keeps on disk: two model slots, the active pointer, the floor, bad bundles.

Layout under the data directory:

    pointer.json          {"active": "a"|"b"|null, "previous": ...}: the atomic pointer swap
    slots/a/, slots/b/    an extracted, verified bundle each, with its signed manifest
                          (`slot.envelope.json`); `slot.json` is written last
    floor.json            DirectiveFloor (last accepted sequence, epoch floor) + last digest
    bad.json              bundle sha256 -> sequence and reason it failed at (a record for
                          operators; the directive floor is what prevents a retry)
    journal.json          the update journal (`edgekit.agent.journal`)
    probation.json        while an update is in activating/probation: the replaced model's
                          latency baseline and the probation time already observed, so a
                          restart resumes the window and the p95 check; removed at the end
    downloads/            partial and complete bundle downloads
    queue/                unsent telemetry and events

Every file is replaced atomically (`write_json_atomic`); a slot directory is built beside its
final name and renamed into place, so a slot is either complete or absent.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
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

from edgekit.bundle import (
    MANIFEST_PAYLOAD_TYPE,
    Limits,
    Manifest,
    VerifiedBundle,
    extract_bundle,
    fsync_dir,
    hash_file,
)
from edgekit.errors import BundleError
from edgekit.topics import ActiveBundle
from edgekit.trust import (
    DEFAULT_MAX_ENVELOPE_BYTES,
    DirectiveFloor,
    EpochError,
    TrustStore,
    check_signatures,
    parse_envelope,
)

__all__ = ["SLOTS", "Pointer", "SlotError", "SlotInfo", "Store"]

log = logging.getLogger(__name__)

SLOTS = ("a", "b")
_SLOT_FILE = "slot.json"
_ENVELOPE_FILE = "slot.envelope.json"  # the bundle's signed manifest, to re-verify on reuse


class SlotError(BundleError):
    """A slot's files are missing or no longer match the bundle they were verified from."""


@dataclass(frozen=True)
class Pointer:
    """Which slot serves, and which served before it (the rollback target)."""

    active: str | None = None
    previous: str | None = None


@dataclass(frozen=True)
class SlotInfo:
    """The verified bundle a slot holds."""

    slot: str
    directory: Path
    sha256: str
    size_bytes: int
    name: str
    version: str
    profile: str
    security_epoch: int
    files: tuple[tuple[str, int, str, str], ...]  # path, size, sha256, role
    installed_at: float

    @property
    def bundle(self) -> ActiveBundle:
        return ActiveBundle(self.name, self.version, self.sha256)

    @property
    def model_path(self) -> Path:
        for path, _size, _sha, role in self.files:
            if role == "model":
                return self.directory / path
        raise SlotError(f"slot {self.slot} lists no model file")

    def path_of(self, role: str) -> Path | None:
        """The first file of `role` (golden, reference_stats, report), if the bundle has one."""
        for path, _size, _sha, file_role in self.files:
            if file_role == role:
                return self.directory / path
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

    def slot_info(self, slot: str) -> SlotInfo | None:
        """What `slot` holds, or None if it is empty or was never completed."""
        directory = self.slot_dir(slot)
        document = read_json(directory / _SLOT_FILE, what=f"slot {slot} record")
        if document is None:
            return None
        try:
            return SlotInfo(
                slot=slot,
                directory=directory,
                sha256=str(document["sha256"]),
                size_bytes=int(document["size"]),
                name=str(document["name"]),
                version=str(document["version"]),
                profile=str(document["profile"]),
                security_epoch=int(document["security_epoch"]),
                files=tuple(
                    (str(f["path"]), int(f["size"]), str(f["sha256"]), str(f["role"]))
                    for f in document["files"]
                ),
                installed_at=float(document.get("installed_at", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SlotError(
                f"slot {slot} record is malformed ({e}); the slot is unusable"
            ) from None

    def verify_slot(self, slot: str) -> SlotInfo:
        """Re-hash every file of `slot` against its record; raises `SlotError` on any change."""
        info = self.slot_info(slot)
        if info is None:
            raise SlotError(f"slot {slot} holds no installed bundle")
        for path, size, sha256, _role in info.files:
            target = info.directory / path
            try:
                found_size, found_sha = hash_file(target)
            except OSError as e:
                raise SlotError(f"slot {slot}: cannot read {path}: {e.strerror or e}") from e
            if (found_size, found_sha) != (size, sha256):
                raise SlotError(
                    f"slot {slot}: {path} no longer matches its verified hash (disk corruption?)"
                )
        return info

    def has_envelope(self, slot: str) -> bool:
        """True if `slot` keeps its signed manifest (installed by this agent version)."""
        return (self.slot_dir(slot) / _ENVELOPE_FILE).is_file()

    def reverify_slot(self, slot: str, *, trust: TrustStore, min_security_epoch: int) -> SlotInfo:
        """`verify_slot`, then check the slot against today's trust and epoch floor.

        The kept signed manifest must still carry a threshold of signatures by the trust
        store's `bundles` keys (a key removed since the install no longer counts), describe
        exactly the files the slot record lists, and have a security epoch at or above
        `min_security_epoch`. A slot installed by an older agent keeps no manifest: only its
        recorded epoch is checked. Raises a `BundleError` subclass naming the rule.
        """
        info = self.verify_slot(slot)
        path = info.directory / _ENVELOPE_FILE
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
            files = tuple((f.path, f.size_bytes, f.sha256, str(f.role)) for f in manifest.files)
            described = (manifest.name, manifest.version, manifest.profile, manifest.security_epoch)
            recorded = (info.name, info.version, info.profile, info.security_epoch)
            if described != recorded or sorted(files) != sorted(info.files):
                raise SlotError(
                    f"slot {slot}: its record does not match its signed manifest; the slot is "
                    "unusable (it is downloaded again when a directive names it)"
                )
            epoch = manifest.security_epoch
        if epoch < min_security_epoch:
            raise EpochError(
                f"slot {slot} holds {info.name} {info.version} of security epoch {epoch}, below "
                f"this device's floor {min_security_epoch}: refusing to run it again"
            )
        return info

    def install(
        self,
        slot: str,
        bundle_path: Path,
        *,
        trust: TrustStore,
        min_security_epoch: int,
        expected_sha256: str,
        limits: Limits,
    ) -> SlotInfo:
        """Verify-while-extracting `bundle_path` into `slot`, replacing what it held."""
        final = self.slot_dir(slot)
        staging = self.slots_dir / f".{slot}.new"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            with open(bundle_path, "rb") as source:
                verified = extract_bundle(
                    source,
                    staging,
                    trust=trust,
                    min_security_epoch=min_security_epoch,
                    limits=limits,
                    expected_sha256=expected_sha256,
                )
            fault_point("installing/extracted")
            _write_file(staging / _ENVELOPE_FILE, verified.envelope)
            write_json_atomic(
                staging / _SLOT_FILE, _slot_record(verified, expected_sha256, time.time())
            )
            fault_point("installing/recorded")
            if final.exists():
                # Remove the old record first: a slot without slot.json counts as empty.
                (final / _SLOT_FILE).unlink(missing_ok=True)
                fsync_dir(final)
                shutil.rmtree(final)
            fault_point("installing/removed")
            os.rename(staging, final)
            fsync_dir(self.slots_dir)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise StorageError(
                f"cannot install into slot {slot} at {final}: {e.strerror or e} (disk full?)"
            ) from e
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        info = self.slot_info(slot)
        if info is None:  # pragma: no cover - written just above
            raise SlotError(f"slot {slot} lost its record while installing")
        return info

    def clear_slot(self, slot: str) -> None:
        """Forget what `slot` holds (a failed install)."""
        shutil.rmtree(self.slot_dir(slot), ignore_errors=True)
        shutil.rmtree(self.slots_dir / f".{slot}.new", ignore_errors=True)

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
            self.probation_path.unlink()
        except FileNotFoundError:
            return
        except OSError as e:
            raise StorageError(f"cannot remove {self.probation_path}: {e.strerror or e}") from e
        fsync_dir(self.root)

    # -- downloads -----------------------------------------------------------------------

    def download_path(self, sha256: str) -> Path:
        return self.downloads_dir / f"{sha256}.ekb"

    def clean_downloads(self, *, keep: str | None = None) -> None:
        """Delete downloads except those of bundle `keep`."""
        for entry in self.downloads_dir.iterdir():
            if keep is not None and entry.name.startswith(keep):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _write_file(path: Path, data: bytes) -> None:
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _slot_record(verified: VerifiedBundle, sha256: str, installed_at: float) -> dict[str, Any]:
    manifest = verified.manifest
    return {
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
