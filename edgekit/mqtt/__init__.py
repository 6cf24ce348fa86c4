"""edgekit's MQTT seam: the only package that imports paho-mqtt (DESIGN.md, STYLE.md 6).

`BrokerSettings` says how to reach a broker; `MqttClient` is a connection (reconnect with
backoff, handlers by topic filter, publish handles, typed errors, a hostile-payload guard
around every handler); `NetworkLoop` drives one or many clients on one thread; `Inbox`
queues messages for a consumer thread. Topic names come from `edgekit.topics`, payload
parsers from `edgekit.messages`. `BrokerSettings` is pure; the rest is loaded on first use
and needs paho-mqtt (the `agent` or `fleet` extra).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edgekit.mqtt.settings import BrokerSettings

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name == "Inbox":
        return importlib.import_module("edgekit.mqtt.inbox").Inbox
    if name in __all__:
        return getattr(importlib.import_module("edgekit.mqtt.client"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
