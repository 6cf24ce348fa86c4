"""End to end: `edgekit-agent run` as a real process against a real Mosquitto."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgekit.mosquitto import MosquittoBroker
from tests.agent.agent_helpers import (
    AgentProcess,
    Hammer,
    Keys,
    Watcher,
    directive_for,
    sha_of,
    write_config,
    write_truststore,
)
from tests.agent.conftest import Bundles


def test_update_commits_then_a_bad_bundle_rolls_back_with_zero_failed_requests(
    tmp_path: Path, mosquitto: MosquittoBroker, bundles: Bundles, agent_keys: Keys
) -> None:
    truststore = write_truststore(agent_keys, tmp_path / "truststore.json")
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "agent.toml",
        data_dir=data,
        truststore=truststore,
        broker_url=mosquitto.url,
        initial_bundle=bundles.v1,
        probation_s=1.0,
    )
    watcher = Watcher(mosquitto.url)
    agent = AgentProcess(config, data)
    hammer = None
    try:
        url = agent.url()
        watcher.wait_status(
            lambda s: (
                s.online
                and s.state == "committed"
                and s.active is not None
                and s.active.version == "1.0.0"
            ),
            what="v1 committed",
        )
        hammer = Hammer(url)
        watcher.publish_bundle(bundles.v2)
        watcher.publish_directive(
            directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0")
        )
        status = watcher.wait_status(
            lambda s: s.state == "committed" and s.last_sequence >= 1,
            what="v2 committed",
        )
        assert status.active is not None and status.active.sha256 == sha_of(bundles.v2)
        assert status.previous is not None and status.previous.version == "1.0.0"
        watcher.wait(
            lambda: any(e.kind == "committed" and e.sequence == 1 for e in watcher.events),
            timeout=10,
            what="committed event",
        )
        states = [e.state for e in watcher.events if e.kind == "state" and e.sequence == 1]
        assert states[:3] == ["downloading", "verifying", "installing"]
        assert states[-1] == "committed"

        for sequence, bad, version in ((2, bundles.nan, "3.0.1"), (3, bundles.slow, "3.0.2")):
            watcher.publish_bundle(bad)
            watcher.publish_directive(
                directive_for(bad, agent_keys, sequence=sequence, version=version)
            )
            status = watcher.wait_status(
                lambda s, q=sequence: s.state == "rolled_back" and s.last_sequence >= q,
                what=f"v{version} rolled back",
            )
            assert status.active is not None and status.active.sha256 == sha_of(bundles.v2)
            watcher.wait(
                lambda q=sequence: any(
                    e.kind == "rolled_back" and e.sequence == q and e.reason for e in watcher.events
                ),
                timeout=10,
                what="rolled_back event",
            )

        ok_before = hammer.ok
        watcher.wait(lambda: hammer.ok > ok_before + 5, timeout=10, what="requests on v2")
        hammer.stop()
        assert hammer.failures == [], hammer.failures[:5]
        assert hammer.ok > 50

        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "edgekit.cli.agent",
                "status",
                "--json",
                "--config",
                str(config),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        local = json.loads(result.stdout)
        assert local["active"]["version"] == "2.0.0" and local["state"] == "rolled_back"
        assert local["last_sequence"] == 3 and len(local["bad_bundles"]) == 2
    finally:
        if hammer is not None:
            hammer.stop()
        code = agent.stop()
        watcher.close()
    assert code == 0, agent.output()
