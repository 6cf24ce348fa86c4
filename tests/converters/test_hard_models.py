"""Candidates build where a peer's do: Constant-node weights, opset 12, fallback searches."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from edgekit.converters import convert
from edgekit.converters.examples import DigitsExample
from edgekit.converters.outputs import write_golden

from edgekit.profiles import load_profile
from edgekit.runtimes import open_runtime
from edgekit.verify_runtime import verify_runtime

from .model_builders import constant_weights_at_opset12


@pytest.mark.slow
def test_constant_weights_at_opset12_get_int8_candidates_that_load_on_onnxruntime_1_16(
    digits: DigitsExample, tmp_path: Path, runtime_cache: Path
) -> None:
    source = constant_weights_at_opset12(digits.model_path, tmp_path / "const12.onnx")
    profile = tmp_path / "pi.yaml"
    profile.write_text(
        "extends: raspberrypi\nname: pi-int8\ndescription: int8 kinds\n"
        "quantization:\n  candidates: [fp32, weight_int8, dynamic_int8, static_int8]\n"
    )
    result = convert(
        source,
        profile=str(profile),
        output_dir=tmp_path / "out",
        calibration=digits.calibration_path,
        validation=digits.validation_path,
        benchmark_seconds=0.3,
        keep_candidates=True,
    )
    rows = {row["name"]: row for row in result.candidates}
    assert {name: row["status"] for name, row in rows.items()} == dict.fromkeys(rows, "ok")
    assert "Constant node(s) turned into initializers" in " ".join(result.report["source"]["notes"])
    static = rows["static_int8"]
    assert any("opset 12 -> 13" in note for note in static["notes"])
    # A static int8 model really holds int8 weights with per-channel (axis) DequantizeLinear.
    built = onnx.load(str(tmp_path / "out" / "candidates" / "static_int8.onnx"))
    axes = [
        attribute.i
        for node in built.graph.node
        if node.op_type == "DequantizeLinear"
        for attribute in node.attribute
        if attribute.name == "axis"
    ]
    assert axes, "no per-channel DequantizeLinear"
    assert rows["weight_int8"]["size_bytes"] < 0.3 * rows["fp32"]["size_bytes"]
    for name in ("static_int8", "weight_int8"):
        assert rows[name]["accuracy"]["meets_tolerance"], rows[name]["accuracy"]["failures"]
        # Load and replay on the profile's oldest runtime, onnxruntime 1.16.3, in its own venv.
        folder = tmp_path / f"check-{name}"
        folder.mkdir()
        model = folder / "model.onnx"
        model.write_bytes((tmp_path / "out" / "candidates" / f"{name}.onnx").read_bytes())
        dataset = _validation(digits, model)
        write_golden(
            folder / "golden.npz", open_runtime(model), dataset, load_profile("raspberrypi")
        )
        report = verify_runtime(folder, load_profile("raspberrypi"), cache_dir=runtime_cache,
                                which="oldest")  # fmt: skip
        assert report.checks, report.to_dict()  # one per CPU the profile names (aarch64)
        for check in report.checks:
            assert check.version == "1.16.3", report.to_dict()
            assert check.loads and check.within_tolerance, report.to_dict()


def _validation(digits: DigitsExample, model: Path):  # type: ignore[no-untyped-def]
    from edgekit.converters.data import load_dataset

    return load_dataset(digits.validation_path, open_runtime(model).inputs)


@pytest.mark.parametrize(
    ("kind", "min_cosine"), [("weight_int8", 0.99999), ("static_int8", 0.99995)]
)
def test_the_fallback_search_keeps_the_fewest_tensors_in_float(
    digits: DigitsExample, tmp_path: Path, kind: str, min_cosine: float
) -> None:
    """With a tolerance plain int8 misses, the search finds the fewest worst-ranked tensors
    to keep in float, and the report shows every attempt."""
    profile = tmp_path / "strict.yaml"
    profile.write_text(
        "extends: raspberrypi\nname: strict\ndescription: strict cosine\n"
        f"quantization:\n  candidates: [fp32, {kind}]\n"
        f"accuracy:\n  min_cosine: {min_cosine}\n  min_top1_agreement: 0.98\n"
    )
    result = convert(
        digits.model_path,
        profile=str(profile),
        output_dir=tmp_path / "out",
        calibration=digits.calibration_path,
        validation=digits.validation_path,
        benchmark_seconds=0.3,
    )
    row = next(row for row in result.candidates if row["name"] == kind)
    fallback = row["fallback"]
    attempts = fallback["attempts"]
    assert attempts[0] == {**attempts[0], "float": 0, "meets_tolerance": False}
    assert row["accuracy"]["meets_tolerance"], row["accuracy"]["failures"]
    kept = len(row["float_nodes"])
    assert kept >= 1
    passing = {a["float"] for a in attempts if a.get("meets_tolerance")}
    failing = {a["float"] for a in attempts if a.get("meets_tolerance") is False}
    assert kept == min(passing) and kept - 1 in failing  # the fewest that work
    ranked = [item["name"] for item in fallback["ranking"]["worst"]]
    assert row["float_nodes"] == ranked[:kept]  # the worst-ranked ones
    assert f"{kept} of {fallback['ranking']['ranked']}" in " ".join(row["notes"])


def test_a_per_channel_build_that_does_not_run_is_caught(tmp_path: Path) -> None:
    """static_int8 checks that its per-channel build runs (onnxruntime refuses a per-axis
    scale that does not match its axis at run time) and rebuilds per-tensor when it does not."""
    import numpy as np
    from edgekit.converters.passes.onnx_passes import _runs_or_why
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 3), np.int8), "w_q")
    scale = numpy_helper.from_array(np.ones(2, np.float32), "w_scale")  # 2 scales for 4 rows
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=0),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        initializer=[weight, scale],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    why = _runs_or_why(path, {"x": np.ones((1, 4), np.float32)})
    assert why is not None and "per axis quantization" in why
