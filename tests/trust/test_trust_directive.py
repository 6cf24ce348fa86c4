"""Deployment directives: each refusal, with its reason, and the floor that follows."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from edgekit.trust import (
    BundleRef,
    BundleSource,
    Directive,
    DirectiveError,
    DirectiveFloor,
    EnvelopeError,
    EpochError,
    ExpiredError,
    NotYetValidError,
    ReplayError,
    ThresholdError,
    TrustStore,
    UntrustedKeyError,
    WrongTargetError,
    build_directive,
    create_truststore,
    next_floor,
    sign_directive,
    sign_envelope,
    verify_directive,
)
from tests.trust.trust_helpers import Keys

ISSUED = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
FLOOR = DirectiveFloor(last_sequence=41, min_security_epoch=2)
BUNDLE = BundleRef(
    sha256="ab" * 32,
    size_bytes=123_456,
    name="digits",
    version="1.2.0",
    sources=(
        BundleSource("mqtt", "edgekit/v1/plant-7/bundles/" + "ab" * 32),
        BundleSource("https", "https://models.example.com/digits-1.2.0-raspberrypi.ekb"),
    ),
)


def _directive(**changes: object) -> Directive:
    arguments: dict[str, object] = {
        "fleet": "plant-7",
        "device": "cam-0042",
        "rollout_id": "r-2025-06-01",
        "sequence": 42,
        "bundle": BUNDLE,
        "min_security_epoch": 2,
        "issued_at": ISSUED,
        "expires_at": ISSUED + timedelta(hours=24),
    }
    arguments.update(changes)
    return build_directive(**arguments)  # type: ignore[arg-type]


def _verify(
    envelope: bytes,
    truststore: TrustStore,
    *,
    now: datetime = ISSUED + timedelta(minutes=5),
    floor: DirectiveFloor = FLOOR,
    device: str = "cam-0042",
    fleet: str = "plant-7",
) -> Directive:
    return verify_directive(
        envelope, truststore=truststore, fleet=fleet, device=device, floor=floor, now=now
    ).directive


def test_valid_directive_round_trips_and_raises_the_floor(
    keys: Keys, truststore: TrustStore
) -> None:
    directive = _directive(min_security_epoch=3)
    envelope = sign_directive(directive, [keys.directives])
    verified = verify_directive(
        envelope,
        truststore=truststore,
        fleet="plant-7",
        device="cam-0042",
        floor=FLOOR,
        now=ISSUED,
    )
    assert verified.directive == directive
    assert verified.signed_by == {keys.directives.keyid}
    assert next_floor(FLOOR, verified) == DirectiveFloor(last_sequence=42, min_security_epoch=3)
    payload = json.loads(directive.to_payload())
    assert payload["schema"] == "edgekit.directive/v1"
    assert payload["bundle"]["sources"][0] == {
        "kind": "mqtt",
        "topic_prefix": "edgekit/v1/plant-7/bundles/" + "ab" * 32,
    }
    assert payload["issued_at"] == "2025-06-01T12:00:00Z"


def test_refuses_forged_or_wrong_role(keys: Keys, truststore: TrustStore) -> None:
    with pytest.raises(UntrustedKeyError, match="role 'directives'"):
        _verify(sign_directive(_directive(), [keys.outsider]), truststore)
    # A bundles key is trusted, but not to command devices.
    with pytest.raises(UntrustedKeyError, match="role 'directives'"):
        _verify(sign_directive(_directive(), [keys.bundles[0]]), truststore)
    tampered = json.loads(sign_directive(_directive(), [keys.directives]))
    other = sign_directive(_directive(sequence=99), [])
    tampered["payload"] = json.loads(other)["payload"]
    with pytest.raises(ThresholdError, match="do not verify"):
        _verify(json.dumps(tampered).encode(), truststore)
    manifest_typed = sign_envelope(_directive().to_payload(), "text/plain", [keys.directives])
    with pytest.raises(EnvelopeError, match="not a deployment directive"):
        _verify(manifest_typed, truststore)


def test_refuses_replayed_sequence(keys: Keys, truststore: TrustStore) -> None:
    envelope = sign_directive(_directive(sequence=41), [keys.directives])
    with pytest.raises(ReplayError, match="sequence 41 is not above the last accepted 41") as e:
        _verify(envelope, truststore)
    assert (e.value.found, e.value.last_accepted) == (41, 41)  # exact re-delivery
    older = sign_directive(_directive(sequence=7), [keys.directives])
    with pytest.raises(ReplayError, match="sequence 7 is not above"):
        _verify(older, truststore)


def test_refuses_expired(keys: Keys, truststore: TrustStore) -> None:
    envelope = sign_directive(_directive(), [keys.directives])
    with pytest.raises(ExpiredError, match="expired at 2025-06-02T12:00:00Z"):
        _verify(envelope, truststore, now=ISSUED + timedelta(hours=24))
    assert (
        _verify(envelope, truststore, now=ISSUED + timedelta(hours=23, minutes=59)).sequence == 42
    )


def test_refuses_issued_in_the_future_beyond_skew(keys: Keys, truststore: TrustStore) -> None:
    envelope = sign_directive(_directive(), [keys.directives])
    # Within the 300 s allowance: a device clock slightly behind still accepts.
    assert _verify(envelope, truststore, now=ISSUED - timedelta(seconds=299)).sequence == 42
    with pytest.raises(NotYetValidError, match="more than 300 s after the device's clock"):
        _verify(envelope, truststore, now=ISSUED - timedelta(seconds=301))


def test_refuses_epoch_below_floor(keys: Keys, truststore: TrustStore) -> None:
    envelope = sign_directive(_directive(min_security_epoch=1), [keys.directives])
    with pytest.raises(EpochError, match="min_security_epoch 1 is below the device's floor 2"):
        _verify(envelope, truststore)


def test_refuses_wrong_fleet_or_device(keys: Keys, truststore: TrustStore) -> None:
    envelope = sign_directive(_directive(), [keys.directives])
    with pytest.raises(WrongTargetError, match="is for device 'cam-0042' of fleet 'plant-7'"):
        _verify(envelope, truststore, device="cam-0043")
    with pytest.raises(WrongTargetError, match="this is device 'cam-0042' of fleet 'plant-8'"):
        _verify(envelope, truststore, fleet="plant-8")


def test_refuses_when_trust_store_expired(keys: Keys) -> None:
    store = create_truststore(
        root_keys=[keys.root.public_key],
        bundles_keys=[keys.bundles[0].public_key],
        directives_keys=[keys.directives.public_key],
        expires=ISSUED,
    )
    with pytest.raises(ExpiredError, match="trust store version 1 expired"):
        _verify(sign_directive(_directive(), [keys.directives]), store)


def test_a_rollback_is_a_newer_directive_naming_an_older_bundle(
    keys: Keys, truststore: TrustStore
) -> None:
    older = BundleRef("cd" * 32, 100_000, "digits", "1.1.0", BUNDLE.sources)
    envelope = sign_directive(_directive(sequence=43, bundle=older), [keys.directives])
    assert _verify(envelope, truststore).bundle.version == "1.1.0"


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"sequence": 0}, "'sequence' must be >= 1"),
        ({"device": "cam/+/#"}, "not a device id"),
        ({"expires_at": ISSUED}, "must be after issued_at"),
        ({"bundle": BundleRef("AB" * 32, 1, "digits", "1.0.0", BUNDLE.sources)}, "sha256"),
        ({"bundle": BundleRef("ab" * 32, 1, "digits", "v1", BUNDLE.sources)}, "semantic"),
        ({"bundle": BundleRef("ab" * 32, 1, "digits", "1.0.0", ())}, "at least one place"),
        (
            {"bundle": BundleRef("ab" * 32, 1, "d", "1.0.0", (BundleSource("https", "http://x"),))},
            "https:// URL",
        ),
    ],
)
def test_directive_schema_is_validated(change: dict[str, object], phrase: str) -> None:
    with pytest.raises(DirectiveError, match=phrase):
        _directive(**change)


def test_unknown_fields_and_naive_clock_are_refused(keys: Keys, truststore: TrustStore) -> None:
    document = json.loads(_directive().to_payload())
    document["priority"] = "urgent"
    with pytest.raises(DirectiveError, match="unknown field"):
        Directive.from_payload(json.dumps(document).encode())
    with pytest.raises(ValueError, match="timezone-aware"):
        _verify(
            sign_directive(_directive(), [keys.directives]), truststore, now=datetime(2025, 6, 1)
        )
