"""The active model of a device, served to many threads, swapped without failing a request.

`ModelHost` holds the active `Runtime`. `infer` checks the request's inputs against the
model's `TensorSpec`s, runs it, and records request, error and latency statistics (for the
telemetry interval, and since the model was activated for probation). `activate` is a hot
swap: a request takes a reference to the model that is active when it starts and finishes on
it; the replaced runtime is released (closed if it has `close()`, then dropped) when its last
in-flight request ends. `set_shadow` runs a candidate model on a sample of live requests in a
bounded background worker and counts how often it agrees with the active model.

Python API for in-process inference::

    from edgekit.agent.serving import load_model
    host = load_model(Path("model.onnx"))
    outputs = host.infer({"input": batch})

Stdlib, numpy and `edgekit.runtimes` only (no onnx, tensorflow or converter code).
"""

from __future__ import annotations

import json
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgekit.errors import EdgekitError, first_line
from edgekit.messages import BundleId
from edgekit.runtimes import Runtime, TensorSpec, open_runtime

from .telemetry import DriftMonitor, RequestStats, StatsSnapshot

__all__ = [
    "InferenceError",
    "InferenceInputError",
    "InferenceRuntimeError",
    "ModelHost",
    "NoModelError",
    "OutputComparison",
    "ShadowReport",
    "allclose_comparison",
    "constrains",
    "load_model",
    "read_golden_tolerance",
]

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]
OutputComparison = Callable[[Mapping[str, Array], Mapping[str, Array]], bool]
"""`compare(active_outputs, candidate_outputs) -> agreed` for shadow mode."""

# Used for shadow comparison when neither the caller nor the bundle's golden tolerance says
# otherwise: the profile defaults of the health check (edgekit.profiles.HealthCheckTolerance).
DEFAULT_RTOL = 0.05
DEFAULT_ATOL = 0.05
SHADOW_QUEUE_DEPTH = 4


class InferenceError(EdgekitError):
    """Base of the errors `ModelHost.infer` raises."""


class InferenceInputError(InferenceError):
    """The request's inputs do not match the model's (name, dtype, rank or shape)."""


class NoModelError(InferenceError):
    """No model is active yet (the agent has not installed one)."""


class InferenceRuntimeError(InferenceError):
    """The runtime failed while running a valid request."""


_DIMENSION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UNKNOWN_NAME = re.compile(r"unk__[0-9]+")  # what ONNX shape inference names an unknown dim


def constrains(symbol: str | None) -> bool:
    """Whether a symbolic dimension names a size that must agree wherever it appears.

    An identifier (`N`, `batch`, `height`, `s0`) does; what exporters write for "unknown"
    does not: `?`, `-1`, an empty name, None, `unk__<n>`, or anything else that is not an
    identifier. onnxruntime itself checks only fixed dimensions, so this is the most a
    request can be held to beyond them.
    """
    return (
        symbol is not None
        and _DIMENSION_NAME.fullmatch(symbol) is not None
        and _UNKNOWN_NAME.fullmatch(symbol) is None
    )


@dataclass(frozen=True)
class _InputPlan:
    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | str | None, ...]
    # per axis: the fixed size, the symbol that must agree, or None (anything goes)
    rules: tuple[int | str | None, ...]


def _rule(dim: int | str | None) -> int | str | None:
    if isinstance(dim, int):
        return dim if dim >= 0 else None
    return dim if constrains(dim) else None


def _plan(specs: tuple[TensorSpec, ...]) -> tuple[_InputPlan, ...]:
    plans = []
    for spec in specs:
        try:
            dtype = np.dtype(spec.dtype)
        except TypeError:
            dtype = np.dtype(object)  # strings and types numpy does not name
        shape = tuple(spec.shape)
        plans.append(_InputPlan(spec.name, dtype, shape, tuple(_rule(dim) for dim in shape)))
    return tuple(plans)


def _check_inputs(
    plans: tuple[_InputPlan, ...], feeds: Mapping[str, Any], *, model: str
) -> dict[str, Array]:
    """The feeds as arrays of the model's dtypes, or InferenceInputError naming the problem.

    The one input check of the device: REST requests, in-process calls, shadow runs and the
    health check's golden samples all pass through it before the runtime sees them.
    """
    if not isinstance(feeds, Mapping):
        raise InferenceInputError(
            f"inputs must be a mapping of input name to array; found {type(feeds).__name__}"
        )
    checked: dict[str, Array] = {}
    symbols: dict[str, tuple[int, str]] = {}
    for plan in plans:
        value = feeds.get(plan.name)
        if value is None:
            unknown = sorted(str(name) for name in feeds if name not in {p.name for p in plans})
            found = f" (found unknown {', '.join(map(repr, unknown))})" if unknown else ""
            raise InferenceInputError(
                f"missing input {plan.name!r}{found}; {model} expects {_names(plans)}"
            )
        array = value if isinstance(value, np.ndarray) else _as_array(value, plan.name)
        if array.dtype != plan.dtype:
            array = _cast(array, plan)
        if array.ndim != len(plan.shape):
            raise InferenceInputError(
                f"input {plan.name!r} has rank {array.ndim} (shape {list(array.shape)}); "
                f"{model} expects rank {len(plan.shape)} {_shape_text(plan.shape)}"
            )
        for axis, (found, rule) in enumerate(zip(array.shape, plan.rules, strict=True)):
            if isinstance(rule, int):
                if found != rule:
                    raise InferenceInputError(
                        f"input {plan.name!r} has shape {list(array.shape)}; {model} expects "
                        f"{_shape_text(plan.shape)} (axis {axis} must be {rule})"
                    )
            elif rule is not None:
                seen = symbols.setdefault(rule, (found, plan.name))
                if seen[0] != found:
                    raise InferenceInputError(
                        f"dimension {rule!r} is {seen[0]} in input {seen[1]!r} but {found} "
                        f"in input {plan.name!r}; {model} names both {rule!r}, so they must "
                        "be equal"
                    )
        checked[plan.name] = array
    if len(feeds) != len(checked):
        unknown = sorted(str(name) for name in feeds if name not in checked)
        raise InferenceInputError(
            f"unknown input{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"{model} expects {_names(plans)}"
        )
    return checked


def _names(plans: tuple[_InputPlan, ...]) -> str:
    return ", ".join(
        f"{plan.name!r} ({plan.dtype.name} {_shape_text(plan.shape)})" for plan in plans
    )


def _shape_text(shape: tuple[int | str | None, ...]) -> str:
    return "[" + ", ".join("?" if dim is None else str(dim) for dim in shape) + "]"


def _as_array(value: object, name: str) -> Array:
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as error:
        raise InferenceInputError(f"input {name!r} is not an array: {first_line(error)}") from None


def _cast(array: Array, plan: _InputPlan) -> Array:
    """Casts that keep every value's meaning: bool/int -> int when the values fit the target's
    range, bool/int/float -> float; refuses float -> int, anything -> bool, and strings."""
    target, source = plan.dtype, array.dtype
    allowed = {"b": "b", "i": "biu", "u": "biu", "f": "biuf", "c": "biufc"}.get(target.kind, "")
    if source.kind not in allowed:
        raise InferenceInputError(
            f"input {plan.name!r} has dtype {source.name}; the model expects {target.name} "
            f"and {source.name} values do not convert to it without losing meaning"
        )
    if target.kind in "iu" and source.kind in "iu" and array.size:
        info = np.iinfo(target)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            raise InferenceInputError(
                f"input {plan.name!r} holds values in [{low}, {high}], outside {target.name}'s "
                f"range [{info.min}, {info.max}]"
            )
    return array.astype(target)


class _Loaded:
    """One activated model and its in-flight count (guarded by the host's lock)."""

    def __init__(
        self,
        runtime: Runtime,
        bundle: BundleId,
        tolerance: Mapping[str, float] | None,
        drift: DriftMonitor | None,
    ) -> None:
        self.runtime: Runtime | None = runtime
        self.bundle = bundle
        self.tolerance = tolerance
        self.inputs = runtime.inputs
        self.outputs = runtime.outputs
        self.engine = str(getattr(runtime, "engine", ""))
        self.plans = _plan(runtime.inputs)
        self.label = f"model {bundle.name} {bundle.version}"
        self.stats = RequestStats()
        self.drift = drift
        self.in_flight = 0
        self.retired = False


@dataclass(frozen=True)
class ShadowReport:
    """How a shadow candidate compares with the active model on live requests."""

    compared: int
    agreed: int
    errors: int  # the candidate failed or refused the request (counted as disagreement)
    dropped: int  # sampled requests skipped because the worker was busy
    candidate: StatsSnapshot  # the candidate's own latency while shadowing

    @property
    def agreement_ratio(self) -> float | None:
        """agreed / compared, None before any comparison."""
        return self.agreed / self.compared if self.compared else None


class _Shadow:
    def __init__(self, runtime: Runtime, compare: OutputComparison, ratio: float) -> None:
        self.runtime = runtime
        self.plans = _plan(runtime.inputs)
        self.compare = compare
        self.sample_ratio = ratio
        self.compared = 0
        self.agreed = 0
        self.errors = 0
        self.dropped = 0
        self.stats = RequestStats()
        self.lock = threading.Lock()


def allclose_comparison(*, rtol: float, atol: float) -> OutputComparison:
    """Agree when every output both models share has the same shape and is within
    `|candidate - active| <= atol + rtol * |active|` element-wise; equal non-finite values
    (NaN and NaN, inf and inf of the same sign) agree, as identical models give them on
    the same NaN or out-of-range input."""

    def compare(active: Mapping[str, Array], candidate: Mapping[str, Array]) -> bool:
        shared = [name for name in active if name in candidate]
        if not shared:
            return False
        for name in shared:
            reference, found = np.asarray(active[name]), np.asarray(candidate[name])
            if reference.shape != found.shape:
                return False
            if reference.dtype.kind in "biufc" and found.dtype.kind in "biufc":
                if not np.allclose(found, reference, rtol=rtol, atol=atol, equal_nan=True):
                    return False
            elif not np.array_equal(found, reference):
                return False
        return True

    return compare


_ShadowJob = tuple[_Shadow, dict[str, Array], dict[str, Array]]


class ModelHost:
    """Thread-safe holder of the active model; see the module docstring."""

    def __init__(self, name: str = "model") -> None:
        self.name = name
        self.stats = RequestStats()
        """Counters for the telemetry interval; the agent calls `stats.snapshot()` per interval."""
        self._lock = threading.Lock()
        self._active: _Loaded | None = None
        self._previous_snapshot: StatsSnapshot | None = None
        self._previous: tuple[BundleId, Mapping[str, float] | None] | None = None
        self._shadow: _Shadow | None = None
        self._shadow_queue: queue.Queue[_ShadowJob | None] = queue.Queue(maxsize=SHADOW_QUEUE_DEPTH)
        self._shadow_thread: threading.Thread | None = None
        self._random = random.Random()

    # -- state ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True when a model is active."""
        return self._active is not None

    @property
    def bundle(self) -> BundleId | None:
        """The bundle of the active model, None before the first activation."""
        active = self._active
        return active.bundle if active else None

    @property
    def tolerance(self) -> Mapping[str, float] | None:
        """The active bundle's golden tolerance (`rtol`, `atol`, ...), when it has one."""
        active = self._active
        return active.tolerance if active else None

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """The active model's inputs (empty before the first activation)."""
        active = self._active
        return active.inputs if active else ()

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        """The active model's outputs (empty before the first activation)."""
        active = self._active
        return active.outputs if active else ()

    @property
    def engine(self) -> str | None:
        """The active runtime's engine name (`onnxruntime`), None before the first activation."""
        active = self._active
        return active.engine if active else None

    @property
    def drift(self) -> DriftMonitor | None:
        """The active model's drift monitor (None without reference stats)."""
        active = self._active
        return active.drift if active else None

    @property
    def previous_bundle(self) -> BundleId | None:
        """The bundle of the model the last `activate` replaced."""
        previous = self._previous
        return previous[0] if previous else None

    @property
    def previous_tolerance(self) -> Mapping[str, float] | None:
        """The golden tolerance of the model the last `activate` replaced."""
        previous = self._previous
        return previous[1] if previous else None

    def in_flight(self) -> int:
        """Requests running on any model right now (active or being retired)."""
        with self._lock:
            active = self._active
            return active.in_flight if active else 0

    # -- activation ----------------------------------------------------------------------

    def activate(
        self,
        runtime: Runtime,
        bundle: BundleId,
        *,
        tolerance: Mapping[str, float] | None = None,
        reference_stats: Mapping[str, Any] | None = None,
    ) -> None:
        """Make `runtime` (the model of `bundle`) the active model: a hot swap (see the
        module docstring).

        `tolerance` is the bundle's golden tolerance (shadow comparisons use it). With
        `reference_stats` (the bundle's `reference_stats.json`), inputs are also fed to a
        `DriftMonitor` reachable as `host.drift`.
        """
        drift = DriftMonitor(reference_stats) if reference_stats is not None else None
        loaded = _Loaded(runtime, bundle, tolerance, drift)
        with self._lock:
            old = self._active
            self._active = loaded
            release = False
            if old is not None:
                old.retired = True
                release = old.in_flight == 0
                self._previous_snapshot = old.stats.snapshot(reset=False)
                self._previous = (old.bundle, old.tolerance)
        log.info("activated %s (%s)", loaded.label, bundle.sha256[:12])
        if old is not None and release:
            self._release(old)

    def since_activation(self) -> StatsSnapshot:
        """The active model's statistics since it was activated (empty before activation)."""
        active = self._active
        return active.stats.snapshot(reset=False) if active else StatsSnapshot()

    def previous_snapshot(self) -> StatsSnapshot | None:
        """The replaced model's statistics when it was swapped out (the probation baseline)."""
        return self._previous_snapshot

    def _release(self, loaded: _Loaded) -> None:
        runtime, loaded.runtime = loaded.runtime, None
        close = getattr(runtime, "close", None)
        if callable(close):
            try:
                close()
            except Exception as error:  # noqa: BLE001 - a failing close must not fail a request
                log.warning("closing %s failed: %s", loaded.label, first_line(error))
        log.debug("released %s", loaded.label)

    # -- inference -----------------------------------------------------------------------

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, Array]:
        """Run the active model on `feeds` (input name -> array); returns outputs by name."""
        return self.infer_with_bundle(feeds)[0]

    def infer_with_bundle(self, feeds: Mapping[str, Any]) -> tuple[dict[str, Array], BundleId]:
        """`infer`, also returning the bundle of the model that answered (during a swap, the
        request may have run on the model being replaced)."""
        start = time.perf_counter()
        with self._lock:
            active = self._active
            if active is None:
                raise NoModelError(
                    f"no model is active on {self.name!r} yet; wait for /v2/health/ready or "
                    "install a bundle"
                )
            active.in_flight += 1
        try:
            runtime = active.runtime
            if runtime is None:  # cannot happen while in_flight > 0; keeps mypy honest
                raise NoModelError(f"{active.label} was released")
            try:
                checked = _check_inputs(active.plans, feeds, model=active.label)
            except InferenceInputError:
                active.stats.reject()
                self.stats.reject()
                raise
            try:
                outputs = runtime.run(checked)
            except Exception as error:
                elapsed = time.perf_counter() - start
                active.stats.record(elapsed, False)
                self.stats.record(elapsed, False)
                raise InferenceRuntimeError(
                    f"{active.label} failed: {first_line(error)}"
                ) from error
            elapsed = time.perf_counter() - start
            active.stats.record(elapsed, True)
            self.stats.record(elapsed, True)
            if active.drift is not None:
                active.drift.observe(checked)
            shadow = self._shadow
            if shadow is not None:
                self._offer_shadow(shadow, checked, outputs)
            return outputs, active.bundle
        finally:
            with self._lock:
                active.in_flight -= 1
                release = active.retired and active.in_flight == 0 and active.runtime is not None
            if release:
                self._release(active)

    # -- shadow mode ---------------------------------------------------------------------

    def set_shadow(
        self,
        runtime: Runtime | None,
        *,
        tolerance: Mapping[str, float] | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        compare: OutputComparison | None = None,
        sample_ratio: float = 1.0,
    ) -> None:
        """Run `runtime` beside the active model on `sample_ratio` of live requests, off the
        request path, and count agreement (`shadow_agreement()`); None stops shadowing.

        Agreement is `compare(active_outputs, candidate_outputs)` when given, else
        `allclose_comparison` with `rtol`/`atol`, defaulting to `tolerance` (a bundle's golden
        tolerance) and then to the health-check defaults.
        """
        if not 0.0 <= sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be in [0, 1]; found {sample_ratio}")
        if runtime is None:
            self._shadow = None
            self._drain_shadow_queue()
            return
        if compare is None:
            known = tolerance or {}
            compare = allclose_comparison(
                rtol=rtol if rtol is not None else float(known.get("rtol", DEFAULT_RTOL)),
                atol=atol if atol is not None else float(known.get("atol", DEFAULT_ATOL)),
            )
        self._drain_shadow_queue()
        self._shadow = _Shadow(runtime, compare, sample_ratio)
        with self._lock:
            if self._shadow_thread is None or not self._shadow_thread.is_alive():
                self._shadow_thread = threading.Thread(
                    target=self._shadow_worker, name=f"shadow-{self.name}", daemon=True
                )
                self._shadow_thread.start()

    def shadow_agreement(self) -> tuple[int, int]:
        """(compared, agreed) for the current shadow candidate; (0, 0) without one."""
        shadow = self._shadow
        if shadow is None:
            return (0, 0)
        with shadow.lock:
            return (shadow.compared, shadow.agreed)

    def shadow_report(self) -> ShadowReport | None:
        """Counts and the candidate's latency for the current shadow, None without one."""
        shadow = self._shadow
        if shadow is None:
            return None
        with shadow.lock:
            return ShadowReport(
                compared=shadow.compared,
                agreed=shadow.agreed,
                errors=shadow.errors,
                dropped=shadow.dropped,
                candidate=shadow.stats.snapshot(reset=False),
            )

    def wait_shadow_idle(self, timeout_s: float = 10.0) -> bool:
        """Block until the shadow worker has compared everything queued (tests, probation
        end); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._shadow_queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self) -> None:
        """Stop shadowing and the shadow worker (the active model stays)."""
        self._shadow = None
        self._drain_shadow_queue()
        thread = self._shadow_thread
        if thread is not None and thread.is_alive():
            try:
                self._shadow_queue.put(None, timeout=1.0)
            except queue.Full:
                log.warning("shadow worker did not take the stop request")
            thread.join(timeout=5.0)
        self._shadow_thread = None

    def _offer_shadow(
        self, shadow: _Shadow, feeds: dict[str, Array], outputs: dict[str, Array]
    ) -> None:
        if shadow.sample_ratio < 1.0 and self._random.random() >= shadow.sample_ratio:
            return
        # Copies: the caller may reuse its arrays once infer() returns.
        job: _ShadowJob = (shadow, {k: v.copy() for k, v in feeds.items()}, outputs)
        try:
            self._shadow_queue.put_nowait(job)
        except queue.Full:
            with shadow.lock:
                shadow.dropped += 1

    def _drain_shadow_queue(self) -> None:
        while True:
            try:
                self._shadow_queue.get_nowait()
            except queue.Empty:
                return
            self._shadow_queue.task_done()

    def _shadow_worker(self) -> None:
        while True:
            job = self._shadow_queue.get()
            try:
                if job is None:
                    return
                self._run_shadow(*job)
            finally:
                self._shadow_queue.task_done()

    def _run_shadow(
        self, shadow: _Shadow, feeds: dict[str, Array], active_outputs: dict[str, Array]
    ) -> None:
        start = time.perf_counter()
        agreed = False
        failed = False
        try:
            checked = _check_inputs(shadow.plans, feeds, model="the shadow candidate")
            candidate = shadow.runtime.run(checked)
            shadow.stats.record(time.perf_counter() - start, True)
            agreed = bool(shadow.compare(active_outputs, candidate))
        except Exception as error:  # noqa: BLE001 - any candidate failure is a disagreement
            failed = True
            shadow.stats.record(time.perf_counter() - start, False)
            log.debug("shadow candidate failed: %s", first_line(error))
        with shadow.lock:
            shadow.compared += 1
            shadow.agreed += int(agreed)
            shadow.errors += int(failed)


# --------------------------------------------------------------------------------------------
# Loading


def read_golden_tolerance(golden: Path) -> dict[str, float] | None:
    """The `tolerance` entry of a bundle's `golden.npz`, None if it has none or is unreadable."""
    try:
        with np.load(golden, allow_pickle=False) as arrays:
            if "tolerance" not in arrays.files:
                return None
            document = json.loads(str(arrays["tolerance"]))
    except (OSError, ValueError) as error:
        log.warning("cannot read the tolerance of %s: %s", golden, first_line(error))
        return None
    if not isinstance(document, dict):
        return None
    return {str(k): float(v) for k, v in document.items() if isinstance(v, (int, float))}


def load_model(
    path: Path,
    *,
    name: str = "model",
    bundle: BundleId | None = None,
    threads: int | None = None,
) -> ModelHost:
    """Open a model and return a `ModelHost` serving it, for in-process inference.

    `path` is a model file, an extracted bundle directory (its `model.*` file, with
    `golden.npz`'s tolerance and `reference_stats.json` for drift when present), or an
    agent slot (`slots/a`: its `bundle/` folder). Without `bundle`, the model is named by
    its file name, version "0" and the model file's sha256.
    """
    path = Path(path)
    if (path / "bundle").is_dir():
        path = path / "bundle"
    reference_stats: Mapping[str, Any] | None = None
    tolerance: dict[str, float] | None = None
    model = path
    if path.is_dir():
        candidates = sorted(p for p in path.glob("model.*") if p.is_file())
        if not candidates:
            raise InferenceError(f"{path} holds no model.* file; expected an extracted bundle")
        model = candidates[0]
        golden = path / "golden.npz"
        if golden.is_file():
            tolerance = read_golden_tolerance(golden)
        stats = path / "reference_stats.json"
        if stats.is_file():
            try:
                reference_stats = json.loads(stats.read_text())
            except (OSError, ValueError) as error:
                log.warning("ignoring %s: %s", stats, first_line(error))
    runtime = open_runtime(model, threads=threads)
    if bundle is None:
        from edgekit.files import hash_file  # only for a bare model file (no bundle slot)

        bundle = BundleId(
            name=path.stem if path.is_file() else path.name,
            version="0",
            sha256=hash_file(model)[1],
        )
    host = ModelHost(name)
    host.activate(runtime, bundle, tolerance=tolerance, reference_stats=reference_stats)
    return host
