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
or oversized request (the message names the problem), 404 for an unknown model, version or
path, 405 for a wrong method, 411 without Content-Length, 413 for a body over
`max_body_bytes`, 500 when the runtime fails, 503 (with `Retry-After`) when no model is active
or the server is at its limits. The binary tensor extension is not supported. Non-finite
floats travel as the strings `"NaN"`, `"Infinity"` and `"-Infinity"` (proto3's JSON mapping),
so every response is strict JSON.

What one device lets inference cost is bounded (`InferenceLimits`, derived from the profile's
RAM budget): bytes per body, values per request and per response, requests parsed, run and
encoded at once (others wait briefly, then get 503), connection threads (more get 503), and a
deadline per request from its first byte to its last (a slow client is disconnected).

`infer_json` is the inference path itself (bytes in, bytes out, no socket): the server calls
it for every request and the health check replays a candidate's golden samples through it,
so what passes the health check is what the server can serve.

Stdlib `ThreadingHTTPServer` (one thread per connection); no extra dependency on the device.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
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
    "DEFAULT_LIMITS",
    "InferRequest",
    "InferenceLimits",
    "InferenceServer",
    "InferenceServerError",
    "RequestError",
    "datatype_of",
    "decode_outputs",
    "decode_tensor",
    "encode_tensor",
    "infer_json",
    "parse_infer_request",
]

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]

SERVER_NAME = "edgekit-agent"
PROTOCOL_VERSION = "2.0"
MAX_RANK = 32
"""Most dimensions a tensor may have (numpy's own limit is 64)."""
_MAX_TENSORS = 256  # inputs or outputs named in one request
_MAX_ID_CHARS = 256
_ENCODE_CHUNK = 65536  # output values turned into Python objects at a time
_REAP_INTERVAL_S = 0.25
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

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


@dataclass(frozen=True)
class InferenceLimits:
    """What inference may cost on one device (bytes, counts, seconds).

    Memory while serving is bounded by about `max_concurrent` requests of `max_body_bytes`
    bodies, `max_request_elements` input values and `max_response_elements` output values
    (each value costs tens of bytes as JSON and Python objects), plus the bodies waiting for
    a slot (at most `max_concurrent` more).
    """

    max_body_bytes: int = 8 << 20
    max_request_elements: int = 2_000_000  # input values per request, all inputs together
    max_response_elements: int = 1_000_000  # output values per response
    max_concurrent: int = 2  # requests parsed, run and encoded at the same time
    queue_wait_s: float = 1.0  # longest wait for a free slot before 503
    max_connections: int = 16  # connection threads; more connections get 503
    request_timeout_s: float = 30.0  # first byte of a request to the last of its response
    idle_timeout_s: float = 30.0  # a keep-alive connection without a request

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes",
            "max_request_elements",
            "max_response_elements",
            "max_concurrent",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; found {getattr(self, name)}")
        for name in ("queue_wait_s", "request_timeout_s", "idle_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a number > 0; found {value}")

    @classmethod
    def for_memory(cls, memory_bytes: int, *, max_concurrent: int = 2) -> InferenceLimits:
        """Limits that keep `max_concurrent` requests within about `memory_bytes` together.

        A value costs about 40 bytes while a request is parsed (JSON text, a Python number,
        the array) and about 70 while a response is encoded; a body about 10 times its size.
        """
        per_request = max(1, memory_bytes // max(1, max_concurrent))
        return cls(
            max_body_bytes=min(16 << 20, max(64 << 10, per_request // 16)),
            max_request_elements=max(4096, per_request // 64),
            max_response_elements=max(4096, per_request // 128),
            max_concurrent=max_concurrent,
        )


DEFAULT_LIMITS = InferenceLimits()


def datatype_of(dtype: str) -> str:
    """The OIP datatype for a numpy dtype name (`float32` -> `FP32`)."""
    return _NUMPY_TO_DATATYPE.get(dtype, dtype.upper())


class RequestError(EdgekitError):
    """An HTTP error answer: status, message, and whether the connection must close."""

    def __init__(
        self,
        status: HTTPStatus,
        message: str,
        *,
        close: bool = False,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.retry_after_s = retry_after_s


def _bad(message: str) -> RequestError:
    return RequestError(HTTPStatus.BAD_REQUEST, message)


# --------------------------------------------------------------------------------------------
# Tensors


def _shape_value(shape: tuple[int | str | None, ...]) -> list[int]:
    return [dim if isinstance(dim, int) and dim >= 0 else -1 for dim in shape]


def _check_shape(shape: object, *, where: str, max_elements: int) -> list[int]:
    if not isinstance(shape, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
    ):
        raise _bad(f"{where}: 'shape' must be a list of non-negative integers; found {shape!r:.80}")
    if len(shape) > MAX_RANK:
        raise _bad(f"{where}: 'shape' has {len(shape)} dimensions; at most {MAX_RANK} are allowed")
    for dim in shape:
        if dim > max_elements:
            raise _bad(
                f"{where}: dimension {dim} exceeds the {max_elements} values a request may hold"
            )
    values = math.prod(shape)
    if values > max_elements:
        raise _bad(
            f"{where}: shape {shape} holds {values} values; this device accepts at most "
            f"{max_elements} per request: send smaller batches"
        )
    return shape


def decode_tensor(entry: object, *, where: str, max_elements: int) -> tuple[str, Array]:
    """One OIP tensor object (`name`, `shape`, `datatype`, `data`) as (name, array).

    The shape is checked (rank, values) before `data` is converted; `"NaN"`, `"Infinity"` and
    `"-Infinity"` are accepted in floating-point data. Raises `RequestError` (400) only.
    """
    if not isinstance(entry, dict):
        raise _bad(f"{where} must be an object with name, shape, datatype and data")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(f"{where}: 'name' must be a non-empty string")
    where = f"tensor {name[:100]!r}"
    shape = _check_shape(entry.get("shape"), where=where, max_elements=max_elements)
    datatype = entry.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        supported = ", ".join(DATATYPES)
        raise _bad(f"{where}: unknown datatype {datatype!r:.40}; expected one of {supported}")
    if "data" not in entry:
        raise _bad(f"{where}: 'data' is missing")
    dtype = np.dtype(DATATYPES[datatype])
    array = _data_array(entry["data"], dtype, datatype=datatype, where=where)
    expected = math.prod(shape)
    if array.size != expected:
        raise _bad(f"{where}: shape {shape} needs {expected} values; data holds {array.size}")
    return name, array.reshape(shape)


def _special_float(value: object) -> float:
    if isinstance(value, bool):
        raise TypeError("a boolean")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    raise TypeError(f"{value!r:.40}")


_special_floats = np.frompyfunc(_special_float, 1, 1)


def _data_array(data: object, dtype: np.dtype[Any], *, datatype: str, where: str) -> Array:
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError) as error:
        raise _bad(
            f"{where}: 'data' is not a flat or rectangular nested list: {first_line(error)}"
        ) from None
    if raw.size == 0:
        return np.zeros(0, dtype=dtype)
    kind = raw.dtype.kind
    if kind in "UO" and dtype.kind == "f":
        # Strings among the numbers: only the non-finite markers proto3's JSON mapping uses.
        try:
            values = _special_floats(np.asarray(data, dtype=object))
            return np.asarray(values, dtype=np.float64).astype(dtype)
        except (TypeError, ValueError) as error:
            raise _bad(
                f"{where}: data holds strings or other values ({first_line(error)}), which is "
                f'not {datatype} (non-finite values are written "NaN", "Infinity", "-Infinity")'
            ) from None
    if kind not in "biuf" or (kind == "b") != (dtype.kind == "b"):
        found = {"U": "strings", "S": "strings", "O": "mixed or huge values"}.get(
            kind, raw.dtype.name
        )
        if kind == "b" or dtype.kind == "b":
            found = "booleans" if kind == "b" else "numbers"
        raise _bad(f"{where}: data holds {found}, which is not {datatype}")
    if dtype.kind in "iu":
        if kind == "f":
            raise _bad(f"{where}: data holds non-integer numbers, which is not {datatype}")
        info = np.iinfo(dtype)
        low, high = int(raw.min()), int(raw.max())
        if low < info.min or high > info.max:
            raise _bad(f"{where}: data holds values in [{low}, {high}], outside {datatype}'s range")
    return raw.astype(dtype, copy=False)


def _finite_or_marker(value: float) -> float | str:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _json_values(flat: Array) -> Iterator[str]:
    """JSON text of a flat array's values, in chunks (non-finite floats as strings)."""
    for start in range(0, flat.size, _ENCODE_CHUNK):
        chunk = flat[start : start + _ENCODE_CHUNK]
        values: list[Any] = chunk.tolist()
        if chunk.dtype.kind == "f" and not np.isfinite(chunk).all():
            values = [_finite_or_marker(value) for value in values]
        yield json.dumps(values, separators=(",", ":"), allow_nan=False)[1:-1]


def encode_tensor(name: str, value: Array) -> bytes:
    """One OIP output tensor as JSON bytes (data flat, row-major, non-finite as strings)."""
    array = np.asarray(value)
    head = json.dumps(
        {"name": name, "datatype": datatype_of(array.dtype.name), "shape": list(array.shape)},
        separators=(",", ":"),
    )
    data = ",".join(part for part in _json_values(array.ravel()) if part)
    return f'{head[:-1]},"data":[{data}]}}'.encode()


# --------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class InferRequest:
    """A parsed `infer` request: input arrays by name, the outputs asked for, the id."""

    feeds: dict[str, Array]
    outputs: tuple[str, ...] | None
    id: str | None


def parse_infer_request(body: bytes, *, limits: InferenceLimits = DEFAULT_LIMITS) -> InferRequest:
    """Parse an `infer` request body; raises `RequestError` (400) and nothing else."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise _bad(f"request body is not valid JSON: {first_line(error)}") from None
    if not isinstance(request, dict):
        raise _bad("request body must be a JSON object")
    entries = request.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise _bad("'inputs' must be a non-empty list of tensors")
    if len(entries) > _MAX_TENSORS:
        raise _bad(f"'inputs' lists {len(entries)} tensors; at most {_MAX_TENSORS} are allowed")
    feeds: dict[str, Array] = {}
    remaining = limits.max_request_elements
    for index, entry in enumerate(entries):
        name, array = decode_tensor(entry, where=f"inputs[{index}]", max_elements=remaining)
        if name in feeds:
            raise _bad(f"input {name[:100]!r} is given twice")
        feeds[name] = array
        remaining -= array.size
    request_id = request.get("id")
    if request_id is not None and (
        not isinstance(request_id, str) or len(request_id) > _MAX_ID_CHARS
    ):
        raise _bad(f"'id' must be a string of at most {_MAX_ID_CHARS} characters")
    return InferRequest(feeds, _requested_outputs(request.get("outputs")), request_id)


def _requested_outputs(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > _MAX_TENSORS:
        raise _bad(f"'outputs' must be a list of at most {_MAX_TENSORS} {{name}} objects")
    names = []
    for index, entry in enumerate(value):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise _bad(f"outputs[{index}] must be an object with a 'name' string")
        names.append(name)
    return tuple(names)


def infer_json(
    host: ModelHost,
    body: bytes,
    *,
    version: str | None = None,
    limits: InferenceLimits = DEFAULT_LIMITS,
) -> bytes:
    """The REST inference path without the socket: request body in, response body out.

    Parses and bounds the request, checks the inputs against the active model
    (`ModelHost.infer`), runs it and encodes the outputs. Raises `RequestError` with the
    HTTP status a client gets (400, 404, 500 or 503).
    """
    request = parse_infer_request(body, limits=limits)
    bundle = host.bundle
    if bundle is None:
        raise RequestError(
            HTTPStatus.SERVICE_UNAVAILABLE, f"model {host.name!r} is not ready: none active"
        )
    _check_version(version, bundle.version, host.name)
    if request.outputs is not None:
        known = {spec.name for spec in host.outputs}
        unknown = [output for output in request.outputs if output not in known]
        if unknown:
            raise _bad(
                f"unknown output {unknown[0][:100]!r}; the model's outputs are "
                f"{', '.join(sorted(known))}"
            )
    try:
        outputs, answered = host.infer_with_bundle(request.feeds)
    except InferenceInputError as error:
        raise _bad(str(error)) from None
    except NoModelError as error:
        raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, str(error)) from None
    except InferenceRuntimeError as error:
        raise RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, str(error)) from None
    names = request.outputs if request.outputs is not None else tuple(outputs)
    chosen = [(name, outputs[name]) for name in names if name in outputs]
    values = sum(int(np.asarray(value).size) for _, value in chosen)
    if values > limits.max_response_elements:
        raise _bad(
            f"the response would hold {values} values; this device returns at most "
            f"{limits.max_response_elements}: send smaller batches or ask for fewer outputs"
        )
    head = {"model_name": host.name, "model_version": answered.version}
    if request.id is not None:
        head["id"] = request.id
    text = json.dumps(head, separators=(",", ":")).encode()
    tensors = b",".join(encode_tensor(name, value) for name, value in chosen)
    return text[:-1] + b',"outputs":[' + tensors + b"]}"


def _check_version(version: str | None, active: str, name: str) -> None:
    if version is not None and version != active:
        raise RequestError(
            HTTPStatus.NOT_FOUND,
            f"model {name!r} version {version[:40]!r} is not loaded; the active version is "
            f"{active!r}",
        )


def _metadata(host: ModelHost) -> dict[str, Any]:
    bundle = host.bundle
    engine = host.engine or ""
    return {
        "name": host.name,
        "versions": [bundle.version] if bundle else [],
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


def _json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


# --------------------------------------------------------------------------------------------
# The server


class _FairSlots:
    """At most `count` holders; waiters get a free slot in arrival order (a newcomer never
    overtakes a waiter), so a request's wait is bounded by the requests ahead of it."""

    def __init__(self, count: int) -> None:
        self._free = count
        self._waiters: collections.deque[threading.Event] = collections.deque()
        self._lock = threading.Lock()

    def acquire(self, timeout_s: float) -> bool:
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return True
            turn = threading.Event()
            self._waiters.append(turn)
        if turn.wait(max(0.0, timeout_s)):
            return True
        with self._lock:
            if turn.is_set():  # handed over just as the wait ended
                return True
            self._waiters.remove(turn)
            return False

    def release(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()  # the slot passes to the longest waiter
            else:
                self._free += 1


class _BodyBudget:
    """Bytes of request bodies held at once (read, waiting for a slot, or being parsed)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._held = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def reserve(self, size_bytes: int) -> Iterator[None]:
        with self._lock:
            if size_bytes and self._held + size_bytes > self.limit_bytes:
                raise RequestError(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    "too many request bytes in flight; retry shortly",
                    close=True,
                    retry_after_s=1,
                )
            self._held += size_bytes
        try:
            yield
        finally:
            with self._lock:
                self._held -= size_bytes


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog is 5: a burst of new connections beyond it has its SYNs
    # dropped and retried a second later. Connections over max_connections get a 503 instead.
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], host: ModelHost, *, limits: InferenceLimits
    ) -> None:
        self.host = host
        self.limits = limits
        self.slots = _FairSlots(limits.max_concurrent)
        self.bodies = _BodyBudget(limits.max_body_bytes * limits.max_concurrent * 2)
        self.deadlines: dict[socket.socket, float] = {}  # open connections
        self.connections_lock = threading.Lock()
        self.refused_connections = 0
        self.timed_out = 0
        self._reaper_stop = threading.Event()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self._reaper = threading.Thread(target=self._reap, name="oip-deadlines", daemon=True)
        self._reaper.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            full = len(self.deadlines) >= self.limits.max_connections
            if not full:
                self.deadlines[request] = time.monotonic() + self.limits.idle_timeout_s
        if full:
            self.refused_connections += 1
            self._refuse(request)
            return
        super().process_request(request, client_address)

    def _refuse(self, request: socket.socket) -> None:
        body = _json({"error": "too many connections; retry shortly"})
        head = (
            f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        ).encode()
        with contextlib.suppress(OSError):
            request.settimeout(1.0)
            request.sendall(head + body)
        self.shutdown_request(request)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.deadlines.pop(request, None)
        super().shutdown_request(request)

    def set_deadline(self, connection: socket.socket, seconds: float) -> float:
        deadline = time.monotonic() + seconds
        with self.connections_lock:
            if connection in self.deadlines:
                self.deadlines[connection] = deadline
        return deadline

    def deadline_of(self, connection: socket.socket) -> float:
        with self.connections_lock:
            return self.deadlines.get(connection, time.monotonic())

    def _reap(self) -> None:
        """End connections past their deadline: a blocked read or write returns at once."""
        while not self._reaper_stop.wait(_REAP_INTERVAL_S):
            now = time.monotonic()
            with self.connections_lock:
                late = [c for c, deadline in self.deadlines.items() if deadline < now]
                for connection in late:
                    self.deadlines[connection] = math.inf  # once
            for connection in late:
                self.timed_out += 1
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug("connection from %s ended: %s", client_address, error)
        else:
            log.error("inference request from %s failed", client_address, exc_info=True)

    def close_connections(self) -> None:
        self._reaper_stop.set()
        with self.connections_lock:
            connections = list(self.deadlines)
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
        self.connection.settimeout(self.server.limits.idle_timeout_s)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - " + format, self.client_address[0], *args)

    def handle_one_request(self) -> None:
        """The standard library's, with a deadline from a request's first byte to its end."""
        limits = self.server.limits
        try:
            self.server.set_deadline(self.connection, limits.idle_timeout_s)
            if not self._peek():
                self.close_connection = True
                return
            self.server.set_deadline(self.connection, limits.request_timeout_s)
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = ""
                self.request_version = ""
                self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self.send_error(
                    HTTPStatus.NOT_IMPLEMENTED, f"Unsupported method ({self.command!r})"
                )
                return
            method()
            self.wfile.flush()
        except TimeoutError as error:
            self.log_error("Request timed out: %r", error)
            self.close_connection = True

    def _peek(self) -> bytes:
        """Wait for a request's first byte without consuming it (b"" once the client left)."""
        reader: Any = self.rfile  # a BufferedReader over the socket (rbufsize -1)
        return bytes(reader.peek(1))

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
            length = self._content_length(required=method == "POST")
            with self.server.bodies.reserve(length):
                body = self._read_body(length)
                status, payload = self._route(method, body)
        except RequestError as error:
            self._send(
                error.status,
                _json({"error": error.message}),
                close=error.close,
                retry_after_s=error.retry_after_s,
            )
            return
        except Exception as error:  # a bug must answer 500, not drop the client
            log.exception("inference server failed on %s %s", method, self.path[:200])
            self._send(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                _json({"error": f"internal error: {type(error).__name__}: {first_line(error)}"}),
            )
            return
        self._send(status, payload)

    def _content_length(self, *, required: bool) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError(
                HTTPStatus.LENGTH_REQUIRED,
                "chunked request bodies are not supported; send Content-Length",
                close=True,
            )
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            if required:
                raise RequestError(HTTPStatus.LENGTH_REQUIRED, "POST needs a Content-Length header")
            return 0
        try:
            length = int(length_text)
            if length < 0:
                raise ValueError(length_text)
        except ValueError:
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"bad Content-Length {length_text!r:.40}", close=True
            ) from None
        limit = self.server.limits.max_body_bytes
        if length > limit:
            # Not read: the connection closes instead of draining a huge body.
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body of {length} bytes exceeds this device's limit of {limit} bytes",
                close=True,
            )
        return length

    def _read_body(self, length: int) -> bytes:
        if not length:
            return b""
        body = self.rfile.read(length)
        if len(body) != length:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"request body ended after {len(body)} of {length} bytes",
                close=True,
            )
        return body

    def _route(self, method: str, body: bytes) -> tuple[HTTPStatus, bytes]:
        parts = [unquote(part) for part in urlsplit(self.path).path.strip("/").split("/")]
        if not parts or parts[0] != "v2":
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path[:200]!r}")
        rest = parts[1:]
        host = self.server.host
        if rest in ([], ["health", "live"], ["health", "ready"]):
            _require_method(method, "GET")
            if not rest:
                server = {"name": SERVER_NAME, "version": PROTOCOL_VERSION, "extensions": []}
                return HTTPStatus.OK, _json(server)
            if rest[1] == "live":
                return HTTPStatus.OK, _json({"live": True})
            if host.ready:
                return HTTPStatus.OK, _json({"ready": True})
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "no model is active yet")
        if len(rest) < 2 or rest[0] != "models":
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path[:200]!r}")
        name, tail = rest[1], rest[2:]
        version: str | None = None
        if len(tail) >= 2 and tail[0] == "versions":
            version, tail = tail[1], tail[2:]
        if name != host.name:
            raise RequestError(
                HTTPStatus.NOT_FOUND,
                f"unknown model {name[:100]!r}; this server serves {host.name!r}",
            )
        if tail == ["infer"]:
            _require_method(method, "POST")
            return HTTPStatus.OK, self._infer(body, version)
        if tail not in ([], ["ready"]):
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path[:200]!r}")
        _require_method(method, "GET")
        bundle = host.bundle
        if bundle is None:
            raise RequestError(
                HTTPStatus.SERVICE_UNAVAILABLE, f"model {host.name!r} is not ready: none active"
            )
        _check_version(version, bundle.version, host.name)
        if tail == ["ready"]:
            return HTTPStatus.OK, _json({"name": host.name, "ready": True})
        return HTTPStatus.OK, _json(_metadata(host))

    def _infer(self, body: bytes, version: str | None) -> bytes:
        server = self.server
        limits = server.limits
        wait_s = min(limits.queue_wait_s, server.deadline_of(self.connection) - time.monotonic())
        if not server.slots.acquire(wait_s):
            raise RequestError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"busy: {limits.max_concurrent} inference requests are running; retry shortly",
                retry_after_s=1,
            )
        try:
            return infer_json(server.host, body, version=version, limits=limits)
        finally:
            server.slots.release()

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        *,
        close: bool = False,
        retry_after_s: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if retry_after_s is not None:
            self.send_header("Retry-After", str(retry_after_s))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)


def _require_method(method: str, allowed: str) -> None:
    if method != allowed:
        raise RequestError(
            HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed here; use {allowed}"
        )


class InferenceServer:
    """The OIP v2 REST server over a `ModelHost`; `start()` listens, `stop()` closes."""

    def __init__(
        self,
        host: ModelHost,
        address: tuple[str, int] = ("127.0.0.1", 0),
        *,
        limits: InferenceLimits = DEFAULT_LIMITS,
    ) -> None:
        self.host = host
        self.address = address
        self.limits = limits
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve in a background thread (returns once listening)."""
        if self._server is not None:
            return
        try:
            server = _Server(self.address, self.host, limits=self.limits)
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

    def counters(self) -> dict[str, int]:
        """Connections refused at `max_connections` and ended at their deadline, so far."""
        server = self._server
        if server is None:
            return {"refused_connections": 0, "timed_out": 0}
        return {"refused_connections": server.refused_connections, "timed_out": server.timed_out}

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


def decode_outputs(response: bytes) -> dict[str, Array]:
    """The output tensors of an `infer_json` response body as arrays, by name."""
    document = json.loads(response)
    outputs: dict[str, Array] = {}
    for index, entry in enumerate(document.get("outputs", [])):
        name, array = decode_tensor(entry, where=f"outputs[{index}]", max_elements=sys.maxsize)
        outputs[name] = array
    return outputs
