"""Every command the README shows, run literally (placeholders substituted by name)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from edgekit.converters.examples import DigitsExample

from edgekit.mosquitto import free_port
from tests.readme_harness import REPO, Workspace, section_blocks

# Each README section with code, and the test that runs it. A new block under a new heading
# fails test_every_block_is_run until a test runs it.
RUN_BY = {
    "Set up and try it": "test_setup_section",
    "Profiles": "test_profiles_section",
    "Sign, ship, run": "test_sign_section",
    "A first fleet on this machine": "test_first_fleet_section",
    "A real fleet: a broker and device kits": "test_real_fleet_section",
}


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
    assert "waiting for" in out and "until" in out  # every wait says what and until when
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


ROOT = Path(__file__).resolve().parents[1]


def _first_convert_example() -> list[str]:
    """The commands of the first code block under `## Convert a model`, continuation lines
    joined and comments dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Convert a model", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert match is not None, "no bash block under ## Convert a model"
    joined = match.group(1).replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        command = line.split("#", 1)[0].strip()
        if command:
            commands.append(command)
    return commands


def test_readme_pytorch_example_runs_as_written(tmp_path: Path) -> None:
    commands = _first_convert_example()
    install, train, convert = commands
    # The install line names extras that exist, and the torch extra pins the CPU build.
    extras = re.fullmatch(r"pip install -e '\.\[([a-z,-]+)\]'", install)
    assert extras is not None, install
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    declared = set(re.findall(r"^([a-z][a-z-]*) = \[", section, re.MULTILINE))
    assert set(extras.group(1).split(",")) <= declared, declared
    torch_extra = section.split("\ntorch = [", 1)[1].split("]", 1)[0]
    assert '"torch==2.13.0"' in torch_extra
    assert {"convert", "torch", "examples"} <= set(extras.group(1).split(","))
    # This environment has them installed; run the other lines as written, in a fresh folder.
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    for command in (train, convert):
        argv = shlex.split(command)
        if argv[0] == "python":
            argv[0] = sys.executable
        done = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, (command, done.stderr)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["source"]["format"] == "torch"
    assert report["source"]["path"].endswith("ex/digits_cnn.pt2")
    assert report["data"]["accuracy"] == "validated"
    chosen = next(row for row in report["candidates"] if row["verdict"] == "chosen")
    assert chosen["accuracy"]["meets_tolerance"]
    assert (tmp_path / "out" / "model.onnx").is_file()
