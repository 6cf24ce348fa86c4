"""Property tests: whatever bytes arrive, parsers raise a `BundleError` subclass or succeed.

Nothing else may escape (no ValueError, KeyError, RecursionError, UnicodeError, ...).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from datetime import datetime, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgekit.bundle import (
    ENVELOPE_MEMBER,
    MANIFEST_PAYLOAD_TYPE,
    BundleFile,
    Manifest,
    inspect_bundle,
    verify_bundle,
)
from edgekit.trust import (
    BundleError,
    Directive,
    DirectiveFloor,
    Signer,
    TrustStore,
    create_truststore,
    load_truststore,
    parse_envelope,
    sign_envelope,
    sign_truststore,
    update_truststore,
    verify_directive,
    verify_envelope,
)
from edgekit.trust.directive import DIRECTIVE_PAYLOAD_TYPE
from edgekit.trust.truststore import TRUSTSTORE_PAYLOAD_TYPE
from tests.trust.trust_helpers import CREATED, canonical_tar

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIGNER = Signer.generate()
STORE = create_truststore(
    root_keys=[SIGNER.public_key],
    bundles_keys=[SIGNER.public_key],
    directives_keys=[SIGNER.public_key],
)
NOW = datetime(2025, 6, 1, tzinfo=timezone.utc)

MODEL = b"model-bytes" * 50
VALID_MANIFEST = Manifest(
    name="digits",
    version="1.0.0",
    security_epoch=0,
    profile="raspberrypi",
    created=CREATED,
    files=(BundleFile("model.onnx", len(MODEL), hashlib.sha256(MODEL).hexdigest(), "model"),),
    signature={"inputs": [], "outputs": []},
)
VALID_ENVELOPE = sign_envelope(VALID_MANIFEST.to_payload(), MANIFEST_PAYLOAD_TYPE, [SIGNER])
VALID_BUNDLE = canonical_tar(
    [(ENVELOPE_MEMBER, VALID_ENVELOPE), ("model.onnx", MODEL)], mtime=VALID_MANIFEST.mtime
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def _mutated(base: dict[str, object]) -> st.SearchStrategy[bytes]:
    """A valid document with fields dropped, replaced by arbitrary JSON, or added."""
    keys = sorted(base)

    def mutate(changes: dict[str, object], dropped: list[str]) -> bytes:
        document = {k: v for k, v in base.items() if k not in dropped}
        document.update(changes)
        return json.dumps(document).encode()

    return st.builds(
        mutate,
        st.dictionaries(st.sampled_from([*keys, "extra"]), json_values, max_size=3),
        st.lists(st.sampled_from(keys), max_size=2),
    )


def _refused_or_ok(call: Callable[[], object]) -> None:
    """Run `call`: succeeding or raising a BundleError are both fine; anything else fails."""
    with contextlib.suppress(BundleError):
        call()


# --- envelopes ---------------------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=2048))
def test_envelope_parser_on_arbitrary_bytes(data: bytes) -> None:
    _refused_or_ok(lambda: parse_envelope(data))
    _refused_or_ok(
        lambda: verify_envelope(
            data, payload_type="t", trusted_keys={SIGNER.keyid: SIGNER.public_key}, threshold=1
        )
    )


@SETTINGS
@given(
    _mutated(
        {
            "payload": "eyJhIjogMX0=",
            "payloadType": "t",
            "signatures": [{"keyid": SIGNER.keyid, "sig": "AAAA"}],
        }
    )
)
def test_envelope_parser_on_near_valid_json(data: bytes) -> None:
    _refused_or_ok(
        lambda: verify_envelope(
            data, payload_type="t", trusted_keys={SIGNER.keyid: SIGNER.public_key}, threshold=1
        )
    )


# --- manifests and bundles ---------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=2048) | _mutated(json.loads(VALID_MANIFEST.to_payload())))
def test_manifest_parser(data: bytes) -> None:
    _refused_or_ok(lambda: Manifest.from_payload(data))


@SETTINGS
@given(_mutated(json.loads(VALID_MANIFEST.to_payload())))
def test_bundle_verify_with_signed_arbitrary_manifests(payload: bytes) -> None:
    # Signed by a trusted key, so the manifest parser and the tar reader both get exercised.
    envelope = sign_envelope(payload, MANIFEST_PAYLOAD_TYPE, [SIGNER])
    bundle = canonical_tar(
        [(ENVELOPE_MEMBER, envelope), ("model.onnx", MODEL)], mtime=VALID_MANIFEST.mtime
    )
    _refused_or_ok(lambda: verify_bundle(bundle, trust=STORE))


@SETTINGS
@given(st.binary(max_size=4096))
def test_bundle_verify_on_arbitrary_bytes(data: bytes) -> None:
    _refused_or_ok(lambda: verify_bundle(data, trust=STORE))
    _refused_or_ok(lambda: inspect_bundle(data))


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=len(VALID_BUNDLE) - 1),
            st.binary(min_size=0, max_size=8),
            st.integers(min_value=0, max_value=8),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_bundle_verify_on_mutated_bundles(edits: list[tuple[int, bytes, int]]) -> None:
    data = bytearray(VALID_BUNDLE)
    for offset, insert, delete in edits:
        data[offset : offset + delete] = insert
    _refused_or_ok(lambda: verify_bundle(bytes(data), trust=STORE))


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.text(max_size=12) | st.sampled_from(["model.onnx", "../x", "/x", ENVELOPE_MEMBER]),
            st.binary(max_size=600),
        ),
        max_size=4,
    )
)
def test_bundle_verify_on_arbitrary_tar_members(members: list[tuple[str, bytes]]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [(ENVELOPE_MEMBER, VALID_ENVELOPE), *members]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    _refused_or_ok(lambda: verify_bundle(buffer.getvalue(), trust=STORE))


# --- directives and trust stores ---------------------------------------------------------------

VALID_DIRECTIVE = {
    "schema": "edgekit.directive/v1",
    "fleet": "f",
    "device": "d",
    "rollout_id": "r",
    "sequence": 5,
    "issued_at": "2025-06-01T00:00:00Z",
    "expires_at": "2025-06-02T00:00:00Z",
    "min_security_epoch": 0,
    "bundle": {
        "sha256": "ab" * 32,
        "size": 10,
        "name": "digits",
        "version": "1.0.0",
        "sources": [{"kind": "https", "url": "https://example.com/b.ekb"}],
    },
}


@SETTINGS
@given(st.binary(max_size=2048) | _mutated(VALID_DIRECTIVE))
def test_directive_parser_and_verifier(data: bytes) -> None:
    _refused_or_ok(lambda: Directive.from_payload(data))
    envelope = sign_envelope(data, DIRECTIVE_PAYLOAD_TYPE, [SIGNER])
    for candidate in (data, envelope):
        _refused_or_ok(
            functools.partial(
                verify_directive,
                candidate,
                truststore=STORE,
                fleet="f",
                device="d",
                floor=DirectiveFloor(),
                now=NOW,
            )
        )


@SETTINGS
@given(st.binary(max_size=2048) | _mutated(json.loads(STORE.to_payload())))
def test_truststore_parsers(data: bytes) -> None:
    _refused_or_ok(lambda: TrustStore.from_payload(data))
    envelope = sign_envelope(data, TRUSTSTORE_PAYLOAD_TYPE, [SIGNER])
    for candidate in (data, envelope):
        _refused_or_ok(functools.partial(load_truststore, candidate, now=NOW))
        _refused_or_ok(functools.partial(update_truststore, STORE, candidate, now=NOW))


def test_valid_fixtures_are_accepted() -> None:
    """The property tests start from inputs that really are valid."""
    assert verify_bundle(VALID_BUNDLE, trust=STORE).manifest == VALID_MANIFEST
    assert Directive.from_payload(json.dumps(VALID_DIRECTIVE).encode()).sequence == 5
    assert load_truststore(sign_truststore(STORE, [SIGNER])) == STORE


@SETTINGS
@given(
    st.integers(min_value=1, max_value=5000),
    st.sampled_from(["runtime", "extra", "signature"]),
    st.sampled_from(["[]", "{}"]),
)
def test_deeply_nested_json_is_refused_not_crashing(depth: int, field: str, brackets: str) -> None:
    """Deep nesting once escaped as RecursionError from the freezing of free-form fields."""
    opening, closing = brackets[0], brackets[1]
    inner = (opening if opening == "[" else '{"k":') * depth + "0" + closing * depth
    document = json.loads(VALID_MANIFEST.to_payload())
    text = json.dumps({k: v for k, v in document.items() if k != field})
    payload = (text[:-1] + f', "{field}": {{"nested": {inner}}}}}').encode()
    _refused_or_ok(lambda: Manifest.from_payload(payload))
    envelope = sign_envelope(payload, MANIFEST_PAYLOAD_TYPE, [SIGNER])
    bundle = canonical_tar([(ENVELOPE_MEMBER, envelope)], mtime=VALID_MANIFEST.mtime)
    _refused_or_ok(lambda: verify_bundle(bundle, trust=STORE))
