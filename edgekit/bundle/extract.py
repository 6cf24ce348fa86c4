"""Verify-while-extracting a bundle into a directory: the only bundle code that writes a device's
disk. Files land in a staging folder inside the destination and move into place only after
every check passed, so a failed or interrupted extraction leaves nothing that looks complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from edgekit import files
from edgekit.bundle.manifest import DEFAULT_LIMITS, BundleFile, Limits
from edgekit.bundle.tarformat import ReadableBinary
from edgekit.bundle.verify import (
    Sink,
    VerifiedBundle,
    VerifiedFile,
    read_bundle,
    signature_policy,
)
from edgekit.trust.dsse import SignaturePolicy, check_signatures
from edgekit.trust.errors import UnsafeMemberError
from edgekit.trust.truststore import TrustStore

__all__ = ["extract_bundle"]

logger = logging.getLogger(__name__)


class _FileSink:
    def __init__(self, path: Path, *, fsync: bool) -> None:
        files.step("write", path)
        self._file = open(path, "xb")  # noqa: SIM115 - closed by close(), called in a finally
        self._path = path
        self._fsync = fsync

    def write(self, data: memoryview, /) -> object:
        return self._file.write(data)

    def close(self) -> None:
        try:
            self._file.flush()
            if self._fsync:
                files.step("fsync", self._path)
                os.fsync(self._file.fileno())
        finally:
            self._file.close()


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
    policy = signature_policy(trust)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise FileExistsError(f"extraction directory {dest} is not empty")
    staging = Path(tempfile.mkdtemp(prefix=".ekb-extract-", dir=dest))
    staging_root = staging.resolve()

    def open_sink(entry: BundleFile) -> Sink:
        target = staging / entry.path
        if not target.resolve().is_relative_to(staging_root):  # defence in depth
            raise UnsafeMemberError(f"{entry.path!r} would land outside {dest}")
        target.parent.mkdir(parents=True, exist_ok=True)
        return _FileSink(target, fsync=fsync)

    try:
        result = read_bundle(
            source,
            accept=lambda envelope: check_signatures(envelope, policy),
            min_security_epoch=min_security_epoch,
            limits=limits,
            open_sink=open_sink,
            expected_sha256=expected_sha256,
        )
        for name in sorted({entry.path.split("/", 1)[0] for entry in result.manifest.files}):
            files.rename(staging / name, dest / name)
        staging.rmdir()
        if fsync:
            files.fsync_dir(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    extracted = tuple(
        VerifiedFile(f.entry, f.offset_bytes, dest / f.entry.path) for f in result.files
    )
    logger.info(
        "extracted %s %s (%d files) to %s",
        result.manifest.name,
        result.manifest.version,
        len(extracted),
        dest,
    )
    return VerifiedBundle(
        result.manifest, result.signed_by, extracted, result.size_bytes, result.envelope_bytes
    )
