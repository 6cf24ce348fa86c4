"""Cohorts (stable, stratified, percentages) and rollout gates: pure logic."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgekit.fleet.cohorts import (
    CohortError,
    assign_waves,
    device_rank,
    parse_percent,
    wave_fractions,
)
from edgekit.fleet.gates import (
    AllOf,
    DevicesReported,
    DriftLimit,
    FailureRatio,
    GateError,
    LatencyRegression,
    SoakTime,
    WaveObservation,
    all_of,
    any_of,
    standard_gates,
)


def _fleet(count: int, profiles: tuple[str, ...] = ("a",)) -> dict[str, str]:
    return {f"dev-{i:04d}": profiles[i % len(profiles)] for i in range(count)}


# -- percentages and strategies ------------------------------------------------------------------


def test_parse_percent() -> None:
    assert parse_percent("5%", what="x") == pytest.approx(0.05)
    assert parse_percent(" 100% ", what="x") == 1.0
    assert parse_percent("0.25", what="x") == pytest.approx(0.25)
    for bad in ("0%", "150%", "abc", "-5%", "nan"):
        with pytest.raises(CohortError):
            parse_percent(bad, what="--canary")


def test_wave_fractions_per_strategy() -> None:
    assert wave_fractions("all") == (1.0,)
    assert wave_fractions("canary", canary=0.05) == (0.05, 1.0)
    assert wave_fractions("waves", waves=(0.1, 0.5, 1.0)) == (0.1, 0.5, 1.0)
    assert wave_fractions("exponential", canary=0.1) == pytest.approx((0.1, 0.2, 0.4, 0.8, 1.0))
    assert wave_fractions("exponential", canary=0.01, growth=10) == pytest.approx((0.01, 0.1, 1.0))
    with pytest.raises(CohortError, match="must increase"):
        wave_fractions("waves", waves=(0.5, 0.5, 1.0))
    with pytest.raises(CohortError, match="last wave must be 100%"):
        wave_fractions("waves", waves=(0.1, 0.5))
    with pytest.raises(CohortError, match="growth"):
        wave_fractions("exponential", canary=0.1, growth=1.0)


# -- cohorts -------------------------------------------------------------------------------------


def test_waves_are_stable_whatever_the_input_order() -> None:
    devices = _fleet(200, ("a", "b"))
    fractions = wave_fractions("waves", waves=(0.1, 0.5, 1.0))
    first = assign_waves(devices, fractions)
    items = list(devices.items())
    random.Random(7).shuffle(items)
    assert assign_waves(dict(items), fractions) == first
    # Every device in exactly one wave.
    assert sorted(d for wave in first for d in wave) == sorted(devices)


def test_canary_is_the_lowest_ranked_devices_and_survives_fleet_growth() -> None:
    devices = _fleet(100)
    canary = set(assign_waves(devices, wave_fractions("canary", canary=0.05))[0])
    ranked = sorted(devices, key=device_rank)
    assert canary == set(ranked[:5])
    # Adding devices never pushes an existing device earlier than devices ranked before it:
    # a canary of the grown fleet holds only devices ranked at or below the old canary's worst.
    grown = _fleet(300)
    grown_canary = set(assign_waves(grown, wave_fractions("canary", canary=0.05))[0])
    worst = max(device_rank(d) for d in grown_canary)
    assert all(device_rank(d) <= worst for d in canary & grown_canary)
    assert canary & set(grown) <= {
        d for d in grown if device_rank(d) <= max(map(device_rank, canary))
    }


def test_waves_are_stratified_by_profile() -> None:
    devices = {
        **{f"pi-{i}": "raspberrypi" for i in range(90)},
        **{f"jet-{i}": "jetson-orin" for i in range(10)},
    }
    waves = assign_waves(devices, wave_fractions("canary", canary=0.05))
    canary_profiles = [devices[d] for d in waves[0]]
    # 5% of each profile, rounded up: every variant is exercised by the canary.
    assert canary_profiles.count("raspberrypi") == math.ceil(0.05 * 90)
    assert canary_profiles.count("jetson-orin") == 1
    assert len(waves[1]) == 100 - len(waves[0])


def test_salt_changes_the_order() -> None:
    devices = _fleet(50)
    fractions = wave_fractions("canary", canary=0.1)
    assert assign_waves(devices, fractions) != assign_waves(devices, fractions, salt="other")


def test_small_fleets_drop_empty_waves() -> None:
    waves = assign_waves(_fleet(2), wave_fractions("waves", waves=(0.1, 0.2, 1.0)))
    assert [len(w) for w in waves] == [1, 1]


@given(
    count=st.integers(min_value=1, max_value=300),
    profiles=st.integers(min_value=1, max_value=4),
    shares=st.lists(st.floats(min_value=0.01, max_value=0.99), max_size=4),
)
def test_waves_partition_and_reach_their_share(
    count: int, profiles: int, shares: list[float]
) -> None:
    fractions = (*sorted(set(round(s, 3) for s in shares)), 1.0)
    fractions = tuple(f for i, f in enumerate(fractions) if i == 0 or f > fractions[i - 1])
    devices = _fleet(count, tuple(f"p{i}" for i in range(profiles)))
    waves = assign_waves(devices, fractions)
    flat = [d for wave in waves for d in wave]
    assert sorted(flat) == sorted(devices)
    assert len(set(flat)) == len(flat)
    # The first wave holds at least the first share of every profile (rounded up).
    for profile in set(devices.values()):
        members = [d for d, p in devices.items() if p == profile]
        in_first = [d for d in waves[0] if devices[d] == profile]
        assert len(in_first) >= min(len(members), math.ceil(fractions[0] * len(members) - 1e-9))


# -- gates ---------------------------------------------------------------------------------------


def _obs(**values: object) -> WaveObservation:
    base: dict[str, object] = {
        "targeted": 10,
        "succeeded": 10,
        "failed": 0,
        "elapsed_s": 5.0,
        "settled_s": 100.0,
    }
    base.update(values)
    return WaveObservation(**base)  # type: ignore[arg-type]


def test_devices_reported_waits_then_times_out() -> None:
    gate = DevicesReported(min_ratio=1.0, timeout_s=60)
    assert gate.evaluate(_obs(succeeded=7, settled_s=None)).verdict == "wait"
    assert gate.evaluate(_obs(succeeded=9, failed=1)).verdict == "pass"
    timed_out = gate.evaluate(_obs(succeeded=7, elapsed_s=61, settled_s=None))
    assert timed_out.verdict == "fail" and "7/10 reported" in timed_out.detail
    assert DevicesReported(min_ratio=0.7).evaluate(_obs(succeeded=7)).verdict == "pass"


def test_failure_ratio() -> None:
    gate = FailureRatio(0.1)
    assert gate.evaluate(_obs(succeeded=9, failed=1)).verdict == "pass"
    assert gate.evaluate(_obs(succeeded=8, failed=2)).verdict == "fail"
    # Fails early: 2 of 10 failed while others are still pending.
    assert gate.evaluate(_obs(succeeded=1, failed=2, settled_s=None)).verdict == "fail"
    assert FailureRatio(0.0).evaluate(_obs(succeeded=9, failed=1)).verdict == "fail"


def test_latency_regression_against_baseline() -> None:
    gate = LatencyRegression(0.2)
    baseline = (10.0, 11.0, 9.0)
    assert gate.evaluate(_obs(baseline_p95_ms=baseline, new_p95_ms=(11.5, 12.0) * 3)).verdict == (
        "pass"
    )
    failed = gate.evaluate(_obs(baseline_p95_ms=baseline, new_p95_ms=(30.0, 31.0) * 3))
    assert failed.verdict == "fail" and "+" in failed.detail
    # No baseline: nothing to compare with, so wait, and fail at the timeout (never pass).
    assert gate.evaluate(_obs(new_p95_ms=(30.0,) * 5)).verdict == "wait"
    no_baseline = gate.evaluate(_obs(new_p95_ms=(30.0,) * 5, elapsed_s=901))
    assert no_baseline.verdict == "fail" and "no baseline" in no_baseline.detail


def test_first_deployment_is_judged_against_the_latency_budget() -> None:
    """No device ran a model before: nothing to regress from (issue 14, item 1)."""
    gate = LatencyRegression(0.2)
    first = {"first_deployment": True, "budget_note": "the latency budget of profile pi (200 ms)"}
    within = gate.evaluate(_obs(new_p95_ms=(20.0,) * 5, new_p95_budget_ms=(200.0,) * 5, **first))
    assert within.verdict == "pass"
    assert within.detail.startswith(
        "no baseline: first deployment, latency judged against the latency budget of profile "
        "pi (200 ms): median p95 20.00 ms is 10% of the budget"
    )
    over = gate.evaluate(_obs(new_p95_ms=(250.0,) * 5, new_p95_budget_ms=(200.0,) * 5, **first))
    assert over.verdict == "fail" and "125% of the budget" in over.detail
    unknown = gate.evaluate(_obs(new_p95_ms=(20.0,) * 5, new_p95_budget_ms=(None,) * 5, **first))
    assert unknown.verdict == "pass" and "latency not judged" in unknown.detail
    # Telemetry on the new bundle is still required first.
    assert gate.evaluate(_obs(**first)).verdict == "wait"


def test_waiting_gates_say_until_when() -> None:
    gates = standard_gates(
        max_failure=0.1, soak_s=30, report_timeout_s=600, max_latency_regression=0.2
    )
    # Reports missing: devices_reported and the latency gate wait until the report timeout.
    result = gates.evaluate(_obs(succeeded=4, settled_s=None, elapsed_s=10))
    waiting = {leaf.gate: (leaf.deadline_s, leaf.on_deadline) for leaf in result.waiting}
    assert waiting["devices_reported"] == (600, "fail")
    assert waiting["latency_regression"] == (600, "fail")
    assert waiting["soak"] == (None, None)  # starts once all report
    # All reported 12 s into the wave, 8 s ago: the soak ends 30 s after that.
    soaking = gates.evaluate(
        _obs(elapsed_s=20, settled_s=8, new_p95_ms=(1.0,) * 10, baseline_p95_ms=(1.0,))
    )
    (leaf,) = soaking.waiting
    assert (leaf.gate, leaf.deadline_s, leaf.on_deadline) == ("soak", 42, "pass")


def test_telemetry_gates_wait_for_data_and_fail_without_it() -> None:
    latency = LatencyRegression(0.2, min_reporting=0.5, timeout_s=60)
    drift = DriftLimit(0.2, min_reporting=0.5, timeout_s=60)
    baseline = (10.0, 10.0)
    # 10 succeeded devices, none sent telemetry on the new bundle yet: wait, not pass.
    for gate in (latency, drift):
        empty = gate.evaluate(_obs(baseline_p95_ms=baseline))
        assert empty.verdict == "wait" and "0/10" in empty.detail
        timed_out = gate.evaluate(_obs(baseline_p95_ms=baseline, elapsed_s=61))
        assert timed_out.verdict == "fail" and "timeout" in timed_out.detail
    # 4 of 10 is below the half needed; 5 is enough.
    assert latency.evaluate(_obs(baseline_p95_ms=baseline, new_p95_ms=(10.0,) * 4)).verdict == (
        "wait"
    )
    assert latency.evaluate(_obs(baseline_p95_ms=baseline, new_p95_ms=(10.0,) * 5)).verdict == (
        "pass"
    )
    assert drift.evaluate(_obs(drift_psi=(0.05,) * 4)).verdict == "wait"
    assert drift.evaluate(_obs(drift_psi=(0.05,) * 5)).verdict == "pass"


def test_drift_and_soak() -> None:
    assert DriftLimit(0.2).evaluate(_obs(drift_psi=(0.05, 0.1, 0.5) * 2)).verdict == "pass"
    assert DriftLimit(0.2).evaluate(_obs(drift_psi=(0.3, 0.4, 0.05) * 2)).verdict == "fail"
    soak = SoakTime(60)
    assert soak.evaluate(_obs(settled_s=None)).verdict == "wait"
    assert soak.evaluate(_obs(settled_s=30)).verdict == "wait"
    assert soak.evaluate(_obs(settled_s=60)).verdict == "pass"


def test_composites() -> None:
    passing, failing, waiting = FailureRatio(1.0), FailureRatio(0.0), SoakTime(1000)
    observation = _obs(succeeded=9, failed=1, settled_s=1)
    assert all_of(passing, waiting).evaluate(observation).verdict == "wait"
    result = all_of(passing, waiting, failing).evaluate(observation)
    assert result.verdict == "fail"
    assert [leaf.gate for leaf in result.failures] == ["failure_ratio"]
    assert any_of(failing, passing).evaluate(observation).verdict == "pass"
    assert any_of(failing, waiting).evaluate(observation).verdict == "wait"
    assert any_of(failing, failing).evaluate(observation).verdict == "fail"
    with pytest.raises(GateError, match="empty"):
        all_of()
    with pytest.raises(GateError):
        AllOf(())
    with pytest.raises(GateError):
        FailureRatio(1.5)


def test_standard_gates_hold_a_wave_until_soaked_and_halt_on_regression() -> None:
    gates = standard_gates(
        max_failure=0.02,
        soak_s=30,
        report_timeout_s=600,
        max_latency_regression=0.2,
        max_drift=0.25,
    )
    telemetry = {"baseline_p95_ms": (10.0,), "new_p95_ms": (10.5,) * 10, "drift_psi": (0.1,) * 10}
    assert gates.evaluate(_obs(settled_s=10, **telemetry)).verdict == "wait"
    assert gates.evaluate(_obs(settled_s=31, **telemetry)).verdict == "pass"
    # Soaked, but no telemetry from the updated devices: the gates wait instead of passing.
    assert gates.evaluate(_obs(settled_s=31)).verdict == "wait"
    slow = gates.evaluate(_obs(settled_s=31, **{**telemetry, "new_p95_ms": (15.0,) * 10}))
    assert slow.verdict == "fail"
    assert [leaf.gate for leaf in slow.failures] == ["latency_regression"]
    drifting = gates.evaluate(_obs(settled_s=31, **{**telemetry, "drift_psi": (0.4,) * 10}))
    assert [leaf.gate for leaf in drifting.failures] == ["drift"]
