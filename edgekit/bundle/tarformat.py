"""The canonical tar layout of a bundle: the one USTAR header edgekit writes, strict parsing.

Pure: headers are built and checked as bytes; `Reader` reads exact byte counts from a stream
(and optionally hashes all of it). Anything but a regular file with the canonical header is
refused: links, devices, directories, pax and GNU extension headers, traversal, odd padding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from edgekit.trust.errors import ArchiveError, UnsafeMemberError

__all__ = [
    "BLOCK_BYTES",
    "PATH_MAX_BYTES",
    "USTAR_MAX_OCTAL",
    "ZERO_BLOCK",
    "Member",
    "ReadableBinary",
    "Reader",
    "check_header",
    "check_member_safety",
    "member_size",
    "padding_bytes",
    "parse_member",
    "ustar_header",
]

BLOCK_BYTES = 512
USTAR_MAX_OCTAL = 8**11 - 1  # 11 octal digits: the size and mtime fields' range
PATH_MAX_BYTES = 100  # fits the USTAR name field: no prefix field, no pax header
ZERO_BLOCK = bytes(BLOCK_BYTES)
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


# ---------------------------------------------------------------------------------------------
# The canonical tar layout


def ustar_header(name: str, *, size_bytes: int, mtime: int) -> bytes:
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


def padding_bytes(size_bytes: int) -> int:
    return -size_bytes % BLOCK_BYTES


def _field_name(offset: int) -> str:
    for start, end, name in _HEADER_FIELDS:
        if start <= offset < end:
            return name
    return "?"


@dataclass(frozen=True)
class Member:
    name: str
    kind: bytes
    header: bytes
    offset: int


def parse_member(header: bytes, offset: int) -> Member:
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
    return Member(text, header[156:157], header, offset)


def member_size(member: Member) -> int:
    field_bytes = member.header[124:136]
    digits = field_bytes.rstrip(b"\0 ").lstrip(b" ")
    if not digits or not all(0x30 <= b <= 0x37 for b in digits):
        raise ArchiveError(
            f"tar member {member.name!r} at offset {member.offset} has a malformed size field "
            f"{field_bytes!r}: not an edgekit bundle"
        )
    return int(digits, 8)


def check_member_safety(member: Member) -> None:
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


def check_header(member: Member, *, size_bytes: int, mtime: int) -> None:
    expected = ustar_header(member.name, size_bytes=size_bytes, mtime=mtime)
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


class Sink(Protocol):
    def write(self, data: memoryview, /) -> object: ...

    def close(self) -> None: ...


class Reader:
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
        padding = self.read_exact(padding_bytes(size_bytes), what=f"the padding after {what}")
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
