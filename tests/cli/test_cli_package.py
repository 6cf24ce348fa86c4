"""The CLI package's structure: lazy commands, one error handler, light entry points."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from edgekit.cli import COMMANDS, main
from edgekit.cli._group import Command, Group, LazyCommand, LazyGroup
from edgekit.errors import EdgekitError

HEAVY = ("tensorflow", "onnx", "torch", "tf2onnx", "onnxslim", "edgekit.converters")


def _imports_after(code: str) -> set[str]:
    probe = (
        f"{code}\n"
        "import sys\n"
        f"found = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('imported:' + ','.join(found), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert "Usage:" in done.stdout
    imported = done.stderr.strip().splitlines()[-1].removeprefix("imported:")
    return {name for name in imported.split(",") if name}


@pytest.mark.parametrize(
    "code",
    [
        "from edgekit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
        "from edgekit.cli.agent import main\nimport sys\nsys.argv = ['edgekit-agent', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass",
        "from edgekit.cli.agent import main\nimport sys\n"
        "sys.argv = ['edgekit-agent', 'run', '--help']\ntry:\n    main()\nexcept SystemExit:\n"
        "    pass",
    ],
    ids=["edgekit --help", "edgekit-agent --help", "edgekit-agent run --help"],
)
def test_help_and_the_agent_import_no_converter_framework(code: str) -> None:
    assert _imports_after(code) == set()


def test_help_lists_every_command_without_importing_it() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for name, lazy in COMMANDS.items():
        assert name in result.output
        assert lazy.short_help.split()[0] in result.output


def _walk(command: click.Command) -> list[click.Command]:
    found = [command]
    if isinstance(command, click.Group):
        context = click.Context(command)
        for name in command.list_commands(context):
            sub = command.get_command(context, name)
            assert sub is not None, name
            found += _walk(sub)
    return found


def test_every_command_reports_errors_through_the_one_handler() -> None:
    every = _walk(main)
    assert len(every) > 35
    wrong = [c.name for c in every if not isinstance(c, (Command, Group))]
    assert wrong == []


def test_the_help_line_of_each_lazy_command_is_its_own() -> None:
    context = click.Context(main)
    for name, lazy in COMMANDS.items():
        command = main.get_command(context, name)
        assert command is not None
        assert lazy.short_help == command.get_short_help_str(limit=10_000), name


def test_an_edgekit_error_is_one_line_and_exit_code_2() -> None:
    @click.command(cls=Command)
    def failing() -> None:
        raise EdgekitError("what, where, what to do")

    result = CliRunner().invoke(failing, [])
    assert result.exit_code == 2
    assert result.output == "error: what, where, what to do\n"


def test_a_command_whose_extra_is_missing_says_what_to_install() -> None:
    @click.group(
        cls=LazyGroup,
        lazy_commands={"thing": LazyCommand("not_installed_module.cli:thing", "x", extra="fleet")},
    )
    def group() -> None:
        pass

    result = CliRunner().invoke(group, ["thing"])
    assert result.exit_code == 2
    assert "needs the Python package 'not_installed_module'" in result.output
    assert "pip install 'edgekit[fleet]'" in result.output
