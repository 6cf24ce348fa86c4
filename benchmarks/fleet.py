"""Benchmark: bundle transfer over MQTT vs mosquitto_pub/mosquitto_sub, and exporter ingest.

Starts its own Mosquitto (edgekit.mosquitto, free loopback port) and measures, in the same
run and on the same broker:

- `transfer`: for each size (default 1, 8 and 32 MiB of random bytes), `publish_bundle`
  (retained chunks + meta, QoS 1, windowed acks) and `MqttBundleFetcher.fetch` (windowed
  per-chunk subscriptions, bitmap + fsync, sha256 check), against `mosquitto_pub -f` (one
  retained QoS 1 message) and `mosquitto_sub -C 1` (receive it) moving the same bytes. Ratios
  are throughput ratios, `edgekit / mosquitto-clients` (1.0 = as fast; the clients' times
  include their process start, a few ms). Median of `--repetitions`. One row per chunk size
  (`--chunk-bytes`, default transfer.py's 128 KiB and 1 MiB): the fetch costs a subscription
  round trip per chunk and an fsync per MiB, so the chunk size is the main knob.
- `exporter`: `edgekit monitor`'s ingest rate (messages/s) with simulated devices in a separate
  process (so they do not share the exporter's GIL): once at a realistic rate (1000 devices,
  one telemetry message per second each), once flooding (N devices sending as fast as their
  loop allows) to find the exporter's capacity: ingested / (last - first message time).
  `lost` = sent - ingested (QoS 1 end to end: should be 0).
- `rollout`: rows from `benchmarks/fleet_rollout.py` (the fleet controller's rollout wall
  time to 100/500/1000 simulated devices with a 1 MB bundle), when that file exists: this
  script imports it and calls the first of `rows`, `run`, `benchmark` it defines with the
  keyword arguments it accepts among `broker` (a started MosquittoBroker), `workdir` (Path),
  `devices` (list of int) and `bundle_bytes` (int); it must return a list of JSON objects.

Writes JSON to stdout and to `--out` (default benchmarks/results/fleet.json).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekit.fleet.monitor import FleetMonitor
from edgekit.mosquitto import MosquittoBroker
from edgekit.mqtt import BrokerSettings, MqttClient
from edgekit.topics import Topics, client_id
from edgekit.transfer import (
    DEFAULT_CHUNK_BYTES,
    MqttBundleFetcher,
    publish_bundle,
    unpublish_bundle,
)

FLEET = "bench"
TOPICS = Topics(FLEET)
ROLLOUT_MODULE = Path(__file__).resolve().parent / "fleet_rollout.py"


def _client(broker: MosquittoBroker, name: str) -> MqttClient:
    client = MqttClient(BrokerSettings(broker.url), client_id=client_id(name, str(os.getpid())))
    return client.connect(timeout_s=10)


def _close(client: MqttClient) -> None:
    client.stop()


def _transfer_once(
    broker: MosquittoBroker, source: Path, work: Path, chunk: int
) -> dict[str, float]:
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    size = source.stat().st_size
    publisher = _client(broker, "bench-pub")
    start = time.perf_counter()
    meta = publish_bundle(publisher, TOPICS, source, chunk_size=chunk)
    publish_s = time.perf_counter() - start
    fetch_client = _client(broker, "bench-fetch")
    destination = work / "fetched.ekb"
    downloads = work / "downloads"
    start = time.perf_counter()
    MqttBundleFetcher(
        fetch_client, TOPICS.bundle_prefix(sha), downloads, sha256=sha, size_bytes=size, window=16
    ).fetch(destination, timeout_s=600)
    fetch_s = time.perf_counter() - start
    if hashlib.sha256(destination.read_bytes()).hexdigest() != sha:
        raise RuntimeError("fetched bytes differ")
    destination.unlink()
    shutil.rmtree(downloads, ignore_errors=True)
    _close(fetch_client)
    unpublish_bundle(publisher, TOPICS, meta)
    _close(publisher)
    return {"publish_s": publish_s, "fetch_s": fetch_s}


def _clients_once(broker: MosquittoBroker, source: Path, work: Path) -> dict[str, float]:
    topic = f"{TOPICS.prefix}/bench/whole"
    common = ["-h", broker.host, "-p", str(broker.port), "-V", "mqttv5", "-q", "1"]
    start = time.perf_counter()
    subprocess.run(["mosquitto_pub", *common, "-t", topic, "-r", "-f", str(source)], check=True)
    publish_s = time.perf_counter() - start
    out = work / "sub.out"
    start = time.perf_counter()
    with out.open("wb") as handle:
        subprocess.run(
            ["mosquitto_sub", *common, "-t", topic, "-C", "1", "-N"], check=True, stdout=handle
        )
    fetch_s = time.perf_counter() - start
    if out.read_bytes() != source.read_bytes():
        raise RuntimeError("mosquitto_sub received different bytes")
    out.unlink()
    subprocess.run(["mosquitto_pub", *common, "-t", topic, "-r", "-n"], check=True)
    return {"publish_s": publish_s, "fetch_s": fetch_s}


def _median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def _speeds(size_mib: float, runs: list[dict[str, float]]) -> dict[str, float]:
    publish_s, fetch_s = _median(runs, "publish_s"), _median(runs, "fetch_s")
    return {
        "publish_s": round(publish_s, 4),
        "fetch_s": round(fetch_s, 4),
        "publish_mib_s": round(size_mib / publish_s, 2),
        "fetch_mib_s": round(size_mib / fetch_s, 2),
        "round_trip_mib_s": round(size_mib / (publish_s + fetch_s), 2),
    }


def bench_transfer(
    broker: MosquittoBroker,
    work: Path,
    sizes_mib: list[float],
    repetitions: int,
    chunk_sizes: list[int],
) -> list[dict[str, Any]]:
    """One row per (size, chunk size); the first chunk size is transfer.py's default."""
    results = []
    for size_mib in sizes_mib:
        size = int(size_mib * 1024 * 1024)
        source = work / f"bundle-{size}.bin"
        source.write_bytes(os.urandom(size))
        theirs = _speeds(
            size_mib, [_clients_once(broker, source, work) for _ in range(repetitions)]
        )
        for chunk in chunk_sizes:
            runs = [_transfer_once(broker, source, work, chunk) for _ in range(repetitions)]
            row: dict[str, Any] = {
                "bytes": size,
                "chunk_bytes": chunk,
                "chunks": -(-size // chunk),
                "edgekit": _speeds(size_mib, runs),
                "mosquitto_clients": theirs,
            }
            for key in ("publish", "fetch", "round_trip"):
                row[f"ratio_{key}"] = round(
                    row["edgekit"][f"{key}_mib_s"] / theirs[f"{key}_mib_s"], 3
                )
            results.append(row)
            print(json.dumps(row), file=sys.stderr)
        source.unlink()
    return results


def _simulate(args: argparse.Namespace) -> None:
    """Subprocess entry: run simulated devices sending telemetry, print what they sent."""
    from edgekit.fleet.simulate import SimulatedFleet
    from edgekit.trust import Signer, create_truststore

    key = Signer.generate()
    store = create_truststore(
        root_keys=[key.public_key], bundles_keys=[key.public_key], directives_keys=[key.public_key]
    )
    sim = SimulatedFleet(
        args.broker, FLEET, args.devices, trust_store=store, telemetry_interval_s=0
    )
    start = time.monotonic()
    sim.start(wait_s=300)
    connect_s = time.monotonic() - start
    print("ready", flush=True)
    sys.stdin.readline()  # the parent says go once its exporter is subscribed
    sim.set_telemetry_interval(args.interval)
    time.sleep(args.duration)
    sim.set_telemetry_interval(0)
    sim.wait_idle(timeout_s=120)
    sent = sim.sent()
    sim.stop()
    print(json.dumps({"connect_s": connect_s, "telemetry": sent.telemetry}), flush=True)


def bench_exporter(
    broker: MosquittoBroker, devices: int, interval_s: float, duration_s: float
) -> dict[str, Any]:
    monitor = FleetMonitor(broker.url, FLEET, group=f"bench-{devices}-{interval_s}")
    monitor.start()
    process = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "_simulate",
            "--broker",
            broker.url,
            "--devices",
            str(devices),
            "--interval",
            str(interval_s),
            "--duration",
            str(duration_s),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError("simulator subprocess failed")
    baseline = monitor.ingested["telemetry"]
    first: float | None = None
    last = time.monotonic()
    count = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal first, last, count
        while not done.is_set():
            now_count = monitor.ingested["telemetry"]
            now = time.monotonic()
            if now_count > count:
                if first is None:
                    first = now
                count, last = now_count, now
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu_start = time.process_time()
    process.stdin.write("go\n")
    process.stdin.flush()
    summary = json.loads(process.stdout.readline())
    process.wait(timeout=60)
    # Drain: the exporter may still be working through the broker's queue.
    while time.monotonic() - last < 2.0:
        time.sleep(0.1)
    done.set()
    sampler.join()
    cpu_s = time.process_time() - cpu_start
    monitor.stop()
    ingested = count - baseline
    seconds = (last - first) if first is not None else 0.0
    return {
        "devices": devices,
        "interval_s": interval_s,
        "duration_s": duration_s,
        "simulator_connect_s": round(summary["connect_s"], 3),
        "sent": summary["telemetry"],
        "offered_msg_s": round(summary["telemetry"] / duration_s, 1),
        "ingested": ingested,
        "lost": summary["telemetry"] - ingested,
        "ingest_msg_s": round(ingested / seconds, 1) if seconds > 0 else None,
        # CPU the exporter's process spent (parse + account), and the rate one core allows.
        "exporter_cpu_us_per_msg": round(1e6 * cpu_s / ingested, 1) if ingested else None,
        "exporter_capacity_msg_s_per_core": round(ingested / cpu_s) if cpu_s > 0 else None,
    }


def bench_rollout(broker: MosquittoBroker, work: Path, devices: list[int]) -> list[Any] | None:
    """Rows from benchmarks/fleet_rollout.py, if the controller's benchmark exists."""
    if not ROLLOUT_MODULE.exists():
        return None
    spec = importlib.util.spec_from_file_location("fleet_rollout", ROLLOUT_MODULE)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("rows", "run", "benchmark"):
        function = getattr(module, name, None)
        if callable(function):
            offered = {
                "broker": broker,
                "workdir": work,
                "devices": devices,
                "bundle_bytes": 1024 * 1024,
            }
            accepted = inspect.signature(function).parameters
            result = function(**{k: v for k, v in offered.items() if k in accepted})
            return list(result)
    return None


def main() -> None:
    """Run the benchmark and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    simulate = sub.add_parser("_simulate")
    simulate.add_argument("--broker", required=True)
    simulate.add_argument("--devices", type=int, required=True)
    simulate.add_argument("--interval", type=float, required=True)
    simulate.add_argument("--duration", type=float, required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fleet.json"))
    parser.add_argument("--sizes-mib", type=float, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument(
        "--chunk-bytes", type=int, nargs="+", default=[DEFAULT_CHUNK_BYTES, 1024 * 1024]
    )
    parser.add_argument("--flood-devices", type=int, default=100)
    parser.add_argument("--fleet-devices", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--flood-duration", type=float, default=3.0)
    parser.add_argument("--rollout-devices", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--skip-rollout", action="store_true")
    args = parser.parse_args()
    if args.command == "_simulate":
        _simulate(args)
        return

    work = Path(tempfile.mkdtemp(prefix="edgekit-bench-fleet-"))
    try:
        broker = MosquittoBroker(work / "mosquitto", persistence=False)
        with broker:
            transfer = bench_transfer(
                broker, work, args.sizes_mib, args.repetitions, args.chunk_bytes
            )
            exporter = [
                bench_exporter(broker, args.fleet_devices, 1.0, args.duration),
                bench_exporter(broker, args.flood_devices, 0.001, args.flood_duration),
            ]
            for row in exporter:
                print(json.dumps(row), file=sys.stderr)
            rollout = (
                None if args.skip_rollout else bench_rollout(broker, work, args.rollout_devices)
            )
        result = {
            "benchmark": "fleet",
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "mosquitto": subprocess.run(
                [broker.binary, "-h"], check=False, capture_output=True, text=True
            ).stdout.splitlines()[0],
            "transfer": transfer,
            "exporter": exporter,
            "rollout": rollout
            if rollout is not None
            else "benchmarks/fleet_rollout.py absent or skipped",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
