"""Rollouts against a real Mosquitto and simulated devices (real MQTT clients, real directive
and bundle verification, the outcome contract of `edgekit.topics`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgekit.fleet.cohorts import assign_waves, wave_fractions
from edgekit.fleet.registry import DeviceSelector, fleet_client
from edgekit.fleet.rollout import (
    RolloutController,
    RolloutError,
    RolloutOptions,
    load_release,
    publish_release,
)
from edgekit.fleet.simulate import Faults, SimulatedFleet, make_device_specs
from edgekit.fleet.store import RolloutStore
from edgekit.messages import Event
from edgekit.mosquitto import MosquittoBroker
from edgekit.mqtt import BrokerSettings, Inbox, MqttClient
from edgekit.topics import Topics
from edgekit.trust import Directive, parse_envelope
from tests.fleet.conftest import KEY_NAME, PROFILES, FleetKit
from tests.fleet.tools_helpers import wait_for

FLEET = "plant"


@pytest.fixture
def connection(mosquitto: MosquittoBroker) -> Iterator[MqttClient]:
    with fleet_client(BrokerSettings(mosquitto.url)) as conn:
        yield conn


def _controller(conn: MqttClient, store: RolloutStore, kit: FleetKit) -> RolloutController:
    return RolloutController(
        connection=conn, store=store, fleet=FLEET, signers=[kit.directives], poll_s=0.1
    )


def _retained_desired(conn: MqttClient) -> dict[str, bytes]:
    """Device -> retained directive, as a fresh subscriber sees them."""
    with fleet_client(conn.settings) as reader:
        messages = Inbox(reader).collect_retained(
            [Topics(FLEET).all_devices("desired")], quiet_s=0.5
        )
    return {m.topic.split("/")[4]: m.payload for m in messages if m.payload}


def test_canary_rollout_to_20_devices_succeeds(
    mosquitto: MosquittoBroker,
    connection: MqttClient,
    rollout_store: RolloutStore,
    fleet_kit: FleetKit,
) -> None:
    release = load_release(
        [fleet_kit.bundle("2.0.0", p) for p in PROFILES], truststore=fleet_kit.truststore
    )
    with SimulatedFleet(
        mosquitto.url,
        FLEET,
        20,
        trust_store=fleet_kit.truststore,
        profiles=PROFILES,
        telemetry_interval_s=0.5,
    ) as devices:
        controller = _controller(connection, rollout_store, fleet_kit)
        options = RolloutOptions(
            strategy="canary",
            canary=0.1,
            max_failure=0.0,
            soak_s=1.0,
            report_timeout_s=60,
            bundle_urls=("https://cdn.example/{filename}",),
        )
        rollout_id = controller.plan(release, options)
        waves = rollout_store.waves(rollout_id)
        canary = [t.device for t in rollout_store.targets(rollout_id, wave=0)]
        # Stratified: one device of each profile in a 10% canary of 10 + 10.
        assert len(waves) == 2
        assert sorted(devices.devices[d].spec.profile for d in canary) == sorted(PROFILES)

        result = controller.run(rollout_id)

        assert result.state == "completed", result.progress.reason
        assert [w.state for w in rollout_store.waves(rollout_id)] == ["passed", "passed"]
        for device_id, device in devices.devices.items():
            expected = fleet_kit.active("2.0.0", device.spec.profile)
            assert device.active == expected, device_id
            # One directive, one update, each device.
            assert [(sha, outcome) for _, sha, outcome in device.history] == [
                (expected.sha256, "committed")
            ]
        retained = _retained_desired(connection)
        assert set(retained) == set(devices.devices)
        # Each directive names both sources: the retained chunks the devices used, and the URL.
        directive = Directive.from_payload(parse_envelope(retained["sim-0000"]).payload)
        assert [source.kind for source in directive.bundle.sources] == ["mqtt", "https"]


def test_canary_with_failing_health_halts_and_reverts(
    mosquitto: MosquittoBroker,
    connection: MqttClient,
    rollout_store: RolloutStore,
    fleet_kit: FleetKit,
) -> None:
    specs = make_device_specs(20, profiles=("x86-64",))
    ids = [s.device_id for s in specs]
    canary_share = 0.2
    canary = assign_waves(
        dict.fromkeys(ids, "x86-64"), wave_fractions("canary", canary=canary_share)
    )[0]
    rest = sorted(set(ids) - set(canary))
    failing = frozenset(canary[:2] + rest[:4])  # 6 of 20 devices (30%) fail their health check
    v1, v2 = fleet_kit.active("1.0.0"), fleet_kit.active("2.0.0")
    topics = Topics(FLEET)
    with SimulatedFleet(
        mosquitto.url,
        FLEET,
        specs,
        trust_store=fleet_kit.truststore,
        initial_bundle=v1,
        faults=Faults(fail_health_devices=failing),
        telemetry_interval_s=0.5,
    ) as devices:
        # v1 is on the broker and recorded, so the controller can name it in a revert.
        publish_release(
            connection, rollout_store, topics, load_release([fleet_kit.bundle("1.0.0")]).bundles[0]
        )
        controller = _controller(connection, rollout_store, fleet_kit)
        options = RolloutOptions(
            strategy="canary",
            canary=canary_share,
            max_failure=0.02,
            soak_s=1.0,
            report_timeout_s=60,
        )
        rollout_id = controller.plan(load_release([fleet_kit.bundle("2.0.0")]), options)
        assert [t.device for t in rollout_store.targets(rollout_id, wave=0)] == canary

        said: list[str] = []
        controller.on_message = said.append
        result = controller.run(rollout_id)
        devices.wait_idle(timeout_s=20)

        assert result.state == "halted"
        assert "failure_ratio" in (result.progress.reason or "")
        # The operator reads why it halted and what the revert waits for, until when.
        assert any(line.startswith("wave 0 halted: failure_ratio: ") for line in said), said
        reverting = [line for line in said if line.startswith("reverting: waiting for ")]
        assert reverting and "to report on the revert until " in reverting[0], said
        assert result.progress.summary.startswith("halted: "), result.progress.summary
        assert "reverted to their previous bundle" in result.progress.summary
        assert [w.state for w in rollout_store.waves(rollout_id)] == ["failed", "planned"]
        outcomes = {t.device: t.outcome for t in rollout_store.targets(rollout_id)}
        assert "failed" in {outcomes[d] for d in failing & set(canary)}
        for device_id in canary:
            device = devices.devices[device_id]
            # Every canary device runs v1 again: failing ones rolled back by themselves (or,
            # still busy when the gate failed, were also sent the revert), healthy ones were
            # sent a revert directive (a higher sequence) naming v1.
            assert device.active == v1, device_id
            if device_id in failing:
                assert outcomes[device_id] in ("failed", "reverted")
                assert (v2.sha256, "committed") not in [h[1:] for h in device.history]
            else:
                assert device.state == "committed"
                assert outcomes[device_id] == "reverted"
                assert [h[1:] for h in device.history] == [
                    (v2.sha256, "committed"),
                    (v1.sha256, "committed"),
                ]
        # Devices outside the canary never got a directive: none retained, status unchanged.
        retained = _retained_desired(connection)
        assert set(retained) == set(canary)
        for device_id in rest:
            device = devices.devices[device_id]
            assert device.history == []
            assert device.active == v1
            assert device.floor.last_sequence == 0
            assert device.sent.events["directive_accepted"] == 0


@pytest.mark.parametrize(("fault", "gate"), [("slow", "latency_regression"), ("drift", "drift")])
def test_telemetry_gates_halt_a_regressing_canary(
    fault: str,
    gate: str,
    mosquitto: MosquittoBroker,
    connection: MqttClient,
    rollout_store: RolloutStore,
    fleet_kit: FleetKit,
) -> None:
    """Every device is slow (or drifts) on the new bundle only: the canary's telemetry,
    compared with the devices still on v1, halts the rollout and the canary is reverted."""
    v1 = fleet_kit.active("1.0.0")
    with SimulatedFleet(
        mosquitto.url,
        FLEET,
        10,
        trust_store=fleet_kit.truststore,
        initial_bundle=v1,
        faults=Faults(**{fault: 1.0}),  # type: ignore[arg-type]
        telemetry_interval_s=0.2,
    ) as devices:
        publish_release(
            connection,
            rollout_store,
            Topics(FLEET),
            load_release([fleet_kit.bundle("1.0.0")]).bundles[0],
        )
        controller = _controller(connection, rollout_store, fleet_kit)
        options = RolloutOptions(
            strategy="canary",
            canary=0.2,
            soak_s=3.0,
            report_timeout_s=60,
            max_latency_regression=0.5,
            max_drift=0.25,
        )
        rollout_id = controller.plan(load_release([fleet_kit.bundle("2.0.0")]), options)
        canary = [t.device for t in rollout_store.targets(rollout_id, wave=0)]

        result = controller.run(rollout_id)
        devices.wait_idle(timeout_s=20)

        assert result.state == "halted"
        assert f"{gate}:" in (result.progress.reason or "")
        assert result.progress.counts == {"reverted": len(canary), "planned": 10 - len(canary)}
        assert all(d.active == v1 for d in devices.devices.values())


def _edgekit(kit: FleetKit, *args: str) -> list[str]:
    return [sys.executable, "-m", "edgekit", "fleet", *args]


def test_controller_killed_mid_rollout_resumes_without_updating_twice(
    tmp_path: Path, mosquitto: MosquittoBroker, fleet_kit: FleetKit
) -> None:
    db = tmp_path / "fleet.db"
    v2 = fleet_kit.active("2.0.0")
    common = ["--db", str(db), "--broker", mosquitto.url, "--key", KEY_NAME]
    with (
        SimulatedFleet(
            mosquitto.url,
            FLEET,
            20,
            trust_store=fleet_kit.truststore,
            initial_bundle=fleet_kit.active("1.0.0"),
            telemetry_interval_s=0.5,
            step_delay_s=0.05,
        ) as devices,
        fleet_client(BrokerSettings(mosquitto.url)) as observer_client,
    ):
        # An independent observer of the devices' event stream, for the whole test.
        observer = Inbox(observer_client)
        observer.subscribe([Topics(FLEET).all_devices("events")])
        controller = subprocess.Popen(
            _edgekit(
                fleet_kit,
                "rollout",
                str(fleet_kit.bundle("2.0.0")),
                "--fleet",
                FLEET,
                "--strategy",
                "waves",
                "--waves",
                "20%,60%,100%",
                "--soak",
                "1s",
                "--json",
                *common,
            ),
            env=fleet_kit.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            store = None

            def first_wave_passed() -> bool:
                nonlocal store
                if store is None:
                    if not db.exists():
                        return False
                    store = RolloutStore(db)
                latest = store.latest_rollout()
                return latest is not None and latest.current_wave >= 1

            wait_for(first_wave_passed, timeout_s=60, what="the first wave to pass")
            controller.send_signal(signal.SIGKILL)
            controller.wait(timeout=10)
        finally:
            if controller.poll() is None:
                controller.kill()
        assert store is not None
        record = store.latest_rollout()
        assert record is not None
        rollout_id = record.id
        assert store.rollout(rollout_id).state == "running"  # killed, not finished
        first_wave = {t.device for t in store.targets(rollout_id, wave=0)}
        assert all(
            t.outcome == "succeeded" for t in store.targets(rollout_id) if t.device in first_wave
        )
        store.close()

        resumed = subprocess.run(
            _edgekit(fleet_kit, "rollout", "resume", rollout_id, "--json", *common),
            env=fleet_kit.env(),
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
        outcome = json.loads(resumed.stdout)
        assert outcome["state"] == "completed"
        assert outcome["counts"] == {"succeeded": 20}
        devices.wait_idle(timeout_s=20)
        time.sleep(0.3)  # the last events in flight reach the observer
        stream = [Event.from_json(m.payload) for m in observer.drain()]
        accepted = Counter(e.device for e in stream if e.kind == "directive_accepted")
        committed = Counter(e.device for e in stream if e.kind == "committed")
        assert accepted == dict.fromkeys(devices.devices, 1)
        assert committed == dict.fromkeys(devices.devices, 1)
        for device_id, device in devices.devices.items():
            assert device.active == v2, device_id
            # Exactly one directive accepted and one update per device, across both controllers.
            assert device.sent.events["directive_accepted"] == 1, device_id
            assert [h[1:] for h in device.history] == [(v2.sha256, "committed")], device_id
    assert os.path.exists(db)


def test_cli_exit_code_says_halted(
    tmp_path: Path, mosquitto: MosquittoBroker, fleet_kit: FleetKit
) -> None:
    db = tmp_path / "fleet.db"
    common = ["--db", str(db), "--broker", mosquitto.url, "--key", KEY_NAME]
    with SimulatedFleet(
        mosquitto.url,
        FLEET,
        6,
        trust_store=fleet_kit.truststore,
        initial_bundle=fleet_kit.active("1.0.0"),
        faults=Faults(fail_health=0.5),
        telemetry_interval_s=0,
    ):
        published = subprocess.run(
            _edgekit(
                fleet_kit,
                "publish",
                str(fleet_kit.bundle("1.0.0")),
                "--fleet",
                FLEET,
                "--json",
                "--db",
                str(db),
                "--broker",
                mosquitto.url,
            ),
            env=fleet_kit.env(),
            capture_output=True,
            check=False,
        )
        assert published.returncode == 0, published.stderr.decode()
        run = subprocess.run(
            _edgekit(
                fleet_kit,
                "rollout",
                str(fleet_kit.bundle("2.0.0")),
                "--fleet",
                FLEET,
                "--strategy",
                "all",
                "--soak",
                "0s",
                "--truststore",
                str(fleet_kit.truststore_path),
                "--json",
                *common,
            ),
            env=fleet_kit.env(),
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 3, run.stderr.decode()[-2000:]
        outcome = json.loads(run.stdout)
        assert outcome["state"] == "halted"
        counts = outcome["counts"]
        # The gate fails at the first failure; every other device is sent back to v1.
        assert counts.get("failed", 0) >= 1
        assert counts.get("failed", 0) + counts.get("reverted", 0) == 6, counts

        status = subprocess.run(
            _edgekit(fleet_kit, "status", "--json", "--db", str(db)),
            env=fleet_kit.env(),
            capture_output=True,
            check=True,
        )
        assert json.loads(status.stdout)["state"] == "halted"


def test_selection_and_missing_profile_variant_are_refused(
    mosquitto: MosquittoBroker,
    connection: MqttClient,
    rollout_store: RolloutStore,
    fleet_kit: FleetKit,
) -> None:
    with SimulatedFleet(
        mosquitto.url,
        FLEET,
        4,
        trust_store=fleet_kit.truststore,
        profiles=PROFILES,
        telemetry_interval_s=0,
    ):
        controller = _controller(connection, rollout_store, fleet_kit)
        x86_only = load_release([fleet_kit.bundle("2.0.0", "x86-64")])
        with pytest.raises(RolloutError, match="no bundle for selected devices' profiles"):
            controller.plan(x86_only, RolloutOptions(strategy="all"))
        with pytest.raises(RolloutError, match="no online device"):
            controller.plan(
                x86_only, RolloutOptions(strategy="all", selector=DeviceSelector(group="nope"))
            )
        with pytest.raises(RolloutError, match="must start with https://"):
            controller.plan(
                x86_only,
                RolloutOptions(
                    strategy="all",
                    selector=DeviceSelector(profiles=("x86-64",)),
                    bundle_urls=("http://cdn.example/{filename}",),
                ),
            )
        rollout_id = controller.plan(
            x86_only,
            RolloutOptions(
                strategy="all",
                selector=DeviceSelector(profiles=("x86-64",)),
                bundle_urls=("https://cdn.example/models/{version}/{filename}",),
            ),
        )
        assert {t.profile for t in rollout_store.targets(rollout_id)} == {"x86-64"}
        # Directives will name both sources: the retained MQTT chunks and the HTTPS URL.
        recorded = rollout_store.bundle(x86_only.bundles[0].sha256)
        assert recorded is not None
        assert recorded.sources == (
            {"kind": "mqtt", "topic_prefix": Topics(FLEET).bundle_prefix(recorded.sha256)},
            {"kind": "https", "url": "https://cdn.example/models/2.0.0/tiny-2.0.0-x86-64.ekb"},
        )
