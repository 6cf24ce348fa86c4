"""`edgekit-agent` (also `edgekit agent`): `run --config FILE` and `status [--json]`.

Thin click commands over `edgekit.agent.daemon`; only this module configures the agent's
logging (JSON lines when stderr is not a terminal, for journald and log shippers). Errors
become exit codes as everywhere in the CLI (`edgekit.cli._group`). Imports nothing of the
converter: a device installs `edgekit[agent]` (no tensorflow, no onnx).
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

from edgekit.cli._group import Group
from edgekit.cli._options import json_option

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


_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=lambda: os.environ.get(CONFIG_ENV, str(DEFAULT_CONFIG)),
    show_default=str(DEFAULT_CONFIG),
    help=f"Agent config file (TOML); also ${CONFIG_ENV}.",
)


@click.group("agent", cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
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
@json_option
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
    click.echo(f"{'trust store':<20}version {state.get('trust_version') or '-'}")
    click.echo(f"{'data dir':<20}{state.get('data_dir')}")
    if state.get("error"):
        click.echo(f"{'error':<20}{state['error']}")


def _throttles(given: tuple[str, ...]) -> dict[str, float]:
    throttles: dict[str, float] = {}
    for item in given:
        name, sep, factor = item.partition("=")
        try:
            value = float(factor)
        except ValueError:
            value = 0.0
        if not sep or not name or not 1.0 <= value <= 100.0:
            raise click.BadParameter(
                f"{item!r}: expected NAME=FACTOR with FACTOR from 1 to 100", param_hint="--throttle"
            )
        throttles[name] = value
    return throttles


@agent_group.command("bench")
@click.argument(
    "candidates", nargs=-1, required=True, type=click.Path(path_type=Path, exists=False)
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the measurements JSON here (default: measurements-<device>.json).",
)
@click.option(
    "--device-id",
    help="The device's id in the measurements (default: the agent "
    "config's device_id, else the host name).",
)
@click.option(
    "--threads", type=click.IntRange(1, 256), help="Inference threads (default: all cores)."
)
@click.option(
    "--seconds",
    type=click.FloatRange(0.1, 600),
    default=2.0,
    show_default=True,
    help="Timing budget per candidate.",
)
@click.option(
    "--trust",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Trust store to verify .ekb bundles with (default: the agent config's).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help=f"Agent config (device id, trust store); also ${CONFIG_ENV}.",
)
@click.option(
    "--throttle",
    multiple=True,
    metavar="NAME=FACTOR",
    help="Make one candidate FACTOR times slower (a test aid for the measurement "
    "loop: a device that disagrees with the host).",
)
@json_option(help="Print the measurements JSON.")
def bench_command(
    candidates: tuple[Path, ...],
    output: Path | None,
    device_id: str | None,
    threads: int | None,
    seconds: float,
    trust: Path | None,
    config_path: Path | None,
    throttle: tuple[str, ...],
    as_json: bool,
) -> None:
    """Measure CANDIDATES on this device: load time, p50/p95/p99 latency with intervals, peak
    memory and fidelity against the reference outputs, in child processes at low priority.

    CANDIDATES are .onnx/.tflite files, the candidates/ folder `edgekit convert
    --keep-candidates` writes, converter output folders or .ekb bundles. Copy the file it
    writes back and run `edgekit convert ... --measurements FILE` to choose by these numbers.
    """
    import socket

    from edgekit.agent.bench import collect_subjects, default_workdir, run_bench

    config = None
    config_file = config_path or (
        Path(os.environ[CONFIG_ENV]) if CONFIG_ENV in os.environ else None
    )
    if config_file is not None:
        from edgekit.agent.config import load_config

        config = load_config(config_file)
    device = device_id or (config.device_id if config else socket.gethostname().split(".")[0])
    store = None
    trust_file = trust or (config.truststore if config else None)
    if trust_file is not None:
        from edgekit.trust import load_truststore_file

        store = load_truststore_file(trust_file)
    with default_workdir() as scratch:
        subjects = collect_subjects(list(candidates), workdir=Path(scratch), trust=store)

        def say(message: str) -> None:
            click.echo(f"bench: {message}", err=True)

        measurements = run_bench(
            subjects,
            device_id=device,
            threads=threads or (os.cpu_count() or 1),
            seconds_per_model=seconds,
            throttle=_throttles(throttle),
            workdir=Path(scratch),
            progress=say,
        )
    target = output or Path(f"measurements-{measurements.device.id}.json")
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_bytes(measurements.to_json() + b"\n")
    os.replace(temporary, target)
    if as_json:
        click.echo(measurements.to_json().decode())
        return
    device_line = measurements.device
    click.echo(
        f"{device_line.id}: {device_line.machine}, {device_line.cpu_model}, {device_line.cores} "
        f"cores, {', '.join(f'{k} {v}' for k, v in measurements.runtime.items())}"
    )
    for row in measurements.candidates:
        if row.error:
            click.echo(f"  {row.name:<20} failed: {row.error}")
            continue
        low, high = row.intervals.get("p50", (None, None))
        fidelity = row.fidelity
        verdict = (
            "-"
            if fidelity is None
            else "within tolerance"
            if fidelity.meets_tolerance
            else "outside tolerance: " + "; ".join(fidelity.failures[:2])
        )
        click.echo(
            f"  {row.name:<20} p50 {row.latency_ms['p50']:.3f} ms [{low or 0:.3f}, "
            f"{high if high is not None else float('inf'):.3f}] "
            f"p95 {row.latency_ms['p95']:.3f} ms, load {row.load_ms:.0f} ms, peak "
            f"{(row.peak_rss_bytes or 0) / 2**20:.1f} MiB, {verdict}"
        )
    click.echo(f"measurements: {target}")


def main() -> None:
    """Entry point of the `edgekit-agent` console script."""
    agent_group(prog_name="edgekit-agent")


if __name__ == "__main__":
    main()
