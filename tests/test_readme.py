"""Every command the README shows, run literally (placeholders substituted by name)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from edgekit.converters.examples import DigitsExample

from edgekit.mosquitto import free_port
from tests.readme_harness import REPO, Workspace, readme_blocks, section_blocks

# Each README section with code, and the test that runs it. A new block under a new heading
# fails test_every_block_is_run until a test runs it.
RUN_BY = {
    "Set up and try it": "test_setup_section",
    "Convert a model": "test_convert_section",
    "Benchmarks": "test_benchmarks_section",
    "Profiles": "test_profiles_section",
    "Sign, ship, run": "test_sign_section",
    "A first fleet on this machine": "test_first_fleet_section",
    "A real fleet: a broker and device kits": "test_real_fleet_section",
}


def test_every_block_is_run() -> None:
    sections = {b.section for b in readme_blocks()}
    missing = sections - set(RUN_BY)
    assert not missing, f"README sections whose commands no test runs: {sorted(missing)}"
    for name in RUN_BY.values():
        assert name in globals(), f"RUN_BY names {name}, which is not a test here"


def test_profiles_section(tmp_path: Path, digits: DigitsExample) -> None:
    (tmp_path / "my-board.yaml").write_text(
        "extends: raspberrypi\nname: my-board\n", encoding="utf-8"
    )
    (block,) = section_blocks("Profiles")
    out = Workspace(tmp_path).run(block, {"model.onnx": str(digits.model_path)}).stdout
    assert "raspberrypi-tflite" in out  # profiles list
    assert (tmp_path / "out" / "model.onnx").is_file()  # the user profile converted


@pytest.mark.slow
def test_setup_section(tmp_path: Path) -> None:
    """The three scripts a new user runs first; the test command itself is what CI runs
    (`.ci/run`), so here it is replaced by a no-op rather than run inside itself."""
    (block,) = section_blocks("Set up and try it")
    workspace = Workspace(tmp_path, env={"DEMO_DIR": str(tmp_path / "demo")})
    out = workspace.run(
        block, {"bash scripts/test.sh ": ": scripts/test.sh is .ci/run "}, cwd=REPO
    ).stdout
    assert "chosen" in out.lower()  # demo.sh printed the conversion report
    assert "predicted digit" in out  # fleet_demo.sh reached inference on the upgraded agent


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, digits: DigitsExample) -> Workspace:
    """A folder where the README's convert step has run: `out/` holds the digits artifact.

    The sections below continue in it, in README order, as a new user would."""
    root = tmp_path_factory.mktemp("readme")
    workspace = Workspace(root, env={"EDGEKIT_KEY_PASSPHRASE": "readme-passphrase"})
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "edgekit"),
            "convert",
            str(digits.model_path),
            "--profile",
            "raspberrypi",
            "-o",
            "out/",
            "--calibration",
            str(digits.calibration_path),
            "--validation",
            str(digits.validation_path),
        ],
        check=False,
        cwd=root,
        env=workspace.environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return workspace


def test_sign_section(converted: Workspace) -> None:
    (block,) = section_blocks("Sign, ship, run")
    out = converted.run(block).stdout
    assert "valid: digits 1.1.0 for raspberrypi" in out
    for version in ("1.0.0", "1.1.0"):
        assert (converted.root / "bundles" / f"digits-{version}-raspberrypi.ekb").is_file()


def test_first_fleet_section(converted: Workspace) -> None:
    """Nothing to a first model on 20 simulated Pis, then a canary upgrade, every flag as
    the README shows it; ports moved to free ones (another broker may own the README's)."""
    (block,) = section_blocks("A first fleet on this machine")
    out = converted.run(
        block, {"18830": str(free_port()), "9108": str(free_port())}, timeout_s=300
    ).stdout
    assert "20 devices online" in out
    assert "no baseline: first deployment" in out  # judged against the profile's budget
    # every wait says what it waits for and until when
    assert re.search(r"waiting for \S+ \(.*\) until \d\d:\d\d:\d\d", out), out[-3000:]
    assert "completed: 20 devices updated to digits 1.0.0" in out
    assert "completed: 20 devices updated to digits 1.1.0" in out
    assert 'edgekit_monitor_devices{fleet="plant"} 20.0' in out


def test_real_fleet_section(converted: Workspace) -> None:
    (block,) = section_blocks("A real fleet: a broker and device kits")
    out = converted.run(block).stdout
    kit = converted.root / "kits" / "cam-0001"
    assert {p.name for p in kit.iterdir()} >= {
        "agent.toml",
        "install.sh",
        "edgekit-agent.service",
        "mqtt-password",
        "factory.ekb",
    }
    assert "cam-0001" in (converted.root / "devices.csv").read_text()
    broker = converted.root / "broker"
    assert f"mosquitto -c {broker / 'mosquitto.conf'}" in out  # how to start it, exactly
    assert "listener 8883" in (broker / "mosquitto.conf").read_text()


def _extras(pyproject: str) -> set[str]:
    section = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([a-z][a-z-]*) = \[", section, re.MULTILINE))


def test_convert_section(tmp_path: Path, digits: DigitsExample) -> None:
    """The PyTorch path first, as written (the install line is checked, not run: this
    environment is that install); then the Python API on the digits ONNX model."""
    pytorch, _formats, python_api = section_blocks("Convert a model")  # _formats: slow test
    install = next(line for line in pytorch.code.splitlines() if line.startswith("pip install"))
    extras = re.fullmatch(r"pip install -e '\.\[([a-z,-]+)\]'", install)
    assert extras is not None, install
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert set(extras.group(1).split(",")) <= _extras(pyproject)
    assert '"torch==2.13.0"' in pyproject.split("\ntorch = [", 1)[1].split("]", 1)[0]
    workspace = Workspace(tmp_path)
    workspace.run(pytorch, {install: ": the install line above"})
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["source"]["format"] == "torch"
    assert report["data"]["accuracy"] == "validated"
    assert (tmp_path / "out" / "model.onnx").is_file()

    out = workspace.run(
        python_api,
        {
            '"model.onnx"': repr(str(digits.model_path)),
            '"calib.npz"': repr(str(digits.calibration_path)),
            '"val.npz"': repr(str(digits.validation_path)),
            '"out"': '"out-api"',
        },
    ).stdout
    assert (tmp_path / "out-api" / "model.onnx").is_file()
    assert json.loads((tmp_path / "out-api" / "report.json").read_text())["chosen"] in out


@pytest.mark.slow
def test_convert_formats_block(tmp_path: Path) -> None:
    """ONNX with --verify-runtime (emulated Pi CPUs), Keras and ONNX to TFLite (onnx2tf's
    own cached venv, minutes on first use): the slow tier."""
    _, formats, _ = section_blocks("Convert a model")
    out = Workspace(tmp_path).run(formats, timeout_s=3600).stdout
    for folder, artifact in (
        ("out-onnx", "model.onnx"),
        ("out-keras", "model.tflite"),
        ("out-tflite", "model.tflite"),
    ):
        assert (tmp_path / folder / artifact).is_file(), folder
    assert "1.16.3" in out  # --verify-runtime's rows: the profile's oldest onnxruntime


@pytest.mark.slow
def test_benchmarks_section(tmp_path: Path) -> None:
    """The benchmarks as the README shows them, from the repo (they write benchmarks/results/,
    which git ignores)."""
    (block,) = section_blocks("Benchmarks")
    Workspace(tmp_path).run(block, cwd=REPO, timeout_s=4 * 3600)
    for name in ("convert.json", "agent.json", "fleet.json"):
        assert (REPO / "benchmarks" / "results" / name).is_file(), name
