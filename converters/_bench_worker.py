"""Benchmark worker, run in a child process so each measurement starts from a clean heap.

`python -m edgekit.converters._bench_worker SPEC.json` prints one JSON document on stdout.
Modes: `latency` (all models loaded, timed round-robin so drift hits them equally) and
`memory` (one model: resident memory added by loading it and running it).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.runtimes import Runtime, load_litert, open_runtime, quantize_input


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


def _model_feed(runtime: Runtime, feed: dict[str, Any]) -> dict[str, Any]:
    """The feed in the model's own input dtypes (quantized for int8/uint8 I/O)."""
    specs = {spec.name: spec for spec in runtime.inputs}
    return {
        name: quantize_input(specs[name], value) if name in specs else value
        for name, value in feed.items()
    }


def _latency(spec: dict[str, Any]) -> dict[str, Any]:
    feed = _load_feed(spec["feed"])
    sessions = {
        model["name"]: open_runtime(Path(model["path"]), threads=spec["threads"])
        for model in spec["models"]
    }
    feeds = {name: _model_feed(session, feed) for name, session in sessions.items()}
    per_run: dict[str, float] = {}
    for name, session in sessions.items():
        for _ in range(3):
            session.run(feeds[name])
        start = time.perf_counter()
        for _ in range(3):
            session.run(feeds[name])
        per_run[name] = max((time.perf_counter() - start) / 3, 1e-6)
    budget_s = float(spec.get("seconds_per_model", 2.0))
    rounds = int(spec.get("rounds", 5))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    round_medians: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for round_index in range(rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            runs = max(3, min(200, int(budget_s / rounds / per_run[name])))
            session = sessions[name]
            model_feed = feeds[name]
            these = []
            for _ in range(runs):
                start = time.perf_counter()
                session.run(model_feed)
                these.append((time.perf_counter() - start) * 1e3)
            times[name].extend(these)
            round_medians[name].append(float(np.median(these)))
    return {
        name: {
            "p50_ms": float(np.percentile(values, 50)),
            "p95_ms": float(np.percentile(values, 95)),
            "runs": len(values),
            "round_medians_ms": round_medians[name],
        }
        for name, values in times.items()
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
    session = open_runtime(path, threads=spec["threads"])
    loaded = _rss_bytes()
    model_feed = _model_feed(session, feed)
    for _ in range(3):
        session.run(model_feed)
    peak = _status_bytes("VmHWM")
    return {"load_bytes": max(0, loaded - before), "peak_bytes": max(0, peak - before)}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    result = _latency(spec) if spec["mode"] == "latency" else _memory(spec)
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    main()
