"""`edgekit fleet simulate` and `edgekit fleet broker-config`: thin click commands over
`edgekit.fleet.simulate` and `.broker_config`; `edgekit.cli.fleet` attaches them to its group.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from edgekit.cli._group import Command
from edgekit.cli._options import broker_url_option, fleet_option
from edgekit.cli._wait import wait_for_interrupt

if TYPE_CHECKING:
    from edgekit.fleet.simulate import SimulatedFleet
    from edgekit.trust import TrustStore

__all__ = ["broker_config_command", "simulate_command"]


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
    from edgekit.trust import load_truststore_file

    return load_truststore_file(path)


@click.command("simulate", cls=Command)
@click.option("--devices", "count", type=click.IntRange(min=1), default=10, show_default=True)
@fleet_option(required=True)
@broker_url_option
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
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    started = time.monotonic()
    try:
        # Where it connects, before the wait and after, also when not on a terminal (stderr:
        # --json output stays clean).
        console.print(
            f"connecting {count} simulated devices of fleet {fleet} to {sim.broker.endpoint}"
        )
        sim.start(wait_s=60)
        console.print(
            f"{count} simulated devices of fleet {fleet} online at {sim.broker.endpoint}; "
            + ("Ctrl-C stops them" if duration is None else f"stopping after {duration:g} s")
        )
        if as_json or not console.is_terminal:
            wait_for_interrupt(duration)
        else:
            with Live(_fleet_table(sim), console=console, auto_refresh=False) as live:
                wait_for_interrupt(
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


@click.command("broker-config", cls=Command)
@fleet_option(required=True)
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
@click.option(
    "--run-as",
    default=None,
    help="Unix user mosquitto runs as (`user` directive) [default: mosquitto's own, mosquitto].",
)
@click.option(
    "--insecure-plaintext",
    is_flag=True,
    help="Allow a device listener without TLS (passwords in clear text): test brokers only.",
)
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
    insecure_plaintext: bool,
    as_json: bool,
) -> None:
    """Write a Mosquitto config, per-device ACL and password file for a fleet, and print how
    to start Mosquitto with them."""
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
        insecure_plaintext=insecure_plaintext,
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
                    "service_user": result.service_user,
                    "setup_commands": list(result.setup_commands),
                    "start_command": result.start_command,
                    "warnings": list(result.warnings),
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
    if tls is None:
        click.echo("warning: the device listener has no TLS (--insecure-plaintext)", err=True)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if result.service_user != "root":
        click.echo(
            f"mosquitto reads mosquitto.conf as root, then runs as user {result.service_user}: "
            f"it opens {result.passwords.name}, {result.service_passwords.name}, "
            f"{result.acl.name}, the TLS key and data/ as that user"
        )
    click.echo("start it as root:")
    for command in (*result.setup_commands, result.start_command):
        click.echo(f"  {command}")
