"""Crash windows, pause/abort and rollback --to, against a real Mosquitto and simulated devices."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgekit.fleet.registry import DeviceSelector, fleet_client
from edgekit.fleet.rollout import (
    RolloutController,
    RolloutError,
    RolloutOptions,
    RolloutResult,
    load_release,
    publish_release,
)
from edgekit.fleet.simulate import Faults, SimulatedFleet
from edgekit.fleet.store import RolloutStore
from edgekit.mosquitto import MosquittoBroker
from edgekit.mqtt import BrokerSettings
from edgekit.topics import Topics
from tests.fleet.conftest import FleetKit
from tests.fleet.tools_helpers import wait_for

FLEET = "plant"


def test_directives_recorded_but_never_published_are_sent_once_on_resume(
    tmp_path: Path, mosquitto: MosquittoBroker, fleet_kit: FleetKit
) -> None:
    """The crash window between committing a wave's directives and publishing them."""
    db = tmp_path / "fleet.db"
    v2 = fleet_kit.active("2.0.0")
    with SimulatedFleet(
        mosquitto.url,
        FLEET,
        8,
        trust_store=fleet_kit.truststore,
        initial_bundle=fleet_kit.active("1.0.0"),
        telemetry_interval_s=0,
    ) as devices:
        with RolloutStore(db) as store, fleet_client(BrokerSettings(mosquitto.url)) as conn:
            crashed = RolloutController(
                connection=conn, store=store, fleet=FLEET, signers=[fleet_kit.directives]
            )
            rollout_id = crashed.plan(
                load_release([fleet_kit.bundle("2.0.0")]),
                RolloutOptions(strategy="all", soak_s=0, report_timeout_s=60),
            )
            # Publish the bundle, then sign and commit the wave: the process "dies" here.
            publish_release(
                conn, store, Topics(FLEET), load_release([fleet_kit.bundle("2.0.0")]).bundles[0]
            )
            recorded = crashed._prepare_wave(store.rollout(rollout_id), RolloutOptions(), 0)
            store.release(rollout_id)
        assert len(recorded) == 8
        time.sleep(0.5)
        assert all(device.history == [] for device in devices.devices.values())

        with RolloutStore(db) as store, fleet_client(BrokerSettings(mosquitto.url)) as conn:
            resumed = RolloutController(
                connection=conn, store=store, fleet=FLEET, signers=[fleet_kit.directives]
            )
            result = resumed.run(rollout_id)
        assert result.state == "completed", result.progress.reason
        sequences = {device: sequence for device, sequence, _ in recorded}
        for device_id, device in devices.devices.items():
            # The recorded directive (same sequence) was published, not a second one.
            assert device.history == [(sequences[device_id], v2.sha256, "committed")]
            assert device.sent.events["directive_accepted"] == 1


def _run_in_thread(
    db: Path, url: str, kit: FleetKit, plan: Callable[[RolloutController], str]
) -> tuple[threading.Thread, dict[str, object]]:
    """Plan and run a rollout in a thread (its own connection and store); results in the dict."""
    out: dict[str, object] = {}

    def target() -> None:
        with RolloutStore(db) as store, fleet_client(BrokerSettings(url)) as conn:
            controller = RolloutController(
                connection=conn, store=store, fleet=FLEET, signers=[kit.directives], poll_s=0.1
            )
            try:
                out["id"] = plan(controller)
                out["result"] = controller.run(str(out["id"]))
            except Exception as error:  # noqa: BLE001 - surfaced by the test
                out["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def test_pause_holds_the_next_wave_and_abort_ends_the_rollout(
    tmp_path: Path, mosquitto: MosquittoBroker, fleet_kit: FleetKit
) -> None:
    db = tmp_path / "fleet.db"
    RolloutStore(db).close()
    with SimulatedFleet(
        mosquitto.url,
        FLEET,
        10,
        trust_store=fleet_kit.truststore,
        initial_bundle=fleet_kit.active("1.0.0"),
        telemetry_interval_s=0,
    ) as devices:
        release = load_release([fleet_kit.bundle("2.0.0")])
        thread, out = _run_in_thread(
            db,
            mosquitto.url,
            fleet_kit,
            lambda c: c.plan(
                release,
                RolloutOptions(strategy="waves", waves=(0.2, 1.0), soak_s=1.0, report_timeout_s=60),
            ),
        )
        with RolloutStore(db) as store:
            wait_for(lambda: "id" in out or "error" in out, timeout_s=20, what="the plan")
            assert "error" not in out, out.get("error")
            rollout_id = str(out["id"])
            store.request(rollout_id, "pause")
            wait_for(
                lambda: store.rollout(rollout_id).state == "paused", timeout_s=20, what="paused"
            )
            # The first wave may finish; the second never starts while paused.
            time.sleep(2.0)
            assert [w.state for w in store.waves(rollout_id)][1] == "planned"
            second_wave = [t.device for t in store.targets(rollout_id, wave=1)]
            store.request(rollout_id, "abort")
            thread.join(timeout=20)
            assert not thread.is_alive()
            result = out["result"]
            assert isinstance(result, RolloutResult)
            assert result.state == "aborted"
        for device_id in second_wave:
            assert devices.devices[device_id].history == []


def test_rollback_to_a_recorded_version(
    tmp_path: Path, mosquitto: MosquittoBroker, fleet_kit: FleetKit
) -> None:
    v1, v2 = fleet_kit.active("1.0.0"), fleet_kit.active("2.0.0")
    with SimulatedFleet(
        mosquitto.url,
        FLEET,
        6,
        trust_store=fleet_kit.truststore,
        initial_bundle=v1,
        telemetry_interval_s=0,
    ) as devices:
        with (
            RolloutStore(tmp_path / "fleet.db") as store,
            fleet_client(BrokerSettings(mosquitto.url)) as conn,
        ):
            topics = Topics(FLEET)
            publish_release(
                conn, store, topics, load_release([fleet_kit.bundle("1.0.0")]).bundles[0]
            )
            controller = RolloutController(
                connection=conn,
                store=store,
                fleet=FLEET,
                signers=[fleet_kit.directives],
                poll_s=0.1,
            )
            forward = controller.plan(
                load_release([fleet_kit.bundle("2.0.0")]),
                RolloutOptions(strategy="all", soak_s=0, report_timeout_s=60),
            )
            assert controller.run(forward).state == "completed"
            assert all(d.active == v2 for d in devices.devices.values())
            back = controller.plan_rollback("1.0.0", selector=DeviceSelector())
            result = controller.run(back)
            assert result.state == "completed", result.progress.reason
            assert store.rollout(back).kind == "rollback"
            with pytest.raises(RolloutError, match=r"no bundle of version 9\.9\.9"):
                controller.plan_rollback("9.9.9", selector=DeviceSelector())
        devices.wait_idle(timeout_s=10)
        for device in devices.devices.values():
            assert device.active == v1
            assert [h[1:] for h in device.history] == [
                (v2.sha256, "committed"),
                (v1.sha256, "committed"),
            ]


def test_controller_stopped_while_reverting_finishes_the_revert_on_resume(
    tmp_path: Path, mosquitto: MosquittoBroker, fleet_kit: FleetKit
) -> None:
    v1 = fleet_kit.active("1.0.0")
    db = tmp_path / "fleet.db"
    with SimulatedFleet(
        mosquitto.url,
        FLEET,
        6,
        trust_store=fleet_kit.truststore,
        initial_bundle=v1,
        faults=Faults(fail_health=0.5),
        telemetry_interval_s=0,
        step_delay_s=0.05,
    ) as devices:
        with RolloutStore(db) as store, fleet_client(BrokerSettings(mosquitto.url)) as conn:
            publish_release(
                conn, store, Topics(FLEET), load_release([fleet_kit.bundle("1.0.0")]).bundles[0]
            )
            first = RolloutController(
                connection=conn,
                store=store,
                fleet=FLEET,
                signers=[fleet_kit.directives],
                poll_s=0.05,
            )
            rollout_id = first.plan(
                load_release([fleet_kit.bundle("2.0.0")]),
                RolloutOptions(strategy="all", soak_s=0, report_timeout_s=60),
            )
            # Stop the controller as soon as the revert is recorded and sent.
            stopped = first.run(
                rollout_id, stop_when=lambda: store.rollout(rollout_id).state == "reverting"
            )
            assert stopped.state == "reverting"
        with RolloutStore(db) as store, fleet_client(BrokerSettings(mosquitto.url)) as conn:
            second = RolloutController(
                connection=conn,
                store=store,
                fleet=FLEET,
                signers=[fleet_kit.directives],
                poll_s=0.05,
            )
            result = second.run(rollout_id)
        assert result.state == "halted"
        assert result.progress.counts.get("revert_failed", 0) == 0
        devices.wait_idle(timeout_s=20)
        assert all(d.active == v1 for d in devices.devices.values())
        # The resumed controller signed nothing new: every device acted once on each recorded
        # directive it got, and once on its revert.
        with RolloutStore(db) as store:
            targets = store.targets(rollout_id)
        assert any(t.revert_sequence for t in targets)
        for target in targets:
            sequences = [entry[0] for entry in devices.devices[target.device].history]
            assert len(sequences) == len(set(sequences)), target.device
            assert set(sequences) <= {target.sequence, target.revert_sequence}
            if target.revert_sequence is not None:
                assert sequences.count(target.revert_sequence) == 1


def _recorded(store: RolloutStore, rollout_id: str) -> None:
    """A running rollout of two waves, as `plan` records it (owned by `store`)."""
    store.create_rollout(
        rollout_id=rollout_id,
        fleet=FLEET,
        kind="rollout",
        spec={"options": RolloutOptions().to_json(), "release": []},
        waves=[(0.5, ["d1"]), (1.0, ["d2"])],
        targets=[
            ("d1", "x86-64", 0, "a" * 64, None, "planned"),
            ("d2", "x86-64", 1, "a" * 64, None, "planned"),
        ],
    )


def test_control_rules_live_in_the_library(tmp_path: Path) -> None:
    """pause/resume/abort decide from the store alone (issue 14, item 8): a live controller
    gets a request; without one, pause and abort apply at once, resume and abort --revert
    need a controller; a rollout that ended takes nothing."""
    from edgekit.fleet import control

    db = tmp_path / "fleet.db"
    with RolloutStore(db) as controller, RolloutStore(db) as operator:
        _recorded(controller, "r-live")  # its lease is fresh: a controller drives it
        decision = control.pause(operator, "r-live")
        assert (decision.action, decision.request) == ("requested", "pause")
        assert controller.take_request("r-live") == "pause"
        assert operator.rollout("r-live").state == "running"  # the controller applies it
        assert control.abort(operator, "r-live", revert=True).request == "abort_revert"
        assert control.resume(operator, "r-live").action == "requested"

        controller.release("r-live")  # the controller stopped
        paused = control.pause(operator, "r-live")
        assert paused.action == "applied" and operator.rollout("r-live").state == "paused"
        resumed = control.resume(operator, "r-live")
        assert (resumed.action, resumed.request) == ("drive", "resume")
        assert operator.rollout("r-live").state == "paused"  # the new controller resumes it
        reverting = control.abort(operator, "r-live", revert=True)
        assert (reverting.action, reverting.request) == ("drive", "abort_revert")
        aborted = control.abort(operator, "r-live")
        assert aborted.action == "applied" and operator.rollout("r-live").state == "aborted"
        with pytest.raises(control.ControlError, match="already aborted"):
            control.pause(operator, "r-live")
        with pytest.raises(control.ControlError, match="already aborted"):
            control.abort(operator, "r-live")
