"""Click commands for the fleet tools: `edgekit fleet simulate`, `edgekit fleet broker-config`
and `edgekit monitor`. Thin wrappers over `edgekit.fleet.simulate`, `.broker_config` and
`.monitor`; `edgekit.cli_fleet` attaches them. Errors are `EdgekitError`s: the CLI's group
prints them as one line and exits 2.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from edgekit.errors import EdgekitError

if TYPE_CHECKING:
    from edgekit.fleet.simulate import SimulatedFleet
    from edgekit.trust import TrustStore

__all__ = ["broker_config_command", "monitor_command", "simulate_command"]


class _CommandError(EdgekitError):
    """Bad command-line input (file missing, unreadable)."""


class _ExitingCommand(click.Command):
    """Prints `error: ...` and exits 2 on an `EdgekitError`, also when run outside the group."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except EdgekitError as error:
            click.echo(f"error: {error}", err=True)
            ctx.exit(2)


def _wait_for_interrupt(
    duration_s: float | None, *, every_s: float = 1.0, tick: Callable[[], None] | None = None
) -> None:
    """Block until Ctrl-C / SIGTERM or `duration_s` seconds, calling `tick` every `every_s`."""
    stop = threading.Event()

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, handler)
    deadline = None if duration_s is None else time.monotonic() + duration_s
    try:
        while not stop.is_set():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            stop.wait(timeout=every_s if remaining is None else min(every_s, remaining))
            if tick is not None:
                tick()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fleet_table(sim: SimulatedFleet) -> Table:
    """Live view of a simulated fleet: devices per state, online, what they sent."""
    states = Counter(device.state for device in sim.devices.values())
    online = sum(device.connected for device in sim.devices.values())
    sent = sim.sent()
    table = Table(title=f"simulated fleet {sim.fleet}: {online}/{len(sim.devices)} connected")
    for column in (*sorted(states), "telemetry", "events"):
        table.add_column(column, justify="right")
    table.add_row(
        *(str(states[name]) for name in sorted(states)),
        str(sent.telemetry),
        str(sum(sent.events.values())),
    )
    return table


def _read_trust_store(path: Path) -> TrustStore:
    from edgekit.trust import load_truststore

    try:
        data = path.read_bytes()
    except OSError as error:
        raise _CommandError(
            f"cannot read trust store {path}: {error.strerror}; pass the file devices are "
            "provisioned with (edgekit trust init)"
        ) from None
    return load_truststore(data)


# Shared with the other fleet commands' conventions (edgekit/cli_fleet.py): the same names and
# environment variables everywhere.
_fleet_option = click.option(
    "--fleet",
    required=True,
    envvar="EDGEKIT_FLEET",
    help="Fleet id (topic level) [env EDGEKIT_FLEET].",
)
_broker_option = click.option(
    "--broker",
    default="mqtt://127.0.0.1:1883",
    show_default=True,
    envvar="EDGEKIT_BROKER_URL",
    help="Broker URL [env EDGEKIT_BROKER_URL].",
)


@click.command("simulate", cls=_ExitingCommand)
@click.option("--devices", "count", type=click.IntRange(min=1), default=10, show_default=True)
@_fleet_option
@_broker_option
@click.option(
    "--trust",
    "trust_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Trust store the simulated devices are provisioned with.",
)
@click.option("--profile", "profiles", multiple=True, help="Device profile (repeat to mix).")
@click.option("--fail-health", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--slow", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--slow-factor", type=click.FloatRange(min=0.01), default=3.0, show_default=True)
@click.option("--offline", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--drift", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--prefix", default="sim", show_default=True, help="Device ids: PREFIX-0000...")
@click.option("--telemetry-interval", type=click.FloatRange(min=0), default=5.0, show_default=True)
@click.option("--step-delay", type=click.FloatRange(min=0), default=0.2, show_default=True)
@click.option("--probation", type=click.FloatRange(min=0), default=2.0, show_default=True)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep device state (floors, active bundles) here across runs.",
)
@click.option("--password", default=None, help="MQTT password for every device (user = id).")
@click.option("--duration", type=click.FloatRange(min=0), default=None, help="Stop after S s.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary when stopped.")
def simulate_command(
    *,
    count: int,
    fleet: str,
    broker: str,
    trust_path: Path,
    profiles: tuple[str, ...],
    fail_health: float,
    slow: float,
    slow_factor: float,
    offline: float,
    drift: float,
    seed: int,
    prefix: str,
    telemetry_interval: float,
    step_delay: float,
    probation: float,
    workdir: Path | None,
    password: str | None,
    duration: float | None,
    as_json: bool,
) -> None:
    """Run N simulated devices (real MQTT clients, real verification) until Ctrl-C."""
    from edgekit.fleet.simulate import DEFAULT_PROFILE, Faults, SimulatedFleet, make_device_specs

    store = _read_trust_store(trust_path)
    specs = make_device_specs(count, profiles=profiles or (DEFAULT_PROFILE,), prefix=prefix)
    faults = Faults(
        fail_health=fail_health,
        slow=slow,
        slow_factor=slow_factor,
        offline=offline,
        drift=drift,
        seed=seed,
    )
    sim = SimulatedFleet(
        broker,
        fleet,
        specs,
        trust_store=store,
        faults=faults,
        workdir=workdir,
        keep_state=workdir is not None,
        passwords={spec.device_id: password for spec in specs} if password else None,
        telemetry_interval_s=telemetry_interval,
        step_delay_s=step_delay,
        probation_s=probation,
    )
    console = Console(stderr=True)
    started = time.monotonic()
    try:
        sim.start(wait_s=60)
        if as_json or not console.is_terminal:
            _wait_for_interrupt(duration)
        else:
            console.print(
                f"{count} simulated devices of fleet [bold]{fleet}[/] online at {broker}; "
                "Ctrl-C stops them"
            )
            with Live(_fleet_table(sim), console=console, auto_refresh=False) as live:
                _wait_for_interrupt(
                    duration, tick=lambda: live.update(_fleet_table(sim), refresh=True)
                )
    finally:
        sim.stop()
    sent = sim.sent()
    summary = {
        "fleet": fleet,
        "devices": count,
        "seconds": round(time.monotonic() - started, 3),
        "faults": {name: sorted(ids) for name, ids in sim.fault_assignment.items()},
        "sent": sent.to_json(),
        "outcomes": {
            device_id: [list(entry) for entry in device.history]
            for device_id, device in sim.devices.items()
            if device.history
        },
    }
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
        return
    table = Table(title="simulated devices sent")
    table.add_column("telemetry", justify="right")
    table.add_column("requests", justify="right")
    table.add_column("errors", justify="right")
    table.add_column("status", justify="right")
    table.add_column("events", justify="right")
    table.add_row(
        str(sent.telemetry),
        str(sent.requests),
        str(sent.errors),
        str(sent.status),
        str(sum(sent.events.values())),
    )
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@click.command("broker-config", cls=_ExitingCommand)
@_fleet_option
@click.option(
    "--devices",
    "devices_csv",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="CSV: device_id[,password,profile,group,tags] with a header row.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for mosquitto.conf, acl, passwords, credentials.csv.",
)
@click.option(
    "--listener",
    "port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Device listener port [default: 8883 with TLS, else 1883].",
)
@click.option(
    "--service-listener",
    "service_port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Port for the operator and monitor accounts [default: the device port + 1].",
)
@click.option("--bind", "bind_address", default=None, help="Listener address [default: all].")
@click.option("--tls-ca", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--require-client-cert", is_flag=True, help="Ask clients for a certificate too.")
@click.option(
    "--install-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the files will live on the broker host [default: the output directory].",
)
@click.option("--operator-user", default="operator", show_default=True)
@click.option("--monitor-user", default="monitor", show_default=True)
@click.option("--run-as", default=None, help="Unix user mosquitto runs as (`user` directive).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def broker_config_command(
    *,
    fleet: str,
    devices_csv: Path,
    output: Path,
    port: int | None,
    service_port: int | None,
    bind_address: str | None,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    require_client_cert: bool,
    install_dir: Path | None,
    operator_user: str,
    monitor_user: str,
    run_as: str | None,
    as_json: bool,
) -> None:
    """Write a Mosquitto config, per-device ACL and password file for a fleet."""
    from edgekit.fleet.broker_config import (
        BrokerConfigError,
        TlsSettings,
        read_devices_csv,
        write_broker_config,
    )

    given = [tls_ca, tls_cert, tls_key]
    tls = None
    if any(given):
        if not all(given):
            raise BrokerConfigError(
                "TLS needs all three of --tls-ca, --tls-cert and --tls-key (paths on the "
                "broker host)"
            )
        tls = TlsSettings(
            Path(str(tls_ca)),
            Path(str(tls_cert)),
            Path(str(tls_key)),
            require_certificate=require_client_cert,
        )
    devices = read_devices_csv(devices_csv)
    result = write_broker_config(
        fleet,
        devices,
        output,
        port=port,
        service_port=service_port,
        bind_address=bind_address,
        tls=tls,
        install_dir=install_dir,
        operator_user=operator_user,
        monitor_user=monitor_user,
        run_as=run_as,
    )
    roles = list(result.accounts.values())
    if as_json:
        click.echo(
            json.dumps(
                {
                    "directory": str(result.directory),
                    "files": {
                        "conf": str(result.conf),
                        "acl": str(result.acl),
                        "passwords": str(result.passwords),
                        "service_passwords": str(result.service_passwords),
                        "credentials": str(result.credentials),
                    },
                    "devices": roles.count("device"),
                    "generated_passwords": list(result.generated),
                },
                sort_keys=True,
            )
        )
        return
    click.echo(
        f"wrote {result.conf}, {result.acl.name}, {result.passwords.name}, "
        f"{result.service_passwords.name} and {result.credentials.name} "
        f"({roles.count('device')} devices, "
        f"{len(result.generated)} new passwords) in {result.directory}; keep credentials.csv "
        "secret and give each device its own line"
    )


@click.command("monitor", cls=_ExitingCommand)
@_fleet_option
@click.option("--listen", default=":9108", show_default=True, help="[ADDRESS]:PORT for /metrics.")
@_broker_option
@click.option(
    "--group",
    default="edgekit-monitor",
    show_default=True,
    help="Shared subscription group: exporters with the same group split the messages.",
)
@click.option(
    "--username",
    default="monitor",
    show_default=True,
    envvar="EDGEKIT_MONITOR_USERNAME",
    help="MQTT user [env EDGEKIT_MONITOR_USERNAME].",
)
@click.option(
    "--password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File holding the MQTT password (or set EDGEKIT_MONITOR_PASSWORD).",
)
@click.option(
    "--ca",
    "--tls-ca",
    "tls_ca",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar="EDGEKIT_BROKER_CA",
    help="CA (PEM) that signed the broker's certificate [env EDGEKIT_BROKER_CA].",
)
@click.option("--status-shared", is_flag=True, help="Share status messages too (no retained).")
@click.option(
    "--forget-after",
    type=click.FloatRange(min=0),
    default=3600.0,
    show_default=True,
    help="Drop series of devices silent this many seconds (0: never).",
)
@click.option("-v", "--verbose", is_flag=True)
def monitor_command(
    *,
    fleet: str,
    listen: str,
    broker: str,
    group: str,
    username: str,
    password_file: Path | None,
    tls_ca: Path | None,
    status_shared: bool,
    forget_after: float,
    verbose: bool,
) -> None:
    """Prometheus exporter for a fleet's telemetry, status and events (MQTT 5 shared subs)."""
    import os

    from edgekit.fleet.monitor import FleetMonitor, parse_listen
    from edgekit.mqtt import BrokerSettings

    _configure_logging(verbose)
    address = parse_listen(listen)
    settings = BrokerSettings(broker, ca_file=tls_ca)
    password = os.environ.get("EDGEKIT_MONITOR_PASSWORD")
    if password_file is not None:
        try:
            password = password_file.read_text().strip()
        except OSError as error:
            raise _CommandError(f"cannot read {password_file}: {error.strerror}") from None
    if password is not None:  # the account: from the URL, else --username
        settings = settings.replace(username=settings.username or username, password=password)
    monitor = FleetMonitor(
        settings,
        fleet,
        group=group,
        status_shared=status_shared,
        forget_after_s=forget_after,
    )
    monitor.start(listen=address)
    logging.getLogger(__name__).info(
        "serving http://%s:%d/metrics for fleet %s (group %s)",
        address[0],
        monitor.port,
        fleet,
        group,
    )
    try:
        _wait_for_interrupt(None)
    finally:
        monitor.stop()
