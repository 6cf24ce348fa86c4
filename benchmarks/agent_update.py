"""Benchmark: how long the agent takes to apply a 10 MB update and to roll one back.

Measured in one run:

- `apply_inprocess`: `Updater.process` for a directive naming a 10 MB bundle (a real 10 MB
  ONNX model: a 1600x1600 float MatMul) with the bundle already on local disk and probation
  0 s: verify (signatures, sha256 pin), install (verify-while-extracting into the idle slot,
  fsync), health check (fresh session, golden samples, latency runs), activation. The phase
  split comes from the `state` events' timestamps.
- `apply_mqtt`: the same update through a real Mosquitto: the bundle's chunks are retained
  on the broker; from publishing the directive to the retained status saying committed, with
  the agent running in this process (`edgekit.agent.daemon.Agent`).
- `rollback`: a bundle that passes its health check but fails every live request of batch
  size 2 is activated; the probation judge rolls it back. Timed from the `rolled_back`
  journal transition to the previous model serving again (the previous session is kept
  during probation, so this is a pointer write and a hot swap), and the whole probation-to-
  serving-the-old-model span.

Repetitions: `--repeat` (default 3); medians reported. Writes JSON to stdout and `--out`.
`measure()` is the entry point `benchmarks/agent.py` calls.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def _big_model(path: Path, *, seed: int, width: int = 1600) -> Path:
    """x[N,8] -> 8xW -> WxW -> Wx4 -> softmax: ~10 MB of float weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tests.agent.agent_helpers import CLASSES, FEATURES, INPUT, OUTPUT

    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(width)
    weights = [
        (rng.normal(size=(FEATURES, width)) * 0.3).astype(np.float32),
        (rng.normal(size=(width, width)) * scale).astype(np.float32),
        (rng.normal(size=(width, CLASSES)) * scale).astype(np.float32),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [INPUT, "W0"], ["h0"]),
            helper.make_node("Relu", ["h0"], ["r0"]),
            helper.make_node("MatMul", ["r0", "W1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["r1"]),
            helper.make_node("MatMul", ["r1", "W2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], [OUTPUT], axis=-1),
        ],
        "big",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", CLASSES])],
        initializer=[numpy_helper.from_array(w, f"W{i}") for i, w in enumerate(weights)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _events_ts(recorder: Any, kind: str, state: str | None = None) -> float:
    for event in recorder.events:
        if event.kind == kind and (state is None or event.state == state):
            return float(event.ts)
    raise LookupError(f"no {kind} {state or ''} event")


def _device(
    work: Path, keys: Any, bundles: list[Path], *, initial: Path, probation_s: float, name: str
) -> Any:
    from edgekit.agent.config import load_config
    from edgekit.agent.serving import ModelHost
    from edgekit.agent.store import Store
    from edgekit.agent.updater import Updater

    from edgekit.profiles import load_profile
    from edgekit.trust import load_truststore
    from tests.agent.agent_helpers import write_config, write_truststore
    from tests.agent.conftest import Device, LocalFetcher, Recorder

    root = work / name
    root.mkdir()
    truststore = write_truststore(keys, root / "truststore.json")
    config = load_config(
        write_config(
            root / "agent.toml",
            data_dir=root / "data",
            truststore=truststore,
            initial_bundle=initial,
            probation_s=probation_s,
            max_latency_ms=1000.0,
        ),
        environ={},
    )
    host = ModelHost("model")
    store = Store(config.data_dir)
    recorder = Recorder()
    fetcher = LocalFetcher(bundles)
    updater = Updater(
        config=config,
        profile=load_profile(config.profile),
        store=store,
        trust=load_truststore(truststore.read_bytes()),
        host=host,
        fetcher=fetcher,
        reporter=recorder,
    )
    updater.start()
    return Device(config, updater, host, store, recorder, fetcher)


def _apply_inprocess(work: Path, keys: Any, v1: Path, v2: Path, run: int) -> dict[str, float]:
    from tests.agent.agent_helpers import directive_for

    device = _device(work, keys, [v1, v2], initial=v1, probation_s=0.0, name=f"apply{run}")
    start = time.time()
    device.process(directive_for(v2, keys, sequence=1, version="2.0.0"))
    end = time.time()
    assert device.updater.record.state == "committed", device.recorder.kinds()
    ts = {
        s: _events_ts(device.recorder, "state", s)
        for s in (
            "downloading",
            "verifying",
            "installing",
            "checking",
            "activating",
            "probation",
            "committed",
        )
    }
    device.host.close()
    return {
        "total_s": end - start,
        "copy_to_downloads_s": ts["verifying"] - ts["downloading"],
        "verify_s": ts["installing"] - ts["verifying"],
        "install_s": ts["checking"] - ts["installing"],
        "health_check_s": ts["activating"] - ts["checking"],
        "activate_s": ts["probation"] - ts["activating"],
        "commit_s": ts["committed"] - ts["probation"],
    }


def _rollback(work: Path, keys: Any, v1: Path, bad: Path, run: int) -> dict[str, float]:
    from tests.agent.agent_helpers import INPUT, directive_for, sample_inputs

    device = _device(work, keys, [v1, bad], initial=v1, probation_s=0.5, name=f"rollback{run}")
    done = threading.Event()
    batch = np.concatenate(sample_inputs(2))

    def traffic() -> None:
        while not done.is_set():
            # Failures are the point: the host counts them for the probation judge.
            with contextlib.suppress(Exception):
                device.host.infer({INPUT: batch})
            time.sleep(0.002)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        device.process(directive_for(bad, keys, sequence=1, version="3.0.3"))
    finally:
        done.set()
        thread.join()
    assert device.updater.record.state == "rolled_back", device.recorder.kinds()
    entered = _events_ts(device.recorder, "state", "rolled_back")
    finished = _events_ts(device.recorder, "rolled_back")
    probation = _events_ts(device.recorder, "state", "probation")
    device.host.close()
    return {
        "rollback_s": finished - entered,
        "probation_start_to_old_model_s": finished - probation,
    }


def _apply_mqtt(work: Path, keys: Any, v1: Path, v2: Path, run: int) -> dict[str, float]:
    from edgekit.agent.config import load_config
    from edgekit.agent.daemon import Agent

    from edgekit.mosquitto import MosquittoBroker
    from tests.agent.agent_helpers import Watcher, directive_for, write_config, write_truststore

    root = work / f"mqtt{run}"
    root.mkdir()
    broker = MosquittoBroker(root / "mosquitto").start()
    watcher = Watcher(broker.url, client_id=f"bench-{run}")
    config = write_config(
        root / "agent.toml",
        data_dir=root / "data",
        truststore=write_truststore(keys, root / "truststore.json"),
        broker_url=broker.url,
        initial_bundle=v1,
        probation_s=0.0,
        max_latency_ms=1000.0,
    )
    agent = Agent(load_config(config, environ={}))
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert agent.session.wait_connected(30)
        publish_start = time.monotonic()
        watcher.publish_bundle(v2, chunk_size=128 * 1024)
        publish_s = time.monotonic() - publish_start
        start = time.monotonic()
        watcher.publish_directive(directive_for(v2, keys, sequence=1, version="2.0.0"))
        watcher.wait_status(
            lambda s: s.state == "committed" and s.last_sequence >= 1, timeout=300, what="committed"
        )
        return {"directive_to_committed_s": time.monotonic() - start, "publish_chunks_s": publish_s}
    finally:
        stop.set()
        thread.join(timeout=30)
        watcher.close()
        broker.stop()


def measure(repeat: int = 3) -> dict[str, Any]:
    """Update-apply and rollback timings (the contract `benchmarks/agent.py` relies on)."""
    from tests.agent.agent_helpers import batch1_model, make_bundle, make_keys

    keys = make_keys()
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-update-") as name:
        work = Path(name)
        (work / "b").mkdir()
        v1 = make_bundle(work / "b", keys, version="1.0.0", model=lambda p: _big_model(p, seed=1))
        v2 = make_bundle(work / "b", keys, version="2.0.0", model=lambda p: _big_model(p, seed=2))
        bad = make_bundle(
            work / "b", keys, version="3.0.3", model=lambda p: batch1_model(p, seed=3)
        )
        rows: dict[str, list[dict[str, float]]] = {
            "apply_inprocess": [],
            "apply_mqtt": [],
            "rollback": [],
        }
        for run in range(repeat):
            rows["apply_inprocess"].append(_apply_inprocess(work, keys, v1, v2, run))
            rows["rollback"].append(_rollback(work, keys, v1, bad, run))
            rows["apply_mqtt"].append(_apply_mqtt(work, keys, v1, v2, run))
        result: dict[str, Any] = {
            "bundle_bytes": v2.stat().st_size,
            "repeat": repeat,
        }
        for section, runs in rows.items():
            result[section] = {
                key: round(statistics.median(r[key] for r in runs), 4) for key in runs[0]
            }
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    document = {
        "benchmark": "agent_update",
        "update": measure(args.repeat),
        "machine": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
    }
    text = json.dumps(document, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
