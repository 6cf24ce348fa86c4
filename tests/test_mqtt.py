"""The MQTT seam against a real Mosquitto: the PUBLISH fast path and paho's own decoding give
the same messages, retained flags and QoS 1 acknowledgements; reconnect resubscribes."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgekit.mosquitto import MosquittoBroker
from edgekit.mqtt import BrokerSettings, Message, MqttClient, NetworkLoop, topic_matches


def _collect(client: MqttClient, topic_filter: str) -> tuple[list[Message], threading.Event]:
    received: list[Message] = []
    done = threading.Event()

    def handler(message: Message) -> None:
        received.append(message)
        if message.topic.endswith("/last"):
            done.set()

    client.subscribe(topic_filter, handler, wait_s=10)
    return received, done


def test_fast_path_and_paho_decode_agree(mosquitto: MosquittoBroker) -> None:
    """A PUBLISH without properties takes the seam's fast path; one with a user property (or
    QoS 2) is decoded by paho; the handler sees the same thing either way."""
    settings = BrokerSettings(mosquitto.url)
    with MqttClient(settings, client_id="edgekit-test-receiver") as receiver:
        received, done = _collect(receiver, "seam/#")
        sender = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id="edgekit-test-raw",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        sender.connect(mosquitto.host, mosquitto.port)
        sender.loop_start()
        try:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.UserProperty = ("k", "v")
            infos = [
                sender.publish("seam/plain1", b"a", qos=1),
                sender.publish("seam/plain0", b"b" * 70_000, qos=0),
                sender.publish("seam/props", b"c", qos=1, properties=properties),
                sender.publish("seam/qos2", b"d", qos=2),
                sender.publish("seam/empty", b"", qos=1),
                sender.publish("seam/last", b"e", qos=1),
            ]
            for info in infos:
                info.wait_for_publish(10)
            assert done.wait(10)
        finally:
            sender.loop_stop()
            sender.disconnect()
    got = {m.topic: (m.payload, m.retain) for m in received}
    assert got == {
        "seam/plain1": (b"a", False),
        "seam/plain0": (b"b" * 70_000, False),
        "seam/props": (b"c", False),
        "seam/qos2": (b"d", False),
        "seam/empty": (b"", False),
        "seam/last": (b"e", False),
    }


def test_retained_messages_and_acknowledgements(mosquitto: MosquittoBroker) -> None:
    settings = BrokerSettings(mosquitto.url)
    with MqttClient(settings, client_id="edgekit-test-pub") as publisher:
        handles = [publisher.publish(f"keep/{n}", str(n).encode(), retain=True) for n in range(50)]
        handles.append(publisher.publish("keep/last", b"x", retain=True))
        assert all(handle.wait(10) for handle in handles)
        assert publisher.unacknowledged == 0
    with MqttClient(settings, client_id="edgekit-test-sub") as subscriber:
        received, done = _collect(subscriber, "keep/#")
        assert done.wait(10)
        time.sleep(0.2)
    assert len(received) == 51 and all(message.retain for message in received)
    assert sorted(m.payload for m in received if m.topic != "keep/last") == sorted(
        str(n).encode() for n in range(50)
    )


def test_reconnect_resubscribes(mosquitto: MosquittoBroker) -> None:
    settings = BrokerSettings(mosquitto.url, reconnect_min_s=0.1, reconnect_max_s=0.5)
    with (
        MqttClient(settings, client_id="edgekit-test-resub") as client,
        MqttClient(settings, client_id="edgekit-test-sender") as sender,
    ):
        _received, done = _collect(client, "again/#")
        client.sever()
        deadline = time.monotonic() + 20
        while client.connects < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.connects == 2
        time.sleep(0.3)  # the renewed SUBACK
        assert sender.publish("again/last", b"1").wait(10)
        assert done.wait(10)


def test_a_publish_made_while_disconnected_is_waited_for_not_raised(
    mosquitto: MosquittoBroker,
) -> None:
    """paho keeps a NO_CONN code on the handle of a QoS 1 message queued while disconnected,
    and its is_published() raises on it even after the reconnect delivered the message; a
    handle must answer False until the PUBACK, then True (the agent's sender thread died here)."""
    settings = BrokerSettings(mosquitto.url, reconnect_min_s=0.1, reconnect_max_s=0.3)
    with (
        MqttClient(settings, client_id="edgekit-test-offline") as client,
        MqttClient(settings, client_id="edgekit-test-watch") as watcher,
    ):
        received, done = _collect(watcher, "offline/#")
        mosquitto.stop()
        deadline = time.monotonic() + 10
        while client.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not client.connected
        handle = client.publish("offline/last", b"queued", qos=1, retain=True)
        assert handle.wait(0.2) is False  # not acknowledged yet, and no exception
        assert handle.acknowledged is False
        mosquitto.restart()
        assert handle.wait(20), "the queued message was never acknowledged after reconnecting"
        assert done.wait(10) and received[-1].payload == b"queued"


def test_topic_filters() -> None:
    assert topic_matches("a/+/c", "a/b/c") and not topic_matches("a/+/c", "a/b/d")
    assert topic_matches("a/#", "a") and topic_matches("a/#", "a/b/c")
    assert topic_matches("$share/g/a/+/t", "a/x/t") and not topic_matches("$share/g/a/+", "a")
    assert not topic_matches("#", "$SYS/x") and topic_matches("$SYS/#", "$SYS/x")
    assert not topic_matches("a/b", "a/b/c")


def test_starting_a_client_opens_one_connection_and_fires_no_will(
    mosquitto: MosquittoBroker,
) -> None:
    """`start()` and the loop's first timer tick both asked for a connection; a second CONNECT
    made the broker close the first as a session takeover and publish its last will: a device
    reported offline as it came online (seen for 1-5 clients in 40 before the fix)."""
    settings = BrokerSettings(mosquitto.url)
    wills: list[str] = []
    watcher = MqttClient(settings, client_id="will-watcher").connect()
    clients = [
        MqttClient(settings, client_id=f"will-{i}", will=(f"wills/{i}", b"offline"))
        for i in range(100)
    ]
    try:
        watcher.subscribe("wills/#", lambda message: wills.append(message.topic), wait_s=5)
        for client in clients:
            client.start()
        assert all(client.wait_connected(10) for client in clients)
        time.sleep(1.0)  # a will is published as soon as the broker closes the connection
        assert wills == []
        assert all(client.connects == 1 for client in clients)
    finally:
        for client in clients:
            client.stop()
        watcher.stop()


def test_a_burst_larger_than_one_read_is_delivered_without_more_traffic(
    mosquitto: MosquittoBroker,
) -> None:
    """The loop reads at most `_MAX_READS_PER_EVENT` packets per readiness event, but its
    buffered socket may already hold more: those must be dispatched at once, not when the
    socket next has data (after the last burst of a flood: never, which lost the exporter
    the tail of the stream)."""
    from edgekit.mqtt import client as mqtt_client

    count = 4 * mqtt_client._MAX_READS_PER_EVENT
    received: list[str] = []
    loop = NetworkLoop("burst-loop")
    loop.start()
    reader = MqttClient(BrokerSettings(mosquitto.url), client_id="burst-reader", loop=loop)
    sender = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5
    )
    gate = threading.Event()
    try:
        reader.connect()
        reader.subscribe("burst/#", lambda message: received.append(message.topic), qos=0, wait_s=5)
        # Hold the reader's loop while the whole burst lands in its socket: one recv then
        # takes it all, more than one readiness event may read.
        loop.call_soon(lambda: gate.wait(10))
        sender.connect(mosquitto.host, mosquitto.port)
        sender.loop_start()
        for info in [sender.publish(f"burst/{i}", b"x", qos=0) for i in range(count)]:
            info.wait_for_publish(5)
        time.sleep(0.5)
        gate.set()
        deadline = time.monotonic() + 5
        while len(received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        gate.set()
        sender.loop_stop()
        sender.disconnect()
        reader.stop()
        loop.stop()
    assert len(received) == count, f"{count - len(received)} of {count} messages stranded"
