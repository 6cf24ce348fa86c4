"""Keep the terminal for edgekit's own results: the frameworks' start-up chatter and runtime
telemetry are off by default.

- `configure_environment()` (run when `edgekit` is imported) sets, unless already set,
  `ORT_DISABLE_TELEMETRY=1` (onnxruntime otherwise queues telemetry events under
  `~/.cache/Microsoft/DeveloperTools/.onnxruntime/`), `TF_CPP_MIN_LOG_LEVEL=2` and
  `GRPC_VERBOSITY=ERROR`; child processes inherit them. Set `EDGEKIT_RUNTIME_TELEMETRY=1` to
  leave onnxruntime's telemetry as onnxruntime ships it.
- `disable_onnxruntime_telemetry(ort)` where sessions are made, for a module imported before.
- `native_output()` filters what C/C++ code (TensorFlow, absl, the TFLite converter, LiteRT)
  and child processes write to file descriptor 2: absl/glog INFO and WARNING lines, TFLite's
  `INFO:` lines (XNNPACK delegate) and the converter's `fully_quantize: 0, inference_type: 6`
  go to this module's logger at DEBUG (`edgekit -vv` shows them); everything else passes.
  It also drops onnxruntime.quantization's "consider to run pre-processing" warning (edgekit
  decides about pre-processing itself). `EDGEKIT_NATIVE_LOGS=1` turns the filter off.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, TypeVar

__all__ = [
    "NATIVE_LOGS_ENV",
    "TELEMETRY_ENV",
    "configure_environment",
    "disable_onnxruntime_telemetry",
    "is_native_noise",
    "native_output",
    "quiet_native_output",
]

logger = logging.getLogger(__name__)

TELEMETRY_ENV = "EDGEKIT_RUNTIME_TELEMETRY"
NATIVE_LOGS_ENV = "EDGEKIT_NATIVE_LOGS"

F = TypeVar("F", bound=Callable[..., Any])

_NOISE = re.compile(
    r"""^(?:
        WARNING:\ All\ log\ messages\ before\ absl::InitializeLog\(\)\ is\ called.*
      | [IW]\d{4}\ [\d:.]+\s+\d+\ [\w.\-/]+:\d+\]\ .*   # absl/glog INFO and WARNING
      | INFO:\ .*                                        # TFLite/LiteRT INFO lines
      | fully_quantize:\ \d+,\ inference_type:\ \d+.*    # the MLIR quantizer's settings
    )$""",
    re.VERBOSE,
)
_WARNINGS_DROPPED = ("Please consider to run pre-processing before quantization",)


class _Nesting:
    """How many `native_output()` blocks are open (only the outermost filters)."""

    lock = threading.Lock()
    depth = 0


def configure_environment() -> None:
    """Default the frameworks' logging and telemetry switches (before they are imported)."""
    if os.environ.get(TELEMETRY_ENV) != "1":
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def disable_onnxruntime_telemetry(ort: ModuleType) -> None:
    """Stop onnxruntime's telemetry events in this process (unless EDGEKIT_RUNTIME_TELEMETRY=1)."""
    if os.environ.get(TELEMETRY_ENV) == "1":
        return
    disable = getattr(ort, "disable_telemetry_events", None)  # absent in some builds
    if callable(disable):
        disable()


def is_native_noise(line: str) -> bool:
    """Whether one line written to stderr by native code is start-up chatter."""
    return _NOISE.match(line.rstrip("\r\n")) is not None


class _DropWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(dropped) for dropped in _WARNINGS_DROPPED)


def _forward(read_fd: int, target_fd: int) -> None:
    """Copy lines from the pipe to the real stderr, minus the noise (runs in a thread)."""
    pending = b""
    while chunk := os.read(read_fd, 65536):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            _emit(line, target_fd, end=b"\n")
    if pending:
        _emit(pending, target_fd, end=b"")
    os.close(read_fd)


def _emit(line: bytes, target_fd: int, *, end: bytes) -> None:
    text = line.decode("utf-8", "replace")
    if is_native_noise(text):
        logger.debug("native: %s", text)
        return
    with contextlib.suppress(OSError):  # the real stderr is gone: nowhere left to say it
        os.write(target_fd, line + end)


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None  # replaced by a capture (click's CliRunner, pytest)


@contextlib.contextmanager
def native_output() -> Iterator[None]:
    """Filter file descriptor 2 (native code, child processes) for the duration; Python's own
    `sys.stderr` keeps writing to the real stderr. Nested uses share the outer filter."""
    root = logging.getLogger()
    dropper = _DropWarnings()
    root.addFilter(dropper)
    with _Nesting.lock:
        nested = _Nesting.depth > 0
        _Nesting.depth += 1
    try:
        if nested or os.environ.get(NATIVE_LOGS_ENV) == "1":
            yield
            return
        with _filter_fd2():
            yield
    finally:
        root.removeFilter(dropper)
        with _Nesting.lock:
            _Nesting.depth -= 1


@contextlib.contextmanager
def _filter_fd2() -> Iterator[None]:
    python_stderr = sys.stderr
    python_stderr.flush()
    saved = os.dup(2)
    read_fd, write_fd = os.pipe()
    reader = threading.Thread(
        target=_forward, args=(read_fd, saved), name="edgekit-native-stderr", daemon=True
    )
    reader.start()
    replaced = None
    if _stderr_fd() == 2:
        # Python's writes (progress, messages, logging set up later) skip the filter.
        replaced = open(  # noqa: SIM115 - closed below
            os.dup(saved),
            "w",
            buffering=1,
            encoding=getattr(python_stderr, "encoding", None) or "utf-8",
            errors="backslashreplace",
        )
        sys.stderr = replaced
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        if replaced is not None:
            replaced.flush()
            sys.stderr = python_stderr
            replaced.close()
        python_stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end we hold: the reader sees EOF
        reader.join(timeout=5)
        if not reader.is_alive():  # else a child still writes: keep its target open
            os.close(saved)


def quiet_native_output(function: F) -> F:
    """Run `function` inside `native_output()`."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with native_output():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
