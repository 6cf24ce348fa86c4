"""The on-device health check a bundle must pass before it may serve.

The candidate model is loaded in a fresh runtime session, its golden samples (`golden.npz`,
written by the converter: `inputs/<i>/<name>`, `outputs/<i>/<name>`, a JSON `tolerance` and
`quantization/outputs/<name>` = [scale, zero_point] for quantized outputs) are replayed
(quantized outputs compared as real values), and small checks each judge one thing: outputs
finite, outputs within the bundle's tolerance, batch-1 latency and memory within the
profile's budget. Checks compose with `all_of`; an empty composite is an error, never "always
pass".
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from edgekit.agent.oip import (
    DEFAULT_LIMITS,
    InferenceLimits,
    RequestError,
    decode_outputs,
    encode_tensor,
    infer_json,
)
from edgekit.agent.serving import ModelHost
from edgekit.agent.store import SlotInfo
from edgekit.agent.telemetry import read_rss_bytes

from edgekit.errors import EdgekitError, HealthCheckError, first_line
from edgekit.profiles import Budgets, HealthCheckTolerance
from edgekit.runtimes import Runtime, dequantize, dequantize_output, open_runtime

__all__ = [
    "CheckResult",
    "CheckSubject",
    "FiniteOutputs",
    "GoldenMatch",
    "GoldenSamples",
    "HealthCheck",
    "HealthReport",
    "LatencyBudget",
    "MemoryBudget",
    "ModelSizeBudget",
    "all_of",
    "default_checks",
    "rss_bytes",
    "run_health_check",
]

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class GoldenSamples:
    """Inputs and the outputs the converter recorded for them, and the bundle's tolerance."""

    inputs: tuple[dict[str, Array], ...]
    outputs: tuple[dict[str, Array], ...]
    tolerance: HealthCheckTolerance

    @classmethod
    def load(cls, path: Path, *, default: HealthCheckTolerance) -> GoldenSamples:
        """Read `golden.npz` (no pickles); the file's tolerance overrides `default`."""
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (OSError, ValueError, KeyError) as e:
            raise HealthCheckError(f"{path.name} is unreadable: {first_line(e)}") from e
        inputs: dict[int, dict[str, Array]] = {}
        outputs: dict[int, dict[str, Array]] = {}
        tolerance = default
        quantization = _quantization(arrays)
        for name, value in arrays.items():
            parts = name.split("/", 2)
            if name == "tolerance":
                tolerance = _tolerance(value, default)
            elif len(parts) == 3 and parts[0] == "inputs" and parts[1].isdecimal():
                inputs.setdefault(int(parts[1]), {})[parts[2]] = value
            elif len(parts) == 3 and parts[0] == "outputs" and parts[1].isdecimal():
                # Quantized outputs as real values: scale * (stored - zero_point).
                real = dequantize(value, quantization.get(parts[2]))
                outputs.setdefault(int(parts[1]), {})[parts[2]] = real
        indices = sorted(inputs)
        if not indices or sorted(outputs) != indices:
            raise HealthCheckError(
                f"{path.name} holds no usable samples (inputs/<i>/<name> with matching outputs)"
            )
        return cls(tuple(inputs[i] for i in indices), tuple(outputs[i] for i in indices), tolerance)


def _quantization(arrays: Mapping[str, Array]) -> dict[str, tuple[float, int]]:
    """The file's `quantization/outputs/<name>` = [scale, zero_point] entries, by output."""
    found: dict[str, tuple[float, int]] = {}
    for name, value in arrays.items():
        parts = name.split("/", 2)
        if len(parts) == 3 and parts[:2] == ["quantization", "outputs"]:
            values = np.ravel(value)
            if values.size != 2 or not float(values[0]) > 0:
                raise HealthCheckError(f"golden.npz {name} is not [scale > 0, zero_point]")
            found[parts[2]] = (float(values[0]), int(values[1]))
    return found


def _real_outputs(
    golden: GoldenSamples, runtime: Runtime, actual: Sequence[dict[str, Array]]
) -> tuple[GoldenSamples, tuple[dict[str, Array], ...]]:
    """The golden and the candidate's outputs as real values (quantized ones dequantized).

    A golden file without quantization entries (older converters) holds the same model's
    stored values, so the runtime's scale and zero point dequantize them too.
    """
    specs = {spec.name: spec for spec in runtime.outputs}

    def real(outputs: Mapping[str, Array]) -> dict[str, Array]:
        return {
            name: dequantize_output(specs[name], value) if name in specs else value
            for name, value in outputs.items()
        }

    expected = tuple(real(outputs) for outputs in golden.outputs)
    return replace(golden, outputs=expected), tuple(real(outputs) for outputs in actual)


def _tolerance(value: Array, default: HealthCheckTolerance) -> HealthCheckTolerance:
    try:
        document = json.loads(str(value.item()))
        return HealthCheckTolerance(
            rtol=float(document.get("rtol", default.rtol)),
            atol=float(document.get("atol", default.atol)),
            min_cosine=float(document.get("min_cosine", default.min_cosine)),
            min_top1_agreement=float(
                document.get("min_top1_agreement", default.min_top1_agreement)
            ),
        )
    except (ValueError, TypeError, AttributeError) as e:
        raise HealthCheckError(f"golden.npz tolerance is not valid JSON: {e}") from None


@dataclass(frozen=True)
class CheckSubject:
    """What the checks judge: the model, its golden samples and what running them measured."""

    model_bytes: int
    golden: GoldenSamples
    actual: tuple[dict[str, Array], ...]  # outputs of the candidate for each golden input
    # (`run_health_check` passes golden and actual outputs as real values: dequantized)
    latency_ms: tuple[float, ...]  # batch-1 runs
    memory_bytes: int  # resident memory the session added (load + runs)


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    reason: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)


class HealthCheck(Protocol):
    """One rule a candidate must pass."""

    @property
    def name(self) -> str: ...

    def check(self, subject: CheckSubject) -> CheckResult: ...


@dataclass(frozen=True)
class FiniteOutputs:
    name: str = "finite_outputs"

    def check(self, subject: CheckSubject) -> CheckResult:
        for index, outputs in enumerate(subject.actual):
            for output, value in outputs.items():
                if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
                    return CheckResult(
                        self.name,
                        False,
                        f"output {output!r} of golden sample {index} is not finite (NaN or inf)",
                    )
        return CheckResult(self.name, True)


def _cosine(a: Array, b: Array) -> float:
    x = a.astype(np.float64).ravel()
    y = b.astype(np.float64).ravel()
    norms = float(np.linalg.norm(x) * np.linalg.norm(y))
    if norms == 0.0:
        return 1.0 if np.array_equal(x, y) else 0.0
    return float(np.dot(x, y) / norms)


@dataclass(frozen=True)
class GoldenMatch:
    """Each output within rtol/atol of the recorded one (or at least `min_cosine` alike), and
    classifier outputs agreeing on the top-1 class for `min_top1_agreement` of the samples."""

    name: str = "golden_match"

    def check(self, subject: CheckSubject) -> CheckResult:
        tolerance = subject.golden.tolerance
        worst_cosine = 1.0
        worst_abs = 0.0
        agree = total = 0
        for index, (expected, actual) in enumerate(
            zip(subject.golden.outputs, subject.actual, strict=True)
        ):
            for output, want in expected.items():
                got = actual.get(output)
                if got is None or got.shape != want.shape:
                    found = "missing" if got is None else f"shape {got.shape}"
                    return CheckResult(
                        self.name,
                        False,
                        f"output {output!r} of golden sample {index}: "
                        f"expected shape {want.shape}, found {found}",
                    )
                if not np.issubdtype(want.dtype, np.number):
                    continue
                got64, want64 = got.astype(np.float64), want.astype(np.float64)
                error = float(np.max(np.abs(got64 - want64))) if want.size else 0.0
                worst_abs = max(worst_abs, error if math.isfinite(error) else math.inf)
                cosine = _cosine(got, want)
                worst_cosine = min(worst_cosine, cosine)
                close = bool(np.allclose(got64, want64, rtol=tolerance.rtol, atol=tolerance.atol))
                if not close and not cosine >= tolerance.min_cosine:
                    return CheckResult(
                        self.name,
                        False,
                        f"output {output!r} of golden sample {index} differs from the recorded "
                        f"one: max abs error {error:.4g} (atol {tolerance.atol:g}, rtol "
                        f"{tolerance.rtol:g}), cosine {cosine:.4f} < {tolerance.min_cosine:g}",
                        {"max_abs_error": error, "cosine": cosine},
                    )
                if want.ndim >= 2 and want.shape[-1] > 1:
                    agree += int(np.sum(np.argmax(got, -1) == np.argmax(want, -1)))
                    total += int(np.prod(want.shape[:-1]))
        details: dict[str, Any] = {"worst_cosine": worst_cosine, "max_abs_error": worst_abs}
        if total:
            agreement = agree / total
            details["top1_agreement"] = agreement
            if agreement < tolerance.min_top1_agreement:
                return CheckResult(
                    self.name,
                    False,
                    f"top-1 agreement {agreement:.3f} with the golden outputs is below "
                    f"{tolerance.min_top1_agreement:g}",
                    details,
                )
        return CheckResult(self.name, True, details=details)


def _p95(values: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(values), 95)) if values else 0.0


@dataclass(frozen=True)
class LatencyBudget:
    max_latency_ms: float
    name: str = "latency_budget"

    def check(self, subject: CheckSubject) -> CheckResult:
        p95 = _p95(subject.latency_ms)
        details = {"p95_ms": p95, "budget_ms": self.max_latency_ms, "runs": len(subject.latency_ms)}
        if p95 > self.max_latency_ms:
            return CheckResult(
                self.name,
                False,
                f"batch-1 p95 latency {p95:.2f} ms exceeds the budget {self.max_latency_ms:g} ms",
                details,
            )
        return CheckResult(self.name, True, details=details)


@dataclass(frozen=True)
class MemoryBudget:
    max_ram_bytes: int
    name: str = "memory_budget"

    def check(self, subject: CheckSubject) -> CheckResult:
        details = {"memory_bytes": subject.memory_bytes, "budget_bytes": self.max_ram_bytes}
        if subject.memory_bytes > self.max_ram_bytes:
            return CheckResult(
                self.name,
                False,
                f"the model added {subject.memory_bytes} bytes of resident memory; the budget is "
                f"{self.max_ram_bytes}",
                details,
            )
        return CheckResult(self.name, True, details=details)


@dataclass(frozen=True)
class ModelSizeBudget:
    max_model_bytes: int
    name: str = "model_size_budget"

    def check(self, subject: CheckSubject) -> CheckResult:
        if subject.model_bytes > self.max_model_bytes:
            return CheckResult(
                self.name,
                False,
                f"model file is {subject.model_bytes} bytes; the budget is {self.max_model_bytes}",
            )
        return CheckResult(self.name, True)


@dataclass(frozen=True)
class _AllOf:
    checks: tuple[HealthCheck, ...]
    name: str = "all_of"

    def run(self, subject: CheckSubject) -> tuple[CheckResult, ...]:
        return tuple(check.check(subject) for check in self.checks)


def all_of(*checks: HealthCheck) -> _AllOf:
    """Every check must pass; an empty composite is an error."""
    if not checks:
        raise ValueError("all_of() needs at least one check: an empty health check proves nothing")
    return _AllOf(tuple(checks))


def default_checks(budgets: Budgets) -> _AllOf:
    """Finite outputs, golden match, and the budgets that are set."""
    checks: list[HealthCheck] = [FiniteOutputs(), GoldenMatch()]
    if budgets.max_latency_ms is not None:
        checks.append(LatencyBudget(budgets.max_latency_ms))
    if budgets.max_ram_bytes is not None:
        checks.append(MemoryBudget(budgets.max_ram_bytes))
    if budgets.max_model_bytes is not None:
        checks.append(ModelSizeBudget(budgets.max_model_bytes))
    return all_of(*checks)


@dataclass
class HealthReport:
    """The outcome; `runtime` is the checked session (reused for activation) when `ok`."""

    ok: bool
    results: tuple[CheckResult, ...]
    runtime: Runtime | None = None

    @property
    def reason(self) -> str:
        return "; ".join(f"{r.name}: {r.reason}" for r in self.results if not r.ok)

    def details(self) -> dict[str, Any]:
        """JSON-ready measurements per check (non-finite numbers become None)."""
        return {
            r.name: {"ok": r.ok, **{k: _json_number(v) for k, v in r.details.items()}}
            for r in self.results
        }


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unreadable)."""
    return read_rss_bytes(Path("/proc/self/status")) or 0


def _serve(
    host: ModelHost, feeds: Mapping[str, Array], limits: InferenceLimits
) -> dict[str, Array]:
    """One golden sample through the REST inference path (`infer_json`): encoded as a client
    would send it, parsed, checked against the model's inputs, run, and decoded back."""
    tensors = b",".join(encode_tensor(name, np.asarray(value)) for name, value in feeds.items())
    response = infer_json(host, b'{"inputs":[' + tensors + b"]}", limits=limits)
    return decode_outputs(response)


def run_health_check(
    slot: SlotInfo,
    *,
    budgets: Budgets,
    tolerance: HealthCheckTolerance,
    latency_runs: int = 20,
    threads: int | None = None,
    limits: InferenceLimits = DEFAULT_LIMITS,
    checks: _AllOf | None = None,
) -> HealthReport:
    """Load `slot`'s model in a fresh session, replay its golden samples through the same
    path REST requests take (`edgekit.agent.oip.infer_json`, with this device's `limits`),
    and judge the checks. A sample the server would refuse fails the check (`serving`)."""
    golden_path = slot.path_of("golden")
    if golden_path is None:
        return HealthReport(
            False, (CheckResult("golden_samples", False, "the bundle has no golden.npz"),)
        )
    try:
        golden = GoldenSamples.load(golden_path, default=tolerance)
    except HealthCheckError as e:
        return HealthReport(False, (CheckResult("golden_samples", False, str(e)),))
    before = rss_bytes()
    try:
        runtime = open_runtime(slot.model_path, threads=threads)
    except EdgekitError as e:
        return HealthReport(False, (CheckResult("load", False, first_line(e)),))
    host = ModelHost("health-check")
    host.activate(runtime, slot.bundle)
    try:
        actual = []
        for index, feeds in enumerate(golden.inputs):
            try:
                actual.append(_serve(host, feeds, limits))
            except RequestError as e:
                check = "run" if e.status == HTTPStatus.INTERNAL_SERVER_ERROR else "serving"
                reason = f"golden sample {index} is refused with HTTP {e.status.value}: {e}"
                return HealthReport(False, (CheckResult(check, False, reason),))
        latencies = []
        for _ in range(latency_runs):
            start = time.perf_counter()
            host.infer(golden.inputs[0])
            latencies.append((time.perf_counter() - start) * 1000.0)
    except Exception as e:  # noqa: BLE001 - any runtime failure fails the check, with its reason
        return HealthReport(False, (CheckResult("run", False, first_line(e)),))
    finally:
        host.close()
    golden, real = _real_outputs(golden, runtime, actual)
    subject = CheckSubject(
        model_bytes=slot.model_path.stat().st_size,
        golden=golden,
        actual=real,
        latency_ms=tuple(latencies),
        memory_bytes=max(0, rss_bytes() - before),
    )
    results = (checks or default_checks(budgets)).run(subject)
    ok = all(result.ok for result in results)
    bundle = slot.bundle
    log.info("health check of %s %s: %s", bundle.name, bundle.version, "passed" if ok else "FAILED")
    return HealthReport(ok, results, runtime if ok else None)
