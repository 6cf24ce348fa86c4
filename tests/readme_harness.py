"""Runs the README's code blocks as a new user would: literally, section by section.

A block is taken from README.md as written; the only change a test may make is a named
substitution (a placeholder such as `model.onnx` replaced by a file the test built), and a test
fails if a substitution no longer matches anything, so the table cannot rot. Bash blocks run
with `bash -e -o pipefail` in a workspace with the repo's venv first on PATH; a command that
ends with `&` (a server, the simulator) runs in the background and is killed with the block's
process group when the section is done.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    section: str
    lang: str
    code: str
    line: int


def readme_blocks(path: Path = README) -> list[Block]:
    """Every fenced block with its `## ` section and first line number."""
    blocks: list[Block] = []
    section = ""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = _FENCE.match(line)
        if fence:
            start = i + 1
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
            blocks.append(Block(section, fence.group(1), "\n".join(lines[start:i]) + "\n", start))
        i += 1
    return blocks


def section_blocks(section: str) -> list[Block]:
    found = [b for b in readme_blocks() if b.section == section]
    assert found, f"README has no code block under '## {section}'"
    return found


@dataclass
class Workspace:
    """A folder and an environment in which README commands run."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        venv_bin = Path(sys.executable).parent
        env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("EDGEKIT_HOME", str(self.root / "home"))
        env.update(self.env)
        return env

    def run(
        self,
        block: Block,
        substitutions: dict[str, str] | None = None,
        *,
        timeout_s: float = 900,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run one block; fails the test (with its output) on a non-zero exit."""
        code = substitute(block, substitutions or {})
        if block.lang == "python":
            argv = [sys.executable, "-c", code]
        else:
            argv = ["bash", "-e", "-o", "pipefail", "-c", code]
        process = subprocess.Popen(
            argv,
            cwd=cwd or self.root,
            env=self.environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
            raise AssertionError(
                f"README line {block.line} ({block.section}) timed out after {timeout_s:.0f}s:\n"
                f"{code}\n--- output ---\n{out[-6000:]}"
            ) from None
        finally:
            # Kill what the block left in the background (servers, the simulator).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        if process.returncode != 0:
            raise AssertionError(
                f"README line {block.line} ({block.section}) exited {process.returncode}:\n"
                f"{code}\n--- output ---\n{out[-6000:]}"
            )
        return subprocess.CompletedProcess(argv, process.returncode, out, "")


def substitute(block: Block, substitutions: dict[str, str]) -> str:
    code = block.code
    for placeholder, value in substitutions.items():
        if placeholder not in code:
            raise AssertionError(
                f"README line {block.line}: the test substitutes {placeholder!r}, which the "
                "block no longer contains; update the test with the README"
            )
        code = code.replace(placeholder, value)
    return code
