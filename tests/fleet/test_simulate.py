"""The device simulator against a real Mosquitto: the directive-outcome contract, real
directive and bundle verification, faults chosen by stable hash, last wills."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekit.errors import TransportError
from edgekit.fleet.simulate import (
    Faults,
    SimulatedFleet,
    SimulationError,
    fault_devices,
    make_device_specs,
)
from edgekit.mosquitto import MosquittoBroker
from edgekit.mqtt import BrokerSettings, MqttClient
from edgekit.topics import Topics
from tests.fleet.tools_helpers import (
    BuiltBundle,
    FleetKeys,
    FleetWatcher,
    directive_for,
    make_bundle,
    make_keys,
    operator_client,
    publish,
    send_directives,
    wait_for,
)
from tests.tls_helpers import self_signed_cert

FLEET = "sim-test"
TOPICS = Topics(FLEET)


@pytest.fixture(scope="module")
def keys() -> FleetKeys:
    return make_keys()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: FleetKeys) -> dict[str, BuiltBundle]:
    folder = tmp_path_factory.mktemp("bundles")
    return {
        "v1": make_bundle(folder, keys, version="1.0.0"),
        "v2": make_bundle(folder, keys, version="2.0.0", model_bytes=300_000),
        "v2-pi": make_bundle(folder, keys, version="2.0.0", profile="raspberrypi"),
    }


@pytest.fixture
def operator(mosquitto: MosquittoBroker) -> Iterator[tuple[MqttClient, FleetWatcher]]:
    with operator_client(mosquitto.host, mosquitto.port) as client:
        yield client, FleetWatcher(client, TOPICS)


def test_fault_devices_is_exact_and_stable() -> None:
    ids = [f"d{i}" for i in range(20)]
    chosen = fault_devices(ids, 0.3, seed=7, fault="fail_health")
    assert len(chosen) == 6
    assert chosen == fault_devices(list(reversed(ids)), 0.3, seed=7, fault="fail_health")
    assert chosen != fault_devices(ids, 0.3, seed=8, fault="fail_health")
    assert fault_devices(ids, 0.0, seed=7, fault="x") == set()


def test_broker_settings_parsing() -> None:
    assert BrokerSettings("mqtt://127.0.0.1:1999").endpoint == "mqtt://127.0.0.1:1999"
    assert BrokerSettings("mqtts://broker.example").port == 8883
    with pytest.raises(TransportError, match="mqtt://host"):
        BrokerSettings("http://x:1")
    # One settings type serves the agent, the simulator, the monitor and the operator's tools.
    parsed = BrokerSettings("mqtt://u:p@h:2000")
    assert (parsed.host, parsed.port, parsed.tls, parsed.username, parsed.password) == (
        "h", 2000, False, "u", "p",
    )  # fmt: skip
    assert BrokerSettings("h:2000").endpoint == "mqtt://h:2000"
    settings = BrokerSettings("mqtts://u:p@h", username="operator", password="pw")
    assert (settings.tls, settings.username, settings.password) == (True, "operator", "pw")
    with pytest.raises(TransportError, match="cert_file and key_file"):
        BrokerSettings("mqtts://h", cert_file=Path("c.pem"))
    with pytest.raises(SimulationError):
        Faults(fail_health=1.5)


def test_rollout_contract_with_failing_health(
    mosquitto: MosquittoBroker,
    operator: tuple[MqttClient, FleetWatcher],
    keys: FleetKeys,
    bundles: dict[str, BuiltBundle],
) -> None:
    client, watcher = operator
    faults = Faults(fail_health=0.3, seed=3)
    with SimulatedFleet(
        mosquitto.url,
        FLEET,
        20,
        trust_store=keys.truststore,
        faults=faults,
        initial_bundle=bundles["v1"].active,
        telemetry_interval_s=0,
    ) as sim:
        devices = list(sim.devices)
        failing = set(sim.device_ids(fault="fail_health"))
        assert len(failing) == 6
        wait_for(lambda: len(watcher.statuses) == 20, what="20 online statuses")
        assert all(s.online and s.state == "committed" for s in watcher.statuses.values())
        publish(client, TOPICS, bundles["v2"])
        send_directives(client, keys, TOPICS, devices, bundles["v2"], sequence=1)
        wait_for(lambda: watcher.settled(devices, 1), timeout_s=60, what="outcomes")
        v2 = bundles["v2"].active
        for device in devices:
            status = watcher.statuses[device]
            assert status.last_sequence == 1
            if device in failing:
                assert status.state == "rolled_back"
                assert status.active == bundles["v1"].active  # never ran v2
                assert status.previous != v2  # the bundle it rolled back from is no way back
                (event,) = watcher.events_of(device, "rolled_back")
                assert event.sequence == 1 and "health check" in (event.reason or "")
            else:
                assert status.state == "committed" and status.active == v2
                assert status.previous == bundles["v1"].active
                assert status.rollout_id == "r1"
        # A revert (new sequence naming v1) brings every device back; failed ones already run it.
        send_directives(client, keys, TOPICS, devices, bundles["v1"], sequence=2, rollout_id="r2")
        publish(client, TOPICS, bundles["v1"])
        wait_for(lambda: watcher.settled(devices, 2), timeout_s=60, what="revert outcomes")
        assert all(
            s.state == "committed" and s.active == bundles["v1"].active
            for s in watcher.statuses.values()
        )
        assert all(
            [outcome for _, _, outcome in sim.devices[d].history]
            == ["rolled_back" if d in failing else "committed", "committed"]
            for d in devices
        )
        counted = sim.sent()
        assert counted.events["committed"] == 14 + 20
    # Stopped: every retained status says offline.
    wait_for(lambda: not any(s.online for s in watcher.statuses.values()), what="offline")


def test_refusals_follow_the_contract(
    mosquitto: MosquittoBroker,
    operator: tuple[MqttClient, FleetWatcher],
    keys: FleetKeys,
    bundles: dict[str, BuiltBundle],
) -> None:
    client, watcher = operator
    publish(client, TOPICS, bundles["v2"])
    with SimulatedFleet(
        mosquitto.url,
        FLEET,
        make_device_specs(3),
        trust_store=keys.truststore,
        initial_bundle=bundles["v1"].active,
        telemetry_interval_s=0,
    ) as sim:
        a, b, c = sim.devices
        # Forged: signed by the bundles key, which the directives role does not trust.
        forged = directive_for(keys, TOPICS, a, bundles["v2"], sequence=4, signer=keys.bundles)
        client.publish(TOPICS.desired(a), forged, qos=1, retain=True)
        # Meant for another device.
        wrong = directive_for(keys, TOPICS, c, bundles["v2"], sequence=4)
        client.publish(TOPICS.desired(b), wrong, qos=1, retain=True)
        # A bundle for another profile: verified, then refused.
        pi = bundles["v2-pi"]
        publish(client, TOPICS, pi)
        client.publish(
            TOPICS.desired(c), directive_for(keys, TOPICS, c, pi, sequence=4), qos=1, retain=True
        )
        wait_for(lambda: watcher.settled([a, b, c], 4), timeout_s=30, what="refusals")
        (refused_a,) = watcher.events_of(a, "directive_refused")
        assert refused_a.sequence == 4 and "signature" in refused_a.reason
        (refused_b,) = watcher.events_of(b, "directive_refused")
        assert "device" in refused_b.reason
        assert watcher.statuses[a].last_sequence == 0  # refused directives never raise it
        (refused_c,) = watcher.events_of(c, "bundle_refused")
        assert refused_c.sequence == 4 and "profile" in refused_c.reason
        assert watcher.statuses[c].state == "rolled_back"
        assert watcher.statuses[c].active == bundles["v1"].active
        # A replayed (lower) sequence is refused too.
        replay = directive_for(keys, TOPICS, c, bundles["v2"], sequence=3)
        client.publish(TOPICS.desired(c), replay, qos=1, retain=True)
        wait_for(lambda: len(watcher.events_of(c, "directive_refused")) == 1, what="replay refusal")
        assert "sequence" in watcher.events_of(c, "directive_refused")[0].reason


def test_offline_devices_leave_a_last_will(
    mosquitto: MosquittoBroker,
    operator: tuple[MqttClient, FleetWatcher],
    keys: FleetKeys,
) -> None:
    _client, watcher = operator
    with SimulatedFleet(
        mosquitto.url,
        FLEET,
        10,
        trust_store=keys.truststore,
        faults=Faults(offline=0.2, seed=1),
        telemetry_interval_s=0.2,
    ) as sim:
        offline = set(sim.device_ids(fault="offline"))
        assert len(offline) == 2
        wait_for(
            lambda: (
                len(watcher.statuses) == 10
                and {d for d, s in watcher.statuses.items() if not s.online} == offline
            ),
            what="offline devices marked by their will",
        )
        wait_for(lambda: len(watcher.telemetry) >= 16, what="telemetry")
        senders = {t.device for t in watcher.telemetry}
        assert senders.isdisjoint(offline)
        sample = watcher.telemetry[0]
        assert set(sample.latency_ms) == {"p50", "p95", "p99"} and sample.requests >= 0


def test_slow_devices_report_higher_latency_on_new_bundles(
    mosquitto: MosquittoBroker,
    operator: tuple[MqttClient, FleetWatcher],
    keys: FleetKeys,
    bundles: dict[str, BuiltBundle],
) -> None:
    client, watcher = operator
    with SimulatedFleet(
        mosquitto.url,
        FLEET,
        4,
        trust_store=keys.truststore,
        faults=Faults(slow=0.5, slow_factor=4.0, drift=0.25, seed=2),
        initial_bundle=bundles["v1"].active,
        telemetry_interval_s=0,
    ) as sim:
        slow = set(sim.device_ids(fault="slow"))
        (drifting,) = sim.device_ids(fault="drift")
        before = {d: sim.devices[d].telemetry_sample(1.0) for d in sim.devices}
        publish(client, TOPICS, bundles["v2"])
        send_directives(client, keys, TOPICS, sim.devices, bundles["v2"], sequence=1)
        wait_for(lambda: watcher.settled(list(sim.devices), 1), what="commits")
        after = {d: sim.devices[d].telemetry_sample(1.0) for d in sim.devices}
        for device in sim.devices:
            ratio = after[device].latency_ms["p50"] / before[device].latency_ms["p50"]
            assert ratio > 3.0 if device in slow else ratio < 1.3
            # Drift shows on the new bundle only, and only on the drifting device.
            assert before[device].drift_psi is not None and before[device].drift_psi < 0.1
            high = after[device].drift_psi is not None and after[device].drift_psi > 0.3
            assert high == (device == drifting)
            assert after[device].bundle == bundles["v2"].active


def test_wrong_password_is_reported(tmp_path: Path, keys: FleetKeys) -> None:
    broker = MosquittoBroker(tmp_path / "mq", users={"sim-0000": "right"}, persistence=False)
    with broker:
        sim = SimulatedFleet(
            broker.url,
            FLEET,
            1,
            trust_store=keys.truststore,
            passwords={"sim-0000": "wrong"},
            telemetry_interval_s=0,
        )
        try:
            with pytest.raises(SimulationError, match="refused"):
                sim.start(wait_s=10)
        finally:
            sim.stop()


def test_simulate_cli_requires_a_trust_store(tmp_path: Path) -> None:
    from edgekit.cli.fleet_tools import simulate_command

    result = CliRunner().invoke(
        simulate_command,
        [
            "--devices",
            "2",
            "--fleet",
            FLEET,
            "--broker",
            "mqtt://127.0.0.1:9",
            "--trust",
            str(tmp_path / "missing.json"),
        ],
    )
    assert result.exit_code == 2
    assert "cannot read trust store" in result.output and "missing.json" in result.output


def test_devices_reconnect_after_a_broker_restart(
    mosquitto: MosquittoBroker, keys: FleetKeys, bundles: dict[str, BuiltBundle]
) -> None:
    with SimulatedFleet(
        mosquitto.url,
        FLEET,
        5,
        trust_store=keys.truststore,
        initial_bundle=bundles["v1"].active,
        telemetry_interval_s=0,
    ) as sim:
        mosquitto.restart(down_s=0.5)
        wait_for(
            lambda: all(d.connects == 2 and d.connected for d in sim.devices.values()),
            timeout_s=30,
            what="reconnects",
        )
        with operator_client(mosquitto.host, mosquitto.port) as client:
            watcher = FleetWatcher(client, TOPICS)
            publish(client, TOPICS, bundles["v2"])
            send_directives(client, keys, TOPICS, sim.devices, bundles["v2"], sequence=1)
            wait_for(lambda: watcher.settled(list(sim.devices), 1), what="commits after restart")
            assert all(s.state == "committed" and s.online for s in watcher.statuses.values())


def test_simulator_and_monitor_over_tls(
    tmp_path: Path, keys: FleetKeys, bundles: dict[str, BuiltBundle]
) -> None:

    from edgekit.fleet.monitor import FleetMonitor
    from edgekit.mosquitto import TlsFiles

    cert, key = self_signed_cert(tmp_path)
    broker = MosquittoBroker(tmp_path / "mq", tls=TlsFiles(cert, cert, key), persistence=False)
    with broker:
        address = BrokerSettings(broker.url, ca_file=cert)
        assert address.tls
        with (
            FleetMonitor(address, FLEET).start() as monitor,
            SimulatedFleet(
                address,
                FLEET,
                4,
                trust_store=keys.truststore,
                initial_bundle=bundles["v1"].active,
                telemetry_interval_s=0.1,
            ) as sim,
        ):
            client = MqttClient(address, client_id="edgekit-test-tls-operator").connect()
            try:
                watcher = FleetWatcher(client, TOPICS)
                publish(client, TOPICS, bundles["v2"])
                send_directives(client, keys, TOPICS, sim.devices, bundles["v2"], sequence=1)
                wait_for(lambda: watcher.settled(list(sim.devices), 1), what="TLS commits")
                assert all(s.state == "committed" for s in watcher.statuses.values())
                wait_for(lambda: monitor.ingested["telemetry"] >= 8, what="TLS telemetry")
            finally:
                client.stop()


def test_simulate_cli_runs_devices(
    mosquitto: MosquittoBroker,
    operator: tuple[MqttClient, FleetWatcher],
    keys: FleetKeys,
    tmp_path: Path,
) -> None:
    import json
    import subprocess
    import sys

    from edgekit.trust import sign_truststore

    _client, watcher = operator
    trust = tmp_path / "truststore.json"
    trust.write_bytes(sign_truststore(keys.truststore, [keys.root]))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgekit",
            "fleet",
            "simulate",
            "--devices",
            "5",
            "--fleet",
            FLEET,
            "--broker",
            mosquitto.url,
            "--trust",
            str(trust),
            "--fail-health",
            "0.4",
            "--seed",
            "9",
            "--telemetry-interval",
            "0.2",
            "--duration",
            "1.5",
            "--json",
            "--profile",
            "raspberrypi",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # Where it connects, said at start-up on stderr (issue 14 item 6); stdout stays JSON.
    endpoint = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    assert f"connecting 5 simulated devices of fleet {FLEET} to {endpoint}" in result.stderr
    assert f"5 simulated devices of fleet {FLEET} online at {endpoint}" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["devices"] == 5 and len(summary["faults"]["fail_health"]) == 2
    assert summary["sent"]["telemetry"] >= 10
    assert summary["sent"]["events"]["agent_started"] == 5
    wait_for(lambda: len(watcher.statuses) == 5, what="statuses")
    assert {s.profile for s in watcher.statuses.values()} == {"raspberrypi"}
    wait_for(lambda: not any(s.online for s in watcher.statuses.values()), what="offline at exit")


def test_simulator_killed_mid_update_reports_a_rollback_when_restarted(
    mosquitto: MosquittoBroker,
    operator: tuple[MqttClient, FleetWatcher],
    keys: FleetKeys,
    bundles: dict[str, BuiltBundle],
    tmp_path: Path,
) -> None:
    import signal
    import subprocess
    import sys

    from edgekit.trust import sign_truststore

    client, watcher = operator
    trust = tmp_path / "truststore.json"
    trust.write_bytes(sign_truststore(keys.truststore, [keys.root]))
    command = [
        sys.executable,
        "-m",
        "edgekit",
        "fleet",
        "simulate",
        "--devices",
        "2",
        "--fleet",
        FLEET,
        "--broker",
        mosquitto.url,
        "--trust",
        str(trust),
        "--telemetry-interval",
        "0",
        "--workdir",
        str(tmp_path / "sim"),
        "--probation",
        "30",
        "--step-delay",
        "0",
    ]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(watcher.statuses) == 2, what="devices online")
        publish(client, TOPICS, bundles["v2"])
        send_directives(client, keys, TOPICS, watcher.statuses, bundles["v2"], sequence=1)
        wait_for(
            lambda: all(s.state == "probation" for s in watcher.statuses.values()),
            what="probation",
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    wait_for(lambda: not any(s.online for s in watcher.statuses.values()), what="wills")
    second = subprocess.run(
        [*command, "--duration", "1.5"], check=False, capture_output=True, timeout=60
    )
    assert second.returncode == 0, second.stderr
    for device, status in watcher.statuses.items():
        assert status.state == "rolled_back" and status.last_sequence == 1
        (event,) = watcher.events_of(device, "rolled_back")
        assert event.sequence == 1 and "restarted" in (event.reason or "")
    assert watcher.settled(list(watcher.statuses), 1)


@pytest.mark.slow
def test_exporters_count_exactly_at_scale(mosquitto: MosquittoBroker, keys: FleetKeys) -> None:
    """500 devices, two exporters sharing the load: counters equal what was sent."""
    from edgekit.fleet.monitor import FleetMonitor

    with (
        FleetMonitor(mosquitto.url, FLEET, group="scale").start() as first,
        FleetMonitor(mosquitto.url, FLEET, group="scale").start() as second,
        SimulatedFleet(
            mosquitto.url, FLEET, 500, trust_store=keys.truststore, telemetry_interval_s=0.2
        ) as sim,
    ):
        wait_for(
            lambda: first.ingested["telemetry"] + second.ingested["telemetry"] >= 5000,
            timeout_s=60,
            what="telemetry at scale",
        )
        sim.set_telemetry_interval(0)
        sim.wait_idle(timeout_s=60)
        sent = sim.sent().telemetry
        wait_for(
            lambda: first.ingested["telemetry"] + second.ingested["telemetry"] == sent,
            timeout_s=60,
            what="exporters caught up",
        )
        assert min(first.ingested["telemetry"], second.ingested["telemetry"]) > sent / 4


def test_kept_state_continues_the_telemetry_sequence_across_runs(
    mosquitto: MosquittoBroker,
    operator: tuple[MqttClient, FleetWatcher],
    keys: FleetKeys,
    tmp_path: Path,
) -> None:
    """With a work directory, a restarted simulator goes on above every telemetry seq it
    sent, as the agent does (issue 14, item 7): consumers take a lower seq for a restart."""
    _client, watcher = operator
    workdir = tmp_path / "sim"
    workdir.mkdir()  # empty, as a first run finds it

    def run() -> dict[str, list[int]]:
        before = len(watcher.telemetry)
        with SimulatedFleet(
            mosquitto.url,
            FLEET,
            3,
            trust_store=keys.truststore,
            workdir=workdir,
            keep_state=True,
            telemetry_interval_s=0.05,
        ):
            wait_for(lambda: len(watcher.telemetry) >= before + 30, what="telemetry")
        wait_for(lambda: not any(s.online for s in watcher.statuses.values()), what="offline")
        seqs: dict[str, list[int]] = {}
        for telemetry in watcher.telemetry[before:]:
            seqs.setdefault(telemetry.device, []).append(telemetry.seq)
        return seqs

    first = run()
    second = run()
    assert set(first) == set(second) == {"sim-0000", "sim-0001", "sim-0002"}
    for device, seqs in second.items():
        assert min(seqs) > max(first[device]), (device, first[device], seqs)


def test_a_dropped_device_s_will_carries_its_current_state(
    mosquitto: MosquittoBroker,
    operator: tuple[MqttClient, FleetWatcher],
    keys: FleetKeys,
    bundles: dict[str, BuiltBundle],
) -> None:
    """The will is re-set with every status, as the agent's is: a device updated to v2 that
    loses its connection is marked offline *on v2*, not on what it ran when the simulator
    started (MQTT fixes a will at CONNECT: the first connection after the update carries it)."""
    client, watcher = operator
    with SimulatedFleet(
        mosquitto.url,
        FLEET,
        2,
        trust_store=keys.truststore,
        initial_bundle=bundles["v1"].active,
        telemetry_interval_s=0,
    ) as sim:
        wait_for(lambda: len(watcher.statuses) == 2, what="statuses")
        publish(client, TOPICS, bundles["v2"])
        send_directives(client, keys, TOPICS, sim.devices, bundles["v2"], sequence=1)
        wait_for(lambda: watcher.settled(list(sim.devices), 1), what="commits")
        device = sim.devices["sim-0000"]
        device.client.sever()  # a lost network: the device reconnects
        wait_for(
            lambda: device.connects == 2 and watcher.statuses["sim-0000"].online,
            timeout_s=30,
            what="the reconnect",
        )
        device.client.sever()  # and again: the broker publishes this connection's will
        wait_for(lambda: not watcher.statuses["sim-0000"].online, what="the will")
        will = watcher.statuses["sim-0000"]
        assert will.active == bundles["v2"].active and will.previous == bundles["v1"].active
        assert will.state == "committed" and will.last_sequence == 1
