"""`edgekit-agent bench` and the offline loop: convert --keep-candidates, bench on the device
(this machine), convert again with --measurements; the device's numbers decide."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from edgekit.converters import convert
from edgekit.converters.examples import DigitsExample
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekit.files import hash_file
from edgekit.messages import Measurements, MessageError


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGEKIT_AGENT_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "edgekit.cli.agent", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )


@pytest.fixture(scope="module")
def kept(digits: DigitsExample, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A host conversion with every candidate kept (and reference.npz beside them)."""
    out = tmp_path_factory.mktemp("bench") / "out"
    result = convert(
        digits.model_path,
        profile="raspberrypi",
        output_dir=out,
        calibration=digits.calibration_path,
        validation=digits.validation_path,
        benchmark_seconds=0.3,
        keep_candidates=True,
    )
    assert result.chosen == "weight_int8"
    return out


def test_bench_measures_every_candidate_with_its_sha256_and_fidelity(
    kept: Path, tmp_path: Path
) -> None:
    target = tmp_path / "m.json"
    done = _run("bench", kept / "candidates", "--device-id", "pi-7", "--seconds", "0.3",
                "-o", target)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "pi-7" in done.stdout and "within tolerance" in done.stdout
    measurements = Measurements.from_json(target.read_bytes())
    assert measurements.device.id == "pi-7"
    assert measurements.device.machine == platform.machine()
    assert measurements.device.cpu_flags  # e.g. avx2 here, asimddp on a Pi 5
    assert "onnxruntime" in measurements.runtime
    files = {p.stem: p for p in (kept / "candidates").glob("*.onnx")}
    assert {c.name for c in measurements.candidates} == set(files)
    for candidate in measurements.candidates:
        assert candidate.sha256 == hash_file(files[candidate.name])[1]
        assert candidate.measured and len(candidate.rounds_ms) >= 30
        low, high = candidate.intervals["p50"]
        assert low is not None and high is not None
        assert low <= candidate.latency_ms["p50"] <= high
        assert candidate.latency_ms["p50"] <= candidate.latency_ms["p95"]
        assert candidate.load_ms is not None and candidate.load_ms > 0
        assert candidate.peak_rss_bytes is not None and candidate.peak_rss_bytes > 0
        assert candidate.fidelity is not None and candidate.fidelity.samples > 0
    by_name = {c.name: c for c in measurements.candidates}
    assert by_name["weight_int8"].fidelity is not None
    assert by_name["weight_int8"].fidelity.meets_tolerance
    assert by_name["pruned"].fidelity is not None
    assert not by_name["pruned"].fidelity.meets_tolerance


def test_the_device_decides_in_the_offline_loop(
    kept: Path, digits: DigitsExample, tmp_path: Path
) -> None:
    """The device disagrees with the host (weight_int8 throttled 4x on it): its numbers win."""
    target = tmp_path / "m.json"
    done = _run("bench", kept / "candidates", "--device-id", "pi-7", "--seconds", "0.3",
                "--throttle", "weight_int8=4", "-o", target)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = tmp_path / "device-out"
    done = subprocess.run(
        [sys.executable, "-m", "edgekit", "convert", str(digits.model_path), "--profile",
         "raspberrypi", "-o", str(out), "--calibration", str(digits.calibration_path),
         "--validation", str(digits.validation_path), "--measurements", str(target)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "latency measured on device:pi-7" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["decision"]["latency_source"] == "device:pi-7"
    assert report["decision"]["device"]["machine"] == platform.machine()
    rows = {row["name"]: row for row in report["candidates"]}
    assert rows["weight_int8"]["latency"]["source"] == "device:pi-7"
    assert report["chosen"] != "weight_int8"  # the host's choice loses on the device
    assert rows["weight_int8"]["comparison"]["verdict"] == "slower"
    assert "latency measured on device:pi-7" in rows[report["chosen"]]["reason"]
    # The same bytes as the host conversion built: the measurements matched them all.
    assert set(report["decision"]["matched"]) == {
        name for name, row in rows.items() if row["status"] == "ok"
    }


def test_measurements_that_match_no_candidate_are_refused_clearly(
    kept: Path, digits: DigitsExample, tmp_path: Path
) -> None:
    document = json.loads((tmp_path / "m.json").write_text("") or _measurements_for(kept, tmp_path))
    for candidate in document["candidates"]:
        candidate["sha256"] = "0" * 63 + str(len(candidate["name"]) % 10)
    document["candidates"] = document["candidates"][:1]
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(document))
    done = subprocess.run(
        [sys.executable, "-m", "edgekit", "convert", str(digits.model_path), "--profile",
         "raspberrypi", "-o", str(tmp_path / "o"), "--calibration",
         str(digits.calibration_path), "--validation", str(digits.validation_path),
         "--measurements", str(wrong)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "none of the candidates this conversion built was measured on device:d1" in done.stderr
    assert "--keep-candidates" in done.stderr
    assert not (tmp_path / "o").exists()


def _measurements_for(kept: Path, tmp_path: Path) -> str:
    target = tmp_path / "measured.json"
    done = _run("bench", kept / "candidates" / "fp32.onnx", "--device-id", "d1", "--seconds",
                "0.2", "-o", target)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return target.read_text()


def test_a_foreign_target_without_device_numbers_is_not_called_fastest(kept: Path) -> None:
    report = json.loads((kept / "report.json").read_text())
    if platform.machine() == "aarch64":
        pytest.skip("the raspberrypi profile's architecture is this host's")
    assert report["decision"]["target_latency"].startswith("unmeasured")
    chosen = next(row for row in report["candidates"] if row["verdict"] == "chosen")
    assert "latency on the target (aarch64) is unmeasured" in chosen["reason"]


def test_bench_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    done = _run("bench", tmp_path / "missing.onnx")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing.onnx'} does not exist; give model files, a candidates/ "
        "folder or a bundle"
    ]
    bundle = tmp_path / "x.ekb"
    bundle.write_bytes(b"not a bundle")
    done = _run("bench", bundle)
    assert done.returncode == 2 and "is verified before it runs; give --trust" in done.stderr


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                          children, max_size=4),
    max_leaves=30,
)  # fmt: skip


@given(_json)
@settings(max_examples=200, deadline=None)
def test_only_measurements_error_escapes_the_parser(document: Any) -> None:
    for payload in (json.dumps(document), json.dumps({"schema": "edgekit.measurements/v1",
                                                     "device": document})):  # fmt: skip
        with contextlib.suppress(MessageError):
            Measurements.from_json(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100_000,
        b'{"schema": "edgekit.measurements/v1", "threads": NaN}',
        b"\xff\xfe",
        b'{"schema": "edgekit.measurements/v1", "device": {"id": "a"}, "runtime": {"x": "1"},'
        b' "threads": 1, "candidates": [{"name": "a", "sha256": "' + b"a" * 64 + b'",'
        b' "latency_ms": {"p50": 1e308, "p95": 1, "p99": 1}, "rounds_ms": [1]}]}',
        b" " * (9 << 20),
    ],
)
def test_hostile_measurements_are_refused(payload: bytes) -> None:
    with pytest.raises(MessageError):
        Measurements.from_json(payload)


def test_a_good_document_round_trips(kept: Path, tmp_path: Path) -> None:
    text = _measurements_for(kept, tmp_path)
    parsed = Measurements.from_json(text)
    assert Measurements.from_json(parsed.to_json()) == parsed
    assert all(math.isfinite(v) for c in parsed.candidates for v in c.rounds_ms)
