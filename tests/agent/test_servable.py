"""What passes the health check is servable: one input check for REST and the health check.

An exporter that names every unknown dimension `?` (here an image classifier with input
`x: [?, 3, ?, ?]`) must be activated and then served over REST, with its golden inputs and
with other valid shapes, by the real agent; and an existing OIP v2 client (tritonclient's
HTTP client) must run inference against it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from edgekit.agent.serving import ModelHost, constrains
from onnx import TensorProto, helper, numpy_helper

from edgekit.messages import BundleId
from edgekit.mosquitto import MosquittoBroker
from edgekit.runtimes import OnnxRuntimeBackend
from tests.agent.agent_helpers import (
    AgentProcess,
    Keys,
    Watcher,
    agent_config,
    bundle_of,
    directive_for,
    save_onnx,
    sha_of,
)
from tests.agent.conftest import Bundles

CLASSES = 5


def question_mark_model(path: Path) -> Path:
    """Global average pool over H and W, then a linear layer: `x: [?, 3, ?, ?] -> y: [?, 5]`,
    every unknown dimension named `?` as some exporters write them."""
    weights = np.random.default_rng(5).normal(size=(3, CLASSES)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["y"], axis=-1),
        ],
        "question_mark",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["?", 3, "?", "?"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["?", CLASSES])],
        initializer=[numpy_helper.from_array(weights, "W")],
    )
    return save_onnx(graph, path)


def _image(batch: int, height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(batch, 3, height, width)).astype(np.float32)


def _expected(model: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def _rest(url: str, x: np.ndarray) -> tuple[int, dict[str, object]]:
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                     "data": x.ravel().tolist()}]}
    ).encode()  # fmt: skip
    request = urllib.request.Request(f"{url}/v2/models/model/infer", data=body)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@dataclass
class Served:
    url: str
    model: Path
    golden: np.ndarray
    watcher: Watcher


@pytest.fixture
def served(tmp_path: Path, agent_keys: Keys, bundles: Bundles) -> Iterator[Served]:
    """The real agent, updated over a real Mosquitto to the `?`-dims model."""
    model = question_mark_model(tmp_path / "model.onnx")
    golden = _image(1, 48, 192, seed=1)  # the shape: H and W differ
    bundle = bundle_of(
        tmp_path, agent_keys, version="5.0.0", model=model, golden_inputs=[{"x": golden}]
    )
    broker = MosquittoBroker(tmp_path / "mosquitto")
    broker.start()
    watcher = Watcher(broker.url)
    config, data = agent_config(
        tmp_path, agent_keys, broker_url=broker.url, initial_bundle=bundles.v1
    )
    agent = AgentProcess(config, data)
    try:
        url = agent.url()
        watcher.publish_bundle(bundle)
        watcher.publish_directive(directive_for(bundle, agent_keys, sequence=1, version="5.0.0"))
        status = watcher.wait_status(
            lambda s: s.last_sequence >= 1 and s.state in ("committed", "rolled_back"),
            what="the update to the ?-dims model",
        )
        assert status.state == "committed", watcher.events[-6:]
        assert status.active is not None and status.active.sha256 == sha_of(bundle)
        yield Served(url, model, golden, watcher)
    finally:
        assert agent.stop() == 0, agent.output()
        watcher.close()
        broker.stop()


def test_question_mark_dims_are_served_with_golden_and_other_shapes(served: Served) -> None:
    with urllib.request.urlopen(f"{served.url}/v2/models/model", timeout=10) as response:
        metadata = json.loads(response.read())
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, -1, -1]}]
    for x in (served.golden, _image(2, 32, 32, seed=2), _image(3, 17, 5, seed=3)):
        status, document = _rest(served.url, x)
        assert status == 200, document
        [output] = document["outputs"]  # type: ignore[misc]
        assert output["shape"] == [x.shape[0], CLASSES]
        np.testing.assert_allclose(
            np.asarray(output["data"], np.float32).reshape(output["shape"]),
            _expected(served.model, x),
            rtol=1e-5,
        )
    status, document = _rest(served.url, _image(1, 48, 192, seed=4)[:, :2])
    assert status == 400 and "axis 1 must be 3" in str(document["error"])


def test_tritonclient_runs_inference_against_the_agent(served: Served) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=served.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("model")
        metadata = client.get_model_metadata("model")
        assert metadata["inputs"][0]["shape"] == [-1, 3, -1, -1]
        for x in (served.golden, _image(4, 24, 64, seed=9)):
            request = httpclient.InferInput("x", list(x.shape), "FP32")
            request.set_data_from_numpy(x, binary_data=False)
            wanted = httpclient.InferRequestedOutput("y", binary_data=False)
            result = client.infer("model", [request], outputs=[wanted], request_id="r-1")
            np.testing.assert_allclose(result.as_numpy("y"), _expected(served.model, x), rtol=1e-5)
            assert result.get_response()["model_version"] == "5.0.0"
            assert result.get_response()["id"] == "r-1"
    finally:
        client.close()


def test_unknown_markers_do_not_constrain_but_names_do(tmp_path: Path) -> None:
    assert not any(constrains(s) for s in ("?", "-1", "", None, "unk__7", "batch?", "N*"))
    assert all(constrains(s) for s in ("N", "batch", "height", "s0", "input_dynamic_axes_1"))
    # A genuinely shared symbol still binds across inputs.
    x = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4])
    out = helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "g", [x, y], [out])
    path = save_onnx(graph, tmp_path / "add.onnx")
    host = ModelHost("m")
    host.activate(OnnxRuntimeBackend(path), BundleId("add", "1.0.0", "0" * 64))
    ones = np.ones((2, 4), np.float32)
    assert host.infer({"a": ones, "b": ones})["c"].shape == (2, 4)
    with pytest.raises(Exception, match="dimension 'N' is 2 in input 'a' but 3 in input 'b'"):
        host.infer({"a": ones, "b": np.ones((3, 4), np.float32)})
