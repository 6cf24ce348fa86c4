"""Build and sign bundles on the workstation: hash the inputs into a manifest, sign it, write
the canonical tar atomically (re-hashing every file while copying it in).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edgekit import files
from edgekit.bundle.manifest import (
    BUNDLE_SUFFIX,
    DEFAULT_LIMITS,
    ENVELOPE_MEMBER,
    MANIFEST_PAYLOAD_TYPE,
    BundleFile,
    FileRole,
    Limits,
    Manifest,
)
from edgekit.bundle.tarformat import ZERO_BLOCK, padding_bytes, ustar_header
from edgekit.bundle.verify import read_bundle
from edgekit.trust._schema import Fields, load_json_object
from edgekit.trust.dsse import add_signatures, sign_envelope
from edgekit.trust.errors import HashMismatchError, LimitError, ManifestError
from edgekit.trust.keys import Signer

__all__ = [
    "BundleInput",
    "build_bundle",
    "bundle_filename",
    "collect_bundle_inputs",
    "create_manifest",
    "sign_and_build_bundle",
    "sign_bundle",
    "write_bundle",
]

logger = logging.getLogger(__name__)

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
    listed = []
    for item in sorted(inputs, key=lambda i: i.path):
        size, digest = files.hash_file(item.source)
        listed.append(BundleFile(item.path, size, digest, item.role))
    io_signature = dict(signature or {})
    manifest = Manifest(
        name=name,
        version=version,
        security_epoch=security_epoch,
        profile=profile,
        created=moment.astimezone(timezone.utc).replace(microsecond=0),
        files=tuple(listed),
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
            f.write(ustar_header(ENVELOPE_MEMBER, size_bytes=len(envelope), mtime=manifest.mtime))
            f.write(envelope)
            f.write(bytes(padding_bytes(len(envelope))))
            for entry in manifest.files:
                f.write(ustar_header(entry.path, size_bytes=entry.size_bytes, mtime=manifest.mtime))
                with open_source(entry) as source:
                    _copy_member(f, entry, source, chunk_bytes=chunk_bytes)
                f.write(bytes(padding_bytes(entry.size_bytes)))
            f.write(ZERO_BLOCK * 2)
            f.flush()
            files.step("fsync", temp)
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)
        files.rename(temp, out)
        files.fsync_dir(out.parent)
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
        result = read_bundle(
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
