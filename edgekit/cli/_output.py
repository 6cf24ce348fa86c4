"""Where the CLI prints: results on stdout, progress and messages on stderr."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console

__all__ = ["echo_json", "stderr_console", "stdout_console"]


def stdout_console() -> Console:
    """A console on stdout; created per command so CliRunner's captured stdout is the one
    rich writes to. Scripts and CI logs get a wide table instead of rich's 80 columns."""
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def stderr_console() -> Console:
    """A console on stderr, for progress and what a command is waiting for."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def echo_json(value: object, *, sort_keys: bool = True) -> None:
    """Print `value` as indented JSON on stdout (the `--json` output of every command)."""
    click.echo(json.dumps(value, indent=2, sort_keys=sort_keys))
