"""Local inference is bounded: memory per request, concurrent inferences, connection threads,
a deadline per request; bad shapes are 400s, and every response is strict JSON."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgekit.agent.oip import (
    InferenceLimits,
    InferenceServer,
    RequestError,
    parse_infer_request,
)
from edgekit.agent.serving import ModelHost
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgekit.messages import BundleId
from edgekit.mosquitto import MosquittoBroker
from edgekit.runtimes import OnnxRuntimeBackend
from tests.agent.agent_helpers import AgentProcess, Keys, agent_config
from tests.agent.conftest import Bundles

from .serving_helpers import GatedRuntime, linear_model

SHA = "0" * 64


def _strict_json(data: bytes) -> Any:
    def refuse(token: str) -> None:
        raise ValueError(f"{token} is not JSON")

    return json.loads(data, parse_constant=refuse)


def _post(port: int, body: bytes, *, timeout: float = 60) -> tuple[int, Any, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v2/models/model/infer", body=body)
        response = conn.getresponse()
        data = response.read()
        return response.status, _strict_json(data), dict(response.getheaders())
    finally:
        conn.close()


def _tensor(shape: list[int], data: Any, name: str = "x") -> bytes:
    return json.dumps(
        {"inputs": [{"name": name, "shape": shape, "datatype": "FP32", "data": data}]},
        separators=(",", ":"),
    ).encode()


def _memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


@pytest.fixture
def agent(tmp_path: Path, agent_keys: Keys, bundles: Bundles) -> Iterator[tuple[AgentProcess, int]]:
    """The real agent serving the linear model (x: [N, 8] -> y: [N, 4]), with the limits
    derived from the default inference memory (x86-64 names no RAM budget)."""
    broker = MosquittoBroker(tmp_path / "mosquitto")
    broker.start()
    config, data = agent_config(
        tmp_path, agent_keys, broker_url=broker.url, initial_bundle=bundles.v1
    )
    process = AgentProcess(config, data)
    try:
        url = process.url()
        yield process, int(url.rsplit(":", 1)[1])
    finally:
        code = process.stop()
        broker.stop()
        assert code == 0, process.output()


def test_the_agent_bounds_what_one_request_may_cost(agent: tuple[AgentProcess, int]) -> None:
    process, port = agent
    status, document, _ = _post(port, _tensor([1, 8], [0.5] * 8))
    assert status == 200, document
    before = _memory_kib(process.process.pid)
    # The request: a 16 MiB body, a valid batch of a million rows. Refused unread:
    # the answer comes after the headers, without waiting for the body.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(
            b"POST /v2/models/model/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: %d\r\n\r\n" % (16 << 20)
        )
        reply = raw.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413") and b"Connection: close" in reply
    # Under the body limit but over the values a request may hold.
    rows = 400_000
    status, document, _ = _post(port, _tensor([rows, 8], [0] * (rows * 8)))
    assert status == 400 and "at most 2097152 per request" in document["error"], document
    # Shapes that answered 500 before: too many dimensions, and a huge dimension with a zero.
    status, document, _ = _post(port, _tensor([1] * 65, [0.5]))
    assert status == 400 and "at most 32 are allowed" in document["error"]
    status, document, _ = _post(port, _tensor([0, 10**30], []))
    assert status == 400 and "exceeds" in document["error"]
    after = _memory_kib(process.process.pid)
    # Peak resident memory grew by far less than the ~400 MB such a request used to cost.
    assert after["VmHWM"] - before["VmRSS"] < 160 * 1024, (before, after)
    # The agent still serves.
    assert _post(port, _tensor([2, 8], [0.25] * 16))[0] == 200


def test_non_finite_values_travel_as_strict_json(agent: tuple[AgentProcess, int]) -> None:
    _, port = agent
    status, document, _ = _post(port, _tensor([2, 8], ["NaN"] + [0.5] * 7 + ["Infinity"] * 8))
    assert status == 200, document
    [output] = document["outputs"]
    assert output["data"][:4] == ["NaN"] * 4  # softmax of NaN is NaN: sent as a string
    status, document, _ = _post(port, _tensor([1, 8], ["nan"] + [0.5] * 7))
    assert status == 400 and '"NaN"' in document["error"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return linear_model(tmp_path_factory.mktemp("bounds") / "linear.onnx")


def _serve(runtime: Any, limits: InferenceLimits) -> tuple[ModelHost, InferenceServer]:
    host = ModelHost("model")
    host.activate(runtime, BundleId("demo", "1.0.0", SHA))
    server = InferenceServer(host, limits=limits)
    server.start()
    return host, server


def test_busy_server_answers_503_with_retry_after(model: Path) -> None:
    gated = GatedRuntime(model)
    _, server = _serve(gated, InferenceLimits(max_concurrent=1, queue_wait_s=0.2))
    body = _tensor([1, 4], [0.5] * 4)
    first: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: first.update(result=_post(server.port, body)))
    try:
        worker.start()
        assert gated.entered.wait(10)
        status, document, headers = _post(server.port, body)
        assert status == 503 and "busy" in document["error"]
        assert headers.get("Retry-After") == "1"
    finally:
        gated.release.set()
        worker.join(30)
        server.stop()
    assert first["result"][0] == 200


def test_ten_concurrent_clients_wait_their_turn(model: Path) -> None:
    _, server = _serve(OnnxRuntimeBackend(model), InferenceLimits(max_concurrent=2))
    results: list[int] = []
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        for _ in range(20):
            conn.request("POST", "/v2/models/model/infer", body=_tensor([2, 4], [0.1] * 8))
            response = conn.getresponse()
            response.read()
            with lock:
                results.append(response.status)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(10)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        server.stop()
    assert results == [200] * 200


def test_connection_threads_are_bounded(model: Path) -> None:
    _, server = _serve(OnnxRuntimeBackend(model), InferenceLimits(max_connections=2))
    kept = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=10) for _ in range(2)]
    try:
        for conn in kept:  # two keep-alive connections hold both threads
            conn.request("GET", "/v2/health/live")
            assert conn.getresponse().read() == b'{"live":true}'
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as third:
            reply = third.recv(4096)
        assert reply.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in reply
        assert server.counters()["refused_connections"] == 1
    finally:
        for conn in kept:
            conn.close()
        server.stop()


@pytest.mark.parametrize("stalls_in", ["headers", "body"])
def test_a_request_has_a_deadline_from_its_first_byte(model: Path, stalls_in: str) -> None:
    _, server = _serve(OnnxRuntimeBackend(model), InferenceLimits(request_timeout_s=0.5))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
            raw.sendall(b"POST /v2/models/model/infer HTTP/1.1\r\nHost: x\r\n")
            if stalls_in == "body":
                raw.sendall(b"Content-Length: 100\r\n\r\n" + b"{" * 10)
            # Then nothing: the server ends the connection at the deadline, long before the
            # client's 30 s patience (a timeout here would raise).
            assert raw.recv(4096) == b""
        assert server.counters()["timed_out"] == 1
    finally:
        server.stop()


def test_the_response_is_bounded_too(model: Path) -> None:
    _, server = _serve(OnnxRuntimeBackend(model), InferenceLimits(max_response_elements=10))
    try:
        assert _post(server.port, _tensor([3, 4], [0.5] * 12))[0] == 200  # 9 values
        status, document, _ = _post(server.port, _tensor([4, 4], [0.5] * 16))  # 12
        assert status == 400 and "returns at most 10" in document["error"]
    finally:
        server.stop()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["name", "shape", "datatype", "data", "x"]), children)
    ),
    max_leaves=20,
)
_entries = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["x", "", 3]),
        "shape": st.lists(st.integers(-2, 10**12), max_size=70) | _json_values,
        "datatype": st.sampled_from(["FP32", "INT8", "BOOL", "FP16", "BYTES", "x"]),
        "data": _json_values | st.lists(st.sampled_from([1, 0.5, "NaN", "-Infinity", "z"])),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    request=st.fixed_dictionaries(
        {}, optional={"inputs": st.lists(_entries, max_size=3) | _json_values, "id": _json_values}
    )
    | _json_values,
    raw=st.binary(max_size=64),
)
def test_the_request_parser_is_total(request: Any, raw: bytes) -> None:
    limits = InferenceLimits(max_request_elements=1000)
    for body in (json.dumps(request).encode(), raw):
        try:
            parsed = parse_infer_request(body, limits=limits)
        except RequestError as error:
            assert error.status == 400 and error.message
        else:
            assert sum(array.size for array in parsed.feeds.values()) <= 1000
            assert all(isinstance(array, np.ndarray) for array in parsed.feeds.values())
