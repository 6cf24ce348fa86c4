"""The `edgekit` command line: thin click functions over the library, one module per command
group (`convert`, `profiles`, `runtime` for verify-runtime, `keys`, `trust`, `bundle`,
`fleet` with `fleet_tools`, `monitor`, `agent` for `edgekit-agent`).

Only this package configures logging, prints, and turns errors into exit codes, in one place
(`_group`): an `EdgekitError` is one line on stderr and exit code 2; anything else is a bug
and keeps its traceback (exit code 1). Command modules are imported when their command runs,
so `edgekit --help` and `edgekit-agent` never import tensorflow, onnx or torch.
"""

from __future__ import annotations

import logging

import click

from edgekit import __version__
from edgekit.cli._group import LazyCommand, LazyGroup

__all__ = ["COMMANDS", "main"]

# name -> where the command lives and the line `edgekit --help` shows for it.
COMMANDS = {
    "convert": LazyCommand(
        "edgekit.cli.convert:convert",
        "Convert MODEL into the fastest artifact that meets the profile's tolerance.",
        extra="convert",
    ),
    "profiles": LazyCommand(
        "edgekit.cli.profiles:profiles_group", "Device profiles: list the built-in ones, show one."
    ),
    "verify-runtime": LazyCommand(
        "edgekit.cli.runtime:verify_runtime_command",
        "Check that SOURCE loads and matches in the profile's oldest and newest runtimes.",
        extra="convert",
    ),
    "keys": LazyCommand(
        "edgekit.cli.keys:keys_group",
        "Signing keys in the local keyring ($EDGEKIT_HOME/keys, default ~/.config/edgekit/keys).",
    ),
    "trust": LazyCommand(
        "edgekit.cli.trust:trust_group",
        "Trust stores: which keys devices trust to sign trust stores, bundles and directives.",
    ),
    "bundle": LazyCommand(
        "edgekit.cli.bundle:bundle_group", "Signed bundles (.ekb): build, sign, verify and inspect."
    ),
    "fleet": LazyCommand(
        "edgekit.cli.fleet:fleet_group",
        "Operate a fleet over its MQTT broker: devices, bundles, rollouts.",
        extra="fleet",
    ),
    "monitor": LazyCommand(
        "edgekit.cli.monitor:monitor_command",
        "Prometheus exporter for a fleet's telemetry, status and events (MQTT 5 shared subs).",
        extra="fleet",
    ),
    "agent": LazyCommand(
        "edgekit.cli.agent:agent_group",
        "The device agent: pull, verify, install, health-check, serve, report, roll back.",
        extra="agent",
    ),
}


@click.group(
    cls=LazyGroup,
    lazy_commands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="edgekit")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Take a trained model from a workstation to a fleet of small devices."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose == 0:
        # onnxruntime's quantizer logs through the root logger; keep the terminal for results.
        logging.getLogger().setLevel(logging.ERROR)
