"""Device-runtime conformance: does an artifact load and agree with its golden samples on the
exact runtime versions its profile declares?

For each runtime version of the profile's range (oldest and newest), an isolated virtual
environment holding just that runtime (and the numpy it was built against) is created once and
cached; `_runtime_probe.py` then loads the model there and replays the golden samples. Each
version reports: installed (or why not), loads (or the runtime's own error), outputs within the
golden tolerance (metrics as `edgekit.accuracy` computes them) and p50 latency.

For a profile whose `arch` is not this host's (a Raspberry Pi on an x86 workstation), the
same probe runs the **aarch64** builds of those runtime versions under user-mode QEMU, once per
CPU model the profile names (`cpu: [cortex-a72, cortex-a76]`), in environments
`edgekit.emulation` builds and caches; the rows then say `arch: aarch64`, the CPU, and that
their latency was measured under emulation.

Cache layout (`default_cache_dir()`): `<key>/` a finished venv, `<key>.lock` the lock two runs
take before building, `.<key>.build-*` a venv being built. A venv is built in its build folder
and renamed into place only once pip succeeded, numpy and the runtime import there and the
marker file is written (both fsynced), so a killed run never leaves a half-built environment
that a later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt

from edgekit.errors import BundleError, EdgekitError, first_line
from edgekit.files import fsync_dir
from edgekit.profiles import (
    AccuracyTolerance,
    HealthCheckTolerance,
    Profile,
    RuntimePin,
    host_arch,
)
from edgekit.runtimes import dequantize

__all__ = [
    "EmulationMode",
    "RuntimeCache",
    "RuntimeCheck",
    "RuntimeConformanceError",
    "RuntimeEnvironment",
    "RuntimeInstallError",
    "ToolEnvironment",
    "ToolSpec",
    "VerifyReport",
    "Which",
    "build_cached",
    "default_cache_dir",
    "make_cache_root",
    "runtime_requirements",
    "verify_runtime",
]

log = logging.getLogger(__name__)

Which = Literal["oldest", "newest", "all"]
# auto: emulate the profile's arch when it is not the host's and QEMU is installed;
# require: the same, but an error when it cannot; off: the host's runtime builds only.
EmulationMode = Literal["auto", "require", "off"]
_EMULATION_MODES = ("auto", "require", "off")
ProgressCallback = Callable[[str], None]
Array = npt.NDArray[Any]

# Bump when the venv layout or the requirements rules change: old cache entries are then
# simply not found again (and can be deleted).
_CACHE_LAYOUT = "1"
_MARKER = "edgekit-runtime.json"
_PROBE = Path(__file__).with_name("_runtime_probe.py")
_VENV_TIMEOUT_S = 300.0
_PIP_TIMEOUT_S = 1800.0
_PROBE_TIMEOUT_S = 600.0
_EMULATED_PROBE_TIMEOUT_S = 3600.0
# Emulated fp32 runs ~330x slower than native: replay a few golden samples, time a few runs.
EMULATED_SAMPLES = 4
_EMULATED_TIMED_RUNS = 3
_IMPORT_TIMEOUT_S = 300.0
_MODEL_FILES = ("model.onnx", "model.tflite")
# What the probe imports for each runtime package (checked in a new venv before it is trusted).
_RUNTIME_MODULES = {
    "onnxruntime": "onnxruntime",
    "tflite-runtime": "tflite_runtime.interpreter",
    "ai-edge-litert": "ai_edge_litert.interpreter",
    "tensorflow": "tensorflow",
}
# pip settings that would install somewhere else than the venv being built.
_PIP_REDIRECTS = ("PIP_TARGET", "PIP_PREFIX", "PIP_ROOT", "PIP_USER")
# pip settings that decide what can be installed (part of the remembered-failure key).
_PIP_SOURCES = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX")


class RuntimeConformanceError(EdgekitError):
    """A runtime version the profile declares refuses the model or misses the tolerance."""


class RuntimeInstallError(EdgekitError):
    """A runtime version cannot be installed here (no wheel for this platform, no index)."""


# ---------------------------------------------------------------------------------------------
# Isolated runtime environments


def default_cache_dir() -> Path:
    """`$EDGEKIT_RUNTIME_CACHE`, else `$EDGEKIT_HOME/runtimes`, else `~/.cache/edgekit/runtimes`."""
    explicit = os.environ.get("EDGEKIT_RUNTIME_CACHE")
    if explicit:
        return Path(explicit)
    home = os.environ.get("EDGEKIT_HOME")
    if home:
        return Path(home) / "runtimes"
    return Path.home() / ".cache" / "edgekit" / "runtimes"


def runtime_requirements(pin: RuntimePin) -> tuple[str, ...]:
    """The pip requirements of an environment holding exactly `pin`.

    Runtimes built against numpy 1 crash or refuse to import under numpy 2, and their wheels
    do not say so: onnxruntime before 1.19, every tflite-runtime (its last release is 2.14),
    TensorFlow before 2.18.
    """
    from edgekit.converters.compat import parse_version

    version = parse_version(pin.version)
    package = "tensorflow-cpu" if pin.package == "tensorflow" else pin.package
    requirements = [f"{package}=={pin.version}"]
    numpy_1 = (
        (pin.package == "onnxruntime" and version < (1, 19))
        or pin.package == "tflite-runtime"
        or (pin.package == "tensorflow" and version < (2, 18))
    )
    if numpy_1:
        requirements.append("numpy<2")
    return tuple(requirements)


def _python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def _platform_tag() -> str:
    return sysconfig.get_platform().replace("-", "_").replace(".", "_")


@dataclass(frozen=True)
class ToolSpec:
    """A converter tool that needs its own pins (onnx2tf pins tensorflow 2.19 and numpy<2), kept
    in a cached venv of its own like a runtime version, and run there as a subprocess."""

    name: str  # the tool's package name, for the cache key and messages
    version: str
    requirements: tuple[str, ...]  # exactly what pip installs into the venv
    import_check: str  # the module(s) that must import before the venv is trusted: "a, b"


@dataclass(frozen=True)
class ToolEnvironment:
    """A ready venv holding one `ToolSpec`."""

    tool: ToolSpec
    path: Path
    created: bool  # False: found in the cache
    seconds: float  # time spent getting it (building, or just checking the cache)

    @property
    def python(self) -> Path:
        """The venv's interpreter."""
        return self.path / "bin" / "python"


@dataclass(frozen=True)
class _EnvironmentSpec:
    """What one cached venv holds, for runtimes and tools alike."""

    package: str
    version: str
    requirements: tuple[str, ...]
    module: str

    @classmethod
    def of_runtime(cls, pin: RuntimePin) -> _EnvironmentSpec:
        return cls(
            pin.package,
            pin.version,
            runtime_requirements(pin),
            _RUNTIME_MODULES.get(pin.package, pin.package.replace("-", "_")),
        )


@dataclass(frozen=True)
class RuntimeEnvironment:
    """A ready venv holding one runtime version."""

    pin: RuntimePin
    path: Path
    requirements: tuple[str, ...]
    created: bool  # False: found in the cache
    seconds: float  # time spent getting it (building, or just checking the cache)

    @property
    def python(self) -> Path:
        """The venv's interpreter."""
        return self.path / "bin" / "python"


class RuntimeCache:
    """Builds and caches one isolated venv per runtime version (and Python and platform).

    A runtime that failed to install is remembered for the rest of the process (per cache
    folder and package index settings), so checking several candidates runs pip once.
    """

    _failures: ClassVar[dict[tuple[str, ...], str]] = {}

    def __init__(self, root: Path | None = None, *, base_python: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        # Venvs are made from the base interpreter: a venv of a venv inherits nothing anyway.
        self.base_python = base_python or Path(getattr(sys, "_base_executable", sys.executable))

    def key(self, pin: RuntimePin) -> str:
        """`<package>-<version>-<python>-<platform>-<hash of the requirements>`."""
        return _key(_EnvironmentSpec.of_runtime(pin))

    def path(self, pin: RuntimePin) -> Path:
        """Where the venv for `pin` lives once built."""
        return self.root / self.key(pin)

    def ensure(
        self, pin: RuntimePin, *, progress: ProgressCallback | None = None
    ) -> RuntimeEnvironment:
        """The cached venv for `pin`, built first if needed; raises `RuntimeInstallError`."""
        spec = _EnvironmentSpec.of_runtime(pin)
        path, created, seconds = self._ensure(spec, progress=progress)
        return RuntimeEnvironment(pin, path, spec.requirements, created, seconds)

    def ensure_tool(
        self, tool: ToolSpec, *, progress: ProgressCallback | None = None
    ) -> ToolEnvironment:
        """The cached venv for a converter tool, built first if needed (`RuntimeInstallError`)."""
        spec = _EnvironmentSpec(tool.name, tool.version, tool.requirements, tool.import_check)
        path, created, seconds = self._ensure(spec, progress=progress)
        return ToolEnvironment(tool, path, created, seconds)

    def _ensure(
        self, spec: _EnvironmentSpec, *, progress: ProgressCallback | None
    ) -> tuple[Path, bool, float]:
        started = time.monotonic()
        key = _key(spec)
        final = self.root / key
        make_cache_root(self.root)
        if _usable(final):
            return final, False, time.monotonic() - started
        remembered = (str(final.absolute()), *(os.environ.get(name, "") for name in _PIP_SOURCES))
        if remembered in RuntimeCache._failures:
            raise RuntimeInstallError(RuntimeCache._failures[remembered])
        try:
            return self._ensure_locked(spec, key, started, progress=progress)
        except RuntimeInstallError as e:
            RuntimeCache._failures[remembered] = str(e)
            raise

    def _ensure_locked(
        self,
        spec: _EnvironmentSpec,
        key: str,
        started: float,
        *,
        progress: ProgressCallback | None,
    ) -> tuple[Path, bool, float]:
        requirements = spec.requirements

        def build(folder: Path) -> dict[str, Any]:
            self._build(folder, spec, progress=progress)
            _check_module(folder, spec.module, requirements)
            return {
                "package": spec.package,
                "version": spec.version,
                "requirements": list(requirements),
                "python": platform.python_version(),
                "platform": sysconfig.get_platform(),
            }

        final, created = build_cached(
            self.root, key, build=build, what=requirements[0], progress=progress
        )
        return final, created, time.monotonic() - started

    def _build(
        self, folder: Path, spec: _EnvironmentSpec, *, progress: ProgressCallback | None
    ) -> None:
        requirements = spec.requirements
        what = " ".join(requirements)
        if progress is not None:
            progress(f"creating a venv for {what}")
        _run_quiet(
            [str(self.base_python), "-m", "venv", str(folder)],
            timeout=_VENV_TIMEOUT_S,
            what=f"creating a virtual environment for {what}",
        )
        command = [
            str(folder / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--only-binary=:all:",  # a device installs wheels; building sdists proves nothing
            "--progress-bar",
            "off",
            *requirements,
        ]
        lines = _stream(command, progress=progress, prefix=f"installing {what}: ")
        if lines is None:
            return
        raise RuntimeInstallError(_install_failure(spec, lines))


def _key(spec: _EnvironmentSpec) -> str:
    """`<package>-<version>-<python>-<platform>-<hash of the requirements>`."""
    digest = hashlib.sha256(
        json.dumps([_CACHE_LAYOUT, list(spec.requirements)]).encode()
    ).hexdigest()[:10]
    return f"{spec.package}-{spec.version}-{_python_tag()}-{_platform_tag()}-{digest}"


def _check_import(venv: Path, pin: RuntimePin, requirements: Sequence[str]) -> None:
    """Import numpy and the runtime in the new venv: pip succeeding is not enough (a wheel
    built against another numpy, a missing system library)."""
    _check_module(venv, _EnvironmentSpec.of_runtime(pin).module, requirements)


def _check_module(venv: Path, module: str, requirements: Sequence[str]) -> None:
    _run_quiet(
        [str(venv / "bin" / "python"), "-I", "-c", f"import numpy, {module}"],
        timeout=_IMPORT_TIMEOUT_S,
        what=f"importing {module} after installing {' '.join(requirements)}",
    )


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _usable(venv: Path) -> bool:
    python = venv / "bin" / "python"
    return (venv / _MARKER).is_file() and python.exists()  # exists() follows the symlink


def make_cache_root(root: Path) -> None:
    """Create the runtime cache folder; raises `RuntimeInstallError` naming what to do."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeInstallError(
            f"cannot create the runtime cache {root}: {e}; pass --cache-dir or set "
            "EDGEKIT_RUNTIME_CACHE to a writable folder"
        ) from e


def build_cached(
    root: Path,
    key: str,
    *,
    build: Callable[[Path], dict[str, Any]],
    what: str,
    progress: ProgressCallback | None,
    marker: str = _MARKER,
    ready: Callable[[Path], bool] = _usable,
) -> tuple[Path, bool]:
    """`root/key`, built first by `build(folder)` if it is not there yet: (path, created).

    The folder is built in `root/.key.build-*` under the lock `root/key.lock` and renamed into
    place only after `build` returned and the marker file (`build`'s JSON document plus the
    build time) was written and fsynced, so a killed run never leaves a folder a later run
    would trust; leftovers of interrupted builds are removed by the next one. `ready(folder)`
    tells a finished folder (default: a venv with its marker file).
    """
    final = root / key
    if ready(final):
        return final, False
    started = time.monotonic()
    with _locked(root / f"{key}.lock", progress=progress, what=what):
        if ready(final):  # another run built it while we waited
            return final, False
        for stale in root.glob(f".{key}.build-*"):
            log.info("removing %s left by an interrupted build", stale)
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists() or final.is_symlink():
            log.info("removing unusable cached folder %s", final)
            shutil.rmtree(final, ignore_errors=True)
        building = Path(tempfile.mkdtemp(prefix=f".{key}.build-", dir=root))
        try:
            document = build(building)
            seconds = time.monotonic() - started
            document = {
                **document,
                "build_seconds": round(seconds, 1),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            _write_synced(building / marker, json.dumps(document, indent=2) + "\n")
            fsync_dir(building)
            os.rename(building, final)
            fsync_dir(root)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    log.info("built %s in %.1f s", final, seconds)
    return final, True


@contextlib.contextmanager
def _locked(path: Path, *, progress: ProgressCallback | None, what: str) -> Iterator[None]:
    import fcntl

    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress is not None:
                progress(f"waiting for another edgekit run installing {what}")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _clean_env() -> dict[str, str]:
    """The environment for child interpreters: nothing of ours leaks into the venv."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", *_PIP_REDIRECTS)
    }
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _run_quiet(command: Sequence[str], *, timeout: float, what: str) -> None:
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=_clean_env(), check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeInstallError(f"{what} failed: {first_line(e)}") from e
    if completed.returncode != 0:
        detail = (completed.stderr or completed.stdout).strip().splitlines()
        raise RuntimeInstallError(f"{what} failed: {detail[-1] if detail else 'no output'}")


def _stream(
    command: Sequence[str], *, progress: ProgressCallback | None, prefix: str
) -> list[str] | None:
    """Run pip, passing each line to `progress`; None on success, else its output lines."""
    lines: list[str] = []
    try:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_clean_env(),
        )
    except OSError as e:
        return [f"ERROR: cannot run pip: {e}"]
    stdout = process.stdout
    assert stdout is not None

    def read() -> None:  # in a thread: the time limit must hold while pip prints nothing
        for line in stdout:
            lines.append(line.rstrip())
            if progress is not None and line.strip():
                progress(prefix + line.strip()[:100])

    reader = threading.Thread(target=read, name="edgekit-pip-output", daemon=True)
    with process:
        reader.start()
        try:
            returncode = process.wait(timeout=_PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            reader.join(timeout=5.0)
            lines.append(f"ERROR: pip did not finish within {_PIP_TIMEOUT_S:.0f} s")
            return lines
        reader.join()
    return None if returncode == 0 else lines


def _install_failure(spec: _EnvironmentSpec, lines: Sequence[str]) -> str:
    errors = [line.removeprefix("ERROR: ").strip() for line in lines if line.startswith("ERROR")]
    detail = errors[-1] if errors else (lines[-1] if lines else "pip failed without output")
    where = f"{_python_tag()} {sysconfig.get_platform()}"
    if any(
        "No matching distribution" in line or "Could not find a version" in line for line in errors
    ):
        return (
            f"{spec.package} {spec.version} cannot be installed here: no wheel for {where} on the "
            f"configured package index (pip: {detail})"
        )
    return f"{spec.package} {spec.version} cannot be installed here ({where}): pip: {detail}"


# ---------------------------------------------------------------------------------------------
# Checking one runtime version


@dataclass
class RuntimeCheck:
    """What one runtime version did with the model."""

    end: str  # "oldest", "newest" or "oldest+newest"
    package: str
    version: str
    requirements: tuple[str, ...] = ()
    arch: str = field(default_factory=host_arch)
    cpu: str | None = None  # the emulated CPU model; None: this host's CPU
    emulated: bool = False
    installed: bool = False
    install_error: str | None = None
    install_seconds: float | None = None
    cached: bool = False
    loads: bool | None = None
    load_error: str | None = None
    run_error: str | None = None
    within_tolerance: bool | None = None  # None: no golden samples to compare with
    failures: tuple[str, ...] = ()
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: int = 0
    samples_available: int | None = None  # golden samples in the file (emulation replays a few)
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    reported_version: str | None = None
    numpy_version: str | None = None
    machine: str | None = None  # what the runtime's process saw (`aarch64` under emulation)
    notes: list[str] = field(default_factory=list)

    @property
    def runtime(self) -> str:
        """`package version`, plus `on <cpu>` for an emulated row."""
        base = f"{self.package} {self.version}"
        return f"{base} on {self.cpu}" if self.cpu else base

    @property
    def latency_source(self) -> str:
        """Where the latency was measured: `emulated:<cpu>` (QEMU on this host, not the
        device's latency) or `host`."""
        return f"emulated:{self.cpu}" if self.emulated else "host"

    @property
    def status(self) -> str:
        """`pass`, `fail`, or `not installed` (neither pass nor fail: nothing was checked)."""
        if not self.installed:
            return "not installed"
        if self.loads and self.run_error is None and self.within_tolerance is not False:
            return "pass"
        return "fail"

    @property
    def reason(self) -> str:
        """Why it did not pass, in one line ('' when it passed)."""
        if not self.installed:
            return self.install_error or "not installed"
        if not self.loads:
            return f"refuses the model: {self.load_error}"
        if self.run_error is not None:
            return f"loads but fails to run the samples: {self.run_error}"
        if self.within_tolerance is False:
            return "outputs outside the golden tolerance: " + "; ".join(self.failures)
        return ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "end": self.end,
            "package": self.package,
            "version": self.version,
            "arch": self.arch,
            "cpu": self.cpu,
            "emulated": self.emulated,
            "status": self.status,
            "reason": self.reason,
            "requirements": list(self.requirements),
            "installed": self.installed,
            "install_error": self.install_error,
            "install_seconds": self.install_seconds,
            "cached": self.cached,
            "loads": self.loads,
            "load_error": self.load_error,
            "run_error": self.run_error,
            "within_tolerance": self.within_tolerance,
            "failures": list(self.failures),
            "metrics": self.metrics,
            "samples": self.samples,
            "samples_available": self.samples_available,
            "latency_ms": {
                "p50": self.latency_p50_ms,
                "p95": self.latency_p95_ms,
                "source": self.latency_source,
            },
            "reported_version": self.reported_version,
            "numpy_version": self.numpy_version,
            "machine": self.machine,
            "notes": list(self.notes),
        }


@dataclass
class VerifyReport:
    """Per runtime version: installed, loads, within tolerance, latency."""

    source: Path
    model: str
    profile: str
    golden: str  # where the samples came from, or that there were none
    signature: str  # what was checked of the bundle's signatures
    checks: list[RuntimeCheck]
    static_blockers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    arch: str = field(default_factory=host_arch)  # the arch the rows ran as
    emulated_cpus: tuple[str, ...] = ()

    @property
    def failed(self) -> list[RuntimeCheck]:
        """Installed runtime versions that refused the model or missed the tolerance."""
        return [check for check in self.checks if check.status == "fail"]

    @property
    def not_installed(self) -> list[RuntimeCheck]:
        """Runtime versions that could not be installed here (reported, not failed)."""
        return [check for check in self.checks if check.status == "not installed"]

    @property
    def oldest_unchecked_but_blocked(self) -> bool:
        """The oldest runtime could not be run here, but the model's op versions block it."""
        oldest = [check for check in self.checks if check.end.startswith("oldest")]
        return bool(self.static_blockers) and all(not check.installed for check in oldest)

    @property
    def passed(self) -> bool:
        """Every installed version passed, at least one was checked, nothing blocks statically."""
        checked = [check for check in self.checks if check.installed]
        return bool(checked) and not self.failed and not self.oldest_unchecked_but_blocked

    def problems(self) -> list[str]:
        """One line per failure (what `RuntimeConformanceError` says)."""
        lines = [f"{check.runtime}: {check.reason}" for check in self.failed]
        if self.oldest_unchecked_but_blocked:
            oldest = next(check for check in self.checks if check.end.startswith("oldest"))
            lines.append(
                f"{oldest.runtime} (not installable here, checked statically) cannot load "
                + ", ".join(self.static_blockers)
            )
        if not any(check.installed for check in self.checks):
            lines.append("no runtime version of the profile could be installed: nothing verified")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "schema": "edgekit.verify_runtime/v1",
            "source": str(self.source),
            "model": self.model,
            "profile": self.profile,
            "golden": self.golden,
            "signature": self.signature,
            "passed": self.passed,
            "problems": self.problems(),
            "static_blockers": list(self.static_blockers),
            "runtimes": [check.to_dict() for check in self.checks],
            "target": {
                "arch": self.arch,
                "emulated": bool(self.emulated_cpus),
                "cpus": list(self.emulated_cpus),
            },
            "notes": list(self.notes),
            "host": {
                "python": platform.python_version(),
                "platform": sysconfig.get_platform(),
            },
        }

    def raise_for_failures(self) -> None:
        """Raise `RuntimeConformanceError` naming each failing runtime version, if any."""
        if not self.passed:
            raise RuntimeConformanceError(
                f"{self.model} does not run on every runtime of profile {self.profile}: "
                + "; ".join(self.problems())
            )


# ---------------------------------------------------------------------------------------------
# The check


@dataclass(frozen=True)
class _Subject:
    model: Path
    golden: Path | None
    golden_label: str
    signature: str
    notes: tuple[str, ...] = ()


def verify_runtime(
    source: Path,
    profile: Profile,
    *,
    cache_dir: Path | None = None,
    which: Which = "all",
    trust: Path | None = None,
    threads: int | None = None,
    latency_seconds: float = 1.0,
    emulation: EmulationMode | None = None,
    cpus: Sequence[str] | None = None,
    emulated_samples: int = EMULATED_SAMPLES,
    progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Load `source` (a bundle, a model file, or a converter output folder) in each runtime
    version `profile` declares and replay its golden samples there.

    When the profile's arch is not this host's, each version's build for the device's arch runs
    under QEMU once per CPU model of `profile.cpu` (or `cpus`, a subset), replaying the first
    `emulated_samples` golden samples. `emulation` (default: `$EDGEKIT_EMULATION`, else
    `auto`) is `auto` (emulate when possible, else check on the host and say so), `require`
    or `off`.

    Never raises for a runtime that refuses or cannot be installed: that is the report's
    content (`VerifyReport.passed`, `raise_for_failures`). Raises `EdgekitError` when the
    source itself is unusable (unreadable, untrusted bundle, wrong format for the profile), or
    when emulation is required but impossible.
    """
    cache = RuntimeCache(cache_dir)
    source = Path(source)
    mode = _mode(emulation)
    targets, emulation_note = _emulation_targets(profile, mode, cpus)
    with tempfile.TemporaryDirectory(prefix="edgekit-verify-runtime-") as scratch:
        workdir = Path(scratch)
        subject = _resolve(source, workdir, trust=trust, progress=progress)
        _check_format(subject.model, profile)
        report = VerifyReport(
            source=source,
            model=subject.model.name,
            profile=profile.name,
            golden=subject.golden_label,
            signature=subject.signature,
            checks=[],
            notes=list(subject.notes),
        )
        if emulation_note:
            report.notes.append(emulation_note)
        if subject.model.suffix == ".tflite":
            from edgekit.converters.tflite_compat import blocking_ops

            report.static_blockers = blocking_ops(subject.model, profile)
        elif subject.model.suffix == ".onnx":
            report.static_blockers = _onnx_blockers(subject.model, profile.runtime.oldest)
        golden_reference = _read_golden(subject.golden) if subject.golden else None
        tolerance = golden_reference[1] if golden_reference else profile.health_check.to_dict()
        used_threads = threads or max(1, min(profile.threads, os.cpu_count() or 1))
        run = _Run(subject, workdir, used_threads, latency_seconds, golden_reference, tolerance)
        if targets:
            report.arch = profile.arch
            report.emulated_cpus = tuple(targets)
            _check_emulated(
                report,
                profile,
                which,
                targets,
                run,
                cache_root=cache.root,
                samples=emulated_samples,
                required=mode == "require",
                progress=progress,
            )
            return report
        for end, pin in _selected(profile, which):
            check = RuntimeCheck(
                end=end,
                package=pin.package,
                version=pin.version,
                requirements=runtime_requirements(pin),
            )
            report.checks.append(check)
            try:
                environment = cache.ensure(pin, progress=progress)
            except RuntimeInstallError as e:
                check.install_error = str(e)
                log.warning("%s", e)
                continue
            check.installed = True
            check.cached = not environment.created
            check.install_seconds = round(environment.seconds, 2)
            if progress is not None:
                progress(f"loading {subject.model.name} in {pin.package} {pin.version}")
            run.probe(check, [str(environment.python)], environment.path, pin.package)
    return report


@dataclass(frozen=True)
class _Run:
    """What every runtime row of one check shares."""

    subject: _Subject
    workdir: Path
    threads: int
    latency_seconds: float
    golden_reference: tuple[dict[str, list[Array]], dict[str, float]] | None
    tolerance: dict[str, float]

    def probe(
        self,
        check: RuntimeCheck,
        interpreter: Sequence[str],
        environment: Path,
        engine: str,
        *,
        max_samples: int | None = None,
    ) -> None:
        """Run the probe with `interpreter` and compare its outputs with the golden ones."""
        outputs = self.workdir / f"{check.end}-{check.cpu or 'host'}-outputs.npz"
        _probe(
            check,
            interpreter,
            environment,
            engine,
            self.subject,
            workdir=self.workdir,
            outputs=outputs,
            threads=self.threads,
            latency_seconds=self.latency_seconds,
            max_samples=max_samples,
        )
        if self.golden_reference is not None and check.loads and check.run_error is None:
            expected = self.golden_reference[0]
            if max_samples is not None:
                expected = {name: arrays[:max_samples] for name, arrays in expected.items()}
            _compare(check, expected, self.tolerance, outputs)


def _mode(emulation: str | None) -> EmulationMode:
    chosen = emulation or os.environ.get("EDGEKIT_EMULATION") or "auto"
    if chosen not in _EMULATION_MODES:
        raise EdgekitError(
            f"emulation mode {chosen!r} (--emulation or EDGEKIT_EMULATION): expected one of "
            f"{', '.join(_EMULATION_MODES)}"
        )
    return chosen  # type: ignore[return-value]


def _emulation_targets(
    profile: Profile, mode: EmulationMode, cpus: Sequence[str] | None
) -> tuple[list[str], str | None]:
    """The CPU models to emulate (empty: check on the host) and a note when a profile whose
    arch is not the host's is checked on the host all the same."""
    from edgekit.emulation import EmulationError, find_qemu

    host = host_arch()
    if cpus:
        unknown = [cpu for cpu in cpus if cpu not in profile.cpu]
        if unknown:
            raise EdgekitError(
                f"--cpu {unknown[0]}: profile {profile.name} names the CPUs "
                f"{', '.join(profile.cpu) or '(none)'}; pick one of them"
            )
    if profile.arch == host:
        return [], None
    unverified = (
        f"profile {profile.name} runs on {profile.arch} but was checked with this host's "
        f"{host} runtime builds (outputs and latency from {host} kernels, not the device's)"
    )
    if mode == "off":
        return [], f"{unverified}: emulation off"
    if not profile.cpu:
        if mode == "require":
            raise EdgekitError(
                f"profile {profile.name} names no CPU to emulate; add `cpu:` to it (e.g. "
                "cortex-a72) or check on the host with --emulation off"
            )
        return [], f"{unverified}: the profile names no `cpu:` to emulate"
    try:
        find_qemu(profile.arch)
    except EmulationError as e:
        if mode == "require":
            raise
        return [], f"{unverified}: {e}"
    return list(cpus or profile.cpu), None


def _check_emulated(
    report: VerifyReport,
    profile: Profile,
    which: Which,
    targets: Sequence[str],
    run: _Run,
    *,
    cache_root: Path,
    samples: int,
    required: bool,
    progress: ProgressCallback | None,
) -> None:
    """One row per (runtime version x CPU model), each under QEMU in the aarch64 build."""
    from edgekit.emulation import EmulationCache, EmulationError

    emulation = EmulationCache(cache_root, arch=profile.arch)
    for end, pin in _selected(profile, which):
        rows = [
            RuntimeCheck(
                end=end,
                package=pin.package,
                version=pin.version,
                requirements=runtime_requirements(pin),
                arch=profile.arch,
                cpu=cpu,
                emulated=True,
            )
            for cpu in targets
        ]
        report.checks.extend(rows)
        try:
            environment = emulation.runtime(pin, progress=progress)
        except EmulationError as e:
            if required:
                raise
            for check in rows:
                check.install_error = f"cannot emulate {profile.arch} here: {e}"
            log.warning("%s", e)
            continue
        except RuntimeInstallError as e:
            for check in rows:
                check.install_error = str(e)
            log.warning("%s", e)
            continue
        for check in rows:
            check.installed = True
            check.cached = not environment.created
            check.install_seconds = round(environment.seconds, 2)
            cpu = str(check.cpu)
            if progress is not None:
                progress(
                    f"loading {run.subject.model.name} in {pin.package} {pin.version} "
                    f"({profile.arch}, emulated {cpu})"
                )
            run.probe(
                check,
                environment.command([], cpu=cpu),
                environment.path,
                pin.package,
                max_samples=samples,
            )


def _onnx_blockers(model: Path, pin: RuntimePin) -> list[str]:
    """What keeps `pin` (an onnxruntime release) from loading `model`, judged by the model's IR
    version and opsets against the release's limits (`converters.compat`); the fallback when
    that release cannot be installed here."""
    from edgekit.converters.compat import onnx_limits_for_onnxruntime

    runtime = f"{pin.package} {pin.version}"
    try:
        limits = onnx_limits_for_onnxruntime(pin.version)
    except ValueError as e:
        return [f"no known ONNX limits for {runtime} ({e})"]  # fail closed
    try:
        import onnx

        header = onnx.load(str(model), load_external_data=False)
    except ImportError:
        return [f"the onnx package is not installed, so {model.name} was not checked statically"]
    except Exception as e:  # noqa: BLE001  (onnx raises several types for a bad file)
        return [f"{model.name} is not a readable ONNX model ({first_line(e)})"]
    found: list[str] = []
    if header.ir_version > limits.max_ir_version:
        found.append(
            f"IR version {header.ir_version} ({runtime} loads up to {limits.max_ir_version})"
        )
    for opset in header.opset_import:
        if opset.domain in ("", "ai.onnx"):
            newest, name = limits.max_opset, "ai.onnx"
        elif opset.domain == "ai.onnx.ml":
            newest, name = limits.max_ml_opset, "ai.onnx.ml"
        else:
            continue
        if opset.version > newest:
            found.append(f"{name} opset {opset.version} ({runtime} loads up to {newest})")
    return found


def _selected(profile: Profile, which: Which) -> list[tuple[str, RuntimePin]]:
    oldest, newest = profile.runtime.oldest, profile.runtime.newest
    if which == "oldest":
        return [("oldest", oldest)]
    if which == "newest":
        return [("newest", newest)]
    if oldest == newest:
        return [("oldest+newest", oldest)]
    return [("oldest", oldest), ("newest", newest)]


def _check_format(model: Path, profile: Profile) -> None:
    kind = {".onnx": "onnx", ".tflite": "tflite"}.get(model.suffix)
    if kind is None:
        raise EdgekitError(
            f"{model}: expected a .onnx or .tflite model, a .ekb bundle or a converter output "
            "folder"
        )
    if kind != profile.target_format:
        names = {"onnx": "ONNX", "tflite": "TFLite"}
        found = names.get(kind, kind)
        raise EdgekitError(
            f"{model.name} is {'an' if found[0] in 'AEIOU' else 'a'} {found} model but profile "
            f"{profile.name} runs {names.get(profile.target_format, profile.target_format)} "
            f"models ({profile.runtime.oldest.package}); pick a profile whose target format is "
            f"{kind} (see `edgekit profiles list`)"
        )


def _resolve(
    source: Path, workdir: Path, *, trust: Path | None, progress: ProgressCallback | None
) -> _Subject:
    if not source.exists():
        raise EdgekitError(f"{source} does not exist; give a .ekb bundle, a model or a folder")
    if source.suffix == ".ekb" and source.is_file():
        if progress is not None:
            progress(f"verifying and extracting {source.name}")
        return _extract(source, workdir / "bundle", trust=trust)
    model = source
    if source.is_dir():
        models = [source / name for name in _MODEL_FILES if (source / name).is_file()]
        if len(models) != 1:
            raise EdgekitError(
                f"{source} holds {'no' if not models else 'both a'} model.onnx or model.tflite; "
                "give the model file itself"
            )
        model = models[0]
    subject = _beside(model, signature="n/a (not a bundle)")
    if trust is not None:
        return replace(subject, notes=(*subject.notes, f"--trust {trust} ignored: not a bundle"))
    return subject


def _beside(model: Path, *, signature: str) -> _Subject:
    golden = model.with_name("golden.npz")
    if golden.is_file():
        return _Subject(model, golden, f"golden.npz beside {model.name}", signature)
    return _Subject(
        model,
        None,
        "none (synthetic inputs: loads and latency only, outputs not compared)",
        signature,
    )


def _extract(bundle: Path, dest: Path, *, trust: Path | None) -> _Subject:
    from edgekit.bundle import extract_bundle, inspect_bundle

    if trust is not None:
        from datetime import datetime, timezone

        from edgekit.trust import load_truststore_file

        store = load_truststore_file(trust, now=datetime.now(timezone.utc))
        with open(bundle, "rb") as handle:
            verified = extract_bundle(handle, dest, trust=store)
        signed_by = ", ".join(sorted(verified.signed_by))
        manifest = verified.manifest
        signature = f"verified against {trust} (signed by {signed_by})"
        files = {f.entry.path: dest / f.entry.path for f in verified.files}
    else:
        # Structure only: layout, manifest and every file's sha256, then copy each file out
        # and hash it again while copying (the bundle could change in between).
        with open(bundle, "rb") as handle:
            inspection = inspect_bundle(handle)
        manifest = inspection.manifest
        signature = "not checked (no --trust given); layout and file hashes verified"
        dest.mkdir(parents=True, exist_ok=True)
        files = {}
        with open(bundle, "rb") as handle:
            for item in inspection.files:
                target = dest / item.entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                _copy_checked(
                    handle,
                    item.offset_bytes,
                    item.entry.size_bytes,
                    target,
                    expected_sha256=item.entry.sha256,
                    where=f"{bundle}:{item.entry.path}",
                )
                files[item.entry.path] = target
    models = [path for name, path in files.items() if _role(manifest, name) == "model"]
    loadable = [path for path in models if path.suffix in (".onnx", ".tflite")]
    if len(loadable) != 1:
        raise EdgekitError(
            f"{bundle}: expected exactly one .onnx or .tflite model in the bundle, found "
            f"{[path.name for path in models] or 'none'}"
        )
    golden_files = [path for name, path in files.items() if _role(manifest, name) == "golden"]
    notes = []
    if golden_files:
        golden: Path | None = golden_files[0]
        label = f"the bundle's {golden_files[0].name}"
    else:
        golden = None
        label = "none in the bundle (synthetic inputs: loads and latency only)"
    notes.append(f"bundle {manifest.name} {manifest.version} built for profile {manifest.profile}")
    return _Subject(loadable[0], golden, label, signature, tuple(notes))


def _role(manifest: Any, path: str) -> str:
    role: str = manifest.file(path).role
    return role


def _copy_checked(
    handle: Any, offset: int, size: int, target: Path, *, expected_sha256: str, where: str
) -> None:
    digest = hashlib.sha256()
    handle.seek(offset)
    remaining = size
    with open(target, "wb") as out:
        while remaining:
            chunk = handle.read(min(remaining, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            out.write(chunk)
            remaining -= len(chunk)
    if remaining or digest.hexdigest() != expected_sha256:
        raise BundleError(f"{where} changed while being read: verify the bundle again")


def _read_golden(path: Path) -> tuple[dict[str, list[Array]], dict[str, float]]:
    """Expected outputs (name -> per-sample arrays) and the tolerance of a golden.npz.

    Outputs with a `quantization/outputs/<name>` entry are dequantized to real values; older
    files without one keep the stored values (`_compare` dequantizes integer ones with the
    runtime's own scale and zero point).
    """
    expected: dict[str, dict[int, Array]] = {}
    tolerance: dict[str, float] = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            quantization = _quantization(archive)
            for key in archive.files:
                parts = key.split("/", 2)
                if len(parts) == 3 and parts[0] == "outputs" and parts[1].isdecimal():
                    expected.setdefault(parts[2], {})[int(parts[1])] = dequantize(
                        archive[key], quantization.get(parts[2])
                    )
            if "tolerance" in archive.files:
                loaded = json.loads(str(archive["tolerance"]))
                tolerance = {str(k): float(v) for k, v in loaded.items()}
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise EdgekitError(f"{path}: not a readable golden.npz ({first_line(e)})") from e
    ordered = {name: [arrays[i] for i in sorted(arrays)] for name, arrays in expected.items()}
    return ordered, tolerance or HealthCheckTolerance().to_dict()


def _quantization(archive: Any) -> dict[str, tuple[float, int]]:
    """`quantization/outputs/<name>` = [scale, zero_point] entries of an open .npz, by name."""
    found: dict[str, tuple[float, int]] = {}
    for key in archive.files:
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[:2] == ["quantization", "outputs"]:
            values = np.ravel(archive[key])
            if values.size == 2 and float(values[0]) > 0:
                found[parts[2]] = (float(values[0]), int(values[1]))
    return found


def _probe(
    check: RuntimeCheck,
    interpreter: Sequence[str],
    environment: Path,
    engine: str,
    subject: _Subject,
    *,
    workdir: Path,
    outputs: Path,
    threads: int,
    latency_seconds: float,
    max_samples: int | None,
) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{check.end}-", dir=workdir))
    probe = run_dir / "probe.py"
    shutil.copyfile(_PROBE, probe)
    result_path = run_dir / "result.json"
    request: dict[str, Any] = {
        "engine": engine,
        "model": str(subject.model.absolute()),
        "golden": str(subject.golden.absolute()) if subject.golden else None,
        "threads": threads,
        "latency_seconds": latency_seconds,
        "result": str(result_path),
        "outputs": str(outputs),
    }
    timeout = _PROBE_TIMEOUT_S
    env = _clean_env()
    if check.emulated:
        from edgekit.emulation import emulation_env

        request.update(max_samples=max_samples, warmup=1, max_runs=_EMULATED_TIMED_RUNS)
        timeout = _EMULATED_PROBE_TIMEOUT_S
        env = emulation_env()
    request_path = run_dir / "request.json"
    request_path.write_text(json.dumps(request))
    command = [*interpreter, "-I", str(probe), str(request_path)]
    try:
        completed = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=run_dir,
            check=False,
        )
        crash = completed.returncode
        stderr_tail = completed.stderr.strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        crash = None
        stderr_tail = [f"timed out after {timeout:.0f} s"]
    except OSError as e:
        raise RuntimeInstallError(
            f"cannot run {interpreter[0]} ({check.runtime}): {first_line(e)}; delete "
            f"{environment} so that the next run installs it again"
        ) from e
    result: dict[str, Any] = {}
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    stage = result.get("stage", "not started")
    check.reported_version = result.get("runtime_version")
    check.numpy_version = result.get("numpy_version")
    check.machine = result.get("machine")
    check.notes.extend(result.get("notes", []))
    died = crash != 0
    if stage == "import_failed" and check.emulated:
        # It imported on the build's check CPU: not importing on this core is the device's
        # failure (a wheel built for newer cores), not a broken install.
        check.loads = False
        check.load_error = (
            f"the runtime does not import on {check.cpu}: {_short(result.get('import_error', ''))}"
        )
        return
    if stage == "import_failed":
        # The runtime itself is broken here: nothing was said about the model.
        check.installed = False
        check.install_error = (
            f"{check.runtime} is installed in {environment} but does not import: "
            f"{_short(result.get('import_error', ''))}; delete that folder to reinstall it"
        )
        return
    if stage == "load_failed":
        check.loads = False
        check.load_error = _short(result.get("load_error", ""))
    elif stage in ("started", "not started"):
        check.loads = False
        check.load_error = _died("while loading the model", crash, stderr_tail)
    else:
        check.loads = True
        if stage == "run_failed":
            check.run_error = _short(result.get("run_error", ""))
        elif stage != "ran" or died:
            check.run_error = _died("while running the samples", crash, stderr_tail)
        else:
            check.samples = int(result.get("samples", 0))
            available = result.get("samples_available")
            check.samples_available = int(available) if available is not None else None
            latency = result.get("latency_ms") or {}
            check.latency_p50_ms = latency.get("p50")
            check.latency_p95_ms = latency.get("p95")


def _died(when: str, code: int | None, stderr_tail: Sequence[str]) -> str:
    if code is None:
        how = stderr_tail[0] if stderr_tail else "timed out"
    elif code < 0:
        how = f"crashed with signal {-code}"
    else:
        how = f"exited with status {code}"
    detail = f" ({' | '.join(stderr_tail)})" if stderr_tail and code is not None else ""
    return f"the runtime process {how} {when}{detail}"


def _short(message: str) -> str:
    """The runtime's own message, first lines only (TFLite appends a 'Registration failed.')."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[0] if lines else "no message"


def _compare(
    check: RuntimeCheck,
    expected: Mapping[str, Sequence[Array]],
    tolerance: Mapping[str, float],
    outputs_path: Path,
) -> None:
    from edgekit.accuracy import compare_outputs

    with np.load(outputs_path, allow_pickle=False) as archive:
        quantization = _quantization(archive)
        per_name: dict[str, dict[int, Array]] = {}
        for key in archive.files:
            kind, index, name = key.split("/", 2)
            if kind == "outputs":
                per_name.setdefault(name, {})[int(index)] = archive[key]
    # Quantized outputs are compared as real values: scale * (stored - zero_point).
    found: dict[str, list[Array]] = {
        name: [dequantize(arrays[i], quantization.get(name)) for i in sorted(arrays)]
        for name, arrays in per_name.items()
    }
    missing = sorted(set(expected) - set(found))
    if missing:
        check.within_tolerance = False
        check.failures = tuple(f"{name}: not produced by the model" for name in missing)
        return
    # A golden.npz without quantization entries (older converters): its integer outputs come
    # from the same model, so the runtime's scale and zero point apply to them too.
    expected = {
        name: [dequantize(a, quantization.get(name)) for a in arrays]
        for name, arrays in expected.items()
    }
    accuracy = AccuracyTolerance(
        min_top1_agreement=float(tolerance.get("min_top1_agreement", 0.0)),
        min_cosine=float(tolerance.get("min_cosine", 0.0)),
    )
    result = compare_outputs(expected, found, accuracy)
    failures = list(result.failures)
    rtol, atol = float(tolerance.get("rtol", 0.0)), float(tolerance.get("atol", 0.0))
    for metric in result.outputs:
        reference = np.concatenate([np.ravel(a).astype(np.float64) for a in expected[metric.name]])
        candidate = np.concatenate([np.ravel(a).astype(np.float64) for a in found[metric.name]])
        outside = int(
            np.count_nonzero(np.abs(candidate - reference) > atol + rtol * np.abs(reference))
        )
        check.metrics[metric.name] = {
            "cosine": metric.cosine,
            "max_abs_error": metric.max_abs_error,
            "top1_agreement": metric.top1_agreement,
            "values_outside_rtol_atol": outside,
        }
        if outside:
            failures.append(
                f"{metric.name}: {outside} of {reference.size} values differ by more than "
                f"atol {atol} + rtol {rtol} (max abs error {metric.max_abs_error:.4g})"
            )
    check.within_tolerance = not failures
    check.failures = tuple(failures)
