"""ModelHost: input validation, stats, hot swap with requests in flight, shadow mode."""

from __future__ import annotations

import gc
import json
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgekit.agent.serving import (
    InferenceInputError,
    InferenceRuntimeError,
    ModelHost,
    NoModelError,
    load_model,
    read_golden_tolerance,
)

from edgekit.errors import EdgekitError
from edgekit.messages import BundleId
from edgekit.runtimes import OnnxRuntimeBackend

from .serving_helpers import (
    GatedRuntime,
    linear_expected,
    linear_model,
    reshape_model,
    two_input_model,
    uint8_model,
)

SHA_A = "a" * 64
SHA_B = "b" * 64


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("serving-models")
    return {
        "a": linear_model(folder / "a.onnx", scale=1.0),
        "b": linear_model(folder / "b.onnx", scale=2.0),
        "a_close": linear_model(folder / "a_close.onnx", scale=1.001),
        "two": two_input_model(folder / "two.onnx"),
        "uint8": uint8_model(folder / "uint8.onnx"),
        "reshape": reshape_model(folder / "reshape.onnx"),
    }


def _host(path: Path, version: str = "1.0.0", sha: str = SHA_A) -> ModelHost:
    host = ModelHost("m")
    host.activate(OnnxRuntimeBackend(path), BundleId("demo", version, sha))
    return host


def _x(rows: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 4)).astype(np.float32)


def test_infer_runs_the_model_and_counts_requests(models: dict[str, Path]) -> None:
    host = _host(models["a"])
    assert host.ready and host.bundle == BundleId("demo", "1.0.0", SHA_A)
    assert [spec.name for spec in host.inputs] == ["x"]
    assert [spec.name for spec in host.outputs] == ["y"]
    x = _x()
    for _ in range(5):
        outputs = host.infer({"x": x})
        np.testing.assert_allclose(outputs["y"], linear_expected(x), rtol=1e-6)
    since = host.since_activation()
    assert (since.requests, since.errors) == (5, 0)
    assert since.p50_ms is not None and since.p50_ms > 0
    interval = host.stats.snapshot()
    assert interval.requests == 5
    assert host.stats.snapshot().requests == 0  # the interval was reset
    assert host.since_activation().requests == 5  # the activation window was not


def test_the_tolerance_travels_beside_the_bundle(models: dict[str, Path]) -> None:
    host = ModelHost("m")
    host.activate(
        OnnxRuntimeBackend(models["a"]), BundleId("demo", "1.2.0", SHA_A), tolerance={"rtol": 0.1}
    )
    assert host.bundle == BundleId("demo", "1.2.0", SHA_A)
    assert host.tolerance == {"rtol": 0.1}
    host.activate(OnnxRuntimeBackend(models["b"]), BundleId("demo", "2.0.0", SHA_B))
    assert host.previous_bundle == BundleId("demo", "1.2.0", SHA_A)
    assert host.previous_tolerance == {"rtol": 0.1} and host.tolerance is None


def test_no_model_is_an_error_naming_what_to_do() -> None:
    host = ModelHost("m")
    assert not host.ready and host.bundle is None and host.inputs == ()
    with pytest.raises(NoModelError, match="no model is active"):
        host.infer({"x": _x()})
    assert issubclass(NoModelError, EdgekitError)


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({}, r"missing input 'x'"),
        ({"z": np.zeros((1, 4), np.float32)}, r"missing input 'x' \(found unknown 'z'\)"),
        (
            {"x": np.zeros((1, 4), np.float32), "z": np.zeros(1)},
            r"unknown input 'z'; model demo 1.0.0 expects 'x' \(float32 \[N, 4\]\)",
        ),
        ({"x": np.zeros((1, 5), np.float32)}, r"shape \[1, 5\].*axis 1 must be 4"),
        ({"x": np.zeros(4, np.float32)}, r"rank 1 .*expects rank 2"),
        ({"x": np.zeros((1, 4), np.complex64)}, r"dtype complex64; the model expects float32"),
        ({"x": np.array([["a", "b", "c", "d"]])}, r"dtype <U1|dtype str"),
        ([("x", 1)], r"must be a mapping"),
    ],
)
def test_bad_inputs_are_refused_with_a_message(
    models: dict[str, Path], feeds: Any, message: str
) -> None:
    host = _host(models["a"])
    with pytest.raises(InferenceInputError, match=message):
        host.infer(feeds)
    snapshot = host.since_activation()
    assert (snapshot.requests, snapshot.errors, snapshot.rejected) == (0, 0, 1)


def test_castable_inputs_are_converted(models: dict[str, Path]) -> None:
    host = _host(models["a"])
    x64 = _x().astype(np.float64)
    np.testing.assert_allclose(host.infer({"x": x64})["y"], linear_expected(x64), rtol=1e-6)
    ints = np.arange(8).reshape(2, 4)
    np.testing.assert_allclose(host.infer({"x": ints})["y"], linear_expected(ints), rtol=1e-6)
    # Nested lists work for in-process callers too.
    assert host.infer({"x": [[1.0, 2.0, 3.0, 4.0]]})["y"].shape == (1, 3)

    small = _host(models["uint8"])
    values = np.arange(8).reshape(1, 8)  # int64 that fits uint8
    np.testing.assert_allclose(small.infer({"x": values})["y"], values / 255.0, rtol=1e-6)
    with pytest.raises(InferenceInputError, match=r"values in \[0, 700\], outside uint8"):
        small.infer({"x": values * 100})
    with pytest.raises(InferenceInputError, match="float64; the model expects uint8"):
        small.infer({"x": values.astype(np.float64)})
    with pytest.raises(InferenceInputError, match=r"axis 0 must be 1"):
        small.infer({"x": np.zeros((2, 8), np.uint8)})


def test_symbolic_dimensions_must_agree_across_inputs(models: dict[str, Path]) -> None:
    host = _host(models["two"])
    a, b = np.ones((2, 4), np.float32), np.full((2, 1), 3, np.int64)
    outputs = host.infer({"a": a, "b": b})
    np.testing.assert_allclose(outputs["out"], a + 3)
    np.testing.assert_allclose(outputs["doubled"], 2 * a)
    with pytest.raises(InferenceInputError, match=r"dimension 'N' is 2 in input 'a' but 3"):
        host.infer({"a": a, "b": np.ones((3, 1), np.int64)})


def test_runtime_failure_counts_as_an_error(models: dict[str, Path]) -> None:
    host = _host(models["reshape"])
    assert host.infer({"x": np.zeros((3, 4), np.float32)})["y"].shape == (3, 4)
    with pytest.raises(InferenceRuntimeError, match=r"model demo 1.0.0 failed: .*Reshape"):
        host.infer({"x": np.zeros((1, 4), np.float32)})
    snapshot = host.since_activation()
    assert (snapshot.requests, snapshot.errors, snapshot.rejected) == (2, 1, 0)
    assert snapshot.error_ratio == 0.5
    assert host.stats.snapshot().errors == 1


def test_in_flight_request_finishes_on_the_old_model(models: dict[str, Path]) -> None:
    host = ModelHost("m")
    old = GatedRuntime(models["a"])
    host.activate(old, BundleId("demo", "1.0.0", SHA_A))
    x = _x()
    result: dict[str, Any] = {}

    def slow_request() -> None:
        result["outputs"], result["info"] = host.infer_with_bundle({"x": x})

    worker = threading.Thread(target=slow_request)
    worker.start()
    assert old.entered.wait(10)
    assert host.in_flight() == 1
    host.activate(OnnxRuntimeBackend(models["b"]), BundleId("demo", "2.0.0", SHA_B))
    # New requests go to the new model while the old one still has a request in flight.
    new_outputs, new_info = host.infer_with_bundle({"x": x})
    assert new_info.version == "2.0.0"
    np.testing.assert_allclose(new_outputs["y"], linear_expected(x, scale=2.0), rtol=1e-5)
    assert old.closed == 0, "the old runtime was released while a request was running on it"
    old.release.set()
    worker.join(10)
    assert result["info"].version == "1.0.0"
    np.testing.assert_allclose(result["outputs"]["y"], linear_expected(x), rtol=1e-5)
    assert old.closed == 1, "the old runtime was not released after its last request"
    assert host.previous_bundle == BundleId("demo", "1.0.0", SHA_A)


def test_previous_snapshot_is_the_baseline_for_probation(models: dict[str, Path]) -> None:
    host = _host(models["a"])
    assert host.previous_snapshot() is None
    for _ in range(5):
        host.infer({"x": _x()})
    host.activate(OnnxRuntimeBackend(models["b"]), BundleId("demo", "2.0.0", SHA_B))
    for _ in range(3):
        host.infer({"x": _x()})
    previous = host.previous_snapshot()
    assert previous is not None and previous.requests == 5 and previous.p95_ms is not None
    assert host.since_activation().requests == 3
    assert host.stats.snapshot().requests == 8  # the telemetry interval spans the swap


def test_hot_swap_under_load_in_process(models: dict[str, Path]) -> None:
    host = ModelHost("m")
    scales = {"1.0.0": 1.0, "2.0.0": 2.0}
    paths = {"1.0.0": models["a"], "2.0.0": models["b"]}
    first = OnnxRuntimeBackend(paths["1.0.0"])
    retired = [weakref.ref(first)]
    host.activate(first, BundleId("demo", "1.0.0", SHA_A))
    del first
    stop = threading.Event()
    failures: list[str] = []
    seen: dict[str, int] = {"1.0.0": 0, "2.0.0": 0}
    lock = threading.Lock()

    def client(seed: int) -> None:
        x = _x(rows=3, seed=seed)
        expected = {v: linear_expected(x, scale=s) for v, s in scales.items()}
        while not stop.is_set():
            try:
                outputs, info = host.infer_with_bundle({"x": x})
            except Exception as error:  # noqa: BLE001 - every failure is collected
                failures.append(repr(error))
                continue
            if not np.allclose(outputs["y"], expected[info.version], rtol=1e-5):
                failures.append(f"{info.version} answered with another model's output")
            with lock:
                seen[info.version] += 1

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    try:
        for swap in range(20):
            version = "2.0.0" if swap % 2 == 0 else "1.0.0"
            runtime = OnnxRuntimeBackend(paths[version])
            retired.append(weakref.ref(runtime))
            host.activate(runtime, BundleId("demo", version, SHA_A if swap % 2 else SHA_B))
            del runtime
            stop.wait(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert failures == []
    assert seen["1.0.0"] > 0 and seen["2.0.0"] > 0
    gc.collect()
    alive = [ref for ref in retired[:-1] if ref() is not None]
    assert alive == [], f"{len(alive)} replaced runtimes were never released"


# -- shadow mode -------------------------------------------------------------------------


def _shadow_run(host: ModelHost, requests: int) -> None:
    for seed in range(requests):
        host.infer({"x": _x(seed=seed)})
    assert host.wait_shadow_idle(20)


def test_shadow_identical_candidate_agrees(models: dict[str, Path]) -> None:
    host = _host(models["a"])
    host.set_shadow(OnnxRuntimeBackend(models["a"]))
    try:
        _shadow_run(host, 12)
        compared, agreed = host.shadow_agreement()
        # The worker drops rather than blocks when busy, so a few may be skipped.
        report = host.shadow_report()
        assert report is not None
        assert compared + report.dropped == 12 and compared > 0
        assert agreed == compared and report.agreement_ratio == 1.0
        assert report.candidate.requests == compared
    finally:
        host.close()


def test_shadow_different_candidate_disagrees(models: dict[str, Path]) -> None:
    host = _host(models["a"])
    host.set_shadow(OnnxRuntimeBackend(models["b"]))
    try:
        _shadow_run(host, 10)
        compared, agreed = host.shadow_agreement()
        assert compared > 0 and agreed == 0
    finally:
        host.close()


def test_shadow_tolerance_comes_from_the_golden_tolerance(models: dict[str, Path]) -> None:
    host = _host(models["a"])
    try:
        strict = {"rtol": 0.0, "atol": 1e-7}
        host.set_shadow(OnnxRuntimeBackend(models["a_close"]), tolerance=strict)
        _shadow_run(host, 8)
        compared, agreed = host.shadow_agreement()
        assert compared > 0 and agreed == 0

        loose = {"rtol": 0.01, "atol": 0.01}
        host.set_shadow(OnnxRuntimeBackend(models["a_close"]), tolerance=loose)
        assert host.shadow_agreement() == (0, 0)  # a new candidate starts from zero
        _shadow_run(host, 8)
        compared, agreed = host.shadow_agreement()
        assert compared > 0 and agreed == compared

        # A compare function overrides tolerances: top-1 agreement on the scaled model.
        def same_argmax(active: Any, candidate: Any) -> bool:
            return bool((active["y"].argmax(1) == candidate["y"].argmax(1)).all())

        host.set_shadow(
            OnnxRuntimeBackend(models["a_close"]), tolerance=strict, compare=same_argmax
        )
        _shadow_run(host, 6)
        compared, agreed = host.shadow_agreement()
        assert compared > 0 and agreed == compared
    finally:
        host.close()


def test_shadow_sampling_and_stop(models: dict[str, Path]) -> None:
    host = _host(models["a"])
    try:
        host.set_shadow(OnnxRuntimeBackend(models["a"]), sample_ratio=0.0)
        _shadow_run(host, 10)
        assert host.shadow_agreement() == (0, 0)
        host.set_shadow(None)
        assert host.shadow_report() is None
        with pytest.raises(ValueError, match="sample_ratio"):
            host.set_shadow(OnnxRuntimeBackend(models["a"]), sample_ratio=1.5)
    finally:
        host.close()


def test_busy_shadow_drops_instead_of_blocking_requests(models: dict[str, Path]) -> None:
    host = _host(models["a"])
    candidate = GatedRuntime(models["a"])
    host.set_shadow(candidate)
    try:
        for seed in range(20):  # would hang if requests waited for the gated candidate
            host.infer({"x": _x(seed=seed)})
        assert candidate.entered.wait(10)
        report = host.shadow_report()
        assert report is not None and report.dropped >= 20 - 1 - 4  # one running, 4 queued
        candidate.release.set()
        assert host.wait_shadow_idle(20)
        compared, agreed = host.shadow_agreement()
        assert compared == 20 - report.dropped == agreed
    finally:
        candidate.release.set()
        host.close()


def test_shadow_candidate_with_other_inputs_disagrees(models: dict[str, Path]) -> None:
    host = _host(models["a"])
    host.set_shadow(OnnxRuntimeBackend(models["two"]))
    try:
        _shadow_run(host, 4)
        report = host.shadow_report()
        assert report is not None and report.compared > 0
        assert report.agreed == 0 and report.errors == report.compared
    finally:
        host.close()


# -- loading -----------------------------------------------------------------------------


def test_load_model_from_an_extracted_bundle(models: dict[str, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "slot"
    bundle.mkdir()
    (bundle / "model.onnx").write_bytes(models["a"].read_bytes())
    tolerance = {"rtol": 0.02, "atol": 0.03, "min_cosine": 0.98, "min_top1_agreement": 0.95}
    np.savez(bundle / "golden.npz", tolerance=np.array(json.dumps(tolerance)))
    stats = {
        "schema": "edgekit.reference_stats/v1",
        "inputs": {"x": {"bin_edges": [-3.0, -1.0, 0.0, 1.0, 3.0], "bin_fractions": [0.2] * 4}},
    }
    (bundle / "reference_stats.json").write_text(json.dumps(stats))

    host = load_model(bundle, name="digits")
    assert host.name == "digits" and host.bundle is not None
    assert host.tolerance == tolerance
    assert read_golden_tolerance(bundle / "golden.npz") == tolerance
    assert host.drift is not None
    host.infer({"x": _x(rows=8)})
    assert host.drift.observed() == 32 and host.drift.psi() is not None


def test_load_model_from_a_file(models: dict[str, Path]) -> None:
    host = load_model(models["a"])
    assert host.bundle is not None and host.bundle.name == "a" and len(host.bundle.sha256) == 64
    assert host.tolerance is None and host.drift is None
    assert host.infer({"x": _x()})["y"].shape == (2, 3)
