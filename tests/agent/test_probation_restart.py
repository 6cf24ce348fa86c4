"""A restart during probation resumes the window and the latency baseline of the replaced
model (persisted in `probation.json` before the swap): real store, ModelHost, onnxruntime."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from edgekit.agent.daemon import describe_state
from edgekit.agent.journal import Journal
from edgekit.agent.serving import ModelHost
from edgekit.agent.updater import PROBATION_SCHEMA, remaining_probation_s

from tests.agent.agent_helpers import (
    INPUT,
    Keys,
    directive_for,
    make_bundle,
    sample_inputs,
    sha_of,
    slow_model,
    write_config,
    write_truststore,
)
from tests.agent.conftest import Bundles, Device, start_device

PROBATION_S = 3.0
SETTINGS = "min_probation_requests = 3\nshadow = true\nshadow_agreement = 0.0"

Build = Callable[[], Device]


@pytest.fixture(scope="module")
def slow_bundle(tmp_path_factory: pytest.TempPathFactory, agent_keys: Keys) -> Path:
    """Within the latency budget below, but many times slower than v1 (a p95 regression)."""
    work = tmp_path_factory.mktemp("slow-ok")
    return make_bundle(
        work, agent_keys, version="3.1.0", model=lambda p: slow_model(p, seed=3, size=512)
    )


@pytest.fixture
def build(tmp_path: Path, agent_keys: Keys, bundles: Bundles, slow_bundle: Path) -> Iterator[Build]:
    """Start an updater over the same data directory each call (an agent restart)."""
    hosts: list[ModelHost] = []
    truststore = write_truststore(agent_keys, tmp_path / "truststore.json")
    config_path = write_config(
        tmp_path / "agent.toml",
        data_dir=tmp_path / "data",
        truststore=truststore,
        initial_bundle=bundles.v1,
        probation_s=PROBATION_S,
        max_latency_ms=10_000.0,
        extra_update=SETTINGS,
    )
    text = config_path.read_text()
    config_path.write_text(
        text.replace("max_latency_regression = 1000.0", "max_latency_regression = 3.0")
    )

    def _build() -> Device:
        device = start_device(config_path, truststore, [bundles.v1, bundles.v2, slow_bundle], hosts)
        assert device.config.update.max_latency_regression == 3.0
        return device

    yield _build
    for host in hosts:
        host.close()


class Traffic:
    """Requests against whichever host currently serves (it changes at the restart)."""

    def __init__(self, host: ModelHost) -> None:
        self.host = host
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._x = sample_inputs(1)[0]

    def _run(self) -> None:
        while not self._done.is_set():
            with contextlib.suppress(Exception):  # the host counts the failures
                self.host.infer({INPUT: self._x})
            time.sleep(0.002)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()


def _wait(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _interrupt_in_probation(device: Device, envelope: bytes) -> dict[str, object]:
    """Run the update until probation has checkpointed some observed time, then stop the
    agent (the journal stays in probation, as after a crash). Returns the probation record."""
    stop = threading.Event()
    worker = threading.Thread(
        target=device.updater.process, args=(envelope,), kwargs={"stop": stop}
    )
    worker.start()

    def checkpointed() -> bool:
        record = device.store.probation()
        return (
            device.updater.record.state == "probation"
            and record is not None
            and float(record.get("observed_s", 0.0)) > 0.0
        )

    try:
        _wait(checkpointed, "a probation checkpoint")
    finally:
        stop.set()
        worker.join(timeout=30)
    assert Journal(device.store.journal_path).read().state == "probation"
    record = device.store.probation()
    assert record is not None
    return record


def _finish(device: Device) -> None:
    stop = threading.Event()
    worker = threading.Thread(target=device.updater.run, args=(stop,), daemon=True)
    worker.start()
    try:
        _wait(
            lambda: device.updater.record.state in ("committed", "rolled_back"),
            "the resumed update to end",
        )
    finally:
        stop.set()
        worker.join(timeout=30)


def _last_probation_details(device: Device) -> dict[str, object]:
    events = [e for e in device.recorder.of("state") if e.state == "probation"]
    assert events, device.recorder.kinds()
    return dict(events[-1].details)


def test_restart_in_probation_still_rolls_back_a_latency_regression(
    build: Build, slow_bundle: Path, agent_keys: Keys, bundles: Bundles
) -> None:
    device = build()
    with Traffic(device.host) as traffic:
        _wait(lambda: device.host.since_activation().requests >= 50, "baseline traffic")
        envelope = directive_for(slow_bundle, agent_keys, sequence=1, version="3.1.0")
        record = _interrupt_in_probation(device, envelope)
        # The baseline was persisted before the swap and survives the restart.
        assert record["schema"] == PROBATION_SCHEMA and record["sequence"] == 1
        assert record["bundle_sha256"] == sha_of(slow_bundle)
        baseline = record["baseline"]
        assert isinstance(baseline, dict) and baseline["requests"] >= 50
        assert baseline["p95_ms"] is not None and baseline["p95_ms"] > 0
        shown = describe_state(device.config)["probation"]  # `edgekit-agent status`
        assert shown["sequence"] == 1 and shown["baseline"]["p95_ms"] == baseline["p95_ms"]
        device.host.close()

        again = build()  # the restart: a fresh host serving the slow model, no live baseline
        assert again.host.bundle is not None and again.host.bundle.sha256 == sha_of(slow_bundle)
        assert again.host.previous_snapshot() is None
        assert again.store.probation() is not None
        traffic.host = again.host
        _finish(again)

    assert again.updater.record.state == "rolled_back", again.recorder.kinds()
    reason = again.updater.record.reason or ""
    assert "p95 latency" in reason, reason
    assert again.host.bundle is not None and again.host.bundle.sha256 == sha_of(bundles.v1)
    details = _last_probation_details(again)
    assert details["resumed"] is True and details["baseline_source"] == "persisted"
    assert details["baseline_p95_ms"] == baseline["p95_ms"]
    assert not again.store.probation_path.exists()


def test_restart_in_probation_of_a_healthy_model_resumes_the_window_and_commits(
    build: Build, agent_keys: Keys, bundles: Bundles
) -> None:
    device = build()
    with Traffic(device.host) as traffic:
        _wait(lambda: device.host.since_activation().requests >= 20, "baseline traffic")
        envelope = directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0")
        record = _interrupt_in_probation(device, envelope)
        before = _last_probation_details(device)  # the probation before the restart
        assert before["resumed"] is False and before["shadow"] is True
        assert before["baseline_source"] == "live"
        observed = float(str(record["observed_s"]))
        assert 0.0 < observed < PROBATION_S
        device.host.close()

        again = build()
        traffic.host = again.host
        _finish(again)

    assert again.updater.record.state == "committed", again.recorder.kinds()
    assert again.host.bundle is not None and again.host.bundle.sha256 == sha_of(bundles.v2)
    details = _last_probation_details(again)
    assert details["resumed"] is True
    # Neither restarted from zero nor shortened by the downtime: the recorded remainder.
    assert details["remaining_s"] == pytest.approx(PROBATION_S - observed, abs=1e-3)
    assert details["baseline_source"] == "persisted"
    assert details["shadow"] is False and "restart" in str(details["shadow_note"])
    assert not again.store.probation_path.exists()
    assert Journal(again.store.journal_path).read().probation_restarts == 1


@pytest.mark.parametrize(
    ("observed", "remaining"),
    [(0.0, 10.0), (4.0, 6.0), (9.5, 1.0), (50.0, 1.0), (-3.0, 10.0), (math.nan, 10.0)],
)
def test_remaining_probation_is_the_recorded_remainder_bounded(
    observed: float, remaining: float
) -> None:
    assert remaining_probation_s(10.0, observed) == pytest.approx(remaining)


def test_a_normal_update_removes_the_probation_record(
    build: Build, agent_keys: Keys, bundles: Bundles
) -> None:
    device = build()
    x = sample_inputs(1)[0]
    for _ in range(5):
        device.host.infer({INPUT: np.asarray(x)})
    device.process(directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0"))
    assert device.updater.record.state == "committed"
    assert not device.store.probation_path.exists()
