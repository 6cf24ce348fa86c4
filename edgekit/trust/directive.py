"""Deployment directives: what the fleet controller tells one device to run.

A directive is a DSSE envelope (payloadType `application/vnd.edgekit.directive+json`) signed
by the trust store's `directives` role. The device keeps a `DirectiveFloor` on disk (the
highest sequence it accepted and its security epoch floor) and refuses anything forged,
replayed, expired, issued in the future, below the floor, or meant for another device.
A rollback is a new directive (higher sequence) naming an older bundle. Pure functions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from edgekit.trust._schema import (
    NAME_PATTERN,
    SEMVER_PATTERN,
    Fields,
    canonical_json,
    format_rfc3339,
    load_json_object,
)
from edgekit.trust.dsse import (
    DEFAULT_MAX_ENVELOPE_BYTES,
    check_signatures,
    parse_envelope,
    sign_envelope,
)
from edgekit.trust.errors import (
    DirectiveError,
    EnvelopeError,
    EpochError,
    ExpiredError,
    NotYetValidError,
    ReplayError,
    WrongTargetError,
)
from edgekit.trust.keys import Signer
from edgekit.trust.truststore import TrustStore, check_not_expired

__all__ = [
    "DEFAULT_CLOCK_SKEW_S",
    "DIRECTIVE_PAYLOAD_TYPE",
    "DIRECTIVE_SCHEMA",
    "BundleRef",
    "BundleSource",
    "Directive",
    "DirectiveFloor",
    "VerifiedDirective",
    "build_directive",
    "next_floor",
    "sign_directive",
    "verify_directive",
]

DIRECTIVE_PAYLOAD_TYPE = "application/vnd.edgekit.directive+json"
DIRECTIVE_SCHEMA = "edgekit.directive/v1"
DEFAULT_CLOCK_SKEW_S = 300
"""How far (seconds) a directive's issued_at may be ahead of the device's clock."""

# Fleet and device ids become MQTT topic levels: no wildcards, separators or control chars.
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_TOPIC_PREFIX = re.compile(r"[A-Za-z0-9._:/-]{1,512}")
_HTTPS_URL = re.compile(r"https://[^\s]{1,2040}")


@dataclass(frozen=True)
class BundleSource:
    """Where a device can fetch the bundle: MQTT chunks under a topic prefix, or an HTTPS URL."""

    kind: Literal["mqtt", "https"]
    location: str

    def to_json(self) -> dict[str, str]:
        """Payload form: `{"kind": "mqtt", "topic_prefix": P}` or `{"kind": "https", "url": U}`."""
        key = "topic_prefix" if self.kind == "mqtt" else "url"
        return {"kind": self.kind, key: self.location}


@dataclass(frozen=True)
class BundleRef:
    """The bundle a directive names, pinned by the sha256 and size of the whole `.ekb` file."""

    sha256: str
    size_bytes: int
    name: str
    version: str
    sources: tuple[BundleSource, ...]


@dataclass(frozen=True)
class Directive:
    """A deployment directive's payload."""

    fleet: str
    device: str
    rollout_id: str
    sequence: int
    issued_at: datetime
    expires_at: datetime
    min_security_epoch: int
    bundle: BundleRef

    def to_payload(self) -> bytes:
        """The canonical JSON payload."""
        return canonical_json(
            {
                "schema": DIRECTIVE_SCHEMA,
                "fleet": self.fleet,
                "device": self.device,
                "rollout_id": self.rollout_id,
                "sequence": self.sequence,
                "issued_at": format_rfc3339(self.issued_at),
                "expires_at": format_rfc3339(self.expires_at),
                "min_security_epoch": self.min_security_epoch,
                "bundle": {
                    "sha256": self.bundle.sha256,
                    "size": self.bundle.size_bytes,
                    "name": self.bundle.name,
                    "version": self.bundle.version,
                    "sources": [source.to_json() for source in self.bundle.sources],
                },
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes) -> Directive:
        """Parse and validate a payload (no signature check: see `verify_directive`)."""
        document = load_json_object(payload, what="directive", error=DirectiveError)
        fields = Fields(document, what="directive", error=DirectiveError)
        fields.only(
            (
                "schema",
                "fleet",
                "device",
                "rollout_id",
                "sequence",
                "issued_at",
                "expires_at",
                "min_security_epoch",
                "bundle",
            )
        )
        schema = fields.string("schema")
        if schema != DIRECTIVE_SCHEMA:
            fields.fail(f"schema must be {DIRECTIVE_SCHEMA!r}; found {schema[:100]!r}")
        bundle = fields.child("bundle")
        bundle.only(("sha256", "size", "name", "version", "sources"))
        sources = []
        for index, item in enumerate(bundle.array("sources")):
            source = bundle.item(item, what=f"sources[{index}]")
            kind = source.string("kind")
            if kind == "mqtt":
                source.only(("kind", "topic_prefix"))
                location = source.string(
                    "topic_prefix", pattern=_TOPIC_PREFIX, hint="an MQTT topic without wildcards"
                )
                sources.append(BundleSource("mqtt", location))
            elif kind == "https":
                source.only(("kind", "url"))
                location = source.string("url", pattern=_HTTPS_URL, hint="an https:// URL")
                sources.append(BundleSource("https", location))
            else:
                source.fail(f"kind must be 'mqtt' or 'https'; found {kind[:100]!r}")
        if not sources:
            bundle.fail("sources must name at least one place to fetch the bundle from")
        issued_at = fields.timestamp("issued_at")
        expires_at = fields.timestamp("expires_at")
        if expires_at <= issued_at:
            fields.fail(
                f"expires_at {format_rfc3339(expires_at)} must be after issued_at "
                f"{format_rfc3339(issued_at)}"
            )
        return cls(
            fleet=fields.string("fleet", pattern=_IDENTIFIER, hint="a fleet id"),
            device=fields.string("device", pattern=_IDENTIFIER, hint="a device id"),
            rollout_id=fields.string("rollout_id", pattern=_IDENTIFIER, hint="a rollout id"),
            sequence=fields.integer("sequence", minimum=1),
            issued_at=issued_at,
            expires_at=expires_at,
            min_security_epoch=fields.integer("min_security_epoch", minimum=0),
            bundle=BundleRef(
                sha256=bundle.sha256("sha256"),
                size_bytes=bundle.integer("size", minimum=1),
                name=bundle.string("name", pattern=NAME_PATTERN, hint="a bundle name"),
                version=bundle.string("version", pattern=SEMVER_PATTERN, hint="a semantic version"),
                sources=tuple(sources),
            ),
        )


@dataclass(frozen=True)
class DirectiveFloor:
    """What a device persists between directives: the last sequence and the epoch floor."""

    last_sequence: int = 0
    min_security_epoch: int = 0


@dataclass(frozen=True)
class VerifiedDirective:
    """A directive that passed every check, and the key ids whose signatures counted."""

    directive: Directive
    signed_by: frozenset[str]


def build_directive(
    *,
    fleet: str,
    device: str,
    rollout_id: str,
    sequence: int,
    bundle: BundleRef,
    min_security_epoch: int,
    issued_at: datetime,
    expires_at: datetime | None = None,
    ttl_s: float = 7 * 24 * 3600,
) -> Directive:
    """A validated directive; `expires_at` defaults to `issued_at + ttl_s`."""
    expiry = expires_at if expires_at is not None else issued_at + timedelta(seconds=ttl_s)
    directive = Directive(
        fleet=fleet,
        device=device,
        rollout_id=rollout_id,
        sequence=sequence,
        issued_at=issued_at,
        expires_at=expiry,
        min_security_epoch=min_security_epoch,
        bundle=bundle,
    )
    # One validator for what we write and what we read: round-trip through the parser.
    return Directive.from_payload(directive.to_payload())


def sign_directive(directive: Directive, signers: Iterable[Signer]) -> bytes:
    """The directive as a DSSE envelope signed by `signers` (keys of the `directives` role)."""
    return sign_envelope(directive.to_payload(), DIRECTIVE_PAYLOAD_TYPE, signers)


def verify_directive(
    envelope_bytes: bytes,
    *,
    truststore: TrustStore,
    fleet: str,
    device: str,
    floor: DirectiveFloor,
    now: datetime,
    clock_skew_s: float = DEFAULT_CLOCK_SKEW_S,
    max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
) -> VerifiedDirective:
    """Verify a directive for this device, or raise the `BundleError` naming the broken rule.

    Order: size limit, payloadType, signatures (threshold of the `directives` role),
    schema, trust store expiry, fleet and device, sequence above `floor.last_sequence`,
    not issued after `now + clock_skew_s`, not expired at `now`, epoch not below the floor.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    envelope = parse_envelope(envelope_bytes, max_envelope_bytes=max_envelope_bytes)
    if envelope.payload_type != DIRECTIVE_PAYLOAD_TYPE:
        raise EnvelopeError(
            f"expected payloadType {DIRECTIVE_PAYLOAD_TYPE!r}; found "
            f"{envelope.payload_type[:100]!r}: this is not a deployment directive"
        )
    signed_by = check_signatures(envelope, truststore.policy("directives"))
    directive = Directive.from_payload(envelope.payload)
    check_not_expired(truststore, now)
    if directive.fleet != fleet or directive.device != device:
        raise WrongTargetError(
            f"directive is for device {directive.device!r} of fleet {directive.fleet!r}; this is "
            f"device {device!r} of fleet {fleet!r}: check the topic ACLs and the controller"
        )
    if directive.sequence <= floor.last_sequence:
        raise ReplayError(
            f"directive sequence {directive.sequence} is not above the last accepted "
            f"{floor.last_sequence}: a replayed or out-of-order directive is ignored",
            found=directive.sequence,
            last_accepted=floor.last_sequence,
        )
    if directive.issued_at > now + timedelta(seconds=clock_skew_s):
        raise NotYetValidError(
            f"directive issued at {format_rfc3339(directive.issued_at)}, more than "
            f"{clock_skew_s:g} s after the device's clock ({format_rfc3339(now)}): check the "
            "device's and the controller's clocks (NTP)"
        )
    if now >= directive.expires_at:
        raise ExpiredError(
            f"directive expired at {format_rfc3339(directive.expires_at)} (now "
            f"{format_rfc3339(now)}): the controller must publish a fresh one"
        )
    if directive.min_security_epoch < floor.min_security_epoch:
        raise EpochError(
            f"directive's min_security_epoch {directive.min_security_epoch} is below the "
            f"device's floor {floor.min_security_epoch}: it predates a security fix; publish "
            "a directive with the current epoch"
        )
    return VerifiedDirective(directive, signed_by)


def next_floor(floor: DirectiveFloor, verified: VerifiedDirective) -> DirectiveFloor:
    """The floor to persist once `verified` is accepted (epochs never go down)."""
    directive = verified.directive
    return DirectiveFloor(
        last_sequence=max(floor.last_sequence, directive.sequence),
        min_security_epoch=max(floor.min_security_epoch, directive.min_security_epoch),
    )
