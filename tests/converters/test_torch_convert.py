"""`edgekit convert` and `convert()` on PyTorch models and on ONNX for TFLite profiles: the one
validate -> benchmark -> choose -> report flow, reference outputs from PyTorch (or the ONNX
original), the NCHW -> NHWC layout onnx2tf gives a TFLite artifact recorded in the report and
golden.npz, the pruned TFLite candidate, determinism, and `--verify-runtime` on tflite-runtime
2.14.

Default tier: PyTorch to an ONNX profile (the digits CNN's .pt2 and a GRU nn.Module) and the
refusals. Slow tier: everything that runs onnx2tf (its venv: 2.6 GB, built once per
`EDGEKIT_RUNTIME_CACHE`) and verify-runtime's runtime venvs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from edgekit.converters import convert
from edgekit.converters.frontends.onnx2tf_frontend import onnx2tf_environment
from edgekit.converters.torch_examples import TorchDigitsExample, export_torch_digits

from edgekit.errors import ConversionError
from edgekit.runtimes import LiteRtBackend, OnnxRuntimeBackend
from tests.conftest import MAGIKA, SILERO


@pytest.fixture(scope="module")
def torch_cnn(tmp_path_factory: pytest.TempPathFactory) -> TorchDigitsExample:
    return export_torch_digits(tmp_path_factory.mktemp("tc-cnn"), kind="cnn")


@pytest.fixture(scope="module")
def torch_gru(tmp_path_factory: pytest.TempPathFactory) -> TorchDigitsExample:
    # Fewer epochs than the example's 15: enough to separate the classes (test accuracy ~0.9).
    return export_torch_digits(tmp_path_factory.mktemp("tc-gru"), kind="gru", epochs=6)


@pytest.fixture
def onnx2tf_ready(runtime_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The onnx2tf venv in this session's runtime cache, which `convert` then finds."""
    monkeypatch.setenv("EDGEKIT_RUNTIME_CACHE", str(runtime_cache))
    assert onnx2tf_environment(runtime_cache).python.exists()
    return runtime_cache


def _edgekit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgekit", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in report["candidates"]}


# -- PyTorch to an ONNX profile (default tier) ---------------------------------------------------


def test_gru_module_to_raspberrypi_is_judged_against_pytorch(
    torch_gru: TorchDigitsExample, tmp_path: Path
) -> None:
    runs = [
        convert(
            torch_gru.module,
            example_inputs=[torch_gru.x_test[:1]],
            output_names=["logits"],
            profile="raspberrypi",
            output_dir=tmp_path / f"out{run}",
            calibration=torch_gru.calibration_path,
            validation=torch_gru.validation_path,
            benchmark_seconds=0.2,
        )
        for run in range(2)
    ]
    # A rerun exports and chooses the same bytes (the dynamo export is deterministic).
    assert len({(run.chosen, _sha256(run.artifact)) for run in runs}) == 1
    result = runs[0]
    report = result.report
    source = report["source"]
    assert source["format"] == "torch" and source["dynamic_batch"] is True
    assert source["path"] == "DigitsGRU (nn.Module, torch.export)" and source["sha256"] is None
    assert source["route"][1].startswith("torch.onnx.export dynamo (torch 2.13.0")
    assert source["route"][-1] == "onnx candidates"
    # The reference is PyTorch itself, which is not a device runtime: no latency for it.
    assert any("runs in torch 2.13.0" in note for note in report["original"]["notes"])
    assert report["original"]["latency_ms"] is None
    assert "layout" not in report  # ONNX keeps PyTorch's layout
    chosen = _rows(report)[result.chosen]
    assert chosen["accuracy"]["meets_tolerance"], chosen
    # The artifact runs on onnxruntime with the names given, and matches the module.
    runtime = OnnxRuntimeBackend(result.artifact)
    assert [spec.name for spec in runtime.inputs] == ["rows"]
    assert [spec.name for spec in runtime.outputs] == ["logits"]
    found = np.concatenate(
        [runtime.run({"rows": torch_gru.x_test[i : i + 1]})["logits"] for i in range(100)]
    )
    agreement = (found.argmax(1) == torch_gru.logits_test[:100].argmax(1)).mean()
    assert agreement >= 0.97


def test_pt2_cli_refusals_exit_2_with_one_line(tmp_path: Path) -> None:
    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    scripted = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(Net()), str(scripted))  # type: ignore[no-untyped-call]
    pickled = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(3)}, pickled)
    for path, what in (
        (scripted, "is a TorchScript archive (torch.jit.save)"),
        (pickled, "is a pickled model or state_dict (torch.save); edgekit does not unpickle"),
    ):
        out = tmp_path / f"out-{path.stem}"
        done = _edgekit("convert", str(path), "-p", "raspberrypi", "-o", str(out))
        assert done.returncode == 2, done.stderr
        message = done.stderr.strip()
        assert what in message and "torch.export.save(torch.export.export(" in message
        assert len(message.splitlines()) == 1 and not out.exists()


def test_untraceable_module_and_missing_examples_are_refused(tmp_path: Path) -> None:
    class DataDependent(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # Python control flow on a value: torch.export cannot trace it
                return x * 2
            return x

    with pytest.raises(ConversionError, match=r"^torch.export cannot trace DataDependent: "):
        convert(
            DataDependent(),
            example_inputs=[np.ones((1, 4), np.float32)],
            profile="raspberrypi",
            output_dir=tmp_path / "a",
        )
    with pytest.raises(ConversionError, match=r"give an nn.Module with example_inputs="):
        convert(DataDependent(), profile="raspberrypi", output_dir=tmp_path / "b")
    with pytest.raises(ConversionError, match=r"example_inputs are for an nn.Module"):
        convert(
            tmp_path / "model.onnx",
            example_inputs=[np.ones((1, 4), np.float32)],
            profile="raspberrypi",
            output_dir=tmp_path / "c",
        )
    assert not any((tmp_path / name).exists() for name in "abc")


def test_missing_torch_extra_exits_2_naming_the_extra(tmp_path: Path) -> None:
    class Double(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    pt2 = tmp_path / "double.pt2"
    torch.export.save(torch.export.export(Double(), (torch.ones(1, 4),)), str(pt2))
    # A site folder whose `torch` cannot be imported stands in for an install without it.
    blocker = tmp_path / "site"
    (blocker / "torch").mkdir(parents=True)
    (blocker / "torch" / "__init__.py").write_text("raise ImportError('no torch here')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    out = tmp_path / "out"
    done = _edgekit("convert", str(pt2), "-p", "raspberrypi", "-o", str(out), env=env)
    assert done.returncode == 2, done.stderr
    assert "PyTorch models need the torch extra: pip install 'edgekit[torch]'" in done.stderr
    assert not out.exists()


# -- TFLite profiles: onnx2tf (slow tier) --------------------------------------------------------


@pytest.mark.slow  # onnx2tf venv + verify-runtime's tflite-runtime 2.14 / ai-edge-litert venvs
def test_pt2_to_raspberrypi_tflite_cli_with_verify_runtime(
    torch_cnn: TorchDigitsExample, runtime_cache: Path, tmp_path: Path
) -> None:
    onnx2tf_environment(runtime_cache)
    env = {**os.environ, "EDGEKIT_RUNTIME_CACHE": str(runtime_cache)}
    out = tmp_path / "out"
    done = _edgekit(
        "convert", str(torch_cnn.pt2_path), "-p", "raspberrypi-tflite", "-o", str(out),
        "--calibration", str(torch_cnn.calibration_path),
        "--validation", str(torch_cnn.validation_path),
        "--verify-runtime", "--keep-candidates", "--json",
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    route = report["source"]["route"]
    assert route[0] == "digits_cnn.pt2 (torch.export)"
    assert route[2:] == ["onnx2tf 1.29.24 -> SavedModel", "TFLiteConverter", "tflite candidates"]
    assert report["source"]["onnx2tf"]["max_relative_error"] < 1e-4
    # The source's own signature is NCHW; the artifact takes NHWC, and the report says so.
    assert report["source"]["signature"]["inputs"][0]["shape"] == ["batch", 1, 8, 8]
    assert report["layout"]["changes"] == "pixels [1, 1, 8, 8] -> [1, 8, 8, 1] (perm 0,2,3,1)"
    assert report["artifact"]["inputs"][0]["shape"] == [1, 8, 8, 1]
    rows = _rows(report)
    assert {"fp32", "fp16", "dynamic_int8", "full_int8", "pruned"} <= set(rows)
    for name in ("fp32", "dynamic_int8", "full_int8", "pruned"):
        assert rows[name]["status"] == "ok" and rows[name]["accuracy"]["meets_tolerance"], name
    pruned = rows["pruned"]
    # At least the profile's 0.5 (int8 weights tie at the threshold), not much more.
    assert 0.5 <= pruned["details"]["tflite_prune"]["sparsity"] < 0.55
    assert pruned["compressed_size_bytes"] < rows["dynamic_int8"]["compressed_size_bytes"]
    # golden.npz holds NHWC inputs and the permutation; they reproduce PyTorch's logits.
    with np.load(out / "golden.npz") as golden:
        np.testing.assert_array_equal(golden["layout/inputs/pixels"], [0, 2, 3, 1])
        nhwc = golden["inputs/0/pixels"]
    assert nhwc.shape == (1, 8, 8, 1)
    nchw = np.transpose(nhwc, (0, 3, 1, 2))
    index = int(np.argmin(np.abs(torch_cnn.x_test - nchw).reshape(len(torch_cnn.x_test), -1)
                          .sum(1)))  # fmt: skip
    np.testing.assert_array_equal(torch_cnn.x_test[index : index + 1], nchw)
    logits = LiteRtBackend(out / "candidates" / "fp32.tflite").run({"pixels": nhwc})["output_0"]
    np.testing.assert_allclose(logits, torch_cnn.logits_test[index : index + 1], atol=1e-3)
    # --verify-runtime: the chosen artifact loads and matches in tflite-runtime 2.14.
    checks = {f"{r['package']} {r['version']}": r for r in report["verify_runtime"]["runtimes"]}
    assert checks["tflite-runtime 2.14.0"]["status"] == "pass", checks


@pytest.mark.slow  # onnx2tf, twice
def test_gru_module_to_raspberrypi_tflite_twice_gives_the_same_bytes(
    torch_gru: TorchDigitsExample, onnx2tf_ready: Path, tmp_path: Path
) -> None:
    digests = []
    for run in range(2):
        result = convert(
            torch_gru.module,
            example_inputs=[torch_gru.x_test[:1]],
            profile="raspberrypi-tflite",
            output_dir=tmp_path / str(run),
            calibration=torch_gru.calibration_path,
            validation=torch_gru.validation_path,
            benchmark_seconds=0.2,
            keep_candidates=True,
        )
        digests.append(
            (result.chosen, *(_sha256(p) for p in sorted((tmp_path / str(run)).rglob("*.tflite"))))
        )
    assert digests[0] == digests[1]
    report = result.report
    assert report["layout"]["transposed"] is False  # [1, 8, 8] rows stay as they are
    rows = _rows(report)
    assert rows["fp32"]["accuracy"]["meets_tolerance"], rows["fp32"]
    assert rows[result.chosen]["accuracy"]["meets_tolerance"]
    # TFLiteConverter's calibrator segfaults on this SavedModel (TF 2.21); full int8 converts in
    # a child process, so the crash fails that candidate and the conversion goes on.
    full_int8 = rows["full_int8"]
    assert full_int8["status"] == "ok" or "TFLiteConverter crashed" in full_int8["error"]
    runtime = LiteRtBackend(result.artifact)
    logits = runtime.run({"rows": torch_gru.x_test[:1]})["output_0"]
    assert logits.argmax() == torch_gru.logits_test[0].argmax()


@pytest.mark.slow  # onnx2tf on magika, then every TFLite candidate (a few minutes)
def test_magika_onnx_to_raspberrypi_tflite_reports_accuracy_vs_the_onnx_original(
    onnx2tf_ready: Path, magika_data: tuple[Path, Path], tmp_path: Path
) -> None:
    calibration, validation = magika_data
    result = convert(
        MAGIKA,
        profile="raspberrypi-tflite",
        output_dir=tmp_path / "out",
        calibration=calibration,
        validation=validation,
        benchmark_seconds=0.5,
    )
    report = result.report
    assert report["source"]["route"][:2] == ["ONNX", "onnx2tf 1.29.24 -> SavedModel"]
    assert report["layout"]["transposed"] is False  # int32 bytes [1, 2048]
    assert report["data"]["accuracy"] == "validated"
    rows = _rows(report)
    (fp32,) = rows["fp32"]["accuracy"]["outputs"].values()
    assert fp32["top1_agreement"] == 1.0 and fp32["cosine"] > 0.9999, fp32
    chosen = rows[result.chosen]
    assert chosen["accuracy"]["meets_tolerance"], chosen
    assert LiteRtBackend(result.artifact).inputs[0].shape == (1, 2048)


@pytest.mark.slow  # onnx2tf on silero
def test_silero_onnx_to_raspberrypi_tflite_is_refused_naming_the_operator(
    runtime_cache: Path, silero_data: tuple[Path, Path], tmp_path: Path
) -> None:
    onnx2tf_environment(runtime_cache)
    env = {**os.environ, "EDGEKIT_RUNTIME_CACHE": str(runtime_cache)}
    calibration, validation = silero_data
    out = tmp_path / "out"
    done = _edgekit("convert", str(SILERO), "-p", "raspberrypi-tflite", "-o", str(out),
                    "--calibration", str(calibration), "--validation", str(validation),
                    env=env)  # fmt: skip
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "model.onnx: onnx2tf 1.29.24 cannot convert operator LSTM (node " in message
    assert "pick an onnx profile" in message
    assert not out.exists()


class _StatefulLstm(torch.nn.Module):
    """A streaming LSTM whose state is an input and an output (as silero's): onnx2tf refuses
    its LSTM node, litert-torch converts it."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(8, 16, batch_first=True)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, rows: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, (h, c) = self.lstm(rows, (state[0:1], state[1:2]))
        return self.fc(out[:, -1]), torch.cat([h, c])


@pytest.mark.slow  # onnx2tf (which refuses), then litert-torch
def test_module_onnx2tf_refuses_goes_through_litert_torch(
    onnx2tf_ready: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    module = _StatefulLstm().eval()
    rng = np.random.default_rng(0)
    rows = rng.random((64, 1, 8, 8), dtype=np.float32)
    state = (rng.standard_normal((64, 2, 1, 16)) * 0.5).astype(np.float32)
    np.savez(tmp_path / "cal.npz", rows=rows[:32], state=state[:32])
    np.savez(tmp_path / "val.npz", rows=rows[32:], state=state[32:])
    result = convert(
        module,
        example_inputs=[rows[0], state[0]],
        output_names=["logits", "next_state"],
        profile="raspberrypi-tflite",
        output_dir=tmp_path / "out",
        calibration=tmp_path / "cal.npz",
        validation=tmp_path / "val.npz",
        benchmark_seconds=0.2,
    )
    source = result.report["source"]
    assert source["route"][1].startswith("litert-torch 0.10")
    assert any(
        "onnx2tf refused" in note and "cannot convert operator LSTM" in note
        for note in source["notes"]
    ), source["notes"]
    assert "layout" not in result.report  # litert-torch keeps PyTorch's layout
    rows_by_name = _rows(result.report)
    assert rows_by_name["fp32"]["accuracy"]["meets_tolerance"], rows_by_name["fp32"]
    assert rows_by_name["pruned"]["status"] == "ok"  # built; the accuracy guard judges it
    assert "not built from litert-torch's float32 model" in rows_by_name["fp16"]["reason"]
    runtime = LiteRtBackend(result.artifact)
    found = runtime.run({"rows": rows[40], "state": state[40]})
    with torch.no_grad():
        logits, next_state = module(torch.from_numpy(rows[40]), torch.from_numpy(state[40]))
    np.testing.assert_allclose(found["logits"], logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(found["next_state"], next_state.numpy(), atol=1e-4)
