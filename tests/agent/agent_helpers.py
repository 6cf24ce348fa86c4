"""Helpers for the agent tests: tiny ONNX models, bundles, directives, configs, a broker client.

Tests may import onnx and onnxruntime (to build models and golden samples); the agent may not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgekit.bundle import BundleInput, build_bundle, hash_file
from edgekit.messages import Event, Status
from edgekit.mqtt import BrokerSettings, Message, MqttClient
from edgekit.topics import Topics
from edgekit.transfer import publish_bundle
from edgekit.trust import (
    BundleRef,
    BundleSource,
    Signer,
    build_directive,
    create_truststore,
    sign_directive,
    sign_truststore,
)
from tests import tls_helpers

FLEET = "lab"
DEVICE = "dev-1"
PROFILE = "x86-64"
INPUT = "x"
OUTPUT = "y"
FEATURES = 8
CLASSES = 4
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Keys:
    root: Signer
    bundles: Signer
    directives: Signer
    outsider: Signer


def make_keys() -> Keys:
    return Keys(Signer.generate(), Signer.generate(), Signer.generate(), Signer.generate())


def write_truststore(keys: Keys, path: Path) -> Path:
    store = create_truststore(
        root_keys=[keys.root.public_key],
        bundles_keys=[keys.bundles.public_key],
        directives_keys=[keys.directives.public_key],
    )
    path.write_bytes(sign_truststore(store, [keys.root]))
    return path


# -- models ------------------------------------------------------------------------------------


def save_onnx(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def linear_model(path: Path, *, seed: int, nan: bool = False, batch: str | int = "N") -> Path:
    """y = softmax(x @ W + b): a few hundred bytes; `nan` puts a NaN in b."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(FEATURES, CLASSES)).astype(np.float32)
    bias = rng.normal(size=(CLASSES,)).astype(np.float32)
    if nan:
        bias[0] = np.nan
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [INPUT, "W"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], [OUTPUT], axis=-1),
        ],
        "linear",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [batch, FEATURES])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [batch, CLASSES])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    return save_onnx(graph, path)


def slow_model(path: Path, *, seed: int, size: int = 1536) -> Path:
    """The linear model plus a size x size MatMul built from the input at run time (so it
    cannot be folded away): a few KB on disk, tens to hundreds of ms per call."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(FEATURES, CLASSES)).astype(np.float32)
    bias = rng.normal(size=(CLASSES,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", [INPUT], ["s"], keepdims=0),
            helper.make_node("Expand", ["s", "big_shape"], ["big"]),
            helper.make_node("MatMul", ["big", "big"], ["big2"]),
            helper.make_node("MatMul", ["big2", "big"], ["big3"]),
            helper.make_node("ReduceSum", ["big3"], ["t"], keepdims=0),
            helper.make_node("Mul", ["t", "zero"], ["t0"]),
            helper.make_node("MatMul", [INPUT, "W"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["h2"]),
            helper.make_node("Add", ["h2", "t0"], ["logits"]),
            helper.make_node("Softmax", ["logits"], [OUTPUT], axis=-1),
        ],
        "slow",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", CLASSES])],
        initializer=[
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(np.array([size, size], dtype=np.int64), "big_shape"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ],
    )
    return save_onnx(graph, path)


def batch1_model(path: Path, *, seed: int) -> Path:
    """Passes its batch-1 golden samples but fails at run time on any other batch size."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(FEATURES, CLASSES)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", [INPUT, "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], [OUTPUT], axis=-1),
        ],
        "batch1",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [1, CLASSES])],
        initializer=[
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(np.array([1, FEATURES], dtype=np.int64), "shape"),
        ],
    )
    return save_onnx(graph, path)


def sample_inputs(count: int = 8, *, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(1, FEATURES)).astype(np.float32) for _ in range(count)]


def run_model(model: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {INPUT: x})[0])


def write_golden(
    path: Path, model: Path, *, perturb: float = 0.0, golden_from: Path | None = None
) -> Path:
    """golden.npz as the converter writes it; outputs from `golden_from` (default: the model)."""
    source = golden_from or model
    arrays: dict[str, Any] = {}
    for index, x in enumerate(sample_inputs()):
        arrays[f"inputs/{index}/{INPUT}"] = x
        arrays[f"outputs/{index}/{OUTPUT}"] = run_model(source, x) + np.float32(perturb)
    arrays["tolerance"] = np.array(
        json.dumps({"rtol": 0.01, "atol": 0.01, "min_cosine": 0.999, "min_top1_agreement": 1.0})
    )
    np.savez_compressed(path, **arrays)
    return path


def make_bundle(
    workdir: Path,
    keys: Keys,
    *,
    version: str,
    model: Callable[[Path], Path],
    golden_from: Callable[[Path], Path] | None = None,
    perturb: float = 0.0,
    profile: str = PROFILE,
    security_epoch: int = 0,
    signer: Signer | None = None,
    padding_bytes: int = 0,
) -> Path:
    """A signed `.ekb` with model.onnx, golden.npz, reference_stats.json and report.json."""
    source = workdir / f"src-{version}"
    source.mkdir(parents=True, exist_ok=True)
    model_path = model(source / "model.onnx")
    reference = None
    if golden_from is not None:
        reference = golden_from(source / "reference.onnx")
    write_golden(source / "golden.npz", model_path, perturb=perturb, golden_from=reference)
    values = np.concatenate([x.ravel() for x in sample_inputs()])
    edges = np.unique(np.quantile(values, np.linspace(0, 1, 11)))
    counts, _ = np.histogram(values, bins=edges)
    (source / "reference_stats.json").write_text(
        json.dumps(
            {
                "schema": "edgekit.reference_stats/v1",
                "inputs": {
                    INPUT: {
                        "dtype": "float32",
                        "bin_edges": edges.tolist(),
                        "bin_fractions": (counts / counts.sum()).tolist(),
                        "mean": float(values.mean()),
                        "std": float(values.std()),
                    }
                },
            }
        )
    )
    (source / "report.json").write_text(json.dumps({"profile": profile, "version": version}))
    inputs = [
        BundleInput("golden.npz", source / "golden.npz", "golden"),
        BundleInput("model.onnx", model_path, "model"),
        BundleInput("reference_stats.json", source / "reference_stats.json", "reference_stats"),
        BundleInput("report.json", source / "report.json", "report"),
    ]
    if padding_bytes:
        (source / "padding.bin").write_bytes(os.urandom(padding_bytes))
        inputs.append(BundleInput("padding.bin", source / "padding.bin", "other"))
    return build_bundle(
        sorted(inputs, key=lambda i: i.path),
        out_path=workdir / f"demo-{version}-{profile}.ekb",
        name="demo",
        version=version,
        security_epoch=security_epoch,
        profile=profile,
        signers=[signer or keys.bundles],
        created=datetime(2025, 6, 1, tzinfo=timezone.utc),
    )


def bundle_of(
    workdir: Path,
    keys: Keys,
    *,
    version: str,
    model: Path,
    golden_inputs: list[dict[str, np.ndarray]],
    extra_files: dict[str, bytes] | None = None,
    signer: Signer | None = None,
) -> Path:
    """A signed `.ekb` of any ONNX model: golden outputs recorded by onnxruntime for
    `golden_inputs`, plus `extra_files` (role "other") under the names given."""
    source = workdir / f"src-{version}"
    source.mkdir(parents=True, exist_ok=True)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    arrays: dict[str, Any] = {}
    for index, feeds in enumerate(golden_inputs):
        for name, value in feeds.items():
            arrays[f"inputs/{index}/{name}"] = value
        for name, value in zip(names, session.run(None, feeds), strict=True):
            arrays[f"outputs/{index}/{name}"] = value
    arrays["tolerance"] = np.array(json.dumps({"rtol": 0.01, "atol": 0.01}))
    np.savez_compressed(source / "golden.npz", **arrays)
    inputs = [
        BundleInput("golden.npz", source / "golden.npz", "golden"),
        BundleInput("model.onnx", model, "model"),
    ]
    for name, data in (extra_files or {}).items():
        (source / name).write_bytes(data)
        inputs.append(BundleInput(name, source / name, "other"))
    return build_bundle(
        sorted(inputs, key=lambda i: i.path),
        out_path=workdir / f"demo-{version}-{PROFILE}.ekb",
        name="demo",
        version=version,
        security_epoch=0,
        profile=PROFILE,
        signers=[signer or keys.bundles],
        created=datetime(2025, 6, 1, tzinfo=timezone.utc),
    )


def directive_for(
    bundle: Path,
    keys: Keys,
    *,
    sequence: int,
    version: str,
    device: str = DEVICE,
    fleet: str = FLEET,
    signer: Signer | None = None,
    min_security_epoch: int = 0,
    issued_at: datetime | None = None,
    ttl_s: float = 3600,
    https_url: str | None = None,
) -> bytes:
    size, sha = hash_file(bundle)
    sources = [BundleSource("mqtt", Topics(fleet).bundle_prefix(sha))]
    if https_url is not None:
        sources = [BundleSource("https", https_url)]
    directive = build_directive(
        fleet=fleet,
        device=device,
        rollout_id=f"r{sequence}",
        sequence=sequence,
        bundle=BundleRef(sha, size, "demo", version, tuple(sources)),
        min_security_epoch=min_security_epoch,
        issued_at=issued_at or datetime.now(timezone.utc).replace(microsecond=0),
        ttl_s=ttl_s,
    )
    return sign_directive(directive, [signer or keys.directives])


def sha_of(bundle: Path) -> str:
    return hash_file(bundle)[1]


# -- config ------------------------------------------------------------------------------------


def write_config(
    path: Path,
    *,
    data_dir: Path,
    truststore: Path,
    broker_url: str = "mqtt://127.0.0.1:1",
    initial_bundle: Path | None = None,
    probation_s: float = 0.5,
    telemetry_interval_s: float = 30.0,
    max_latency_ms: float = 30.0,
    extra_update: str = "",
    profile: str = PROFILE,
    extra_tables: str = "",
) -> Path:
    lines = [
        f'device_id = "{DEVICE}"',
        f'fleet = "{FLEET}"',
        f'profile = "{profile}"',
        'group = "bench"',
        f'truststore = "{truststore}"',
        f'data_dir = "{data_dir}"',
        'inference_address = "127.0.0.1:0"',
        'log_level = "INFO"',
    ]
    if initial_bundle is not None:
        lines.append(f'initial_bundle = "{initial_bundle}"')
    lines += [
        "[tags]",
        'site = "lab"',
        "[mqtt]",
        f'url = "{broker_url}"',
        "reconnect_min_s = 0.1",
        "reconnect_max_s = 1.0",
        "keepalive_s = 5",
        "[budgets]",
        f"max_latency_ms = {max_latency_ms}",
        "[update]",
        f"probation_s = {probation_s}",
        "max_latency_regression = 1000.0",
        "latency_runs = 10",
        "threads = 1",
        extra_update,
        "[telemetry]",
        f"interval_s = {telemetry_interval_s}",
        extra_tables,
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def agent_config(
    root: Path,
    keys: Keys,
    *,
    broker_url: str,
    initial_bundle: Path | None,
    probation_s: float = 0.5,
    truststore: Path | None = None,
    **options: Any,
) -> tuple[Path, Path]:
    """`root/agent.toml` for a real agent on `broker_url` (a fresh trust store unless given)
    and its data directory `root/data`."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    config = write_config(
        root / "agent.toml",
        data_dir=data,
        truststore=truststore or write_truststore(keys, root / "truststore.json"),
        broker_url=broker_url,
        initial_bundle=initial_bundle,
        probation_s=probation_s,
        **options,
    )
    return config, data


# -- broker side -------------------------------------------------------------------------------


@dataclass
class Watcher:
    """A test's MQTT client: publishes directives and bundles, records status and events."""

    url: str
    client_id: str = "test-watcher"
    statuses: list[Status] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    telemetry: list[dict[str, Any]] = field(default_factory=list)
    persistent: bool = False

    def __post_init__(self) -> None:
        self.topics = Topics(FLEET)
        self.lock = threading.Condition()
        settings = BrokerSettings(
            self.url,
            reconnect_min_s=0.1,
            reconnect_max_s=0.5,
            session_expiry_s=600 if self.persistent else 0,
        )
        name = (
            self.client_id if self.client_id.startswith("edgekit-") else f"edgekit-{self.client_id}"
        )
        self.client = MqttClient(settings, client_id=name, clean_start=not self.persistent)
        filters = [
            self.topics.status(DEVICE),
            self.topics.events(DEVICE),
            self.topics.telemetry(DEVICE),
        ]
        self.client.subscribe(filters, self._on_message)
        self.client.connect(timeout_s=10)

    def follow(self, topic_filter: str) -> None:
        """Record the status, events and telemetry of `topic_filter` too (e.g. every device)."""
        self.client.subscribe(topic_filter, self._on_message, wait_s=10)

    def _on_message(self, message: Message) -> None:
        with self.lock:
            if not message.payload:
                return
            leaf = message.topic.rsplit("/", 1)[1]
            if leaf == "status":
                self.statuses.append(Status.from_json(message.payload))
            elif leaf == "events":
                self.events.append(Event.from_json(message.payload))
            elif leaf == "telemetry":
                self.telemetry.append(json.loads(message.payload))
            self.lock.notify_all()

    def wait(self, predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out waiting for {what}; last status: "
                        f"{self.statuses[-1] if self.statuses else None}; events: "
                        f"{[(e.kind, e.state, e.reason) for e in self.events[-12:]]}"
                    )
                self.lock.wait(min(remaining, 0.2))

    def wait_status(
        self, predicate: Callable[[Status], bool], *, timeout: float = 60, what: str = "status"
    ) -> Status:
        self.wait(
            lambda: bool(self.statuses) and predicate(self.statuses[-1]), timeout=timeout, what=what
        )
        return self.statuses[-1]

    def publish_bundle(self, bundle: Path, *, chunk_size: int = 4096) -> None:
        publish_bundle(self.client, self.topics, bundle, chunk_size=chunk_size)

    def publish_directive(self, envelope: bytes) -> None:
        assert self.client.publish(self.topics.desired(DEVICE), envelope, qos=1, retain=True).wait(
            10
        )

    def close(self) -> None:
        self.client.stop()


# -- agent subprocess --------------------------------------------------------------------------


class AgentProcess:
    """`python -m edgekit.cli.agent run --config FILE` as a real process."""

    def __init__(
        self,
        config: Path,
        data_dir: Path,
        *,
        env: dict[str, str] | None = None,
        python: list[str] | None = None,
    ) -> None:
        self.config = config
        self.data_dir = data_dir
        self.log = data_dir.parent / f"agent-{time.monotonic_ns()}.log"
        environment = dict(os.environ)
        environment.pop("EDGEKIT_AGENT_CRASH_AT", None)
        environment.update(env or {})
        # `python`: another interpreter command (e.g. an emulated aarch64 one).
        self.process = subprocess.Popen(
            [
                *(python or [sys.executable]),
                "-m",
                "edgekit.cli.agent",
                "run",
                "--config",
                str(config),
            ],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=REPO,
        )

    def url(self, timeout: float = 30.0) -> str:
        """The inference URL this process wrote to agent.json."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.data_dir / "agent.json"
            if info.exists():
                document = json.loads(info.read_text())
                if document.get("pid") == self.process.pid:
                    return str(document["inference_url"])
            if self.process.poll() is not None:
                raise AssertionError(f"agent exited {self.process.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"agent did not start:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


def infer(url: str, x: np.ndarray, *, timeout: float = 10) -> np.ndarray:
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": INPUT,
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    ).encode()
    request = urllib.request.Request(
        f"{url}/v2/models/model/infer", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        document = json.loads(response.read())
    output = document["outputs"][0]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


class Hammer:
    """Sends inference requests in a loop from a thread; counts successes and failures."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        x = sample_inputs(1, seed=7)[0]
        while not self._stop.is_set():
            try:
                y = infer(self.url, x)
                if y.shape != (1, CLASSES):
                    self.failures.append(f"shape {y.shape}")
                else:
                    self.ok += 1
            except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
                self.failures.append(repr(e))
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def expired_issue_time() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=3)


# -- TLS ---------------------------------------------------------------------------------------


make_tls_files = tls_helpers.make_tls_files
