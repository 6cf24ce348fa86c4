"""Benchmark worker, run in a child process so each measurement starts from a clean heap.

`python -m edgekit._bench_worker SPEC.json` prints one JSON document on stdout.
Modes:

- `latency`: every model loaded in this one process, then timed in *rounds*: in each round
  every model runs once, in an order shuffled per round (seeded). Runs of different models in
  the same round are neighbours in time, so background load hits them alike: the per-round
  ratios are paired measurements (see `edgekit.converters.benchmark`). Then a shorter pass
  gives wall-clock percentiles at the profile's thread count for the report.
- `memory`: one model: resident memory added by loading it and running it.

Lives in the core package and imports only the runtimes: `edgekit-agent bench` runs it on a
device too, where no converter code is installed.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.runtimes import Runtime, load_litert, model_feed, open_runtime


def _load_feed(path: str) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _status_bytes(field: str) -> int:
    # VmHWM (peak resident set) starts afresh at exec, unlike ru_maxrss, which a child
    # inherits from the process that spawned it.
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss_bytes() -> int:
    return _status_bytes("VmRSS")


def _per_run_seconds(session: Runtime, feed: dict[str, Any]) -> float:
    for _ in range(3):
        session.run(feed)
    start = time.perf_counter()
    for _ in range(3):
        session.run(feed)
    return max((time.perf_counter() - start) / 3, 1e-6)


def _interleaved(
    sessions: dict[str, Runtime],
    feeds: dict[str, dict[str, Any]],
    clock: Callable[[], float],
    *,
    budget_s: float,
    min_rounds: int,
    max_rounds: int,
    seed: int,
) -> dict[str, list[float]]:
    """One run of every model per round, in a shuffled order; ms per run by `clock`."""
    per_run = {name: _per_run_seconds(session, feeds[name]) for name, session in sessions.items()}
    rounds = int(budget_s * len(sessions) / max(sum(per_run.values()), 1e-9))
    rounds = max(min_rounds, min(max_rounds, rounds))
    names = sorted(sessions)
    shuffler = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        order = list(names)
        shuffler.shuffle(order)
        for name in order:
            session, given = sessions[name], feeds[name]
            start = clock()
            session.run(given)
            times[name].append((clock() - start) * 1e3)
    return times


def _latency(spec: dict[str, Any]) -> dict[str, Any]:
    """Paired rounds for the decision, then wall-clock percentiles at the profile's threads.

    `decision_clock` `cpu` (the workstation default) times every model on one thread by the
    thread's CPU time: the work an inference does, which other processes taking the CPU do not
    change. `wall` (a device) times wall-clock at `threads`.
    """
    feed = _load_feed(spec["feed"])
    threads = int(spec["threads"])
    clock_name = spec.get("decision_clock", "cpu")
    budget_s = float(spec.get("seconds_per_model", 2.0))
    seed = int(spec.get("seed", 0))
    paths = {model["name"]: Path(model["path"]) for model in spec["models"]}
    decision_threads = 1 if clock_name == "cpu" else threads
    clock = time.thread_time if clock_name == "cpu" else time.perf_counter
    sessions = {name: open_runtime(path, threads=decision_threads) for name, path in paths.items()}
    feeds = {name: model_feed(session, feed) for name, session in sessions.items()}
    decision = _interleaved(
        sessions, feeds, clock, budget_s=budget_s, min_rounds=15, max_rounds=1000, seed=seed
    )
    if decision_threads != threads:
        sessions = {name: open_runtime(path, threads=threads) for name, path in paths.items()}
    wall = _interleaved(
        sessions,
        feeds,
        time.perf_counter,
        budget_s=budget_s / 2,
        min_rounds=10,
        max_rounds=500,
        seed=seed + 1,
    )
    return {
        name: {
            "clock": clock_name,
            "decision_threads": decision_threads,
            "rounds_ms": decision[name],
            "p50_ms": float(np.percentile(wall[name], 50)),
            "p95_ms": float(np.percentile(wall[name], 95)),
            "p99_ms": float(np.percentile(wall[name], 99)),
            "runs": len(wall[name]),
            "threads": threads,
        }
        for name in paths
    }


def _memory(spec: dict[str, Any]) -> dict[str, Any]:
    feed = _load_feed(spec["feed"])
    path = Path(spec["models"][0]["path"])
    # The engine's import cost is not the model's.
    if path.suffix == ".tflite":
        load_litert()
    else:
        import onnxruntime  # noqa: F401

    before = _rss_bytes()
    start = time.perf_counter()
    session = open_runtime(path, threads=spec["threads"])
    load_ms = (time.perf_counter() - start) * 1e3
    loaded = _rss_bytes()
    given = model_feed(session, feed)
    for _ in range(3):
        session.run(given)
    peak = _status_bytes("VmHWM")
    return {
        "load_bytes": max(0, loaded - before),
        "peak_bytes": max(0, peak - before),
        "load_ms": load_ms,
    }


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    result = _latency(spec) if spec["mode"] == "latency" else _memory(spec)
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    main()
