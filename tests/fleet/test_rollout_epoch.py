"""Security epochs and reverts: a revert never asks a device to go below its floor."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edgekit.bundle import build_bundle, collect_bundle_inputs
from edgekit.fleet.registry import fleet_client
from edgekit.fleet.rollout import (
    RolloutController,
    RolloutError,
    RolloutOptions,
    load_release,
    publish_release,
)
from edgekit.fleet.simulate import Faults, SimulatedFleet, make_device_specs
from edgekit.fleet.store import RolloutStore
from edgekit.messages import BundleId
from edgekit.mosquitto import MosquittoBroker
from edgekit.mqtt import BrokerSettings
from edgekit.topics import Topics
from tests.fleet.conftest import CREATED, FleetKit, _tiny_model

FLEET = "epochs"


def _bundle(kit: FleetKit, folder: Path, version: str, epoch: int) -> Path:
    source = folder / f"src-{version}-{epoch}"
    _tiny_model(source, scale=float(len(version) + epoch), profile="x86-64")
    return build_bundle(
        collect_bundle_inputs(source),
        out_path=folder / f"tiny-{version}-e{epoch}.ekb",
        name="tiny",
        version=version,
        security_epoch=epoch,
        profile="x86-64",
        signers=[kit.bundles_signer],
        created=CREATED,
    )


def _active(path: Path, version: str) -> BundleId:
    return BundleId("tiny", version, hashlib.sha256(path.read_bytes()).hexdigest())


def test_plan_refuses_revert_to_a_lower_epoch(
    mosquitto: MosquittoBroker, tmp_path: Path, fleet_kit: FleetKit
) -> None:
    v1 = fleet_kit.bundle("1.0.0")  # security epoch 0
    v3 = _bundle(fleet_kit, tmp_path, "3.0.0", 1)
    with (
        SimulatedFleet(
            mosquitto.url,
            FLEET,
            3,
            trust_store=fleet_kit.truststore,
            initial_bundle=fleet_kit.active("1.0.0"),
        ),
        RolloutStore(tmp_path / "fleet.db") as store,
        fleet_client(BrokerSettings(mosquitto.url)) as connection,
    ):
        publish_release(connection, store, Topics(FLEET), load_release([v1]).bundles[0])
        controller = RolloutController(
            connection=connection, store=store, fleet=FLEET, signers=[fleet_kit.directives]
        )
        release = load_release([v3], truststore=fleet_kit.truststore)
        with pytest.raises(RolloutError, match=r"security epoch 0, below the 1.*--no-revert"):
            controller.plan(release, RolloutOptions(strategy="all", revert_on_halt=True))
        assert store.rollouts() == []
        # Without revert the rollout can be planned.
        controller.plan(release, RolloutOptions(strategy="all", revert_on_halt=False))


def test_revert_keeps_the_floor_and_reads_the_epoch_from_the_broker(
    mosquitto: MosquittoBroker, tmp_path: Path, fleet_kit: FleetKit
) -> None:
    """v1 and v2 both have epoch 1; v1 was published by another controller (another database),
    so this one learns v1's epoch from the bundle on the broker. The revert must carry
    min_security_epoch 1 (the floor v2's directive set), or devices refuse it."""
    v1 = _bundle(fleet_kit, tmp_path, "1.0.0", 1)
    v2 = _bundle(fleet_kit, tmp_path, "2.0.0", 1)
    specs = make_device_specs(4, profiles=("x86-64",))
    failing = frozenset({specs[0].device_id})
    with (
        SimulatedFleet(
            mosquitto.url,
            FLEET,
            specs,
            trust_store=fleet_kit.truststore,
            initial_bundle=_active(v1, "1.0.0"),
            faults=Faults(fail_health_devices=failing),
        ) as devices,
        RolloutStore(tmp_path / "other.db") as other,
        RolloutStore(tmp_path / "fleet.db") as store,
        fleet_client(BrokerSettings(mosquitto.url)) as connection,
    ):
        publish_release(connection, other, Topics(FLEET), load_release([v1]).bundles[0])
        controller = RolloutController(
            connection=connection,
            store=store,
            fleet=FLEET,
            signers=[fleet_kit.directives],
            poll_s=0.1,
        )
        options = RolloutOptions(strategy="all", max_failure=0.0, soak_s=0.0, report_timeout_s=60)
        rollout_id = controller.plan(load_release([v2]), options)
        known = store.bundle(_active(v1, "1.0.0").sha256)
        assert known is not None and known.security_epoch == 1  # read from the manifest
        result = controller.run(rollout_id)
        devices.wait_idle(timeout_s=20)
        assert result.state == "halted"
        outcomes = {t.device: t.outcome for t in store.targets(rollout_id)}
        for spec in specs:
            device = devices.devices[spec.device_id]
            assert device.active == _active(v1, "1.0.0"), spec.device_id
            assert device.floor.min_security_epoch == 1
            if spec.device_id not in failing:
                assert outcomes[spec.device_id] == "reverted"
                assert device.sent.events["directive_refused"] == 0
