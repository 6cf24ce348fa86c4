"""Rollout gates: when a wave may advance, must wait, or must halt the rollout.

A gate is a small object with one method, `evaluate(observation) -> GateResult`, whose
verdict is `pass`, `wait` (not decided yet) or `fail` (halt). Gates compose with `all_of`
(fails as soon as one member fails, passes when every member passes) and `any_of`; an empty
composite is an error, never "always pass". Pure module: the controller builds a
`WaveObservation` from what devices reported and asks the policy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from edgekit.errors import EdgekitError

__all__ = [
    "AllOf",
    "AnyOf",
    "DevicesReported",
    "DriftLimit",
    "FailureRatio",
    "GateError",
    "GateResult",
    "LatencyRegression",
    "RolloutGate",
    "SoakTime",
    "Verdict",
    "WaveObservation",
    "all_of",
    "any_of",
    "standard_gates",
]

Verdict = Literal["pass", "wait", "fail"]


class GateError(EdgekitError):
    """A gate policy that cannot be evaluated (empty composite, out-of-range limit)."""


@dataclass(frozen=True)
class WaveObservation:
    """What the controller knows about one wave when it asks the gates.

    `elapsed_s` counts from the moment the wave's directives were published; `settled_s`
    from the moment the last of its devices reported an outcome (None while any is pending).
    Latencies are per-device p95 milliseconds from telemetry of the wave's succeeded devices
    on the new bundle (one value per device, so their count is how many reported);
    `baseline_p95_ms` comes from devices of the same selection running the version the
    rollout replaces; `drift_psi` likewise holds one score per succeeded device.

    `first_deployment` says no selected device ran a bundle before the rollout: there is no
    previous version to regress from, so the latency gate judges `new_p95_ms` against the
    latency budget of each device's bundle (`new_p95_budget_ms`, parallel to `new_p95_ms`,
    None where no budget is known); `budget_note` names where the budgets come from.
    """

    targeted: int
    succeeded: int
    failed: int
    elapsed_s: float
    settled_s: float | None = None
    new_p95_ms: Sequence[float] = field(default_factory=tuple)
    baseline_p95_ms: Sequence[float] = field(default_factory=tuple)
    drift_psi: Sequence[float] = field(default_factory=tuple)
    first_deployment: bool = False
    new_p95_budget_ms: Sequence[float | None] = field(default_factory=tuple)
    budget_note: str = ""

    @property
    def reported(self) -> int:
        return self.succeeded + self.failed

    @property
    def pending(self) -> int:
        return max(0, self.targeted - self.reported)


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict and a line saying why (shown in `edgekit fleet status`)."""

    gate: str
    verdict: Verdict
    detail: str
    members: tuple[GateResult, ...] = ()
    # While waiting: the wave time (seconds since its directives went out) at which the gate
    # stops waiting, and how it decides then (`pass` for a soak, `fail` for a timeout).
    deadline_s: float | None = None
    on_deadline: Verdict | None = None

    @property
    def waiting(self) -> tuple[GateResult, ...]:
        """The leaf results that wait (for a composite, its waiting members)."""
        if not self.members:
            return (self,) if self.verdict == "wait" else ()
        return tuple(leaf for member in self.members for leaf in member.waiting)

    @property
    def failures(self) -> tuple[GateResult, ...]:
        """The leaf results that failed (for a composite, its failing members)."""
        if not self.members:
            return (self,) if self.verdict == "fail" else ()
        return tuple(leaf for member in self.members for leaf in member.failures)


class RolloutGate(Protocol):
    """Decides whether a wave may advance."""

    @property
    def name(self) -> str: ...

    def evaluate(self, observation: WaveObservation) -> GateResult: ...


def _fraction(value: float, *, what: str) -> float:
    if not 0 <= value <= 1 or math.isnan(value):
        raise GateError(f"{what} must be between 0% and 100%; found {value}")
    return value


@dataclass(frozen=True)
class DevicesReported:
    """Enough of the wave's devices reported an outcome; fails after `timeout_s` without."""

    min_ratio: float = 1.0
    timeout_s: float = 600.0
    name: str = "devices_reported"

    def __post_init__(self) -> None:
        _fraction(self.min_ratio, what="min reported ratio")

    def evaluate(self, observation: WaveObservation) -> GateResult:
        needed = math.ceil(self.min_ratio * observation.targeted - 1e-9)
        detail = f"{observation.reported}/{observation.targeted} reported (need {needed})"
        if observation.reported >= needed:
            return GateResult(self.name, "pass", detail)
        if observation.elapsed_s >= self.timeout_s:
            return GateResult(
                self.name,
                "fail",
                f"{detail} after {observation.elapsed_s:.0f} s (timeout {self.timeout_s:.0f} s):"
                " check that the devices are online",
            )
        return GateResult(self.name, "wait", detail, deadline_s=self.timeout_s, on_deadline="fail")


@dataclass(frozen=True)
class FailureRatio:
    """At most `max_ratio` of the wave's devices failed (fails early once exceeded)."""

    max_ratio: float
    name: str = "failure_ratio"

    def __post_init__(self) -> None:
        _fraction(self.max_ratio, what="max failure ratio")

    def evaluate(self, observation: WaveObservation) -> GateResult:
        ratio = observation.failed / observation.targeted if observation.targeted else 0.0
        detail = (
            f"{observation.failed}/{observation.targeted} failed ({ratio:.1%}, "
            f"max {self.max_ratio:.1%})"
        )
        return GateResult(self.name, "fail" if ratio > self.max_ratio + 1e-12 else "pass", detail)


def _telemetry_missing(
    observation: WaveObservation,
    reported: int,
    *,
    min_ratio: float,
    timeout_s: float,
    gate: str,
    what: str,
) -> GateResult | None:
    """`wait` (or `fail` after `timeout_s`) until `min_ratio` of the wave's succeeded devices
    sent `what` for the new bundle; None once enough did."""
    needed = max(1, math.ceil(min_ratio * observation.succeeded - 1e-9))
    if reported >= needed:
        return None
    detail = f"{what} from {reported}/{observation.succeeded} updated devices (need {needed})"
    if observation.elapsed_s >= timeout_s:
        return GateResult(
            gate,
            "fail",
            f"{detail} after {observation.elapsed_s:.0f} s (timeout {timeout_s:.0f} s): "
            "the gate cannot judge without data; check that devices send telemetry",
        )
    return GateResult(gate, "wait", detail, deadline_s=timeout_s, on_deadline="fail")


@dataclass(frozen=True)
class LatencyRegression:
    """The median per-device p95 on the new version is at most `max_ratio` above the baseline's.

    The gate waits until at least `min_reporting` of the wave's succeeded devices sent latency
    telemetry for the new bundle, and until a baseline exists; without them after `timeout_s`
    it fails: no data is not a pass.
    """

    max_ratio: float
    min_reporting: float = 0.5
    timeout_s: float = 900.0
    name: str = "latency_regression"

    def __post_init__(self) -> None:
        if self.max_ratio < 0 or math.isnan(self.max_ratio):
            raise GateError(f"max latency regression must be >= 0; found {self.max_ratio}")
        _fraction(self.min_reporting, what="min telemetry ratio")

    def evaluate(self, observation: WaveObservation) -> GateResult:
        missing = _telemetry_missing(
            observation,
            len(observation.new_p95_ms),
            min_ratio=self.min_reporting,
            timeout_s=self.timeout_s,
            gate=self.name,
            what="latency telemetry",
        )
        if missing is not None:
            return missing
        if not observation.baseline_p95_ms and observation.first_deployment:
            return self._against_budget(observation)
        if not observation.baseline_p95_ms:
            detail = "no baseline telemetry from devices on the previous version"
            if observation.elapsed_s >= self.timeout_s:
                return GateResult(
                    self.name,
                    "fail",
                    f"{detail} after {observation.elapsed_s:.0f} s: nothing to compare with",
                )
            return GateResult(
                self.name, "wait", detail, deadline_s=self.timeout_s, on_deadline="fail"
            )
        baseline = statistics.median(observation.baseline_p95_ms)
        new = statistics.median(observation.new_p95_ms)
        regression = (new / baseline - 1.0) if baseline > 0 else 0.0
        detail = (
            f"p95 {new:.2f} ms vs {baseline:.2f} ms ({regression:+.1%}, max +{self.max_ratio:.1%})"
        )
        return GateResult(
            self.name, "fail" if regression > self.max_ratio + 1e-12 else "pass", detail
        )

    def _against_budget(self, observation: WaveObservation) -> GateResult:
        """A first deployment: nothing to regress from, so each updated device's p95 is
        judged against its bundle's latency budget (not judged where none is known)."""
        budgets = tuple(observation.new_p95_budget_ms)
        pairs = [
            (p95, budgets[index])
            for index, p95 in enumerate(observation.new_p95_ms)
            if index < len(budgets) and budgets[index]
        ]
        new = statistics.median(observation.new_p95_ms)
        if not pairs:
            return GateResult(
                self.name,
                "pass",
                f"no baseline: first deployment, latency not judged (no latency budget known "
                f"for the bundles' profiles); p95 {new:.2f} ms",
            )
        ratio = statistics.median([p95 / budget for p95, budget in pairs if budget])
        note = observation.budget_note or "the profile's latency budget"
        detail = (
            f"no baseline: first deployment, latency judged against {note}: median p95 "
            f"{new:.2f} ms is {ratio:.0%} of the budget"
        )
        return GateResult(self.name, "fail" if ratio > 1.0 + 1e-12 else "pass", detail)


@dataclass(frozen=True)
class DriftLimit:
    """The median drift score (PSI) of the updated devices is at most `max_psi`.

    Waits until `min_reporting` of the wave's succeeded devices sent a drift score for the new
    bundle; fails after `timeout_s` without.
    """

    max_psi: float
    min_reporting: float = 0.5
    timeout_s: float = 900.0
    name: str = "drift"

    def __post_init__(self) -> None:
        if self.max_psi < 0 or math.isnan(self.max_psi):
            raise GateError(f"max drift must be >= 0; found {self.max_psi}")
        _fraction(self.min_reporting, what="min telemetry ratio")

    def evaluate(self, observation: WaveObservation) -> GateResult:
        missing = _telemetry_missing(
            observation,
            len(observation.drift_psi),
            min_ratio=self.min_reporting,
            timeout_s=self.timeout_s,
            gate=self.name,
            what="drift scores",
        )
        if missing is not None:
            return missing
        psi = statistics.median(observation.drift_psi)
        detail = f"median psi {psi:.3f} (max {self.max_psi:.3f})"
        return GateResult(self.name, "fail" if psi > self.max_psi else "pass", detail)


@dataclass(frozen=True)
class SoakTime:
    """The wave soaked `seconds` after its last device reported."""

    seconds: float
    name: str = "soak"

    def __post_init__(self) -> None:
        if self.seconds < 0 or math.isnan(self.seconds):
            raise GateError(f"soak time must be >= 0 s; found {self.seconds}")

    def evaluate(self, observation: WaveObservation) -> GateResult:
        if observation.settled_s is None:
            return GateResult(self.name, "wait", f"soak {self.seconds:g} s starts once all report")
        if observation.settled_s >= self.seconds:
            return GateResult(self.name, "pass", f"soaked {self.seconds:g} s")
        settled_at = observation.elapsed_s - observation.settled_s  # wave time of the last report
        return GateResult(
            self.name,
            "wait",
            f"soaking {self.seconds:g} s after the last report",
            deadline_s=settled_at + self.seconds,
            on_deadline="pass",
        )


def _check_members(gates: Sequence[RolloutGate], kind: str) -> tuple[RolloutGate, ...]:
    if not gates:
        raise GateError(f"{kind} needs at least one gate: an empty policy would pass anything")
    return tuple(gates)


@dataclass(frozen=True)
class AllOf:
    """Fails if any member fails, waits if any waits, passes when all pass."""

    gates: tuple[RolloutGate, ...]
    name: str = "all_of"

    def __post_init__(self) -> None:
        _check_members(self.gates, "all_of")

    def evaluate(self, observation: WaveObservation) -> GateResult:
        results = tuple(gate.evaluate(observation) for gate in self.gates)
        verdicts = {result.verdict for result in results}
        verdict: Verdict = (
            "fail" if "fail" in verdicts else "wait" if "wait" in verdicts else "pass"
        )
        detail = "; ".join(f"{r.gate}: {r.detail}" for r in results if r.verdict == verdict)
        return GateResult(self.name, verdict, detail, results)


@dataclass(frozen=True)
class AnyOf:
    """Passes if any member passes, waits if any waits, fails when all fail."""

    gates: tuple[RolloutGate, ...]
    name: str = "any_of"

    def __post_init__(self) -> None:
        _check_members(self.gates, "any_of")

    def evaluate(self, observation: WaveObservation) -> GateResult:
        results = tuple(gate.evaluate(observation) for gate in self.gates)
        verdicts = {result.verdict for result in results}
        verdict: Verdict = (
            "pass" if "pass" in verdicts else "wait" if "wait" in verdicts else "fail"
        )
        detail = "; ".join(f"{r.gate}: {r.detail}" for r in results if r.verdict == verdict)
        return GateResult(self.name, verdict, detail, results)


def all_of(*gates: RolloutGate) -> AllOf:
    """Every gate must pass."""
    return AllOf(_check_members(gates, "all_of"))


def any_of(*gates: RolloutGate) -> AnyOf:
    """One passing gate is enough."""
    return AnyOf(_check_members(gates, "any_of"))


def standard_gates(
    *,
    max_failure: float,
    soak_s: float,
    report_timeout_s: float,
    max_latency_regression: float | None = None,
    max_drift: float | None = None,
    min_reported: float = 1.0,
    min_telemetry: float = 0.5,
) -> AllOf:
    """The gates `edgekit fleet rollout` applies to every wave, from its options."""
    gates: list[RolloutGate] = [
        DevicesReported(min_reported, report_timeout_s),
        FailureRatio(max_failure),
        SoakTime(soak_s),
    ]
    if max_latency_regression is not None:
        gates.append(LatencyRegression(max_latency_regression, min_telemetry, report_timeout_s))
    if max_drift is not None:
        gates.append(DriftLimit(max_drift, min_telemetry, report_timeout_s))
    return all_of(*gates)
