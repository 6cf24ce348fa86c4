"""MQTT topic names and filters: the one place the agent, the fleet controller, the simulator,
the monitor, the bundle transfer and the broker config build them.

Every topic lives under `edgekit/v1/<fleet>/` (DESIGN.md "Topics"). Client ids live here too:
every edgekit client connects with an id starting with `CLIENT_ID_PREFIX`; the broker config
`edgekit fleet broker-config` writes lets no other id in and refuses device ids with that
prefix, so a service account can never take over a device's session (a device's effective
client id is its user name, its device id). The message schemas and their total parsers are
in `edgekit.messages`. Pure module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from edgekit.messages import MessageError

__all__ = [
    "CLIENT_ID_PREFIX",
    "BundleTopics",
    "Topics",
    "check_identifier",
    "client_id",
    "identifier_problem",
    "parse_device_topic",
    "shared",
]

TOPIC_ROOT = "edgekit/v1"
CLIENT_ID_PREFIX = "edgekit-"
"""Every edgekit client id starts with this; device ids must not (see the module docstring)."""
MAX_IDENTIFIER = 128

# Fleet and device ids become topic levels and broker user names: no wildcards, separators,
# ':' (Mosquitto's password-file separator) or control characters.
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")

DeviceLeaf = Literal["status", "events", "telemetry", "desired"]


def identifier_problem(value: str) -> str | None:
    """Why `value` cannot be a fleet or device id (None if it can)."""
    if not value:
        return "it is empty"
    if len(value) > MAX_IDENTIFIER:
        return f"it has {len(value)} characters; at most {MAX_IDENTIFIER}"
    for bad, what in ((":", "':' (the broker's password-file separator)"), ("/", "'/'")):
        if bad in value:
            return f"it contains {what}"
    if "+" in value or "#" in value:
        return "it contains an MQTT wildcard ('+' or '#')"
    if not _IDENTIFIER.fullmatch(value):
        return "use letters, digits, '.', '_' or '-', starting with a letter or digit"
    return None


def check_identifier(value: str, *, what: str) -> str:
    """Return `value` if it can be an MQTT topic level for a fleet or device id."""
    problem = identifier_problem(value)
    if problem is not None:
        raise MessageError(
            f"{what} {value[:80]!r} is not a valid id: {problem} (1-{MAX_IDENTIFIER} letters, "
            "digits, '.', '_' or '-', starting with a letter or digit)"
        )
    return value


def client_id(role: str, name: str) -> str:
    """`edgekit-<role>-<name>`, at most 128 characters: the MQTT client id of an edgekit
    client (role: agent, sim, fleet, monitor, ...)."""
    return f"{CLIENT_ID_PREFIX}{role}-{name}"[:128]


def shared(group: str, topic_filter: str) -> str:
    """The MQTT 5 shared subscription `$share/<group>/<filter>`."""
    return f"$share/{check_identifier(group, what='shared subscription group')}/{topic_filter}"


@dataclass(frozen=True)
class BundleTopics:
    """The topics of one bundle under the `topic_prefix` a directive's MQTT source names."""

    prefix: str

    @property
    def meta(self) -> str:
        """Retained, QoS 1: a `BundleMeta` JSON message (published after the chunks)."""
        return f"{self.prefix}/meta"

    def chunk(self, index: int) -> str:
        """Retained, QoS 1: raw bytes `[index*chunk_size, (index+1)*chunk_size)` of the bundle."""
        if index < 0:
            raise MessageError(f"chunk index must be >= 0; found {index}")
        return f"{self.prefix}/chunks/{index}"

    @property
    def chunks(self) -> str:
        """The filter matching every chunk of the bundle."""
        return f"{self.prefix}/chunks/+"

    def chunk_index(self, topic: str) -> int:
        """The index of a chunk topic of this bundle; `MessageError` for anything else."""
        head, _, index = topic.rpartition("/")
        if (
            head != f"{self.prefix}/chunks"
            or not (index.isascii() and index.isdigit())
            or len(index) > 10
        ):
            raise MessageError(f"{topic[:200]!r} is not a chunk topic under {self.prefix}")
        return int(index)


@dataclass(frozen=True)
class Topics:
    """Topic names for one fleet (`edgekit/v1/<fleet>/...`)."""

    fleet: str

    def __post_init__(self) -> None:
        check_identifier(self.fleet, what="fleet")

    @property
    def prefix(self) -> str:
        return f"{TOPIC_ROOT}/{self.fleet}"

    def _device(self, device: str, leaf: str) -> str:
        return f"{self.prefix}/devices/{check_identifier(device, what='device')}/{leaf}"

    def status(self, device: str) -> str:
        """Retained, QoS 1, written by the agent (its last will says offline)."""
        return self._device(device, "status")

    def desired(self, device: str) -> str:
        """Retained, QoS 1, written by the fleet controller: a signed directive envelope."""
        return self._device(device, "desired")

    def events(self, device: str) -> str:
        """Not retained, QoS 1, written by the agent."""
        return self._device(device, "events")

    def telemetry(self, device: str) -> str:
        """Not retained, QoS 1 (0 allowed), written by the agent."""
        return self._device(device, "telemetry")

    def bench(self, device: str) -> str:
        """Not retained, QoS 1, written by the converter: a signed bench request envelope."""
        return self._device(device, "bench")

    def bench_result(self, device: str) -> str:
        """Not retained, QoS 1, written by the agent: the `Measurements` of a bench request."""
        return self._device(device, "bench/result")

    def trust(self) -> str:
        """Retained, QoS 1, written by the operator: the fleet's chain of signed trust store
        versions (`edgekit.trust.rotation.trust_message`)."""
        return f"{self.prefix}/trust"

    def bundle_prefix(self, sha256: str) -> str:
        """The `topic_prefix` a directive's MQTT source names for a bundle."""
        if not _SHA256.fullmatch(sha256):
            raise MessageError(f"bundle sha256 {sha256[:80]!r} is not 64 lowercase hex digits")
        return f"{self.prefix}/bundles/{sha256}"

    def bundle(self, sha256: str) -> BundleTopics:
        """The meta and chunk topics of bundle `sha256`."""
        return BundleTopics(self.bundle_prefix(sha256))

    @property
    def all_bundles(self) -> str:
        """The filter matching every bundle's meta and chunks."""
        return f"{self.prefix}/bundles/#"

    @property
    def everything(self) -> str:
        """The filter matching every topic of the fleet."""
        return f"{self.prefix}/#"

    def all_devices(self, leaf: DeviceLeaf) -> str:
        """The filter matching `leaf` of every device (controller, monitor, ACL)."""
        return f"{self.prefix}/devices/+/{leaf}"


def parse_device_topic(topic: str) -> tuple[str, str, str]:
    """Split `edgekit/v1/<fleet>/devices/<id>/<leaf>` into (fleet, device, leaf)."""
    parts = topic.split("/")
    if len(parts) != 6 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT or parts[3] != "devices":
        raise MessageError(f"topic {topic[:200]!r} is not an edgekit device topic", reason="topic")
    return parts[2], parts[4], parts[5]
