"""Benchmark: the fleet controller's rollout wall time to N simulated devices.

For each N (default 100, 500, 1000), on one Mosquitto this script starts (or the one
`benchmarks/fleet.py` passes in): N simulated devices (`edgekit.fleet.simulate`: real MQTT
clients, real directive and bundle verification, the bundle fetched over MQTT chunks) start
on v1; the controller rolls out a signed v2 bundle of `--bundle-bytes` (default 1 MiB) with
`--strategy` (default `all`, soak 0, so the time is the machinery's, not a chosen soak).

Per row: `wall_s` from `RolloutController.plan` to `completed` (registry read, bundle publish,
N directives signed, recorded and published retained, every device fetching 1 MB, verifying,
committing and reporting), and its parts: `plan_s`, `publish_s` (bundle chunks), `sign_s`
(directives signed and committed to SQLite), `first_report_s` and `last_report_s` after the
directives went out; `devices_per_s = N / wall_s`; `bytes_moved = N * bundle size`. The
simulator and the controller share this process (and the machine's cores) with Mosquitto.

Writes JSON to stdout and to `--out` when given. `rows(...)` is what `benchmarks/fleet.py`
calls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekit.bundle import build_bundle, collect_bundle_inputs
from edgekit.fleet.registry import fleet_client
from edgekit.fleet.rollout import RolloutController, RolloutOptions, load_release
from edgekit.fleet.simulate import SimulatedFleet
from edgekit.fleet.store import RolloutStore
from edgekit.messages import BundleId
from edgekit.mosquitto import MosquittoBroker
from edgekit.mqtt import BrokerSettings
from edgekit.trust import Signer, TrustStore, create_truststore

CREATED = datetime(2025, 6, 1, tzinfo=timezone.utc)


def _bundle(folder: Path, signer: Signer, *, version: str, model_bytes: int) -> Path:
    source = folder / f"src-{version}"
    source.mkdir(parents=True, exist_ok=True)
    (source / "model.onnx").write_bytes(os.urandom(model_bytes))
    (source / "golden.npz").write_bytes(b"golden" * 64)
    (source / "reference_stats.json").write_text('{"inputs": {}}')
    (source / "report.json").write_text('{"profile": "x86-64"}')
    return build_bundle(
        collect_bundle_inputs(source),
        out_path=folder / f"bench-{version}-x86-64.ekb",
        name="bench",
        version=version,
        security_epoch=0,
        profile="x86-64",
        signers=[signer],
        created=CREATED,
    )


class _Timeline:
    """Records when the first and last device reported, from the controller's progress."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.first_report: float | None = None
        self.last_report: float | None = None

    def __call__(self, progress: Any) -> None:
        reported = progress.reported
        now = time.perf_counter()
        if reported and self.first_report is None:
            self.first_report = now
        if reported >= self.total and self.last_report is None:
            self.last_report = now


def _one(
    broker: MosquittoBroker,
    work: Path,
    *,
    count: int,
    bundle: Path,
    truststore: TrustStore,
    directives: Signer,
    strategy: str,
) -> dict[str, Any]:
    fleet = f"bench-{count}-{strategy}"
    initial = BundleId("bench", "1.0.0", "0" * 64)
    release = load_release([bundle])
    with (
        SimulatedFleet(
            broker.url,
            fleet,
            count,
            trust_store=truststore,
            initial_bundle=initial,
            telemetry_interval_s=10.0,
            fetch_timeout_s=1800,
        ),
        RolloutStore(work / f"{fleet}.db") as store,
        fleet_client(BrokerSettings(broker.url)) as connection,
    ):
        timeline = _Timeline(count)
        controller = RolloutController(
            connection=connection,
            store=store,
            fleet=fleet,
            signers=[directives],
            poll_s=0.1,
            on_progress=timeline,
        )
        options = RolloutOptions(
            strategy=strategy,  # type: ignore[arg-type]
            canary=0.05,
            max_failure=0.0,
            soak_s=0.0,
            report_timeout_s=1800,
            revert_on_halt=False,
        )
        start = time.perf_counter()
        rollout_id = controller.plan(release, options)
        planned = time.perf_counter()
        # Publish and sign explicitly first, to time them apart from the devices' work.
        record = store.rollout(rollout_id)
        controller._publish_bundles(record, options)
        published = time.perf_counter()
        directives_out = None
        if strategy == "all":
            controller._start_wave(record, options, 0)
            directives_out = time.perf_counter()
        result = controller.run(rollout_id)
        end = time.perf_counter()
    sent_at = directives_out or published
    return {
        "devices": count,
        "strategy": strategy,
        "state": result.state,
        "bundle_bytes": bundle.stat().st_size,
        "bytes_moved": count * bundle.stat().st_size,
        "wall_s": round(end - start, 3),
        "plan_s": round(planned - start, 3),
        "publish_s": round(published - planned, 3),
        "sign_s": None if directives_out is None else round(directives_out - published, 3),
        "first_report_s": None
        if timeline.first_report is None
        else round(timeline.first_report - sent_at, 3),
        "last_report_s": None
        if timeline.last_report is None
        else round(timeline.last_report - sent_at, 3),
        "devices_per_s": round(count / (end - start), 2),
        "counts": dict(result.progress.counts),
    }


def rows(
    *,
    broker: MosquittoBroker,
    workdir: Path,
    devices: list[int],
    bundle_bytes: int = 1 << 20,
    strategies: tuple[str, ...] = ("all",),
) -> list[dict[str, Any]]:
    """One row per (device count, strategy) on `broker`."""
    root, bundles_key, directives = Signer.generate(), Signer.generate(), Signer.generate()
    truststore = create_truststore(
        root_keys=[root.public_key],
        bundles_keys=[bundles_key.public_key],
        directives_keys=[directives.public_key],
    )
    bundle = _bundle(workdir, bundles_key, version="2.0.0", model_bytes=bundle_bytes)
    results = []
    for count in devices:
        for strategy in strategies:
            row = _one(
                broker,
                workdir,
                count=count,
                bundle=bundle,
                truststore=truststore,
                directives=directives,
                strategy=strategy,
            )
            print(json.dumps(row), file=sys.stderr, flush=True)
            results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--bundle-bytes", type=int, default=1 << 20)
    parser.add_argument(
        "--strategy", nargs="+", default=["all"], choices=["all", "canary", "exponential"]
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-rollout-") as temp:
        work = Path(temp)
        with MosquittoBroker(work / "mosquitto", persistence=False) as broker:
            results = rows(
                broker=broker,
                workdir=work,
                devices=args.devices,
                bundle_bytes=args.bundle_bytes,
                strategies=tuple(args.strategy),
            )
    document = {
        "benchmark": "fleet_rollout",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "python": sys.version.split()[0],
        "rows": results,
    }
    text = json.dumps(document, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
