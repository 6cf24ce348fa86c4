"""Bundles: build, sign, verify, extract, and every refusal with its reason."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import tarfile
from pathlib import Path

import pytest

from edgekit.bundle import (
    ENVELOPE_MEMBER,
    BundleInput,
    Limits,
    Manifest,
    build_bundle,
    collect_bundle_inputs,
    create_manifest,
    extract_bundle,
    inspect_bundle,
    sign_and_build_bundle,
    sign_bundle,
    verify_bundle,
)
from edgekit.bundle.tarformat import ustar_header
from edgekit.trust import (
    ArchiveError,
    BundleError,
    EnvelopeError,
    EpochError,
    HashMismatchError,
    LimitError,
    ManifestError,
    MissingFileError,
    SignaturePolicy,
    ThresholdError,
    TrustStore,
    UnexpectedFileError,
    UnsafeMemberError,
    UnsignedError,
    UntrustedKeyError,
    generate_key,
    load_private_key,
    parse_envelope,
    sign_envelope,
)
from tests.trust.trust_helpers import (
    CREATED,
    BuildBundle,
    Keys,
    canonical_tar,
    manifest_of,
    members_of,
    raw_tar,
)

MTIME = int(CREATED.timestamp())


class CountingReader(io.BytesIO):
    """A stream that records how many bytes the verifier pulled from it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = super().readinto(buffer)
        self.bytes_read += count
        return count


# --- round trip --------------------------------------------------------------------------------


def test_round_trip_generate_build_sign_verify_extract(
    tmp_path: Path, model_dir: Path, truststore: TrustStore
) -> None:
    keyring = tmp_path / "keyring"
    generate_key("release", "correct horse", keyring_dir=keyring)
    signer = load_private_key("release", "correct horse", keyring_dir=keyring)
    store = truststore.with_key("bundles", signer.public_key)

    unsigned = sign_and_build_bundle(
        model_dir,
        name="digits",
        version="1.2.0",
        security_epoch=3,
        profile=None,
        out_dir=tmp_path / "out",
        signers=[],
        created=CREATED,
    )
    assert unsigned.name == "digits-1.2.0-raspberrypi.ekb"
    with pytest.raises(UnsignedError, match="no signatures"):
        verify_bundle(unsigned.read_bytes(), trust=store)

    sign_bundle(unsigned, [signer])
    verified = verify_bundle(unsigned.read_bytes(), trust=store, min_security_epoch=3)
    assert verified.signed_by == {signer.keyid}
    manifest = verified.manifest
    assert (manifest.name, manifest.version, manifest.profile) == ("digits", "1.2.0", "raspberrypi")
    assert manifest.security_epoch == 3
    assert manifest.runtime["format"] == "onnx"
    assert [f.path for f in manifest.files] == [
        "golden.npz",
        "model.onnx",
        "reference_stats.json",
        "report.json",
    ]
    assert manifest.file("model.onnx").role == "model"

    dest = tmp_path / "slot-b"
    with open(unsigned, "rb") as f:
        extracted = extract_bundle(f, dest, trust=store, min_security_epoch=3)
    assert sorted(p.name for p in dest.iterdir()) == [f.path for f in manifest.files]
    for item in extracted.files:
        assert item.path is not None
        assert item.path.read_bytes() == (model_dir / item.entry.path).read_bytes()
        # offset_bytes says where the verified bytes are inside the .ekb
        data = unsigned.read_bytes()
        start = item.offset_bytes
        assert data[start : start + item.entry.size_bytes] == item.path.read_bytes()


def test_threshold_two_of_three_accepts_any_two(
    keys: Keys, truststore_2_of_3: TrustStore, build: BuildBundle
) -> None:
    for pair in itertools.combinations(keys.bundles, 2):
        verified = verify_bundle(build(pair), trust=truststore_2_of_3)
        assert verified.signed_by == {s.keyid for s in pair}
    for single in keys.bundles:
        with pytest.raises(ThresholdError, match=r"1 valid signature\(s\) from trusted keys, 2"):
            verify_bundle(build([single]), trust=truststore_2_of_3)


def test_duplicate_signatures_by_one_key_count_once(
    keys: Keys, truststore_2_of_3: TrustStore, build: BuildBundle
) -> None:
    bundle = build([keys.bundles[0]])
    manifest = manifest_of(bundle)
    envelope = parse_envelope(bundle[512 : 512 + int(bundle[124:135], 8)])
    doubled = envelope.__class__(
        envelope.payload, envelope.payload_type, envelope.signatures * 2
    ).to_json_bytes()
    files = [(n, d) for n, d in members_of(bundle) if n != ENVELOPE_MEMBER]
    forged = canonical_tar([(ENVELOPE_MEMBER, doubled), *files], mtime=manifest.mtime)
    with pytest.raises(ThresholdError, match=r"1 valid signature\(s\)"):
        verify_bundle(forged, trust=truststore_2_of_3)


def test_same_inputs_give_identical_bytes(
    tmp_path: Path, model_dir: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = collect_bundle_inputs(model_dir)

    def build_to(name: str) -> bytes:
        return build_bundle(
            inputs,
            out_path=tmp_path / name,
            name="digits",
            version="1.0.0",
            security_epoch=0,
            profile="x86-64",
            signers=[keys.bundles[0]],
        ).read_bytes()

    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    os.utime(model_dir / "model.onnx", (1_700_000_000, 1_700_000_000))
    for other in ("golden.npz", "reference_stats.json", "report.json"):
        os.utime(model_dir / other, (1_600_000_000, 1_600_000_000))
    first, second = build_to("a.ekb"), build_to("b.ekb")
    assert first == second
    assert manifest_of(first).mtime == 1_700_000_000  # newest input mtime

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234567890")
    pinned = build_to("c.ekb")
    assert manifest_of(pinned).mtime == 1234567890
    assert pinned == build_to("d.ekb")

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ManifestError, match="SOURCE_DATE_EPOCH"):
        build_to("e.ekb")


def test_layout_is_plain_ustar_that_standard_tar_reads(keys: Keys, build: BuildBundle) -> None:
    bundle = build([keys.bundles[0]])
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        members = tar.getmembers()
    assert members[0].name == ENVELOPE_MEMBER
    assert [m.name for m in members][1:] == sorted(m.name for m in members[1:])
    for member in members:
        assert member.isreg()
        assert (member.mode, member.uid, member.gid, member.uname, member.gname) == (
            0o644,
            0,
            0,
            "",
            "",
        )
        assert member.mtime == MTIME
        expected = tarfile.TarInfo(member.name)
        expected.size, expected.mtime, expected.mode = member.size, MTIME, 0o644
        # Our header is byte-identical to what the standard library writes in USTAR format.
        ours = ustar_header(member.name, size_bytes=member.size, mtime=MTIME)
        theirs = expected.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii", errors="strict")
        assert ours == theirs
    assert len(bundle) % 512 == 0
    assert bundle[-1024:] == bytes(1024)


# --- signatures --------------------------------------------------------------------------------


def test_refuses_unsigned(truststore: TrustStore, build: BuildBundle) -> None:
    with pytest.raises(UnsignedError, match="carries no signatures"):
        verify_bundle(build([]), trust=truststore)


def test_refuses_untrusted_key(keys: Keys, truststore: TrustStore, build: BuildBundle) -> None:
    with pytest.raises(UntrustedKeyError, match="by keys the role does not trust"):
        verify_bundle(build([keys.outsider]), trust=truststore)


def test_refuses_key_of_another_role(
    keys: Keys, truststore: TrustStore, build: BuildBundle
) -> None:
    # The directives key is trusted, but not to sign bundles.
    with pytest.raises(UntrustedKeyError, match="role 'bundles'"):
        verify_bundle(build([keys.directives, keys.root]), trust=truststore)


def test_refuses_below_threshold(
    keys: Keys, truststore_2_of_3: TrustStore, build: BuildBundle
) -> None:
    with pytest.raises(ThresholdError, match=r"1 valid .* 2 required by role 'bundles'"):
        verify_bundle(build([keys.bundles[1], keys.outsider]), trust=truststore_2_of_3)


def test_refuses_envelope_with_wrong_payload_type(
    keys: Keys, truststore: TrustStore, build: BuildBundle
) -> None:
    bundle = build([keys.bundles[0]])
    manifest = manifest_of(bundle)
    envelope = sign_envelope(manifest.to_payload(), "application/json", [keys.bundles[0]])
    files = [(n, d) for n, d in members_of(bundle) if n != ENVELOPE_MEMBER]
    forged = canonical_tar([(ENVELOPE_MEMBER, envelope), *files], mtime=manifest.mtime)
    with pytest.raises(EnvelopeError, match="expected payloadType"):
        verify_bundle(forged, trust=truststore)


def test_refuses_non_canonical_envelope_even_if_signatures_verify(
    keys: Keys, truststore: TrustStore, build: BuildBundle
) -> None:
    bundle = build([keys.bundles[0]])
    manifest = manifest_of(bundle)
    members = members_of(bundle)
    pretty = json.dumps(json.loads(members[0][1]), indent=1).encode()
    forged = canonical_tar([(ENVELOPE_MEMBER, pretty), *members[1:]], mtime=manifest.mtime)
    with pytest.raises(ArchiveError, match="not in canonical JSON form"):
        verify_bundle(forged, trust=truststore)


# --- tampering ---------------------------------------------------------------------------------


def _regions(bundle: bytes) -> dict[int, str]:
    """Label each byte offset: header, data or padding of a member, or trailer."""
    labels: dict[int, str] = {}
    offset = 0
    while bundle[offset : offset + 512] != bytes(512):
        size = int(bundle[offset + 124 : offset + 135], 8)
        name = bundle[offset : offset + 100].rstrip(b"\0").decode()
        for i in range(offset, offset + 512):
            labels[i] = f"header:{name}"
        data_end = offset + 512 + size
        for i in range(offset + 512, data_end):
            labels[i] = f"data:{name}"
        padded_end = data_end + (-size % 512)
        for i in range(data_end, padded_end):
            labels[i] = f"padding:{name}"
        offset = padded_end
    for i in range(offset, len(bundle)):
        labels[i] = "trailer"
    return labels


def test_every_flipped_byte_is_refused(
    keys: Keys, truststore: TrustStore, build: BuildBundle
) -> None:
    """One flipped byte anywhere (headers, envelope, files, padding, trailer) is refused.

    With a single signature every byte matters: headers and padding are compared with the
    canonical layout, the envelope is signed and must be canonical JSON, file data is hashed.
    (With more signatures than the threshold, the bytes of a signature that does not count are
    by nature not covered by any signature; a directive pins the whole file's sha256 for that,
    see test_expected_sha256_pins_the_whole_file.)
    """
    bundle = build([keys.bundles[0]])
    verify_bundle(bundle, trust=truststore)
    labels = _regions(bundle)
    assert {label.split(":")[0] for label in labels.values()} == {
        "header",
        "data",
        "padding",
        "trailer",
    }
    seen: dict[str, set[type[BundleError]]] = {}
    for offset in range(len(bundle)):
        for mask in (0x01, 0x80):
            tampered = bytearray(bundle)
            tampered[offset] ^= mask
            with pytest.raises(BundleError) as caught:
                verify_bundle(bytes(tampered), trust=truststore)
            seen.setdefault(labels[offset].split(":")[0], set()).add(type(caught.value))
            label = labels[offset]
            if label.startswith("data:") and not label.endswith(ENVELOPE_MEMBER):
                assert isinstance(caught.value, HashMismatchError), (offset, label)
                assert "sha256" in str(caught.value)
            elif label.startswith(("padding:", "trailer")):
                assert isinstance(caught.value, ArchiveError), (offset, label)
    assert HashMismatchError in seen["data"]
    assert ThresholdError in seen["data"] or EnvelopeError in seen["data"]


def test_truncated_or_extended_bundle_is_refused(
    keys: Keys, truststore: TrustStore, build: BuildBundle
) -> None:
    bundle = build([keys.bundles[0]])
    for cut in range(0, len(bundle), 97):
        with pytest.raises(BundleError):
            verify_bundle(bundle[:cut], trust=truststore)
    with pytest.raises(ArchiveError, match="truncated"):
        verify_bundle(bundle[:-1], trust=truststore)
    with pytest.raises(ArchiveError, match="data follows the end-of-archive marker"):
        verify_bundle(bundle + bytes(512), trust=truststore)
    with pytest.raises(ArchiveError, match="empty"):
        verify_bundle(bytes(1024), trust=truststore)


def test_refuses_file_swapped_in_from_another_valid_bundle(
    tmp_path: Path, model_dir: Path, keys: Keys, truststore: TrustStore, build: BuildBundle
) -> None:
    bundle_a = build([keys.bundles[0]], version="1.0.0")
    other = tmp_path / "other"
    other.mkdir()
    for path in model_dir.iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    model = bytearray((other / "model.onnx").read_bytes())
    model[0] ^= 0xFF  # same size, different content
    (other / "model.onnx").write_bytes(bytes(model))
    bundle_b = build([keys.bundles[0]], source=other, version="1.1.0")
    verify_bundle(bundle_b, trust=truststore)

    a, b = dict(members_of(bundle_a)), dict(members_of(bundle_b))
    mixed = [(name, b[name] if name == "model.onnx" else data) for name, data in a.items()]
    with pytest.raises(HashMismatchError, match="swapped in from another bundle"):
        verify_bundle(canonical_tar(mixed, mtime=MTIME), trust=truststore)
    # And the other way round: B's signed manifest over A's files.
    mixed = [(name, data if name == ENVELOPE_MEMBER else a[name]) for name, data in b.items()]
    with pytest.raises(HashMismatchError, match=r"model\.onnx"):
        verify_bundle(canonical_tar(mixed, mtime=MTIME), trust=truststore)


def test_refuses_missing_listed_file(
    keys: Keys, truststore: TrustStore, build: BuildBundle
) -> None:
    members = members_of(build([keys.bundles[0]]))
    for dropped in range(1, len(members)):
        kept = members[:dropped] + members[dropped + 1 :]
        with pytest.raises(MissingFileError, match=f"{members[dropped][0]} is listed"):
            verify_bundle(canonical_tar(kept, mtime=MTIME), trust=truststore)


def test_refuses_unlisted_extra_file(
    keys: Keys, truststore: TrustStore, build: BuildBundle
) -> None:
    members = members_of(build([keys.bundles[0]]))
    for position in (1, len(members)):
        extra = [*members[:position], ("backdoor.so", b"\x7fELF"), *members[position:]]
        with pytest.raises(UnexpectedFileError, match=r"'backdoor\.so'.*does not list"):
            verify_bundle(canonical_tar(extra, mtime=MTIME), trust=truststore)


def test_refuses_duplicate_member(keys: Keys, truststore: TrustStore, build: BuildBundle) -> None:
    members = members_of(build([keys.bundles[0]]))
    doubled = [*members[:2], members[1], *members[2:]]
    with pytest.raises(UnsafeMemberError, match="appears twice"):
        verify_bundle(canonical_tar(doubled, mtime=MTIME), trust=truststore)


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("../evil.sh", "path traversal"),
        ("models/../../evil.sh", "path traversal"),
        ("/etc/cron.d/evil", "absolute"),
        ("..\\evil", "absolute or uses"),
    ],
)
def test_refuses_path_traversal(
    keys: Keys, truststore: TrustStore, build: BuildBundle, name: str, phrase: str
) -> None:
    members = members_of(build([keys.bundles[0]]))
    hostile = raw_tar([members[0], (name, b"#!/bin/sh\n"), *members[1:]], mtime=MTIME)
    with pytest.raises(UnsafeMemberError, match=phrase):
        verify_bundle(hostile, trust=truststore)


@pytest.mark.parametrize(
    ("kind", "phrase"),
    [
        (tarfile.SYMTYPE, "symbolic link"),
        (tarfile.LNKTYPE, "hard link"),
        (tarfile.CHRTYPE, "character device"),
        (tarfile.BLKTYPE, "block device"),
        (tarfile.FIFOTYPE, "FIFO"),
        (tarfile.DIRTYPE, "directory"),
        (tarfile.GNUTYPE_SPARSE, "sparse"),
    ],
)
def test_refuses_links_devices_and_special_members(
    keys: Keys, truststore: TrustStore, build: BuildBundle, kind: bytes, phrase: str
) -> None:
    members = members_of(build([keys.bundles[0]]))
    special = tarfile.TarInfo("model.onnx")  # even under a listed name
    special.type = kind
    special.linkname = "/etc/shadow"
    special.mtime = MTIME
    hostile = raw_tar([members[0], special, *members[1:]], mtime=MTIME)
    with pytest.raises(UnsafeMemberError, match=phrase):
        verify_bundle(hostile, trust=truststore)


def test_refuses_pax_headers(keys: Keys, truststore: TrustStore, build: BuildBundle) -> None:
    members = members_of(build([keys.bundles[0]]))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), MTIME, 0o644
            info.pax_headers = {"path": "../" + name} if name == "model.onnx" else {}
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(UnsafeMemberError, match="pax extended header"):
        verify_bundle(buffer.getvalue(), trust=truststore)


def test_refuses_tar_bomb_without_streaming_it(
    keys: Keys, truststore: TrustStore, build: BuildBundle
) -> None:
    """A member declaring more than the signed size is refused before its data is read."""
    members = dict(members_of(build([keys.bundles[0]])))
    huge = 64 << 20
    bomb_header = ustar_header("golden.npz", size_bytes=huge, mtime=MTIME)
    envelope = members[ENVELOPE_MEMBER]
    prefix = (
        ustar_header(ENVELOPE_MEMBER, size_bytes=len(envelope), mtime=MTIME)
        + envelope
        + bytes(-len(envelope) % 512)
        + bomb_header
    )
    stream = CountingReader(prefix + bytes(huge) + bytes(1024))
    with pytest.raises(LimitError, match="tar bomb"):
        verify_bundle(stream, trust=truststore)
    assert stream.bytes_read == len(prefix)  # not one byte of the bomb's data


def test_refuses_member_shorter_than_signed(
    keys: Keys, truststore: TrustStore, build: BuildBundle
) -> None:
    members = members_of(build([keys.bundles[0]]))
    cut = [(n, d[:-1] if n == "model.onnx" else d) for n, d in members]
    with pytest.raises(HashMismatchError, match="signed manifest says"):
        verify_bundle(canonical_tar(cut, mtime=MTIME), trust=truststore)


def test_refuses_envelope_over_the_limit_before_parsing(
    keys: Keys, truststore: TrustStore, build: BuildBundle
) -> None:
    bundle = build([keys.bundles[0]])
    with pytest.raises(LimitError, match="the limit is 600"):
        verify_bundle(bundle, trust=truststore, limits=Limits(max_envelope_bytes=600))
    # A header declaring a 2 GiB envelope: refused after reading only the header.
    stream = CountingReader(
        ustar_header(ENVELOPE_MEMBER, size_bytes=2 << 30, mtime=MTIME) + b"{" * 4096
    )
    with pytest.raises(LimitError, match=r"envelope.json is 2147483648 bytes"):
        verify_bundle(stream, trust=truststore)
    assert stream.bytes_read == 512


@pytest.mark.parametrize(
    ("limits", "phrase"),
    [
        (Limits(max_members=3), "lists 4 files; the limit is 3"),
        (Limits(max_file_bytes=1000), "per-file limit is 1000"),
        (Limits(max_total_bytes=2000), "the limit is 2000"),
    ],
)
def test_refuses_bundles_over_count_and_size_limits(
    keys: Keys, truststore: TrustStore, build: BuildBundle, limits: Limits, phrase: str
) -> None:
    with pytest.raises(LimitError, match=phrase):
        verify_bundle(build([keys.bundles[0]]), trust=truststore, limits=limits)


def test_refuses_security_epoch_below_floor(
    keys: Keys, truststore: TrustStore, build: BuildBundle
) -> None:
    bundle = build([keys.bundles[0]], security_epoch=2)
    assert (
        verify_bundle(bundle, trust=truststore, min_security_epoch=2).manifest.security_epoch == 2
    )
    with pytest.raises(EpochError, match="security_epoch 2, below the device's floor 3"):
        verify_bundle(bundle, trust=truststore, min_security_epoch=3)


def test_expected_sha256_pins_the_whole_file(
    keys: Keys, truststore: TrustStore, build: BuildBundle
) -> None:
    # Signed by two keys, threshold 1: the second signature's bytes do not count for trust...
    bundle = build([keys.bundles[0], keys.bundles[1]])
    manifest = manifest_of(bundle)
    members = members_of(bundle)
    envelope = parse_envelope(members[0][1])
    broken = [
        envelope.signatures[0],
        envelope.signatures[1].__class__(envelope.signatures[1].keyid, bytes(64)),
    ]
    altered_envelope = envelope.__class__(
        envelope.payload, envelope.payload_type, tuple(broken)
    ).to_json_bytes()
    altered = canonical_tar(
        [(ENVELOPE_MEMBER, altered_envelope), *members[1:]], mtime=manifest.mtime
    )
    verify_bundle(altered, trust=truststore)
    # ...but a directive pins the exact file, and then every byte matters again.
    digest = hashlib.sha256(bundle).hexdigest()
    assert verify_bundle(bundle, trust=truststore, expected_sha256=digest).size_bytes == len(bundle)
    with pytest.raises(HashMismatchError, match="the directive names"):
        verify_bundle(altered, trust=truststore, expected_sha256=digest)


# --- extraction --------------------------------------------------------------------------------


def test_failed_extraction_leaves_nothing_behind(
    tmp_path: Path, keys: Keys, truststore: TrustStore, build: BuildBundle
) -> None:
    bundle = bytearray(build([keys.bundles[0]]))
    labels = _regions(bytes(bundle))
    last_data = max(i for i, label in labels.items() if label == "data:report.json")
    bundle[last_data] ^= 1  # the last file is bad: the first ones were already written
    dest = tmp_path / "slot"
    with pytest.raises(HashMismatchError, match=r"report.json"):
        extract_bundle(bytes(bundle), dest, trust=truststore)
    assert list(dest.iterdir()) == []


def test_extraction_needs_an_empty_destination(
    tmp_path: Path, keys: Keys, truststore: TrustStore, build: BuildBundle
) -> None:
    dest = tmp_path / "slot"
    dest.mkdir()
    (dest / "old-model.onnx").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="not empty"):
        extract_bundle(build([keys.bundles[0]]), dest, trust=truststore)


def test_extracts_files_in_subdirectories(
    tmp_path: Path, keys: Keys, truststore: TrustStore
) -> None:
    source = tmp_path / "model.tflite"
    source.write_bytes(b"TFL3" * 100)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    inputs = [
        BundleInput("model.tflite", source, "model"),
        BundleInput("assets/labels.txt", labels, "other"),
    ]
    path = build_bundle(
        inputs,
        out_path=tmp_path / "b.ekb",
        name="pets",
        version="0.1.0-rc.1+build.5",
        security_epoch=0,
        profile="raspberrypi-tflite",
        signers=[keys.bundles[2]],
        created=CREATED,
    )
    dest = tmp_path / "slot"
    extract_bundle(path.read_bytes(), dest, trust=truststore, fsync=False)
    assert (dest / "assets" / "labels.txt").read_text() == "cat\ndog\n"
    assert (dest / "model.tflite").read_bytes() == b"TFL3" * 100
    assert sorted(p.name for p in dest.iterdir()) == ["assets", "model.tflite"]


# --- signing, inspecting, manifests ------------------------------------------------------------


def test_sign_bundle_adds_signatures_deterministically(
    tmp_path: Path, keys: Keys, truststore_2_of_3: TrustStore, build: BuildBundle
) -> None:
    unsigned = build([])
    one, two = tmp_path / "one.ekb", tmp_path / "two.ekb"
    one.write_bytes(unsigned)
    two.write_bytes(unsigned)
    sign_bundle(one, [keys.bundles[0]])
    sign_bundle(one, [keys.bundles[1]])
    sign_bundle(two, [keys.bundles[1], keys.bundles[0]])
    assert one.read_bytes() == two.read_bytes() == build(keys.bundles[:2])
    assert verify_bundle(one.read_bytes(), trust=truststore_2_of_3).signed_by == {
        keys.bundles[0].keyid,
        keys.bundles[1].keyid,
    }


def test_sign_bundle_refuses_a_corrupted_bundle(
    tmp_path: Path, keys: Keys, build: BuildBundle
) -> None:
    data = bytearray(build([]))
    data[-1100] ^= 1  # inside the last file's data or padding
    path = tmp_path / "bad.ekb"
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError):
        sign_bundle(path, [keys.bundles[0]])
    assert path.read_bytes() == bytes(data)


def test_inspect_reports_each_signature(keys: Keys, build: BuildBundle) -> None:
    bundle = build([keys.bundles[0], keys.outsider])
    known = {keys.bundles[0].keyid: keys.bundles[0].public_key}
    inspection = inspect_bundle(bundle, known_keys=known)
    statuses = {s.keyid: s.valid for s in inspection.signatures}
    assert statuses == {keys.bundles[0].keyid: True, keys.outsider.keyid: None}
    assert inspection.manifest.name == "digits"


def test_verify_accepts_an_explicit_policy_and_a_file_object(
    tmp_path: Path, keys: Keys, build: BuildBundle
) -> None:
    path = tmp_path / "b.ekb"
    path.write_bytes(build([keys.outsider]))
    policy = SignaturePolicy({keys.outsider.keyid: keys.outsider.public_key}, 1, "local keyring")
    with open(path, "rb") as f:
        assert verify_bundle(f, trust=policy).signed_by == {keys.outsider.keyid}


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"version": "1.0"}, "not a semantic version"),
        ({"version": "01.0.0"}, "not a semantic version"),
        ({"security_epoch": -1}, "must be >= 0"),
        ({"name": "../x"}, "not a bundle name"),
        ({"schema": "edgekit.manifest/v2"}, "schema must be"),
        ({"created": "2025-01-31 12:00:00"}, "RFC 3339"),
        ({"surprise": 1}, "unknown field"),
        ({"files": []}, "files is empty"),
    ],
)
def test_manifest_schema_is_validated(
    keys: Keys, build: BuildBundle, change: dict[str, object], phrase: str
) -> None:
    document = json.loads(manifest_of(build([])).to_payload())
    document.update(change)
    with pytest.raises(ManifestError, match=phrase):
        Manifest.from_payload(json.dumps(document).encode())


@pytest.mark.parametrize(
    ("path", "phrase"),
    [
        ("../model.onnx", "is not allowed"),
        ("/model.onnx", "is not allowed"),
        ("a//b", "is not allowed"),
        (".hidden", "is not allowed"),
        (ENVELOPE_MEMBER, "is not allowed"),
        ("x" * 101, "is not allowed"),
    ],
)
def test_manifest_file_paths_are_validated(build: BuildBundle, path: str, phrase: str) -> None:
    document = json.loads(manifest_of(build([])).to_payload())
    document["files"][0]["path"] = path
    document["files"].sort(key=lambda f: f["path"])
    with pytest.raises(ManifestError, match=phrase):
        Manifest.from_payload(json.dumps(document).encode())


def test_manifest_files_must_be_sorted_and_unique(build: BuildBundle) -> None:
    document = json.loads(manifest_of(build([])).to_payload())
    document["files"].reverse()
    with pytest.raises(ManifestError, match="sorted by path"):
        Manifest.from_payload(json.dumps(document).encode())
    document["files"].reverse()
    document["files"].append(dict(document["files"][-1], path="Report.json"))
    document["files"].sort(key=lambda f: f["path"])
    with pytest.raises(ManifestError, match="only by case"):
        Manifest.from_payload(json.dumps(document).encode())


def test_manifest_round_trips_and_create_manifest_hashes(model_dir: Path) -> None:
    manifest = create_manifest(
        collect_bundle_inputs(model_dir),
        name="digits",
        version="2.0.0",
        security_epoch=1,
        profile="x86-64",
        created=CREATED,
    )
    assert Manifest.from_payload(manifest.to_payload()) == manifest
    model = manifest.file("model.onnx")
    assert model.sha256 == hashlib.sha256((model_dir / "model.onnx").read_bytes()).hexdigest()
    assert model.size_bytes == (model_dir / "model.onnx").stat().st_size


def test_collects_converter_directory_or_files(tmp_path: Path, model_dir: Path) -> None:
    inputs = collect_bundle_inputs(model_dir)
    assert {(i.path, i.role) for i in inputs} == {
        ("golden.npz", "golden"),
        ("model.onnx", "model"),
        ("reference_stats.json", "reference_stats"),
        ("report.json", "report"),
    }
    (model_dir / "notes.txt").write_text("ignored in directory mode")
    assert len(collect_bundle_inputs(model_dir)) == 4
    picked = collect_bundle_inputs([model_dir / "model.onnx", model_dir / "notes.txt"])
    assert [(i.path, i.role) for i in picked] == [("model.onnx", "model"), ("notes.txt", "other")]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ManifestError, match=r"no model\.onnx or model\.tflite"):
        collect_bundle_inputs(empty)


def test_profile_is_required_without_report(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(ManifestError, match="pass --profile"):
        sign_and_build_bundle(
            [model_dir / "model.onnx"],
            name="digits",
            version="1.0.0",
            security_epoch=0,
            profile=None,
            out_dir=tmp_path,
            signers=[],
        )
