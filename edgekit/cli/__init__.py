"""The `edgekit` and `edgekit-agent` command lines: one click module per command group."""

from __future__ import annotations

from typing import Any

__all__ = ["main"]


def __getattr__(name: str) -> Any:
    # `edgekit.cli.agent` (the device's entry point) imports this package: the `edgekit`
    # group and what it imports load only when asked for.
    if name == "main":
        from edgekit.cli.convert import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
