"""Verify a bundle, pure: bytes or a binary stream and a trust store in, a verified bundle out.

`read_bundle` walks the canonical layout once, checking the envelope, the signatures (through
the caller's `accept`), the manifest, the epoch floor and every member's header, size and
sha256 while streaming it into an optional sink (`edgekit.bundle.extract` passes files).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgekit.bundle.manifest import (
    DEFAULT_LIMITS,
    ENVELOPE_MEMBER,
    MANIFEST_PAYLOAD_TYPE,
    BundleFile,
    Limits,
    Manifest,
    check_limits,
)
from edgekit.bundle.tarformat import (
    BLOCK_BYTES,
    ZERO_BLOCK,
    ReadableBinary,
    Reader,
    check_header,
    check_member_safety,
    member_size,
    parse_member,
)
from edgekit.trust.dsse import Envelope, SignaturePolicy, check_signatures, pae, parse_envelope
from edgekit.trust.errors import (
    ArchiveError,
    EnvelopeError,
    EpochError,
    HashMismatchError,
    LimitError,
    MissingFileError,
    UnexpectedFileError,
    UnsafeMemberError,
)
from edgekit.trust.keys import PublicKey
from edgekit.trust.truststore import TrustStore

__all__ = [
    "BundleInspection",
    "ReadResult",
    "SignatureStatus",
    "Sink",
    "VerifiedBundle",
    "VerifiedFile",
    "inspect_bundle",
    "read_bundle",
    "signature_policy",
    "verify_bundle",
]


class Sink(Protocol):
    """Where `read_bundle` streams a member's bytes while hashing them."""

    def write(self, data: memoryview, /) -> object: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class VerifiedFile:
    """A file whose size and sha256 matched the manifest, and where its bytes are.

    `offset_bytes` is where the data starts inside the `.ekb`; `path` is where
    `extract_bundle` put it (None after `verify_bundle`).
    """

    entry: BundleFile
    offset_bytes: int
    path: Path | None = None


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed every check: its manifest, signers and files."""

    manifest: Manifest
    signed_by: frozenset[str]
    files: tuple[VerifiedFile, ...]
    size_bytes: int
    envelope: bytes


@dataclass(frozen=True)
class ReadResult:
    envelope: Envelope
    envelope_bytes: bytes
    manifest: Manifest
    signed_by: frozenset[str]
    files: tuple[VerifiedFile, ...]
    size_bytes: int


def _as_stream(source: bytes | bytearray | memoryview | ReadableBinary) -> ReadableBinary:
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(source)
    return source


def read_bundle(
    source: bytes | bytearray | memoryview | ReadableBinary,
    *,
    accept: Callable[[Envelope], frozenset[str]],
    min_security_epoch: int,
    limits: Limits,
    open_sink: Callable[[BundleFile], Sink] | None = None,
    expected_sha256: str | None = None,
) -> ReadResult:
    reader = Reader(
        _as_stream(source), chunk_bytes=limits.chunk_bytes, whole=expected_sha256 is not None
    )
    header = reader.read_exact(BLOCK_BYTES, what="the first tar header")
    if header == ZERO_BLOCK:
        raise ArchiveError("the bundle is an empty tar: not an edgekit bundle")
    member = parse_member(header, 0)
    check_member_safety(member)
    if member.name != ENVELOPE_MEMBER:
        raise ArchiveError(
            f"the first tar member is {member.name[:120]!r}, not {ENVELOPE_MEMBER!r}: not an "
            "edgekit bundle (build one with `edgekit bundle build`)"
        )
    envelope_size = member_size(member)
    if envelope_size > limits.max_envelope_bytes:
        raise LimitError(
            f"{ENVELOPE_MEMBER} is {envelope_size} bytes; the limit is "
            f"{limits.max_envelope_bytes}: refusing to read it"
        )
    envelope_bytes = reader.read_exact(envelope_size, what=ENVELOPE_MEMBER)
    reader.skip_padding(envelope_size, what=ENVELOPE_MEMBER)
    envelope = parse_envelope(envelope_bytes, max_envelope_bytes=limits.max_envelope_bytes)
    if envelope.payload_type != MANIFEST_PAYLOAD_TYPE:
        raise EnvelopeError(
            f"expected payloadType {MANIFEST_PAYLOAD_TYPE!r}; found "
            f"{envelope.payload_type[:100]!r}: this envelope does not hold a bundle manifest"
        )
    signed_by = accept(envelope)
    if envelope.to_json_bytes() != envelope_bytes:
        raise ArchiveError(
            f"{ENVELOPE_MEMBER} is not in canonical JSON form (sorted keys, no whitespace, "
            "standard base64, signatures sorted): the bundle was altered after signing"
        )
    manifest = Manifest.from_payload(envelope.payload)
    check_limits(manifest, limits)
    if manifest.security_epoch < min_security_epoch:
        raise EpochError(
            f"bundle {manifest.name} {manifest.version} has security_epoch "
            f"{manifest.security_epoch}, below the device's floor {min_security_epoch}: "
            "installing it would roll back a security fix; build the bundle with "
            f"--security-epoch {min_security_epoch} or higher"
        )
    check_header(member, size_bytes=envelope_size, mtime=manifest.mtime)

    position = {entry.path: index for index, entry in enumerate(manifest.files)}
    seen = {ENVELOPE_MEMBER}
    verified: list[VerifiedFile] = []
    while True:
        offset = reader.offset
        header = reader.read_exact(BLOCK_BYTES, what="a tar header")
        if header == ZERO_BLOCK:
            if len(verified) < len(manifest.files):
                missing = manifest.files[len(verified)]
                raise MissingFileError(
                    f"{missing.path} is listed in the signed manifest but absent from the "
                    "bundle: rebuild or re-download it"
                )
            second = reader.read_exact(BLOCK_BYTES, what="the end-of-archive marker")
            if second != ZERO_BLOCK:
                raise ArchiveError(
                    f"the end-of-archive marker at byte {offset} is not two zero blocks: the "
                    "bundle was altered"
                )
            if not reader.at_end():
                raise ArchiveError(
                    f"data follows the end-of-archive marker at byte {reader.offset}: the bundle "
                    "was altered (edgekit writes nothing after it)"
                )
            break
        member = parse_member(header, offset)
        check_member_safety(member)
        if member.name in seen:
            raise UnsafeMemberError(
                f"tar member {member.name!r} appears twice: a later copy could replace the "
                "verified one on extraction"
            )
        seen.add(member.name)
        index = position.get(member.name)
        if index is None:
            raise UnexpectedFileError(
                f"the bundle holds {member.name[:120]!r}, which the signed manifest does not "
                "list: refusing unsigned content"
            )
        if index != len(verified):
            missing = manifest.files[len(verified)]
            raise MissingFileError(
                f"{missing.path} is listed in the signed manifest but absent where the "
                f"canonical layout puts it (found {member.name} instead)"
            )
        entry = manifest.files[index]
        declared = member_size(member)
        if declared > entry.size_bytes:
            raise LimitError(
                f"tar member {entry.path} declares {declared} bytes but the signed manifest says "
                f"{entry.size_bytes}: refusing to stream more than signed (tar bomb)"
            )
        if declared < entry.size_bytes:
            raise HashMismatchError(
                f"tar member {entry.path} holds {declared} bytes; the signed manifest says "
                f"{entry.size_bytes}: the file was replaced"
            )
        check_header(member, size_bytes=declared, mtime=manifest.mtime)
        digest = hashlib.sha256()
        sink = open_sink(entry) if open_sink is not None else None
        try:
            reader.stream(entry.size_bytes, what=entry.path, consume=_tee(digest, sink))
        finally:
            if sink is not None:
                sink.close()
        if digest.hexdigest() != entry.sha256:
            raise HashMismatchError(
                f"sha256 of {entry.path} is {digest.hexdigest()}; the signed manifest says "
                f"{entry.sha256}: the file was altered or swapped in from another bundle"
            )
        reader.skip_padding(entry.size_bytes, what=entry.path)
        verified.append(VerifiedFile(entry, offset + BLOCK_BYTES))

    whole = reader.whole_sha256()
    if expected_sha256 is not None and whole != expected_sha256:
        raise HashMismatchError(
            f"sha256 of the bundle is {whole}; the directive names {expected_sha256}: "
            "this is not the bundle the directive pins"
        )
    return ReadResult(envelope, envelope_bytes, manifest, signed_by, tuple(verified), reader.offset)


def _tee(digest: hashlib._Hash, sink: Sink | None) -> Callable[[memoryview], None]:
    if sink is None:
        return digest.update
    update = digest.update
    write = sink.write

    def consume(view: memoryview) -> None:
        update(view)
        write(view)

    return consume


def signature_policy(trust: TrustStore | SignaturePolicy) -> SignaturePolicy:
    return trust.policy("bundles") if isinstance(trust, TrustStore) else trust


def verify_bundle(
    source: bytes | bytearray | memoryview | ReadableBinary,
    *,
    trust: TrustStore | SignaturePolicy,
    min_security_epoch: int = 0,
    limits: Limits = DEFAULT_LIMITS,
    expected_sha256: str | None = None,
) -> VerifiedBundle:
    """Verify a whole bundle without writing anything, or raise the `BundleError` of the rule.

    `trust` is the device's trust store (its `bundles` role signs) or an explicit policy.
    `expected_sha256`, when given (the directive's pin), must match the whole `.ekb` too.
    """
    policy = signature_policy(trust)
    result = read_bundle(
        source,
        accept=lambda envelope: check_signatures(envelope, policy),
        min_security_epoch=min_security_epoch,
        limits=limits,
        expected_sha256=expected_sha256,
    )
    return VerifiedBundle(
        result.manifest, result.signed_by, result.files, result.size_bytes, result.envelope_bytes
    )


@dataclass(frozen=True)
class SignatureStatus:
    """A signature in a bundle: its key id and whether it verifies (None: key unknown)."""

    keyid: str
    valid: bool | None


@dataclass(frozen=True)
class BundleInspection:
    """What a bundle holds, checked for integrity but not for trust."""

    manifest: Manifest
    signatures: tuple[SignatureStatus, ...]
    files: tuple[VerifiedFile, ...]
    size_bytes: int


def inspect_bundle(
    source: bytes | bytearray | memoryview | ReadableBinary,
    *,
    known_keys: Mapping[str, PublicKey] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> BundleInspection:
    """Read a bundle's manifest and check its layout and hashes, trusting no key.

    Each signature is reported as valid or invalid against `known_keys`, or unknown.
    """
    result = read_bundle(
        source, accept=lambda envelope: frozenset(), min_security_epoch=0, limits=limits
    )
    keys = known_keys or {}
    message = pae(result.envelope.payload_type, result.envelope.payload)
    statuses = tuple(
        SignatureStatus(s.keyid, keys[s.keyid].verify(s.sig, message) if s.keyid in keys else None)
        for s in result.envelope.signatures
    )
    return BundleInspection(result.manifest, statuses, result.files, result.size_bytes)
