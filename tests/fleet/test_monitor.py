"""`edgekit monitor` against a real Mosquitto and simulated devices: what Prometheus scrapes
over HTTP equals what the devices sent, and exporters in one group split the load."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgekit.fleet.monitor import METRIC_NAMES, FleetMonitor, MonitorError, parse_listen
from edgekit.fleet.simulate import Faults, SimulatedFleet
from edgekit.messages import MessageError
from edgekit.mosquitto import MosquittoBroker
from edgekit.topics import Topics
from tests.fleet.tools_helpers import (
    make_bundle,
    make_keys,
    operator_client,
    publish,
    send_directives,
    wait_for,
)

FLEET = "mon-test"
TOPICS = Topics(FLEET)
DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "grafana-edgekit.json"


def _scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """name -> [(labels, value)] from the exporter's /metrics over HTTP."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _total(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **match: str
) -> float:
    return sum(
        value
        for labels, value in samples.get(name, [])
        if all(labels.get(k) == v for k, v in match.items())
    )


def test_parse_listen() -> None:
    assert parse_listen(":9108") == ("0.0.0.0", 9108)
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    with pytest.raises(MonitorError):
        parse_listen("host:http")


def test_exporter_counters_equal_what_devices_sent(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    keys = make_keys()
    v1 = make_bundle(tmp_path, keys, version="1.0.0")
    v2 = make_bundle(tmp_path, keys, version="2.0.0")
    with (
        FleetMonitor(mosquitto.url, FLEET).start(listen=("127.0.0.1", 0)) as monitor,
        SimulatedFleet(
            mosquitto.url,
            FLEET,
            12,
            trust_store=keys.truststore,
            initial_bundle=v1.active,
            faults=Faults(fail_health=0.25, seed=4),
            telemetry_interval_s=0.1,
        ) as sim,
        operator_client(mosquitto.host, mosquitto.port) as client,
    ):
        assert monitor.port is not None
        wait_for(lambda: monitor.ingested["telemetry"] >= 24, what="first telemetry")
        publish(client, TOPICS, v2)
        send_directives(
            client,
            keys,
            TOPICS,
            sim.devices,
            v2,
            sequence=1,
            rollout_id="r-mon",
        )
        wait_for(lambda: sum(len(d.history) for d in sim.devices.values()) == 12, what="outcomes")
        wait_for(lambda: monitor.ingested["telemetry"] >= 100, what="more telemetry")
        sim.set_telemetry_interval(0)  # quiesce, then compare exactly
        sim.wait_idle()
        sent = sim.sent()

        def caught_up() -> bool:
            ingested = monitor.ingested
            return ingested["telemetry"] == sent.telemetry and ingested["events"] == sum(
                sent.events.values()
            )

        wait_for(caught_up, what="exporter caught up")
        samples = _scrape(monitor.port)
        assert _total(samples, "edgekit_telemetry_messages_total") == sent.telemetry
        assert _total(samples, "edgekit_inference_requests_total") == sent.requests > 0
        assert _total(samples, "edgekit_inference_errors_total") == sent.errors
        for kind, count in sent.events.items():
            assert _total(samples, "edgekit_update_events_total", kind=kind) == count, kind
        # Per device, too.
        for device_id, counts in sim.sent_by_device().items():
            assert (
                _total(samples, "edgekit_inference_requests_total", device=device_id)
                == counts.requests
            )
        # Series are labelled by version and rollout: v2 requests only on committed devices.
        failing = set(sim.device_ids(fault="fail_health"))
        v2_devices = {
            labels["device"]
            for labels, value in samples["edgekit_inference_requests_total"]
            if labels["version"] == "2.0.0" and value > 0
        }
        assert v2_devices and v2_devices.isdisjoint(failing)
        assert _total(samples, "edgekit_update_events_total", kind="rolled_back") == len(failing)
        states = Counter(labels["state"] for labels, _ in samples["edgekit_device_state"])
        assert states == {"committed": 12 - len(failing), "rolled_back": len(failing)}
        assert _total(samples, "edgekit_device_online") == 12
        quantiles = {
            labels["quantile"] for labels, _ in samples["edgekit_inference_latency_seconds"]
        }
        assert quantiles == {"0.5", "0.95", "0.99"}
        assert set(samples) <= set(METRIC_NAMES) | {
            name.removesuffix("_total") + "_created" for name in METRIC_NAMES
        }


def test_two_exporters_split_the_load(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    keys = make_keys()
    with (
        FleetMonitor(mosquitto.url, FLEET, group="g1").start() as first,
        FleetMonitor(mosquitto.url, FLEET, group="g1").start() as second,
        SimulatedFleet(
            mosquitto.url, FLEET, 6, trust_store=keys.truststore, telemetry_interval_s=0.05
        ) as sim,
    ):
        wait_for(
            lambda: first.ingested["telemetry"] + second.ingested["telemetry"] >= 120,
            what="telemetry",
        )
        sim.set_telemetry_interval(0)
        sim.wait_idle()
        sent = sim.sent().telemetry
        wait_for(
            lambda: first.ingested["telemetry"] + second.ingested["telemetry"] == sent,
            what="both exporters caught up",
        )
        # Each got a real share; together exactly what was sent (no duplicates).
        assert first.ingested["telemetry"] > sent / 5
        assert second.ingested["telemetry"] > sent / 5
        # Status is read by both (retained registry), not split.
        assert first.ingested["status"] >= 6 and second.ingested["status"] >= 6


def test_invalid_payloads_are_counted_not_fatal(mosquitto: MosquittoBroker) -> None:
    with (
        FleetMonitor(mosquitto.url, FLEET).start(listen=("127.0.0.1", 0)) as monitor,
        operator_client(mosquitto.host, mosquitto.port) as client,
    ):
        assert client.publish(TOPICS.telemetry("d1"), b"{not json", qos=1).wait(5)
        payload = json.dumps({"schema": "edgekit.telemetry/v1"}).encode()
        assert client.publish(TOPICS.telemetry("d1"), payload, qos=1).wait(5)
        assert monitor.port is not None
        wait_for(
            lambda: _total(_scrape(monitor.port), "edgekit_monitor_rejected_messages_total") == 2,
            what="rejected messages counted",
        )
        assert monitor.rejected == {("telemetry", "not_json"): 1, ("telemetry", "invalid"): 1}
        assert monitor.ingested["telemetry"] == 0


def test_dashboard_uses_only_exported_metrics() -> None:
    import re

    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert len(expressions) >= 8
    expressions += [
        variable["definition"]
        for variable in dashboard["templating"]["list"]
        if variable.get("type") == "query"
    ]
    used = set()
    for expression in expressions:
        used.update(re.findall(r"\bedgekit_[a-z_]+", expression))
    assert used, "the dashboard queries no edgekit metric"
    unknown = used - set(METRIC_NAMES)
    assert not unknown, f"dashboard uses metrics the exporter does not expose: {unknown}"
    # Every panel has a datasource variable and a unique id.
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_docs_list_every_metric() -> None:
    docs = (DASHBOARD.parents[1] / "docs" / "monitor.md").read_text()
    missing = [name for name in METRIC_NAMES if f"`{name}`" not in docs]
    assert not missing, f"docs/monitor.md does not document {missing}"


def test_series_of_silent_devices_and_old_versions_are_forgotten() -> None:
    import time

    from edgekit.messages import BundleId, Event, Status, Telemetry

    monitor = FleetMonitor("mqtt://127.0.0.1:9", FLEET, forget_after_s=3600)
    old, recent = time.time() - 10_000, time.time() - 10

    def telemetry(device: str, version: str, seq: int) -> bytes:
        bundle = BundleId("digits", version, "a" * 64)
        return Telemetry(FLEET, device, seq, 1.0, 5, 1, bundle=bundle, rollout_id="r").to_json()

    monitor.ingest("telemetry", "d1", telemetry("d1", "1.0.0", 1), now=old)
    monitor.ingest("telemetry", "d1", telemetry("d1", "2.0.0", 2), now=recent)
    monitor.ingest("telemetry", "gone", telemetry("gone", "1.0.0", 1), now=old)
    monitor.ingest(
        "status", "registered", Status(FLEET, "registered", False, "idle").to_json(), now=old
    )
    monitor.ingest("events", "d1", Event(FLEET, "d1", "committed").to_json(), now=old)
    with pytest.raises(MessageError):
        monitor.ingest("events", "d1", b"[]")

    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in monitor.registry.collect():
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    requests = samples["edgekit_inference_requests_total"]
    assert [(labels["device"], labels["version"]) for labels, _ in requests] == [("d1", "2.0.0")]
    assert {labels["device"] for labels, _ in samples["edgekit_device_online"]} == {"registered"}
    assert (
        "edgekit_update_events_total" not in samples or not samples["edgekit_update_events_total"]
    )
    assert samples["edgekit_monitor_devices"][0][1] == 2


def test_monitor_cli_serves_metrics(mosquitto: MosquittoBroker) -> None:
    import signal
    import subprocess
    import sys

    from edgekit.messages import Telemetry
    from edgekit.mosquitto import free_port

    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgekit",
            "monitor",
            "--fleet",
            FLEET,
            "--broker",
            mosquitto.url,
            "--listen",
            f"127.0.0.1:{port}",
            "--group",
            "cli",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def serving() -> bool:
            try:
                return "edgekit_monitor_connected" in str(_scrape(port))
            except OSError:
                return False

        wait_for(serving, what="exporter serving")
        with operator_client(mosquitto.host, mosquitto.port) as client:
            for seq in range(1, 4):
                message = Telemetry(FLEET, "dev-1", seq, 1.0, requests=10, errors=1)
                client.publish(TOPICS.telemetry("dev-1"), message.to_json(), qos=1).wait(5)
        wait_for(
            lambda: _total(_scrape(port), "edgekit_inference_requests_total", device="dev-1") == 30,
            what="requests counted",
        )
        assert _total(_scrape(port), "edgekit_inference_errors_total") == 3
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
    stderr = process.stderr.read() if process.stderr else ""
    assert process.returncode == 0, stderr
    # Where it connects and listens, said at start-up (issue 14 item 6).
    endpoint = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    assert f"monitor of fleet {FLEET}: connecting to {endpoint}" in stderr
    assert f"monitor of fleet {FLEET}: serving http://127.0.0.1:{port}/metrics" in stderr
