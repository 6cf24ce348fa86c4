"""The README's first convert example runs as written (from a fresh clone, once installed)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

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
