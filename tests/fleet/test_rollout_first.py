"""A fleet's first model (issue 14, items 1 and 2): devices that run no model yet.

Real Mosquitto, simulated Raspberry Pi devices with no initial bundle, and the `edgekit fleet
rollout` CLI with the README's flags. With no previous version there is nothing to regress
from: the latency gate judges the profile's latency budget and says so, every wait prints what
it waits for and until when, and a halt says in words what happened to devices that had no
model to go back to.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from edgekit.fleet.simulate import Faults, SimulatedFleet, make_device_specs
from edgekit.mosquitto import MosquittoBroker
from tests.fleet.conftest import KEY_NAME, FleetKit

FLEET = "plant"
PROFILE = "raspberrypi"


def _fleet(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgekit", "fleet", *args]


def _rollout(kit: FleetKit, broker: str, db: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _fleet(
            "rollout",
            str(kit.bundle("1.0.0", PROFILE)),
            "--fleet",
            FLEET,
            "--key",
            KEY_NAME,
            "--db",
            str(db),
            "--broker",
            broker,
            *flags,
        ),
        env=kit.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_first_rollout_with_the_readme_flags_completes_and_says_what_it_waits_for(
    tmp_path: Path, mosquitto: MosquittoBroker, fleet_kit: FleetKit
) -> None:
    db = tmp_path / "fleet.db"
    specs = make_device_specs(10, profiles=(PROFILE,))
    with SimulatedFleet(
        mosquitto.url,
        FLEET,
        specs,
        trust_store=fleet_kit.truststore,
        telemetry_interval_s=0.3,
    ) as devices:
        assert all(d.active is None for d in devices.devices.values())
        # The README's flags; a short report timeout, so a gate that waits for a baseline
        # that can never come fails the test in seconds instead of hanging it.
        run = _rollout(
            fleet_kit,
            mosquitto.url,
            db,
            "--strategy",
            "canary",
            "--canary",
            "5%",
            "--max-failure",
            "2%",
            "--max-latency-regression",
            "20%",
            "--soak",
            "1s",
            "--report-timeout",
            "25s",
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert all(d.active is not None for d in devices.devices.values())
    # It says up front that there is no baseline and what latency is judged against ...
    assert "no baseline: first deployment" in run.stderr
    assert "latency budget of profile raspberrypi (200 ms)" in run.stderr
    # ... and every wait on a gate names the gate, what it waits for and until when.
    waits = [line for line in run.stderr.splitlines() if ": waiting for " in line]
    assert waits, run.stderr[-3000:]
    assert all(re.search(r"until \d\d:\d\d:\d\d", line) for line in waits), waits
    assert any("soak (soaking 1 s after the last report) until" in line for line in waits)
    assert "wave 0 passed: " in run.stderr
    assert re.search(r"rollout \S+: completed: 10 devices updated to tiny 1\.0\.0", run.stdout)

    status = subprocess.run(
        _fleet("status", "--json", "--db", str(db)),
        env=fleet_kit.env(),
        capture_output=True,
        text=True,
        check=True,
    )
    document = json.loads(status.stdout)
    assert document["state"] == "completed"
    # The stored gate result says how latency was judged.
    first = document["waves"][0]["detail"]
    assert "no baseline: first deployment, latency judged against the latency budget" in first
    assert "% of the budget" in first


def test_first_install_halt_says_devices_are_left_without_a_model(
    tmp_path: Path, mosquitto: MosquittoBroker, fleet_kit: FleetKit
) -> None:
    db = tmp_path / "fleet.db"
    specs = make_device_specs(6, profiles=(PROFILE,))
    failing = specs[0].device_id
    with SimulatedFleet(
        mosquitto.url,
        FLEET,
        specs,
        trust_store=fleet_kit.truststore,
        faults=Faults(fail_health_devices=frozenset({failing})),
        telemetry_interval_s=0,
    ) as devices:
        run = _rollout(
            fleet_kit,
            mosquitto.url,
            db,
            "--strategy",
            "all",
            "--max-failure",
            "2%",
            "--soak",
            "0s",
            "--report-timeout",
            "30s",
        )
        devices.wait_idle(timeout_s=20)
        assert devices.devices[failing].active is None
    # A halt, not a failed revert: exit 3 (5 means some device could not be reverted).
    assert run.returncode == 3, run.stdout[-3000:] + run.stderr[-3000:]
    summary = next(line for line in run.stdout.splitlines() if re.match(r"rollout \S+: ", line))
    # Devices on their way when the gate failed are followed until they report.
    assert summary.split(": ", 1)[1] == (
        "halted: 1 device failed its health check and is left without a model (it ran none "
        "before); 5 devices that ran no model before keep tiny 1.0.0 (nothing to revert to)"
    ), summary
    # The gate's reason is in the rollout's own output too.
    assert "wave 0 halted: failure_ratio: 1/6 failed" in run.stderr

    status = subprocess.run(
        _fleet("status", "--json", "--devices", "--db", str(db)),
        env=fleet_kit.env(),
        capture_output=True,
        text=True,
        check=True,
    )
    document = json.loads(status.stdout)
    assert document["state"] == "halted" and "revert_failed" not in document["counts"]
    assert document["counts"]["failed"] == 1 and document["counts"]["no_previous"] == 5
    assert document["summary"] == summary.split(": ", 1)[1]
    others = [d for d in document["devices"] if d["device"] != failing]
    assert all(d["outcome"] == "no_previous" for d in others), others
    assert all(d["detail"].endswith("nothing to revert to; keeps tiny 1.0.0") for d in others)
