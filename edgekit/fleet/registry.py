"""The device registry (from retained status messages) and the controller's MQTT connection.

Every agent keeps a retained `devices/<id>/status` (its last will marks it offline), so a
client that subscribes to `devices/+/status` learns the whole fleet at once: id, online,
profile, group, tags, active bundle, updater state, last sequence and when it was last heard.

`FleetConnection` is the operator side's one seam over paho-mqtt (MQTT 5): it connects,
resubscribes after a reconnect, queues incoming messages for the caller to drain, and turns
paho's return codes into `TransportError`. Nothing else in `edgekit.fleet` touches paho.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import ssl
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgekit.errors import EdgekitError, TransportError
from edgekit.topics import ActiveBundle, MessageError, Status, Topics, parse_device_topic

__all__ = [
    "BrokerAddress",
    "BrokerSettings",
    "DeviceRecord",
    "DeviceRegistry",
    "DeviceSelector",
    "FleetConnection",
    "Message",
    "as_broker_address",
    "load_registry",
    "parse_tag",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker listens and how to log in: parsed from `mqtt[s]://[user:pass@]host:port`.

    The one parser of broker URLs for the operator's tools, the simulator and the monitor.
    """

    host: str
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None

    @classmethod
    def parse(cls, url: str, *, ca_file: Path | None = None) -> BrokerAddress:
        """Parse `mqtt://host:port` or `mqtts://host:port` (default ports 1883 and 8883);
        `tcp://`/`ssl://` and a bare `host:port` are accepted too."""
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise TransportError(
                f"broker URL {url!r} must look like mqtt://host:1883 or mqtts://host:8883"
            )
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise TransportError(f"broker URL {url!r} has an invalid port") from None
        return cls(parts.hostname, port, tls, parts.username, parts.password, ca_file)

    @property
    def url(self) -> str:
        """The URL without credentials."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def as_broker_address(broker: BrokerAddress | str) -> BrokerAddress:
    """`broker` itself, or parsed if it is a URL."""
    return broker if isinstance(broker, BrokerAddress) else BrokerAddress.parse(broker)


@dataclass(frozen=True)
class BrokerSettings:
    """How the operator's tools reach the fleet's broker: a broker URL (see `BrokerAddress`)
    plus the account, CA and MQTT session options."""

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    ca: Path | None = None  # PEM bundle to verify the broker (mqtts); default: system CAs
    client_id: str | None = None
    keepalive_s: int = 30

    def __post_init__(self) -> None:
        self.address  # noqa: B018 - validates the URL early

    @property
    def address(self) -> BrokerAddress:
        """The parsed URL; `username`/`password` given here win over ones in the URL."""
        parsed = BrokerAddress.parse(self.url, ca_file=self.ca)
        if self.username is None:
            return parsed
        return dataclasses.replace(parsed, username=self.username, password=self.password)


@dataclass(frozen=True)
class Message:
    """An MQTT message as the fleet code sees it."""

    topic: str
    payload: bytes
    retain: bool
    received_at: float


class FleetConnection:
    """An MQTT 5 client for the operator's tools (controller, registry)."""

    def __init__(self, settings: BrokerSettings, *, client_prefix: str = "edgekit-fleet") -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.settings = settings
        client_id = settings.client_id or f"{client_prefix}-{uuid.uuid4().hex[:12]}"
        self._mqtt = mqtt
        self._client: Any = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        self._client.max_inflight_messages_set(200)
        self._client.max_queued_messages_set(0)
        address = settings.address
        if address.username is not None:
            self._client.username_pw_set(address.username, address.password)
        host, port = address.host, address.port
        if address.tls:
            try:
                self._client.tls_set(
                    ca_certs=str(settings.ca) if settings.ca else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError, ValueError) as e:
                raise TransportError(f"cannot set up TLS with CA {settings.ca}: {e}") from e
        self._host, self._port = host, port
        self._queue: queue.Queue[Message] = queue.Queue()
        self._subscriptions: list[str] = []
        self._connected = threading.Event()
        self._connect_error: str | None = None
        self._lock = threading.Lock()
        self._pending_subacks: dict[int, threading.Event] = {}
        self._early_subacks: set[int] = set()
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe

    # paho callbacks (run on paho's network thread)
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._connect_error = str(reason)
            return
        self._connect_error = None
        with self._lock:
            topics = list(self._subscriptions)
        if topics:
            client.subscribe([(topic, 1) for topic in topics])
        self._connected.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._connected.clear()
        logger.info("disconnected from %s:%s (%s)", self._host, self._port, reason)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self._queue.put(
            Message(message.topic, bytes(message.payload), bool(message.retain), time.time())
        )

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        with self._lock:
            event = self._pending_subacks.pop(mid, None)
            if event is None:
                self._early_subacks.add(mid)
        if event is not None:
            event.set()

    @property
    def paho_client(self) -> Any:
        """The underlying paho client (for `edgekit.transfer.publish_bundle`)."""
        return self._client

    def connect(self, *, timeout_s: float = 10.0) -> FleetConnection:
        try:
            self._client.connect(self._host, self._port, keepalive=self.settings.keepalive_s)
        except (OSError, ssl.SSLError) as e:
            raise TransportError(
                f"cannot connect to broker {self.settings.url}: {e}; check --broker and that "
                "the broker runs"
            ) from e
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            self.close()
            why = self._connect_error or f"no answer in {timeout_s:g} s"
            raise TransportError(
                f"broker {self.settings.url} refused the connection: {why}; check --username/"
                "--password (EDGEKIT_BROKER_USERNAME/PASSWORD) and --ca"
            )
        return self

    def subscribe(self, topics: Sequence[str], *, timeout_s: float = 10.0) -> None:
        """Subscribe (QoS 1) and wait for the broker's acknowledgement."""
        with self._lock:
            self._subscriptions.extend(t for t in topics if t not in self._subscriptions)
        result, mid = self._client.subscribe([(topic, 1) for topic in topics])
        if result != self._mqtt.MQTT_ERR_SUCCESS:
            raise TransportError(f"cannot subscribe to {', '.join(topics)}: error {result}")
        event = threading.Event()
        with self._lock:
            if mid in self._early_subacks:  # acknowledged before we got here
                self._early_subacks.discard(mid)
                return
            self._pending_subacks[mid] = event
        if not event.wait(timeout_s):
            raise TransportError(f"broker did not acknowledge subscription to {topics[0]}")

    def unsubscribe(self, topics: Sequence[str]) -> None:
        with self._lock:
            self._subscriptions = [t for t in self._subscriptions if t not in topics]
        self._client.unsubscribe(list(topics))

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> Any:
        """Queue a message; returns a handle for `wait_published`."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (self._mqtt.MQTT_ERR_SUCCESS, self._mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"cannot publish to {topic}: paho error {info.rc}")
        return info

    def wait_published(self, handles: Iterable[Any], *, timeout_s: float = 60.0) -> None:
        """Block until the broker acknowledged every handle (QoS 1), or raise."""
        deadline = time.monotonic() + timeout_s
        for handle in handles:
            remaining = deadline - time.monotonic()
            try:
                handle.wait_for_publish(max(0.0, remaining))
            except (RuntimeError, ValueError) as e:
                raise TransportError(f"publishing failed: {e}") from e
            if not handle.is_published():
                raise TransportError(
                    f"broker {self.settings.url} did not acknowledge a message within "
                    f"{timeout_s:g} s"
                )

    def drain(self, *, timeout_s: float = 0.0, limit: int = 100_000) -> list[Message]:
        """Messages received so far; waits up to `timeout_s` for the first one."""
        messages: list[Message] = []
        try:
            messages.append(
                self._queue.get(timeout=timeout_s) if timeout_s > 0 else self._queue.get_nowait()
            )
        except queue.Empty:
            return messages
        while len(messages) < limit:
            try:
                messages.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return messages

    def collect_retained(
        self, topics: Sequence[str], *, quiet_s: float = 0.4, timeout_s: float = 10.0
    ) -> list[Message]:
        """Subscribe and gather messages until no retained one arrived for `quiet_s`.

        Live (non-retained) messages that arrive meanwhile are returned too, so a busy fleet
        (telemetry never pauses) does not keep this waiting.
        """
        self.subscribe(topics)
        collected: list[Message] = []
        deadline = time.monotonic() + timeout_s
        last_retained = time.monotonic()
        while time.monotonic() < deadline:
            wait = quiet_s - (time.monotonic() - last_retained)
            if wait <= 0:
                break
            batch = self.drain(timeout_s=min(wait, 0.05))
            if any(message.retain for message in batch):
                last_retained = time.monotonic()
            collected.extend(batch)
        return collected

    def close(self) -> None:
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()

    def __enter__(self) -> FleetConnection:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_tag(text: str) -> tuple[str, str]:
    """`"k=v"` -> ("k", "v")."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise EdgekitError(f"tag {text!r} must be key=value, e.g. --tag site=berlin")
    return key.strip(), value.strip()


@dataclass(frozen=True)
class DeviceSelector:
    """Which devices a command acts on: all of group, tags and profiles must match."""

    group: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    profiles: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()

    def matches(self, record: DeviceRecord) -> bool:
        if self.group is not None and record.group != self.group:
            return False
        if self.profiles and record.profile not in self.profiles:
            return False
        if self.devices and record.device not in self.devices:
            return False
        return all(record.tags.get(key) == value for key, value in self.tags.items())

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "tags": dict(self.tags),
            "profiles": list(self.profiles),
            "devices": list(self.devices),
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> DeviceSelector:
        return cls(
            group=value.get("group"),
            tags=dict(value.get("tags") or {}),
            profiles=tuple(value.get("profiles") or ()),
            devices=tuple(value.get("devices") or ()),
        )


@dataclass(frozen=True)
class DeviceRecord:
    """One device as its retained status describes it."""

    device: str
    online: bool
    state: str
    profile: str
    group: str
    tags: Mapping[str, str]
    active: ActiveBundle | None
    previous: ActiveBundle | None
    rollout_id: str | None
    last_sequence: int
    agent_version: str
    last_seen: float

    @classmethod
    def from_status(cls, status: Status, *, received_at: float) -> DeviceRecord:
        return cls(
            device=status.device,
            online=status.online,
            state=status.state,
            profile=status.profile,
            group=status.group,
            tags=dict(status.tags),
            active=status.active,
            previous=status.previous,
            rollout_id=status.rollout_id,
            last_sequence=status.last_sequence,
            agent_version=status.agent_version,
            last_seen=status.ts or received_at,
        )

    def to_json(self) -> dict[str, Any]:
        def bundle(value: ActiveBundle | None) -> dict[str, str] | None:
            return (
                None
                if value is None
                else {
                    "name": value.name,
                    "version": value.version,
                    "sha256": value.sha256,
                }
            )

        return {
            "device": self.device,
            "online": self.online,
            "state": self.state,
            "profile": self.profile,
            "group": self.group,
            "tags": dict(self.tags),
            "active": bundle(self.active),
            "previous": bundle(self.previous),
            "rollout_id": self.rollout_id,
            "last_sequence": self.last_sequence,
            "agent_version": self.agent_version,
            "last_seen": self.last_seen,
        }


class DeviceRegistry:
    """The fleet's devices, kept up to date from status messages."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self._devices: dict[str, DeviceRecord] = {}
        self.invalid: dict[str, str] = {}  # device -> why its status was not understood

    def handle(self, message: Message) -> DeviceRecord | None:
        """Apply a `devices/<id>/status` message; returns the updated record, if any."""
        try:
            fleet, device, leaf = parse_device_topic(message.topic)
        except MessageError:
            return None
        if fleet != self.topics.fleet or leaf != "status":
            return None
        if not message.payload:  # retained status cleared: the device was removed
            self._devices.pop(device, None)
            return None
        try:
            status = Status.from_json(message.payload)
        except MessageError as e:
            self.invalid[device] = str(e)
            logger.warning("device %s: unreadable status: %s", device, e)
            return None
        if status.device != device:
            self.invalid[device] = f"status names device {status.device!r}"
            return None
        self.invalid.pop(device, None)
        record = DeviceRecord.from_status(status, received_at=message.received_at)
        known = self._devices.get(device)
        if not status.online and known is not None:
            # A last will (or any offline notice) says the device went away, not what it runs:
            # keep what the device itself last reported, change only online and last seen.
            record = dataclasses.replace(known, online=False, last_seen=record.last_seen)
        self._devices[device] = record
        return record

    def get(self, device: str) -> DeviceRecord | None:
        return self._devices.get(device)

    def devices(self, selector: DeviceSelector | None = None) -> list[DeviceRecord]:
        """Matching devices, sorted by id."""
        chosen = (r for r in self._devices.values() if selector is None or selector.matches(r))
        return sorted(chosen, key=lambda record: record.device)

    def __len__(self) -> int:
        return len(self._devices)


def load_registry(
    connection: FleetConnection, topics: Topics, *, quiet_s: float = 0.4, timeout_s: float = 10.0
) -> DeviceRegistry:
    """Subscribe to every device's status and build the registry from the retained messages."""
    registry = DeviceRegistry(topics)
    for message in connection.collect_retained(
        [topics.all_devices("status")], quiet_s=quiet_s, timeout_s=timeout_s
    ):
        registry.handle(message)
    return registry
