"""The CLI's one error handler and its lazy command group.

Every edgekit command and group is built on `Command` / `Group` here: an `EdgekitError` (bad
input, untrusted bundle, unreachable broker, no candidate fits) becomes one `error: ...` line
on stderr and exit code 2; anything else is a bug and keeps its traceback (exit code 1).
Commands that report an outcome with their own exit code (`fleet rollout`: 3, 4, 5) raise
`SystemExit` themselves.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import click

from edgekit.errors import EdgekitError

__all__ = ["EXIT_BAD_INPUT", "Command", "Group", "LazyCommand", "LazyGroup"]

EXIT_BAD_INPUT = 2


def _invoke_reporting_errors(ctx: click.Context, invoke: Callable[[click.Context], Any]) -> Any:
    try:
        return invoke(ctx)
    except EdgekitError as error:
        click.echo(f"error: {error}", err=True)
        ctx.exit(EXIT_BAD_INPUT)


class Command(click.Command):
    """A click command whose `EdgekitError`s are one line and exit code 2 (also run alone)."""

    def invoke(self, ctx: click.Context) -> Any:
        return _invoke_reporting_errors(ctx, super().invoke)


class Group(click.Group):
    """A click group with the same error handling; its commands and subgroups inherit it."""

    command_class = Command
    group_class = type  # subgroups are of this group's class

    def invoke(self, ctx: click.Context) -> Any:
        return _invoke_reporting_errors(ctx, super().invoke)


@dataclass(frozen=True)
class LazyCommand:
    """A command living in `module:attribute`, imported only when it runs.

    `short_help` is what `--help` lists (checked against the command's own by a test), so
    listing the commands imports none of them. `extra` is the pip extra its module needs.
    """

    target: str
    short_help: str
    extra: str | None = None


class LazyGroup(Group):
    """A group whose commands are imported on first use: `edgekit --help` and the agent never
    import the converter (tensorflow, onnx, torch) or the fleet tools (paho, prometheus)."""

    def __init__(self, *args: Any, lazy_commands: Mapping[str, LazyCommand], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None or cmd_name not in self.lazy_commands:
            return command
        lazy = self.lazy_commands[cmd_name]
        module_name, _, attribute = lazy.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is None or error.name.split(".")[0] == "edgekit":
                raise
            extra = f"edgekit[{lazy.extra}]" if lazy.extra else "edgekit"
            raise EdgekitError(
                f"`{ctx.command_path} {cmd_name}` needs the Python package {error.name!r}, "
                f"not installed here: pip install '{extra}'"
            ) from error
        loaded = getattr(module, attribute)
        if not isinstance(loaded, click.Command):  # pragma: no cover - a wrong table entry
            raise TypeError(f"{lazy.target} is not a click command")
        self.add_command(loaded, cmd_name)
        return loaded

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in self.lazy_commands and name not in self.commands:
                rows.append((name, self.lazy_commands[name].short_help))
                continue
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=formatter.width)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
