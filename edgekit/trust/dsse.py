"""DSSE envelopes (https://github.com/secure-systems-lab/dsse), signed with Ed25519.

`{"payload": b64, "payloadType": "...", "signatures": [{"keyid": "...", "sig": b64}]}`, each
signature over PAE(payloadType, payload). Pure functions over bytes: no file or network I/O.
Verification checks the size limit before parsing, counts each trusted key id once however
many signatures it carries, ignores unknown keys, and requires a threshold of distinct keys.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from edgekit.trust._schema import Fields, canonical_json, load_json_object
from edgekit.trust.errors import (
    EnvelopeError,
    LimitError,
    ThresholdError,
    UnsignedError,
    UntrustedKeyError,
)
from edgekit.trust.keys import PublicKey, Signer

__all__ = [
    "DEFAULT_MAX_ENVELOPE_BYTES",
    "Envelope",
    "Signature",
    "SignaturePolicy",
    "add_signatures",
    "check_signatures",
    "pae",
    "parse_envelope",
    "sign_envelope",
    "verify_envelope",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_ENVELOPE_BYTES = 1 << 20
# More signatures than any role needs: refusing early bounds the verification work an
# attacker who can publish an envelope forces on a device.
MAX_SIGNATURES = 64
"""Envelopes larger than this (1 MiB) are refused before any JSON parsing."""


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what each signature actually signs."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


@dataclass(frozen=True)
class Signature:
    """One DSSE signature: the signing key's id and the raw signature bytes."""

    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    """A parsed DSSE envelope; its signatures are not checked until `check_signatures`."""

    payload: bytes
    payload_type: str
    signatures: tuple[Signature, ...]

    def to_json_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces, signatures sorted by key id then bytes)."""
        signatures = sorted(self.signatures, key=lambda s: (s.keyid, s.sig))
        return canonical_json(
            {
                "payload": _b64encode(self.payload),
                "payloadType": self.payload_type,
                "signatures": [{"keyid": s.keyid, "sig": _b64encode(s.sig)} for s in signatures],
            }
        )


@dataclass(frozen=True)
class SignaturePolicy:
    """Who may sign: trusted keys by key id and how many distinct ones must (a TUF role)."""

    keys: Mapping[str, PublicKey]
    threshold: int
    role: str = "signers"

    def __post_init__(self) -> None:
        if self.threshold < 1:
            raise ValueError(f"threshold must be >= 1; found {self.threshold}")
        for keyid, key in self.keys.items():
            if key.keyid != keyid:
                raise ValueError(f"key stored under {keyid} has key id {key.keyid}")
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str, *, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise EnvelopeError(f"{what} is not standard base64: {e}") from e


def parse_envelope(
    envelope_bytes: bytes, *, max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES
) -> Envelope:
    """Parse DSSE JSON after checking its size; signatures are decoded, not verified."""
    if len(envelope_bytes) > max_envelope_bytes:
        raise LimitError(
            f"envelope is {len(envelope_bytes)} bytes; the limit is {max_envelope_bytes}: "
            "refusing to parse it (raise the limit only if you trust the source)"
        )
    document = load_json_object(envelope_bytes, what="DSSE envelope", error=EnvelopeError)
    fields = Fields(document, what="DSSE envelope", error=EnvelopeError)
    payload = _b64decode(fields.string("payload"), what="envelope payload")
    payload_type = fields.string("payloadType")
    signatures = []
    for index, item in enumerate(fields.array("signatures")):
        entry = fields.item(item, what=f"signatures[{index}]")
        keyid = entry.string("keyid") if entry.has("keyid") else ""
        sig = _b64decode(entry.string("sig"), what=f"signatures[{index}].sig")
        signatures.append(Signature(keyid, sig))
    return Envelope(payload, payload_type, tuple(signatures))


def _check_payload_type(envelope: Envelope, payload_type: str) -> None:
    if envelope.payload_type != payload_type:
        raise EnvelopeError(
            f"expected payloadType {payload_type!r}; found {envelope.payload_type[:100]!r}: "
            "this envelope holds something else"
        )


def check_signatures(envelope: Envelope, policy: SignaturePolicy) -> frozenset[str]:
    """Key ids of the policy's keys with a valid signature; raises below the threshold.

    Duplicate signatures by one key count once; signatures by unknown keys are ignored.
    """
    if len(envelope.signatures) > MAX_SIGNATURES:
        raise LimitError(
            f"envelope carries {len(envelope.signatures)} signatures, more than the "
            f"{MAX_SIGNATURES} allowed; re-sign it with only the role's keys"
        )
    message = pae(envelope.payload_type, envelope.payload)
    valid: set[str] = set()
    invalid: set[str] = set()
    unknown: set[str] = set()
    for signature in envelope.signatures:
        key = policy.keys.get(signature.keyid)
        if signature.keyid in valid or signature.keyid in invalid:
            continue  # each key is verified once, however often it appears
        if key is None:
            unknown.add(signature.keyid)
        elif key.verify(signature.sig, message):
            valid.add(signature.keyid)
        else:
            invalid.add(signature.keyid)
    if len(valid) >= policy.threshold:
        return frozenset(valid)
    required = f"{policy.threshold} required by role {policy.role!r}"
    if not envelope.signatures:
        raise UnsignedError(
            f"envelope carries no signatures; {required}: sign it with the role's keys"
        )
    details = []
    if invalid - valid:
        details.append(
            f"{len(invalid - valid)} signature(s) by trusted keys do not verify "
            "(the content was changed after signing)"
        )
    if unknown:
        shown = ", ".join(sorted(k[:16] for k in unknown)[:5])
        details.append(f"{len(unknown)} signature(s) by keys the role does not trust ({shown})")
    text = (
        f"{len(valid)} valid signature(s) from trusted keys, {required}"
        + (": " + "; ".join(details) if details else "")
        + ". Sign with more of the role's keys, or check the trust store."
    )
    if not valid and not invalid:
        raise UntrustedKeyError(text)
    raise ThresholdError(text)


def verify_envelope(
    envelope_bytes: bytes,
    *,
    payload_type: str,
    trusted_keys: Mapping[str, PublicKey],
    threshold: int,
    role: str = "signers",
    max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
) -> bytes:
    """Verify a DSSE envelope against `threshold` of `trusted_keys`; return its payload."""
    envelope = parse_envelope(envelope_bytes, max_envelope_bytes=max_envelope_bytes)
    _check_payload_type(envelope, payload_type)
    policy = SignaturePolicy(trusted_keys, threshold, role)
    check_signatures(envelope, policy)
    return envelope.payload


def sign_envelope(payload: bytes, payload_type: str, signers: Iterable[Signer]) -> bytes:
    """A canonical DSSE envelope over `payload` signed by each signer (none: an unsigned draft)."""
    message = pae(payload_type, payload)
    signatures = {s.keyid: Signature(s.keyid, s.sign(message)) for s in signers}
    return Envelope(payload, payload_type, tuple(signatures.values())).to_json_bytes()


def add_signatures(
    envelope_bytes: bytes,
    signers: Iterable[Signer],
    *,
    payload_type: str,
    max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
) -> bytes:
    """Add signatures to an envelope, keeping the others; a signer's old signature is replaced."""
    envelope = parse_envelope(envelope_bytes, max_envelope_bytes=max_envelope_bytes)
    _check_payload_type(envelope, payload_type)
    message = pae(envelope.payload_type, envelope.payload)
    by_key = {s.keyid: s for s in envelope.signatures}
    for signer in signers:
        by_key[signer.keyid] = Signature(signer.keyid, signer.sign(message))
        logger.debug("signed %s with %s", payload_type, signer.keyid)
    return Envelope(envelope.payload, envelope.payload_type, tuple(by_key.values())).to_json_bytes()
