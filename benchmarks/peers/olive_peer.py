"""Microsoft Olive as a benchmark peer: its ONNX dynamic and static quantization passes, offline.

Olive (pip `olive-ai`) pins torch, transformers, onnxruntime and more, so it runs in its own venv,
built once per Olive version under `~/.cache/edgekit/peers/olive-<version>/` (built in a temporary
folder next to it and renamed into place; a lock file keeps two processes from building at once).
This module needs only the standard library at import. The Olive venv's Python runs this same
file as a script (`_driver`): it registers an Olive dataset and dataloader that read the
calibration `.npz` and cuts it into feeds by edgekit's rules (`converters/data.py`), builds an
Olive workflow config with one pass (`OnnxDynamicQuantization` or `OnnxStaticQuantization`, at
Olive's defaults) and runs it with `olive.workflows.run`, with telemetry off and every
non-loopback connection refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "OLIVE_REQUIREMENTS",
    "OLIVE_VERSION",
    "OlivePeerError",
    "olive_quantize",
    "olive_version",
]

log = logging.getLogger(__name__)

OLIVE_VERSION = "0.13.0"

# The Olive venv, pinned in full (pip freeze of `pip install olive-ai[cpu]==0.13.0 torch==2.13.0`
# on Python 3.11), so every machine quantizes with the same code. torch is a hard requirement of
# olive-ai; 2.13.0 is the CPU build this machine serves from a local wheel (other versions pull
# the CUDA packages from PyPI).
OLIVE_REQUIREMENTS: tuple[str, ...] = (
    f"olive-ai[cpu]=={OLIVE_VERSION}",
    "torch==2.13.0",
    "onnxruntime==1.32.0",
    "onnx==1.23.2",
    "onnx-ir==1.1.0",
    "onnxscript==0.7.2",
    "numpy==2.4.6",
    "ml_dtypes==0.7.0",
    "protobuf==7.36.2",
    "pydantic==2.14.4",
    "pydantic_core==2.50.5",
    "transformers==5.25.0",
    "tokenizers==0.23.3",
    "huggingface_hub==2.4.0",
    "hf-xet==1.8.0",
    "safetensors==0.8.0",
    "torchmetrics==1.9.0",
    "lightning-utilities==0.15.3",
    "optuna==5.1.0",
    "alembic==1.20.1",
    "SQLAlchemy==2.1.9",
    "Mako==1.4.3",
    "colorlog==6.12.0",
    "pandas==3.1.1",
    "python-dateutil==4.0.0",
    "tzdata==2026.6",
    "opentelemetry-api==1.45.2",
    "opentelemetry-sdk==1.45.2",
    "opentelemetry-semantic-conventions==0.66b2",
    "questionary==2.1.1",
    "prompt_toolkit==3.0.53",
    "wcwidth==0.9.4",
    "PyYAML==6.0.4",
    "packaging==26.4",
    "regex==2026.11.19",
    "tqdm==4.70.1",
    "sympy==1.14.0",
    "mpmath==1.3.0",
    "networkx==3.6.1",
    "Jinja2==3.1.6",
    "MarkupSafe==3.0.4",
    "filelock==4.3.2",
    "fsspec==2026.9.0",
    "typing_extensions==4.16.0",
    "typing-inspection==0.4.5",
    "annotated-types==0.8.0",
    "flatbuffers==25.12.19",
    "kernels==0.19.1",
    "typer==0.29.2",
    "click==8.5.1",
    "rich==15.0.0",
    "markdown-it-py==4.3.0",
    "mdurl==0.1.2",
    "Pygments==2.21.0",
    "shellingham==1.5.4",
    "annotated-doc==0.0.7",
    "tomlkit==0.15.3",
    "httpx2==2.16.2",
    "httpcore2==2.16.2",
    "h11==0.16.0",
    "anyio==4.16.0",
    "idna==3.20",
    "truststore==0.10.5",
    # olive-ai 0.13.0 imports requests (telemetry exporter) without declaring it.
    "requests==2.34.2",
    "urllib3==2.8.0",
    "certifi==2026.10.19.post1",
    "charset-normalizer==3.5.3",
)

_MARKER = "edgekit-peer.json"
_PIP_TIMEOUT_S = 1800.0
_RUN_TIMEOUT_S = 3600.0
_MESSAGE_CHARS = 400
_PASS_TYPES = {"dynamic": "OnnxDynamicQuantization", "static": "OnnxStaticQuantization"}
# Environment of every process in the Olive venv: no hub, no telemetry, no user site.
_OFFLINE_ENV = {
    "OLIVE_DISABLE_TELEMETRY": "1",
    # Olive skips even its first heartbeat when it sees a CI variable (telemetry.py); without it
    # the heartbeat is queued before OLIVE_DISABLE_TELEMETRY is read. The socket guard refuses
    # the connection either way.
    "CI": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "PYTHONHASHSEED": "0",
    "PYTHONNOUSERSITE": "1",
    "PIP_NO_INPUT": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}
_DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")


class OlivePeerError(Exception):
    """Olive could not be installed or run, or refused the model or data; the message says why."""


# --------------------------------------------------------------------------------------------
# Public API (our environment: standard library only)
# --------------------------------------------------------------------------------------------


def olive_quantize(
    model: Path,
    calibration_npz: Path,
    workdir: Path,
    *,
    kind: Literal["dynamic", "static"],
    cache: Path | None = None,
) -> Path:
    """Run Olive's ONNX `kind` quantization pass on `model`, offline; return the quantized .onnx.

    `calibration_npz` holds one array per input name, cut into batch-1 feeds as edgekit does:
    rank R+1 lists samples on axis 0, rank R with a dynamic first axis is cut into rows, anything
    else is fed as is to every sample. Olive's dynamic pass does not read it (it is still checked).
    The result is `workdir/<model folder>-olive_<kind>.onnx`, with Olive's log (`.log`) and a
    summary (`.json`: resolved pass config, warnings, feed count) beside it, written only when
    Olive succeeded; on failure the run folder with its log is kept and named in the error.
    """
    if kind not in _PASS_TYPES:
        raise OlivePeerError(f"kind must be 'dynamic' or 'static', got {kind!r}")
    model = Path(model).resolve()
    calibration_npz = Path(calibration_npz).resolve()
    if not model.is_file():
        raise OlivePeerError(f"model {model} does not exist; give an .onnx file")
    if not calibration_npz.is_file():
        raise OlivePeerError(f"calibration data {calibration_npz} does not exist; give an .npz")
    python = _ensure_venv(cache)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / f"{model.parent.name}-olive_{kind}.onnx"
    run_dir = Path(tempfile.mkdtemp(prefix=f".olive-{model.parent.name}-{kind}-", dir=workdir))
    request = {
        "model": str(model),
        "calibration_npz": str(calibration_npz),
        "kind": kind,
        "run_dir": str(run_dir),
        "result": str(run_dir / "result.json"),
    }
    (run_dir / "request.json").write_text(json.dumps(request, indent=2), encoding="utf-8")
    log_path = run_dir / "olive.log"
    log.info("olive %s: %s quantization of %s", OLIVE_VERSION, kind, model)
    started = time.monotonic()
    returncode = _run_logged(
        [str(python), "-P", "-s", str(Path(__file__).resolve()), "_driver", str(run_dir)],
        env=_child_env(run_dir),
        log_path=log_path,
        timeout_s=_RUN_TIMEOUT_S,
        what=f"olive {kind}",
    )
    result = _read_result(run_dir / "result.json")
    if result is not None and result.get("data_error"):
        shutil.rmtree(run_dir, ignore_errors=True)
        raise OlivePeerError(f"Olive {kind} quantization of {model}: {result['error']}")
    if result is None or not result.get("ok"):
        message = (result or {}).get("error") or _log_tail(log_path, returncode)
        raise OlivePeerError(
            f"Olive {kind} quantization of {model} failed: {message} (log: {log_path})"
        )
    for warning in result.get("warnings", []):
        log.warning("olive %s: %s", kind, warning)
    produced = Path(str(result["output"]))
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(produced, partial)
    os.replace(partial, target)
    # Beside it: Olive's own log, and what it did (resolved pass config, warnings, feeds).
    os.replace(log_path, target.with_suffix(".log"))
    summary = {key: value for key, value in result.items() if key not in ("ok", "output")}
    summary["seconds"] = round(time.monotonic() - started, 1)
    target.with_suffix(".json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    shutil.rmtree(run_dir, ignore_errors=True)
    log.info(
        "olive %s: %s done in %.1f s: %s (%d bytes)",
        OLIVE_VERSION,
        kind,
        time.monotonic() - started,
        target,
        target.stat().st_size,
    )
    return target


def olive_version(cache: Path | None = None) -> str:
    """The olive-ai version of the peer venv, building that venv first if needed."""
    python = _ensure_venv(cache)
    marker = json.loads((python.parents[1] / _MARKER).read_text(encoding="utf-8"))
    return str(marker["olive_version"])


# --------------------------------------------------------------------------------------------
# The Olive venv: cached, built atomically under a lock
# --------------------------------------------------------------------------------------------


def _default_cache() -> Path:
    return Path.home() / ".cache" / "edgekit" / "peers"


def _recipe() -> dict[str, Any]:
    return {
        "olive_version": OLIVE_VERSION,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "requirements": list(OLIVE_REQUIREMENTS),
    }


def _ready(venv_dir: Path) -> bool:
    marker = venv_dir / _MARKER
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    wanted = _recipe()
    return (
        all(recorded.get(key) == value for key, value in wanted.items())
        and (venv_dir / "bin" / "python").exists()
    )


def _ensure_venv(cache: Path | None) -> Path:
    """Path of the Olive venv's python; builds the venv when it is missing or stale."""
    root = Path(cache) if cache is not None else _default_cache()
    venv_dir = root / f"olive-{OLIVE_VERSION}"
    if _ready(venv_dir):
        return venv_dir / "bin" / "python"
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f"olive-{OLIVE_VERSION}.lock"):
        if _ready(venv_dir):  # another process built it while we waited
            return venv_dir / "bin" / "python"
        # We hold the lock, so no build is running: folders left by a killed build are garbage.
        for pattern in (f".{venv_dir.name}-build-*", f".{venv_dir.name}-stale-*"):
            for leftover in root.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)
        _build_venv(venv_dir)
    return venv_dir / "bin" / "python"


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish building the Olive venv (%s)", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_venv(venv_dir: Path) -> None:
    started = time.monotonic()
    build = Path(tempfile.mkdtemp(prefix=f".{venv_dir.name}-build-", dir=venv_dir.parent))
    log.info("building the Olive %s venv in %s (several minutes, ~1.5 GB)", OLIVE_VERSION, build)
    try:
        # The base interpreter, not ours: the Olive venv must not see our site-packages.
        base_python = getattr(sys, "_base_executable", sys.executable)
        _run_checked([base_python, "-m", "venv", str(build)], what="python -m venv")
        requirements = build / "requirements.txt"
        requirements.write_text("\n".join(OLIVE_REQUIREMENTS) + "\n", encoding="utf-8")
        python = build / "bin" / "python"
        returncode = _run_logged(
            [str(python), "-m", "pip", "install", "--only-binary=:all:", "-r", str(requirements)],
            env=_child_env(build),
            log_path=build / "pip-install.log",
            timeout_s=_PIP_TIMEOUT_S,
            what="pip",
        )
        if returncode != 0:
            raise OlivePeerError(
                f"pip could not install Olive {OLIVE_VERSION}: "
                f"{_log_tail(build / 'pip-install.log', returncode)}"
            )
        probe = subprocess.run(
            [
                str(python),
                "-P",
                "-s",
                "-c",
                "import importlib.metadata as m, olive, onnxruntime; "
                "print(m.version('olive-ai'), onnxruntime.__version__)",
            ],
            env=_child_env(build),
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if probe.returncode != 0:
            raise OlivePeerError(
                f"the new Olive venv cannot import olive: {_last_line(probe.stderr)}"
            )
        olive_found, ort_found = probe.stdout.split()
        if olive_found != OLIVE_VERSION:
            raise OlivePeerError(f"pip installed olive-ai {olive_found}, not {OLIVE_VERSION}")
        marker = {
            **_recipe(),
            "onnxruntime_version": ort_found,
            "build_seconds": round(time.monotonic() - started, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (build / _MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
        stale: Path | None = None
        if venv_dir.exists():  # stale recipe: move it aside, swap, then delete it
            stale = Path(tempfile.mkdtemp(prefix=f".{venv_dir.name}-stale-", dir=venv_dir.parent))
            os.rename(venv_dir, stale / "venv")
        os.rename(build, venv_dir)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    log.info(
        "built the Olive %s venv in %.0f s: %s",
        OLIVE_VERSION,
        time.monotonic() - started,
        venv_dir,
    )


def _child_env(private_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    env.update(_OFFLINE_ENV)
    # Olive keeps a device id and caches under $HOME: keep them inside the run's own folder.
    home = private_dir / "home"
    tmp = private_dir / "tmp"
    home.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    env.update({"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "TMPDIR": str(tmp)})
    return env


def _run_checked(argv: list[str], *, what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise OlivePeerError(f"{what} failed: {_last_line(done.stderr or done.stdout)}")


def _run_logged(
    argv: list[str], *, env: Mapping[str, str], log_path: Path, timeout_s: float, what: str
) -> int:
    """Run `argv`, all output into `log_path`; lines starting with 'progress: ' go to our log.

    Returns the exit code; raises OlivePeerError when it runs past `timeout_s` (then killed).
    """
    with log_path.open("w", encoding="utf-8") as sink:
        process = subprocess.Popen(
            argv, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        timed_out = threading.Event()

        def stop() -> None:
            timed_out.set()
            process.kill()

        timer = threading.Timer(timeout_s, stop)
        timer.start()
        try:
            for line in process.stdout or ():
                sink.write(line)
                text = line.strip()
                if text.startswith("progress: "):
                    log.info("%s: %s", what, text.removeprefix("progress: "))
                elif what == "pip" and text.startswith(("Collecting", "Installing collected")):
                    log.info("pip: %s", text[:120])
            returncode = process.wait()
        finally:
            timer.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
    if timed_out.is_set():
        raise OlivePeerError(f"{what} did not finish within {timeout_s:.0f} s (log: {log_path})")
    return returncode


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:_MESSAGE_CHARS]


def _log_tail(path: Path, returncode: int) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    return f"exit code {returncode}: {_last_line(text)}"


# --------------------------------------------------------------------------------------------
# Driver: runs inside the Olive venv as `python -P -s olive_peer.py _driver RUN_DIR`
# --------------------------------------------------------------------------------------------

_NETWORK_ATTEMPTS: list[str] = []


def _refuse_network() -> None:
    """Refuse every connection that does not stay on this machine, and remember who tried."""

    def local(address: object) -> bool:
        if isinstance(address, (str, bytes)):  # AF_UNIX path
            return True
        if isinstance(address, tuple) and address:
            host = str(address[0])
            return host in {"localhost", "::1"} or host.startswith("127.")
        return False

    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex
    original_getaddrinfo = socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> None:
        if not local(address):
            _NETWORK_ATTEMPTS.append(f"connect {address!r}")
            raise OSError(f"network use refused by olive_peer: {address!r}")
        original_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if not local(address):
            _NETWORK_ATTEMPTS.append(f"connect {address!r}")
            return 111  # ECONNREFUSED
        return original_connect_ex(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not local((host,)):
            _NETWORK_ATTEMPTS.append(f"resolve {host!r}")
            raise socket.gaierror(f"name resolution refused by olive_peer: {host!r}")
        return original_getaddrinfo(host, *args, **kwargs)

    # setattr: the patched methods are looser than typeshed's signatures, on purpose.
    setattr(socket.socket, "connect", connect)  # noqa: B010
    setattr(socket.socket, "connect_ex", connect_ex)  # noqa: B010
    setattr(socket, "getaddrinfo", getaddrinfo)  # noqa: B010


def _progress(message: str) -> None:
    print(f"progress: {message}", flush=True)


class _DataError(Exception):
    """The calibration data does not fit the model (edgekit's InputDataError, in the driver)."""


def _model_inputs(model_path: Path) -> list[tuple[str, Any, tuple[int | str | None, ...]]]:
    """(name, numpy dtype, shape) of each real graph input, as onnxruntime lists them."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    inputs = []
    for value in graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape: tuple[int | str | None, ...] = tuple(
            dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
            for dim in tensor.shape.dim
        )
        inputs.append((value.name, helper.tensor_dtype_to_np_dtype(tensor.elem_type), shape))
    return inputs


def _feeds(model_path: Path, npz_path: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Calibration feeds cut by edgekit's rules (converters/data.py `arrays_to_dataset`).

    Returns the feeds (batch-1) and, per input, how its array was read.
    """
    import numpy as np

    source = str(npz_path)
    try:
        with np.load(npz_path, allow_pickle=False) as archive:
            arrays = {key: np.asarray(archive[key]) for key in archive.files}
    except (OSError, ValueError, EOFError) as e:
        raise _DataError(f"{source}: not a readable .npz archive ({e})") from e
    inputs = _model_inputs(model_path)
    expected = [name for name, _, _ in inputs]
    if len(inputs) == 1 and len(arrays) == 1:
        arrays = {expected[0]: next(iter(arrays.values()))}
    missing = [name for name in expected if name not in arrays]
    if missing:
        raise _DataError(
            f"{source}: no array for model input {missing[0]!r}; the data holds "
            f"{', '.join(sorted(arrays)) or 'nothing'}"
        )
    extra = sorted(set(arrays) - set(expected))
    if extra:
        raise _DataError(f"{source}: array {extra[0]!r} matches no model input ({expected})")
    modes: dict[str, str] = {}
    counts: dict[str, int] = {}
    for name, dtype, shape in inputs:
        array = arrays[name]
        if array.dtype != np.dtype(dtype):
            raise _DataError(
                f"{source}: input {name!r}: model expects dtype {np.dtype(dtype)}, data has "
                f"{array.dtype}"
            )
        rank = len(shape)
        if array.ndim == rank + 1:
            checked, modes[name], counts[name] = array.shape[1:], "per_sample", array.shape[0]
        elif array.ndim == rank:
            checked = array.shape
            if rank > 0 and not isinstance(shape[0], int):
                modes[name], counts[name] = "batch_rows", array.shape[0]
            else:
                modes[name] = "constant"
        else:
            raise _DataError(
                f"{source}: input {name!r}: model expects rank {rank} (or {rank + 1} with a "
                f"leading samples axis); data has shape {list(array.shape)}"
            )
        for want, have in zip(shape, checked, strict=True):
            if isinstance(want, int) and want not in (0, have):
                raise _DataError(
                    f"{source}: input {name!r}: model expects shape {list(shape)}, data has "
                    f"{list(array.shape)} ({modes[name]})"
                )
    if len(set(counts.values())) > 1:
        raise _DataError(f"{source}: inputs hold different numbers of samples ({counts})")
    total = next(iter(counts.values())) if counts else 1
    if total == 0:
        raise _DataError(f"{source}: the data holds no samples")
    feeds = []
    for index in range(total):
        feed: dict[str, Any] = {}
        for name, _, _ in inputs:
            array, mode = arrays[name], modes[name]
            if mode == "per_sample":
                feed[name] = np.ascontiguousarray(array[index])
            elif mode == "batch_rows":
                feed[name] = np.ascontiguousarray(array[index : index + 1])
            else:
                feed[name] = array
        feeds.append(feed)
    return feeds, modes


def _short_error(exc: BaseException) -> str:
    """'Type: first lines' of an exception and its causes, outermost first, shortened."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        # Two lines: ORT puts the detail ("index: 1 Got: 32 Expected: 64") on the second.
        lines = [line.strip() for line in str(current).splitlines() if line.strip()]
        text = " ".join(lines[:2])
        part = f"{type(current).__name__}: {text}".strip()
        if part not in parts:
            parts.append(part)
        current = current.__cause__ or current.__context__
    message = " <- ".join(parts)
    return message if len(message) <= _MESSAGE_CHARS else message[: _MESSAGE_CHARS - 3] + "..."


class _LogRecorder(logging.Handler):
    """Keeps what Olive and the ORT quantizer warned about, and the last exception logged.

    Olive's engine logs a failing pass instead of raising, and falls back silently (a warning)
    when ORT's pre-processing fails: both belong in the peer's result.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.last: BaseException | None = None
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        lines = record.getMessage().strip().splitlines()
        text = f"{record.name}: {lines[0] if lines else ''}"[:200]
        if record.exc_info and record.exc_info[1] is not None:
            self.last = record.exc_info[1]
            text += f" [{_short_error(self.last)[:200]}]"
        if text not in self.warnings and len(self.warnings) < 20:
            self.warnings.append(text)


class _FeedLoader:
    """The feeds as Olive's dataloader: one batch-1 feed per calibration step, counted."""

    def __init__(self, feeds: list[dict[str, Any]]) -> None:
        self.feeds = feeds
        self.served = 0

    def __len__(self) -> int:
        return len(self.feeds)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for feed in self.feeds:
            self.served += 1
            yield feed


def _register_olive_data(loader: _FeedLoader) -> None:
    """Olive dataset + dataloader components (its documented Registry) serving `loader`."""
    registry = importlib.import_module("olive.data.registry").Registry

    def edgekit_npz_feeds(**_: Any) -> list[dict[str, Any]]:
        return loader.feeds

    def edgekit_feed_list(dataset: list[dict[str, Any]], **_: Any) -> _FeedLoader:
        # Already batch-1 numpy feeds: no collation, no torch tensors.
        return loader

    registry.register_dataset("edgekit_npz_feeds")(edgekit_npz_feeds)
    registry.register_dataloader("edgekit_feed_list")(edgekit_feed_list)


def _workflow_config(model: Path, kind: str, run_dir: Path) -> dict[str, Any]:
    quantize: dict[str, Any] = {"type": _PASS_TYPES[kind], "save_as_external_data": False}
    if kind == "static":
        quantize["data_config"] = "edgekit_calibration"
    return {
        "input_model": {"type": "ONNXModel", "model_path": str(model)},
        "systems": {
            "local_system": {
                "type": "LocalSystem",
                "accelerators": [
                    {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}
                ],
            }
        },
        "data_configs": [
            {
                "name": "edgekit_calibration",
                "type": "DataContainer",
                "load_dataset_config": {"type": "edgekit_npz_feeds"},
                "dataloader_config": {"type": "edgekit_feed_list"},
            }
        ],
        "passes": {"quantize": quantize},
        "host": "local_system",
        "target": "local_system",
        "evaluate_input_model": False,
        "cache_dir": str(run_dir / "olive-cache"),
        "output_dir": str(run_dir / "olive-output"),
        "log_severity_level": 1,
    }


def _plain(value: Any) -> Any:
    """JSON-ready copy of Olive's run history (enums and paths become strings)."""
    return json.loads(json.dumps(value, default=str))


def _driver(run_dir: Path) -> int:
    _refuse_network()
    request = json.loads((run_dir / "request.json").read_text(encoding="utf-8"))
    result: dict[str, Any] = {"ok": False}
    recorder = _LogRecorder()
    try:
        model, kind = Path(request["model"]), str(request["kind"])
        # The data first: a bad .npz is reported before paying for Olive's (torch's) import.
        feeds, modes = _feeds(model, Path(request["calibration_npz"]))
        result.update(samples=len(feeds), feed_modes=modes)
        olive = importlib.import_module("olive")
        result["olive_version"] = str(olive.__version__)
        _progress(f"olive {olive.__version__}: {len(feeds)} calibration feeds ({modes})")
        loader = _FeedLoader(feeds)
        _register_olive_data(loader)
        for name in ("olive", ""):  # Olive's logger does not propagate; ORT logs to root
            logging.getLogger(name).addHandler(recorder)
        _progress(f"running {_PASS_TYPES[kind]}")
        run = importlib.import_module("olive.workflows").run
        output = run(_workflow_config(model, kind, run_dir))
        best = output.get_best_candidate() if output is not None else None
        if best is None or not best.model_path or not Path(best.model_path).is_file():
            cause = _short_error(recorder.last) if recorder.last else "no output model"
            raise OlivePeerError(cause)
        produced = Path(best.model_path)
        history = output.trace_back_run_history(best.model_id)
        result["calibration_feeds_read"] = loader.served
        configs = [config for config in history.values() if config]
        result.update(
            ok=True, output=str(produced), pass_config=_plain(configs[0] if configs else None)
        )
        _progress(f"wrote {produced} ({produced.stat().st_size} bytes)")
    except _DataError as e:
        result.update(error=f"calibration data: {e}", data_error=True)
    except OlivePeerError as e:
        result["error"] = str(e)
    except Exception as e:  # noqa: BLE001  (any Olive failure is reported, shortened)
        result["error"] = _short_error(e)
    result["warnings"] = recorder.warnings
    result["network_attempts"] = list(_NETWORK_ATTEMPTS)
    if _NETWORK_ATTEMPTS:
        _progress(f"refused network use: {_NETWORK_ATTEMPTS[:3]}")
    Path(request["result"]).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0 if result["ok"] else 1


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "_driver":
        return _driver(Path(argv[1]))
    print("usage: olive_peer.py _driver RUN_DIR (run by olive_quantize)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
