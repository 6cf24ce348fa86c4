"""`edgekit convert` as a user runs it: the summary, --json, and bad input (exit 2, one line,
nothing half-written in OUTDIR)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from edgekit.converters.examples import DigitsExample


def _edgekit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgekit", *args], capture_output=True, text=True, check=False
    )


def test_convert_prints_summary_and_writes_outputs(digits: DigitsExample, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _edgekit(
        "convert", str(digits.model_path), "--profile", "raspberrypi", "-o", str(out),
        "--calibration", str(digits.calibration_path), "--validation", str(digits.validation_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert f"chosen {report['chosen']}" in done.stdout
    assert "weight_int8" in done.stdout and "p50 ms" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "golden.npz", "model.onnx", "reference_stats.json", "report.json",
    ]  # fmt: skip
    with np.load(out / "golden.npz") as golden:
        assert "inputs/0/pixels" in golden.files and "outputs/0/logits" in golden.files
        assert json.loads(str(golden["tolerance"]))["atol"] > 0


def test_convert_json_marks_synthetic_data_unvalidated(
    digits: DigitsExample, tmp_path: Path
) -> None:
    done = _edgekit("convert", str(digits.model_path), "-p", "x86-64", "-o", str(tmp_path / "o"),
                    "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["data"]["accuracy"] == "unvalidated"
    assert report["data"]["validation"]["kind"] == "synthetic"


def _bad_npz(tmp_path: Path, **arrays: np.ndarray) -> str:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist"),
        ("not_onnx", "is not an ONNX model"),
        ("bin", "unsupported model format; expected .onnx, .keras, a SavedModel folder or a"),
        (
            "pt",
            "is not a PyTorch archive; edgekit reads .pt2 programs: save the model with "
            "torch.export.save(torch.export.export(model, example_inputs), 'model.pt2')",
        ),
        (
            "tflite",
            "already a TFLite model: there is nothing to convert; check it on the device "
            "runtimes with `edgekit verify-runtime` and pack it with `edgekit bundle build`",
        ),
        ("truncated", "is not an ONNX model or is truncated"),
        ("profile", "unknown profile 'raspberry'"),
        ("names", "no array for model input 'pixels'"),
        ("shape", "input 'pixels': model expects shape [batch, 1, 8, 8], data has [2, 1, 7, 8]"),
        ("dtype", "input 'pixels': model expects dtype float32, data has float64"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(
    digits: DigitsExample, tmp_path: Path, case: str, message: str
) -> None:
    model = str(digits.model_path)
    profile = "raspberrypi"
    extra: list[str] = []
    if case == "missing":
        model = str(tmp_path / "missing.onnx")
    elif case == "not_onnx":
        bogus = tmp_path / "notes.onnx"
        bogus.write_text("these are my notes, not a model\n" * 20)
        model = str(bogus)
    elif case in ("bin", "pt", "tflite"):
        other = tmp_path / f"model.{case}"
        other.write_bytes(digits.model_path.read_bytes())  # even ONNX bytes: the name decides
        model = str(other)
    elif case == "truncated":
        cut = tmp_path / "cut.onnx"
        cut.write_bytes(digits.model_path.read_bytes()[:5000])
        model = str(cut)
    elif case == "profile":
        profile = "raspberry"
    elif case == "names":
        extra = ["--calibration", _bad_npz(tmp_path, a=np.zeros((2, 1, 8, 8), np.float32),
                                             b=np.zeros(2))]  # fmt: skip
    elif case == "shape":
        extra = ["--calibration", _bad_npz(tmp_path, pixels=np.zeros((2, 1, 7, 8), np.float32))]
    elif case == "dtype":
        extra = ["--validation", _bad_npz(tmp_path, pixels=np.zeros((2, 1, 8, 8), np.float64))]
    out = tmp_path / "out"
    done = _edgekit("convert", model, "--profile", profile, "-o", str(out), *extra)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_failed_conversion_leaves_previous_outputs_alone(
    digits: DigitsExample, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"previous": true}')
    bad = _bad_npz(tmp_path, pixels=np.zeros((2, 1, 8, 8), np.int32))
    done = _edgekit(
        "convert", str(digits.model_path), "-p", "raspberrypi", "-o", str(out), "--validation", bad
    )
    assert done.returncode == 2
    assert json.loads((out / "report.json").read_text()) == {"previous": True}
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]


def test_convert_sign_builds_a_bundle_that_verifies(digits: DigitsExample, tmp_path: Path) -> None:
    env = {**os.environ, "EDGEKIT_HOME": str(tmp_path / "home"), "EDGEKIT_KEY_PASSPHRASE": "pw"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgekit", *args],
            capture_output=True, text=True, check=False, env=env,
        )  # fmt: skip

    assert run("keys", "generate", "release").returncode == 0
    out = tmp_path / "out"
    done = run("convert", str(digits.model_path), "-p", "raspberrypi", "-o", str(out),
               "--validation", str(digits.validation_path), "--sign", "release",
               "--name", "digits", "--version", "1.2.0")  # fmt: skip
    assert done.returncode == 0, done.stderr
    bundle = out / "digits-1.2.0-raspberrypi.ekb"
    assert f"signed bundle: {bundle}" in done.stdout
    verified = run("bundle", "verify", str(bundle), "--json")
    assert verified.returncode == 0, verified.stderr
    tampered = tmp_path / "tampered.ekb"
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    refused = run("bundle", "verify", str(tampered))
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: ")
