"""`edgekit fleet ...` and `edgekit monitor`: thin click commands over `edgekit.fleet`.

Errors are not caught here: an `EdgekitError` reaches the main CLI, which prints one line and
exits with code 2. `edgekit fleet rollout` (and `rollout resume`, `resume`, `rollback`) exit
with a code that says how the rollout ended:

    0  completed: every wave passed its gates
    2  error: bad input, unreachable broker, unknown rollout (nothing was changed, or the
       rollout stays resumable)
    3  halted: a gate failed; updated devices were reverted (unless --no-revert)
    4  aborted by the operator (`edgekit fleet abort`)
    5  halted or aborted, and some devices could not be reverted (see `edgekit fleet status`)
    130 interrupted (Ctrl-C): the rollout stays recorded; `edgekit fleet rollout resume ID`
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgekit.cli._group import Group as _CommandGroup
from edgekit.cli._options import broker_options as _broker_options
from edgekit.cli._options import directive_key_option as _key_option
from edgekit.cli._options import fleet_option as _fleet_option
from edgekit.cli._options import load_signers
from edgekit.cli._output import stderr_console as _stderr
from edgekit.cli._output import stdout_console as _stdout
from edgekit.errors import EdgekitError
from edgekit.fleet.cohorts import STRATEGIES, parse_percent
from edgekit.fleet.provision import AGENT_EXTRA, InstallLayout
from edgekit.fleet.registry import (
    DeviceRecord,
    DeviceSelector,
    fleet_client,
    load_registry,
    parse_tag,
    wait_until_online,
)
from edgekit.fleet.rollout import (
    RolloutController,
    RolloutOptions,
    RolloutProgress,
    RolloutResult,
    load_release,
    progress_of,
    publish_release,
)
from edgekit.fleet.store import RolloutStore, default_db_path
from edgekit.mqtt import BrokerSettings, MqttClient
from edgekit.topics import Topics
from edgekit.trust.keys import Signer

__all__ = [
    "EXIT_ABORTED",
    "EXIT_COMPLETED",
    "EXIT_HALTED",
    "EXIT_INTERRUPTED",
    "EXIT_REVERT_INCOMPLETE",
    "fleet_group",
]

EXIT_COMPLETED = 0
EXIT_HALTED = 3
EXIT_ABORTED = 4
EXIT_REVERT_INCOMPLETE = 5
EXIT_INTERRUPTED = 130

F = TypeVar("F", bound=Callable[..., Any])


# -- option groups -------------------------------------------------------------------------------


def _db_option(function: F) -> F:
    return click.option(
        "--db",
        "db_path",
        envvar="EDGEKIT_FLEET_DB",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Rollout database [env EDGEKIT_FLEET_DB; default $EDGEKIT_HOME/fleet.db].",
    )(function)


def _selector_options(function: F) -> F:
    options = [
        click.option("--group", help="Only devices of this group."),
        click.option("--tag", "tags", multiple=True, metavar="K=V", help="Only devices tagged so."),
        click.option("--profile", "profiles", multiple=True, help="Only devices of this profile."),
        click.option("--device", "devices", multiple=True, help="Only this device (repeatable)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _selector(
    group: str | None, tags: Sequence[str], profiles: Sequence[str], devices: Sequence[str]
) -> DeviceSelector:
    return DeviceSelector(
        group=group,
        tags=dict(parse_tag(tag) for tag in tags),
        profiles=tuple(profiles),
        devices=tuple(devices),
    )


def _store(db_path: Path | None, *, create: bool = False) -> RolloutStore:
    path = db_path or default_db_path()
    if not create and not path.exists():
        raise EdgekitError(
            f"no rollout database at {path}: run a rollout first, or point --db "
            "(EDGEKIT_FLEET_DB) at the controller's database"
        )
    return RolloutStore(path)


def _signers(key_name: str | None) -> list[Signer]:
    if not key_name:
        raise click.UsageError(
            "--key NAME is required: the keyring key that signs directives (env "
            "EDGEKIT_DIRECTIVE_KEY)"
        )
    return load_signers([key_name])


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration(text: str, *, what: str) -> float:
    """`"10m"` -> 600.0; a bare number is seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise click.BadParameter(f"{what} {text!r} is not a duration: write e.g. 30s, 10m or 1h")
    return float(match.group(1)) * _UNIT_S[match.group(2) or "s"]


def _ratio(text: str | None, *, what: str) -> float | None:
    if text is None:
        return None
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise click.BadParameter(f"{what} {text!r} is not a percentage (e.g. 20%)") from None
    if value < 0:
        raise click.BadParameter(f"{what} must be >= 0")
    return value


# -- the group -----------------------------------------------------------------------------------


@click.group("fleet", cls=_CommandGroup)
def fleet_group() -> None:
    """Operate a fleet over its MQTT broker: devices, bundles, rollouts.

    Rollout state lives in a SQLite file ($EDGEKIT_HOME/fleet.db or --db), so a controller
    that stops can be resumed, and status/pause/abort work from another terminal.
    """


# -- devices -------------------------------------------------------------------------------------


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


@fleet_group.command("devices")
@_fleet_option(required=True)
@_selector_options
@click.option("--online", "only_online", is_flag=True, help="Only devices that are online.")
@click.option(
    "--wait-for",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="First wait until N matching devices are online (e.g. devices still starting), "
    "printing progress; exit 4 if they are not online within --timeout.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds --wait-for waits.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_broker_options
def devices_command(
    *,
    fleet: str,
    group: str | None,
    tags: tuple[str, ...],
    profiles: tuple[str, ...],
    devices: tuple[str, ...],
    only_online: bool,
    wait_for: int | None,
    timeout_s: float,
    as_json: bool,
    settings: BrokerSettings,
) -> None:
    """List the fleet's devices from their retained status messages."""
    selector = _selector(group, tags, profiles, devices)
    topics = Topics(fleet)
    with fleet_client(settings) as connection:
        registry = load_registry(connection, topics)
        if wait_for is not None:
            online = wait_until_online(
                connection,
                registry,
                selector,
                wait_for,
                timeout_s=timeout_s,
                say=lambda line: _stderr().print(line, markup=False),
            )
            if online < wait_for:
                _stderr().print(
                    f"only {online} of {wait_for} devices came online within {timeout_s:g} s; "
                    "check that they run and reach the broker",
                    markup=False,
                )
                raise SystemExit(4)
            _stderr().print(f"{online} devices online", markup=False)
    records = [r for r in registry.devices(selector) if r.online or not only_online]
    if as_json:
        click.echo(json.dumps([r.to_json() for r in records], indent=2, sort_keys=True))
        return
    _print_devices(records, fleet)


def _print_devices(records: Sequence[DeviceRecord], fleet: str) -> None:
    console = _stdout()
    if not records:
        console.print(f"no matching devices in fleet {fleet!r}")
        return
    table = Table(title=f"fleet {fleet}: {len(records)} devices")
    for column in ("device", "online", "profile", "group", "tags", "version", "state", "seen"):
        table.add_column(column, no_wrap=column != "tags")
    now = time.time()
    for r in records:
        table.add_row(
            r.device,
            "[green]yes[/]" if r.online else "[red]no[/]",
            r.profile,
            r.group,
            ",".join(f"{k}={v}" for k, v in sorted(r.tags.items())),
            f"{r.active.name} {r.active.version}" if r.active else "-",
            f"[red]{r.state}[/]" if r.state == "rolled_back" else r.state,
            _age(max(0.0, now - r.last_seen)),
        )
    console.print(table)
    online = sum(1 for r in records if r.online)
    console.print(f"{online} online, {len(records) - online} offline")


# -- trust ---------------------------------------------------------------------------------------


@fleet_group.command("trust")
@click.argument(
    "stores", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@_fleet_option(required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_broker_options
def trust_command(
    *, stores: tuple[Path, ...], fleet: str, as_json: bool, settings: BrokerSettings
) -> None:
    """Deliver a trust store rotation: publish STORES (signed versions, e.g. v1 v2 v3) retained
    on the fleet's trust topic. Each version must follow the one before by the rotation rule;
    devices apply those newer than theirs, keep the newest, and refuse what the rotated
    roles no longer sign."""
    from edgekit.fleet.trust import publish_trust

    envelopes = [path.read_bytes() for path in stores]
    with fleet_client(settings) as connection:
        newest = publish_trust(connection, fleet, envelopes)
    topic = Topics(fleet).trust()
    if as_json:
        click.echo(json.dumps({"topic": topic, "version": newest.version, "count": len(stores)}))
        return
    _stdout().print(
        f"published trust store versions up to {newest.version} ({len(stores)} in the chain) "
        f"on {topic} (retained)"
    )


# -- publish -------------------------------------------------------------------------------------


@fleet_group.command("publish")
@click.argument(
    "bundles", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@_fleet_option(required=True)
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1024),
    default=None,
    help="Bytes per retained chunk (default 128 KiB).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_db_option
@_broker_options
def publish_command(
    *,
    bundles: tuple[Path, ...],
    fleet: str,
    chunk_size: int | None,
    as_json: bool,
    db_path: Path | None,
    settings: BrokerSettings,
) -> None:
    """Publish BUNDLES on the broker as retained chunks (MQTT transport) and record them."""
    release = load_release(list(bundles))
    topics = Topics(fleet)
    published = []
    with (
        _store(db_path, create=True) as store,
        fleet_client(settings) as connection,
    ):
        for bundle in release.bundles:
            meta = publish_release(connection, store, topics, bundle, chunk_size=chunk_size)
            published.append(
                {
                    "path": str(bundle.path),
                    "name": bundle.name,
                    "version": bundle.version,
                    "profile": bundle.profile,
                    "sha256": bundle.sha256,
                    "size": bundle.size_bytes,
                    "chunks": meta.chunks,
                    "topic_prefix": topics.bundle_prefix(bundle.sha256),
                }
            )
    if as_json:
        click.echo(json.dumps(published, indent=2))
        return
    for entry in published:
        _stdout().print(
            f"published {entry['name']} {entry['version']} ({entry['profile']}, "
            f"{entry['size']} bytes in {entry['chunks']} chunks) under {entry['topic_prefix']}"
        )


# -- rollout -------------------------------------------------------------------------------------


class _ProgressView:
    """A live progress bar and wave table on stderr (a line per change when not a terminal)."""

    def __init__(self, *, enabled: bool) -> None:
        self.console = _stderr()
        self.enabled = enabled
        self.live_mode = enabled and self.console.is_terminal
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        )
        self._task = self._bar.add_task("rollout", total=None)
        self._live: Live | None = None
        self._last_lines: dict[int, str] = {}
        self._last_state = ""

    def __enter__(self) -> _ProgressView:
        if self.live_mode:
            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def update(self, progress: RolloutProgress) -> None:
        if not self.enabled:
            return
        self._bar.update(
            self._task,
            description=f"{progress.rollout_id} [{progress.state}]",
            total=progress.total or None,
            completed=progress.reported,
        )
        if self._live is not None:
            self._live.update(Group(self._bar, _wave_table(progress)))
            return
        for wave in progress.waves:
            line = (
                f"wave {wave.index}: {wave.state} {wave.succeeded} ok, {wave.failed} failed, "
                f"{wave.pending} pending of {wave.devices}"
            )
            if wave.state != "planned" and self._last_lines.get(wave.index) != line:
                self._last_lines[wave.index] = line
                self.console.print(f"{progress.rollout_id} {line}")
        if progress.state != self._last_state:
            self._last_state = progress.state
            self.console.print(f"{progress.rollout_id} {progress.state}")


def _wave_table(progress: RolloutProgress) -> Table:
    table = Table(title=f"rollout {progress.rollout_id} ({progress.fleet}): {progress.state}")
    for column in ("wave", "share", "devices", "ok", "failed", "pending", "state", "gates"):
        table.add_column(column, no_wrap=column != "gates")
    styles = {"passed": "green", "failed": "red", "active": "yellow"}
    for wave in progress.waves:
        style = styles.get(wave.state, "")
        table.add_row(
            str(wave.index),
            f"{wave.fraction:.0%}",
            str(wave.devices),
            str(wave.succeeded),
            str(wave.failed),
            str(wave.pending),
            f"[{style}]{wave.state}[/]" if style else wave.state,
            wave.detail,
        )
    return table


def _exit_code(result: RolloutResult) -> int:
    if result.state == "completed":
        return EXIT_COMPLETED
    if result.revert_incomplete:
        return EXIT_REVERT_INCOMPLETE
    if result.state == "aborted":
        return EXIT_ABORTED
    return EXIT_HALTED


def _drive(
    controller: RolloutController,
    rollout_id: str,
    *,
    as_json: bool,
    request: str | None = None,
) -> None:
    """Run the controller with a live view, print the outcome, exit with its code."""
    store = controller.store
    if request is not None:
        store.request(rollout_id, request)  # type: ignore[arg-type]
    view = _ProgressView(enabled=not as_json or _stderr().is_terminal)
    controller.on_progress = view.update
    # What each wave waits for and until when, and why it passed or halted.
    controller.on_message = lambda line: click.echo(f"{rollout_id} {line}", err=True)
    try:
        with view:
            result = controller.run(rollout_id)
    except KeyboardInterrupt:
        _stderr().print(
            f"interrupted: rollout {rollout_id} is recorded; continue it with "
            f"`edgekit fleet rollout resume {rollout_id}`"
        )
        raise SystemExit(EXIT_INTERRUPTED) from None
    _report(result.progress, as_json=as_json)
    code = _exit_code(result)
    if code:
        raise SystemExit(code)


def _report(progress: RolloutProgress, *, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(progress.to_json(), indent=2, sort_keys=True))
        return
    console = _stdout()
    console.print(_wave_table(progress))
    console.print(f"rollout {progress.rollout_id}: {progress.summary}", markup=False)
    if progress.reason:
        console.print(f"  {progress.reason}")


def _connect_controller(
    *,
    fleet: str,
    store: RolloutStore,
    settings: BrokerSettings,
    signers: Sequence[Signer],
) -> tuple[MqttClient, RolloutController]:
    connection = fleet_client(settings).connect()
    return connection, RolloutController(
        connection=connection, store=store, fleet=fleet, signers=signers
    )


def _resume(
    rollout_id: str,
    *,
    db_path: Path | None,
    key_name: str | None,
    as_json: bool,
    settings: BrokerSettings,
    request: str | None = None,
) -> None:
    with _store(db_path) as store:
        record = store.rollout(rollout_id)
        if record.terminal:
            _report(progress_of(store, rollout_id), as_json=as_json)
            code = _exit_code(RolloutResult(progress_of(store, rollout_id)))
            if code:
                raise SystemExit(code)
            return
        signers = _signers(key_name)
        connection, controller = _connect_controller(
            fleet=record.fleet,
            store=store,
            settings=settings,
            signers=signers,
        )
        try:
            _drive(controller, rollout_id, as_json=as_json, request=request)
        finally:
            connection.stop()


@fleet_group.command("rollout")
@click.argument("release", nargs=-1, required=True)
@_fleet_option(required=False)
@_selector_options
@click.option("--strategy", type=click.Choice(STRATEGIES), default="canary", show_default=True)
@click.option(
    "--canary",
    default="5%",
    show_default=True,
    help="First wave's share (canary and exponential): a percentage (5%) or a fraction (0.05); "
    "a bare 5 is refused (did you mean 5%?), not read as a number of devices.",
)
@click.option(
    "--waves",
    "waves_text",
    default="10%,50%,100%",
    show_default=True,
    help="Cumulative shares for --strategy waves.",
)
@click.option(
    "--growth",
    type=click.FloatRange(min=1.01),
    default=2.0,
    show_default=True,
    help="Factor between waves for --strategy exponential.",
)
@click.option(
    "--max-failure",
    default="2%",
    show_default=True,
    help="Halt when more than this share of a wave fails.",
)
@click.option(
    "--max-latency-regression",
    default=None,
    help="Halt when updated devices' p95 latency is this much above the old version's.",
)
@click.option(
    "--max-drift",
    type=click.FloatRange(min=0),
    default=None,
    help="Halt when the updated devices' median drift (PSI) exceeds this.",
)
@click.option(
    "--soak",
    default="10m",
    show_default=True,
    help="How long a wave runs after its last device reported before the next.",
)
@click.option(
    "--report-timeout",
    default="15m",
    show_default=True,
    help="Halt when a wave's devices have not all reported in this time.",
)
@click.option(
    "--revert-on-halt/--no-revert",
    default=True,
    show_default=True,
    help="Revert updated devices to their previous bundle when a gate fails (refused when "
    "the previous bundle's security epoch is below the release's: devices would refuse it).",
)
@click.option(
    "--include-offline",
    is_flag=True,
    help="Also target devices that are offline now (they must report in time).",
)
@click.option(
    "--bundle-url",
    "bundle_urls",
    multiple=True,
    metavar="TEMPLATE",
    help="Also offer the bundle over HTTPS, e.g. https://cdn.example/{filename} "
    "(fields: sha256, name, version, profile, filename).",
)
@click.option(
    "--mqtt/--no-mqtt",
    "publish_mqtt",
    default=True,
    show_default=True,
    help="Publish the bundles on the broker as retained chunks.",
)
@click.option(
    "--truststore",
    "--trust",
    "truststore",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Verify the bundles and the directive key against the devices' trust store.",
)
@click.option("--id", "rollout_id", default=None, help="Rollout id (default: generated).")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@_key_option
@_db_option
@_broker_options
def rollout_command(
    *,
    release: tuple[str, ...],
    fleet: str | None,
    group: str | None,
    tags: tuple[str, ...],
    profiles: tuple[str, ...],
    devices: tuple[str, ...],
    strategy: str,
    canary: str,
    waves_text: str,
    growth: float,
    max_failure: str,
    max_latency_regression: str | None,
    max_drift: float | None,
    soak: str,
    report_timeout: str,
    revert_on_halt: bool,
    include_offline: bool,
    bundle_urls: tuple[str, ...],
    publish_mqtt: bool,
    truststore: Path | None,
    rollout_id: str | None,
    as_json: bool,
    key_name: str | None,
    db_path: Path | None,
    settings: BrokerSettings,
) -> None:
    """Roll RELEASE (signed bundles, one per profile) out to the selected devices in waves.

    `edgekit fleet rollout resume ID` continues a rollout whose controller stopped.
    Exit codes: 0 completed, 2 error, 3 halted, 4 aborted, 5 revert incomplete.
    """
    if release[0] == "resume":
        if len(release) != 2:
            raise click.UsageError("usage: edgekit fleet rollout resume ID")
        _resume(
            release[1],
            db_path=db_path,
            key_name=key_name,
            as_json=as_json,
            settings=settings,
        )
        return
    if fleet is None:
        raise click.UsageError("--fleet is required (or set EDGEKIT_FLEET)")
    paths = [Path(p) for p in release]
    for path in paths:
        if not path.exists():
            raise EdgekitError(f"bundle {path} not found: give the .ekb files to roll out")
        if not path.is_file():
            raise EdgekitError(f"{path} is a folder, not a bundle (.ekb) file")
    options = RolloutOptions(
        strategy=strategy,  # type: ignore[arg-type]
        canary=parse_percent(canary, what="--canary"),
        waves=tuple(parse_percent(p, what="--waves") for p in waves_text.split(",") if p.strip()),
        growth=growth,
        max_failure=_ratio(max_failure, what="--max-failure") or 0.0,
        max_latency_regression=_ratio(max_latency_regression, what="--max-latency-regression"),
        max_drift=max_drift,
        soak_s=_duration(soak, what="--soak"),
        report_timeout_s=_duration(report_timeout, what="--report-timeout"),
        revert_on_halt=revert_on_halt,
        include_offline=include_offline,
        publish_mqtt=publish_mqtt,
        bundle_urls=bundle_urls,
        selector=_selector(group, tags, profiles, devices),
    )
    # Bad strategy, shares or limits fail before anything is loaded.
    options.fractions()
    options.gates()
    trust = None
    if truststore is not None:
        from edgekit.trust import load_truststore_file

        trust = load_truststore_file(truststore)
    loaded = load_release(paths, truststore=trust)
    signers = _signers(key_name)
    if trust is not None:
        trusted = trust.policy("directives").keys
        for signer in signers:
            if signer.keyid not in trusted:
                raise EdgekitError(
                    f"key {key_name!r} ({signer.keyid[:16]}) is not in the trust store's "
                    "directives role: devices would refuse every directive; use a directives "
                    "key or update the trust store"
                )
    with _store(db_path, create=True) as store:
        connection, controller = _connect_controller(
            fleet=fleet,
            store=store,
            settings=settings,
            signers=signers,
        )
        try:
            new_id = controller.plan(loaded, options, rollout_id=rollout_id)
            waves = store.waves(new_id)
            _stderr().print(
                f"rollout {new_id}: {loaded.label} to "
                f"{sum(1 for t in store.targets(new_id) if t.outcome == 'planned')} devices of "
                f"fleet {fleet} in {len(waves)} waves"
            )
            _drive(controller, new_id, as_json=as_json)
        finally:
            connection.stop()


@fleet_group.command("resume")
@click.argument("rollout_id")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@_key_option
@_db_option
@_broker_options
def resume_command(
    *,
    rollout_id: str,
    as_json: bool,
    key_name: str | None,
    db_path: Path | None,
    settings: BrokerSettings,
) -> None:
    """Resume a paused rollout; with no controller running, drive it here."""
    from edgekit.fleet import control

    with _store(db_path) as store:
        decision = control.resume(store, rollout_id)
    if decision.action == "requested":
        _stderr().print(decision.message)
        return
    _resume(
        rollout_id,
        db_path=db_path,
        key_name=key_name,
        as_json=as_json,
        settings=settings,
        request=decision.request,
    )


@fleet_group.command("pause")
@click.argument("rollout_id")
@_db_option
def pause_command(*, rollout_id: str, db_path: Path | None) -> None:
    """Stop starting new waves (devices already sent a directive carry on)."""
    from edgekit.fleet import control

    with _store(db_path) as store:
        _stderr().print(control.pause(store, rollout_id).message)


@fleet_group.command("abort")
@click.argument("rollout_id")
@click.option("--revert", is_flag=True, help="Also revert the devices already updated.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@_key_option
@_db_option
@_broker_options
def abort_command(
    *,
    rollout_id: str,
    revert: bool,
    as_json: bool,
    key_name: str | None,
    db_path: Path | None,
    settings: BrokerSettings,
) -> None:
    """Stop a rollout for good (devices keep what they run unless --revert)."""
    from edgekit.fleet import control

    with _store(db_path) as store:
        decision = control.abort(store, rollout_id, revert=revert)
        if decision.action == "requested":
            _stderr().print(decision.message)
            return
        if decision.action == "applied":
            _report(progress_of(store, rollout_id), as_json=as_json)
            return
    _resume(
        rollout_id,
        db_path=db_path,
        key_name=key_name,
        as_json=as_json,
        settings=settings,
        request=decision.request,
    )


@fleet_group.command("rollback")
@click.option("--to", "version", required=True, help="The bundle version to go back to.")
@click.option("--name", "bundle_name", default=None, help="Bundle name, if versions are shared.")
@_fleet_option(required=True)
@_selector_options
@click.option("--report-timeout", default="15m", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@_key_option
@_db_option
@_broker_options
def rollback_command(
    *,
    version: str,
    bundle_name: str | None,
    fleet: str,
    group: str | None,
    tags: tuple[str, ...],
    profiles: tuple[str, ...],
    devices: tuple[str, ...],
    report_timeout: str,
    as_json: bool,
    key_name: str | None,
    db_path: Path | None,
    settings: BrokerSettings,
) -> None:
    """Send every selected device back to VERSION (a new, higher-sequence directive)."""
    signers = _signers(key_name)
    with _store(db_path, create=True) as store:
        connection, controller = _connect_controller(
            fleet=fleet,
            store=store,
            settings=settings,
            signers=signers,
        )
        try:
            new_id = controller.plan_rollback(
                version,
                name=bundle_name,
                selector=_selector(group, tags, profiles, devices),
                report_timeout_s=_duration(report_timeout, what="--report-timeout"),
            )
            _drive(controller, new_id, as_json=as_json)
        finally:
            connection.stop()


# -- status / history ----------------------------------------------------------------------------


@fleet_group.command("status")
@click.argument("rollout_id", required=False)
@click.option("--fleet", envvar="EDGEKIT_FLEET", default=None, help="Latest rollout of this fleet.")
@click.option("--devices", "show_devices", is_flag=True, help="Also list every target device.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_db_option
def status_command(
    *,
    rollout_id: str | None,
    fleet: str | None,
    show_devices: bool,
    as_json: bool,
    db_path: Path | None,
) -> None:
    """Show a rollout (default: the latest) from the rollout database."""
    with _store(db_path) as store:
        if rollout_id is None:
            latest = store.latest_rollout(fleet=fleet)
            if latest is None:
                raise EdgekitError(f"no rollouts recorded in {store.path}")
            rollout_id = latest.id
        progress = progress_of(store, rollout_id)
        record = store.rollout(rollout_id)
        targets = store.targets(rollout_id)
        alive = store.controller_alive(rollout_id)
    if as_json:
        document = progress.to_json()
        document["kind"] = record.kind
        document["controller_running"] = alive
        document["created_at"] = record.created_at
        document["finished_at"] = record.finished_at
        document["options"] = record.spec.get("options")
        if show_devices:
            document["devices"] = [
                {
                    "device": t.device,
                    "profile": t.profile,
                    "wave": t.wave,
                    "outcome": t.outcome,
                    "sequence": t.sequence,
                    "revert_sequence": t.revert_sequence,
                    "detail": t.detail,
                }
                for t in targets
            ]
        click.echo(json.dumps(document, indent=2, sort_keys=True))
        return
    _report(progress, as_json=False)
    console = _stdout()
    console.print(
        f"  kind {record.kind}; controller {'running' if alive else 'not running'}"
        + (
            ""
            if alive or record.terminal
            else f" (continue: edgekit fleet rollout resume {rollout_id})"
        )
    )
    if show_devices:
        table = Table("device", "profile", "wave", "outcome", "detail")
        for t in targets:
            table.add_row(t.device, t.profile, str(t.wave), t.outcome, t.detail or "")
        console.print(table)


@fleet_group.command("history")
@click.option("--fleet", envvar="EDGEKIT_FLEET", default=None, help="Only this fleet.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_db_option
def history_command(*, fleet: str | None, limit: int, as_json: bool, db_path: Path | None) -> None:
    """List recorded rollouts, newest first."""
    with _store(db_path) as store:
        rows = []
        for record in store.rollouts(fleet=fleet, limit=limit):
            progress = progress_of(store, record.id)
            label = ", ".join(
                sorted({f"{b['name']} {b['version']}" for b in record.spec.get("release", [])})
            )
            rows.append((record, progress, label))
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "rollout_id": r.id,
                        "fleet": r.fleet,
                        "kind": r.kind,
                        "state": r.state,
                        "release": label,
                        "created_at": r.created_at,
                        "finished_at": r.finished_at,
                        "reason": r.reason,
                        "counts": dict(p.counts),
                    }
                    for r, p, label in rows
                ],
                indent=2,
            )
        )
        return
    console = _stdout()
    if not rows:
        console.print("no rollouts recorded")
        return
    table = Table("rollout", "fleet", "kind", "release", "started", "state", "devices", "reason")
    for record, progress, label in rows:
        table.add_row(
            record.id,
            record.fleet,
            record.kind,
            label,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created_at)),
            record.state,
            str(progress.total),
            record.reason or "",
        )
    console.print(table)


# -- provision ---------------------------------------------------------------------------------


_LAYOUT = InstallLayout()  # the device layout's defaults, from the provisioning library


@fleet_group.command("provision")
@click.argument("device_id")
@_fleet_option(required=True)
@click.option("--profile", required=True, help="The device's profile (e.g. raspberrypi).")
@click.option(
    "--broker",
    "broker_url",
    required=True,
    help="URL the device connects to: the device listener, mqtts://HOST:PORT.",
)
@click.option(
    "--broker-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    help="CA (PEM) that signed the broker's certificate [default: the device's system CAs].",
)
@click.option(
    "--truststore",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The signed trust store the device starts with.",
)
@click.option(
    "--devices",
    "devices_csv",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="broker-config's devices CSV: the device is added (created when missing).",
)
@click.option(
    "--broker-config",
    "broker_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="broker-config's output folder: the password goes into its credentials.csv.",
)
@click.option(
    "--factory-bundle",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A bundle the device runs before its first rollout (verified here).",
)
@click.option(
    "--client-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Issue a client certificate for the device with this CA (the broker's --tls-ca).",
)
@click.option(
    "--client-ca-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The --client-ca's private key (PEM, unencrypted).",
)
@click.option("--group", default="", help="The device's group.")
@click.option("--tag", "tags", multiple=True, metavar="K=V", help="A device tag (repeatable).")
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="An agent.toml setting, e.g. update.probation_s=120 (repeatable).",
)
@click.option(
    "--config-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=_LAYOUT.config_dir,
    show_default=True,
    help="Where install.sh puts the config on the device (the kit's folder: runs in place).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=_LAYOUT.data_dir,
    show_default=True,
    help="The agent's data directory on the device.",
)
@click.option(
    "--venv",
    type=click.Path(file_okay=False, path_type=Path),
    default=_LAYOUT.venv,
    show_default=True,
    help="The venv install.sh makes on the device.",
)
@click.option("--service-user", default=_LAYOUT.service_user, show_default=True)
@click.option(
    "--pip-spec",
    default=AGENT_EXTRA,
    show_default=True,
    help="What install.sh installs (its --wheel/--find-links override it on the device).",
)
@click.option("--rotate", is_flag=True, help="Replace the device's existing credentials.")
@click.option(
    "--insecure-plaintext", is_flag=True, help="Allow an mqtt:// broker (test brokers only)."
)
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The kit's folder (new or empty).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def provision_command(
    *,
    device_id: str,
    fleet: str,
    profile: str,
    broker_url: str,
    broker_ca: Path | None,
    truststore: Path,
    devices_csv: Path,
    broker_dir: Path,
    factory_bundle: Path | None,
    client_ca: Path | None,
    client_ca_key: Path | None,
    group: str,
    tags: Sequence[str],
    settings: Sequence[str],
    config_dir: Path,
    data_dir: Path,
    venv: Path,
    service_user: str,
    pip_spec: str,
    rotate: bool,
    insecure_plaintext: bool,
    output: Path,
    as_json: bool,
) -> None:
    """Write a device kit (agent.toml, trust store, broker CA, credentials, systemd unit,
    install.sh) and register the device in broker-config's inputs."""
    from edgekit.fleet import provision

    if (client_ca is None) != (client_ca_key is None):
        raise provision.ProvisionError("--client-ca and --client-ca-key go together")
    request = provision.ProvisionRequest(
        device_id=device_id,
        fleet=fleet,
        profile=profile,
        broker_url=broker_url,
        truststore=truststore,
        devices_csv=devices_csv,
        broker_dir=broker_dir,
        broker_ca=broker_ca,
        client_ca=provision.ClientCa(client_ca, client_ca_key)
        if client_ca is not None and client_ca_key is not None
        else None,
        factory_bundle=factory_bundle,
        group=group,
        tags=dict(parse_tag(tag) for tag in tags),
        settings=dict(provision.parse_setting(setting) for setting in settings),
        layout=provision.InstallLayout(
            config_dir=config_dir.absolute(),
            data_dir=data_dir.absolute(),
            venv=venv.absolute(),
            service_user=service_user,
        ),
        pip_spec=pip_spec,
        rotate=rotate,
        insecure_plaintext=insecure_plaintext,
    )
    kit = provision.provision_device(request, output)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "device": kit.device_id,
                    "kit": str(kit.directory),
                    "files": list(kit.files),
                    "rotated": kit.rotated,
                    "devices_csv": str(kit.devices_csv),
                    "credentials": str(kit.credentials),
                },
                sort_keys=True,
            )
        )
        return
    click.echo(
        f"wrote the kit of {kit.device_id} in {kit.directory} ({', '.join(kit.files)}); "
        f"{'new credentials replace the old ones' if kit.rotated else 'registered'} in "
        f"{kit.devices_csv} and {kit.credentials}"
    )
    click.echo(
        f"next: run `edgekit fleet broker-config --devices {kit.devices_csv} -o {broker_dir} "
        "...` again (same options) and reload Mosquitto (SIGHUP re-reads passwords and acl), "
        "then copy the kit to the device and run `sudo ./install.sh` there; the kit holds the "
        "device's password: keep it private"
    )


# -- tools in their own module (simulate, broker-config) ----------------------------------------


def _attach_tools() -> None:
    from edgekit.cli.fleet_tools import broker_config_command, simulate_command

    fleet_group.add_command(simulate_command, "simulate")
    fleet_group.add_command(broker_config_command, "broker-config")


_attach_tools()
