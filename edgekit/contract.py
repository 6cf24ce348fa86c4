"""The device contract: the rules a device applies to what the fleet sends it, as pure
functions shared by `edgekit-agent`, `edgekit fleet simulate` and `edgekit fleet rollout`.

- `accept_directive`: a `desired` envelope -> `Accepted` (verified, with the floor to keep),
  `Refused(rule, reason, sequence)` (an event says why), or `Duplicate` (the directive this
  device already accepted, redelivered: retained messages come again on every reconnect).
- `bundle_mismatch`: why a verified bundle is not the one a directive names for this device
  (size pin, name and version, profile), or None.
- `peek_sequence`: the sequence an envelope claims, unverified: for a refusal event, or for
  the controller to stay above what the broker holds; never to accept anything.

The simulator calls exactly these, so a simulated fleet passes only where real agents would.
The outcome the controller reads back is documented in `edgekit.messages`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from edgekit.errors import BundleError, first_line
from edgekit.messages import MessageError, register_parser
from edgekit.trust import (
    DEFAULT_MAX_ENVELOPE_BYTES,
    BundleRef,
    Directive,
    DirectiveFloor,
    ReplayError,
    TrustStore,
    VerifiedDirective,
    next_floor,
    parse_envelope,
    verify_directive,
)

__all__ = [
    "Accepted",
    "Duplicate",
    "Refused",
    "Verdict",
    "accept_directive",
    "bundle_mismatch",
    "peek_sequence",
]


@dataclass(frozen=True)
class Accepted:
    """A verified directive and the floor the device keeps once it acts on it."""

    verified: VerifiedDirective
    floor: DirectiveFloor
    digest: str  # sha256 of the envelope: how a redelivery is recognised

    @property
    def directive(self) -> Directive:
        return self.verified.directive


@dataclass(frozen=True)
class Refused:
    """A directive the device refuses: `rule` names the broken rule (the trust error's type)."""

    rule: str
    reason: str
    sequence: int | None  # what the envelope claims (unverified), for the event


@dataclass(frozen=True)
class Duplicate:
    """The directive already accepted (same sequence, same bytes): nothing to do."""

    sequence: int


Verdict = Accepted | Refused | Duplicate


def accept_directive(
    envelope: bytes,
    *,
    truststore: TrustStore,
    fleet: str,
    device: str,
    floor: DirectiveFloor,
    accepted_digest: str | None,
    now: datetime,
) -> Verdict:
    """Judge a `desired` envelope against the device's trust store and floor (pure).

    `accepted_digest` is the digest of the envelope that set `floor.last_sequence`.
    """
    if len(envelope) > DEFAULT_MAX_ENVELOPE_BYTES:
        return Refused(
            "LimitError",
            f"desired payload of {len(envelope)} bytes exceeds the {DEFAULT_MAX_ENVELOPE_BYTES}"
            "-byte directive limit; dropped unread",
            None,
        )
    digest = hashlib.sha256(envelope).hexdigest()
    try:
        verified = verify_directive(
            envelope, truststore=truststore, fleet=fleet, device=device, floor=floor, now=now
        )
    except BundleError as e:
        if (
            isinstance(e, ReplayError)
            and e.found == floor.last_sequence
            and digest == accepted_digest
        ):
            return Duplicate(e.found)
        return Refused(type(e).__name__, first_line(e), peek_sequence(envelope))
    return Accepted(verified, next_floor(floor, verified), digest)


def bundle_mismatch(
    *, name: str, version: str, profile: str, size_bytes: int, ref: BundleRef, device_profile: str
) -> str | None:
    """Why a verified bundle (its manifest's name, version, profile and its size) is not what
    directive bundle `ref` names for a device of `device_profile`; None if it is."""
    if size_bytes != ref.size_bytes:
        return f"bundle is {size_bytes} bytes; the directive pins {ref.size_bytes}"
    if profile != device_profile:
        return f"bundle is built for profile {profile!r}; this device runs {device_profile!r}"
    if (name, version) != (ref.name, ref.version):
        return f"bundle is {name} {version}; the directive names {ref.name} {ref.version}"
    return None


def peek_sequence(envelope: bytes) -> int | None:
    """The sequence an envelope claims, unverified (None if unreadable)."""
    try:
        return parse_directive_claim(envelope)
    except MessageError:
        return None


def parse_directive_claim(envelope: bytes) -> int:
    """The total parser of `desired` payloads as non-devices read them: the claimed sequence.
    Raises only `MessageError`."""
    try:
        return Directive.from_payload(parse_envelope(envelope).payload).sequence
    except BundleError as e:
        raise MessageError(f"desired: {first_line(e)}", reason="invalid") from None


register_parser(
    "edgekit.directive-envelope", max_bytes=DEFAULT_MAX_ENVELOPE_BYTES, parse=parse_directive_claim
)
