"""The road a Raspberry Pi takes, minus the board: `edgekit-agent run`, installed with the
`agent` extra alone (aarch64 wheels, no tensorflow, no onnx), runs under user-mode QEMU as a
Cortex-A76, connects to a real Mosquitto on the host's loopback, receives a signed directive
and the bundle over MQTT chunks, health-checks it with the aarch64 onnxruntime, commits it and
answers REST inference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekit.emulation import EmulationCache, emulation_env
from edgekit.mosquitto import MosquittoBroker
from tests.agent.agent_helpers import (
    REPO,
    AgentProcess,
    Keys,
    Watcher,
    directive_for,
    infer,
    linear_model,
    make_bundle,
    run_model,
    sample_inputs,
    sha_of,
    write_config,
    write_truststore,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def agent_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(folder)]
    subprocess.run([*command, str(REPO)], check=True)
    (wheel,) = folder.glob("edgekit-*.whl")
    return wheel


def test_agent_serves_a_bundle_on_an_emulated_pi(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    agent_keys: Keys,
    agent_wheel: Path,
    runtime_cache: Path,
) -> None:
    environment = EmulationCache(runtime_cache).environment(
        [f"edgekit[agent] @ {agent_wheel.as_uri()}"],
        label=f"edgekit-agent-{agent_wheel.stat().st_mtime_ns}",
        modules=("edgekit.cli.agent", "onnxruntime", "paho.mqtt.client"),
    )
    installed = {p.name.lower() for p in environment.site_packages.iterdir()}
    assert "onnxruntime" in installed and "paho" in installed
    assert not {"tensorflow", "onnx", "tf2onnx"} & installed  # the agent extra alone

    bundle = make_bundle(
        tmp_path, agent_keys, version="1.0.0", model=lambda p: linear_model(p, seed=1),
        profile="raspberrypi",
    )  # fmt: skip
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "agent.toml",
        data_dir=data,
        truststore=write_truststore(agent_keys, tmp_path / "truststore.json"),
        broker_url=mosquitto.url,
        probation_s=1.0,
        max_latency_ms=5000.0,  # the emulator's latency, not a Pi's
        profile="raspberrypi",
    )
    watcher = Watcher(mosquitto.url)
    agent = AgentProcess(
        config,
        data,
        env=emulation_env(),
        python=environment.command(["-I"], cpu="cortex-a76"),  # -I: not the checkout
    )
    try:
        url = agent.url(timeout=600)
        watcher.wait_status(lambda s: s.online, timeout=600, what="the emulated agent online")
        watcher.publish_bundle(bundle)
        watcher.publish_directive(directive_for(bundle, agent_keys, sequence=1, version="1.0.0"))
        status = watcher.wait_status(
            lambda s: s.state == "committed" and s.last_sequence >= 1,
            timeout=900,
            what="the bundle committed on the emulated Pi",
        )
        assert status.active is not None and status.active.sha256 == sha_of(bundle)
        states = [e.state for e in watcher.events if e.kind == "state" and e.sequence == 1]
        assert states[:3] == ["downloading", "verifying", "installing"]
        x = sample_inputs(1, seed=5)[0]
        answer = infer(url, x, timeout=300)
        # Computed by the aarch64 onnxruntime under emulation, checked against the host's.
        np.testing.assert_allclose(
            answer, run_model(bundle_model(tmp_path), x), rtol=1e-4, atol=1e-5
        )
    finally:
        code = agent.stop()
        watcher.close()
    assert code == 0, agent.output()
    assert "qemu-aarch64" in " ".join(map(str, agent.process.args))


def bundle_model(workdir: Path) -> Path:
    return workdir / "src-1.0.0" / "model.onnx"
