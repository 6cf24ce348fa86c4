"""Benchmark worker, run in a child process so each measurement starts from a clean heap.

`python -m edgekit._bench_worker SPEC.json` prints one JSON document on stdout.
Modes:

- `latency`: every model loaded in this one process, then timed in *rounds*: in each round
  every model runs once, in an order shuffled per round (seeded). Runs of different models in
  the same round are neighbours in time, so background load hits them alike: the per-round
  ratios are paired measurements (see `edgekit.converters.benchmark`). Then a shorter pass
  gives wall-clock percentiles at the profile's thread count for the report.
- `memory`: one model: resident memory added by loading it and running it, and its load time.
- `outputs`: one model run on recorded inputs, its outputs written to a file (fidelity on the
  device).

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

from edgekit.errors import EdgekitError
from edgekit.runtimes import Runtime, dequantize_output, load_litert, model_feed, open_runtime

__all__ = ["BenchWorkerError", "run_worker"]


class BenchWorkerError(EdgekitError):
    """The benchmark child process failed (the model did not load or run there)."""


def run_worker(
    spec: dict[str, Any],
    *,
    workdir: Path,
    python: str | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Run one worker job in a child process (`spec["mode"]`: latency, memory or outputs).

    `spec["nice"]` lowers the child's priority (the device bench runs beside a served model).
    Raises `BenchWorkerError` with the child's last line of stderr when it fails.
    """
    import os
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(
        "w", suffix=".json", dir=workdir, delete=False, encoding="utf-8"
    ) as handle:
        json.dump(spec, handle)
        spec_path = handle.name
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(spec.get("threads", 1)))
    try:
        completed = subprocess.run(
            [python or sys.executable, "-m", "edgekit._bench_worker", spec_path],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchWorkerError(f"benchmark worker ({spec['mode']}) took over {timeout_s} s") from e
    finally:
        Path(spec_path).unlink(missing_ok=True)
    if completed.returncode != 0:
        tail = completed.stderr.strip().splitlines()[-1:] or [f"exit {completed.returncode}"]
        raise BenchWorkerError(f"benchmark worker failed: {tail[0]}")
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


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
    throttle: dict[str, float] | None = None,
) -> dict[str, list[float]]:
    """One run of every model per round, in a shuffled order; ms per run by `clock`.

    `throttle` (name -> factor >= 1) makes a model that much slower by sleeping after each run
    for the extra time: `edgekit-agent bench`'s test aid for a device slower on one candidate.
    """
    throttle = throttle or {}
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
            elapsed = clock() - start
            factor = throttle.get(name, 1.0)
            if factor > 1.0:
                time.sleep(elapsed * (factor - 1.0))
                elapsed = clock() - start
            times[name].append(elapsed * 1e3)
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
    throttle = {name: float(factor) for name, factor in spec.get("throttle", {}).items()}
    decision = _interleaved(
        sessions,
        feeds,
        clock,
        budget_s=budget_s,
        min_rounds=int(spec.get("min_rounds", 15)),
        max_rounds=int(spec.get("max_rounds", 1000)),
        seed=seed,
        throttle=throttle,
    )
    if clock_name == "wall":  # the rounds are the wall-clock numbers at `threads` already
        wall = decision
    else:
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
            throttle=throttle,
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


def _outputs(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one model on every feed of `spec["inputs"]` (an .npz of `inputs/<i>/<name>`) and
    write its outputs as `outputs/<i>/<name>` to `spec["out"]`."""
    path = Path(spec["models"][0]["path"])
    session = open_runtime(path, threads=spec["threads"])
    arrays: dict[str, Any] = {}
    with np.load(spec["inputs"], allow_pickle=False) as archive:
        feeds: dict[int, dict[str, Any]] = {}
        for key in archive.files:
            parts = key.split("/", 2)
            if len(parts) == 3 and parts[0] == "inputs" and parts[1].isdecimal():
                feeds.setdefault(int(parts[1]), {})[parts[2]] = archive[key]
    specs = {spec.name: spec for spec in session.outputs}
    for index in sorted(feeds):
        for name, value in session.run(model_feed(session, feeds[index])).items():
            arrays[f"outputs/{index}/{name}"] = dequantize_output(specs[name], value)
    np.savez(spec["out"], **arrays)
    return {"samples": len(feeds)}


def main() -> None:
    import os

    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    if spec.get("nice"):
        os.nice(int(spec["nice"]))
    modes = {"latency": _latency, "memory": _memory, "outputs": _outputs}
    result = modes[spec["mode"]](spec)
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    main()
