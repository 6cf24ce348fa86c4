"""One poisoned device on a real Mosquitto while a rollout runs over 20 simulated devices and
the monitor serves (issue 12): the rollout completes, `fleet devices` works, `/metrics` stays
200 and parseable, the poisoned device's series stay under the cap, refusals are counted by
reason."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from edgekit.cli import main as cli_main
from edgekit.fleet.monitor import OTHER, FleetMonitor
from edgekit.fleet.registry import fleet_client
from edgekit.fleet.rollout import RolloutController, RolloutOptions, load_release
from edgekit.fleet.simulate import SimulatedFleet
from edgekit.fleet.store import RolloutStore
from edgekit.messages import BundleId, Telemetry
from edgekit.mosquitto import MosquittoBroker
from edgekit.mqtt import BrokerSettings, MqttClient, PublishHandle
from edgekit.topics import Topics
from tests.fleet.conftest import FleetKit
from tests.fleet.tools_helpers import wait_for

FLEET = "poisoned"
TOPICS = Topics(FLEET)
POISON = "poison-1"
CAP = 8


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _poison(client: MqttClient) -> list[PublishHandle]:
    """Every hostile payload of issue 12, from one device's topics (retained where possible)."""
    status = TOPICS.status(POISON)
    telemetry = TOPICS.telemetry(POISON)
    events = TOPICS.events(POISON)
    head = b'{"schema":"edgekit.status/v1","fleet":"' + FLEET.encode() + b'","x":'
    good = Telemetry(FLEET, POISON, 1, 1.0, requests=1, errors=0)
    bad_telemetry = [
        good.to_json().replace(b'"latency_ms":{}', b'"latency_ms":{"p95":"x"}'),
        good.to_json().replace(b'"latency_ms":{}', b'"latency_ms":{"p95":{}}'),
        good.to_json().replace(b'"requests":1', b'"requests":' + str(10**308).encode()),
        good.to_json().replace(b'"requests":1', b'"requests":' + str(10**308).encode()),
        good.to_json().replace(b'"seq":1', b'"seq":NaN'),
        b'{"schema":"edgekit.telemetry/v1","x":' + _deep(2000) + b"}",
    ]
    handles = [
        client.publish(status, head + _deep(200) + b"}", retain=True),  # retained, nested
        client.publish(events, b'{"schema":"edgekit.event/v1","d":' + _deep(3000) + b"}"),
        client.publish(events, b'{"schema":"edgekit.event/v1","kind":7}'),
        client.publish(telemetry, b"\xff" * 100),
        client.publish(telemetry, b"x" * 100_000),
    ]
    handles += [client.publish(telemetry, payload) for payload in bad_telemetry]
    # 10,000 distinct versions from one device: valid messages, a bounded number of series.
    for index in range(10_000):
        bundle = BundleId("m", f"9.{index}.0", f"{index:064x}")
        message = Telemetry(FLEET, POISON, index + 2, 1.0, requests=1, errors=0, bundle=bundle)
        handles.append(client.publish(telemetry, message.to_json(), qos=0))
    handles.append(client.publish(telemetry, good.to_json()))
    return handles


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return str(response.read().decode())


def test_one_poisoned_device_breaks_nothing(
    mosquitto: MosquittoBroker, tmp_path: Path, fleet_kit: FleetKit
) -> None:
    settings = BrokerSettings(mosquitto.url)
    release = load_release([fleet_kit.bundle("2.0.0")], truststore=fleet_kit.truststore)
    with (
        FleetMonitor(settings, FLEET, max_series_per_device=CAP).start(
            listen=("127.0.0.1", 0)
        ) as monitor,
        SimulatedFleet(
            settings,
            FLEET,
            20,
            trust_store=fleet_kit.truststore,
            initial_bundle=fleet_kit.active("1.0.0"),
            telemetry_interval_s=0.5,
        ) as devices,
        MqttClient(settings, client_id=f"edgekit-sim-{POISON}").connect() as poison,
        RolloutStore(tmp_path / "fleet.db") as store,
        fleet_client(settings) as connection,
    ):
        handles = _poison(poison)
        assert handles[-1].wait(60) and handles[0].wait(10)  # the retained poison is in place
        controller = RolloutController(
            connection=connection,
            store=store,
            fleet=FLEET,
            signers=[fleet_kit.directives],
            poll_s=0.1,
        )
        options = RolloutOptions(
            strategy="canary", canary=0.1, max_failure=0.0, soak_s=1.0, report_timeout_s=60
        )
        rollout_id = controller.plan(release, options)  # reads the poisoned retained status
        stop = threading.Event()

        def keep_poisoning() -> None:  # more poison while the rollout runs
            while not stop.is_set():
                _poison(poison)[-1].wait(30)

        poisoner = threading.Thread(target=keep_poisoning, daemon=True)
        poisoner.start()
        try:
            result = controller.run(rollout_id)
        finally:
            stop.set()
            poisoner.join(timeout=120)
        assert result.state == "completed", result.progress.reason
        assert result.progress.counts == {"succeeded": 20}
        assert {d.active for d in devices.devices.values()} == {fleet_kit.active("2.0.0")}
        assert controller.rejected["invalid"] > 0 and controller.registry.get(POISON) is None

        # `fleet devices` works with the poisoned retained status on the broker.
        listed = CliRunner().invoke(
            cli_main,
            ["fleet", "devices", "--fleet", FLEET, "--broker", mosquitto.url, "--json"],
        )
        assert listed.exit_code == 0, listed.output
        assert sorted(d["device"] for d in json.loads(listed.output)) == sorted(devices.devices)

        # The exporter kept serving: 200, parseable, bounded series, refusals by reason.
        assert monitor.port is not None
        wait_for(lambda: monitor.client.connected, what="monitor connected")
        text = _scrape(monitor.port)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        poisoned = {
            (s.labels["version"], s.labels["rollout"])
            for s in families["edgekit_telemetry_messages"].samples
            if s.labels.get("device") == POISON
        }
        assert 1 <= len(poisoned) <= CAP + 1 and (OTHER, OTHER) in poisoned
        rejected = {
            (s.labels["kind"], s.labels["reason"]): s.value
            for s in families["edgekit_monitor_rejected_messages"].samples
            if s.name.endswith("_total")
        }
        for key in (
            ("status", "too_deep"),
            ("events", "too_deep"),
            ("events", "invalid"),
            ("telemetry", "invalid"),
            ("telemetry", "not_json"),
            ("telemetry", "too_large"),
            ("telemetry", "too_deep"),
        ):
            assert rejected.get(key, 0) >= 1, (key, rejected)
        requests = [
            s.value
            for s in families["edgekit_inference_requests"].samples
            if s.name.endswith("total")
        ]
        assert all(value < 1e300 for value in requests)
        online = [
            s for s in families["edgekit_monitor_connected"].samples if s.labels["fleet"] == FLEET
        ]
        assert online[0].value == 1.0
        assert monitor.client.handler_errors == 0

        # An exporter started after the poison reads the retained nested status and lives.
        with FleetMonitor(settings, FLEET, group="late").start() as late:
            wait_for(
                lambda: (
                    late.ingested["status"] >= 20
                    and late.rejected.get(("status", "too_deep"), 0) >= 1
                ),
                what="the late exporter read every retained status",
            )
            assert late.client.connected and late.client.handler_errors == 0
