"""Open Inference Protocol v2 (KServe / Triton REST) over the agent's active model.

Endpoints (JSON in and out, HTTP/1.1 keep-alive, bound to 127.0.0.1 unless configured):

- `GET  /v2`                                   server metadata
- `GET  /v2/health/live`                       200 while the process runs
- `GET  /v2/health/ready`                      200 with an active model, else 503
- `GET  /v2/models/{name}[/versions/{v}]`      model metadata (inputs, outputs, datatypes)
- `GET  /v2/models/{name}[/versions/{v}]/ready`
- `POST /v2/models/{name}[/versions/{v}]/infer`

`{name}` is the host's serving name (stable across bundle versions, so clients keep their URL);
`versions` lists the active bundle version. Errors are `{"error": "..."}`: 400 for a malformed
request (the message names the problem), 404 for an unknown model, version or path, 405 for a
wrong method, 411 without Content-Length, 413 for a body over `max_body_bytes`, 500 when the
runtime fails, 503 when no model is active. The binary tensor extension is not supported.

Stdlib `ThreadingHTTPServer` (one thread per connection); no extra dependency on the device.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import sys
import threading
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import numpy.typing as npt

from edgekit.errors import EdgekitError, first_line

from .serving import (
    InferenceInputError,
    InferenceRuntimeError,
    ModelHost,
    NoModelError,
)

__all__ = [
    "DATATYPES",
    "DEFAULT_MAX_BODY_BYTES",
    "InferenceServer",
    "InferenceServerError",
    "datatype_of",
]

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
SERVER_NAME = "edgekit-agent"
PROTOCOL_VERSION = "2.0"

DATATYPES: Mapping[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
"""OIP datatype -> numpy dtype name."""
_NUMPY_TO_DATATYPE = {numpy_name: datatype for datatype, numpy_name in DATATYPES.items()}
_NUMPY_TO_DATATYPE["str"] = "BYTES"
_NUMPY_TO_DATATYPE["object"] = "BYTES"

_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "litert": "tensorflow_lite"}


class InferenceServerError(EdgekitError):
    """The inference server cannot start (address in use, not permitted)."""


def datatype_of(dtype: str) -> str:
    """The OIP datatype for a numpy dtype name (`float32` -> `FP32`)."""
    return _NUMPY_TO_DATATYPE.get(dtype, dtype.upper())


class _RequestError(Exception):
    """An HTTP error answer: status and message."""

    def __init__(self, status: HTTPStatus, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


def _shape_value(shape: tuple[int | str | None, ...]) -> list[int]:
    return [dim if isinstance(dim, int) and dim >= 0 else -1 for dim in shape]


def _parse_tensor(entry: object, index: int) -> tuple[str, Array]:
    """One `inputs[index]` entry as (name, array), or a 400 naming the problem."""
    where = f"inputs[{index}]"
    if not isinstance(entry, dict):
        raise _RequestError(
            HTTPStatus.BAD_REQUEST,
            f"{where} must be an object with name, shape, datatype and data",
        )
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise _RequestError(HTTPStatus.BAD_REQUEST, f"{where}: 'name' must be a non-empty string")
    where = f"input {name!r}"
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
    ):
        raise _RequestError(
            HTTPStatus.BAD_REQUEST,
            f"{where}: 'shape' must be a list of non-negative integers; found {shape!r:.80}",
        )
    datatype = entry.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        supported = ", ".join(DATATYPES)
        raise _RequestError(
            HTTPStatus.BAD_REQUEST,
            f"{where}: unknown datatype {datatype!r:.40}; expected one of {supported}",
        )
    if "data" not in entry:
        raise _RequestError(HTTPStatus.BAD_REQUEST, f"{where}: 'data' is missing")
    dtype = np.dtype(DATATYPES[datatype])
    array = _data_array(entry["data"], dtype, datatype=datatype, where=where)
    expected = math.prod(shape)
    if array.size != expected:
        raise _RequestError(
            HTTPStatus.BAD_REQUEST,
            f"{where}: shape {shape} needs {expected} values; data holds {array.size}",
        )
    return name, array.reshape(shape)


def _data_array(data: object, dtype: np.dtype[Any], *, datatype: str, where: str) -> Array:
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError) as error:
        raise _RequestError(
            HTTPStatus.BAD_REQUEST,
            f"{where}: 'data' is not a flat or rectangular nested list: {first_line(error)}",
        ) from None
    if raw.size == 0:
        return np.zeros(0, dtype=dtype)
    kind = raw.dtype.kind
    if kind not in "biuf" or (kind == "b") != (dtype.kind == "b"):
        found = {"U": "strings", "S": "strings", "O": "mixed or huge values"}.get(
            kind, raw.dtype.name
        )
        if kind == "b" or dtype.kind == "b":
            found = "booleans" if kind == "b" else "numbers"
        raise _RequestError(
            HTTPStatus.BAD_REQUEST,
            f"{where}: data holds {found}, which is not {datatype}",
        )
    if dtype.kind in "iu":
        if kind == "f":
            raise _RequestError(
                HTTPStatus.BAD_REQUEST,
                f"{where}: data holds non-integer numbers, which is not {datatype}",
            )
        info = np.iinfo(dtype)
        low, high = int(raw.min()), int(raw.max())
        if low < info.min or high > info.max:
            raise _RequestError(
                HTTPStatus.BAD_REQUEST,
                f"{where}: data holds values in [{low}, {high}], outside {datatype}'s range",
            )
    return raw.astype(dtype, copy=False)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], host: ModelHost, *, max_body_bytes: int, idle_s: float
    ) -> None:
        self.host = host
        self.max_body_bytes = max_body_bytes
        self.idle_s = idle_s
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            log.debug("connection from %s ended: %s", client_address, error)
        else:
            log.error("inference request from %s failed", client_address, exc_info=True)

    def close_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = SERVER_NAME
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.idle_s)  # idle keep-alive connections end

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - " + format, self.client_address[0], *args)

    # -- dispatch ------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        try:
            body = self._read_body(required=method == "POST")
            status, document = self._route(method, body)
        except _RequestError as error:
            self._send(error.status, {"error": error.message}, close=error.close)
            return
        except Exception as error:  # a bug must answer 500, not drop the client
            log.exception("inference server failed on %s %s", method, self.path[:200])
            self._send(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                {"error": f"internal error: {type(error).__name__}: {first_line(error)}"},
            )
            return
        self._send(status, document)

    def _read_body(self, *, required: bool) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise _RequestError(
                HTTPStatus.LENGTH_REQUIRED,
                "chunked request bodies are not supported; send Content-Length",
                close=True,
            )
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            if required:
                raise _RequestError(
                    HTTPStatus.LENGTH_REQUIRED, "POST needs a Content-Length header"
                )
            return b""
        try:
            length = int(length_text)
            if length < 0:
                raise ValueError(length_text)
        except ValueError:
            raise _RequestError(
                HTTPStatus.BAD_REQUEST, f"bad Content-Length {length_text!r:.40}", close=True
            ) from None
        if length > self.server.max_body_bytes:
            # Not read: the connection closes instead of draining a huge body.
            raise _RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body of {length} bytes exceeds the limit of "
                f"{self.server.max_body_bytes} bytes",
                close=True,
            )
        body = self.rfile.read(length)
        if len(body) != length:
            raise _RequestError(
                HTTPStatus.BAD_REQUEST,
                f"request body ended after {len(body)} of {length} bytes",
                close=True,
            )
        return body

    def _route(self, method: str, body: bytes) -> tuple[HTTPStatus, dict[str, Any]]:
        parts = [unquote(part) for part in urlsplit(self.path).path.strip("/").split("/")]
        if not parts or parts[0] != "v2":
            raise _RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path[:200]!r}")
        rest = parts[1:]
        host = self.server.host
        if rest in ([], ["health", "live"], ["health", "ready"]):
            _require_method(method, "GET")
            if not rest:
                return HTTPStatus.OK, {
                    "name": SERVER_NAME,
                    "version": PROTOCOL_VERSION,
                    "extensions": [],
                }
            if rest[1] == "live":
                return HTTPStatus.OK, {"live": True}
            if host.ready:
                return HTTPStatus.OK, {"ready": True}
            raise _RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "no model is active yet")
        if len(rest) < 2 or rest[0] != "models":
            raise _RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path[:200]!r}")
        name, tail = rest[1], rest[2:]
        version: str | None = None
        if len(tail) >= 2 and tail[0] == "versions":
            version, tail = tail[1], tail[2:]
        if name != host.name:
            raise _RequestError(
                HTTPStatus.NOT_FOUND,
                f"unknown model {name[:100]!r}; this server serves {host.name!r}",
            )
        if tail == ["infer"]:
            _require_method(method, "POST")
            return HTTPStatus.OK, self._infer(body, version)
        if tail not in ([], ["ready"]):
            raise _RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path[:200]!r}")
        _require_method(method, "GET")
        info = host.info
        if info is None:
            raise _RequestError(
                HTTPStatus.SERVICE_UNAVAILABLE, f"model {host.name!r} is not ready: none active"
            )
        _check_version(version, info.version, host.name)
        if tail == ["ready"]:
            return HTTPStatus.OK, {"name": host.name, "ready": True}
        return HTTPStatus.OK, _metadata(host)

    def _infer(self, body: bytes, version: str | None) -> dict[str, Any]:
        host = self.server.host
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as error:
            raise _RequestError(
                HTTPStatus.BAD_REQUEST, f"request body is not valid JSON: {first_line(error)}"
            ) from None
        if not isinstance(request, dict):
            raise _RequestError(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
        entries = request.get("inputs")
        if not isinstance(entries, list) or not entries:
            raise _RequestError(
                HTTPStatus.BAD_REQUEST, "'inputs' must be a non-empty list of tensors"
            )
        feeds: dict[str, Array] = {}
        for index, entry in enumerate(entries):
            name, array = _parse_tensor(entry, index)
            if name in feeds:
                raise _RequestError(HTTPStatus.BAD_REQUEST, f"input {name!r} is given twice")
            feeds[name] = array
        wanted = _requested_outputs(request.get("outputs"))
        request_id = request.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise _RequestError(HTTPStatus.BAD_REQUEST, "'id' must be a string")
        info = host.info
        if info is None:
            raise _RequestError(
                HTTPStatus.SERVICE_UNAVAILABLE, f"model {host.name!r} is not ready: none active"
            )
        _check_version(version, info.version, host.name)
        if wanted is not None:
            known = {spec.name for spec in host.outputs}
            unknown = [output for output in wanted if output not in known]
            if unknown:
                raise _RequestError(
                    HTTPStatus.BAD_REQUEST,
                    f"unknown output {unknown[0]!r}; the model's outputs are "
                    f"{', '.join(sorted(known))}",
                )
        try:
            outputs, answered = host.infer_with_info(feeds)
        except InferenceInputError as error:
            raise _RequestError(HTTPStatus.BAD_REQUEST, str(error)) from None
        except NoModelError as error:
            raise _RequestError(HTTPStatus.SERVICE_UNAVAILABLE, str(error)) from None
        except InferenceRuntimeError as error:
            raise _RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, str(error)) from None
        names = wanted if wanted is not None else list(outputs)
        response: dict[str, Any] = {
            "model_name": host.name,
            "model_version": answered.version,
            "outputs": [_output_tensor(name, outputs[name]) for name in names if name in outputs],
        }
        if request_id is not None:
            response["id"] = request_id
        return response

    def _send(self, status: HTTPStatus, document: dict[str, Any], *, close: bool = False) -> None:
        body = json.dumps(document, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)


def _require_method(method: str, allowed: str) -> None:
    if method != allowed:
        raise _RequestError(
            HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed here; use {allowed}"
        )


def _check_version(version: str | None, active: str, name: str) -> None:
    if version is not None and version != active:
        raise _RequestError(
            HTTPStatus.NOT_FOUND,
            f"model {name!r} version {version[:40]!r} is not loaded; the active version is "
            f"{active!r}",
        )


def _requested_outputs(value: object) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise _RequestError(HTTPStatus.BAD_REQUEST, "'outputs' must be a list of {name} objects")
    names = []
    for index, entry in enumerate(value):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise _RequestError(
                HTTPStatus.BAD_REQUEST, f"outputs[{index}] must be an object with a 'name' string"
            )
        names.append(name)
    return names


def _output_tensor(name: str, value: Array) -> dict[str, Any]:
    array = np.asarray(value)
    return {
        "name": name,
        "datatype": datatype_of(array.dtype.name),
        "shape": list(array.shape),
        "data": array.ravel().tolist(),
    }


def _metadata(host: ModelHost) -> dict[str, Any]:
    info = host.info
    engine = host.engine or ""
    return {
        "name": host.name,
        "versions": [info.version] if info else [],
        "platform": _PLATFORMS.get(engine, engine),
        "inputs": [
            {"name": s.name, "datatype": datatype_of(s.dtype), "shape": _shape_value(s.shape)}
            for s in host.inputs
        ],
        "outputs": [
            {"name": s.name, "datatype": datatype_of(s.dtype), "shape": _shape_value(s.shape)}
            for s in host.outputs
        ],
    }


class InferenceServer:
    """The OIP v2 REST server over a `ModelHost`; `start()` listens, `stop()` closes."""

    def __init__(
        self,
        host: ModelHost,
        address: tuple[str, int] = ("127.0.0.1", 0),
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        idle_timeout_s: float = 30.0,
    ) -> None:
        self.host = host
        self.address = address
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve in a background thread (returns once listening)."""
        if self._server is not None:
            return
        try:
            server = _Server(
                self.address,
                self.host,
                max_body_bytes=self.max_body_bytes,
                idle_s=self.idle_timeout_s,
            )
        except OSError as error:
            raise InferenceServerError(
                f"cannot listen on {self.address[0]}:{self.address[1]}: {error.strerror}; "
                "choose a free port for the inference server"
            ) from error
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="oip-server",
            daemon=True,
        )
        self._thread.start()
        log.info("inference server listening on %s", self.url)

    def stop(self) -> None:
        """Stop accepting, end open connections and release the port."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._thread = None

    @property
    def port(self) -> int:
        """The bound port (after `start()`)."""
        if self._server is None:
            raise InferenceServerError("the inference server is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """`http://host:port` of the running server."""
        if self._server is None:
            raise InferenceServerError("the inference server is not started")
        address = str(self._server.server_address[0])
        if ":" in address:
            address = f"[{address}]"
        return f"http://{address}:{self.port}"

    def __enter__(self) -> InferenceServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
