"""Trust store rotation over the air, and the device's trust floor. Pure functions over bytes.

A fleet's operator publishes, retained on `edgekit/v1/<fleet>/trust`, the chain of signed
trust store versions devices may need (`trust_message`): a device at version N applies
N+1, N+2, ... in order, each signed by a threshold of the previous version's root keys and
of its own (TUF's root rotation rule, `update_truststore`), and skips what it has. So a
leaked release (`bundles`) or ops (`directives`) key is rotated out without touching a
device. A device keeps the highest version it accepted (its floor, in its data directory)
and never goes back: a re-provisioned older trust store file is ignored
(`establish_trust`).

`verify_trust_message` is total: any payload gives a `TrustUpdate` or raises
`TrustUpdateError`, nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from edgekit.trust._schema import Fields, canonical_json, load_json_object
from edgekit.trust.errors import BundleError, TrustStoreError, TrustUpdateError
from edgekit.trust.truststore import (
    TrustStore,
    load_truststore,
    parse_truststore_envelope,
    update_truststore,
)

__all__ = [
    "MAX_TRUST_CHAIN",
    "MAX_TRUST_MESSAGE_BYTES",
    "TRUST_MESSAGE_SCHEMA",
    "TrustChoice",
    "TrustUpdate",
    "establish_trust",
    "trust_message",
    "verify_trust_chain",
    "verify_trust_message",
]

TRUST_MESSAGE_SCHEMA = "edgekit.trust/v1"
MAX_TRUST_CHAIN = 16
"""Most trust store versions one message carries (older ones: re-provision the device)."""
MAX_TRUST_MESSAGE_BYTES = 1 << 20


@dataclass(frozen=True)
class TrustUpdate:
    """The trust store a device holds after a trust message: the newest version it could
    apply (its current one if the message holds nothing newer), that version's envelope,
    and the versions applied, in order."""

    store: TrustStore
    envelope: bytes
    applied: tuple[int, ...]


def trust_message(fleet: str, envelopes: Sequence[bytes]) -> bytes:
    """The retained `trust` payload: `envelopes` (signed trust stores) in version order."""
    if not envelopes:
        raise TrustStoreError("a trust message needs at least one signed trust store")
    if len(envelopes) > MAX_TRUST_CHAIN:
        raise TrustStoreError(
            f"{len(envelopes)} trust store versions; a message carries at most "
            f"{MAX_TRUST_CHAIN}: publish the newest ones (older devices are re-provisioned)"
        )
    document = {
        "schema": TRUST_MESSAGE_SCHEMA,
        "fleet": fleet,
        "truststores": [envelope.decode("utf-8") for envelope in envelopes],
    }
    payload = canonical_json(document)
    if len(payload) > MAX_TRUST_MESSAGE_BYTES:
        raise TrustStoreError(
            f"the trust message is {len(payload)} bytes; the limit is {MAX_TRUST_MESSAGE_BYTES}"
        )
    return payload


def _parse(payload: bytes, fleet: str) -> list[bytes]:
    if len(payload) > MAX_TRUST_MESSAGE_BYTES:
        raise TrustUpdateError(
            f"trust message is {len(payload)} bytes; the limit is {MAX_TRUST_MESSAGE_BYTES}"
        )
    document = load_json_object(payload, what="trust message", error=TrustUpdateError)
    fields = Fields(document, what="trust message", error=TrustUpdateError)
    fields.only(("schema", "fleet", "truststores"))
    if fields.string("schema") != TRUST_MESSAGE_SCHEMA:
        fields.fail(f"schema must be {TRUST_MESSAGE_SCHEMA!r}")
    found = fields.string("fleet")
    if found != fleet:
        fields.fail(f"it is for fleet {found[:80]!r}; this is fleet {fleet!r}")
    entries = fields.array("truststores")
    if not entries or len(entries) > MAX_TRUST_CHAIN:
        fields.fail(f"'truststores' must list 1 to {MAX_TRUST_CHAIN} signed trust stores")
    envelopes = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, str):
            fields.fail(f"truststores[{index}] must be a string (a trust store envelope)")
        envelopes.append(entry.encode("utf-8"))
    return envelopes


def verify_trust_chain(
    current: TrustStore, current_envelope: bytes, envelopes: Sequence[bytes], *, now: datetime
) -> TrustUpdate:
    """Apply the versions of `envelopes` newer than `current`, in order, by the rotation rule.

    Versions must increase by one from entry to entry; those at or below `current` are
    skipped (a device that has them). Raises `TrustUpdateError` naming the rule that failed;
    a chain that does not reach past `current` leaves it as it is.
    """
    versions = []
    for index, data in enumerate(envelopes):
        try:
            versions.append(parse_truststore_envelope(data)[0].version)
        except BundleError as e:
            raise TrustUpdateError(f"truststores[{index}] is not a trust store: {e}") from e
        if index and versions[index] != versions[index - 1] + 1:
            raise TrustUpdateError(
                f"truststores[{index}] is version {versions[index]} after version "
                f"{versions[index - 1]}: a chain lists consecutive versions, oldest first"
            )
    store, envelope, applied = current, current_envelope, []
    for version, data in zip(versions, envelopes, strict=True):
        if version <= store.version:
            continue
        try:
            store = update_truststore(store, data, now=now)
        except BundleError as e:
            raise TrustUpdateError(
                f"trust store version {version} is not accepted over version {store.version}: {e}"
            ) from e
        envelope = bytes(data)
        applied.append(version)
    return TrustUpdate(store, envelope, tuple(applied))


def verify_trust_message(
    payload: bytes,
    *,
    current: TrustStore,
    current_envelope: bytes,
    fleet: str,
    now: datetime,
) -> TrustUpdate:
    """Parse a `trust` message for `fleet` and apply what is newer than `current`."""
    try:
        envelopes = _parse(bytes(payload), fleet)
    except TrustUpdateError:
        raise
    except (BundleError, ValueError, TypeError, UnicodeError) as e:  # defence in depth
        raise TrustUpdateError(f"trust message is malformed: {e}") from e
    return verify_trust_chain(current, current_envelope, envelopes, now=now)


@dataclass(frozen=True)
class TrustChoice:
    """Which trust store a device starts with, its envelope, and why (for the log)."""

    store: TrustStore
    envelope: bytes
    source: str  # "floor", "provisioned" or "rotated"
    note: str


def establish_trust(
    provisioned: bytes, floor: bytes | None, *, now: datetime | None = None
) -> TrustChoice:
    """The trust store a device starts with: its floor (the highest version it accepted, kept
    in its data directory), unless the provisioned file is newer and follows the rotation
    rule from it.

    Without a floor, the provisioned store must be signed by its own root keys (bootstrap).
    An older or equal provisioned version is ignored: re-provisioning an old file cannot
    re-trust keys a rotation removed. A newer one that does not chain from the floor (skips
    versions, or is not signed by the floor's root) is refused: `TrustUpdateError`.
    """
    if floor is None:
        return TrustChoice(
            load_truststore(provisioned, now=now), provisioned, "provisioned", "first start"
        )
    kept = load_truststore(floor)
    try:
        offered = parse_truststore_envelope(provisioned)[0]
    except BundleError as e:
        return TrustChoice(kept, floor, "floor", f"the provisioned trust store is unreadable: {e}")
    if offered.version <= kept.version:
        note = (
            f"the provisioned trust store is version {offered.version}; this device accepted "
            f"version {kept.version} before and keeps it"
        )
        return TrustChoice(kept, floor, "floor", note if offered.version < kept.version else "")
    try:
        rotated = update_truststore(kept, provisioned, now=now)
    except BundleError as e:
        raise TrustUpdateError(
            f"the provisioned trust store (version {offered.version}) does not follow version "
            f"{kept.version}, which this device accepted before: {e} Provision version "
            f"{kept.version + 1}, signed by the root keys of both, or deliver the chain over "
            "the air"
        ) from e
    return TrustChoice(rotated, provisioned, "rotated", f"rotated to version {rotated.version}")
