"""End-to-end conversions of the digits CNN and the two shared third-party models.

Every candidate must load in onnxruntime, the report's accuracy numbers must match a
recomputation done here independently of edgekit's validator, and the chosen artifact must
meet the profile's tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edgekit.converters import ConvertResult, convert
from edgekit.converters.examples import DigitsExample

from edgekit.profiles import load_profile

from ..conftest import MAGIKA, SILERO


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _feeds(data: dict[str, np.ndarray], session: ort.InferenceSession) -> list[dict[str, Any]]:
    """One sample per feed, as edgekit validates (the test's own slicing, not edgekit's)."""
    ranks = {i.name: len(i.shape) for i in session.get_inputs()}
    count = max(data[n].shape[0] for n in ranks if data[n].ndim >= 1)

    def sample(name: str, index: int) -> np.ndarray:
        array = data[name]
        if array.ndim == ranks[name] + 1:
            return array[index]
        if (
            array.ndim == ranks[name]
            and array.ndim > 0
            and not isinstance(session.get_inputs()[list(ranks).index(name)].shape[0], int)
        ):
            return array[index : index + 1]
        return array

    return [{n: sample(n, i) for n in ranks} for i in range(count)]


def _outputs(path: Path, feeds: list[dict[str, Any]]) -> dict[str, list[np.ndarray]]:
    session = _session(path)
    names = [o.name for o in session.get_outputs()]
    per_feed: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for name, value in zip(names, session.run(None, feed), strict=True):
            per_feed[name].append(np.asarray(value, dtype=np.float64))
    return per_feed


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 1.0 if na == 0 and nb == 0 else float(a.ravel() @ b.ravel() / (na * nb))


def _metric(kind: str, reference: list[np.ndarray], found: list[np.ndarray]) -> float:
    """docs/converter.md's cosine for each output kind, recomputed here."""
    if kind == "classifier":
        ref = np.concatenate([r.reshape(-1, r.shape[-1]) for r in reference])
        cand = np.concatenate([c.reshape(-1, c.shape[-1]) for c in found])
        return float(np.mean([_cosine(x, y) for x, y in zip(ref, cand, strict=True)]))
    if kind == "regression" and reference[0].size > 1:
        return float(np.mean([_cosine(x, y) for x, y in zip(reference, found, strict=True)]))
    return _cosine(np.concatenate([r.ravel() for r in reference]), np.concatenate(
        [c.ravel() for c in found]))  # fmt: skip


def _fresh(validation: Path, calibration: Path | None) -> dict[str, np.ndarray]:
    """The validation samples edgekit validates on: those not also in the calibration data."""
    with np.load(validation) as archive:
        data = {k: archive[k] for k in archive.files}
    if calibration is None:
        return data
    with np.load(calibration) as archive:
        seen = {archive[k][i].tobytes() for k in archive.files if archive[k].ndim for i in
                range(archive[k].shape[0])}  # fmt: skip
    batched = [k for k, v in data.items() if v.ndim]
    keep = [i for i in range(data[batched[0]].shape[0])
            if not all(data[k][i].tobytes() in seen for k in batched)]  # fmt: skip
    return {k: (v[keep] if v.ndim else v) for k, v in data.items()}


def _check_conversion(
    result: ConvertResult, model: Path, validation: Path, calibration: Path | None = None
) -> None:
    report = result.report
    profile = load_profile(report["profile"])
    data = _fresh(validation, calibration)
    feeds = _feeds(data, _session(model))
    reference = _outputs(model, feeds)
    checked = 0
    for row in report["candidates"]:
        if row["status"] != "ok":
            continue
        path = result.artifact.parent / "candidates" / f"{row['name']}.onnx"
        found = _outputs(path, feeds)  # loads in onnxruntime, or raises
        for name, metrics in row["accuracy"]["outputs"].items():
            assert metrics["rows"] == len(feeds) or metrics["kind"] == "classifier"
            assert metrics["cosine"] == pytest.approx(
                _metric(metrics["kind"], reference[name], found[name]), abs=1e-4
            ), (row["name"], name)
            ref = np.concatenate([r.ravel() for r in reference[name]])
            cand = np.concatenate([c.ravel() for c in found[name]])
            max_abs = float(np.abs(ref - cand).max())
            assert metrics["max_abs_error"] == pytest.approx(max_abs, rel=1e-3, abs=1e-5)
            if metrics["top1_agreement"] is not None:
                width = reference[name][0].shape[-1]
                r = np.concatenate([x.reshape(-1, width) for x in reference[name]])
                c = np.concatenate([x.reshape(-1, width) for x in found[name]])
                agree = float((r.argmax(1) == c.argmax(1)).mean())
                assert metrics["top1_agreement"] == pytest.approx(agree, abs=1e-9)
        checked += 1
    assert checked >= 2, "fewer than two candidates were built"
    chosen = next(r for r in report["candidates"] if r["verdict"] == "chosen")
    assert chosen["name"] == report["chosen"] == result.chosen
    found = _outputs(result.artifact, feeds)
    for name, metrics in chosen["accuracy"]["outputs"].items():
        assert _metric(metrics["kind"], reference[name], found[name]) >= profile.accuracy.min_cosine
    assert report["data"]["accuracy"] == "validated"
    artifact = onnx.load(str(result.artifact))
    assert artifact.ir_version <= 9  # raspberrypi's oldest runtime is onnxruntime 1.16.3
    opset = next(o.version for o in artifact.opset_import if o.domain in ("", "ai.onnx"))
    assert opset <= 19
    assert json.loads((result.artifact.parent / "report.json").read_text()) == report
    assert (result.artifact.parent / "golden.npz").exists()


def test_digits_cnn(digits: DigitsExample, tmp_path: Path) -> None:
    result = convert(
        digits.model_path,
        profile="raspberrypi",
        output_dir=tmp_path / "out",
        calibration=digits.calibration_path,
        validation=digits.validation_path,
        benchmark_seconds=0.5,
        keep_candidates=True,
    )
    _check_conversion(result, digits.model_path, digits.validation_path, digits.calibration_path)
    assert result.report["candidates"][0]["accuracy"]["outputs"]["logits"]["kind"] == "classifier"
    # The chosen artifact still classifies the held-out digits (labels, not just agreement).
    logits = _session(result.artifact).run(None, {"pixels": digits.x_test})[0]
    assert float((logits.argmax(1) == digits.y_test).mean()) >= digits.test_accuracy - 0.01


@pytest.mark.slow
def test_magika(magika_data: tuple[Path, Path], tmp_path: Path) -> None:
    calibration, validation = magika_data
    result = convert(
        MAGIKA,
        profile="raspberrypi",
        output_dir=tmp_path / "out",
        calibration=calibration,
        validation=validation,
        benchmark_seconds=0.5,
        keep_candidates=True,
    )
    _check_conversion(result, MAGIKA, validation, calibration)
    chosen = next(r for r in result.candidates if r["verdict"] == "chosen")
    fp32 = next(r for r in result.candidates if r["name"] == "fp32")
    assert chosen["size_bytes"] <= fp32["size_bytes"]


def test_silero(silero_data: tuple[Path, Path], tmp_path: Path) -> None:
    calibration, validation = silero_data
    result = convert(
        SILERO,
        profile="raspberrypi",
        output_dir=tmp_path / "out",
        calibration=calibration,
        validation=validation,
        benchmark_seconds=0.5,
        keep_candidates=True,
    )
    _check_conversion(result, SILERO, validation, calibration)
    rows = {row["name"]: row for row in result.candidates}
    # Every candidate builds: weights in If subgraphs, quantizers that broke topological order.
    assert {name: row["status"] for name, row in rows.items()} == dict.fromkeys(rows, "ok")
    kinds = {n: m["kind"] for n, m in rows["fp32"]["accuracy"]["outputs"].items()}
    assert kinds == {"output": "regression", "stateN": "state"}
    # Weight-only int8 reaches the LSTM weights inside the If branches: <= 0.35x of fp32, and it
    # is the same graph as fp32 once onnxruntime folds constants (fp32 speed by construction).
    weight = rows["weight_int8"]
    assert weight["size_bytes"] <= 0.35 * rows["fp32"]["size_bytes"]
    assert weight["equal_latency_to"] == "fp32"


def test_onnx_with_external_data_loads_from_the_output_and_from_its_bundle(
    digits: DigitsExample, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgekit.converters.passes import onnx_passes

    from edgekit.bundle import build_bundle, collect_bundle_inputs, extract_bundle
    from edgekit.trust import Signer
    from edgekit.trust.dsse import SignaturePolicy

    source = tmp_path / "src" / "digits.onnx"
    source.parent.mkdir()
    onnx.save_model(
        onnx.load(str(digits.model_path)),
        str(source),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="digits.onnx.data",
        size_threshold=0,  # every tensor external
    )
    # Candidates keep their weights in `<candidate>.onnx.data` as models over 1.8 GB do.
    monkeypatch.setattr(onnx_passes, "_EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    profile = tmp_path / "fp32.yaml"
    profile.write_text(
        "extends: raspberrypi\nname: pi-fp32\ndescription: fp32 only\n"
        "quantization:\n  candidates: [fp32]\n"
    )
    out = tmp_path / "out"
    result = convert(
        source,
        profile=str(profile),
        output_dir=out,
        validation=digits.validation_path,
        benchmark_seconds=0.2,
        keep_candidates=True,
    )
    assert result.artifact == out / "model.onnx"
    for kept in (out / "candidates").glob("*.onnx"):  # each loads with its own data file
        assert kept.with_name(kept.name + ".data").is_file()
        _session(kept)
    assert (out / "model.onnx.data").is_file()
    locations = {
        entry.value
        for tensor in onnx.load(str(result.artifact), load_external_data=False).graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert locations == {"model.onnx.data"}
    logits = _session(result.artifact).run(None, {"pixels": digits.x_test[:4]})[0]
    assert logits.shape[0] == 4

    inputs = {item.path: item.role for item in collect_bundle_inputs(out)}
    assert inputs["model.onnx.data"] == "other" and inputs["model.onnx"] == "model"
    signer = Signer.generate()
    bundle = build_bundle(
        collect_bundle_inputs(out),
        out_path=tmp_path / "digits.ekb",
        name="digits",
        version="1.0.0",
        security_epoch=0,
        profile="raspberrypi",
        signers=[signer],
    )
    # What the agent's store does on install: verify while extracting into the slot.
    slot = tmp_path / "slot"
    policy = SignaturePolicy({signer.keyid: signer.public_key}, threshold=1)
    with open(bundle, "rb") as handle:
        installed = extract_bundle(handle, slot, trust=policy)
    assert "model.onnx.data" in {item.entry.path for item in installed.files}
    again = _session(slot / "model.onnx").run(None, {"pixels": digits.x_test[:4]})[0]
    np.testing.assert_array_equal(again, logits)
