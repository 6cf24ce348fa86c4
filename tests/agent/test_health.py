"""The health check against real installed slots and onnxruntime."""

from __future__ import annotations

import pytest
from edgekit.agent.health import (
    GoldenMatch,
    MemoryBudget,
    ModelSizeBudget,
    all_of,
    run_health_check,
)

from edgekit.profiles import Budgets, HealthCheckTolerance
from tests.agent.conftest import Bundles, MakeDevice


def test_budgets_and_composition(make_device: MakeDevice, bundles: Bundles) -> None:
    device = make_device()
    slot = device.store.verify_slot(device.store.pointer().active or "a")
    ok = run_health_check(slot, budgets=Budgets(), tolerance=HealthCheckTolerance())
    assert ok.ok and ok.runtime is not None
    assert ok.details()["golden_match"]["worst_cosine"] > 0.999
    tight = run_health_check(
        slot,
        budgets=Budgets(max_model_bytes=10, max_ram_bytes=1, max_latency_ms=1e-6),
        tolerance=HealthCheckTolerance(),
    )
    assert not tight.ok and tight.runtime is None
    failed = {r.name for r in tight.results if not r.ok}
    assert {"model_size_budget", "latency_budget"} <= failed
    assert "model_size_budget" in tight.reason
    only_golden = run_health_check(
        slot,
        budgets=Budgets(max_latency_ms=1e-6),
        tolerance=HealthCheckTolerance(),
        checks=all_of(GoldenMatch(), ModelSizeBudget(1 << 30), MemoryBudget(1 << 40)),
    )
    assert only_golden.ok  # the composite decides, not the budgets argument
    with pytest.raises(ValueError, match="empty"):
        all_of()


def test_a_slot_without_golden_samples_fails(make_device: MakeDevice) -> None:
    device = make_device()
    slot = device.store.verify_slot(device.store.pointer().active or "a")
    golden = slot.path_of("golden")
    assert golden is not None
    golden.unlink()
    report = run_health_check(slot, budgets=Budgets(), tolerance=HealthCheckTolerance())
    assert not report.ok and "golden.npz" in report.reason
