"""The one MQTT client of edgekit: paho-mqtt 2 (MQTT 5) behind plain methods.

`MqttClient` connects with `BrokerSettings` (TLS, client certificate, credentials), reconnects
with full-jitter exponential backoff, resubscribes after every reconnect, dispatches messages
to handlers by topic filter (`$share/...` filters included), and hands out `PublishHandle`s.
Failures are `TransportError`s (`BrokerRefusedError` when the broker says no).

Every handler runs inside one guard: whatever escapes it is counted (`MessageError` by its
`reason` in `rejected`, anything else in `handler_errors`), logged at most a few times a
minute, and never reaches paho, so the message is acknowledged and the network loop lives on:
one hostile payload cannot kill a subscriber or make the broker redeliver it forever.

Clients are driven by a `NetworkLoop`: one thread, one `selectors` loop, any number of clients
(paho's external-loop API). A client started without one gets a loop of its own; the
simulator shares a few loops among a thousand clients. Sockets are read through a buffer, so a
burst of messages costs one `recv` instead of three per message. This module and
`edgekit.mqtt.settings` are the only places that know paho exists.
"""

from __future__ import annotations

import contextlib
import logging
import random
import selectors
import socket
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgekit.errors import TransportError
from edgekit.messages import MessageError
from edgekit.mqtt.settings import BrokerSettings

__all__ = [
    "Backoff",
    "BrokerRefusedError",
    "Handler",
    "Message",
    "MqttClient",
    "NetworkLoop",
    "PublishHandle",
    "topic_matches",
    "wait_all",
]

log = logging.getLogger(__name__)

_TICK_S = 0.1  # how often loops run timers (keepalive, reconnects, caller ticks)
_CONNECT_TIMEOUT_S = 30.0  # no CONNACK after this long: try again
_MAX_READS_PER_EVENT = 256  # packets read per readiness event before serving other clients
_READ_BYTES = 256 * 1024
_LOG_BURST = 5  # log lines per minute and kind before the guard only counts


class BrokerRefusedError(TransportError):
    """The broker refused the connection (bad credentials, not authorized, bad client id)."""


@dataclass(frozen=True)
class Message:
    """An MQTT message as edgekit code sees it."""

    topic: str
    payload: bytes
    retain: bool = False
    received_at: float = field(default_factory=time.time)


Handler = Callable[[Message], None]


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` matches `topic_filter` (wildcards; a `$share/<group>/` prefix ignored)."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    return paho.topic_matches_sub(topic_filter, topic)


class Backoff:
    """Full-jitter exponential backoff: a random delay in [base/2, min(max, base * 2**n)]."""

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
    """A publish in flight; `wait` returns True once the broker acknowledged it (QoS 1)."""

    _info: paho.MQTTMessageInfo | None

    def wait(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.acknowledged:
            if self._info is None or time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    @property
    def acknowledged(self) -> bool:
        info = self._info
        if info is None:
            return False
        try:
            return info.is_published()
        except (RuntimeError, ValueError):
            # Published while disconnected: paho queues a QoS 1 message and sends it after the
            # reconnect, but its handle keeps the NO_CONN code, on which is_published() raises
            # forever; the acknowledgement still lands in the handle's flag.
            return bool(getattr(info, "_published", False))


def wait_all(handles: Iterable[PublishHandle], *, timeout_s: float, what: str) -> None:
    """Block until the broker acknowledged every handle, or raise `TransportError`."""
    deadline = time.monotonic() + timeout_s
    for handle in handles:
        if not handle.wait(max(0.0, deadline - time.monotonic())):
            raise TransportError(f"the broker did not acknowledge {what} within {timeout_s:g} s")


class _RateLimitedLog:
    """At most `_LOG_BURST` lines per minute per key; the rest are only counted."""

    def __init__(self) -> None:
        self._window: dict[str, tuple[float, int]] = {}

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        start, count = self._window.get(key, (now, 0))
        if now - start > 60.0:
            start, count = now, 0
        self._window[key] = (start, count + 1)
        return count < _LOG_BURST


class _BufferedSocket:
    """A socket whose `recv` serves from a buffer refilled `_READ_BYTES` at a time.

    paho reads a packet with three `recv` calls (type, length, body); with the buffer, a
    burst of packets costs one system call. `pending()` tells the loop to keep reading.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def recv(self, size: int) -> bytes:
        if not self._buffer:
            data = self._sock.recv(max(size, _READ_BYTES))
            if len(data) <= size:
                return bytes(data)
            self._buffer += data
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        return chunk

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return len(self._buffer) + (inner() if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Paho(paho.Client):
    """paho's client with a buffered socket, TCP_NODELAY and a fast path for PUBLISH.

    Nagle's algorithm makes every MQTT round trip (SUBSCRIBE -> retained PUBLISH, PUBLISH ->
    PUBACK) wait for a delayed ACK, ~40 ms on loopback (brokers: Mosquitto's
    `set_tcp_nodelay true`). paho decodes every MQTT 5 PUBLISH into a `Properties` object
    built from scratch, over a third of an exporter's CPU per message (measured with
    yappi); edgekit sends no publish properties, so a QoS 0/1 PUBLISH whose property length
    is 0 is decoded here and everything else by paho. Both paths end in paho's own
    `_handle_on_message` and `_send_puback`.
    """

    def _create_socket(self) -> Any:
        sock: Any = super()._create_socket()
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _BufferedSocket(sock)

    def _handle_publish(self) -> MQTTErrorCode:
        header: int = self._in_packet["command"]
        packet: bytes | bytearray = self._in_packet["packet"]
        qos = (header & 0x06) >> 1
        length = int.from_bytes(packet[:2], "big")
        at = 2 + length + (2 if qos else 0)  # topic, then the packet id for QoS 1
        if (
            self._protocol != MQTTProtocolVersion.MQTTv5
            or qos > 1
            or self._manual_ack
            or len(packet) <= at
            or packet[at] != 0
        ):
            return super()._handle_publish()  # properties present, QoS 2: paho decodes
        view = memoryview(packet)
        message = paho.MQTTMessage(
            mid=int.from_bytes(view[at - 2 : at], "big") if qos else 0,
            topic=bytes(view[2 : 2 + length]),
        )
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.dup = bool(header & 0x08)
        message.payload = bytes(view[at + 1 :])
        message.timestamp = time.monotonic()
        self._handle_on_message(message)
        return self._send_puback(message.mid) if qos else MQTTErrorCode.MQTT_ERR_SUCCESS


class NetworkLoop(threading.Thread):
    """Drives many clients on one selector (paho's external-loop API), on one thread.

    Selector changes happen on this thread only: other threads post them with `call_soon`,
    which wakes the selector. `add_tick` registers a timer called every `_TICK_S`.
    """

    def __init__(self, name: str = "edgekit-mqtt") -> None:
        super().__init__(name=name, daemon=True)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: deque[Callable[[], None]] = deque()
        self._stopping = threading.Event()
        self._ticks: list[Callable[[float], None]] = []
        self._clients: list[MqttClient] = []
        self._backlog: set[MqttClient] = set()  # clients with packets left in their buffer
        self._woken = False
        self._lock = threading.Lock()

    def call_soon(self, call: Callable[[], None]) -> None:
        """Run `call` on the loop thread (any thread may call this)."""
        self._calls.append(call)
        if threading.current_thread() is not self:
            with self._lock:
                if self._woken:
                    return
                self._woken = True
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_w.send(b"\0")

    def add_tick(self, tick: Callable[[float], None]) -> None:
        self._ticks.append(tick)

    def stop(self, *, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        self.call_soon(lambda: None)
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=timeout_s)

    def _register(self, sock: Any, client: MqttClient, events: int) -> None:
        current = client._paho.socket()
        if current is None or current is not sock or current.fileno() < 0:
            return
        try:
            self._selector.modify(sock, events, client)
        except KeyError:
            self._selector.register(sock, events, client)
        except (ValueError, OSError):
            return
        if events & selectors.EVENT_WRITE:
            client._paho.loop_write()

    def _unregister(self, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(sock)

    def run(self) -> None:
        next_tick = time.monotonic()
        while not self._stopping.is_set():
            wait = max(0.0, min(2 * _TICK_S, next_tick - time.monotonic()))
            for key, mask in self._selector.select(timeout=0.0 if self._backlog else wait):
                if key.data is None:
                    self._drain_wake()
                else:
                    self._serve(key.data, key.fileobj, mask)
            if self._backlog:
                # Packets already read into a client's buffer are invisible to the selector:
                # a client left with a backlog (`_MAX_READS_PER_EVENT`) is served again at
                # once, not when its socket next has data (after a burst, maybe never).
                backlog, self._backlog = self._backlog, set()
                for client in backlog:
                    sock = client._paho.socket()
                    if sock is not None:
                        self._serve(client, sock, selectors.EVENT_READ)
            self._run_calls()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + _TICK_S
                for tick in [client._tick for client in self._clients] + self._ticks:
                    try:
                        tick(now)
                    except Exception:
                        log.exception("MQTT loop timer failed")
                self._run_calls()
        self._run_calls()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _serve(self, client: MqttClient, sock: Any, mask: int) -> None:
        try:
            client._on_ready(sock, mask)
        except Exception:  # one broken client must not stop the others
            log.exception("MQTT client %s: network error", client.client_id)

    def _drain_wake(self) -> None:
        with self._lock:
            self._woken = False
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_r.recv(4096):
                pass

    def _run_calls(self) -> None:
        while self._calls:
            call = self._calls.popleft()
            try:
                call()
            except Exception:
                log.exception("MQTT loop call failed")


class MqttClient:
    """One MQTT 5 connection. `start()` connects in the background; `connect()` waits.

    `will` is a retained QoS 1 last will; `clean_start=False` with the settings'
    `session_expiry_s` keeps the session across reconnects. `retry_refused=False` gives up
    when the broker refuses the connection (wrong credentials do not get better by retrying).
    `max_packet_bytes` is the largest packet the broker may send (MQTT 5 Maximum Packet Size).
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str,
        will: tuple[str, bytes] | None = None,
        clean_start: bool = True,
        max_packet_bytes: int | None = None,
        max_inflight: int = 64,
        loop: NetworkLoop | None = None,
        retry_refused: bool = True,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.clean_start = clean_start
        self.max_packet_bytes = max_packet_bytes
        self.retry_refused = retry_refused
        self._on_connect_hook = on_connect
        self._own_loop = loop is None
        self._loop = loop if loop is not None else NetworkLoop(f"mqtt-{client_id}"[:60])
        self._handlers: dict[str, Handler] = {}
        self._routes: dict[str, tuple[Handler, ...]] = {}  # topic -> its handlers (a cache)
        self._subscriptions: dict[str, int] = {}  # kept across reconnects
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._settled = threading.Event()  # the first attempt connected, failed or was refused
        self._subacked: set[int] = set()  # SUBACKs received and not yet waited for
        self._suback = threading.Condition(self._lock)
        self._backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self._want_online = False
        self._started = False
        self._connecting_since: float | None = None
        self._next_attempt = 0.0
        self._logs = _RateLimitedLog()
        self.connects = 0
        self.last_error: str | None = None
        self.refused: str | None = None
        self.received = 0
        self.rejected: Counter[str] = Counter()  # MessageError reasons
        self.handler_errors = 0
        self._published = 0
        self._acknowledged = 0
        self._paho = self._make_paho(will, max_inflight)

    def _make_paho(self, will: tuple[str, bytes] | None, max_inflight: int) -> _Paho:
        client = _Paho(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,
        )
        client.suppress_exceptions = True  # belt and braces: the guards below catch first
        client.max_inflight_messages_set(max_inflight)
        settings = self.settings
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            try:
                client.tls_set(
                    ca_certs=str(settings.ca_file) if settings.ca_file else None,
                    certfile=str(settings.cert_file) if settings.cert_file else None,
                    keyfile=str(settings.key_file) if settings.key_file else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError, ValueError) as e:
                raise TransportError(
                    f"cannot set up TLS for {settings.endpoint} (CA {settings.ca_file}, "
                    f"certificate {settings.cert_file}): {e}"
                ) from e
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        client.on_publish = self._handle_publish
        loop = self._loop
        client.on_socket_open = lambda _c, _u, sock: loop.call_soon(
            lambda: loop._register(sock, self, selectors.EVENT_READ)
        )
        client.on_socket_close = lambda _c, _u, sock: loop.call_soon(lambda: loop._unregister(sock))
        client.on_socket_register_write = lambda _c, _u, sock: loop.call_soon(
            lambda: loop._register(sock, self, selectors.EVENT_READ | selectors.EVENT_WRITE)
        )
        client.on_socket_unregister_write = lambda _c, _u, sock: loop.call_soon(
            lambda: loop._register(sock, self, selectors.EVENT_READ)
        )
        return client

    # -- state ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    @property
    def unacknowledged(self) -> int:
        """QoS 1 messages handed over that the broker has not acknowledged yet."""
        with self._lock:
            return self._published - self._acknowledged

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> MqttClient:
        """Connect (and reconnect) in the background; returns at once."""
        if self._started:
            return self
        self._started = True
        self._want_online = True
        self._loop._clients.append(self)
        if self._own_loop:
            self._loop.start()
        self._loop.call_soon(self._attempt)
        return self

    def connect(self, *, timeout_s: float = 10.0) -> MqttClient:
        """Start and wait for the broker to accept; raises `TransportError` if it does not."""
        self.start()
        self._settled.wait(timeout_s)
        if self.connected:
            return self
        self.stop()
        if self.refused is not None:
            raise BrokerRefusedError(
                f"broker {self.settings.endpoint} refused the connection ({self.refused}): check "
                "the user name and password (EDGEKIT_BROKER_USERNAME/PASSWORD) and --ca"
            )
        raise TransportError(
            f"cannot connect to broker {self.settings.endpoint}: "
            f"{self.last_error or f'no answer in {timeout_s:g} s'}; check --broker and that the "
            "broker runs"
        )

    def stop(self, *, final: tuple[str, bytes] | None = None, timeout_s: float = 2.0) -> None:
        """Publish `final` (retained, e.g. an offline status) if connected, then disconnect."""
        if final is not None and self.connected:
            with contextlib.suppress(TransportError):
                self.publish(final[0], final[1], qos=1, retain=True).wait(timeout_s)
        self._want_online = False
        if not self._started:
            return
        self._started = False
        done = threading.Event()

        def disconnect() -> None:
            with contextlib.suppress(OSError, ValueError):
                self._paho.disconnect()
                self._paho.loop_write()  # send DISCONNECT now: a clean goodbye fires no will
            with contextlib.suppress(ValueError):
                self._loop._clients.remove(self)
            done.set()

        if self._loop.is_alive():
            self._loop.call_soon(disconnect)
            if threading.current_thread() is not self._loop:
                done.wait(timeout_s)
        else:
            disconnect()
        self._connected.clear()
        if self._own_loop:
            self._loop.stop(timeout_s=timeout_s + 3)

    def __enter__(self) -> MqttClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def drop(self) -> None:
        """Disconnect abruptly with the last will sent (a device losing power); no reconnect."""
        self._want_online = False

        def disconnect_with_will() -> None:
            self._paho.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4))

        self._loop.call_soon(disconnect_with_will)

    def sever(self) -> None:
        """Close the socket without a DISCONNECT, as a lost network does (fault injection):
        the broker publishes the will and the client reconnects."""
        sock: Any = self._paho.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def set_will(self, topic: str, payload: bytes) -> None:
        """Replace the retained last will (QoS 1) sent with the next CONNECT.

        MQTT fixes a connection's will when it connects: call this whenever the state the
        will should carry changes, so every reconnect carries the current one.
        """
        with self._lock:
            self._paho.will_set(topic, payload, qos=1, retain=True)

    # -- subscriptions and handlers -----------------------------------------------------------

    def on(self, topic_filter: str, handler: Handler) -> None:
        """Dispatch messages matching `topic_filter` to `handler` (no broker subscription)."""
        with self._lock:
            self._handlers[topic_filter] = handler
            self._routes.clear()

    def off(self, topic_filter: str) -> None:
        with self._lock:
            self._handlers.pop(topic_filter, None)
            self._routes.clear()

    def subscribe(
        self,
        filters: str | Sequence[str],
        handler: Handler | None = None,
        *,
        qos: int = 1,
        keep: bool = True,
        wait_s: float | None = None,
    ) -> None:
        """Subscribe to `filters`, dispatching to `handler` when given.

        `keep` subscriptions are renewed on every reconnect; others (e.g. a bundle's chunks,
        re-requested by their fetcher) are not. With `wait_s`, wait for the broker's SUBACK.
        """
        topics = [filters] if isinstance(filters, str) else list(filters)
        with self._lock:
            for topic in topics:
                if handler is not None:
                    self._handlers[topic] = handler
                    self._routes.clear()
                if keep:
                    self._subscriptions[topic] = qos
        if not self.connected or not topics:
            if wait_s is not None and not self.connected:
                raise TransportError(f"not connected to {self.settings.endpoint}: cannot subscribe")
            return
        result, mid = self._paho.subscribe([(topic, qos) for topic in topics])
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            if wait_s is not None:
                raise TransportError(
                    f"cannot subscribe to {topics[0]}: {paho.error_string(result)}"
                )
            return
        if wait_s is None or mid is None:
            return
        with self._suback:
            if not self._suback.wait_for(lambda: mid in self._subacked, wait_s):
                raise TransportError(f"the broker did not acknowledge subscribing to {topics[0]}")
            self._subacked.discard(mid)

    def unsubscribe(self, filters: str | Sequence[str], *, handlers: bool = True) -> None:
        """Unsubscribe from `filters` (and, by default, drop their handlers)."""
        topics = [filters] if isinstance(filters, str) else list(filters)
        with self._lock:
            for topic in topics:
                self._subscriptions.pop(topic, None)
                if handlers:
                    self._handlers.pop(topic, None)
                    self._routes.clear()
        if self.connected and topics:
            with contextlib.suppress(ValueError, OSError):
                self._paho.unsubscribe(topics)

    # -- publishing ---------------------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> PublishHandle:
        """Queue a message (sent now, or after a reconnect for QoS 1)."""
        with self._lock:  # before the call: the PUBACK may arrive before it returns
            self._published += qos > 0
        try:
            info = self._paho.publish(topic, payload, qos=qos, retain=retain)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                raise ValueError(paho.error_string(info.rc))
        except (ValueError, OSError) as e:
            with self._lock:
                self._published -= qos > 0
            raise TransportError(f"cannot publish to {topic[:200]}: {e}") from e
        return PublishHandle(info)

    # -- the loop thread ------------------------------------------------------------------------

    def _attempt(self) -> None:
        """Open the connection (on the loop thread), unless one is open or being opened.

        `start()` asks for an attempt and the loop's timer may make one in the same instant: a
        second CONNECT would make the broker close the first connection as a session takeover
        and publish its last will (a device reported offline as it came online).
        """
        if self.connected or not self._want_online or self._connecting_since is not None:
            return
        self._connecting_since = time.monotonic()
        settings = self.settings
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if settings.session_expiry_s:
            properties.SessionExpiryInterval = settings.session_expiry_s
        if self.max_packet_bytes:
            properties.MaximumPacketSize = self.max_packet_bytes
        try:
            self._paho.connect(
                settings.host,
                settings.port,
                keepalive=settings.keepalive_s,
                clean_start=self.clean_start,
                properties=properties,
            )
        except (OSError, ssl.SSLError, ValueError) as e:
            self.last_error = str(e)
            self._connecting_since = None
            delay = self._backoff.next_delay()
            self._next_attempt = time.monotonic() + delay
            if self._logs.allow("unreachable"):
                log.info(
                    "broker %s unreachable (%s); retrying in %.1f s", settings.endpoint, e, delay
                )
            self._settled.set()

    def _tick(self, now: float) -> None:
        if self.connected:
            self._paho.loop_misc()
            return
        if not self._want_online:
            return
        since = self._connecting_since
        if since is not None and now - since < _CONNECT_TIMEOUT_S:
            return  # waiting for CONNACK: a busy broker must not get a reconnect storm
        if now >= self._next_attempt:
            self._connecting_since = None  # no CONNACK in time: give up on that attempt
            self._attempt()

    def _on_ready(self, sock: Any, mask: int) -> None:
        client: Any = self._paho
        if client.socket() is not sock:
            self._loop._unregister(sock)
            return
        if mask & selectors.EVENT_READ:
            buffered: Any = sock
            for _ in range(_MAX_READS_PER_EVENT):
                client.loop_read()
                if client.socket() is not buffered or not buffered.pending():
                    break
            else:
                self._loop._backlog.add(self)
        if mask & selectors.EVENT_WRITE and client.socket() is sock:
            client.loop_write()

    # -- paho callbacks (loop thread) -----------------------------------------------------------

    def _handle_connect(
        self, client: paho.Client, _userdata: Any, flags: Any, reason: Any, _props: Any
    ) -> None:
        self._connecting_since = None
        if reason.is_failure:
            self.refused = str(reason)
            self.last_error = f"broker refused the connection: {reason}"
            if self._logs.allow("refused"):
                log.error(
                    "%s (%s; check the user name, password and ACL)",
                    self.last_error,
                    self.settings.endpoint,
                )
            if not self.retry_refused:
                self._want_online = False
            self._settled.set()
            return
        self.refused = None
        self._backoff.reset()
        self.connects += 1
        log.info(
            "connected to %s as %s (session present: %s)",
            self.settings.endpoint,
            self.client_id,
            getattr(flags, "session_present", False),
        )
        with self._lock:
            subscriptions = list(self._subscriptions.items())
        if subscriptions:
            client.subscribe(subscriptions)
        self._connected.set()
        self._settled.set()
        if self._on_connect_hook is not None:
            try:
                self._on_connect_hook()
            except Exception:
                self.handler_errors += 1
                if self._logs.allow("connect hook"):
                    log.exception("MQTT connect hook failed")

    def _handle_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if self._connected.is_set() or self._connecting_since is not None:
            self._connected.clear()
            self._connecting_since = None
            self._next_attempt = time.monotonic() + self._backoff.next_delay()
            if self._want_online:
                log.warning("disconnected from %s: %s", self.settings.endpoint, reason)

    def _handle_subscribe(
        self, _client: paho.Client, _userdata: Any, mid: int, _reasons: Any, _props: Any
    ) -> None:
        with self._suback:
            if len(self._subacked) < 1024:  # only waited-for SUBACKs are removed
                self._subacked.add(mid)
            self._suback.notify_all()

    def _handle_publish(
        self, _client: paho.Client, _userdata: Any, _mid: int, _reason: Any, _props: Any
    ) -> None:
        with self._lock:
            self._acknowledged += 1

    def _handle_message(self, _client: paho.Client, _userdata: Any, raw: Any) -> None:
        try:
            topic = raw.topic
        except UnicodeDecodeError:
            self.rejected["topic"] += 1
            return
        self.received += 1
        handlers = self._routes.get(topic)
        if handlers is None:
            with self._lock:
                handlers = tuple(h for f, h in self._handlers.items() if topic_matches(f, topic))
                if len(self._routes) > 16384:
                    self._routes.clear()
                self._routes[topic] = handlers
        if not handlers:
            return
        message = Message(topic, bytes(raw.payload), bool(raw.retain))
        for handler in handlers:
            try:
                handler(message)
            except MessageError as e:
                self.rejected[e.reason] += 1
                if self._logs.allow(f"rejected:{e.reason}"):
                    log.warning("rejected a message on %s: %s", topic[:200], e)
            except Exception:
                self.handler_errors += 1
                if self._logs.allow("handler"):
                    log.exception("the handler for %s failed (message dropped)", topic[:200])
