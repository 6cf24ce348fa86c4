"""The device registry, from retained status messages.

Every agent keeps a retained `devices/<id>/status` (its last will marks it offline), so a
client that subscribes to `devices/+/status` learns the whole fleet at once: id, online,
profile, group, tags, active bundle, updater state, last sequence and when it was last heard.
A status that does not parse, or names another device than its topic, is counted in
`rejected` (by reason) and leaves the device's record as it was. The operator's tools reach
the broker through `edgekit.mqtt` (`connect`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec

from edgekit.errors import EdgekitError
from edgekit.messages import BundleId, MessageError, Status
from edgekit.mqtt import BrokerSettings, Inbox, Message, MqttClient
from edgekit.topics import Topics, client_id, parse_device_topic

__all__ = [
    "DeviceRecord",
    "DeviceRegistry",
    "DeviceSelector",
    "fleet_client",
    "load_registry",
    "parse_tag",
]

logger = logging.getLogger(__name__)


def fleet_client(settings: BrokerSettings, *, role: str = "fleet") -> MqttClient:
    """A client for the operator's tools (id `edgekit-<role>-<random>`): `with` connects it."""
    return MqttClient(settings, client_id=client_id(role, uuid.uuid4().hex[:12]), max_inflight=200)


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
        return (
            (self.group is None or record.group == self.group)
            and (not self.profiles or record.profile in self.profiles)
            and (not self.devices or record.device in self.devices)
            and all(record.tags.get(key) == value for key, value in self.tags.items())
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
    active: BundleId | None
    previous: BundleId | None
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
        return cast("dict[str, Any]", msgspec.to_builtins(self))


class DeviceRegistry:
    """The fleet's devices, kept up to date from status messages."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self._devices: dict[str, DeviceRecord] = {}
        self.invalid: dict[str, str] = {}  # device -> why its status was not understood
        self.rejected: Counter[str] = Counter()  # MessageError reasons

    def handle(self, message: Message) -> DeviceRecord | None:
        """Apply a `devices/<id>/status` message; returns the updated record, if any.
        Never raises: a bad status is counted and leaves the device's record unchanged."""
        device = None
        try:
            fleet, device, leaf = parse_device_topic(message.topic)
            if fleet != self.topics.fleet or leaf != "status":
                return None
            if not message.payload:  # retained status cleared: the device was removed
                self._devices.pop(device, None)
                return None
            status = Status.from_json(message.payload)
            if status.device != device or status.fleet != fleet:
                raise MessageError(
                    f"status on {message.topic} names device {status.device!r} of fleet "
                    f"{status.fleet!r}",
                    reason="mismatch",
                )
        except MessageError as e:
            self.rejected[e.reason] += 1
            if device is not None:  # the topic named a device: its status is unreadable
                self.invalid[device] = str(e)
                logger.debug("device %s: unreadable status: %s", device, e)
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
    client: MqttClient, topics: Topics, *, quiet_s: float = 0.4, timeout_s: float = 10.0
) -> DeviceRegistry:
    """Subscribe to every device's status and build the registry from the retained messages."""
    registry = DeviceRegistry(topics)
    for message in Inbox(client).collect_retained(
        [topics.all_devices("status")], quiet_s=quiet_s, timeout_s=timeout_s, keep=False
    ):
        registry.handle(message)
    return registry


def wait_until_online(
    client: MqttClient,
    registry: DeviceRegistry,
    selector: DeviceSelector,
    count: int,
    *,
    timeout_s: float,
    say: Callable[[str], None],
) -> int:
    """Follow the status topic until `count` selected devices are online or `timeout_s`
    passes, telling `say` how many are online so far and until when it waits; returns how
    many are online. Messages are applied on the caller's thread (an `Inbox`)."""

    def online() -> int:
        return sum(1 for record in registry.devices(selector) if record.online)

    deadline = time.monotonic() + timeout_s
    clock = time.strftime("%H:%M:%S", time.localtime(time.time() + timeout_s))
    inbox = Inbox(client)
    inbox.subscribe([registry.topics.all_devices("status")], keep=False)
    said = -1
    while (now_online := online()) < count and time.monotonic() < deadline:
        if now_online != said:
            say(f"waiting for {count} devices online: {now_online} so far (until {clock})")
            said = now_online
        for message in inbox.drain(timeout_s=0.2):
            registry.handle(message)
    return now_online
