"""edgekit.quiet: no framework chatter and no runtime telemetry by default (issue 14 item 6)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from edgekit.converters.examples import DigitsExample

from edgekit.quiet import is_native_noise

# Lines TensorFlow 2.21, absl, LiteRT and the TFLite converter print during a conversion.
NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796332113.361768    7157 port.cc:153] oneDNN custom operations are on. You may "
    "see slightly different numerical results due to floating-point round-off errors.",
    "W0000 00:00:1796332113.361768    7157 tf_tfl_flatbuffer_helpers.cc:365] Ignored "
    "output_format.",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    "fully_quantize: 0, inference_type: 6, input_inference_type: FLOAT32, output_inference_type: "
    "FLOAT32",
]
KEPT = [
    "error: model x.onnx does not exist; check the path",
    "E0000 00:00:1796332113.361768    7157 op_kernel.cc:1] a real failure",
    "Traceback (most recent call last):",
    "warning: not verified on tflite-runtime 2.14.0",
]
# What the environment of a fresh shell lacks: the variables edgekit sets for itself.
OWN_VARIABLES = ("ORT_DISABLE_TELEMETRY", "TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY")


def _fresh_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OWN_VARIABLES}
    env["HOME"] = str(home)
    return env


@pytest.mark.parametrize("line", NOISE)
def test_framework_chatter_is_recognised(line: str) -> None:
    assert is_native_noise(line)
    assert is_native_noise(line + "\n")


@pytest.mark.parametrize("line", KEPT)
def test_real_messages_pass(line: str) -> None:
    assert not is_native_noise(line)


def test_native_output_filters_descriptor_2_and_keeps_the_rest(tmp_path: Path) -> None:
    child = (
        f"import sys; print({NOISE[3]!r}, file=sys.stderr); print('child kept', file=sys.stderr)"
    )
    script = textwrap.dedent(
        f"""
        import os, subprocess, sys
        from edgekit.quiet import native_output
        noise, kept = {NOISE!r}, {KEPT!r}
        with native_output():
            for line in noise + kept:
                os.write(2, (line + "\\n").encode())
            print("python stderr line", file=sys.stderr)
            subprocess.run([sys.executable, "-c", {child!r}], check=True)
            os.write(2, b"no newline at the end")
        print("after", file=sys.stderr)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    lines = done.stderr.splitlines()
    assert not [line for line in lines if line in NOISE]
    for line in [*KEPT, "python stderr line", "child kept"]:
        assert line in lines
    assert done.stderr.endswith("no newline at the endafter\n")  # the rest, as it came


def test_an_onnx_conversion_through_the_python_api_is_quiet_and_sends_no_telemetry(
    digits: DigitsExample, tmp_path: Path
) -> None:
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from edgekit.converters import convert
        convert(Path({str(digits.model_path)!r}), profile="raspberrypi",
                output_dir=Path({str(tmp_path / "out")!r}),
                calibration=Path({str(digits.calibration_path)!r}),
                validation=Path({str(digits.validation_path)!r}), benchmark_seconds=0.1)
        """
    )
    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=False,
        env=_fresh_env(home),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "consider to run pre-processing" not in done.stderr
    assert done.stderr == ""
    assert not (home / ".cache" / "Microsoft").exists()  # onnxruntime's telemetry queue
