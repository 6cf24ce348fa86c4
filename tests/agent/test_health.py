"""The health check against real installed slots and onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from edgekit.agent.health import (
    GoldenMatch,
    MemoryBudget,
    ModelSizeBudget,
    all_of,
    run_health_check,
)
from edgekit.agent.store import SlotInfo

from edgekit.bundle import BundleFile
from edgekit.messages import BundleId
from edgekit.profiles import Budgets, HealthCheckTolerance, load_profile
from tests.agent.conftest import Bundles, MakeDevice
from tests.quantized_models import quantized_classifier, write_golden


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


def _slot(folder: Path) -> SlotInfo:
    files = tuple(
        BundleFile(name, (folder / name).stat().st_size, "0" * 64, role)
        for name, role in (("model.tflite", "model"), ("golden.npz", "golden"))
    )
    return SlotInfo(
        slot="a", directory=folder, bundle=BundleId("q", "1.0.0", "0" * 64), size_bytes=0,
        profile="p", security_epoch=0, files=files, installed_at=0.0,
        envelope_path=folder / "envelope.json",
    )  # fmt: skip


@pytest.mark.parametrize(("profile", "io_type"), [("coral-edgetpu", "uint8"), ("cortex-m", "int8")])
def test_quantized_outputs_are_judged_as_real_values(
    profile: str, io_type: Literal["int8", "uint8"], tmp_path: Path
) -> None:
    model = quantized_classifier(tmp_path, io_type)
    golden = write_golden(model, profile)
    with np.load(golden) as archive:
        arrays = {key: archive[key] for key in archive.files}
    scale, zero_point = arrays["quantization/outputs/output_0"]
    outputs = sorted(key for key in arrays if key.startswith("outputs/"))
    tolerance = load_profile(profile).health_check

    def judge(changed: dict[str, Any], *, keep_quantization: bool = True) -> Any:
        kept = {
            key: changed.get(key, value)
            for key, value in arrays.items()
            if keep_quantization or not key.startswith("quantization/")
        }
        np.savez(golden, **kept)
        report = run_health_check(_slot(tmp_path), budgets=Budgets(), tolerance=tolerance)
        return report, report.details()["golden_match"]

    report, match = judge({})
    assert report.ok, report.reason
    assert match["top1_agreement"] == 1.0 and match["worst_cosine"] > 0.999
    # One quantization step off everywhere: a real difference of one scale, within atol.
    info = np.iinfo(io_type)
    stepped = {
        key: np.clip(arrays[key].astype(np.int64) + 1, info.min, info.max).astype(io_type)
        for key in outputs
    }
    report, match = judge(stepped)
    assert report.ok, report.reason
    assert match["max_abs_error"] == pytest.approx(scale, rel=1e-3)
    # Classes reversed: the real-valued cosine fails (the stored numbers' would look alike).
    wrong = {key: arrays[key][:, ::-1].copy() for key in outputs}
    for old_file in (False, True):  # without quantization entries: the runtime's own
        report, match = judge(wrong, keep_quantization=not old_file)
        assert not report.ok and "golden_match" in report.reason
        want = (arrays[outputs[0]].astype(np.float64) - zero_point) * scale
        got = (wrong[outputs[0]].astype(np.float64) - zero_point) * scale
        real = float((want * got).sum() / (np.linalg.norm(want) * np.linalg.norm(got)))
        assert f"cosine {real:.4f}" in report.reason, report.reason
