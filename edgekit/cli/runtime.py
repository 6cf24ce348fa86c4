"""`edgekit verify-runtime`: does a bundle or model run on every runtime version its profile
declares? A thin click layer over `edgekit.verify_runtime`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgekit.cli._group import Command
from edgekit.cli._options import json_option, profile_option
from edgekit.cli._output import stdout_console
from edgekit.profiles import Profile, load_profile
from edgekit.verify_runtime import EmulationMode, ProgressCallback, VerifyReport, Which
from edgekit.verify_runtime import verify_runtime as check_runtimes

__all__ = [
    "print_verify_report",
    "run_with_progress",
    "verify_runtime_command",
]


@contextmanager
def _progress(console: Console) -> Iterator[ProgressCallback]:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    with progress:
        task = progress.add_task("checking runtimes", total=None)

        def update(description: str) -> None:
            progress.update(task, description=escape(description))

        yield update


def run_with_progress(
    source: Path,
    profile: Profile,
    *,
    cache_dir: Path | None,
    which: Which = "all",
    trust: Path | None = None,
    emulation: EmulationMode | None = None,
    cpus: tuple[str, ...] = (),
) -> VerifyReport:
    """`verify_runtime` with a rich spinner on stderr (venv creation, installs, probes)."""
    with _progress(Console(stderr=True)) as update:
        return check_runtimes(
            source,
            profile,
            cache_dir=cache_dir,
            which=which,
            trust=trust,
            emulation=emulation,
            cpus=cpus or None,
            progress=update,
        )


def _yes_no(value: bool | None, *, none: str = "-") -> str:
    if value is None:
        return none
    return "[green]yes[/]" if value else "[red]no[/]"


def print_verify_report(report: VerifyReport, console: Console) -> None:
    """The human summary: one row per runtime version, then where samples came from and why
    anything failed."""
    table = Table(title=f"{report.model} on the runtimes of profile {report.profile}")
    columns = ("runtime", "end", "arch", "cpu", "installed", "loads", "within tolerance")
    for column in (*columns, "p50 ms", "result"):
        table.add_column(column, no_wrap=column != "result")
    for check in report.checks:
        status = {"pass": "[bold green]pass[/]", "fail": "[bold red]FAIL[/]"}.get(
            check.status, "[yellow]not installed[/]"
        )
        within = _yes_no(check.within_tolerance, none="n/a" if check.loads else "-")
        latency = "-"
        if check.latency_p50_ms is not None:
            latency = f"{check.latency_p50_ms:.3f}" + (" (emulated)" if check.emulated else "")
        table.add_row(
            f"{check.package} {check.version}",
            check.end,
            check.arch,
            (check.cpu or "host") + (" (qemu)" if check.emulated else ""),
            _yes_no(check.installed) + (" (cached)" if check.cached else ""),
            _yes_no(check.loads),
            within,
            latency,
            status,
        )
    console.print(table)
    if report.emulated_cpus:
        console.print(
            f"{report.arch} rows ran under QEMU user-mode emulation on this host: outputs come "
            "from the device's runtime builds and kernels; emulated latency is the emulator's, "
            "not the device's",
            soft_wrap=True,
            highlight=False,
        )
    for check in report.checks:
        if check.status != "pass":
            console.print(f"  {escape(check.runtime)}: {escape(check.reason)}", soft_wrap=True)
        for note in check.notes:
            console.print(f"  {escape(check.runtime)}: note: {escape(note)}", soft_wrap=True)
    console.print(f"golden samples: {escape(report.golden)}", soft_wrap=True, highlight=False)
    console.print(f"signature: {escape(report.signature)}", soft_wrap=True, highlight=False)
    for note in report.notes:
        console.print(f"note: {escape(note)}", soft_wrap=True, highlight=False)
    if report.static_blockers:
        console.print(
            "[red]operator versions the oldest runtime lacks:[/] "
            + escape(", ".join(report.static_blockers)),
            soft_wrap=True,
        )
    verdict = "[bold green]passed[/]" if report.passed else "[bold red]failed[/]"
    console.print(f"verify-runtime {verdict}", highlight=False)


@click.command(
    "verify-runtime",
    cls=Command,
    short_help="Check that SOURCE loads and matches in the profile's oldest and newest runtimes.",
)
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@profile_option
@click.option(
    "--runtime",
    "which",
    type=click.Choice(["oldest", "newest", "all"]),
    default="all",
    show_default=True,
    help="Which end of the profile's runtime range to check.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where runtime venvs are cached (default: $EDGEKIT_RUNTIME_CACHE, else "
    "$EDGEKIT_HOME/runtimes when EDGEKIT_HOME is set, else ~/.cache/edgekit/runtimes).",
)
@click.option(
    "--trust",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Trust store to check a bundle's signatures with (without it: not checked).",
)
@click.option(
    "--emulation",
    type=click.Choice(["auto", "require", "off"]),
    default=None,
    help="For a profile whose arch is not this host's: run the runtimes' builds for the "
    "device's arch under QEMU, once per CPU the profile names (auto, the default: when "
    "qemu-user-static is installed; require: fail otherwise; off: this host's builds). "
    "Default: $EDGEKIT_EMULATION, else auto.",
)
@click.option(
    "--cpu",
    "cpus",
    multiple=True,
    help="Emulate only this CPU of the profile's `cpu:` list (repeatable).",
)
@json_option
def verify_runtime_command(
    source: Path,
    profile_name: str,
    which: Which,
    cache_dir: Path | None,
    trust: Path | None,
    emulation: EmulationMode | None,
    cpus: tuple[str, ...],
    as_json: bool,
) -> None:
    """Load SOURCE (a .ekb bundle, a model, or a converter output folder) in the oldest and
    newest runtime versions the profile declares, each in its own cached venv, and replay the
    golden samples there; for a device of another arch (a Raspberry Pi), the device's builds
    under QEMU, one row per runtime version and CPU. Exit code 2 when any installed runtime
    refuses the model or misses the tolerance; a runtime that cannot be installed here is
    reported, not failed."""
    profile = load_profile(profile_name)
    report = run_with_progress(
        source,
        profile,
        cache_dir=cache_dir,
        which=which,
        trust=trust,
        emulation=emulation,
        cpus=cpus,
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_verify_report(report, stdout_console())
    report.raise_for_failures()
