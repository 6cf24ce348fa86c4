"""The trust store: which keys a device trusts for which role, rotated like TUF's root.

A trust store is a DSSE envelope (payloadType `application/vnd.edgekit.truststore+json`)
whose payload names the keys and three roles: `root` (signs trust stores), `bundles` (signs
bundle manifests) and `directives` (signs deployment directives), each with a threshold.
Version N+1 is accepted only when signed by a threshold of version N's root keys *and* a
threshold of its own root keys (python-tuf's root rotation rule); keys removed from a role
stop working at once. Pure functions over bytes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType

from edgekit.trust._schema import Fields, canonical_json, format_rfc3339, load_json_object
from edgekit.trust.dsse import (
    DEFAULT_MAX_ENVELOPE_BYTES,
    Envelope,
    SignaturePolicy,
    check_signatures,
    parse_envelope,
    sign_envelope,
)
from edgekit.trust.errors import (
    BundleError,
    EnvelopeError,
    ExpiredError,
    KeyringError,
    ReplayError,
    RotationError,
    SignatureError,
    TrustStoreError,
)
from edgekit.trust.keys import PublicKey, Signer

__all__ = [
    "ROLE_NAMES",
    "TRUSTSTORE_PAYLOAD_TYPE",
    "TRUSTSTORE_SCHEMA",
    "Role",
    "TrustStore",
    "check_not_expired",
    "create_truststore",
    "load_truststore",
    "load_truststore_file",
    "parse_truststore_envelope",
    "sign_truststore",
    "update_truststore",
]

TRUSTSTORE_PAYLOAD_TYPE = "application/vnd.edgekit.truststore+json"
TRUSTSTORE_SCHEMA = "edgekit.truststore/v1"
ROLE_NAMES = ("root", "bundles", "directives")
"""The roles every trust store defines: trust stores, bundle manifests, directives."""

_KEYID = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Role:
    """A role's key ids (sorted) and how many of them must sign."""

    keyids: tuple[str, ...]
    threshold: int


@dataclass(frozen=True)
class TrustStore:
    """One verified (or, for editing tools, draft) trust store version."""

    version: int
    keys: Mapping[str, PublicKey]
    roles: Mapping[str, Role]
    expires: datetime | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))
        object.__setattr__(self, "roles", MappingProxyType(dict(self.roles)))
        _validate(self)

    def policy(self, role: str) -> SignaturePolicy:
        """The keys and threshold of `role`, for `check_signatures`."""
        if role not in self.roles:
            raise ValueError(f"unknown role {role!r}; roles are {ROLE_NAMES}")
        spec = self.roles[role]
        return SignaturePolicy(
            {keyid: self.keys[keyid] for keyid in spec.keyids}, spec.threshold, role
        )

    def to_payload(self) -> bytes:
        """The canonical JSON payload."""
        document: dict[str, object] = {
            "schema": TRUSTSTORE_SCHEMA,
            "version": self.version,
            "keys": {
                keyid: {"keytype": "ed25519", "public": key.hex} for keyid, key in self.keys.items()
            },
            "roles": {
                name: {"keyids": list(role.keyids), "threshold": role.threshold}
                for name, role in self.roles.items()
            },
        }
        if self.expires is not None:
            document["expires"] = format_rfc3339(self.expires)
        return canonical_json(document)

    @classmethod
    def from_payload(cls, payload: bytes) -> TrustStore:
        """Parse and validate a payload (no signature check: see `load_truststore`)."""
        document = load_json_object(payload, what="trust store", error=TrustStoreError)
        fields = Fields(document, what="trust store", error=TrustStoreError)
        fields.only(("schema", "version", "keys", "roles"), optional=("expires",))
        schema = fields.string("schema")
        if schema != TRUSTSTORE_SCHEMA:
            fields.fail(f"schema must be {TRUSTSTORE_SCHEMA!r}; found {schema!r}")
        version = fields.integer("version", minimum=1)
        expires = fields.timestamp("expires") if fields.has("expires") else None
        keys_fields = fields.child("keys")
        keys: dict[str, PublicKey] = {}
        for keyid in fields.mapping("keys"):
            entry = keys_fields.child(keyid)
            entry.only(("keytype", "public"))
            keytype = entry.string("keytype")
            if keytype != "ed25519":
                entry.fail(f"keytype must be 'ed25519'; found {keytype!r}")
            try:
                key = PublicKey.from_hex(entry.string("public"))
            except KeyringError as e:
                raise TrustStoreError(f"trust store: key {keyid[:16]}: {e}") from e
            if key.keyid != keyid:
                entry.fail(f"key id must be the sha256 of the public key, {key.keyid}")
            keys[keyid] = key
        roles_fields = fields.child("roles")
        roles_fields.only(ROLE_NAMES)
        roles = {}
        for name in ROLE_NAMES:
            role = roles_fields.child(name)
            role.only(("keyids", "threshold"))
            keyids = []
            for index, item in enumerate(role.array("keyids")):
                if not isinstance(item, str):
                    role.fail(f"keyids[{index}] must be a string")
                keyids.append(item)
            if len(set(keyids)) != len(keyids):
                role.fail("keyids lists a key twice")
            roles[name] = Role(tuple(sorted(keyids)), role.integer("threshold", minimum=1))
        return cls(version=version, keys=keys, roles=roles, expires=expires)

    def with_key(self, role: str, key: PublicKey, *, threshold: int | None = None) -> TrustStore:
        """A copy (same version) where `role` also trusts `key`."""
        spec = self._role(role)
        if key.keyid in spec.keyids:
            raise TrustStoreError(f"key {key.keyid} is already in role {role!r}")
        keys = {**self.keys, key.keyid: key}
        new_role = Role(
            tuple(sorted((*spec.keyids, key.keyid))),
            spec.threshold if threshold is None else threshold,
        )
        return dataclasses.replace(self, keys=keys, roles={**self.roles, role: new_role})

    def without_key(self, role: str, keyid: str, *, threshold: int | None = None) -> TrustStore:
        """A copy (same version) where `role` no longer trusts `keyid`; unused keys are dropped."""
        spec = self._role(role)
        matches = [
            k for k in spec.keyids if k == keyid or (len(keyid) >= 8 and k.startswith(keyid))
        ]
        if len(matches) != 1:
            raise TrustStoreError(
                f"role {role!r} has {'no' if not matches else 'several'} key(s) matching "
                f"{keyid!r}; its keys are {', '.join(spec.keyids) or 'none'}"
            )
        remaining = tuple(k for k in spec.keyids if k != matches[0])
        roles = {
            **self.roles,
            role: Role(remaining, spec.threshold if threshold is None else threshold),
        }
        used = {k for r in roles.values() for k in r.keyids}
        keys = {k: v for k, v in self.keys.items() if k in used}
        return dataclasses.replace(self, keys=keys, roles=roles)

    def with_threshold(self, role: str, threshold: int) -> TrustStore:
        """A copy (same version) with a new threshold for `role`."""
        spec = self._role(role)
        return dataclasses.replace(self, roles={**self.roles, role: Role(spec.keyids, threshold)})

    def next_version(self) -> TrustStore:
        """A copy numbered version + 1 (to be signed by the old and the new root)."""
        return dataclasses.replace(self, version=self.version + 1)

    def _role(self, role: str) -> Role:
        if role not in self.roles:
            raise TrustStoreError(f"unknown role {role!r}; roles are {', '.join(ROLE_NAMES)}")
        return self.roles[role]


def _validate(store: TrustStore) -> None:
    if store.version < 1:
        raise TrustStoreError(f"trust store version must be >= 1; found {store.version}")
    if store.expires is not None and store.expires.tzinfo is None:
        raise TrustStoreError("trust store expiry must be timezone-aware")
    if tuple(sorted(store.roles)) != tuple(sorted(ROLE_NAMES)):
        raise TrustStoreError(
            f"trust store must define exactly the roles {', '.join(ROLE_NAMES)}; "
            f"found {', '.join(sorted(store.roles)) or 'none'}"
        )
    for keyid in store.keys:
        if _KEYID.fullmatch(keyid) is None:
            raise TrustStoreError(f"key id must be 64 lowercase hex digits; found {keyid[:80]!r}")
    for name, role in store.roles.items():
        missing = [k for k in role.keyids if k not in store.keys]
        if missing:
            raise TrustStoreError(
                f"role {name!r} names key(s) {', '.join(missing)} absent from 'keys'"
            )
        if not 1 <= role.threshold <= len(role.keyids):
            raise TrustStoreError(
                f"role {name!r} has threshold {role.threshold} but {len(role.keyids)} key(s): "
                "the threshold must be between 1 and the number of keys (adjust --threshold)"
            )


def create_truststore(
    *,
    root_keys: Sequence[PublicKey],
    bundles_keys: Sequence[PublicKey],
    directives_keys: Sequence[PublicKey],
    root_threshold: int = 1,
    bundles_threshold: int = 1,
    directives_threshold: int = 1,
    version: int = 1,
    expires: datetime | None = None,
) -> TrustStore:
    """A new trust store from the keys of each role (sign it with `sign_truststore`)."""
    keys = {k.keyid: k for k in (*root_keys, *bundles_keys, *directives_keys)}
    roles = {
        "root": Role(tuple(sorted({k.keyid for k in root_keys})), root_threshold),
        "bundles": Role(tuple(sorted({k.keyid for k in bundles_keys})), bundles_threshold),
        "directives": Role(tuple(sorted({k.keyid for k in directives_keys})), directives_threshold),
    }
    return TrustStore(version=version, keys=keys, roles=roles, expires=expires)


def sign_truststore(store: TrustStore, signers: Iterable[Signer]) -> bytes:
    """The trust store as a DSSE envelope signed by `signers` (root keys; none: a draft)."""
    return sign_envelope(store.to_payload(), TRUSTSTORE_PAYLOAD_TYPE, signers)


def parse_truststore_envelope(
    data: bytes, *, max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES
) -> tuple[TrustStore, Envelope]:
    """Parse a trust store envelope and its payload without checking any signature."""
    envelope = parse_envelope(data, max_envelope_bytes=max_envelope_bytes)
    if envelope.payload_type != TRUSTSTORE_PAYLOAD_TYPE:
        raise EnvelopeError(
            f"expected payloadType {TRUSTSTORE_PAYLOAD_TYPE!r}; found "
            f"{envelope.payload_type[:100]!r}: this is not a trust store"
        )
    return TrustStore.from_payload(envelope.payload), envelope


def check_not_expired(store: TrustStore, now: datetime) -> None:
    """Raise `ExpiredError` if the trust store's `expires` is at or before `now`."""
    if store.expires is not None and now >= store.expires:
        raise ExpiredError(
            f"trust store version {store.version} expired at {format_rfc3339(store.expires)} "
            f"(now {format_rfc3339(now)}): provision a newer trust store"
        )


def load_truststore(
    data: bytes,
    *,
    bootstrap: bool = True,
    now: datetime | None = None,
    max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
) -> TrustStore:
    """Load a trust store a device is provisioned with.

    With `bootstrap=True` (the default) it must be signed by a threshold of its own root keys.
    `bootstrap=False` skips every signature check: only for a store the caller itself
    verified before (persisted by the agent) or a draft an editing tool is changing.
    With `now`, an expired store is refused.
    """
    store, envelope = parse_truststore_envelope(data, max_envelope_bytes=max_envelope_bytes)
    if bootstrap:
        check_signatures(envelope, store.policy("root"))
    if now is not None:
        check_not_expired(store, now)
    return store


def load_truststore_file(
    path: Path, *, bootstrap: bool = True, now: datetime | None = None
) -> TrustStore:
    """`load_truststore` of the file at `path`; every error names the file (the operator's
    `--trust FILE`), and a file that is no trust store at all says so."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TrustStoreError(
            f"cannot read trust store {path}: {e.strerror or e}; pass the truststore.json "
            "devices are provisioned with (`edgekit trust init` writes one)"
        ) from e
    try:
        return load_truststore(data, bootstrap=bootstrap, now=now)
    except (EnvelopeError, TrustStoreError) as e:
        raise TrustStoreError(
            f"{path} is not a trust store ({e}); pass the truststore.json devices are "
            "provisioned with (`edgekit trust init` writes one)"
        ) from e
    except BundleError as e:  # unsigned, expired: a trust store, not a usable one
        raise TrustStoreError(f"trust store {path}: {e}") from e


def update_truststore(
    current: TrustStore,
    new_bytes: bytes,
    *,
    now: datetime | None = None,
    max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
) -> TrustStore:
    """Accept trust store version N+1 over `current` (version N), or raise.

    The new version must be exactly N+1 and signed by a threshold of version N's root keys
    and by a threshold of its own root keys. With `now`, the new store must not be expired.
    """
    new, envelope = parse_truststore_envelope(new_bytes, max_envelope_bytes=max_envelope_bytes)
    if new.version <= current.version:
        raise ReplayError(
            f"trust store version {new.version} is not newer than the current version "
            f"{current.version}: refusing a rollback or replay",
            found=new.version,
            last_accepted=current.version,
        )
    if new.version != current.version + 1:
        raise RotationError(
            f"expected trust store version {current.version + 1}; found {new.version}: apply "
            "each intermediate version in order"
        )
    for signing_store, which in ((current, "old"), (new, "new")):
        try:
            check_signatures(envelope, signing_store.policy("root"))
        except SignatureError as e:
            raise RotationError(
                f"trust store version {new.version} is not signed by a threshold of the {which} "
                f"root (version {signing_store.version}'s root keys): {e} Sign it with "
                f"`edgekit trust sign` using enough of the {which} root keys"
            ) from e
    if now is not None:
        check_not_expired(new, now)
    return new
