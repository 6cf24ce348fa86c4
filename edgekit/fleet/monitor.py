"""`edgekit monitor`: a Prometheus exporter fed by the fleet's MQTT topics (docs/monitor.md).

Telemetry and events arrive over MQTT 5 shared subscriptions, so exporters with one group split
the load and Prometheus sums their counters. A shared subscription never receives retained
messages (MQTT 5, 4.8.2), so status has a plain subscription unless `status_shared=True`: every
exporter knows every device's online flag, state and version (use `max without (instance)`).

A custom collector builds the metrics from per-device records. Label cardinality stays bounded
by the fleet, not by its history: devices, series and event counts silent for `forget_after_s`
are forgotten (a device with a retained status stays until the status is cleared), and a
device's (version, rollout) pairs beyond `max_series_per_device` fold into `other`. Payloads the
total parsers of `edgekit.messages` refuse are counted by kind and reason, never fatal.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from edgekit.errors import EdgekitError
from edgekit.messages import AGENT_STATES, EVENT_KINDS, Event, MessageError, Status, Telemetry
from edgekit.mqtt import BrokerSettings, Message, MqttClient
from edgekit.topics import Topics, check_identifier, client_id, parse_device_topic, shared

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
OTHER = "other"
"""The label value that label values beyond a device's bounded set fold into."""
_BASE_LABELS = ("fleet", "device", "profile", "group")
_DEVICE_LABELS = (*_BASE_LABELS, "version", "rollout")

# name -> help. Counters are exposed with the `_total` suffix.
_COUNTERS = {
    "edgekit_inference_requests": "Inference requests devices served (from telemetry).",
    "edgekit_inference_errors": "Inference requests that failed on devices (from telemetry).",
    "edgekit_telemetry_messages": "Telemetry messages ingested, per device series.",
    "edgekit_update_events": "Update lifecycle events by kind (devices/<id>/events).",
    "edgekit_monitor_messages": "MQTT messages this exporter ingested, by topic kind.",
    "edgekit_monitor_rejected_messages": "MQTT messages this exporter refused, by kind and "
    "reason (too_large, too_deep, not_json, schema, invalid, mismatch, topic).",
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


# Telemetry gauges: metric -> Telemetry attribute.
_TELEMETRY_GAUGES = {
    "edgekit_device_cpu_percent": "cpu_percent",
    "edgekit_device_rss_bytes": "rss_bytes",
    "edgekit_device_temperature_celsius": "temperature_c",
    "edgekit_model_drift_psi": "drift_psi",
    "edgekit_telemetry_dropped_messages": "dropped",
}
# The topic kinds the exporter ingests -> their parser.
_PARSERS: dict[str, type[Telemetry | Event | Status]] = {
    "telemetry": Telemetry,
    "events": Event,
    "status": Status,
}


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
    # (version, rollout) label pairs in use -> when last used (bounded per device)
    labels: dict[tuple[str, str], float] = field(default_factory=dict)


class FleetMonitor:
    """Subscribes to a fleet's telemetry, events and status and exposes Prometheus metrics.

    `start()` connects (background network thread) and, with `listen`, serves `/metrics`.
    `registry` holds the metrics for embedding in another server.
    """

    def __init__(
        self,
        broker: BrokerSettings | str,
        fleet: str,
        *,
        group: str = DEFAULT_GROUP,
        username: str | None = None,
        password: str | None = None,
        status_shared: bool = False,
        forget_after_s: float = 3600.0,
        max_series_per_device: int = 8,
        client_id: str | None = None,
    ) -> None:
        settings = broker if isinstance(broker, BrokerSettings) else BrokerSettings(broker)
        if username is not None:
            settings = settings.replace(username=username, password=password)
        self.broker = settings
        self.topics = Topics(fleet)
        self.fleet = fleet
        try:
            self.group = check_identifier(group, what="shared subscription group")
        except MessageError as error:
            raise MonitorError(str(error)) from None
        if max_series_per_device < 1:
            raise MonitorError("max_series_per_device must be at least 1")
        self.status_shared = status_shared
        self.forget_after_s = forget_after_s
        self.max_series_per_device = max_series_per_device
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._lock = threading.Lock()
        self._devices: dict[str, _Device] = {}
        self._ingested: dict[str, int] = dict.fromkeys(_PARSERS, 0)
        self._rejected: Counter[tuple[str, str]] = Counter()  # (kind, reason)
        self._server: Any = None
        self._started = False
        name = client_id or _default_client_id(group, self)
        self.client = MqttClient(self.broker, client_id=name, max_inflight=64)

    # -- subscriptions

    def subscriptions(self) -> list[str]:
        """The topic filters this exporter subscribes to."""
        status = self.topics.all_devices("status")
        return [
            shared(self.group, self.topics.all_devices("telemetry")),
            shared(self.group, self.topics.all_devices("events")),
            shared(self.group, status) if self.status_shared else status,
        ]

    # -- ingest

    def _on_message(self, message: Message) -> None:
        """The client's handler: refusals are counted here by kind and reason, then re-raised
        for the client's guard (which logs them, rate-limited, and keeps the loop alive)."""
        kind = "other"
        try:
            fleet, device_id, kind = parse_device_topic(message.topic)
            if fleet != self.fleet or kind not in self._ingested:
                raise MessageError(f"not a monitored topic: {message.topic[:200]}", reason="topic")
            if not message.payload:
                if kind == "status":  # retained status cleared: the device was deregistered
                    with self._lock:
                        self._devices.pop(device_id, None)
                return
            self.ingest(kind, device_id, message.payload)
        except MessageError as error:
            with self._lock:
                self._rejected[(kind if kind in self._ingested else "other", error.reason)] += 1
            raise

    def ingest(
        self, leaf: str, device_id: str, payload: bytes, *, now: float | None = None
    ) -> None:
        """Account one message (`leaf`: telemetry, events or status); a bad payload raises
        `MessageError` and changes nothing."""
        now = time.time() if now is None else now
        parser = _PARSERS.get(leaf)
        if parser is None:
            return
        message = parser.from_json(payload)
        if message.device != device_id or message.fleet != self.fleet:
            raise MessageError(
                f"message on {device_id}'s topic names device {message.device!r} of fleet "
                f"{message.fleet!r}",
                reason="mismatch",
            )
        with self._lock:
            record = self._record(device_id, now)
            self._ingested[leaf] += 1
            if isinstance(message, Telemetry):
                self._add_telemetry(record, message, now)
            elif isinstance(message, Event):
                version, rollout = self._label_pair(record, _labelled(message), now)
                kind = message.kind if message.kind in EVENT_KINDS else OTHER
                counted = record.events.setdefault((kind, version, rollout), [0, now])
                counted[0] += 1
                counted[1] = now
            else:
                record.status = message
                record.profile = message.profile or record.profile
                record.group = message.group or record.group

    def _record(self, device_id: str, now: float) -> _Device:
        record = self._devices.get(device_id)
        if record is None:
            record = self._devices[device_id] = _Device(device_id)
        record.last_seen = max(record.last_seen, now)
        return record

    def _label_pair(self, record: _Device, key: tuple[str, str], now: float) -> tuple[str, str]:
        """(version, rollout) as labels: the pair itself while the device uses fewer than
        `max_series_per_device` pairs, else `other` (lock held)."""
        if key in record.labels or len(record.labels) < self.max_series_per_device:
            record.labels[key] = now
            return key
        return (OTHER, OTHER)

    def _add_telemetry(self, record: _Device, telemetry: Telemetry, now: float) -> None:
        key = self._label_pair(record, _labelled(telemetry), now)
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
            current = None if record.telemetry is None else _labelled(record.telemetry)
            for key in [k for k, s in record.series.items() if s.updated < horizon]:
                if key != current:
                    del record.series[key]
            for event_key in [k for k, v in record.events.items() if v[1] < horizon]:
                del record.events[event_key]
            in_use = set(record.series) | {(v, r) for _kind, v, r in record.events}
            for pair in [p for p, used in record.labels.items() if used < horizon]:
                if pair not in in_use and pair != current:
                    del record.labels[pair]

    def collect(self) -> Iterator[Metric]:
        """Every metric, from the devices' records (the registry calls this per scrape)."""
        now = time.time()
        counters = {
            name: _counter(name, _DEVICE_LABELS)
            for name in _COUNTERS
            if name.startswith(("edgekit_inference", "edgekit_telemetry"))
        }
        events = _counter("edgekit_update_events", (*_BASE_LABELS, "kind", "version", "rollout"))
        gauges = {name: _gauge(name, _DEVICE_LABELS) for name in _TELEMETRY_GAUGES}
        latency = _gauge("edgekit_inference_latency_seconds", (*_DEVICE_LABELS, "quantile"))
        online = _gauge("edgekit_device_online", _BASE_LABELS)
        state = _gauge("edgekit_device_state", (*_BASE_LABELS, "state"))
        info = _gauge("edgekit_device_info", (*_DEVICE_LABELS, "state", "agent_version"))
        sequence = _gauge("edgekit_device_last_sequence", _BASE_LABELS)
        seen = _gauge("edgekit_device_last_seen_timestamp_seconds", _BASE_LABELS)
        telemetry_sequence = _gauge("edgekit_telemetry_sequence", _BASE_LABELS)
        ingested = _counter("edgekit_monitor_messages", ("fleet", "kind"))
        rejected = _counter("edgekit_monitor_rejected_messages", ("fleet", "kind", "reason"))
        with self._lock:
            self._forget(now)
            for record in self._devices.values():
                base = [self.fleet, record.device, record.profile, record.group]
                for (version, rollout), series in record.series.items():
                    labels = [*base, version, rollout]
                    counters["edgekit_inference_requests"].add_metric(labels, series.requests)
                    counters["edgekit_inference_errors"].add_metric(labels, series.errors)
                    counters["edgekit_telemetry_messages"].add_metric(labels, series.telemetry)
                for (kind, version, rollout), (count, _updated) in record.events.items():
                    events.add_metric([*base, kind, version, rollout], count)
                telemetry = record.telemetry
                if telemetry is not None:
                    pair = _labelled(telemetry)
                    if pair not in record.labels:  # folded into `other`
                        pair = (OTHER, OTHER)
                    labels = [*base, *pair]
                    for key, quantile in _QUANTILES.items():
                        if key in telemetry.latency_ms:
                            latency.add_metric(
                                [*labels, quantile], telemetry.latency_ms[key] / 1000.0
                            )
                    for name, attribute in _TELEMETRY_GAUGES.items():
                        value = getattr(telemetry, attribute)
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
            for (kind, reason), count in sorted(self._rejected.items()):
                rejected.add_metric([self.fleet, kind, reason], count)
            tracked = len(self._devices)
        connected = _gauge("edgekit_monitor_connected", ("fleet",))
        connected.add_metric([self.fleet], 1.0 if self.client.connected else 0.0)
        devices = _gauge("edgekit_monitor_devices", ("fleet",))
        devices.add_metric([self.fleet], tracked)
        yield from counters.values()
        yield from (events, latency)
        yield from gauges.values()
        yield from (online, state, info, sequence, seen, telemetry_sequence, ingested, rejected)
        yield from (connected, devices)

    # -- life cycle

    @property
    def ingested(self) -> dict[str, int]:
        """Messages ingested so far, by topic kind."""
        with self._lock:
            return dict(self._ingested)

    @property
    def rejected(self) -> dict[tuple[str, str], int]:
        """Messages refused so far, by (kind, reason)."""
        with self._lock:
            return dict(self._rejected)

    def start(
        self, *, listen: tuple[str, int] | None = None, timeout_s: float = 10.0
    ) -> FleetMonitor:
        """Connect and subscribe (waits up to `timeout_s`); with `listen`, serve /metrics."""
        if self._started:
            return self
        self._started = True
        self.client.subscribe(self.subscriptions(), self._on_message)
        try:
            self.client.connect(timeout_s=timeout_s)
        except EdgekitError:
            self._started = False
            raise
        log.info("monitoring fleet %s on %s", self.fleet, self.broker.endpoint)
        if listen is not None:
            try:
                self._server, _thread = start_http_server(
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
        self.client.stop()

    def __enter__(self) -> FleetMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _labelled(message: Telemetry | Event) -> tuple[str, str]:
    """The (version, rollout) a message is about; "" for none."""
    return (message.bundle.version if message.bundle else "", message.rollout_id or "")


def _default_client_id(group: str, monitor: object) -> str:
    return client_id("monitor", f"{group}-{socket.gethostname()}-{id(monitor):x}")
