"""The agent's broker session: paho-mqtt 2 behind plain methods, MQTT 5, persistent session.

`MqttSession` connects with `clean_start=False` and a session expiry (the broker keeps the
agent's subscriptions and QoS 1 messages while it is away), sets a retained last will, and
runs its own network thread that reconnects with full-jitter exponential backoff. Handlers
registered with `subscribe` are re-subscribed on every connect and receive `(topic,
payload)`; nothing paho-specific leaks into the agent's logic except `client` (for
`edgekit.transfer`, which registers its own per-topic callbacks).
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from edgekit.agent.config import MqttSettings
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgekit.errors import TransportError
from edgekit.transfer import MAX_CHUNK_BYTES

__all__ = ["MAX_PACKET_BYTES", "Backoff", "MqttSession", "PublishHandle"]

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]

MAX_PACKET_BYTES = MAX_CHUNK_BYTES + 64 * 1024
"""The largest MQTT packet the agent accepts (MQTT 5 Maximum Packet Size, sent in CONNECT):
a bundle chunk of the largest size `edgekit.transfer` allows, plus headroom for the topic and
properties. The broker drops bigger messages for this client instead of sending them."""


class Backoff:
    """Full-jitter exponential backoff: a random delay in [0, min(max, base * 2**n)]."""

    def __init__(self, base_s: float, max_s: float, *, rng: random.Random | None = None) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.base_s * (2**self.attempts))
        self.attempts = min(self.attempts + 1, 32)
        return self._rng.uniform(self.base_s / 2, max(ceiling, self.base_s / 2))

    def reset(self) -> None:
        self.attempts = 0


@dataclass(frozen=True)
class PublishHandle:
    """A QoS 1 publish in flight; `wait` returns True once the broker acknowledged it."""

    _info: mqtt.MQTTMessageInfo | None

    def wait(self, timeout_s: float) -> bool:
        info = self._info
        if info is None:
            return False
        deadline = time.monotonic() + timeout_s
        while not info.is_published():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    @property
    def acknowledged(self) -> bool:
        return self._info is not None and self._info.is_published()


class MqttSession:
    """One persistent MQTT 5 session; `start()` returns at once and connects in the background."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        will: tuple[str, bytes] | None = None,
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self._on_connect_hook = on_connect
        self._on_disconnect_hook = on_disconnect
        self._handlers: dict[str, tuple[MessageHandler, int]] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._socket_open = False
        self._backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self.connects = 0
        self.last_error: str | None = None
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,
        )
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            client.tls_set(
                ca_certs=str(settings.ca_file) if settings.ca_file else None,
                certfile=str(settings.cert_file) if settings.cert_file else None,
                keyfile=str(settings.key_file) if settings.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        self.client = client

    # -- public API ----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def set_will(self, topic: str, payload: bytes) -> None:
        """Replace the retained last will (QoS 1) sent with the next CONNECT.

        MQTT fixes a connection's will when it connects: the broker publishes the will given
        at the last (re)connect. Call this whenever the status changes so that every
        reconnect carries the device's current state.
        """
        with self._lock:
            self.client.will_set(topic, payload, qos=1, retain=True)

    def subscribe(self, topic: str, handler: MessageHandler, *, qos: int = 1) -> None:
        """Deliver messages on `topic` (a filter) to `handler(topic, payload)`, on every connect."""
        with self._lock:
            self._handlers[topic] = (handler, qos)
        if self.connected:
            self.client.subscribe(topic, qos=qos)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> PublishHandle:
        """Queue a message with paho (sent now, or on reconnect for QoS 1)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise TransportError(f"cannot publish to {topic}: {mqtt.error_string(info.rc)}")
        return PublishHandle(info)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()

    def stop(self, *, final: tuple[str, bytes] | None = None, timeout_s: float = 2.0) -> None:
        """Publish `final` (retained, e.g. an offline status) if connected, then disconnect."""
        if final is not None and self.connected:
            self.publish(final[0], final[1], qos=1, retain=True).wait(timeout_s)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s + 5)
            self._thread = None
        with contextlib.suppress(OSError, ValueError):
            self.client.disconnect()
        self._connected.clear()

    # -- network thread ------------------------------------------------------------------

    def _connect_properties(self) -> Properties:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.settings.session_expiry_s
        properties.MaximumPacketSize = MAX_PACKET_BYTES
        return properties

    def _run(self) -> None:
        first = True
        while not self._stop.is_set():
            if not self._socket_open:
                try:
                    if first:
                        self.client.connect(
                            self.settings.host,
                            self.settings.port,
                            keepalive=self.settings.keepalive_s,
                            clean_start=False,
                            properties=self._connect_properties(),
                        )
                        first = False
                    else:
                        self.client.reconnect()
                    self._socket_open = True
                except (OSError, ssl.SSLError, ValueError) as e:
                    self.last_error = str(e)
                    delay = self._backoff.next_delay()
                    log.info(
                        "broker %s unreachable (%s); retrying in %.1f s",
                        self.settings.url,
                        e,
                        delay,
                    )
                    self._stop.wait(delay)
                    continue
            try:
                rc = self.client.loop(timeout=0.2)
            except Exception:  # a callback bug must not end the session for good
                log.exception("MQTT network loop failed; reconnecting")
                with contextlib.suppress(OSError, ValueError):
                    self.client.disconnect()
                rc = MQTTErrorCode.MQTT_ERR_CONN_LOST
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._socket_open = False
                if self._connected.is_set():
                    self._lost(f"network loop: {mqtt.error_string(rc)}")
                if not self._stop.is_set():
                    self._stop.wait(self._backoff.next_delay())

    def _lost(self, why: str) -> None:
        self._connected.clear()
        log.warning("disconnected from %s: %s", self.settings.url, why)
        if self._on_disconnect_hook is not None:
            self._on_disconnect_hook()

    def _handle_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        flags: Any,
        reason_code: Any,
        _properties: Any,
    ) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            log.error("%s (check mqtt.username/password and the ACL)", self.last_error)
            return
        self._backoff.reset()
        self.connects += 1
        log.info(
            "connected to %s (session present: %s)",
            self.settings.url,
            getattr(flags, "session_present", False),
        )
        with self._lock:
            subscriptions = [(topic, qos) for topic, (_h, qos) in self._handlers.items()]
        if subscriptions:
            client.subscribe(subscriptions)
        self._connected.set()
        if self._on_connect_hook is not None:
            self._on_connect_hook()

    def _handle_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: Any,
        reason_code: Any,
        _properties: Any,
    ) -> None:
        self._socket_open = False
        if self._connected.is_set():
            self._lost(str(reason_code))

    def _handle_message(self, _client: mqtt.Client, _userdata: Any, message: Any) -> None:
        with self._lock:
            handlers = [
                handler
                for topic, (handler, _qos) in self._handlers.items()
                if mqtt.topic_matches_sub(topic, message.topic)
            ]
        for handler in handlers:
            try:
                handler(message.topic, bytes(message.payload))
            except Exception:  # a handler bug must not kill the network thread
                log.exception("handler for %s failed", message.topic)
