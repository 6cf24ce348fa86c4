"""`edgekit fleet devices --wait-for N`: waits, says so, exits 4 when devices do not come."""

from __future__ import annotations

import subprocess
import sys

from edgekit.fleet.simulate import SimulatedFleet
from edgekit.mosquitto import MosquittoBroker
from tests.fleet.conftest import FleetKit


def _devices(broker: MosquittoBroker, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgekit", "fleet", "devices", "--fleet", "plant",
         "--broker", broker.url, *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_wait_for_devices_that_never_come_exits_4_saying_so(mosquitto: MosquittoBroker) -> None:
    done = _devices(mosquitto, "--wait-for", "3", "--timeout", "1")
    assert done.returncode == 4, done.stderr
    assert "waiting for 3 devices online: 0 so far (until " in done.stderr
    assert "only 0 of 3 devices came online within 1 s" in done.stderr


def test_wait_for_devices_that_start_later(mosquitto: MosquittoBroker, fleet_kit: FleetKit) -> None:
    waiting = subprocess.Popen(
        [sys.executable, "-m", "edgekit", "fleet", "devices", "--fleet", "plant",
         "--broker", mosquitto.url, "--wait-for", "4", "--timeout", "60", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    fleet = SimulatedFleet(mosquitto.url, "plant", 4, trust_store=fleet_kit.truststore)
    try:
        fleet.start()
        out, err = waiting.communicate(timeout=60)
    finally:
        fleet.stop()
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, err
    assert "4 devices online" in err
    assert '"online": true' in out
