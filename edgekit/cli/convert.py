"""`edgekit convert`: a trained model to the fastest artifact that meets a device profile,
optionally checked in the profile's runtimes, measured on a device and signed into a bundle.
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from edgekit.cli._group import Command
from edgekit.cli._options import (
    PASSPHRASE_HELP,
    BrokerOptions,
    json_option,
    lazy_broker_options,
    load_signers,
    profile_option,
)
from edgekit.errors import EdgekitError
from edgekit.profiles import OutputKind, load_profile

if TYPE_CHECKING:
    from edgekit.verify_runtime import VerifyReport

__all__ = ["convert", "print_report"]

# Scripts and CI logs get a wide table instead of rich's 80-column default.
stdout = Console(width=None if sys.stdout.isatty() else 160)
stderr = Console(stderr=True)


@click.command("convert", cls=Command)
@click.argument("model", type=click.Path(path_type=Path))
@profile_option
@click.option(
    "-o",
    "--output",
    "output_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder for model.onnx or model.tflite, report.json, golden.npz, reference_stats.json.",
)
@click.option(
    "--calibration",
    type=click.Path(path_type=Path),
    help=".npz, folder of .npy, or folder of images used to calibrate int8.",
)
@click.option(
    "--validation",
    type=click.Path(path_type=Path),
    help="Same formats; inputs on which candidates are compared with the original.",
)
@click.option(
    "--threads",
    type=int,
    help="Threads for benchmarks (default: the profile's, capped at this host's cores).",
)
@click.option(
    "--keep-candidates", is_flag=True, help="Also keep every candidate model in OUTPUT/candidates/."
)
@click.option(
    "--sign",
    "sign_keys",
    multiple=True,
    metavar="KEY",
    help="Build OUTPUT/<name>-<version>-<profile>.ekb signed with this keyring key "
    f"(repeat for several signers). {PASSPHRASE_HELP}",
)
@click.option("--name", "bundle_name", help="Bundle name (default: the model file's stem).")
@click.option(
    "--version",
    "bundle_version",
    default="0.1.0",
    show_default=True,
    help="Bundle semantic version.",
)
@click.option(
    "--security-epoch",
    type=int,
    default=0,
    show_default=True,
    help="Bundle security epoch (devices refuse bundles below their floor).",
)
@click.option(
    "--verify-runtime",
    "verify_runtimes",
    is_flag=True,
    help="Then load the artifact in the profile's oldest and newest runtime versions (venvs "
    "cached in $EDGEKIT_RUNTIME_CACHE, else $EDGEKIT_HOME/runtimes when EDGEKIT_HOME is set, "
    "else ~/.cache/edgekit/runtimes) and replay golden.npz; refuse to sign if one fails.",
)
@click.option(
    "--output-kind",
    "output_kinds",
    multiple=True,
    metavar="NAME=KIND",
    help="How to judge output NAME: classifier (top-1 + cosine), map (pooled cosine + mask "
    "IoU), regression or state (repeatable; default: the profile's accuracy.output_kinds, "
    "else a guess the report names).",
)
@click.option(
    "--measurements",
    "measurements_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Choose by the device's numbers: the JSON `edgekit-agent bench` wrote on the device "
    "(candidates matched by sha256; convert with --keep-candidates, bench them there).",
)
@click.option(
    "--bench-device",
    metavar="DEVICE_ID",
    help="Choose by numbers measured now on this device: the candidates travel to it as a "
    "signed bench request over MQTT (needs --fleet, --key; the device's agent.toml must set "
    "[bench] enabled = true).",
)
@click.option("--fleet", envvar="EDGEKIT_FLEET", help="Fleet id [env EDGEKIT_FLEET].")
@lazy_broker_options
@click.option(
    "--key",
    "bench_key",
    envvar="EDGEKIT_DIRECTIVE_KEY",
    help="Keyring key (directives role) that signs the bench request [env "
    f"EDGEKIT_DIRECTIVE_KEY]. {PASSPHRASE_HELP}",
)
@click.option(
    "--bench-timeout",
    type=click.FloatRange(10, 24 * 3600),
    default=900.0,
    show_default=True,
    help="Seconds to wait for the device's measurements.",
)
@json_option(help="Print the report as JSON.")
def convert(
    model: Path,
    profile_name: str,
    output_dir: Path,
    calibration: Path | None,
    validation: Path | None,
    threads: int | None,
    keep_candidates: bool,
    sign_keys: tuple[str, ...],
    bundle_name: str | None,
    bundle_version: str,
    security_epoch: int,
    verify_runtimes: bool,
    output_kinds: tuple[str, ...],
    measurements_path: Path | None,
    bench_device: str | None,
    fleet: str | None,
    broker: BrokerOptions,
    bench_key: str | None,
    bench_timeout: float,
    as_json: bool,
) -> None:
    """Convert MODEL into the fastest artifact that meets the profile's tolerance.

    MODEL is an ONNX file, a Keras `.keras` file, a TensorFlow SavedModel folder or a PyTorch
    `.pt2` file (torch.export.save); the profile decides the output (`model.onnx` or
    `model.tflite`).
    """
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

    from edgekit.converters import convert as run_convert

    profile = load_profile(profile_name)
    kinds = _parse_output_kinds(output_kinds)
    if bench_device is not None and measurements_path is not None:
        raise click.UsageError("give --bench-device or --measurements, not both")
    if bench_device is not None and (not fleet or not bench_key):
        raise click.UsageError(
            "--bench-device needs --fleet (EDGEKIT_FLEET) and --key (EDGEKIT_DIRECTIVE_KEY): "
            "the fleet the device is in and the key that signs the bench request"
        )
    signers = load_signers(sign_keys)  # before the work: a wrong passphrase fails fast
    bench_signers = load_signers((bench_key,)) if bench_device and bench_key else []
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    )
    device_check = None
    verified: list[VerifyReport] = []
    if verify_runtimes:
        # Each candidate in ranking order is loaded in the profile's oldest and newest runtimes
        # before it can win: a bundle the device's runtimes cannot load is never signed.
        from edgekit.verify_runtime import RuntimeInstallError
        from edgekit.verify_runtime import verify_runtime as check_runtimes

        def on_device_step(message: str) -> None:
            # Shown in convert's own progress line: a second rich Live would garble it.
            for task_id in progress.task_ids:
                progress.update(task_id, description=f"device check: {message[:80]}")

        def device_check(candidate: Path, _golden: Path) -> str | None:
            report = check_runtimes(candidate, profile, cache_dir=None, progress=on_device_step)
            if not any(check.installed for check in report.checks):
                # The environment, not the candidate: no other candidate would do better.
                errors = "; ".join(
                    f"{check.runtime}: {check.install_error}" for check in report.checks
                )
                raise RuntimeInstallError(
                    f"--verify-runtime cannot check anything: no runtime version of profile "
                    f"{profile.name} could be installed here ({errors}); fix pip's package "
                    "index (PIP_INDEX_URL) or convert without --verify-runtime"
                )
            verified.append(report)
            if report.passed:
                return None
            return "; ".join(report.problems())

    with progress:
        task = progress.add_task("converting", total=None)

        def on_step(description: str, done: int, total: int) -> None:
            progress.update(task, description=description, completed=done, total=total)

        device_bench = None
        if bench_device is not None:
            from edgekit.fleet.bench import bench_on_device

            settings = broker.settings()

            def device_bench(files: Any) -> Any:
                def say(message: str) -> None:
                    progress.update(task, description=f"bench on {bench_device}: {message}")
                    if not stderr.is_terminal:
                        click.echo(f"bench on {bench_device}: {message}", err=True)

                return bench_on_device(
                    files,
                    device=str(bench_device),
                    fleet=str(fleet),
                    settings=settings,
                    signers=bench_signers,
                    timeout_s=bench_timeout,
                    progress=say,
                )

        try:
            result = run_convert(
                model,
                profile=profile,
                output_dir=output_dir,
                calibration=calibration,
                validation=validation,
                threads=threads,
                progress=on_step,
                keep_candidates=keep_candidates,
                device_check=device_check,
                output_kinds=kinds,
                measurements=measurements_path,
                device_bench=device_bench,
            )
        except EdgekitError as error:
            if verified and signers:
                raise type(error)(f"no bundle signed: {error}") from error
            raise
    runtime_report = verified[-1] if verified else None
    if runtime_report is not None:
        from edgekit.cli.runtime import print_verify_report

        for check in runtime_report.not_installed:
            click.echo(f"warning: not verified on {check.runtime}: {check.install_error}", err=True)
    if runtime_report is not None:
        # Into report.json before signing: the bundle carries what was verified where.
        _record_verify_runtime(output_dir / "report.json", runtime_report)
    bundle_path = None
    if signers:
        from edgekit.bundle import sign_and_build_bundle

        bundle_path = sign_and_build_bundle(
            output_dir,
            name=bundle_name or model.stem,
            version=bundle_version,
            security_epoch=security_epoch,
            profile=profile.name,
            out_dir=output_dir,
            signers=signers,
        )
    if as_json:
        report = dict(result.report)
        if bundle_path is not None:
            report["bundle"] = str(bundle_path)
        if runtime_report is not None:
            report["verify_runtime"] = runtime_report.to_dict()
        click.echo(json.dumps(report, indent=2))
        return
    print_report(result.report, output_dir)
    if runtime_report is not None:
        print_verify_report(runtime_report, stdout)  # the chosen artifact's, which passed
    if bundle_path is not None:
        stdout.print(f"signed bundle: {bundle_path}", soft_wrap=True)


def _parse_output_kinds(given: tuple[str, ...]) -> dict[str, OutputKind]:
    kinds: dict[str, OutputKind] = {}
    allowed = typing.get_args(OutputKind)
    for item in given:
        name, sep, kind = item.partition("=")
        if not sep or not name or kind not in allowed:
            raise click.BadParameter(
                f"{item!r}: expected NAME=KIND with KIND one of {', '.join(allowed)}",
                param_hint="--output-kind",
            )
        kinds[name] = typing.cast(OutputKind, kind)
    return kinds


def _record_verify_runtime(path: Path, runtime_report: VerifyReport) -> None:
    """Add the device check's summary to the converter's report.json (atomically)."""
    from edgekit.files import write_atomic

    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        document["verify_runtime"] = runtime_report.to_dict()
        write_atomic(path, (json.dumps(document, indent=2) + "\n").encode("utf-8"))
    except (OSError, ValueError) as e:
        raise EdgekitError(f"cannot add the runtime check to {path}: {e}") from e


def _fmt_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value = value / 1024  # type: ignore[assignment]
    return str(value)  # pragma: no cover


def _fmt_ratio(row: dict[str, Any], chosen: str) -> str:
    if row["name"] == chosen:
        return "chosen"
    if row.get("equal_latency_to"):
        return f"= {row['equal_latency_to']}"
    comparison = row.get("comparison") or {}
    if comparison.get("against") != chosen or comparison.get("ratio") is None:
        return "-"
    low, high = comparison.get("low"), comparison.get("high")
    interval = f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""
    return f"{comparison['ratio']:.2f}x{interval}"


def print_report(report: dict[str, Any], output_dir: Path) -> None:
    """The human summary of a conversion report: one row per candidate, then the reasons."""
    table = Table(title=f"{Path(report['source']['path']).name} for {report['profile']}")
    for column in (
        "candidate",
        "p50 ms",
        "vs chosen (95% CI)",
        "size",
        "zstd",
        "peak mem",
        "cosine (low)",
        "top-1",
        "verdict",
    ):
        table.add_column(column, no_wrap=True)
    rows = [report["original"], *report["candidates"]]
    for row in rows:
        latency = row["latency_ms"] or {}
        outputs = (row["accuracy"] or {}).get("outputs", {})
        cosines = [metrics["cosine"] for metrics in outputs.values()]
        lows = [
            metrics.get("cosine_lower_bound", metrics["cosine"]) for metrics in outputs.values()
        ]
        top1 = [m for m in outputs.values() if m["top1_agreement"] is not None]
        verdict = row["verdict"] if row["status"] == "ok" else "failed"
        style = {"chosen": "bold green", "reference": "dim", "failed": "red"}.get(verdict, "")
        table.add_row(
            row["name"],
            f"{latency['p50']:.3f}" if latency else "-",
            _fmt_ratio(row, report["chosen"]),
            _fmt_bytes(row["size_bytes"]),
            _fmt_bytes(row["compressed_size_bytes"]),
            _fmt_bytes(row["peak_memory_bytes"]),
            f"{min(cosines):.4f} ({min(lows):.4f})" if cosines else "-",
            ", ".join(f"{m['top1_agree']}/{m['rows']}" for m in top1) if top1 else "-",
            f"[{style}]{verdict}[/]" if style else verdict,
        )
    stdout.print(table)
    for row in report["candidates"]:
        stdout.print(f"  {row['name']}: {row['reason']}", highlight=False, soft_wrap=True)
        if row["float_nodes"]:
            stdout.print(f"    kept in float: {', '.join(row['float_nodes'])}", soft_wrap=True)
    decision = report.get("decision") or {}
    source = decision.get("latency_source", "host")
    if source != "host":
        stdout.print(f"latency measured on {source}", highlight=False, soft_wrap=True)
    elif str(decision.get("target_latency", "")).startswith("unmeasured"):
        stdout.print(
            f"[yellow]latency on the target ({decision.get('target_arch')}) is unmeasured:[/] "
            f"the ranking used {decision.get('host_arch')} host CPU time as a proxy; measure "
            "on the device with `edgekit-agent bench` and convert with --measurements",
            highlight=False,
            soft_wrap=True,
        )
    for note in report["data"].get("notes", []):
        stdout.print(f"data: {note}", highlight=False, soft_wrap=True)
    for warning in report.get("warnings", []):
        stdout.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if report["data"]["accuracy"] == "unvalidated":
        stdout.print(
            "[bold red]accuracy unvalidated:[/] no --validation/--calibration data was given; "
            "candidates were compared on synthetic inputs only"
        )
    summary = report.get("summary") or {}
    artifact = report["artifact"]
    line = f"chosen [bold]{report['chosen']}[/] -> {output_dir / artifact['path']}"
    latency_vs_fp32 = summary.get("latency_vs_fp32")
    if latency_vs_fp32:
        if latency_vs_fp32.get("equal"):
            speed = "fp32 speed by construction"
        else:
            speed = f"{latency_vs_fp32['ratio']:.2f}x fp32 latency"
            if latency_vs_fp32.get("low") and latency_vs_fp32.get("high"):
                speed += f" [{latency_vs_fp32['low']:.2f}, {latency_vs_fp32['high']:.2f}]"
        line += f" ({speed}, {summary['size_ratio_vs_fp32']:.2f}x fp32 size)"
    stdout.print(line, soft_wrap=True)
    ops = artifact.get("op_versions")
    if isinstance(ops, dict):
        where = (
            f"op versions checked against {ops.get('oldest_runtime')}"
            if ops.get("checked")
            else "op versions not checked"
        )
    else:
        where = (
            f"IR {artifact.get('ir_version')} opset {artifact.get('opset')} "
            f"(loads on {artifact.get('runtime')})"
        )
    stdout.print(f"{where}; report: {output_dir / 'report.json'}", soft_wrap=True)
