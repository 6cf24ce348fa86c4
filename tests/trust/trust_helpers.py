"""Helpers shared by the trust and bundle tests (a uniquely named module, not conftest)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from edgekit.bundle import Manifest
from edgekit.bundle.tarformat import ustar_header
from edgekit.trust import Signer, parse_envelope

CREATED = datetime(2025, 1, 31, 12, 0, 0, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Keys:
    """Named in-memory keys for the roles of a test trust store."""

    root: Signer
    bundles: tuple[Signer, Signer, Signer]
    directives: Signer
    outsider: Signer


BuildBundle = Callable[..., bytes]


def manifest_of(bundle: bytes) -> Manifest:
    """The manifest inside a bundle's envelope (unverified: for crafting test inputs)."""
    size = int(bundle[124:135], 8)
    return Manifest.from_payload(parse_envelope(bundle[512 : 512 + size]).payload)


def members_of(bundle: bytes) -> list[tuple[str, bytes]]:
    """(name, data) of each member, read with the standard library."""
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        result = []
        for member in tar.getmembers():
            extracted = tar.extractfile(member)
            assert extracted is not None
            result.append((member.name, extracted.read()))
        return result


def raw_tar(members: Sequence[tarfile.TarInfo | tuple[str, bytes]], *, mtime: int) -> bytes:
    """A tar written by the standard library (not edgekit): to craft hostile layouts.

    Plain `(name, data)` members get the same header fields edgekit writes.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for item in members:
            if isinstance(item, tarfile.TarInfo):
                tar.addfile(item, io.BytesIO(b"x" * item.size) if item.isreg() else None)
                continue
            name, data = item
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = mtime
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def canonical_tar(members: Sequence[tuple[str, bytes]], *, mtime: int) -> bytes:
    """A tar in edgekit's exact canonical layout, from arbitrary members (for mix-and-match)."""
    parts = []
    for name, data in members:
        parts.append(ustar_header(name, size_bytes=len(data), mtime=mtime))
        parts.append(data + bytes(-len(data) % 512))
    parts.append(bytes(1024))
    return b"".join(parts)
