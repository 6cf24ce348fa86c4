"""`edgekit monitor`: a Prometheus exporter fed by the fleet's MQTT topics.

The exporter subscribes with MQTT 5 shared subscriptions
(`$share/<group>/edgekit/v1/<fleet>/devices/+/telemetry` and `.../events`), so several
exporters with the same group split the message load: each sees a share of the devices'
messages, and Prometheus sums the counters over the exporters. Status messages are small and
retained, and a shared subscription never receives retained messages (MQTT 5, 4.8.2), so
status is read with a plain subscription by default: every exporter knows every device's
online flag, state and version (use `max without (instance)` on those gauges when several
exporters run). `status_shared=True` shares status too.

Metrics are produced by a custom collector from per-device records, labelled by device,
profile, group, model version and rollout. Counters restart per (device, version, rollout)
series, the Prometheus way for labels that change. A device silent for `forget_after_s`
disappears from the output unless it has a retained status (then it stays, as a registry
entry, until its status is cleared), and so do its series for versions it no longer runs and
event counts not updated in that time: label cardinality stays bounded by the fleet, not by
its history. See docs/monitor.md.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgekit.errors import EdgekitError, TransportError
from edgekit.fleet.registry import BrokerAddress, as_broker_address
from edgekit.topics import (
    AGENT_STATES,
    EVENT_KINDS,
    Event,
    MessageError,
    Status,
    Telemetry,
    Topics,
    check_identifier,
    parse_device_topic,
)

__all__ = [
    "COUNTER_NAMES",
    "DEFAULT_GROUP",
    "GAUGE_NAMES",
    "METRIC_NAMES",
    "FleetMonitor",
    "MonitorError",
    "parse_listen",
]

log = logging.getLogger(__name__)

DEFAULT_GROUP = "edgekit-monitor"
_QUANTILES = {"p50": "0.5", "p95": "0.95", "p99": "0.99"}
_BASE_LABELS = ("fleet", "device", "profile", "group")
_DEVICE_LABELS = (*_BASE_LABELS, "version", "rollout")

# name -> help. Counters are exposed with the `_total` suffix.
_COUNTERS = {
    "edgekit_inference_requests": "Inference requests devices served (from telemetry).",
    "edgekit_inference_errors": "Inference requests that failed on devices (from telemetry).",
    "edgekit_telemetry_messages": "Telemetry messages ingested, per device series.",
    "edgekit_update_events": "Update lifecycle events by kind (devices/<id>/events).",
    "edgekit_monitor_messages": "MQTT messages this exporter ingested, by topic kind.",
    "edgekit_monitor_invalid_messages": "MQTT messages this exporter could not parse.",
}
_GAUGES = {
    "edgekit_inference_latency_seconds": "Inference latency quantiles over the last interval.",
    "edgekit_device_cpu_percent": "CPU use reported by the device.",
    "edgekit_device_rss_bytes": "Resident memory of the agent and runtime.",
    "edgekit_device_temperature_celsius": "Device temperature.",
    "edgekit_model_drift_psi": "Input drift (population stability index) vs reference stats.",
    "edgekit_telemetry_dropped_messages": "Telemetry the device discarded since it started.",
    "edgekit_telemetry_sequence": "Highest telemetry seq seen from the device (lost messages: "
    "this minus the sum of edgekit_telemetry_messages_total over exporters).",
    "edgekit_device_online": "1 if the device's retained status says online.",
    "edgekit_device_state": "1 for the device's current updater state.",
    "edgekit_device_info": "1 per device, labelled with what its status says.",
    "edgekit_device_last_sequence": "Highest directive sequence the device accepted.",
    "edgekit_device_last_seen_timestamp_seconds": "When the exporter last heard from the device.",
    "edgekit_monitor_connected": "1 while the exporter is connected to the broker.",
    "edgekit_monitor_devices": "Devices this exporter currently tracks.",
}
COUNTER_NAMES: tuple[str, ...] = tuple(f"{name}_total" for name in _COUNTERS)
GAUGE_NAMES: tuple[str, ...] = tuple(_GAUGES)
METRIC_NAMES: tuple[str, ...] = COUNTER_NAMES + GAUGE_NAMES
"""Every sample name the exporter exposes (dashboards may use only these)."""


def _counter(name: str, labels: tuple[str, ...]) -> CounterMetricFamily:
    return CounterMetricFamily(name, _COUNTERS[name], labels=labels)


def _gauge(name: str, labels: tuple[str, ...]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, _GAUGES[name], labels=labels)


class MonitorError(EdgekitError):
    """The exporter cannot start as asked (listen address, broker, options)."""


def parse_listen(value: str) -> tuple[str, int]:
    """`:9108`, `9108` or `127.0.0.1:9108` -> (address, port); no address means all."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = "", value
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise MonitorError(f"--listen {value!r}: expected [ADDRESS]:PORT, e.g. :9108")
    # An exporter is scraped from another host: no address means every interface.
    return host.strip("[]") or "0.0.0.0", port  # noqa: S104


@dataclass
class _Series:
    """Counters of one (version, rollout) a device ran."""

    requests: int = 0
    errors: int = 0
    telemetry: int = 0
    updated: float = 0.0


@dataclass
class _Device:
    device: str
    profile: str = ""
    group: str = ""
    status: Status | None = None
    telemetry: Telemetry | None = None
    last_seen: float = 0.0
    last_seq: int | None = None
    series: dict[tuple[str, str], _Series] = field(default_factory=dict)
    # (kind, version, rollout) -> [count, last update]
    events: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)


class _FleetCollector(Collector):
    def __init__(self, monitor: FleetMonitor) -> None:
        self._monitor = monitor

    def collect(self) -> Iterable[Metric]:
        return self._monitor._collect()


class FleetMonitor:
    """Subscribes to a fleet's telemetry, events and status and exposes Prometheus metrics.

    `start()` connects (background network thread) and, with `listen`, serves `/metrics`.
    `registry` holds the metrics for embedding in another server.
    """

    def __init__(
        self,
        broker: BrokerAddress | str,
        fleet: str,
        *,
        group: str = DEFAULT_GROUP,
        username: str | None = None,
        password: str | None = None,
        status_shared: bool = False,
        forget_after_s: float = 3600.0,
        client_id: str | None = None,
    ) -> None:
        self.broker = as_broker_address(broker)
        self.topics = Topics(fleet)
        self.fleet = fleet
        try:
            self.group = check_identifier(group, what="shared subscription group")
        except MessageError as error:
            raise MonitorError(str(error)) from None
        self.status_shared = status_shared
        self.forget_after_s = forget_after_s
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_FleetCollector(self))
        self._lock = threading.Lock()
        self._devices: dict[str, _Device] = {}
        self._ingested: dict[str, int] = {"telemetry": 0, "events": 0, "status": 0}
        self._invalid: dict[str, int] = {"telemetry": 0, "events": 0, "status": 0}
        self._connected = threading.Event()
        self._refused: str | None = None
        self._server: Any = None
        self._started = False
        self._server_thread: threading.Thread | None = None
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"{group}-{socket.gethostname()}-{id(self):x}"[:128],
            protocol=mqtt.MQTTv5,
        )
        user = username if username is not None else self.broker.username
        secret = password if password is not None else self.broker.password
        if user is not None:
            self.client.username_pw_set(user, secret)
        if self.broker.tls:
            self.client.tls_set(ca_certs=str(self.broker.ca_file) if self.broker.ca_file else None)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # -- subscriptions

    def subscriptions(self) -> list[str]:
        """The topic filters this exporter subscribes to."""
        shared = f"$share/{self.group}/"
        filters = [
            shared + self.topics.all_devices("telemetry"),
            shared + self.topics.all_devices("events"),
        ]
        status = self.topics.all_devices("status")
        filters.append(shared + status if self.status_shared else status)
        return filters

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            log.error("broker %s refused the monitor: %s", self.broker.url, reason)
            return
        client.subscribe([(topic, 1) for topic in self.subscriptions()])
        self._connected.set()
        log.info("monitoring fleet %s on %s", self.fleet, self.broker.url)

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self._connected.clear()
        log.warning("monitor disconnected from %s: %s", self.broker.url, reason)

    # -- ingest

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            fleet, device_id, leaf = parse_device_topic(message.topic)
        except MessageError:
            return
        if fleet != self.fleet or leaf not in self._ingested:
            return
        if not message.payload:
            if leaf == "status":  # retained status cleared: the device was deregistered
                with self._lock:
                    self._devices.pop(device_id, None)
            return
        try:
            self.ingest(leaf, device_id, bytes(message.payload))
        except MessageError as error:
            with self._lock:
                self._invalid[leaf] += 1
            log.debug("ignoring %s from %s: %s", leaf, device_id, error)

    def ingest(
        self, leaf: str, device_id: str, payload: bytes, *, now: float | None = None
    ) -> None:
        """Account one message (`leaf`: telemetry, events or status); bad payloads raise."""
        now = time.time() if now is None else now
        if leaf == "telemetry":
            telemetry = Telemetry.from_json(payload)
            with self._lock:
                record = self._record(device_id, now)
                self._ingested["telemetry"] += 1
                self._add_telemetry(record, telemetry, now)
        elif leaf == "events":
            event = Event.from_json(payload)
            kind = event.kind if event.kind in EVENT_KINDS else "other"
            key = (kind, event.bundle.version if event.bundle else "", event.rollout_id or "")
            with self._lock:
                record = self._record(device_id, now)
                self._ingested["events"] += 1
                counted = record.events.setdefault(key, [0, now])
                counted[0] += 1
                counted[1] = now
        elif leaf == "status":
            status = Status.from_json(payload)
            with self._lock:
                record = self._record(device_id, now)
                self._ingested["status"] += 1
                record.status = status
                record.profile = status.profile or record.profile
                record.group = status.group or record.group

    def _record(self, device_id: str, now: float) -> _Device:
        record = self._devices.get(device_id)
        if record is None:
            record = self._devices[device_id] = _Device(device_id)
        record.last_seen = max(record.last_seen, now)
        return record

    @staticmethod
    def _add_telemetry(record: _Device, telemetry: Telemetry, now: float) -> None:
        version = telemetry.bundle.version if telemetry.bundle else ""
        key = (version, telemetry.rollout_id or "")
        series = record.series.get(key)
        if series is None:
            series = record.series[key] = _Series()
        series.requests += max(0, telemetry.requests)
        series.errors += max(0, telemetry.errors)
        series.telemetry += 1
        series.updated = now
        # Shared subscriptions spread one device's messages over the exporters, so a gap
        # in seq here is not a loss: expose the highest seq and let PromQL compare it
        # with the messages summed over exporters. A lower seq means the agent restarted.
        if record.last_seq is None or telemetry.seq < record.last_seq - 1000:
            record.last_seq = telemetry.seq
        else:
            record.last_seq = max(record.last_seq, telemetry.seq)
        record.telemetry = telemetry

    # -- collect

    def _labels(self, record: _Device, version: str, rollout: str) -> list[str]:
        return [self.fleet, record.device, record.profile, record.group, version, rollout]

    def _forget(self, now: float) -> None:
        if self.forget_after_s <= 0:
            return
        horizon = now - self.forget_after_s
        # A device with a retained status stays (it is in the registry, maybe offline); one
        # known only from telemetry or events is forgotten when it falls silent.
        silent = [d for d, r in self._devices.items() if r.last_seen < horizon and r.status is None]
        for device_id in silent:
            del self._devices[device_id]
        for record in self._devices.values():
            current = None
            if record.telemetry is not None:
                bundle = record.telemetry.bundle
                current = (bundle.version if bundle else "", record.telemetry.rollout_id or "")
            for key in [k for k, s in record.series.items() if s.updated < horizon]:
                if key != current:
                    del record.series[key]
            for event_key in [k for k, v in record.events.items() if v[1] < horizon]:
                del record.events[event_key]

    def _collect(self) -> Iterator[Metric]:
        now = time.time()
        counters = {
            name: _counter(name, _DEVICE_LABELS)
            for name in _COUNTERS
            if name.startswith(("edgekit_inference", "edgekit_telemetry"))
        }
        events = _counter("edgekit_update_events", (*_BASE_LABELS, "kind", "version", "rollout"))
        gauge_names = (
            "edgekit_device_cpu_percent",
            "edgekit_device_rss_bytes",
            "edgekit_device_temperature_celsius",
            "edgekit_model_drift_psi",
            "edgekit_telemetry_dropped_messages",
        )
        gauges = {name: _gauge(name, _DEVICE_LABELS) for name in gauge_names}
        latency = _gauge("edgekit_inference_latency_seconds", (*_DEVICE_LABELS, "quantile"))
        online = _gauge("edgekit_device_online", _BASE_LABELS)
        state = _gauge("edgekit_device_state", (*_BASE_LABELS, "state"))
        info = _gauge("edgekit_device_info", (*_DEVICE_LABELS, "state", "agent_version"))
        sequence = _gauge("edgekit_device_last_sequence", _BASE_LABELS)
        seen = _gauge("edgekit_device_last_seen_timestamp_seconds", _BASE_LABELS)
        telemetry_sequence = _gauge("edgekit_telemetry_sequence", _BASE_LABELS)
        ingested = _counter("edgekit_monitor_messages", ("fleet", "kind"))
        invalid = _counter("edgekit_monitor_invalid_messages", ("fleet", "kind"))
        with self._lock:
            self._forget(now)
            for record in self._devices.values():
                base = [self.fleet, record.device, record.profile, record.group]
                for (version, rollout), series in record.series.items():
                    labels = self._labels(record, version, rollout)
                    counters["edgekit_inference_requests"].add_metric(labels, series.requests)
                    counters["edgekit_inference_errors"].add_metric(labels, series.errors)
                    counters["edgekit_telemetry_messages"].add_metric(labels, series.telemetry)
                for (kind, version, rollout), (count, _updated) in record.events.items():
                    events.add_metric([*base, kind, version, rollout], count)
                telemetry = record.telemetry
                if telemetry is not None:
                    version = telemetry.bundle.version if telemetry.bundle else ""
                    labels = self._labels(record, version, telemetry.rollout_id or "")
                    for key, quantile in _QUANTILES.items():
                        if key in telemetry.latency_ms:
                            latency.add_metric(
                                [*labels, quantile], telemetry.latency_ms[key] / 1000.0
                            )
                    values = (
                        telemetry.cpu_percent,
                        telemetry.rss_bytes,
                        telemetry.temperature_c,
                        telemetry.drift_psi,
                        telemetry.dropped,
                    )
                    for name, value in zip(gauge_names, values, strict=True):
                        if value is not None:
                            gauges[name].add_metric(labels, float(value))
                seen.add_metric(base, record.last_seen)
                if record.last_seq is not None:
                    telemetry_sequence.add_metric(base, record.last_seq)
                status = record.status
                if status is not None:
                    version = status.active.version if status.active else ""
                    online.add_metric(base, 1.0 if status.online else 0.0)
                    state_name = status.state if status.state in AGENT_STATES else "other"
                    state.add_metric([*base, state_name], 1.0)
                    info.add_metric(
                        [*base, version, status.rollout_id or "", state_name, status.agent_version],
                        1.0,
                    )
                    sequence.add_metric(base, status.last_sequence)
            for kind in sorted(self._ingested):
                ingested.add_metric([self.fleet, kind], self._ingested[kind])
                invalid.add_metric([self.fleet, kind], self._invalid[kind])
            tracked = len(self._devices)
        yield from counters.values()
        yield events
        yield latency
        yield from gauges.values()
        yield from (online, state, info, sequence, seen, telemetry_sequence, ingested, invalid)
        connected = _gauge("edgekit_monitor_connected", ("fleet",))
        connected.add_metric([self.fleet], 1.0 if self._connected.is_set() else 0.0)
        devices = _gauge("edgekit_monitor_devices", ("fleet",))
        devices.add_metric([self.fleet], tracked)
        yield connected
        yield devices

    # -- life cycle

    @property
    def ingested(self) -> dict[str, int]:
        """Messages ingested so far, by topic kind."""
        with self._lock:
            return dict(self._ingested)

    def start(
        self, *, listen: tuple[str, int] | None = None, timeout_s: float = 10.0
    ) -> FleetMonitor:
        """Connect and subscribe (waits up to `timeout_s`); with `listen`, serve /metrics."""
        if self._started:
            return self
        self._started = True
        try:
            self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        except OSError as error:
            self._started = False
            raise TransportError(
                f"cannot reach the broker at {self.broker.url}: {error}; check --broker"
            ) from None
        self.client.loop_start()
        deadline = time.monotonic() + timeout_s
        while not self._connected.wait(timeout=0.05):
            if self._refused is not None or time.monotonic() > deadline:
                self.client.loop_stop()
                self._started = False
                raise TransportError(
                    f"broker {self.broker.url} did not accept the monitor "
                    f"({self._refused or 'no answer'}): check the monitor account's password"
                )
        if listen is not None:
            try:
                self._server, self._server_thread = start_http_server(
                    listen[1], addr=listen[0], registry=self.registry
                )
            except OSError as error:
                self.stop()
                raise MonitorError(
                    f"cannot listen on {listen[0]}:{listen[1]}: {error.strerror}; pick another "
                    "--listen port"
                ) from None
        return self

    @property
    def port(self) -> int | None:
        """The HTTP port actually bound (useful with port 0)."""
        return None if self._server is None else int(self._server.server_port)

    def stop(self) -> None:
        """Stop serving and disconnect; idempotent."""
        self._started = False
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> FleetMonitor:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
