"""DSSE envelopes and the keyring."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest

from edgekit.trust import (
    EnvelopeError,
    KeyringError,
    LimitError,
    PublicKey,
    Signer,
    ThresholdError,
    UnsignedError,
    UntrustedKeyError,
    add_signatures,
    default_keyring_dir,
    export_public,
    generate_key,
    list_keys,
    load_keyring_public_keys,
    load_private_key,
    load_public_key,
    pae,
    parse_envelope,
    sign_envelope,
    verify_envelope,
)
from tests.trust.trust_helpers import Keys

TYPE = "application/vnd.example+json"


def _trusted(*signers: Signer) -> dict[str, PublicKey]:
    return {s.keyid: s.public_key for s in signers}


def test_pae_matches_the_dsse_specification() -> None:
    # The test vector of the DSSE protocol document.
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_sign_and_verify(keys: Keys) -> None:
    signer = keys.bundles[0]
    envelope = sign_envelope(b'{"a": 1}', TYPE, [signer])
    document = json.loads(envelope)
    assert set(document) == {"payload", "payloadType", "signatures"}
    assert base64.b64decode(document["payload"]) == b'{"a": 1}'
    assert document["signatures"][0]["keyid"] == signer.keyid
    payload = verify_envelope(
        envelope, payload_type=TYPE, trusted_keys=_trusted(signer), threshold=1
    )
    assert payload == b'{"a": 1}'


def test_threshold_counts_distinct_trusted_keys(keys: Keys) -> None:
    a, b, c = keys.bundles
    trusted = _trusted(a, b, c)
    envelope = sign_envelope(b"x", TYPE, [a, keys.outsider])
    with pytest.raises(
        ThresholdError, match=r"1 valid signature\(s\) from trusted keys, 2 required"
    ):
        verify_envelope(envelope, payload_type=TYPE, trusted_keys=trusted, threshold=2)
    # The same signature pasted twice is still one key.
    document = json.loads(envelope)
    (by_a,) = [s for s in document["signatures"] if s["keyid"] == a.keyid]
    document["signatures"] = [by_a] * 3
    with pytest.raises(ThresholdError, match=r"1 valid"):
        verify_envelope(
            json.dumps(document).encode(), payload_type=TYPE, trusted_keys=trusted, threshold=2
        )
    both = add_signatures(envelope, [b], payload_type=TYPE)
    assert verify_envelope(both, payload_type=TYPE, trusted_keys=trusted, threshold=2) == b"x"


def test_unknown_keys_are_ignored_and_named(keys: Keys) -> None:
    envelope = sign_envelope(b"x", TYPE, [keys.outsider])
    with pytest.raises(UntrustedKeyError, match="does not trust"):
        verify_envelope(envelope, payload_type=TYPE, trusted_keys=_trusted(keys.root), threshold=1)
    with pytest.raises(UnsignedError, match="no signatures"):
        verify_envelope(
            sign_envelope(b"x", TYPE, []),
            payload_type=TYPE,
            trusted_keys=_trusted(keys.root),
            threshold=1,
        )


def test_tampered_payload_or_type_fails_signature(keys: Keys) -> None:
    signer = keys.root
    document = json.loads(sign_envelope(b"install v1", TYPE, [signer]))
    document["payload"] = base64.b64encode(b"install v0").decode()
    with pytest.raises(ThresholdError, match="do not verify"):
        verify_envelope(
            json.dumps(document).encode(),
            payload_type=TYPE,
            trusted_keys=_trusted(signer),
            threshold=1,
        )
    other = sign_envelope(b"x", "application/other", [signer])
    with pytest.raises(EnvelopeError, match="expected payloadType"):
        verify_envelope(other, payload_type=TYPE, trusted_keys=_trusted(signer), threshold=1)


def test_size_limit_is_checked_before_parsing() -> None:
    with pytest.raises(LimitError, match="the limit is 10"):
        parse_envelope(b"[" * 11, max_envelope_bytes=10)
    with pytest.raises(EnvelopeError, match="not valid JSON"):
        parse_envelope(b"[" * 100_000)


@pytest.mark.parametrize(
    ("document", "phrase"),
    [
        (b"[]", "must be a JSON object"),
        (b'{"payload": "eA==", "payloadType": "t"}', "missing field 'signatures'"),
        (b'{"payload": "e===", "payloadType": "t", "signatures": []}', "base64"),
        (b'{"payload": "eA==", "payloadType": 1, "signatures": []}', "must be a string"),
        (
            b'{"payload": "eA==", "payload": "eA==", "payloadType": "t", "signatures": []}',
            "duplicate",
        ),
        (b'{"payload": "eA==", "payloadType": "\\ud800", "signatures": []}', "not valid JSON"),
        (b'{"payload": "eA==", "payloadType": "t", "signatures": [1]}', "must be an object"),
        (b'{"payload": NaN}', "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
    ],
)
def test_malformed_envelopes_are_refused(document: bytes, phrase: str) -> None:
    with pytest.raises(EnvelopeError, match=phrase):
        parse_envelope(document)


# --- keyring -----------------------------------------------------------------------------------


def test_generate_list_export_load(tmp_path: Path) -> None:
    keyring = tmp_path / "keys"
    info = generate_key("release", "s3cret", keyring_dir=keyring)
    assert stat.S_IMODE(info.private_path.stat().st_mode) == 0o600  # type: ignore[union-attr]
    pem = info.private_path.read_bytes()  # type: ignore[union-attr]
    assert b"ENCRYPTED PRIVATE KEY" in pem
    public = load_public_key("release", keyring_dir=keyring)
    assert info.keyid == public.keyid == hashlib.sha256(public.raw).hexdigest()
    assert export_public("release", keyring_dir=keyring) == info.public_path.read_bytes()
    assert [(k.name, k.keyid) for k in list_keys(keyring_dir=keyring)] == [("release", info.keyid)]
    assert load_keyring_public_keys(keyring_dir=keyring) == {info.keyid: public}
    signer = load_private_key("release", "s3cret", keyring_dir=keyring)
    assert signer.keyid == info.keyid
    assert public.verify(signer.sign(b"data"), b"data")
    assert load_public_key(info.public_path) == public


def test_wrong_passphrase_missing_and_duplicate_keys(tmp_path: Path) -> None:
    keyring = tmp_path / "keys"
    generate_key("release", "s3cret", keyring_dir=keyring)
    with pytest.raises(KeyringError, match="wrong passphrase"):
        load_private_key("release", "guess", keyring_dir=keyring)
    with pytest.raises(KeyringError, match="no private key 'ghost'"):
        load_private_key("ghost", "s3cret", keyring_dir=keyring)
    with pytest.raises(KeyringError, match="already exists"):
        generate_key("release", "other", keyring_dir=keyring)
    with pytest.raises(KeyringError, match="empty passphrase"):
        generate_key("second", "", keyring_dir=keyring)
    with pytest.raises(KeyringError, match="key name"):
        generate_key("../escape", "pw", keyring_dir=keyring)


def test_default_keyring_follows_edgekit_home(tmp_path: Path) -> None:
    assert default_keyring_dir({"EDGEKIT_HOME": str(tmp_path)}) == tmp_path / "keys"
    assert default_keyring_dir({}) == Path.home() / ".config" / "edgekit" / "keys"


def test_public_key_parsing_refuses_garbage() -> None:
    with pytest.raises(KeyringError, match="32 bytes"):
        PublicKey(b"short")
    with pytest.raises(KeyringError, match="hex"):
        PublicKey.from_hex("zz")
    with pytest.raises(KeyringError, match="not a PEM public key"):
        PublicKey.from_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")


def test_too_many_signatures_are_refused_before_verifying() -> None:
    from edgekit.trust.dsse import (
        MAX_SIGNATURES,
        SignaturePolicy,
        check_signatures,
        parse_envelope,
    )
    from edgekit.trust.errors import LimitError

    signer = Signer.generate()
    envelope = json.loads(sign_envelope(b"x", TYPE, [signer]))
    envelope["signatures"] = envelope["signatures"] * (MAX_SIGNATURES + 1)
    parsed = parse_envelope(json.dumps(envelope).encode())
    with pytest.raises(LimitError, match=f"more than the {MAX_SIGNATURES} allowed"):
        check_signatures(parsed, SignaturePolicy(keys=_trusted(signer), threshold=1))
