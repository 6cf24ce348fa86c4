"""The Open Inference Protocol v2 REST server against real onnxruntime models."""

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
from edgekit.agent.oip import InferenceLimits, InferenceServer, InferenceServerError
from edgekit.agent.serving import ModelHost
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgekit.messages import BundleId
from edgekit.runtimes import OnnxRuntimeBackend

from .serving_helpers import (
    linear_expected,
    linear_model,
    reshape_model,
    two_input_model,
    uint8_model,
)

SHA = "c" * 64


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("oip-models")
    return {
        "a": linear_model(folder / "a.onnx", scale=1.0),
        "b": linear_model(folder / "b.onnx", scale=2.0),
        "two": two_input_model(folder / "two.onnx"),
        "uint8": uint8_model(folder / "uint8.onnx"),
        "reshape": reshape_model(folder / "reshape.onnx"),
    }


def _serve(model: Path | None, **options: Any) -> tuple[ModelHost, InferenceServer]:
    host = ModelHost("m")
    if model is not None:
        host.activate(OnnxRuntimeBackend(model), BundleId("demo", "1.0.0", SHA))
    server = InferenceServer(host, **options)
    server.start()
    return host, server


@pytest.fixture
def linear(models: dict[str, Path]) -> Iterator[tuple[ModelHost, InferenceServer]]:
    host, server = _serve(models["a"])
    yield host, server
    server.stop()


def _call(
    server: InferenceServer,
    method: str,
    path: str,
    body: Any = None,
    *,
    connection: http.client.HTTPConnection | None = None,
) -> tuple[int, dict[str, Any]]:
    conn = connection or http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if payload is not None else {}
    conn.request(method, path, body=payload, headers=headers)
    response = conn.getresponse()
    document = json.loads(response.read())
    if connection is None:
        conn.close()
    return response.status, document


def _infer_body(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ],
        **extra,
    }


def test_server_metadata_and_health(linear: tuple[ModelHost, InferenceServer]) -> None:
    _, server = linear
    assert server.url == f"http://127.0.0.1:{server.port}"
    status, document = _call(server, "GET", "/v2")
    assert status == 200 and document["name"] == "edgekit-agent"
    assert _call(server, "GET", "/v2/health/live") == (200, {"live": True})
    assert _call(server, "GET", "/v2/health/ready") == (200, {"ready": True})
    assert _call(server, "GET", "/v2/models/m/ready") == (200, {"name": "m", "ready": True})
    status, metadata = _call(server, "GET", "/v2/models/m")
    assert status == 200
    assert metadata == {
        "name": "m",
        "versions": ["1.0.0"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    }
    assert _call(server, "GET", "/v2/models/m/versions/1.0.0")[0] == 200
    status, document = _call(server, "GET", "/v2/models/m/versions/9.9.9")
    assert status == 404 and "active version is '1.0.0'" in document["error"]


def test_not_ready_before_a_model_is_active() -> None:
    _host, server = _serve(None)
    try:
        assert _call(server, "GET", "/v2/health/live") == (200, {"live": True})
        status, document = _call(server, "GET", "/v2/health/ready")
        assert status == 503 and "no model" in document["error"]
        assert _call(server, "GET", "/v2/models/m")[0] == 503
        assert _call(server, "GET", "/v2/models/m/ready")[0] == 503
        status, document = _call(server, "POST", "/v2/models/m/infer", _infer_body(np.ones((1, 4))))
        assert status == 503 and "not ready" in document["error"]
    finally:
        server.stop()


def test_unknown_model_path_and_method(linear: tuple[ModelHost, InferenceServer]) -> None:
    _, server = linear
    status, document = _call(server, "GET", "/v2/models/other")
    assert status == 404 and "unknown model 'other'" in document["error"]
    assert _call(server, "POST", "/v2/models/other/infer", _infer_body(np.ones((1, 4))))[0] == 404
    assert _call(server, "GET", "/v1/models")[0] == 404
    assert _call(server, "GET", "/v2/models/m/explain")[0] == 404
    status, document = _call(server, "GET", "/v2/models/m/infer")
    assert status == 405 and "use POST" in document["error"]
    assert _call(server, "DELETE", "/v2/health/live")[0] == 405


def test_infer_flat_and_nested_data(linear: tuple[ModelHost, InferenceServer]) -> None:
    host, server = linear
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    status, document = _call(server, "POST", "/v2/models/m/infer", _infer_body(x, id="req-7"))
    assert status == 200
    assert document["model_name"] == "m" and document["model_version"] == "1.0.0"
    assert document["id"] == "req-7"
    [output] = document["outputs"]
    assert output["name"] == "y" and output["datatype"] == "FP32" and output["shape"] == [3, 3]
    np.testing.assert_allclose(
        np.array(output["data"]).reshape(3, 3), linear_expected(x), rtol=1e-5
    )
    nested = {"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": x.tolist()}]}
    status, document = _call(server, "POST", "/v2/models/m/versions/1.0.0/infer", nested)
    assert status == 200 and "id" not in document
    np.testing.assert_allclose(
        np.array(document["outputs"][0]["data"]).reshape(3, 3), linear_expected(x), rtol=1e-5
    )
    assert host.stats.snapshot().requests == 2


def test_outputs_filter_and_integer_inputs(models: dict[str, Path]) -> None:
    _, server = _serve(models["two"])
    try:
        body: dict[str, Any] = {
            "inputs": [
                {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                {"name": "b", "shape": [1, 1], "datatype": "INT64", "data": [10]},
            ],
            "outputs": [{"name": "doubled"}],
        }
        status, document = _call(server, "POST", "/v2/models/m/infer", body)
        assert status == 200
        assert [o["name"] for o in document["outputs"]] == ["doubled"]
        assert document["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0]
        body["outputs"] = [{"name": "nope"}]
        status, document = _call(server, "POST", "/v2/models/m/infer", body)
        assert status == 400 and "unknown output 'nope'" in document["error"]
        del body["outputs"]
        body["inputs"][1]["datatype"] = "FP32"
        status, document = _call(server, "POST", "/v2/models/m/infer", body)
        assert (
            status == 400
            and "input 'b' has dtype float32; the model expects int64" in (document["error"])
        )
    finally:
        server.stop()

    _, server = _serve(models["uint8"])
    try:
        data = [0, 1, 2, 3, 4, 5, 6, 255]
        body = {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "UINT8", "data": data}]}
        status, document = _call(server, "POST", "/v2/models/m/infer", body)
        assert status == 200
        np.testing.assert_allclose(document["outputs"][0]["data"], np.array(data) / 255, rtol=1e-6)
        status, metadata = _call(server, "GET", "/v2/models/m")
        assert metadata["inputs"] == [{"name": "x", "datatype": "UINT8", "shape": [1, 8]}]
        body["inputs"][0]["data"] = [*data[:7], 256]
        status, document = _call(server, "POST", "/v2/models/m/infer", body)
        assert status == 400 and "outside UINT8's range" in document["error"]
    finally:
        server.stop()


def _x_entry(**changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    entry.update(changes)
    return {"inputs": [entry]}


MALFORMED: list[tuple[str, Any, str]] = [
    ("bad json", b"{not json", "not valid JSON"),
    ("not utf-8", b"\xff\xfe{", "not valid JSON"),
    ("array body", b"[]", "must be a JSON object"),
    ("deep nesting", b'{"inputs": ' + b"[" * 100000 + b"]" * 100000 + b"}", "not valid JSON"),
    ("no inputs", {}, "'inputs' must be a non-empty list"),
    ("empty inputs", {"inputs": []}, "'inputs' must be a non-empty list"),
    ("input not object", {"inputs": [3]}, "inputs[0] must be an object"),
    ("no name", {"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}, "'name'"),
    ("unknown input", _x_entry(name="z"), "missing input 'x' (found unknown 'z')"),
    (
        "extra input",
        {"inputs": [*_x_entry()["inputs"], {**_x_entry()["inputs"][0], "name": "z"}]},
        "unknown input 'z'",
    ),
    (
        "duplicate input",
        {"inputs": [*_x_entry()["inputs"], *_x_entry()["inputs"]]},
        "input 'x' is given twice",
    ),
    ("count mismatch", _x_entry(shape=[2, 4]), "shape [2, 4] needs 8 values; data holds 4"),
    ("negative shape", _x_entry(shape=[-1, 4]), "'shape' must be a list of non-negative"),
    ("shape not list", _x_entry(shape="1,4"), "'shape' must be a list"),
    ("rank mismatch", _x_entry(shape=[4]), "input 'x' has rank 1"),
    ("dimension mismatch", _x_entry(shape=[2, 2]), "axis 1 must be 4"),
    ("unknown datatype", _x_entry(datatype="FLOAT"), "unknown datatype 'FLOAT'"),
    ("bytes datatype", _x_entry(datatype="BYTES"), "unknown datatype 'BYTES'"),
    ("strings as data", _x_entry(data=["a", "b", "c", "d"]), "data holds strings"),
    ("floats for ints", _x_entry(datatype="INT32", data=[1.5, 2, 3, 4]), "non-integer"),
    ("bools for floats", _x_entry(data=[True, False, True, True]), "booleans"),
    ("ragged data", _x_entry(data=[[1, 2], [3]]), "not a flat or rectangular"),
    ("missing data", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32"}]}, "'data'"),
    ("id not string", _x_entry() | {"id": 5}, "'id' must be a string"),
    ("outputs not list", _x_entry() | {"outputs": "y"}, "'outputs' must be a list"),
    ("output not object", _x_entry() | {"outputs": ["y"]}, "outputs[0] must be an object"),
]


@pytest.mark.parametrize(
    ("body", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_requests_get_400_naming_the_problem(
    linear: tuple[ModelHost, InferenceServer], body: Any, message: str
) -> None:
    _, server = linear
    status, document = _call(server, "POST", "/v2/models/m/infer", body)
    assert status == 400, document
    assert message in document["error"]


def test_runtime_failure_is_500(models: dict[str, Path]) -> None:
    host, server = _serve(models["reshape"])
    try:
        status, document = _call(server, "POST", "/v2/models/m/infer", _x_entry())
        assert status == 500 and "failed" in document["error"]
        assert host.since_activation().errors == 1
    finally:
        server.stop()


def test_body_size_limit_and_length_required(models: dict[str, Path]) -> None:
    _, server = _serve(models["a"], limits=InferenceLimits(max_body_bytes=1000))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/v2/models/m/infer", body=b" " * 5000)
        response = conn.getresponse()
        assert response.status == 413
        assert response.getheader("Connection") == "close"
        assert "exceeds this device's limit of 1000 bytes" in json.loads(response.read())["error"]
        conn.close()

        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            raw.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = raw.recv(4096)
        assert reply.startswith(b"HTTP/1.1 411") and b"Content-Length" in reply
    finally:
        server.stop()


def test_connections_are_kept_alive(linear: tuple[ModelHost, InferenceServer]) -> None:
    _, server = linear
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    _call(server, "GET", "/v2/health/ready", connection=conn)
    sock = conn.sock
    assert sock is not None
    for _ in range(20):
        status, _document = _call(
            server, "POST", "/v2/models/m/infer", _infer_body(np.ones((1, 4))), connection=conn
        )
        assert status == 200
    # A 400 keeps the connection too (only 411/413 close it).
    assert _call(server, "POST", "/v2/models/m/infer", b"{", connection=conn)[0] == 400
    assert _call(server, "GET", "/v2/health/live", connection=conn)[0] == 200
    assert conn.sock is sock, "the server closed a keep-alive connection"
    conn.close()


def test_stop_closes_open_connections_and_the_port(models: dict[str, Path]) -> None:
    _, server = _serve(models["a"])
    port = server.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    assert _call(server, "GET", "/v2/health/live", connection=conn)[0] == 200
    server.stop()
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        conn.request("GET", "/v2/health/live")
        conn.getresponse()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with pytest.raises(InferenceServerError, match="not started"):
        _ = server.port


def test_port_in_use_is_a_clear_error(linear: tuple[ModelHost, InferenceServer]) -> None:
    host, server = linear
    other = InferenceServer(host, ("127.0.0.1", server.port))
    with pytest.raises(InferenceServerError, match=r"cannot listen on 127\.0\.0\.1"):
        other.start()


def test_hot_swap_under_rest_load(models: dict[str, Path]) -> None:
    """Clients hammer /infer over keep-alive connections while the model is swapped 20
    times: no request fails and every answer is the output of the version it names."""
    _hammer_while_swapping(models, clients=6, swaps=20)


@pytest.mark.slow
def test_hot_swap_soak(models: dict[str, Path]) -> None:
    _hammer_while_swapping(models, clients=12, swaps=300)


def _hammer_while_swapping(models: dict[str, Path], *, clients: int, swaps: int) -> None:
    host = ModelHost("m")
    host.activate(OnnxRuntimeBackend(models["a"]), BundleId("demo", "1.0.0", SHA))
    scales = {"1.0.0": 1.0, "2.0.0": 2.0}
    stop = threading.Event()
    failures: list[str] = []
    seen = {"1.0.0": 0, "2.0.0": 0}
    lock = threading.Lock()
    with InferenceServer(host) as server:

        def client(seed: int) -> None:
            x = np.random.default_rng(seed).normal(size=(2, 4)).astype(np.float32)
            expected = {v: linear_expected(x, scale=s) for v, s in scales.items()}
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            body = _infer_body(x)
            while not stop.is_set():
                try:
                    status, document = _call(
                        server, "POST", "/v2/models/m/infer", body, connection=conn
                    )
                except Exception as error:  # noqa: BLE001 - every failure is collected
                    failures.append(repr(error))
                    continue
                if status != 200:
                    failures.append(f"{status}: {document}")
                    continue
                version = document["model_version"]
                data = np.array(document["outputs"][0]["data"]).reshape(2, 3)
                if not np.allclose(data, expected[version], rtol=1e-5):
                    failures.append(f"version {version} answered with another model's output")
                with lock:
                    seen[version] += 1
            conn.close()

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
        for thread in threads:
            thread.start()
        try:
            for swap in range(swaps):
                version = "2.0.0" if swap % 2 == 0 else "1.0.0"
                path = models["b"] if swap % 2 == 0 else models["a"]
                host.activate(OnnxRuntimeBackend(path), BundleId("demo", version, SHA))
                stop.wait(0.02)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
    assert failures == []
    assert seen["1.0.0"] > 0 and seen["2.0.0"] > 0
    assert host.stats.snapshot().errors == 0


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from(["x", "z", 3]),
    shape=st.one_of(_json_values, st.lists(st.integers(-1, 5), max_size=3)),
    datatype=st.one_of(st.sampled_from(["FP32", "INT64", "UINT8", "BOOL", "FP16"]), _json_values),
    data=_json_values,
    extra=st.dictionaries(st.sampled_from(["id", "outputs", "parameters"]), _json_values),
)
def test_any_request_gets_a_json_answer_never_a_crash(
    linear: tuple[ModelHost, InferenceServer],
    name: Any,
    shape: Any,
    datatype: Any,
    data: Any,
    extra: dict[str, Any],
) -> None:
    _, server = linear
    body = {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}], **extra}
    try:
        payload = json.dumps(body).encode()
    except ValueError:
        return
    status, document = _call(server, "POST", "/v2/models/m/infer", payload)
    assert status in (200, 400), document
    if status == 400:
        assert isinstance(document["error"], str) and document["error"]
