"""Trust store rotation over the air and the device's trust floor (edgekit.trust.rotation)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekit.trust import (
    MAX_TRUST_CHAIN,
    RotationError,
    Signer,
    TrustStore,
    TrustStoreError,
    TrustUpdateError,
    create_truststore,
    establish_trust,
    sign_truststore,
    trust_message,
    verify_trust_chain,
    verify_trust_message,
)

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
FLEET = "plant"


class Chain:
    """Versions 1..n of a fleet's trust store: v2 rotates the release key, v3 the root."""

    def __init__(self) -> None:
        self.root, self.root2 = Signer.generate(), Signer.generate()
        self.release, self.release2 = Signer.generate(), Signer.generate()
        self.ops = Signer.generate()
        v1 = create_truststore(
            root_keys=[self.root.public_key],
            bundles_keys=[self.release.public_key],
            directives_keys=[self.ops.public_key],
        )
        v2 = (
            v1.with_key("bundles", self.release2.public_key)
            .without_key("bundles", self.release.keyid)
            .next_version()
        )
        v3 = v2.with_key("root", self.root2.public_key).without_key("root", self.root.keyid)
        v3 = v3.next_version()
        self.stores = [v1, v2, v3]
        self.envelopes = [
            sign_truststore(v1, [self.root]),
            sign_truststore(v2, [self.root]),
            sign_truststore(v3, [self.root, self.root2]),  # old and new root sign a root change
        ]


@pytest.fixture(scope="module")
def chain() -> Chain:
    return Chain()


def test_a_device_applies_the_versions_it_lacks_in_order(chain: Chain) -> None:
    v1 = chain.stores[0]
    payload = trust_message(FLEET, chain.envelopes)
    update = verify_trust_message(
        payload, current=v1, current_envelope=chain.envelopes[0], fleet=FLEET, now=NOW
    )
    assert update.applied == (2, 3) and update.store.version == 3
    assert update.envelope == chain.envelopes[2]
    assert chain.release.keyid not in update.store.roles["bundles"].keyids
    assert chain.release2.keyid in update.store.roles["bundles"].keyids
    # A device already at v3 (the retained message again): nothing to do, not an error.
    again = verify_trust_message(
        payload, current=update.store, current_envelope=update.envelope, fleet=FLEET, now=NOW
    )
    assert again.applied == () and again.store is update.store


def test_rotation_rule_and_chain_order_are_enforced(chain: Chain) -> None:
    v1 = chain.stores[0]
    # v3 alone from v1: a version is skipped.
    with pytest.raises(TrustUpdateError, match="not accepted over version 1") as caught:
        verify_trust_chain(v1, chain.envelopes[0], [chain.envelopes[2]], now=NOW)
    assert isinstance(caught.value.__cause__, RotationError)
    # Out of order.
    with pytest.raises(TrustUpdateError, match="consecutive versions, oldest first"):
        verify_trust_chain(v1, chain.envelopes[0], chain.envelopes[::-1], now=NOW)
    # v2 signed by an outsider's "root": not by a threshold of v1's root keys.
    outsider = Signer.generate()
    v2_forged = chain.stores[1].with_key("root", outsider.public_key)
    forged = sign_truststore(v2_forged, [outsider])
    with pytest.raises(TrustUpdateError, match="not signed by a threshold of the old root"):
        verify_trust_chain(v1, chain.envelopes[0], [forged], now=NOW)
    # A root change signed by the new root only.
    v3_new_root_only = sign_truststore(chain.stores[2], [chain.root2])
    with pytest.raises(TrustUpdateError, match="old root"):
        verify_trust_chain(chain.stores[1], chain.envelopes[1], [v3_new_root_only], now=NOW)


def test_message_is_for_one_fleet_and_bounded(chain: Chain) -> None:
    v1 = chain.stores[0]
    payload = trust_message("other", chain.envelopes[:2])
    with pytest.raises(TrustUpdateError, match="fleet 'other'; this is fleet 'plant'"):
        verify_trust_message(
            payload, current=v1, current_envelope=chain.envelopes[0], fleet=FLEET, now=NOW
        )
    with pytest.raises(TrustStoreError, match=f"at most {MAX_TRUST_CHAIN}"):
        trust_message(FLEET, chain.envelopes * 6)
    expired = create_truststore(
        root_keys=[chain.root.public_key],
        bundles_keys=[chain.release2.public_key],
        directives_keys=[chain.ops.public_key],
        version=2,
        expires=NOW - timedelta(days=1),
    )
    with pytest.raises(TrustUpdateError, match="expired"):
        verify_trust_chain(
            v1, chain.envelopes[0], [sign_truststore(expired, [chain.root])], now=NOW
        )


def test_the_floor_wins_over_an_older_provisioned_store(chain: Chain) -> None:
    first = establish_trust(chain.envelopes[0], None, now=NOW)
    assert (first.store.version, first.source) == (1, "provisioned")
    # The floor is v2; the device is re-provisioned with the old v1 file: v2 stays.
    kept = establish_trust(chain.envelopes[0], chain.envelopes[1], now=NOW)
    assert (kept.store.version, kept.source) == (2, "floor")
    assert "keeps it" in kept.note
    # A provisioned v3 follows the v2 floor by the rotation rule: rotated.
    rotated = establish_trust(chain.envelopes[2], chain.envelopes[1], now=NOW)
    assert (rotated.store.version, rotated.source) == (3, "rotated")
    # A provisioned v3 over a v1 floor skips v2: refused, with what to do.
    with pytest.raises(TrustUpdateError, match="Provision version 2"):
        establish_trust(chain.envelopes[2], chain.envelopes[0], now=NOW)
    # Without a floor the provisioned store must be signed by its own root keys.
    with pytest.raises(Exception, match="signature"):
        establish_trust(sign_truststore(chain.stores[0], []), None, now=NOW)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["schema", "fleet", "truststores", "x"]), children)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    document=st.fixed_dictionaries(
        {},
        optional={
            "schema": st.sampled_from(["edgekit.trust/v1", "x"]),
            "fleet": st.sampled_from([FLEET, "x", 3]),
            "truststores": st.lists(st.text(max_size=40) | _json, max_size=4),
            "extra": _json,
        },
    )
    | _json,
    raw=st.binary(max_size=64),
    mutate=st.integers(0, 400),
)
def test_verify_trust_message_is_total(
    chain: Chain, document: Any, raw: bytes, mutate: int
) -> None:
    current: TrustStore = chain.stores[0]
    good = bytearray(trust_message(FLEET, chain.envelopes[:2]))
    good[mutate % len(good)] ^= 0x01  # one flipped bit somewhere in a real message
    for payload in (json.dumps(document).encode(), raw, bytes(good)):
        try:
            update = verify_trust_message(
                payload, current=current, current_envelope=chain.envelopes[0], fleet=FLEET, now=NOW
            )
        except TrustUpdateError as error:
            assert str(error)
        else:
            assert update.store.version >= current.version
