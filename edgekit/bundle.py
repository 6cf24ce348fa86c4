"""Bundles (`.ekb`): a signed manifest and the files it lists, in one deterministic tar.

Layout (uncompressed POSIX USTAR, no gzip: models barely compress and a decompressor is one
more bomb to defuse). Members, in this order: `envelope.json` (a DSSE envelope, payloadType
`application/vnd.edgekit.manifest+json`, in canonical JSON), then every file the manifest
lists, sorted by path. Every header is exactly what `_ustar_header` writes: regular file,
mode 0644, uid/gid 0, empty uname/gname, mtime = the manifest's `created`, no prefix, no pax
or GNU extensions. Data is padded with zeros to 512 bytes and the archive ends with exactly
two zero blocks (no record padding). Same inputs, same bytes.

Verification reads that layout strictly, so every byte of a bundle is either covered by a
signature or compared against what the builder would have written; anything else is
refused. Order: envelope size limit, signatures (threshold of the trust store's `bundles`
role), manifest schema and limits, security epoch floor, then each member's header, size and
sha256 while streaming it. `verify_bundle` is pure over bytes or a binary file object;
`extract_bundle` and the build helpers are the only functions here that touch the disk.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Protocol

from edgekit.trust._schema import (
    NAME_PATTERN,
    SEMVER_PATTERN,
    Fields,
    canonical_json,
    format_rfc3339,
    freeze_json,
    load_json_object,
)
from edgekit.trust.dsse import (
    DEFAULT_MAX_ENVELOPE_BYTES,
    Envelope,
    SignaturePolicy,
    add_signatures,
    check_signatures,
    pae,
    parse_envelope,
    sign_envelope,
)
from edgekit.trust.errors import (
    ArchiveError,
    EnvelopeError,
    EpochError,
    HashMismatchError,
    LimitError,
    ManifestError,
    MissingFileError,
    UnexpectedFileError,
    UnsafeMemberError,
)
from edgekit.trust.keys import PublicKey, Signer
from edgekit.trust.truststore import TrustStore

__all__ = [
    "BUNDLE_SUFFIX",
    "ENVELOPE_MEMBER",
    "FILE_ROLES",
    "MANIFEST_PAYLOAD_TYPE",
    "MANIFEST_SCHEMA",
    "BundleFile",
    "BundleInput",
    "BundleInspection",
    "FileRole",
    "Limits",
    "Manifest",
    "ReadableBinary",
    "SignatureStatus",
    "VerifiedBundle",
    "VerifiedFile",
    "build_bundle",
    "bundle_filename",
    "collect_bundle_inputs",
    "create_manifest",
    "extract_bundle",
    "hash_file",
    "inspect_bundle",
    "sign_and_build_bundle",
    "sign_bundle",
    "verify_bundle",
    "write_bundle",
]

logger = logging.getLogger(__name__)

MANIFEST_PAYLOAD_TYPE = "application/vnd.edgekit.manifest+json"
MANIFEST_SCHEMA = "edgekit.manifest/v1"
ENVELOPE_MEMBER = "envelope.json"
BUNDLE_SUFFIX = ".ekb"
FileRole = Literal["model", "golden", "reference_stats", "report", "other"]
FILE_ROLES: tuple[FileRole, ...] = ("model", "golden", "reference_stats", "report", "other")

# What a converter output directory may hold, and the role of each file.
_KNOWN_FILES: dict[str, FileRole] = {
    "model.onnx": "model",
    "model.tflite": "model",
    # An ONNX model's external tensors (the model names this file): a plain file to agents.
    "model.onnx.data": "other",
    "golden.npz": "golden",
    "reference_stats.json": "reference_stats",
    "report.json": "report",
}
_MODEL_SUFFIXES = (".onnx", ".tflite")

_BLOCK_BYTES = 512
_USTAR_MAX_OCTAL = 8**11 - 1  # 11 octal digits: the size and mtime fields' range
_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(?:/[A-Za-z0-9_][A-Za-z0-9._-]*)*", re.ASCII)
_PATH_MAX_BYTES = 100  # fits the USTAR name field: no prefix field, no pax header
_ZERO_BLOCK = bytes(_BLOCK_BYTES)
_HEADER_FIELDS = (
    (0, 100, "name"),
    (100, 108, "mode"),
    (108, 116, "uid"),
    (116, 124, "gid"),
    (124, 136, "size"),
    (136, 148, "mtime"),
    (148, 156, "checksum"),
    (156, 157, "type"),
    (157, 257, "linkname"),
    (257, 263, "magic"),
    (263, 265, "version"),
    (265, 297, "uname"),
    (297, 329, "gname"),
    (329, 337, "devmajor"),
    (337, 345, "devminor"),
    (345, 500, "prefix"),
    (500, 512, "padding"),
)
_MEMBER_KINDS = {
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "character device",
    b"4": "block device",
    b"5": "directory",
    b"6": "FIFO",
    b"x": "pax extended header",
    b"g": "pax global header",
    b"L": "GNU long name header",
    b"K": "GNU long link header",
    b"S": "GNU sparse file",
    b"V": "volume label",
    b"M": "multi-volume continuation",
    b"D": "GNU dump directory",
}


@dataclass(frozen=True)
class Limits:
    """Bounds on what a bundle may make a device read and write (defaults suit edge models)."""

    max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES
    max_members: int = 64  # files the manifest lists (envelope.json not counted)
    max_file_bytes: int = 4 << 30
    max_total_bytes: int = 8 << 30
    chunk_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for name in ("max_envelope_bytes", "max_members", "max_file_bytes", "max_total_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; found {getattr(self, name)}")
        if self.max_file_bytes > _USTAR_MAX_OCTAL:
            raise ValueError(f"max_file_bytes cannot exceed the USTAR limit {_USTAR_MAX_OCTAL}")
        if self.chunk_bytes < _BLOCK_BYTES:
            raise ValueError(f"chunk_bytes must be >= {_BLOCK_BYTES}; found {self.chunk_bytes}")


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class BundleFile:
    """A file the manifest lists: path inside the bundle, size, sha256 and role."""

    path: str
    size_bytes: int
    sha256: str
    role: FileRole


@dataclass(frozen=True)
class Manifest:
    """The signed description of a bundle (payload of `envelope.json`)."""

    name: str
    version: str
    security_epoch: int
    profile: str
    created: datetime
    files: tuple[BundleFile, ...]
    runtime: Mapping[str, object] = field(default_factory=dict)
    signature: Mapping[str, object] = field(default_factory=lambda: {"inputs": [], "outputs": []})
    extra: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("runtime", "signature", "extra"):
            object.__setattr__(self, name, freeze_json(getattr(self, name)))
        object.__setattr__(self, "files", tuple(self.files))
        _validate_manifest(self)

    def to_payload(self) -> bytes:
        """Canonical JSON."""
        return canonical_json(
            {
                "schema": MANIFEST_SCHEMA,
                "name": self.name,
                "version": self.version,
                "security_epoch": self.security_epoch,
                "profile": self.profile,
                "runtime": self.runtime,
                "signature": self.signature,
                "created": format_rfc3339(self.created),
                "files": [
                    {"path": f.path, "size": f.size_bytes, "sha256": f.sha256, "role": f.role}
                    for f in self.files
                ],
                "extra": self.extra,
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes) -> Manifest:
        """Parse and validate a manifest payload (schema only; signatures are checked before)."""
        document = load_json_object(payload, what="manifest", error=ManifestError)
        fields = Fields(document, what="manifest", error=ManifestError)
        fields.only(
            (
                "schema",
                "name",
                "version",
                "security_epoch",
                "profile",
                "runtime",
                "signature",
                "created",
                "files",
                "extra",
            )
        )
        schema = fields.string("schema")
        if schema != MANIFEST_SCHEMA:
            fields.fail(f"schema must be {MANIFEST_SCHEMA!r}; found {schema[:100]!r}")
        signature = fields.child("signature")
        signature.only(("inputs", "outputs"))
        for key in ("inputs", "outputs"):
            for index, item in enumerate(signature.array(key)):
                signature.item(item, what=f"{key}[{index}]")
        files = []
        for index, item in enumerate(fields.array("files")):
            entry = fields.item(item, what=f"files[{index}]")
            entry.only(("path", "size", "sha256", "role"))
            role = entry.string("role")
            if role not in FILE_ROLES:
                entry.fail(f"role must be one of {', '.join(FILE_ROLES)}; found {role[:40]!r}")
            files.append(
                BundleFile(
                    path=entry.string("path"),
                    size_bytes=entry.integer("size", minimum=0, maximum=_USTAR_MAX_OCTAL),
                    sha256=entry.sha256("sha256"),
                    role=_as_role(role),
                )
            )
        return cls(
            name=fields.string("name", pattern=NAME_PATTERN, hint="a bundle name"),
            version=fields.string("version", pattern=SEMVER_PATTERN, hint="a semantic version"),
            security_epoch=fields.integer("security_epoch", minimum=0, maximum=2**63 - 1),
            profile=fields.string("profile", pattern=NAME_PATTERN, hint="a profile name"),
            created=fields.timestamp("created"),
            files=tuple(files),
            runtime=fields.mapping("runtime"),
            signature=fields.mapping("signature"),
            extra=fields.mapping("extra"),
        )

    @property
    def mtime(self) -> int:
        """The tar mtime of every member: `created` in whole seconds since the epoch."""
        return int(self.created.timestamp())

    def file(self, path: str) -> BundleFile:
        """The listed file at `path` (KeyError if absent)."""
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)


def _as_role(role: str) -> FileRole:
    for known in FILE_ROLES:
        if role == known:
            return known
    raise ManifestError(f"unknown file role {role!r}")


def _validate_manifest(manifest: Manifest) -> None:
    def fail(message: str) -> None:
        raise ManifestError(f"manifest: {message}")

    if not NAME_PATTERN.fullmatch(manifest.name):
        fail(f"name {manifest.name!r} must be letters, digits, '.', '_' or '-' (max 64)")
    if not NAME_PATTERN.fullmatch(manifest.profile):
        fail(f"profile {manifest.profile!r} must be letters, digits, '.', '_' or '-'")
    if not SEMVER_PATTERN.fullmatch(manifest.version):
        fail(f"version {manifest.version!r} is not a semantic version like 1.2.0")
    if manifest.security_epoch < 0:
        fail(f"security_epoch must be >= 0; found {manifest.security_epoch}")
    created = manifest.created
    if created.tzinfo is None or created.microsecond:
        fail(f"created must be a timezone-aware time in whole seconds; found {created}")
    if not 0 <= created.timestamp() <= _USTAR_MAX_OCTAL:
        fail(f"created {format_rfc3339(created)} is outside the tar mtime range (1970-2242)")
    io_signature = manifest.signature
    if sorted(io_signature) != ["inputs", "outputs"] or not all(
        isinstance(io_signature[key], tuple) for key in ("inputs", "outputs")
    ):
        fail("signature must be {'inputs': [...], 'outputs': [...]}")
    if not manifest.files:
        fail("files is empty: a bundle holds at least its model")
    if not any(f.role == "model" for f in manifest.files):
        fail("no file has role 'model'")
    previous = ""
    lowered: set[str] = set()
    for entry in manifest.files:
        path = entry.path
        if (
            _PATH.fullmatch(path) is None
            or len(path.encode()) > _PATH_MAX_BYTES
            or path == ENVELOPE_MEMBER
        ):
            fail(
                f"file path {path[:120]!r} is not allowed: relative, '/'-separated, each part "
                f"starting with a letter, digit or '_', at most {_PATH_MAX_BYTES} bytes, not "
                f"{ENVELOPE_MEMBER!r}"
            )
        if path <= previous:
            fail(f"files must be sorted by path without duplicates; {path!r} follows {previous!r}")
        if path.lower() in lowered:
            fail(f"file path {path!r} differs from another only by case")
        if previous and path.startswith(previous + "/"):
            fail(f"{previous!r} is listed as a file and as a directory of {path!r}")
        if not 0 <= entry.size_bytes <= _USTAR_MAX_OCTAL:
            fail(f"size of {path!r} must be between 0 and {_USTAR_MAX_OCTAL}")
        lowered.add(path.lower())
        previous = path
    # A file "a" and a file "a/b" need not be adjacent once sorted ("a" < "a-x" < "a/b").
    paths = {entry.path for entry in manifest.files}
    for entry in manifest.files:
        parts = entry.path.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in paths:
                fail(f"{'/'.join(parts[:depth])!r} is listed as a file and as a directory")


def _check_limits(manifest: Manifest, limits: Limits) -> None:
    if len(manifest.files) > limits.max_members:
        raise LimitError(
            f"manifest lists {len(manifest.files)} files; the limit is {limits.max_members}"
        )
    total = 0
    for entry in manifest.files:
        if entry.size_bytes > limits.max_file_bytes:
            raise LimitError(
                f"{entry.path} is {entry.size_bytes} bytes; the per-file limit is "
                f"{limits.max_file_bytes} (raise Limits.max_file_bytes if the device has room)"
            )
        total += entry.size_bytes
    if total > limits.max_total_bytes:
        raise LimitError(
            f"files total {total} bytes; the limit is {limits.max_total_bytes} "
            "(raise Limits.max_total_bytes if the device has room)"
        )


# ---------------------------------------------------------------------------------------------
# The canonical tar layout


def _ustar_header(name: str, *, size_bytes: int, mtime: int) -> bytes:
    """The one header edgekit writes for a member (and the only one it accepts)."""
    header = bytearray(
        b"".join(
            (
                name.encode("ascii").ljust(100, b"\0"),
                b"0000644\0",
                b"0000000\0",
                b"0000000\0",
                b"%011o\0" % size_bytes,
                b"%011o\0" % mtime,
                b" " * 8,  # checksum placeholder: computed with spaces here
                b"0",
                bytes(100),
                b"ustar\x00",
                b"00",
                bytes(32),
                bytes(32),
                bytes(8),
                bytes(8),
                bytes(155),
                bytes(12),
            )
        )
    )
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _padding(size_bytes: int) -> int:
    return -size_bytes % _BLOCK_BYTES


def _field_name(offset: int) -> str:
    for start, end, name in _HEADER_FIELDS:
        if start <= offset < end:
            return name
    return "?"


@dataclass(frozen=True)
class _Member:
    name: str
    kind: bytes
    header: bytes
    offset: int


def _parse_member(header: bytes, offset: int) -> _Member:
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\x00":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnsafeMemberError(
            f"tar member at offset {offset} has a name that is not UTF-8: {name[:120]!r}"
        ) from e
    return _Member(text, header[156:157], header, offset)


def _member_size(member: _Member) -> int:
    field_bytes = member.header[124:136]
    digits = field_bytes.rstrip(b"\0 ").lstrip(b" ")
    if not digits or not all(0x30 <= b <= 0x37 for b in digits):
        raise ArchiveError(
            f"tar member {member.name!r} at offset {member.offset} has a malformed size field "
            f"{field_bytes!r}: not an edgekit bundle"
        )
    return int(digits, 8)


def _check_member_safety(member: _Member) -> None:
    if member.kind in _MEMBER_KINDS:
        raise UnsafeMemberError(
            f"tar member {member.name[:120]!r} is a {_MEMBER_KINDS[member.kind]}: bundles hold "
            "only regular files (links, devices, directories and extension headers can write "
            "outside the destination or hide what is extracted)"
        )
    if member.kind != b"0":
        raise ArchiveError(
            f"tar member {member.name[:120]!r} has type {member.kind!r}; bundles hold only "
            "regular files of type '0'"
        )
    parts = member.name.split("/")
    if not member.name or member.name.startswith("/") or "\\" in member.name:
        raise UnsafeMemberError(
            f"tar member name {member.name[:120]!r} is empty, absolute or uses '\\': refusing "
            "(only relative paths inside the destination are allowed)"
        )
    if ".." in parts:
        raise UnsafeMemberError(
            f"tar member name {member.name[:120]!r} contains '..': path traversal refused"
        )


def _check_header(member: _Member, *, size_bytes: int, mtime: int) -> None:
    expected = _ustar_header(member.name, size_bytes=size_bytes, mtime=mtime)
    if member.header != expected:
        first = next(
            i for i, (a, b) in enumerate(zip(member.header, expected, strict=True)) if a != b
        )
        raise ArchiveError(
            f"tar header of {member.name!r} (offset {member.offset}) differs from the canonical "
            f"one in field {_field_name(first)!r} (byte {first}): the bundle was altered or not "
            "written by edgekit; rebuild it with `edgekit bundle build`"
        )


class ReadableBinary(Protocol):
    """A binary stream (an open file, a socket file, `io.BytesIO`)."""

    def readinto(self, buffer: memoryview, /) -> int | None:
        """Read into `buffer`, returning the count (0 at end of stream)."""


class _Sink(Protocol):
    def write(self, data: memoryview, /) -> object: ...

    def close(self) -> None: ...


class _Reader:
    """Exact reads over the source, counting the offset and optionally hashing every byte."""

    def __init__(self, source: ReadableBinary, *, chunk_bytes: int, whole: bool) -> None:
        self._source = source
        self._buffer = memoryview(bytearray(chunk_bytes))
        self._whole = hashlib.sha256() if whole else None
        self.offset = 0

    def _fill(self, view: memoryview, *, what: str) -> None:
        filled = 0
        while filled < len(view):
            count = self._source.readinto(view[filled:])
            if not count:
                raise ArchiveError(
                    f"bundle ends at byte {self.offset + filled} inside {what}: truncated "
                    "download or not an edgekit bundle"
                )
            filled += count
        if self._whole is not None:
            self._whole.update(view)
        self.offset += len(view)

    def read_exact(self, size_bytes: int, *, what: str) -> bytes:
        data = bytearray(size_bytes)
        self._fill(memoryview(data), what=what)
        return bytes(data)

    def stream(self, size_bytes: int, *, what: str, consume: Callable[[memoryview], None]) -> None:
        remaining = size_bytes
        while remaining:
            view = self._buffer[: min(remaining, len(self._buffer))]
            self._fill(view, what=what)
            consume(view)
            remaining -= len(view)

    def skip_padding(self, size_bytes: int, *, what: str) -> None:
        padding = self.read_exact(_padding(size_bytes), what=f"the padding after {what}")
        if padding.count(0) != len(padding):
            raise ArchiveError(
                f"padding after {what} (ending at byte {self.offset}) is not all zero bytes: "
                "the bundle was altered"
            )

    def at_end(self) -> bool:
        probe = memoryview(bytearray(1))
        return not self._source.readinto(probe)

    def whole_sha256(self) -> str | None:
        return None if self._whole is None else self._whole.hexdigest()


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
class _ReadResult:
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


def _read_bundle(
    source: bytes | bytearray | memoryview | ReadableBinary,
    *,
    accept: Callable[[Envelope], frozenset[str]],
    min_security_epoch: int,
    limits: Limits,
    open_sink: Callable[[BundleFile], _Sink] | None = None,
    expected_sha256: str | None = None,
) -> _ReadResult:
    reader = _Reader(
        _as_stream(source), chunk_bytes=limits.chunk_bytes, whole=expected_sha256 is not None
    )
    header = reader.read_exact(_BLOCK_BYTES, what="the first tar header")
    if header == _ZERO_BLOCK:
        raise ArchiveError("the bundle is an empty tar: not an edgekit bundle")
    member = _parse_member(header, 0)
    _check_member_safety(member)
    if member.name != ENVELOPE_MEMBER:
        raise ArchiveError(
            f"the first tar member is {member.name[:120]!r}, not {ENVELOPE_MEMBER!r}: not an "
            "edgekit bundle (build one with `edgekit bundle build`)"
        )
    envelope_size = _member_size(member)
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
    _check_limits(manifest, limits)
    if manifest.security_epoch < min_security_epoch:
        raise EpochError(
            f"bundle {manifest.name} {manifest.version} has security_epoch "
            f"{manifest.security_epoch}, below the device's floor {min_security_epoch}: "
            "installing it would roll back a security fix; build the bundle with "
            f"--security-epoch {min_security_epoch} or higher"
        )
    _check_header(member, size_bytes=envelope_size, mtime=manifest.mtime)

    position = {entry.path: index for index, entry in enumerate(manifest.files)}
    seen = {ENVELOPE_MEMBER}
    verified: list[VerifiedFile] = []
    while True:
        offset = reader.offset
        header = reader.read_exact(_BLOCK_BYTES, what="a tar header")
        if header == _ZERO_BLOCK:
            if len(verified) < len(manifest.files):
                missing = manifest.files[len(verified)]
                raise MissingFileError(
                    f"{missing.path} is listed in the signed manifest but absent from the "
                    "bundle: rebuild or re-download it"
                )
            second = reader.read_exact(_BLOCK_BYTES, what="the end-of-archive marker")
            if second != _ZERO_BLOCK:
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
        member = _parse_member(header, offset)
        _check_member_safety(member)
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
        declared = _member_size(member)
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
        _check_header(member, size_bytes=declared, mtime=manifest.mtime)
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
        verified.append(VerifiedFile(entry, offset + _BLOCK_BYTES))

    whole = reader.whole_sha256()
    if expected_sha256 is not None and whole != expected_sha256:
        raise HashMismatchError(
            f"sha256 of the bundle is {whole}; the directive names {expected_sha256}: "
            "this is not the bundle the directive pins"
        )
    return _ReadResult(
        envelope, envelope_bytes, manifest, signed_by, tuple(verified), reader.offset
    )


def _tee(digest: hashlib._Hash, sink: _Sink | None) -> Callable[[memoryview], None]:
    if sink is None:
        return digest.update
    update = digest.update
    write = sink.write

    def consume(view: memoryview) -> None:
        update(view)
        write(view)

    return consume


def _policy(trust: TrustStore | SignaturePolicy) -> SignaturePolicy:
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
    policy = _policy(trust)
    result = _read_bundle(
        source,
        accept=lambda envelope: check_signatures(envelope, policy),
        min_security_epoch=min_security_epoch,
        limits=limits,
        expected_sha256=expected_sha256,
    )
    return VerifiedBundle(
        result.manifest, result.signed_by, result.files, result.size_bytes, result.envelope_bytes
    )


class _FileSink:
    def __init__(self, path: Path, *, fsync: bool) -> None:
        self._file = open(path, "xb")  # noqa: SIM115 - closed by close(), called in a finally
        self._fsync = fsync

    def write(self, data: memoryview, /) -> object:
        return self._file.write(data)

    def close(self) -> None:
        try:
            self._file.flush()
            if self._fsync:
                os.fsync(self._file.fileno())
        finally:
            self._file.close()


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in the folder `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def extract_bundle(
    source: bytes | bytearray | memoryview | ReadableBinary,
    dest_dir: Path,
    *,
    trust: TrustStore | SignaturePolicy,
    min_security_epoch: int = 0,
    limits: Limits = DEFAULT_LIMITS,
    expected_sha256: str | None = None,
    fsync: bool = True,
) -> VerifiedBundle:
    """Verify a bundle while extracting its files into `dest_dir` (absent or empty).

    Files are written into a temporary directory inside `dest_dir`, hashed while streaming,
    and moved into place only after every check passed: on failure nothing is left behind.
    """
    policy = _policy(trust)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise FileExistsError(f"extraction directory {dest} is not empty")
    staging = Path(tempfile.mkdtemp(prefix=".ekb-extract-", dir=dest))
    staging_root = staging.resolve()

    def open_sink(entry: BundleFile) -> _Sink:
        target = staging / entry.path
        if not target.resolve().is_relative_to(staging_root):  # defence in depth
            raise UnsafeMemberError(f"{entry.path!r} would land outside {dest}")
        target.parent.mkdir(parents=True, exist_ok=True)
        return _FileSink(target, fsync=fsync)

    try:
        result = _read_bundle(
            source,
            accept=lambda envelope: check_signatures(envelope, policy),
            min_security_epoch=min_security_epoch,
            limits=limits,
            open_sink=open_sink,
            expected_sha256=expected_sha256,
        )
        for name in sorted({entry.path.split("/", 1)[0] for entry in result.manifest.files}):
            os.replace(staging / name, dest / name)
        staging.rmdir()
        if fsync:
            fsync_dir(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = tuple(VerifiedFile(f.entry, f.offset_bytes, dest / f.entry.path) for f in result.files)
    logger.info(
        "extracted %s %s (%d files) to %s",
        result.manifest.name,
        result.manifest.version,
        len(files),
        dest,
    )
    return VerifiedBundle(
        result.manifest, result.signed_by, files, result.size_bytes, result.envelope_bytes
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
    result = _read_bundle(
        source, accept=lambda envelope: frozenset(), min_security_epoch=0, limits=limits
    )
    keys = known_keys or {}
    message = pae(result.envelope.payload_type, result.envelope.payload)
    statuses = tuple(
        SignatureStatus(s.keyid, keys[s.keyid].verify(s.sig, message) if s.keyid in keys else None)
        for s in result.envelope.signatures
    )
    return BundleInspection(result.manifest, statuses, result.files, result.size_bytes)


# ---------------------------------------------------------------------------------------------
# Building (file I/O)


@dataclass(frozen=True)
class BundleInput:
    """A file to put in a bundle: its path inside the bundle, where it is now, and its role."""

    path: str
    source: Path
    role: FileRole


def _role_for(name: str) -> FileRole:
    if name in _KNOWN_FILES:
        return _KNOWN_FILES[name]
    if name.endswith(_MODEL_SUFFIXES):
        return "model"
    return "other"


def collect_bundle_inputs(sources: Path | Sequence[Path]) -> tuple[BundleInput, ...]:
    """The files to bundle: the known files of a converter output directory, or given files.

    From a directory: `model.onnx` (with `model.onnx.data` when its tensors are stored
    externally)/`model.tflite`, `golden.npz`, `reference_stats.json` and `report.json`, those
    present. Given files keep their base name; the role follows it.
    """
    paths = [sources] if isinstance(sources, Path) else [Path(p) for p in sources]
    if len(paths) == 1 and paths[0].is_dir():
        directory = paths[0]
        found = [directory / name for name in sorted(_KNOWN_FILES) if (directory / name).is_file()]
        if not any(p.name in ("model.onnx", "model.tflite") for p in found):
            raise ManifestError(
                f"{directory} holds no model.onnx or model.tflite: give the converter's output "
                "directory or the files themselves"
            )
        paths = found
    inputs: dict[str, BundleInput] = {}
    for path in paths:
        if not path.is_file():
            raise ManifestError(f"{path} is not a file (give files, or one converter directory)")
        if path.name in inputs:
            raise ManifestError(f"two inputs are named {path.name!r}: rename one")
        inputs[path.name] = BundleInput(path.name, path, _role_for(path.name))
    return tuple(sorted(inputs.values(), key=lambda i: i.path))


def hash_file(path: Path, *, chunk_bytes: int = DEFAULT_LIMITS.chunk_bytes) -> tuple[int, str]:
    """Size in bytes and hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    size = 0
    buffer = memoryview(bytearray(chunk_bytes))
    with open(path, "rb") as f:
        while count := f.readinto(buffer):
            digest.update(buffer[:count])
            size += count
    return size, digest.hexdigest()


def _default_created(inputs: Sequence[BundleInput]) -> datetime:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None:
        try:
            seconds = int(epoch)
        except ValueError as e:
            raise ManifestError(
                f"SOURCE_DATE_EPOCH must be an integer number of seconds; found {epoch!r}"
            ) from e
    else:
        seconds = max(int(i.source.stat().st_mtime) for i in inputs) if inputs else 0
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def create_manifest(
    inputs: Sequence[BundleInput],
    *,
    name: str,
    version: str,
    security_epoch: int,
    profile: str,
    runtime: Mapping[str, object] | None = None,
    signature: Mapping[str, object] | None = None,
    created: datetime | None = None,
    extra: Mapping[str, object] | None = None,
) -> Manifest:
    """Hash the input files into a validated manifest.

    `created` defaults to SOURCE_DATE_EPOCH if set, else the newest input mtime, so that
    rebuilding from the same files gives the same bundle bytes.
    """
    moment = _default_created(inputs) if created is None else created
    if moment.tzinfo is None:
        raise ManifestError("created must be timezone-aware (UTC)")
    files = []
    for item in sorted(inputs, key=lambda i: i.path):
        size, digest = hash_file(item.source)
        files.append(BundleFile(item.path, size, digest, item.role))
    io_signature = dict(signature or {})
    manifest = Manifest(
        name=name,
        version=version,
        security_epoch=security_epoch,
        profile=profile,
        created=moment.astimezone(timezone.utc).replace(microsecond=0),
        files=tuple(files),
        runtime=dict(runtime or {}),
        signature={
            "inputs": list(_as_list(io_signature.get("inputs"))),
            "outputs": list(_as_list(io_signature.get("outputs"))),
        },
        extra=dict(extra or {}),
    )
    # One validator for what we write and what we read.
    return Manifest.from_payload(manifest.to_payload())


def _as_list(value: object) -> Iterable[object]:
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        return value
    raise ManifestError(f"signature inputs/outputs must be lists; found {type(value).__name__}")


@contextmanager
def _open_at(path: Path, offset_bytes: int) -> Iterator[io.BufferedReader]:
    with open(path, "rb") as f:
        f.seek(offset_bytes)
        yield f


def _copy_member(
    out: io.BufferedWriter, entry: BundleFile, source: io.BufferedReader, *, chunk_bytes: int
) -> None:
    digest = hashlib.sha256()
    remaining = entry.size_bytes
    buffer = memoryview(bytearray(chunk_bytes))
    while remaining:
        view = buffer[: min(remaining, chunk_bytes)]
        count = source.readinto(view)
        if not count:
            break
        digest.update(view[:count])
        out.write(view[:count])
        remaining -= count
    if remaining or digest.hexdigest() != entry.sha256:
        raise HashMismatchError(
            f"{entry.path} changed while the bundle was being written (its size or sha256 no "
            "longer matches the manifest): build again once the file is stable"
        )


def write_bundle(
    out_path: Path,
    *,
    manifest: Manifest,
    envelope: bytes,
    open_source: Callable[[BundleFile], AbstractContextManager[io.BufferedReader]],
    chunk_bytes: int = DEFAULT_LIMITS.chunk_bytes,
) -> Path:
    """Write the canonical tar for `manifest` and `envelope` atomically to `out_path`.

    `open_source(entry)` yields a stream positioned at the entry's bytes; each is re-hashed
    while copying so a file changed since hashing cannot slip in.
    """
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_ustar_header(ENVELOPE_MEMBER, size_bytes=len(envelope), mtime=manifest.mtime))
            f.write(envelope)
            f.write(bytes(_padding(len(envelope))))
            for entry in manifest.files:
                f.write(
                    _ustar_header(entry.path, size_bytes=entry.size_bytes, mtime=manifest.mtime)
                )
                with open_source(entry) as source:
                    _copy_member(f, entry, source, chunk_bytes=chunk_bytes)
                f.write(bytes(_padding(entry.size_bytes)))
            f.write(_ZERO_BLOCK * 2)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, out)
        fsync_dir(out.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    logger.info("wrote bundle %s", out)
    return out


def bundle_filename(name: str, version: str, profile: str) -> str:
    """`<name>-<version>-<profile>.ekb`."""
    return f"{name}-{version}-{profile}{BUNDLE_SUFFIX}"


def build_bundle(
    inputs: Sequence[BundleInput],
    *,
    out_path: Path,
    name: str,
    version: str,
    security_epoch: int,
    profile: str,
    signers: Iterable[Signer] = (),
    runtime: Mapping[str, object] | None = None,
    signature: Mapping[str, object] | None = None,
    created: datetime | None = None,
    extra: Mapping[str, object] | None = None,
) -> Path:
    """Hash `inputs`, sign the manifest with `signers` (none: unsigned) and write the bundle."""
    manifest = create_manifest(
        inputs,
        name=name,
        version=version,
        security_epoch=security_epoch,
        profile=profile,
        runtime=runtime,
        signature=signature,
        created=created,
        extra=extra,
    )
    envelope = sign_envelope(manifest.to_payload(), MANIFEST_PAYLOAD_TYPE, signers)
    sources = {item.path: item.source for item in inputs}
    return write_bundle(
        out_path,
        manifest=manifest,
        envelope=envelope,
        open_source=lambda entry: _open_at(sources[entry.path], 0),
    )


def _read_report(inputs: Sequence[BundleInput]) -> dict[str, object]:
    for item in inputs:
        if item.path == "report.json":
            return load_json_object(
                item.source.read_bytes(), what=str(item.source), error=ManifestError
            )
    return {}


def sign_and_build_bundle(
    source_dir_or_files: Path | Sequence[Path],
    *,
    name: str,
    version: str,
    security_epoch: int,
    profile: str | None,
    out_dir: Path,
    signers: Iterable[Signer],
    created: datetime | None = None,
) -> Path:
    """Bundle a converter output directory (or files) as `<out_dir>/<name>-<version>-<profile>.ekb`.

    `profile`, `runtime` and the input/output `signature` come from `report.json` when it
    has them (`profile` given here wins). Returns the bundle's path.
    """
    inputs = collect_bundle_inputs(source_dir_or_files)
    report = _read_report(inputs)
    fields = Fields(report, what="report.json", error=ManifestError)
    if profile is None:
        if not fields.has("profile"):
            raise ManifestError(
                "no profile given and report.json names none: pass --profile (e.g. raspberrypi)"
            )
        profile = fields.string("profile")
    runtime = fields.mapping("runtime") if fields.has("runtime") else {}
    signature = fields.mapping("signature") if fields.has("signature") else {}
    out = Path(out_dir) / bundle_filename(name, version, profile)
    return build_bundle(
        inputs,
        out_path=out,
        name=name,
        version=version,
        security_epoch=security_epoch,
        profile=profile,
        signers=signers,
        runtime=runtime,
        signature=signature,
        created=created,
    )


def sign_bundle(path: Path, signers: Iterable[Signer], *, limits: Limits = DEFAULT_LIMITS) -> Path:
    """Add signatures to the bundle at `path`, rewriting it deterministically in place.

    The bundle's layout and hashes are checked first: a signer only vouches for intact
    content. Existing signatures are kept; a signer's earlier signature is replaced.
    """
    bundle_path = Path(path)
    with open(bundle_path, "rb") as f:
        result = _read_bundle(
            f, accept=lambda envelope: frozenset(), min_security_epoch=0, limits=limits
        )
    envelope = add_signatures(
        result.envelope_bytes,
        signers,
        payload_type=MANIFEST_PAYLOAD_TYPE,
        max_envelope_bytes=limits.max_envelope_bytes,
    )
    if len(envelope) > limits.max_envelope_bytes:
        raise LimitError(
            f"with the new signatures {ENVELOPE_MEMBER} would be {len(envelope)} bytes; the "
            f"limit is {limits.max_envelope_bytes}"
        )
    offsets = {f.entry.path: f.offset_bytes for f in result.files}
    return write_bundle(
        bundle_path,
        manifest=result.manifest,
        envelope=envelope,
        open_source=lambda entry: _open_at(bundle_path, offsets[entry.path]),
        chunk_bytes=limits.chunk_bytes,
    )
