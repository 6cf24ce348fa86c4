"""Deliver a trust store rotation to a fleet: the chain of signed versions, retained on the
fleet's `trust` topic (`edgekit.trust.rotation` says how devices apply it)."""

from __future__ import annotations

from collections.abc import Sequence

from edgekit.errors import BundleError
from edgekit.mqtt import MqttClient, wait_all
from edgekit.topics import Topics
from edgekit.trust import (
    TrustStore,
    TrustUpdateError,
    load_truststore,
    parse_truststore_envelope,
    trust_message,
    update_truststore,
)

__all__ = ["check_trust_chain", "publish_trust"]


def check_trust_chain(envelopes: Sequence[bytes]) -> list[tuple[TrustStore, bytes]]:
    """The signed trust stores in version order, checked as a device will: the oldest signed
    by its own root keys, each next version by the rotation rule. Raises `BundleError`."""
    if not envelopes:
        raise TrustUpdateError("give at least one signed trust store")
    stores = []
    for data in envelopes:
        stores.append((parse_truststore_envelope(data)[0], data))
    stores.sort(key=lambda item: item[0].version)
    first, first_data = stores[0]
    try:
        chain = [(load_truststore(first_data), first_data)]
    except BundleError as e:
        raise TrustUpdateError(
            f"trust store version {first.version} is not signed by its own root keys: {e}"
        ) from e
    for store, data in stores[1:]:
        previous = chain[-1][0]
        try:
            chain.append((update_truststore(previous, data), data))
        except BundleError as e:
            raise TrustUpdateError(
                f"trust store version {store.version} does not follow version "
                f"{previous.version}: {e}"
            ) from e
    return chain


def publish_trust(client: MqttClient, fleet: str, envelopes: Sequence[bytes]) -> TrustStore:
    """Check the chain and publish it, retained, on `edgekit/v1/<fleet>/trust`; the newest
    version is returned. Devices apply the versions newer than theirs, in order."""
    chain = check_trust_chain(envelopes)
    payload = trust_message(fleet, [data for _, data in chain])
    handle = client.publish(Topics(fleet).trust(), payload, qos=1, retain=True)
    wait_all([handle], timeout_s=30.0, what="the trust store chain")
    return chain[-1][0]
