"""Bundles (`.ekb`): a signed manifest and the files it lists, in one deterministic tar.

Layout (uncompressed POSIX USTAR, no gzip: models barely compress and a decompressor is one
more bomb to defuse). Members, in this order: `envelope.json` (a DSSE envelope, payloadType
`application/vnd.edgekit.manifest+json`, in canonical JSON), then every file the manifest
lists, sorted by path. Every header is exactly what `tarformat.ustar_header` writes: regular
file, mode 0644, uid/gid 0, empty uname/gname, mtime = the manifest's `created`, no prefix,
no pax or GNU extensions. Data is padded with zeros to 512 bytes and the archive ends with
exactly two zero blocks (no record padding). Same inputs, same bytes.

Verification reads that layout strictly, so every byte of a bundle is either covered by a
signature or compared against what the builder would have written; anything else is
refused. Order: envelope size limit, signatures (threshold of the trust store's `bundles`
role), manifest schema and limits, security epoch floor, then each member's header, size and
sha256 while streaming it.

The package's modules, from the pure core outwards:

- `manifest`: the signed manifest (`Manifest`, `BundleFile`, `Limits`), parsed and validated.
- `tarformat`: the canonical USTAR layout: headers edgekit writes, strict member parsing.
- `verify`: `verify_bundle` and `inspect_bundle`, pure over bytes or a binary stream.
- `extract`: `extract_bundle`, verify-while-extracting into a directory (the device's disk).
- `build`: the workstation side: hash inputs, sign, write `.ekb` files atomically.
"""

from __future__ import annotations

from edgekit.bundle.build import (
    BundleInput,
    build_bundle,
    bundle_filename,
    collect_bundle_inputs,
    create_manifest,
    sign_and_build_bundle,
    sign_bundle,
    write_bundle,
)
from edgekit.bundle.extract import extract_bundle
from edgekit.bundle.manifest import (
    BUNDLE_SUFFIX,
    DEFAULT_LIMITS,
    ENVELOPE_MEMBER,
    FILE_ROLES,
    MANIFEST_PAYLOAD_TYPE,
    MANIFEST_SCHEMA,
    BundleFile,
    FileRole,
    Limits,
    Manifest,
)
from edgekit.bundle.tarformat import ReadableBinary
from edgekit.bundle.verify import (
    BundleInspection,
    SignatureStatus,
    VerifiedBundle,
    VerifiedFile,
    inspect_bundle,
    verify_bundle,
)
from edgekit.files import hash_file

__all__ = [
    "BUNDLE_SUFFIX",
    "DEFAULT_LIMITS",
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
