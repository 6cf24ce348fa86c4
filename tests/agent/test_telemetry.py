"""Request statistics, drift (PSI against the converter's reference stats), resources and the
telemetry message."""

from __future__ import annotations

import json
import math
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgekit.agent.telemetry import (
    DriftMonitor,
    RequestStats,
    Resources,
    ResourceSampler,
    StatsSnapshot,
    build_telemetry,
    psi,
    read_rss_bytes,
    read_temperature_c,
    resource_usage,
)
from edgekit.converters.data import Dataset
from edgekit.converters.outputs import reference_stats

from edgekit.messages import BundleId, Telemetry
from edgekit.runtimes import TensorSpec

# -- request stats -----------------------------------------------------------------------


def test_percentiles_are_within_one_bucket_of_exact() -> None:
    latencies = np.random.default_rng(0).lognormal(mean=math.log(0.004), sigma=0.8, size=20000)
    stats = RequestStats()
    for index, latency in enumerate(latencies):
        stats.record(float(latency), ok=index % 10 != 0)
    snapshot = stats.snapshot()
    assert (snapshot.requests, snapshot.errors) == (20000, 2000)
    assert snapshot.error_ratio == pytest.approx(0.1)
    for found, q in ((snapshot.p50_ms, 50), (snapshot.p95_ms, 95), (snapshot.p99_ms, 99)):
        exact = float(np.percentile(latencies, q)) * 1e3
        assert found == pytest.approx(exact, rel=0.05), q
    assert snapshot.max_ms == pytest.approx(latencies.max() * 1e3)
    assert snapshot.latency_ms().keys() == {"p50", "p95", "p99"}


def test_identical_latencies_are_reported_exactly() -> None:
    stats = RequestStats()
    for _ in range(50):
        stats.record(0.0123, ok=True)
    snapshot = stats.snapshot()
    assert snapshot.p50_ms == snapshot.p99_ms == pytest.approx(12.3)


def test_snapshot_resets_the_window_only_when_asked() -> None:
    stats = RequestStats()
    stats.record(0.001, ok=True)
    stats.reject()
    assert stats.snapshot(reset=False).requests == 1
    first = stats.snapshot()
    assert (first.requests, first.rejected) == (1, 1)
    empty = stats.snapshot()
    assert empty == StatsSnapshot(window_s=empty.window_s)
    assert empty.p50_ms is None and empty.error_ratio == 0.0 and empty.latency_ms() == {}
    stats.record(0.0, ok=True)  # extreme values land in the edge buckets
    stats.record(1e6, ok=False)
    extreme = stats.snapshot()
    assert extreme.requests == 2 and extreme.p99_ms == pytest.approx(1e9)


def test_memory_stays_bounded() -> None:
    stats = RequestStats()
    stats.record(0.001, ok=True)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(50000):
            stats.record(0.0001 * (1 + index % 997), ok=True)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 20_000, f"RequestStats grew by {grown} bytes over 50000 requests"


def test_recording_from_many_threads_loses_nothing() -> None:
    stats = RequestStats()

    def work() -> None:
        for index in range(5000):
            stats.record(0.002, ok=index % 2 == 0)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snapshot = stats.snapshot()
    assert (snapshot.requests, snapshot.errors) == (40000, 20000)


# -- drift -------------------------------------------------------------------------------


def _reference(rng: np.random.Generator) -> dict[str, Any]:
    """Reference stats as the converter writes them (through JSON, like the bundle file)."""
    feeds = tuple(
        {
            "x": rng.normal(0.0, 1.0, size=(50, 4)).astype(np.float32),
            "tokens": rng.integers(0, 256, size=(50, 16)).astype(np.int32),
        }
        for _ in range(20)
    )
    dataset = Dataset(feeds=feeds, source="test", kind="synthetic", samples=1000)
    specs = [TensorSpec("x", "float32", ("N", 4)), TensorSpec("tokens", "int32", ("N", 16))]
    loaded: dict[str, Any] = json.loads(json.dumps(reference_stats(dataset, specs)))
    return loaded


def test_psi_is_near_zero_for_reference_like_inputs() -> None:
    rng = np.random.default_rng(1)
    monitor = DriftMonitor(_reference(rng))
    assert set(monitor.inputs) == {"x", "tokens"}
    assert monitor.psi() is None  # nothing seen yet
    for _ in range(100):
        monitor.observe(
            {
                "x": rng.normal(0.0, 1.0, size=(8, 4)).astype(np.float32),
                "tokens": rng.integers(0, 256, size=(8, 16)).astype(np.int32),
            }
        )
    value = monitor.psi()
    assert value is not None and value < 0.02
    assert monitor.observed() == 100 * (32 + 128)


@pytest.mark.parametrize(
    ("shift", "minimum"),
    [((1.0, 1.0), 0.5), ((0.0, 3.0), 0.5), ((0.3, 1.0), 0.05)],
)
def test_psi_is_large_for_shifted_inputs(shift: tuple[float, float], minimum: float) -> None:
    rng = np.random.default_rng(2)
    monitor = DriftMonitor(_reference(rng))
    mean, scale = shift
    for _ in range(100):
        monitor.observe({"x": rng.normal(mean, scale, size=(8, 4)).astype(np.float32)})
    by_input = monitor.psi_by_input()
    assert set(by_input) == {"x"}  # only inputs that were seen
    assert by_input["x"] > minimum
    assert monitor.psi() == by_input["x"]
    monitor.reset()
    assert monitor.psi() is None


def test_drift_ignores_non_finite_and_samples_large_inputs() -> None:
    rng = np.random.default_rng(3)
    monitor = DriftMonitor(_reference(rng), max_values_per_observe=100)
    big = rng.normal(0.0, 1.0, size=(1000, 4)).astype(np.float32)
    big[rng.random(big.shape) < 0.5] = np.nan
    monitor.observe({"x": big})
    assert 0 < monitor.observed() <= 100
    assert monitor.psi() is not None and monitor.psi() < 0.5


def test_without_reset_old_inputs_fade() -> None:
    rng = np.random.default_rng(4)
    monitor = DriftMonitor(_reference(rng), window_values=2000)
    for _ in range(50):
        monitor.observe({"x": rng.normal(3.0, 1.0, size=(8, 4)).astype(np.float32)})
    shifted = monitor.psi()
    for _ in range(500):
        monitor.observe({"x": rng.normal(0.0, 1.0, size=(8, 4)).astype(np.float32)})
    recent = monitor.psi()
    assert shifted is not None and recent is not None
    assert shifted > 1.0 and recent < 0.05
    assert monitor.observed() <= 2000


def test_unusable_reference_entries_are_skipped() -> None:
    stats = {
        "inputs": {
            "constant": {"bin_edges": [1.0], "bin_fractions": [1.0]},
            "broken": {"bin_edges": "nope"},
            "mismatched": {"bin_edges": [0.0, 1.0], "bin_fractions": [0.5, 0.5]},
            "ok": {"bin_edges": [0.0, 1.0, 2.0], "bin_fractions": [0.5, 0.5]},
        }
    }
    monitor = DriftMonitor(stats)
    assert monitor.inputs == ("ok",)
    assert DriftMonitor({}).inputs == ()


def test_psi_formula() -> None:
    expected = np.array([0.5, 0.5])
    assert psi(expected, np.array([0.5, 0.5])) == 0.0
    manual = (0.9 - 0.5) * math.log(0.9 / 0.5) + (0.1 - 0.5) * math.log(0.1 / 0.5)
    assert psi(expected, np.array([0.9, 0.1])) == pytest.approx(manual)


# -- resources ---------------------------------------------------------------------------


def test_resource_usage_reads_this_process() -> None:
    first = resource_usage()
    assert first.rss_bytes is not None and first.rss_bytes > 10 * 1024 * 1024
    sampler = ResourceSampler()
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    sample = sampler.sample()
    assert sample.cpu_percent is not None and sample.cpu_percent > 1.0


def test_temperature_and_rss_parsing(tmp_path: Path) -> None:
    thermal = tmp_path / "thermal"
    for index, (kind, value) in enumerate([("acpitz", "45000"), ("cpu-thermal", "51234")]):
        zone = thermal / f"thermal_zone{index}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(value + "\n")
    broken = thermal / "thermal_zone2"
    broken.mkdir()
    (broken / "temp").write_text("n/a\n")
    assert read_temperature_c(thermal) == pytest.approx(51.234)
    assert read_temperature_c(tmp_path / "missing") is None

    status = tmp_path / "status"
    status.write_text("Name:\tedgekit-agent\nVmPeak:\t  900 kB\nVmRSS:\t   12345 kB\n")
    assert read_rss_bytes(status) == 12345 * 1024
    assert read_rss_bytes(tmp_path / "nope") is None

    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "status").write_text("VmRSS:\t 2048 kB\n")
    sample = ResourceSampler(proc=proc, thermal=tmp_path / "missing").sample()
    assert sample.rss_bytes == 2048 * 1024 and sample.temperature_c is None


# -- message -----------------------------------------------------------------------------


def test_build_telemetry_round_trips() -> None:
    stats = RequestStats()
    for latency in (0.001, 0.002, 0.003):
        stats.record(latency, ok=True)
    stats.record(0.004, ok=False)
    message = build_telemetry(
        fleet="f1",
        device="dev-1",
        seq=7,
        interval_s=10.0,
        snapshot=stats.snapshot(),
        resources=Resources(cpu_percent=12.5, rss_bytes=50_000_000, temperature_c=None),
        drift_psi=0.03,
        bundle=BundleId("demo", "1.0.0", "d" * 64),
        rollout_id="r-1",
        state="committed",
        dropped=2,
    )
    parsed = Telemetry.from_json(message.to_json())
    assert parsed == message
    assert (parsed.requests, parsed.errors, parsed.dropped) == (4, 1, 2)
    assert set(parsed.latency_ms) == {"p50", "p95", "p99"}
    assert parsed.latency_ms["p99"] == pytest.approx(4.0, rel=0.05)
    assert parsed.rss_bytes == 50_000_000 and parsed.temperature_c is None
    assert parsed.ts > 0

    quiet = build_telemetry(
        fleet="f1", device="dev-1", seq=8, interval_s=10.0, snapshot=StatsSnapshot(), ts=5.0
    )
    assert Telemetry.from_json(quiet.to_json()).latency_ms == {}
