"""Where the CLI prints and writes: results on stdout, progress and messages on stderr, files
replaced atomically; labels shared by the signing commands."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

import click
from rich.console import Console

from edgekit.errors import EdgekitError

__all__ = [
    "echo_json",
    "key_label",
    "keyring_names",
    "plain_console",
    "stderr_console",
    "stdout_console",
    "validity_label",
    "write_file",
]


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


def plain_console() -> Console:
    """A console on stdout without highlighting or wrapping (per command, for CliRunner)."""
    return Console(highlight=False, soft_wrap=True)


def write_file(path: Path, data: bytes) -> None:
    """Replace `path` atomically and durably, or say what failed (the old file stays)."""
    from edgekit.files import write_atomic

    try:
        write_atomic(path, data)
    except OSError as e:
        raise EdgekitError(
            f"cannot write {path}: {e.strerror or e}; {path} is unchanged (free space, "
            "permissions?)"
        ) from e


def keyring_names() -> dict[str, str]:
    """Local keyring names by key id, to label key ids in output."""
    from edgekit.trust.keys import list_keys

    return {info.keyid: info.name for info in list_keys()}


def key_label(keyid: str, names: Mapping[str, str]) -> str:
    """A key id's first 16 digits, with its keyring name when there is one."""
    return f"{keyid[:16]} ({names[keyid]})" if keyid in names else keyid[:16]


def validity_label(valid: bool | None) -> str:
    """How a signature check reads in a table."""
    return "unknown key" if valid is None else ("yes" if valid else "NO")
