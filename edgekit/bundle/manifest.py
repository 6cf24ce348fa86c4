"""The signed manifest of a bundle: what it holds, for which profile, at which security epoch.

Pure: `Manifest.from_payload` validates the JSON a signature covers; `Manifest.to_payload`
writes the canonical form. One validator (`_validate_manifest`) serves what edgekit writes and
what it reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from edgekit.bundle.tarformat import BLOCK_BYTES, PATH_MAX_BYTES, USTAR_MAX_OCTAL
from edgekit.trust._schema import (
    NAME_PATTERN,
    SEMVER_PATTERN,
    Fields,
    canonical_json,
    format_rfc3339,
    freeze_json,
    load_json_object,
)
from edgekit.trust.dsse import DEFAULT_MAX_ENVELOPE_BYTES
from edgekit.trust.errors import LimitError, ManifestError

__all__ = [
    "BUNDLE_SUFFIX",
    "DEFAULT_LIMITS",
    "ENVELOPE_MEMBER",
    "FILE_ROLES",
    "MANIFEST_PAYLOAD_TYPE",
    "MANIFEST_SCHEMA",
    "BundleFile",
    "FileRole",
    "Limits",
    "Manifest",
    "check_limits",
]

MANIFEST_PAYLOAD_TYPE = "application/vnd.edgekit.manifest+json"
MANIFEST_SCHEMA = "edgekit.manifest/v1"
ENVELOPE_MEMBER = "envelope.json"
BUNDLE_SUFFIX = ".ekb"
FileRole = Literal["model", "golden", "reference_stats", "report", "other"]
FILE_ROLES: tuple[FileRole, ...] = ("model", "golden", "reference_stats", "report", "other")
_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(?:/[A-Za-z0-9_][A-Za-z0-9._-]*)*", re.ASCII)


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
        if self.max_file_bytes > USTAR_MAX_OCTAL:
            raise ValueError(f"max_file_bytes cannot exceed the USTAR limit {USTAR_MAX_OCTAL}")
        if self.chunk_bytes < BLOCK_BYTES:
            raise ValueError(f"chunk_bytes must be >= {BLOCK_BYTES}; found {self.chunk_bytes}")


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
                    size_bytes=entry.integer("size", minimum=0, maximum=USTAR_MAX_OCTAL),
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
    if not 0 <= created.timestamp() <= USTAR_MAX_OCTAL:
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
            or len(path.encode()) > PATH_MAX_BYTES
            or path == ENVELOPE_MEMBER
        ):
            fail(
                f"file path {path[:120]!r} is not allowed: relative, '/'-separated, each part "
                f"starting with a letter, digit or '_', at most {PATH_MAX_BYTES} bytes, not "
                f"{ENVELOPE_MEMBER!r}"
            )
        if path <= previous:
            fail(f"files must be sorted by path without duplicates; {path!r} follows {previous!r}")
        if path.lower() in lowered:
            fail(f"file path {path!r} differs from another only by case")
        if previous and path.startswith(previous + "/"):
            fail(f"{previous!r} is listed as a file and as a directory of {path!r}")
        if not 0 <= entry.size_bytes <= USTAR_MAX_OCTAL:
            fail(f"size of {path!r} must be between 0 and {USTAR_MAX_OCTAL}")
        lowered.add(path.lower())
        previous = path
    # A file "a" and a file "a/b" need not be adjacent once sorted ("a" < "a-x" < "a/b").
    paths = {entry.path for entry in manifest.files}
    for entry in manifest.files:
        parts = entry.path.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in paths:
                fail(f"{'/'.join(parts[:depth])!r} is listed as a file and as a directory")


def check_limits(manifest: Manifest, limits: Limits) -> None:
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
