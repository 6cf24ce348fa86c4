"""Over-the-air trust rotation, end to end: a fleet of a real agent and simulated devices on a
real Mosquitto rotates its release key with `edgekit fleet trust`; afterwards a bundle signed
by the old key is refused everywhere, one signed by the new key installs, and the agent
restarted with its old trust store file keeps the rotated one (its floor)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from edgekit.agent.store import Store

from edgekit.fleet.simulate import SimulatedFleet
from edgekit.messages import BundleId
from edgekit.mosquitto import MosquittoBroker
from edgekit.topics import Topics
from edgekit.trust import Signer, load_truststore, parse_truststore_envelope, sign_truststore
from tests.agent.agent_helpers import (
    DEVICE,
    FLEET,
    REPO,
    AgentProcess,
    Keys,
    Watcher,
    agent_config,
    directive_for,
    linear_model,
    make_bundle,
    sha_of,
    write_truststore,
)
from tests.agent.conftest import Bundles

SIMULATED = "sim-0000"


def _event(watcher: Watcher, device: str, kind: str, sequence: int) -> str:
    """Wait for `device`'s event `kind` about directive `sequence`; its reason."""

    def found() -> list[str]:
        return [
            e.reason or ""
            for e in watcher.events
            if e.device == device and e.kind == kind and e.sequence == sequence
        ]

    watcher.wait(lambda: bool(found()), timeout=60, what=f"{device}: {kind} of {sequence}")
    return found()[0]


def test_release_key_rotation_over_the_air(
    tmp_path: Path, agent_keys: Keys, bundles: Bundles, request: pytest.FixtureRequest
) -> None:
    # Trust store v1 (release key K1 = agent_keys.bundles) and v2 (K1 replaced by K2).
    v1_path = write_truststore(agent_keys, tmp_path / "truststore.json")
    v1 = load_truststore(v1_path.read_bytes())
    new_release = Signer.generate()
    v2 = (
        v1.with_key("bundles", new_release.public_key)
        .without_key("bundles", agent_keys.bundles.keyid)
        .next_version()
    )
    v2_path = tmp_path / "truststore-v2.json"
    v2_path.write_bytes(sign_truststore(v2, [agent_keys.root]))
    signed_by_new = make_bundle(
        tmp_path / "new",
        agent_keys,
        version="7.0.0",
        model=lambda p: linear_model(p, seed=7),
        signer=new_release,
    )
    broker = MosquittoBroker(tmp_path / "mosquitto")
    broker.start()
    request.addfinalizer(broker.stop)  # also when an assertion below fails
    watcher = Watcher(broker.url)
    watcher.follow(Topics(FLEET).all_devices("events"))
    config, data = agent_config(
        tmp_path,
        agent_keys,
        broker_url=broker.url,
        initial_bundle=bundles.v1,
        probation_s=0.3,
        truststore=v1_path,
    )
    agent = AgentProcess(config, data)
    v1_bundle = BundleId("demo", "1.0.0", sha_of(bundles.v1))
    simulated = SimulatedFleet(
        broker.url, FLEET, 2, trust_store=v1, initial_bundle=v1_bundle, telemetry_interval_s=0
    )
    try:
        agent.url()
        simulated.start()
        watcher.publish_bundle(bundles.v2)
        watcher.publish_bundle(signed_by_new)

        # The operator delivers the rotation: the chain v1, v2, retained on the trust topic.
        done = subprocess.run(
            [sys.executable, "-m", "edgekit", "fleet", "trust", str(v1_path), str(v2_path),
             "--fleet", FLEET, "--broker", broker.url],
            capture_output=True, text=True, cwd=REPO, check=False, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "versions up to 2" in done.stdout
        watcher.wait(
            lambda: any(
                e.device == DEVICE and e.kind == "trust_updated" and e.details.get("version") == 2
                for e in watcher.events
            ),
            timeout=60,
            what="the agent to apply trust store version 2",
        )
        deadline = time.monotonic() + 30
        while simulated.trust_store.version != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert simulated.trust_store.version == 2
        assert parse_truststore_envelope(Store(data).trust_floor() or b"")[0].version == 2

        # A bundle signed by the old release key is refused, by the agent and the simulator.
        watcher.publish_directive(
            directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0")
        )
        assert "signature" in _event(watcher, DEVICE, "bundle_refused", 1)
        watcher.client.publish(
            Topics(FLEET).desired(SIMULATED),
            directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0", device=SIMULATED),
            qos=1,
            retain=True,
        ).wait(10)
        assert "signature" in _event(watcher, SIMULATED, "bundle_refused", 1)
        status = watcher.wait_status(
            lambda s: s.last_sequence >= 1 and s.state == "rolled_back", what="refused"
        )
        assert status.active is not None and status.active.sha256 == sha_of(bundles.v1)

        # One signed by the new release key installs.
        watcher.publish_directive(
            directive_for(signed_by_new, agent_keys, sequence=2, version="7.0.0")
        )
        _event(watcher, DEVICE, "committed", 2)
        watcher.client.publish(
            Topics(FLEET).desired(SIMULATED),
            directive_for(signed_by_new, agent_keys, sequence=2, version="7.0.0", device=SIMULATED),
            qos=1,
            retain=True,
        ).wait(10)
        _event(watcher, SIMULATED, "committed", 2)
    finally:
        simulated.stop()
        assert agent.stop() == 0, agent.output()

    # Restarted with the old trust store file still provisioned: the floor (v2) stays.
    assert v1_path.read_bytes() == sign_truststore(v1, [agent_keys.root])
    restarted = time.time()
    again = AgentProcess(config, data)
    try:
        again.url()
        watcher.publish_directive(
            directive_for(bundles.v2, agent_keys, sequence=3, version="2.0.0")
        )
        assert "signature" in _event(watcher, DEVICE, "bundle_refused", 3)
        assert "accepted version 2 before and keeps it" in again.log.read_text()
        status_command = ["status", "--json", "--config", str(config)]
        shown = subprocess.run(
            [sys.executable, "-m", "edgekit.cli.agent", *status_command],
            capture_output=True, text=True, cwd=REPO, check=True, timeout=60,
        )  # fmt: skip
        assert json.loads(shown.stdout)["trust_version"] == 2
        status = watcher.wait_status(
            lambda s: s.ts >= restarted and s.last_sequence >= 3, what="the restarted agent"
        )
        assert status.active is not None and status.active.sha256 == sha_of(signed_by_new)
    finally:
        assert again.stop() == 0, again.output()
        watcher.close()
        broker.stop()
