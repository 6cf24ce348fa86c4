"""`edgekit-agent` (also `edgekit agent`): `run --config FILE` and `status [--json]`.

Thin click commands over `edgekit.agent.daemon`; only this module configures logging (JSON
lines when stderr is not a terminal, for journald and log shippers) and turns errors into exit
codes (an `EdgekitError` is one line on stderr and exit code 2).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import click

from edgekit.errors import EdgekitError

__all__ = ["agent_group", "main"]

DEFAULT_CONFIG = Path("/etc/edgekit/agent.toml")
CONFIG_ENV = "EDGEKIT_AGENT_CONFIG"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document)


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class _Group(click.Group):
    """Turns `EdgekitError` into one clear line and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgekitError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)


_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=lambda: os.environ.get(CONFIG_ENV, str(DEFAULT_CONFIG)),
    show_default=str(DEFAULT_CONFIG),
    help=f"Agent config file (TOML); also ${CONFIG_ENV}.",
)


@click.group("agent", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def agent_group() -> None:
    """The device agent: pull, verify, install, health-check, serve, report, roll back."""


@agent_group.command("run")
@_config_option
def run_command(config_path: Path) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    from edgekit.agent.config import load_config
    from edgekit.agent.daemon import Agent

    config = load_config(config_path)
    _configure_logging(config.log_level)
    agent = Agent(config)
    stop = threading.Event()

    def handle(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("received signal %d", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    agent.run(stop)


@agent_group.command("status")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status_command(config_path: Path, as_json: bool) -> None:
    """Print the local update state: active and previous bundle, journal, floor."""
    from edgekit.agent.config import load_config
    from edgekit.agent.daemon import describe_state

    state = describe_state(load_config(config_path))
    if as_json:
        click.echo(json.dumps(state, indent=2, sort_keys=True))
        return
    for label in ("active", "previous"):
        bundle = state.get(label)
        text = (
            f"{bundle['name']} {bundle['version']} (slot {bundle['slot']}, {bundle['sha256'][:12]})"
            if bundle
            else "-"
        )
        click.echo(f"{label:<20}{text}")
    click.echo(f"{'state':<20}{state.get('state')}")
    if state.get("reason"):
        click.echo(f"{'reason':<20}{state['reason']}")
    click.echo(f"{'last sequence':<20}{state.get('last_sequence')}")
    click.echo(f"{'epoch floor':<20}{state.get('min_security_epoch')}")
    click.echo(f"{'rollout':<20}{state.get('rollout_id') or '-'}")
    click.echo(f"{'inference':<20}{state.get('inference_url') or '-'}")
    click.echo(f"{'bad bundles':<20}{len(state.get('bad_bundles') or {})}")
    click.echo(f"{'data dir':<20}{state.get('data_dir')}")
    if state.get("error"):
        click.echo(f"{'error':<20}{state['error']}")


def main() -> None:
    """Entry point of the `edgekit-agent` console script."""
    agent_group(prog_name="edgekit-agent")


if __name__ == "__main__":
    main()
