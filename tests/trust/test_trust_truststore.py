"""Trust store loading and root rotation (python-tuf's rule)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from edgekit.bundle import verify_bundle
from edgekit.trust import (
    EnvelopeError,
    ExpiredError,
    ReplayError,
    RotationError,
    Signer,
    ThresholdError,
    TrustStore,
    TrustStoreError,
    UnsignedError,
    UntrustedKeyError,
    create_truststore,
    load_truststore,
    sign_envelope,
    sign_truststore,
    update_truststore,
)
from tests.trust.trust_helpers import BuildBundle, Keys

NOW = datetime(2025, 6, 1, tzinfo=timezone.utc)


def test_bootstrap_needs_its_own_root_threshold(keys: Keys, truststore: TrustStore) -> None:
    signed = sign_truststore(truststore, [keys.root])
    loaded = load_truststore(signed)
    assert loaded == truststore
    assert loaded.policy("bundles").threshold == 1
    with pytest.raises(UnsignedError, match="no signatures"):
        load_truststore(sign_truststore(truststore, []))
    with pytest.raises(UntrustedKeyError, match="role 'root'"):
        load_truststore(sign_truststore(truststore, [keys.bundles[0]]))
    # bootstrap=False only parses: for stores the caller verified before, or drafts.
    assert load_truststore(sign_truststore(truststore, []), bootstrap=False) == truststore


def test_payload_round_trips_and_is_validated(keys: Keys, truststore: TrustStore) -> None:
    assert TrustStore.from_payload(truststore.to_payload()) == truststore
    document = json.loads(truststore.to_payload())
    assert document["schema"] == "edgekit.truststore/v1"
    assert set(document["roles"]) == {"root", "bundles", "directives"}
    key = next(iter(document["keys"].values()))
    assert key["keytype"] == "ed25519"

    wrong_id = json.loads(truststore.to_payload())
    keyid = next(iter(wrong_id["keys"]))
    wrong_id["keys"]["0" * 64] = wrong_id["keys"].pop(keyid)
    with pytest.raises(TrustStoreError, match="key id must be the sha256"):
        TrustStore.from_payload(json.dumps(wrong_id).encode())
    too_high = json.loads(truststore.to_payload())
    too_high["roles"]["root"]["threshold"] = 2
    with pytest.raises(TrustStoreError, match="threshold 2 but 1 key"):
        TrustStore.from_payload(json.dumps(too_high).encode())
    no_role = json.loads(truststore.to_payload())
    del no_role["roles"]["directives"]
    with pytest.raises(TrustStoreError, match="directives"):
        TrustStore.from_payload(json.dumps(no_role).encode())
    with pytest.raises(EnvelopeError, match="not a trust store"):
        load_truststore(sign_envelope(truststore.to_payload(), "text/plain", [keys.root]))


def test_expired_store_is_refused_when_time_is_given(keys: Keys) -> None:
    store = create_truststore(
        root_keys=[keys.root.public_key],
        bundles_keys=[keys.bundles[0].public_key],
        directives_keys=[keys.directives.public_key],
        expires=NOW,
    )
    signed = sign_truststore(store, [keys.root])
    assert load_truststore(signed, now=NOW - timedelta(seconds=1)).expires == NOW
    with pytest.raises(ExpiredError, match="expired at 2025-06-01T00:00:00Z"):
        load_truststore(signed, now=NOW)


def _rotated(keys: Keys, current: TrustStore, new_root: Signer) -> TrustStore:
    """Version N+1: `new_root` replaces the root key, bundles key 0 is removed."""
    rotated = current.with_key("root", new_root.public_key)
    rotated = rotated.without_key("root", keys.root.keyid)
    rotated = rotated.without_key("bundles", keys.bundles[0].keyid)
    return rotated.next_version()


def test_new_store_signed_only_by_new_root_is_refused(keys: Keys, truststore: TrustStore) -> None:
    new_root = Signer.generate()
    v2 = _rotated(keys, truststore, new_root)
    with pytest.raises(RotationError, match="threshold of the old root"):
        update_truststore(truststore, sign_truststore(v2, [new_root]))
    with pytest.raises(RotationError, match="threshold of the new root"):
        update_truststore(truststore, sign_truststore(v2, [keys.root]))


def test_rotation_signed_by_old_and_new_root_is_accepted(
    keys: Keys, truststore: TrustStore, build: BuildBundle
) -> None:
    new_root = Signer.generate()
    v2 = _rotated(keys, truststore, new_root)
    accepted = update_truststore(truststore, sign_truststore(v2, [keys.root, new_root]))
    assert accepted.version == 2
    assert accepted.roles["root"].keyids == (new_root.keyid,)

    # Keys removed from a role stop working at once...
    removed_key_bundle = build([keys.bundles[0]])
    verify_bundle(removed_key_bundle, trust=truststore)
    with pytest.raises(UntrustedKeyError, match="does not trust"):
        verify_bundle(removed_key_bundle, trust=accepted)
    verify_bundle(build([keys.bundles[1]]), trust=accepted)

    # ...including the old root: it cannot sign version 3 alone.
    v3 = accepted.with_threshold("bundles", 2).next_version()
    with pytest.raises(RotationError, match="old root"):
        update_truststore(accepted, sign_truststore(v3, [keys.root]))
    assert update_truststore(accepted, sign_truststore(v3, [new_root])).version == 3


def test_rotation_to_a_two_of_three_root(keys: Keys, truststore: TrustStore) -> None:
    r1, r2, r3 = Signer.generate(), Signer.generate(), Signer.generate()
    v2 = truststore
    for signer in (r1, r2, r3):
        v2 = v2.with_key("root", signer.public_key)
    v2 = v2.without_key("root", keys.root.keyid, threshold=2).next_version()
    with pytest.raises(RotationError, match=r"new root.*1 valid signature\(s\).*2 required"):
        update_truststore(truststore, sign_truststore(v2, [keys.root, r1]))
    accepted = update_truststore(truststore, sign_truststore(v2, [keys.root, r2, r3]))
    v3 = accepted.with_key("directives", keys.outsider.public_key).next_version()
    assert update_truststore(accepted, sign_truststore(v3, [r1, r3])).version == 3
    with pytest.raises(RotationError, match="old root"):
        update_truststore(accepted, sign_truststore(v3, [r1]))


def test_versions_must_increase_by_exactly_one(keys: Keys, truststore: TrustStore) -> None:
    same = sign_truststore(truststore, [keys.root])
    with pytest.raises(ReplayError, match="not newer than the current version 1") as caught:
        update_truststore(truststore, same)
    assert (caught.value.found, caught.value.last_accepted) == (1, 1)
    skipped = truststore.next_version().next_version()
    with pytest.raises(RotationError, match="expected trust store version 2; found 3"):
        update_truststore(truststore, sign_truststore(skipped, [keys.root]))


def test_below_threshold_root_signature_is_a_threshold_error_underneath(
    keys: Keys, truststore: TrustStore
) -> None:
    v2 = truststore.next_version()
    with pytest.raises(RotationError) as caught:
        update_truststore(truststore, sign_truststore(v2, [keys.outsider]))
    assert isinstance(caught.value.__cause__, ThresholdError)


def test_edits_keep_the_store_valid(keys: Keys, truststore: TrustStore) -> None:
    with pytest.raises(TrustStoreError, match="threshold 2 but 1 key"):
        truststore.with_threshold("root", 2)
    with pytest.raises(TrustStoreError, match="already in role"):
        truststore.with_key("root", keys.root.public_key)
    with pytest.raises(TrustStoreError, match="no key"):
        truststore.without_key("bundles", "f" * 64)
    with pytest.raises(TrustStoreError, match="threshold 1 but 0 key"):
        truststore.without_key("root", keys.root.keyid)
    # Removing a key by a unique 8+ digit prefix; its key material goes when unused.
    smaller = truststore.without_key("bundles", keys.bundles[2].keyid[:10])
    assert keys.bundles[2].keyid not in smaller.keys
