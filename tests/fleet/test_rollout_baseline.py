"""The latency gate's baseline survives a controller crash: it lives in the rollout store.

Real Mosquitto, simulated devices and the `edgekit fleet rollout` CLI: the controller is
SIGKILLed after wave 0 and resumed with `edgekit fleet rollout resume ID`. Telemetry is
switched off while no controller runs and back on only once every device of the last wave
runs the new bundle, so the resumed controller never hears a device on the old version: the
baseline can only come from the store.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekit.fleet.cohorts import assign_waves
from edgekit.fleet.simulate import Faults, SimulatedFleet, make_device_specs
from edgekit.fleet.store import RolloutStore
from edgekit.mosquitto import MosquittoBroker
from tests.fleet.conftest import KEY_NAME, FleetKit
from tests.fleet.tools_helpers import wait_for

FLEET = "plant"
DEVICES = 10
WAVES = (0.2, 1.0)
TELEMETRY_S = 0.2


def _edgekit(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgekit", "fleet", *args]


def _last_wave_devices() -> frozenset[str]:
    """The devices the rollout puts in its last wave (the planner's deterministic split)."""
    specs = make_device_specs(DEVICES)
    waves = assign_waves({s.device_id: s.profile for s in specs}, WAVES)
    return frozenset(waves[-1])


@pytest.mark.parametrize("slow_release", [False, True], ids=["healthy", "slow"])
def test_latency_baseline_survives_a_controller_crash(
    slow_release: bool, tmp_path: Path, mosquitto: MosquittoBroker, fleet_kit: FleetKit
) -> None:
    db = tmp_path / "fleet.db"
    common = ["--db", str(db), "--broker", mosquitto.url, "--key", KEY_NAME]
    last_wave = _last_wave_devices()
    # "slow": the release triples latency on the last wave's devices only, so wave 0 passes
    # before the crash and the regression shows only to the resumed controller.
    faults = Faults(slow_devices=last_wave) if slow_release else Faults()
    with SimulatedFleet(
        mosquitto.url,
        FLEET,
        DEVICES,
        trust_store=fleet_kit.truststore,
        initial_bundle=fleet_kit.active("1.0.0"),
        faults=faults,
        telemetry_interval_s=TELEMETRY_S,
    ) as devices:
        controller = subprocess.Popen(
            _edgekit(
                "rollout",
                str(fleet_kit.bundle("2.0.0")),
                "--fleet",
                FLEET,
                "--strategy",
                "waves",
                "--waves",
                ",".join(f"{w:.0%}" for w in WAVES),
                "--soak",
                "1s",
                "--report-timeout",
                "20s",
                "--max-latency-regression",
                "50%",
                "--no-revert",
                "--json",
                *common,
            ),
            env=fleet_kit.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        store: RolloutStore | None = None
        try:

            def wave_0_passed_with_baseline() -> bool:
                nonlocal store
                if store is None:
                    if not db.exists():
                        return False
                    store = RolloutStore(db)
                latest = store.latest_rollout()
                return (
                    latest is not None
                    and latest.current_wave >= 1
                    and len(store.baselines(latest.id)) >= len(last_wave)
                )

            wait_for(wave_0_passed_with_baseline, timeout_s=60, what="wave 0 to pass")
            controller.send_signal(signal.SIGKILL)
            controller.wait(timeout=10)
        finally:
            if controller.poll() is None:
                controller.kill()
        devices.set_telemetry_interval(0)  # nobody hears the old version from here on
        assert store is not None
        record = store.latest_rollout()
        assert record is not None and record.state == "running"  # killed, not finished
        rollout_id = record.id
        v1 = fleet_kit.active("1.0.0").sha256
        baselines = store.baselines(rollout_id)
        assert set(baselines) >= last_wave
        assert {sha for sha, _ in baselines.values()} == {v1}
        time.sleep(3 * TELEMETRY_S)  # telemetry still in flight is gone before the resume

        resumed = subprocess.Popen(
            _edgekit("rollout", "resume", rollout_id, "--json", *common),
            env=fleet_kit.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for(
                lambda: all(t.outcome == "succeeded" for t in store.targets(rollout_id, wave=1)),
                timeout_s=60,
                what="the last wave to update",
            )
            devices.set_telemetry_interval(TELEMETRY_S)
            out, err = resumed.communicate(timeout=60)
        finally:
            if resumed.poll() is None:
                resumed.kill()
        store.close()
        outcome = json.loads(out)
        if slow_release:
            assert resumed.returncode == 3, err.decode()[-2000:]
            assert outcome["state"] == "halted"
            reason = outcome.get("reason") or ""
            assert "wave 1 halted" in reason and "latency_regression: p95" in reason, reason
        else:
            assert resumed.returncode == 0, err.decode()[-2000:]
            assert outcome["state"] == "completed", outcome
            assert outcome["counts"] == {"succeeded": DEVICES}


def test_baselines_are_one_row_per_device_and_bundle(tmp_path: Path) -> None:
    with RolloutStore(tmp_path / "fleet.db") as store:
        store.record_baselines("r1", [("d1", "aa", 5.0), ("d2", "aa", 6.0)])
        store.record_baselines("r1", [("d1", "aa", 7.0)])
        store.record_baselines("r2", [("d1", "bb", 1.0)])
        assert store.baselines("r1") == {"d1": ("aa", 7.0), "d2": ("aa", 6.0)}
        assert store.baselines("r2") == {"d1": ("bb", 1.0)}
        assert store.baselines("r3") == {}
        rows = store._db.execute("SELECT count(*) FROM baselines").fetchone()[0]
        assert rows == 3


def test_a_database_from_before_baselines_opens_and_keeps_its_rollouts(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    with RolloutStore(path) as store:
        store.create_rollout(
            rollout_id="old", fleet=FLEET, kind="rollout", spec={}, waves=[], targets=[]
        )
    # What an earlier edgekit wrote: the same file without the baselines table.
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE baselines")
    with RolloutStore(path) as store:
        assert store.rollout("old").fleet == FLEET
        assert store.baselines("old") == {}
        store.record_baselines("old", [("d1", "aa", 2.5)])
        assert store.baselines("old") == {"d1": ("aa", 2.5)}
        schema = store._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0]
        assert schema == "1"
