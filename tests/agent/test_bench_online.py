"""The online loop: `edgekit convert --bench-device` sends the candidates to a real agent (this
machine plays the device) over a real Mosquitto as a signed bench request, and chooses by the
numbers the agent sends back. Refusals (unknown key, another device, benching disabled) come
back as events, and a bench never touches the served model or its update state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from edgekit.converters.examples import DigitsExample

from edgekit.fleet.bench import BenchRemoteError, bench_on_device
from edgekit.mosquitto import MosquittoBroker
from edgekit.mqtt import BrokerSettings
from edgekit.topics import Topics
from edgekit.trust import Signer, generate_key, load_private_key
from edgekit.trust.bench import BenchFile, BenchRequest, sign_bench_request
from tests.agent.agent_helpers import (
    DEVICE,
    FLEET,
    AgentProcess,
    Keys,
    Watcher,
    write_config,
    write_truststore,
)
from tests.agent.conftest import Bundles

PASSPHRASE = "passphrase"


@dataclass
class Device:
    agent: AgentProcess
    watcher: Watcher
    data: Path
    home: Path
    url: str
    ops: Signer


def _start(
    tmp_path: Path,
    broker: MosquittoBroker,
    keys: Keys,
    bundles: Bundles,
    *,
    enabled: bool,
    throttle: str = "",
) -> Device:
    # The operator's keyring holds `ops`, the key of the trust store's directives role.
    home = tmp_path / "home"
    generate_key("ops", PASSPHRASE, keyring_dir=home / "keys")
    ops = load_private_key("ops", PASSPHRASE, keyring_dir=home / "keys")
    truststore = write_truststore(replace(keys, directives=ops), tmp_path / "truststore.json")
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "agent.toml",
        data_dir=data,
        truststore=truststore,
        broker_url=broker.url,
        initial_bundle=bundles.v1,
    )
    with config.open("a") as handle:
        handle.write(f"[bench]\nenabled = {'true' if enabled else 'false'}\n")
        handle.write(f'throttle = "{throttle}"\n')
    watcher = Watcher(broker.url)
    agent = AgentProcess(config, data)
    url = agent.url()
    watcher.wait_status(lambda s: s.online and s.state == "committed", what="v1 committed")
    return Device(agent, watcher, data, home, url, ops)


@pytest.fixture
def device(
    tmp_path: Path, mosquitto: MosquittoBroker, agent_keys: Keys, bundles: Bundles
) -> Iterator[Device]:
    # This device runs weight_int8 (the host's choice for the digits CNN) 4x slower.
    started = _start(
        tmp_path, mosquitto, agent_keys, bundles, enabled=True, throttle="weight_int8=4"
    )
    try:
        yield started
    finally:
        started.watcher.close()
        started.agent.stop()


def _files(digits: DigitsExample, tmp_path: Path) -> dict[str, Path]:
    """A host conversion's kept candidates and reference, as the converter sends them."""
    from edgekit.converters import convert

    out = tmp_path / "host"
    convert(
        digits.model_path,
        profile="raspberrypi",
        output_dir=out,
        calibration=digits.calibration_path,
        validation=digits.validation_path,
        benchmark_seconds=0.2,
        keep_candidates=True,
    )
    return {p.name: p for p in sorted((out / "candidates").iterdir())}


def test_convert_bench_device_round_trip_chooses_by_the_devices_numbers(
    device: Device,
    mosquitto: MosquittoBroker,
    agent_keys: Keys,
    digits: DigitsExample,
    tmp_path: Path,
) -> None:
    """The CLI as a user runs it: the device's numbers decide, the report says so."""
    before = device.watcher.statuses[-1]
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "edgekit", "convert", str(digits.model_path), "--profile",
         "raspberrypi", "-o", str(out), "--calibration", str(digits.calibration_path),
         "--validation", str(digits.validation_path), "--bench-device", DEVICE, "--fleet", FLEET,
         "--broker", mosquitto.url, "--key", "ops", "--bench-timeout", "600"],
        capture_output=True, text=True, check=False,
        env={**os.environ, "EDGEKIT_HOME": str(device.home), "EDGEKIT_KEY_PASSPHRASE": PASSPHRASE},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"bench on {DEVICE}:" in done.stderr  # progress while it waits
    assert f"latency measured on device:{DEVICE}" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["decision"]["latency_source"] == f"device:{DEVICE}"
    rows = {row["name"]: row for row in report["candidates"]}
    assert all(
        row["latency"]["source"] == f"device:{DEVICE}" for row in rows.values() if row["latency"]
    )
    # The host chooses weight_int8 (test_determinism); on this device it loses.
    assert report["chosen"] != "weight_int8"
    assert rows["weight_int8"]["comparison"]["verdict"] == "slower"
    kinds = [event.kind for event in device.watcher.events]
    assert "bench_started" in kinds and "bench_done" in kinds
    # The served model and the update state did not move.
    after = device.watcher.statuses[-1]
    assert after.active == before.active and after.state == "committed"
    assert after.last_sequence == before.last_sequence
    assert not (device.data / "bench").exists() or not any((device.data / "bench").iterdir())


def _refusal(device: Device, envelope: bytes) -> str:
    count = len(device.watcher.events)
    topics = Topics(FLEET)
    device.watcher.client.publish(topics.bench(DEVICE), envelope, qos=1).wait(10)
    device.watcher.wait(
        lambda: any(e.kind == "bench_refused" for e in device.watcher.events[count:]),
        timeout=30,
        what="bench_refused",
    )
    event = next(e for e in device.watcher.events[count:] if e.kind == "bench_refused")
    assert event.reason is not None
    return event.reason


def _request(device_id: str = DEVICE) -> BenchRequest:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    return BenchRequest(
        fleet=FLEET,
        device=device_id,
        request_id="bench-test",
        issued_at=now,
        expires_at=now + timedelta(minutes=5),
        files=(BenchFile("fp32.onnx", "a" * 64, 100, f"edgekit/v1/{FLEET}/bundles/{'a' * 64}"),),
    )


def test_bench_requests_that_must_not_run_are_refused_with_events(
    device: Device, agent_keys: Keys
) -> None:
    outsider = sign_bench_request(_request(), [agent_keys.outsider])
    reason = _refusal(device, outsider)
    assert "not a valid bench request" in reason and "key" in reason
    other = sign_bench_request(_request("dev-2"), [device.ops])
    assert "dev-2" in _refusal(device, other)
    before = device.watcher.statuses[-1]
    time.sleep(0.5)
    assert device.watcher.statuses[-1].active == before.active


def test_a_device_with_benching_disabled_refuses(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    agent_keys: Keys,
    bundles: Bundles,
    digits: DigitsExample,
) -> None:
    disabled = _start(tmp_path, mosquitto, agent_keys, bundles, enabled=False)
    try:
        envelope = sign_bench_request(_request(), [disabled.ops])
        assert "[bench] enabled = true" in _refusal(disabled, envelope)
        # The converter hears the refusal instead of waiting for its timeout.
        with pytest.raises(BenchRemoteError, match="refused the bench request"):
            bench_on_device(
                _files(digits, tmp_path),
                device=DEVICE,
                fleet=FLEET,
                settings=BrokerSettings(mosquitto.url),
                signers=[disabled.ops],
                timeout_s=60,
            )
    finally:
        disabled.watcher.close()
        disabled.agent.stop()
