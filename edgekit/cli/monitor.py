"""`edgekit monitor`: a Prometheus exporter for a fleet, a thin command over
`edgekit.fleet.monitor`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from edgekit.cli._group import Command
from edgekit.cli._options import broker_url_option, fleet_option
from edgekit.cli._wait import wait_for_interrupt
from edgekit.errors import EdgekitError

__all__ = ["monitor_command"]


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@click.command("monitor", cls=Command)
@fleet_option(required=True)
@click.option("--listen", default=":9108", show_default=True, help="[ADDRESS]:PORT for /metrics.")
@broker_url_option
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
            raise EdgekitError(f"cannot read {password_file}: {error.strerror}") from None
    if password is not None:  # the account: from the URL, else --username
        settings = settings.replace(username=settings.username or username, password=password)
    monitor = FleetMonitor(
        settings,
        fleet,
        group=group,
        status_shared=status_shared,
        forget_after_s=forget_after,
    )
    click.echo(
        f"monitor of fleet {fleet}: connecting to {settings.endpoint} as "
        f"{settings.username or 'anonymous'} (shared group {group})",
        err=True,
    )
    monitor.start(listen=address)
    click.echo(
        f"monitor of fleet {fleet}: serving http://{address[0]}:{monitor.port}/metrics; "
        "Ctrl-C stops",
        err=True,
    )
    try:
        wait_for_interrupt(None)
    finally:
        monitor.stop()
