"""edgekit's MQTT seam: the only package that imports paho-mqtt (DESIGN.md, STYLE.md 6).

`BrokerSettings` says how to reach a broker; `MqttClient` is a connection (reconnect with
backoff, handlers by topic filter, publish handles, typed errors, a hostile-payload guard
around every handler); `NetworkLoop` drives one or many clients on one thread; `Inbox`
queues messages for a consumer thread. Topic names come from `edgekit.topics`, payload
parsers from `edgekit.messages`. Needs paho-mqtt (the `agent` or `fleet` extra).
"""

from __future__ import annotations

from edgekit.mqtt.client import (
    Backoff,
    BrokerRefusedError,
    Handler,
    Message,
    MqttClient,
    NetworkLoop,
    PublishHandle,
    topic_matches,
    wait_all,
)
from edgekit.mqtt.inbox import Inbox
from edgekit.mqtt.settings import BrokerSettings

__all__ = [
    "Backoff",
    "BrokerRefusedError",
    "BrokerSettings",
    "Handler",
    "Inbox",
    "Message",
    "MqttClient",
    "NetworkLoop",
    "PublishHandle",
    "topic_matches",
    "wait_all",
]
