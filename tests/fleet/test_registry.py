"""The device registry against a real Mosquitto: a last will does not erase what a device runs."""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgekit.fleet.registry import DeviceRegistry, fleet_client
from edgekit.messages import BundleId, Status
from edgekit.mosquitto import MosquittoBroker
from edgekit.mqtt import BrokerSettings, Inbox
from edgekit.topics import Topics

FLEET = "reg"
TOPICS = Topics(FLEET)


def _wait_for(connection: Inbox, registry: DeviceRegistry, predicate: object) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for message in connection.drain(timeout_s=0.1):
            registry.handle(message)
        if predicate():  # type: ignore[operator]
            return
    raise AssertionError("timed out waiting for the registry")


def test_last_will_keeps_the_devices_record(mosquitto: MosquittoBroker) -> None:
    active = BundleId("tiny", "2.0.0", "a" * 64)
    previous = BundleId("tiny", "1.0.0", "b" * 64)
    full = Status(
        fleet=FLEET,
        device="dev-1",
        online=True,
        state="committed",
        profile="x86-64",
        group="lab",
        tags={"site": "berlin"},
        active=active,
        previous=previous,
        rollout_id="r-1",
        last_sequence=42,
        agent_version="edgekit-agent/1",
        ts=time.time(),
    )
    # The will of an agent that does not (yet) repeat its status in it: offline, nothing else.
    will = Status(fleet=FLEET, device="dev-1", online=False, state="offline", ts=time.time() + 1)
    registry = DeviceRegistry(TOPICS)
    with fleet_client(BrokerSettings(mosquitto.url)) as client:
        connection = Inbox(client)
        connection.subscribe([TOPICS.all_devices("status")])
        device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-1", protocol=mqtt.MQTTv5)
        device.will_set(TOPICS.status("dev-1"), will.to_json(), qos=1, retain=True)
        device.connect("127.0.0.1", mosquitto.port)
        device.loop_start()
        device.publish(TOPICS.status("dev-1"), full.to_json(), qos=1, retain=True).wait_for_publish(
            5
        )
        _wait_for(connection, registry, lambda: registry.get("dev-1") is not None)
        assert registry.get("dev-1").online  # type: ignore[union-attr]
        # The device vanishes without DISCONNECT: the broker publishes its will.
        device.loop_stop()
        device.socket().close()
        _wait_for(connection, registry, lambda: not registry.get("dev-1").online)  # type: ignore[union-attr]
    record = registry.get("dev-1")
    assert record is not None and not record.online
    assert record.last_seen == will.ts
    assert record.active == active and record.previous == previous
    assert record.last_sequence == 42 and record.state == "committed"
    assert record.profile == "x86-64" and dict(record.tags) == {"site": "berlin"}
    assert record.group == "lab" and record.rollout_id == "r-1"
