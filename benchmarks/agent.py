"""Benchmark: the device agent's serving cost and footprint.

Measured in one run, peers side by side:

- `inprocess`: per-call latency of `ModelHost.infer` against a bare `onnxruntime`
  `InferenceSession.run` on the same session object, for magika (3.2 MB conv/attention
  classifier, int32 [1, 2048] built from real files) and a tiny linear model. Calls
  interleave the peers one by one (rotating the order); medians of the per-call times.
  `overhead_pct = 100 * (host / bare - 1)`; the goal is <= 3 % on magika.
  `host_with_drift` adds the `DriftMonitor` the agent runs when a bundle has reference stats.
- `rest`: per-request latency over the OIP REST API (keep-alive, JSON) against in-process
  `ModelHost.infer`, alternating request by request; p50/p99 and their difference.
- `idle_rss_bytes`: VmRSS of an agent-like process (magika loaded into a ModelHost, OIP
  server started, one request answered, then idle), next to a process that only opened a bare
  onnxruntime session on the same model; plus whether tensorflow, onnx or edgekit.converters
  were imported.
- `concurrent`: 10 client threads, each with its own keep-alive connection, against an
  agent-like server process (magika, the limits the agent derives for a 256 MiB inference
  budget: 2 requests run at once, the others wait their turn); per-request p50/p99/max next
  to one client alone, 503s, and requests per second. The goal is a bounded p99: about the
  queue (10 clients / 2 slots) times one request's time, no outliers from 10 requests
  fighting for 2 cores.
- `import`: seconds to import `edgekit.agent.serving` and `edgekit.agent.oip` in a fresh
  interpreter (median of several), and the forbidden-module check there.
- `update`: rows from `benchmarks/agent_update.py` when it exists (see `update_rows`).

Writes JSON to stdout and to `--out` when given.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from edgekit.agent.oip import InferenceServer
from edgekit.agent.serving import ModelHost

from edgekit.messages import BundleId
from edgekit.runtimes import OnnxRuntimeBackend, TensorSpec

ROOT = Path(__file__).resolve().parents[1]

SHARED_MODELS = Path(os.environ.get("EDGEKIT_SHARED_MODELS", ROOT.parent / "shared" / "models"))
MAGIKA = SHARED_MODELS / "magika-standard-v3.3" / "model.onnx"
GOAL_OVERHEAD_PCT = 3.0
FORBIDDEN = ("tensorflow", "onnx", "edgekit.converters")


# -- models and inputs -------------------------------------------------------------------


def _tiny_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        initializer=[numpy_helper.from_array(weights, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _magika_feed() -> dict[str, np.ndarray]:
    from edgekit.converters.examples import machine_files, magika_inputs

    rows = magika_inputs(machine_files(limit_per_pattern=20))
    return {"bytes": rows[:1].copy()}


def _reference_stats(feed: dict[str, np.ndarray], specs: tuple[TensorSpec, ...]) -> Any:
    from edgekit.converters.data import Dataset
    from edgekit.converters.outputs import reference_stats

    dataset = Dataset(feeds=(feed,), source="benchmark", kind="synthetic", samples=1)
    return reference_stats(dataset, list(specs))


# -- in-process overhead -----------------------------------------------------------------


def _inprocess(
    path: Path, feed: dict[str, np.ndarray], *, calls: int, threads: int
) -> dict[str, Any]:
    runtime = OnnxRuntimeBackend(path, threads=threads)
    session = runtime._session  # the same session: only ModelHost + Runtime wrapper differ
    host = ModelHost("bench")
    host.activate(runtime, BundleId("bench", "1", "0" * 64))
    drift_host = ModelHost("bench")
    drift_host.activate(
        runtime,
        BundleId("bench", "1", "0" * 64),
        reference_stats=_reference_stats(feed, runtime.inputs),
    )
    peers: dict[str, Callable[[], object]] = {
        "bare": lambda: session.run(None, feed),
        "runtime": lambda: runtime.run(feed),
        "host": lambda: host.infer(feed),
        "host_with_drift": lambda: drift_host.infer(feed),
    }
    names = list(peers)
    for _ in range(max(3, calls // 20)):  # warm-up
        for action in peers.values():
            action()
    # Call by call, rotating the order: a burst of load from elsewhere on the machine hits
    # every peer alike, and the median discards the preempted calls.
    samples: dict[str, list[float]] = {name: [] for name in peers}
    clock = time.perf_counter
    for index in range(calls):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            action = peers[name]
            start = clock()
            action()
            samples[name].append(clock() - start)
    monitor = drift_host.drift
    observe_s = []
    if monitor is not None:
        for _ in range(200):
            start = clock()
            monitor.observe(feed)
            observe_s.append(clock() - start)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    bare = medians["bare"]
    return {
        "model": path.name if path != MAGIKA else "magika-standard-v3.3",
        "input": {name: list(value.shape) for name, value in feed.items()},
        "calls": calls,
        "per_call_ms": {name: round(value * 1e3, 5) for name, value in medians.items()},
        "overhead_pct": round(100 * (medians["host"] / bare - 1), 2),
        "overhead_pct_with_drift": round(100 * (medians["host_with_drift"] / bare - 1), 2),
        "runtime_wrapper_pct": round(100 * (medians["runtime"] / bare - 1), 2),
        "overhead_us_per_call": round((medians["host"] - bare) * 1e6, 2),
        "drift_observe_us": round(statistics.median(observe_s) * 1e6, 2) if observe_s else None,
    }


# -- REST --------------------------------------------------------------------------------


def _rest(
    path: Path, feed: dict[str, np.ndarray], *, requests: int, threads: int
) -> dict[str, Any]:
    runtime = OnnxRuntimeBackend(path, threads=threads)
    host = ModelHost("bench")
    host.activate(runtime, BundleId("bench", "1", "0" * 64))
    [(name, value)] = feed.items()
    datatype = {"int32": "INT32", "float32": "FP32"}[value.dtype.name]
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "shape": list(value.shape),
                    "datatype": datatype,
                    "data": value.ravel().tolist(),
                }
            ]
        }
    ).encode()
    rest_ms: list[float] = []
    local_ms: list[float] = []
    with InferenceServer(host) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        headers = {"Content-Type": "application/json"}

        def rest_once() -> None:
            conn.request("POST", "/v2/models/bench/infer", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"REST request failed with {response.status}")

        for _ in range(10):
            rest_once()
            host.infer(feed)
        for index in range(requests):
            for which in ("rest", "local") if index % 2 == 0 else ("local", "rest"):
                start = time.perf_counter()
                if which == "rest":
                    rest_once()
                else:
                    host.infer(feed)
                (rest_ms if which == "rest" else local_ms).append(
                    (time.perf_counter() - start) * 1e3
                )
        conn.close()

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q))

    return {
        "model": "magika-standard-v3.3" if path == MAGIKA else path.name,
        "requests": requests,
        "request_body_bytes": len(body),
        "rest_p50_ms": round(pct(rest_ms, 50), 4),
        "rest_p99_ms": round(pct(rest_ms, 99), 4),
        "inprocess_p50_ms": round(pct(local_ms, 50), 4),
        "inprocess_p99_ms": round(pct(local_ms, 99), 4),
        "overhead_p50_ms": round(pct(rest_ms, 50) - pct(local_ms, 50), 4),
        "overhead_p99_ms": round(pct(rest_ms, 99) - pct(local_ms, 99), 4),
    }


# -- footprint ---------------------------------------------------------------------------

_AGENT_PROCESS = textwrap.dedent(
    """
    import http.client, json, sys, time
    from pathlib import Path
    from edgekit.agent.serving import load_model
    from edgekit.agent.oip import InferenceServer

    host = load_model(Path(sys.argv[1]), name="bench", threads=int(sys.argv[2]))
    server = InferenceServer(host)
    server.start()
    body = json.dumps({"inputs": [{"name": "bytes", "shape": [1, 2048], "datatype": "INT32",
                                   "data": [0] * 2048}]})
    conn = http.client.HTTPConnection("127.0.0.1", server.port)
    conn.request("POST", "/v2/models/bench/infer", body=body)
    assert conn.getresponse().status == 200
    forbidden = sorted(m for m in sys.modules
                       if m.split(".")[0] in ("tensorflow", "onnx")
                       or m.startswith("edgekit.converters"))
    print(json.dumps({"forbidden": forbidden}), flush=True)
    time.sleep(60)
    """
)

_BARE_PROCESS = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(sys.argv[2])
    session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
    session.run(None, {"bytes": np.zeros((1, 2048), dtype=np.int32)})
    print("{}", flush=True)
    time.sleep(60)
    """
)


def _idle_rss(script: str, model: Path, threads: int, settle_s: float = 1.0) -> tuple[int, Any]:
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(model), str(threads)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tempfile.gettempdir(),  # import the installed package, not the checkout's folders
    )
    try:
        assert process.stdout is not None
        report = json.loads(process.stdout.readline())
        time.sleep(settle_s)
        status = Path(f"/proc/{process.pid}/status").read_text()
        rss_kb = next(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")
        )
        return rss_kb * 1024, report
    finally:
        process.kill()
        process.wait(10)


_SERVER_PROCESS = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from edgekit.agent.serving import load_model
    from edgekit.agent.oip import InferenceServer

    host = load_model(Path(sys.argv[1]), name="bench", threads=int(sys.argv[2]))
    try:
        from edgekit.agent.oip import InferenceLimits
    except ImportError:  # an edgekit before issue 13 (no limits): the peer to compare with
        server = InferenceServer(host)
    else:
        server = InferenceServer(host, limits=InferenceLimits.for_memory(256 << 20))
    server.start()
    print(json.dumps({"port": server.port}), flush=True)
    time.sleep(600)
    """
)


def _clients(
    port: int, body: bytes, *, clients: int, requests: int
) -> tuple[list[float], dict[int, int], float]:
    """Latencies (ms) of `clients` threads x `requests` each, status counts, wall seconds."""
    import threading

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    start_line = threading.Barrier(clients)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine: list[tuple[float, int]] = []
        start_line.wait()
        for _ in range(requests):
            start = time.perf_counter()
            conn.request("POST", "/v2/models/bench/infer", body=body)
            response = conn.getresponse()
            response.read()
            mine.append(((time.perf_counter() - start) * 1e3, response.status))
        conn.close()
        with lock:
            for latency, status in mine:
                latencies.append(latency)
                statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, statuses, time.perf_counter() - began


def _concurrent(
    model: Path, feed: dict[str, np.ndarray], *, clients: int, requests: int, threads: int
) -> dict[str, Any]:
    [(name, value)] = feed.items()
    body = json.dumps(
        {
            "inputs": [
                {"name": name, "shape": list(value.shape), "datatype": "INT32",
                 "data": value.ravel().tolist()}
            ]
        }
    ).encode()  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVER_PROCESS, str(model), str(threads)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tempfile.gettempdir(),
    )
    try:
        assert process.stdout is not None
        port = int(json.loads(process.stdout.readline())["port"])
        _clients(port, body, clients=2, requests=10)  # warm-up
        alone, _, _ = _clients(port, body, clients=1, requests=clients * requests // 4)
        together, statuses, wall_s = _clients(port, body, clients=clients, requests=requests)
    finally:
        process.kill()
        process.wait(10)

    def pct(values: list[float], q: float) -> float:
        return round(float(np.percentile(values, q)), 3)

    return {
        "model": "magika-standard-v3.3",
        "clients": clients,
        "requests_per_client": requests,
        "one_client": {"p50_ms": pct(alone, 50), "p99_ms": pct(alone, 99)},
        "p50_ms": pct(together, 50),
        "p99_ms": pct(together, 99),
        "max_ms": round(max(together), 3),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "requests_per_s": round(len(together) / wall_s, 1),
        "p99_over_one_client_p50": round(pct(together, 99) / pct(alone, 50), 2),
    }


_IMPORT_PROCESS = textwrap.dedent(
    """
    import json, sys, time
    start = time.perf_counter()
    import edgekit.agent.serving, edgekit.agent.oip
    elapsed = time.perf_counter() - start
    forbidden = sorted(m for m in sys.modules
                       if m.split(".")[0] in ("tensorflow", "onnx", "onnxruntime")
                       or m.startswith("edgekit.converters"))
    print(json.dumps({"s": elapsed, "loaded": forbidden}))
    """
)


def _import_time(repetitions: int) -> dict[str, Any]:
    times = []
    loaded: list[str] = []
    for _ in range(repetitions):
        out = subprocess.run(
            [sys.executable, "-c", _IMPORT_PROCESS],
            check=True,
            capture_output=True,
            text=True,
            cwd=tempfile.gettempdir(),
        ).stdout
        document = json.loads(out)
        times.append(document["s"])
        loaded = document["loaded"]
    return {
        "serving_and_oip_s": round(statistics.median(times), 4),
        "all_s": [round(t, 4) for t in times],
        "heavy_modules_loaded": loaded,  # onnxruntime included here: it loads lazily
        "forbidden_loaded": [m for m in loaded if not m.startswith("onnxruntime")],
    }


# -- update and rollback (the updater's benchmark) ----------------------------------------


def update_rows() -> dict[str, Any]:
    """Update-apply and rollback timings, measured by `benchmarks/agent_update.py`.

    >>> CONTRACT for benchmarks/agent_update.py: a module-level function
    >>>     measure() -> dict[str, Any]   (JSON-ready; e.g. update_apply_s for a 10 MB bundle,
    >>>                                    rollback_s, with the bundle size and repetitions)
    It is imported and called here, and its result is the `update` section of this JSON.
    """
    path = Path(__file__).with_name("agent_update.py")
    if not path.exists():
        return {"status": "not measured: benchmarks/agent_update.py does not exist yet"}
    import importlib.util

    spec = importlib.util.spec_from_file_location("edgekit_bench_agent_update", path)
    if spec is None or spec.loader is None:
        return {"status": f"not measured: cannot import {path}"}
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    measure = getattr(module, "measure", None)
    if measure is None:
        return {"status": f"not measured: {path.name} has no measure() function"}
    result: dict[str, Any] = measure()
    return result


# -- main --------------------------------------------------------------------------------


def main() -> None:
    """Run the benchmark and print (and optionally write) its JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--calls", type=int, default=400, help="magika calls per peer")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--rest-requests", type=int, default=200)
    parser.add_argument("--skip-update", action="store_true")
    parser.add_argument("--clients", type=int, default=10, help="concurrent REST clients")
    args = parser.parse_args()
    if not MAGIKA.exists():
        sys.exit(f"error: {MAGIKA} is missing; set EDGEKIT_SHARED_MODELS")

    with tempfile.TemporaryDirectory(prefix="edgekit-bench-agent-") as temp:
        tiny = _tiny_model(Path(temp) / "tiny.onnx")
        magika_feed = _magika_feed()
        tiny_feed = {"x": np.random.default_rng(1).normal(size=(1, 16)).astype(np.float32)}
        inprocess = {
            "magika": _inprocess(MAGIKA, magika_feed, calls=args.calls, threads=args.threads),
            "tiny": _inprocess(tiny, tiny_feed, calls=args.calls * 20, threads=args.threads),
        }
        rest = {
            "magika": _rest(MAGIKA, magika_feed, requests=args.rest_requests, threads=args.threads),
            "tiny": _rest(tiny, tiny_feed, requests=args.rest_requests * 2, threads=args.threads),
        }
    # On magika the difference is below run-to-run noise; the tiny model (4 µs per call)
    # measures ModelHost's fixed per-request cost precisely, which does not grow with the
    # model, so this is the sharper estimate of magika's overhead.
    fixed_us = inprocess["tiny"]["overhead_us_per_call"]
    magika_bare_us = inprocess["magika"]["per_call_ms"]["bare"] * 1e3
    magika_drift_us = inprocess["magika"]["drift_observe_us"] or 0.0
    derived = {
        "host_fixed_cost_us": fixed_us,
        "magika_overhead_pct_from_fixed_cost": round(100 * fixed_us / magika_bare_us, 3),
        "magika_overhead_pct_with_drift_from_parts": round(
            100 * (fixed_us + magika_drift_us) / magika_bare_us, 3
        ),
    }
    concurrent = _concurrent(
        MAGIKA, magika_feed, clients=args.clients, requests=50, threads=args.threads
    )
    agent_rss, agent_report = _idle_rss(_AGENT_PROCESS, MAGIKA, args.threads)
    bare_rss, _ = _idle_rss(_BARE_PROCESS, MAGIKA, args.threads)
    result = {
        "benchmark": "agent",
        "goal_overhead_pct": GOAL_OVERHEAD_PCT,
        "inprocess_overhead_pct": inprocess["magika"]["overhead_pct"],
        "meets_goal": inprocess["magika"]["overhead_pct"] <= GOAL_OVERHEAD_PCT,
        "rest_overhead_p50_ms": rest["magika"]["overhead_p50_ms"],
        "rest_overhead_p99_ms": rest["magika"]["overhead_p99_ms"],
        "concurrent_p99_ms": concurrent["p99_ms"],
        "idle_rss_bytes": agent_rss,
        "import_serving_oip_s": None,
        "inprocess": inprocess,
        "inprocess_derived": derived,
        "rest": rest,
        "concurrent": concurrent,
        "rest_note": "client and server share one process (and its GIL): a pessimistic REST "
        "overhead; JSON encoding of the request and response dominates for magika",
        "footprint": {
            "agent_idle_rss_bytes": agent_rss,
            "bare_session_rss_bytes": bare_rss,
            "agent_minus_bare_bytes": agent_rss - bare_rss,
            "forbidden_modules_in_agent_process": agent_report["forbidden"],
        },
        "import": _import_time(5),
        "update": {"status": "skipped (--skip-update)"} if args.skip_update else update_rows(),
        "machine": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "onnxruntime_threads": args.threads,
            "load_average": os.getloadavg(),
        },
    }
    result["import_serving_oip_s"] = result["import"]["serving_and_oip_s"]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
