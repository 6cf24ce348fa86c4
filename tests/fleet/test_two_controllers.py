"""Two controllers on one rollout database: only the owner drives, the other stops."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekit.fleet.registry import fleet_client
from edgekit.fleet.rollout import RolloutController, RolloutOptions, load_release
from edgekit.fleet.simulate import SimulatedFleet
from edgekit.fleet.store import OwnershipLostError, ReleaseBundle, RolloutStore, StoreError
from edgekit.mosquitto import MosquittoBroker
from edgekit.mqtt import BrokerSettings
from tests.fleet.conftest import FleetKit

FLEET = "twins"


class _SpyStore(RolloutStore):
    """The real store, noting the order of heartbeats and bundle records."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls: list[str] = []

    def heartbeat(self, rollout_id: str) -> None:
        self.calls.append("heartbeat")
        super().heartbeat(rollout_id)

    def record_bundle(self, bundle: ReleaseBundle) -> None:
        self.calls.append("record_bundle")
        super().record_bundle(bundle)


def test_heartbeat_during_bundle_publish_and_takeover_stops_the_old_controller(
    tmp_path: Path, mosquitto: MosquittoBroker, fleet_kit: FleetKit
) -> None:
    db = tmp_path / "fleet.db"
    with (
        SimulatedFleet(
            mosquitto.url,
            FLEET,
            6,
            trust_store=fleet_kit.truststore,
            initial_bundle=fleet_kit.active("1.0.0"),
            telemetry_interval_s=0,
        ) as devices,
        _SpyStore(db) as first_store,
        RolloutStore(db) as second_store,
        fleet_client(BrokerSettings(mosquitto.url)) as first_conn,
        fleet_client(BrokerSettings(mosquitto.url)) as second_conn,
    ):
        first = RolloutController(
            connection=first_conn,
            store=first_store,
            fleet=FLEET,
            signers=[fleet_kit.directives],
            poll_s=0.1,
            heartbeat_s=0.0,
        )
        options = RolloutOptions(
            strategy="waves", waves=(0.5, 1.0), soak_s=0, report_timeout_s=60, chunk_size=4096
        )
        rollout_id = first.plan(load_release([fleet_kit.bundle("2.0.0")]), options)
        first_store.calls.clear()
        second = RolloutController(
            connection=second_conn,
            store=second_store,
            fleet=FLEET,
            signers=[fleet_kit.directives],
            poll_s=0.1,
        )
        # While the first one drives (fresh heartbeat), the second may not take over.
        with pytest.raises(StoreError, match="being driven by"):
            second.run(rollout_id)

        def take_over() -> bool:
            # Once the first wave is out, the first controller looks dead (a stale heartbeat)
            # and the second claims the rollout.
            if first_store.waves(rollout_id)[0].state == "active":
                second_store.claim(rollout_id, stale_after_s=0.0)
            return False

        with pytest.raises(OwnershipLostError, match="this controller stops"):
            first.run(rollout_id, stop_when=take_over)
        # The bundle (several 4 KiB chunks) was published with heartbeats going.
        assert "heartbeat" in first_store.calls
        assert first_store.calls.index("heartbeat") < first_store.calls.index("record_bundle")
        # The old owner's writes are refused; the new owner finishes the rollout.
        planned = [t for t in first_store.targets(rollout_id) if t.outcome == "planned"]
        assert planned
        with pytest.raises(OwnershipLostError):
            first_store.record_directives(rollout_id, [(planned[0].device, 1, b"x")])
        assert first_store.rollout(rollout_id).owner == second_store.owner
        result = second.run(rollout_id)
        assert result.state == "completed", result.progress.reason
        devices.wait_idle(timeout_s=20)
        v2 = fleet_kit.active("2.0.0")
        for device_id, device in devices.devices.items():
            assert device.active == v2, device_id
            assert [h[1:] for h in device.history] == [(v2.sha256, "committed")], device_id


def test_directives_are_recorded_only_for_planned_targets(tmp_path: Path) -> None:
    with RolloutStore(tmp_path / "fleet.db") as store:
        store.create_rollout(
            rollout_id="r-1",
            fleet=FLEET,
            kind="rollout",
            spec={},
            waves=[(1.0, ["d1", "d2"])],
            targets=[
                ("d1", "x86-64", 0, "a" * 64, None, "planned"),
                ("d2", "x86-64", 0, "a" * 64, None, "planned"),
            ],
        )
        store.record_directives("r-1", [("d1", 10, b"first")], start_wave=0)
        # A second attempt at the same target (another controller, a replay) records nothing.
        with pytest.raises(OwnershipLostError):
            store.record_directives("r-1", [("d2", 11, b"two"), ("d1", 12, b"again")])
        targets = {t.device: t for t in store.targets("r-1")}
        assert targets["d1"].sequence == 10 and targets["d1"].envelope == b"first"
        assert targets["d2"].outcome == "planned" and targets["d2"].sequence is None
