"""TFLite output of `edgekit convert`: a Keras CNN trained here on scikit-learn's digits.

Every variant's accuracy is recomputed here independently of edgekit's validator: the written
`.tflite` runs in ai_edge_litert directly, inputs are quantized and outputs dequantized by this
file's own code, and top-1 on held-out digits is compared with the Keras model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from edgekit.converters import convert
from edgekit.converters.passes.tflite_passes import litert_quantizer_available
from edgekit.converters.tflite_examples import KerasDigitsExample, export_keras_digits

from edgekit.bundle import inspect_bundle, sign_and_build_bundle
from edgekit.runtimes import LiteRtBackend, dequantize_output, open_runtime, quantize_input

Array = npt.NDArray[Any]


@pytest.fixture(scope="session")
def keras_digits(tmp_path_factory: pytest.TempPathFactory) -> KerasDigitsExample:
    """The Keras digits CNN, trained here (a few seconds)."""
    example = export_keras_digits(tmp_path_factory.mktemp("keras_digits"))
    assert example.test_accuracy > 0.9, f"the test CNN trained badly: {example.test_accuracy}"
    return example


def _litert_logits(path: Path, x: Array) -> tuple[Array, str]:
    """Run a .tflite on all of `x` with ai_edge_litert; returns real-valued logits and the input
    dtype. Quantization is done here from the tensors' own scale and zero point."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    (given,) = interpreter.get_input_details()
    (taken,) = interpreter.get_output_details()
    interpreter.resize_tensor_input(given["index"], list(x.shape))
    interpreter.allocate_tensors()
    data: Array = x
    if np.dtype(given["dtype"]).kind in "iu":
        scale, zero_point = given["quantization"]
        info = np.iinfo(given["dtype"])
        data = np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(given["dtype"])
    interpreter.set_tensor(given["index"], data)
    interpreter.invoke()
    out = interpreter.get_tensor(taken["index"]).astype(np.float64)
    if np.dtype(taken["dtype"]).kind in "iu":
        scale, zero_point = taken["quantization"]
        out = (out - zero_point) * scale
    return out, np.dtype(given["dtype"]).name


def _mean_cosine(a: Array, b: Array) -> float:
    dots = (a * b).sum(1)
    return float((dots / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).mean())


def _profile(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\n{text}", encoding="utf-8")
    return path


def _check_variant(
    keras_digits: KerasDigitsExample, path: Path, *, io_dtype: str, max_drop: float
) -> float:
    logits, dtype = _litert_logits(path, keras_digits.x_test)
    assert dtype == io_dtype, path
    accuracy = float((logits.argmax(1) == keras_digits.y_test).mean())
    assert accuracy >= keras_digits.test_accuracy - max_drop, (path.name, accuracy)
    agreement = float((logits.argmax(1) == keras_digits.logits_test.argmax(1)).mean())
    assert agreement >= 0.95, (path.name, agreement)
    return accuracy


def test_each_tflite_variant_keeps_the_keras_accuracy(
    keras_digits: KerasDigitsExample, tmp_path: Path
) -> None:
    # Devices on ai-edge-litert only: the LiteRT quantizer's rows are offered without a
    # device check there (for tflite-runtime 2.14 they need --verify-runtime; see below).
    litert_pi = _profile(
        tmp_path,
        "litert-pi",
        "extends: raspberrypi-tflite\nruntime:\n"
        "  oldest: {package: ai-edge-litert, version: '2.3.0'}\n"
        "  newest: {package: ai-edge-litert, version: '2.3.0'}\n",
    )
    result = convert(
        keras_digits.keras_path,
        profile=litert_pi,
        output_dir=tmp_path / "pi",
        calibration=keras_digits.calibration_path,
        validation=keras_digits.validation_path,
        benchmark_seconds=0.2,
        keep_candidates=True,
    )
    report = result.report
    assert result.artifact == tmp_path / "pi" / "model.tflite"
    assert report["schema"] == "edgekit.report/v1" and report["data"]["accuracy"] == "validated"
    rows = {row["name"]: row for row in report["candidates"]}
    expected = {"fp32", "fp16", "dynamic_int8", "full_int8", "pruned"}
    if litert_quantizer_available():  # the second int8 source: the LiteRT quantizer
        expected.add("dynamic_int8_aeq")
        assert rows["dynamic_int8_aeq"]["details"]["litert_quantize"]["recipe"]
        assert any(
            "int8 I/O and the profile wants float32" in n for n in rows["full_int8"]["notes"]
        )
    assert set(rows) == expected
    kept = tmp_path / "pi" / "candidates"
    accuracies = {}
    for name, row in rows.items():
        assert row["status"] == "ok", row
        assert row["latency_ms"]["p50"] > 0 and row["peak_memory_bytes"] > 0
        exact = name == "fp32"  # the same network in float32: top-1 does not move
        accuracies[name] = _check_variant(
            keras_digits,
            kept / f"{name}.tflite",
            io_dtype="float32",
            max_drop=0.0 if exact else 0.02,
        )
    # fp32 is the Keras model itself, up to float rounding.
    fp32_logits, _ = _litert_logits(kept / "fp32.tflite", keras_digits.x_test)
    np.testing.assert_allclose(fp32_logits, keras_digits.logits_test, atol=1e-3)
    assert rows["full_int8"]["size_bytes"] < rows["fp32"]["size_bytes"] / 3
    # pruned: the dynamic int8 model with half of each weight tensor set to zero (the profile's
    # pruning.sparsity), judged like the others: the same file size, a smaller zstd.
    pruned = rows["pruned"]
    assert pruned["passes"][:2] == ["tflite_convert(kind=dynamic_int8)", "tflite_prune"]
    assert pruned["details"]["tflite_prune"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert pruned["size_bytes"] == rows["dynamic_int8"]["size_bytes"]
    assert pruned["compressed_size_bytes"] < 0.85 * rows["dynamic_int8"]["compressed_size_bytes"]
    assert rows["fp16"]["size_bytes"] < rows["fp32"]["size_bytes"] * 0.6
    # The chosen artifact is one of them, byte for byte, and meets the tolerance.
    chosen = rows[report["chosen"]]
    assert chosen["verdict"] == "chosen" and chosen["accuracy"]["meets_tolerance"]
    assert result.artifact.read_bytes() == (kept / f"{report['chosen']}.tflite").read_bytes()
    assert sorted(p.name for p in (tmp_path / "pi").iterdir()) == [
        "candidates", "golden.npz", "model.tflite", "reference_stats.json", "report.json",
    ]  # fmt: skip

    # Full int8 with uint8 I/O (Coral): the runtime and golden samples speak uint8.
    coral = convert(
        keras_digits.keras_path,
        profile="coral-edgetpu",
        output_dir=tmp_path / "coral",
        calibration=keras_digits.calibration_path,
        validation=keras_digits.validation_path,
        benchmark_seconds=0.2,
    )
    _check_variant(keras_digits, coral.artifact, io_dtype="uint8", max_drop=0.02)
    runtime = LiteRtBackend(coral.artifact)
    assert runtime.engine == "ai-edge-litert" and runtime.version
    assert [spec.name for spec in runtime.inputs] == ["pixels"]
    assert [spec.name for spec in runtime.outputs] == ["logits"]
    assert runtime.inputs[0].dtype == "uint8" and runtime.inputs[0].quantization is not None
    with np.load(tmp_path / "coral" / "golden.npz") as golden:
        inputs = golden["inputs/0/pixels"]
        expected = golden["outputs/0/logits"]
    assert inputs.dtype == np.uint8 and expected.dtype == np.uint8
    np.testing.assert_array_equal(runtime.run({"pixels": inputs})["logits"], expected)
    # A batch of 5, then 1 again: the backend resizes its input tensor.
    batch = quantize_input(runtime.inputs[0], keras_digits.x_test[:5])
    five = dequantize_output(runtime.outputs[0], runtime.run({"pixels": batch})["logits"])
    assert five.shape == (5, 10) and five.dtype == np.float32
    one = runtime.run({"pixels": batch[:1]})["logits"]
    np.testing.assert_array_equal(quantize_input(runtime.outputs[0], five[:1]), one)
    stats = json.loads((tmp_path / "coral" / "reference_stats.json").read_text())
    assert stats["inputs"]["pixels"]["dtype"] == "uint8"
    # The golden samples carry each quantized tensor's [scale, zero_point].
    with np.load(tmp_path / "coral" / "golden.npz") as golden:
        for key, spec in (
            ("quantization/inputs/pixels", runtime.inputs[0]),
            ("quantization/outputs/logits", runtime.outputs[0]),
        ):
            assert spec.quantization is not None
            np.testing.assert_allclose(golden[key], spec.quantization)
    # The report's signature (and so the bundle manifest's) is the artifact's uint8 I/O.
    signature = coral.report["signature"]
    assert [(s["name"], s["dtype"]) for s in signature["inputs"]] == [("pixels", "uint8")]
    assert [(s["name"], s["dtype"]) for s in signature["outputs"]] == [("logits", "uint8")]
    assert signature["outputs"][0]["quantization"] == {
        "scale": runtime.outputs[0].quantization[0],
        "zero_point": runtime.outputs[0].quantization[1],
    }
    assert coral.report["source"]["signature"]["inputs"][0]["dtype"] == "float32"
    assert coral.report["candidates"][0]["details"]["tflite_convert"]["io_type"] == "uint8"
    bundle = sign_and_build_bundle(
        tmp_path / "coral", name="kd", version="1.0.0", security_epoch=0, profile=None,
        out_dir=tmp_path / "bundles", signers=[],
    )  # fmt: skip
    manifest = inspect_bundle(bundle.read_bytes()).manifest
    assert manifest.profile == "coral-edgetpu"
    io_signature: Any = manifest.signature
    (manifest_input,) = io_signature["inputs"]
    (manifest_output,) = io_signature["outputs"]
    assert manifest_input["dtype"] == "uint8" and manifest_output["dtype"] == "uint8"
    assert manifest_output["quantization"]["zero_point"] == runtime.outputs[0].quantization[1]


@pytest.mark.slow
def test_full_int8_fallback_keeps_the_worst_layers_in_float(
    keras_digits: KerasDigitsExample, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    convert(
        keras_digits.keras_path,
        profile=_profile(tmp_path, "plain", "extends: raspberrypi-tflite\n"
                         "quantization: {candidates: [full_int8], fallback_attempts: 0}\n"),
        output_dir=plain,
        calibration=keras_digits.calibration_path,
        validation=keras_digits.validation_path,
        benchmark_seconds=0.1,
    )  # fmt: skip
    plain_logits, _ = _litert_logits(plain / "model.tflite", keras_digits.x_test)
    plain_cosine = _mean_cosine(plain_logits, keras_digits.logits_test)
    # A tolerance plain full int8 misses: half its distance from a perfect 1.
    tight = 1.0 - (1.0 - plain_cosine) / 2
    strict = _profile(
        tmp_path,
        "strict",
        "extends: raspberrypi-tflite\n"
        "quantization: {candidates: [fp32, full_int8], fallback_attempts: 3}\n"
        f"accuracy: {{min_cosine: {tight}, min_top1_agreement: 0.9}}\n",
    )
    result = convert(
        keras_digits.keras_path,
        profile=strict,
        output_dir=tmp_path / "out",
        calibration=keras_digits.calibration_path,
        validation=keras_digits.validation_path,
        benchmark_seconds=0.1,
        keep_candidates=True,
    )
    row = next(r for r in result.candidates if r["name"] == "full_int8")
    assert row["status"] == "ok"
    assert row["float_nodes"], row
    attempts = row["fallback"]["attempts"]
    assert len(attempts) >= 2 and attempts[0]["float"] == 0
    assert attempts[0]["meets_tolerance"] is False
    assert any("kept in float" in note for note in row["notes"])
    ranking = row["fallback"]["ranking"]  # the quantization debugger's
    assert ranking["worst"] and "TF debugger" in ranking["method"]
    assert (
        row["float_nodes"] == [item["name"] for item in ranking["worst"]][: len(row["float_nodes"])]
    )
    kept_logits, dtype = _litert_logits(
        tmp_path / "out" / "candidates" / "full_int8.tflite", keras_digits.x_test
    )
    assert dtype == "float32"
    assert _mean_cosine(kept_logits, keras_digits.logits_test) > plain_cosine


@pytest.mark.slow
def test_full_int8_fallback_keeps_uint8_io_for_coral(
    keras_digits: KerasDigitsExample, tmp_path: Path
) -> None:
    """A float layer next to a graph input/output leaves that input/output float32 (TF keeps
    its original type). For a uint8-I/O profile the fallback never ranks those layers, and a
    build whose I/O is not uint8 is refused with the reason."""
    from edgekit.converters.candidates import build_candidate, recipes_for
    from edgekit.converters.data import load_dataset
    from edgekit.converters.passes import PassContext
    from edgekit.converters.passes.tflite_passes import TfliteConvertPass, rank_tflite_layers

    from edgekit.profiles import load_profile
    from edgekit.runtimes import TensorSpec

    pixels = TensorSpec(name="pixels", dtype="float32", shape=(None, 8, 8, 1))
    data = load_dataset(keras_digits.calibration_path, [pixels])
    saved = keras_digits.saved_model

    def ranked(profile: str) -> tuple[PassContext, list[str]]:
        folder = tmp_path / profile
        folder.mkdir()
        context = PassContext(
            profile=load_profile(profile), workdir=folder, threads=1, calibration=data,
            validation=data,
        )  # fmt: skip
        config = TfliteConvertPass.config_for(context.profile, kind="full_int8")
        return context, [name for name, _ in rank_tflite_layers(saved, context, config)]

    coral, ranked_uint8 = ranked("coral-edgetpu")
    _, ranked_float = ranked("raspberrypi-tflite")
    edge = [name for name in ranked_float if name not in ranked_uint8]
    assert edge and ranked_uint8, (ranked_float, ranked_uint8)
    refused = []
    (recipe, _) = recipes_for("full_int8", "tflite")
    for index, layer in enumerate(ranked_float):
        attempt = recipe.with_option("tflite_convert", float_layers=(layer,))
        build = build_candidate(attempt, saved, coral, label=f"fb{index}")
        if build.status == "ok":
            assert build.path is not None
            runtime = LiteRtBackend(build.path)
            dtypes = {spec.dtype for spec in (*runtime.inputs, *runtime.outputs)}
            assert dtypes == {"uint8"}, build.to_dict()
            assert build.details["op_versions"]["io_types"] == ["uint8"]
            continue
        # TF left an input or output float32: refused, with the reason.
        assert build.error is not None
        assert "float32" in build.error and "the profile wants uint8 I/O" in build.error
        refused.append(layer)
    # Exactly those (the first conv, the logits layer) are missing from the uint8 ranking.
    assert refused and set(refused) == set(edge), (refused, edge)


@pytest.mark.slow
def test_saved_model_input(keras_digits: KerasDigitsExample, tmp_path: Path) -> None:
    result = convert(
        keras_digits.saved_model,
        profile="raspberrypi-zero2",
        output_dir=tmp_path / "out",
        calibration=keras_digits.calibration_path,
        validation=keras_digits.validation_path,
        benchmark_seconds=0.1,
    )
    report = result.report
    assert report["source"]["format"] == "saved_model"
    assert report["source"]["path"] == str(keras_digits.saved_model)
    assert len(report["source"]["sha256"]) == 64
    assert report["chosen"].startswith(("dynamic_int8", "full_int8"))
    _check_variant(keras_digits, result.artifact, io_dtype="float32", max_drop=0.02)
    # Keras's own export names its output output_0; edgekit keeps the model's names.
    runtime = open_runtime(result.artifact)
    assert [spec.name for spec in runtime.outputs] == ["output_0"]
    with np.load(tmp_path / "out" / "golden.npz") as golden:
        assert "outputs/0/output_0" in golden.files


@pytest.mark.slow
def test_keras_to_onnx_with_tf2onnx(keras_digits: KerasDigitsExample, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    result = convert(
        keras_digits.keras_path,
        profile="raspberrypi",
        output_dir=tmp_path / "out",
        calibration=keras_digits.calibration_path,
        validation=keras_digits.validation_path,
        benchmark_seconds=0.1,
    )
    assert result.artifact.name == "model.onnx"
    assert result.report["source"]["source_format"] == "keras"
    assert result.report["source"]["tf2onnx"]["converter"].startswith("tf2onnx")
    artifact = onnx.load(str(result.artifact))
    assert artifact.ir_version <= 9  # onnxruntime 1.16.3, the profile's oldest
    session = ort.InferenceSession(str(result.artifact), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixels"]
    logits = session.run(None, {"pixels": keras_digits.x_test})[0]
    accuracy = float((logits.argmax(1) == keras_digits.y_test).mean())
    assert accuracy >= keras_digits.test_accuracy - 0.02


def _edgekit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgekit", *args], capture_output=True, text=True, check=False
    )


@pytest.mark.slow
def test_cli_json_full_int8_with_int8_io(keras_digits: KerasDigitsExample, tmp_path: Path) -> None:
    profile = _profile(
        tmp_path,
        "int8-io",
        "extends: raspberrypi-tflite\nquantization: {candidates: [full_int8], io_type: int8}\n",
    )
    out = tmp_path / "out"
    done = _edgekit("convert", str(keras_digits.keras_path), "-p", str(profile), "-o", str(out),
                    "--calibration", str(keras_digits.calibration_path),
                    "--validation", str(keras_digits.validation_path), "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report == json.loads((out / "report.json").read_text())
    assert report["chosen"].startswith("full_int8") and report["artifact"]["path"] == "model.tflite"
    assert report["artifact"]["inputs"][0]["dtype"] == "int8"
    _check_variant(keras_digits, out / "model.tflite", io_dtype="int8", max_drop=0.02)
    with np.load(out / "golden.npz") as golden:
        assert golden["inputs/0/pixels"].dtype == np.int8


def _tiny_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    onnx.save(helper.make_model(graph), str(path))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        # (ONNX for a TFLite profile goes through onnx2tf: tests/converters/test_torch_convert.py)
        ("pt2", "is not a PyTorch archive; edgekit reads .pt2 programs"),
        ("keras", "is not a Keras .keras file"),
        ("folder", "is a folder without saved_model.pb"),
    ],
)
def test_bad_tflite_input_one_line_exit_2_nothing_written(
    tmp_path: Path, case: str, message: str
) -> None:
    model = tmp_path / "model.onnx"
    if case == "pt2":
        model = tmp_path / "model.pt2"
        _tiny_onnx(model)
    elif case == "keras":
        model = tmp_path / "model.keras"
        model.write_text("not a zip archive\n" * 10)
    else:
        model = tmp_path / "exported"
        model.mkdir()
        (model / "variables").mkdir()
    out = tmp_path / "out"
    done = _edgekit("convert", str(model), "-p", "raspberrypi-tflite", "-o", str(out))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_importing_the_converter_and_runtimes_loads_no_engine() -> None:
    """The passes register by name; TensorFlow and LiteRT load only when a pass or backend runs."""
    code = (
        "import sys, edgekit.runtimes, edgekit.converters\n"
        "from edgekit.converters.passes import registered_passes\n"
        "print(sorted({'tf_load', 'tflite_convert', 'litert_quantize', 'tf2onnx'}"
        " - set(registered_passes())))\n"
        "print(sorted(m for m in ('tensorflow', 'ai_edge_litert', 'tflite_runtime', 'keras')"
        " if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["[]", "[]"]


@pytest.mark.slow
def test_litert_quantizer_rows_need_a_device_check_for_tflite_runtime_2_14(
    keras_digits: KerasDigitsExample, tmp_path: Path
) -> None:
    result = convert(
        keras_digits.keras_path,
        profile="raspberrypi-tflite",
        output_dir=tmp_path / "out",
        calibration=keras_digits.calibration_path,
        validation=keras_digits.validation_path,
        benchmark_seconds=0.1,
    )
    rows = {row["name"]: row for row in result.report["candidates"]}
    assert "dynamic_int8_aeq" not in rows
    if litert_quantizer_available():
        assert any("without --verify-runtime" in note for note in rows["dynamic_int8"]["notes"])


@pytest.mark.slow
def test_verify_runtime_goes_down_the_ranking_until_the_device_runtimes_pass(
    keras_digits: KerasDigitsExample, runtime_cache: Path, tmp_path: Path
) -> None:
    """raspberrypi-zero2 ranks by size; the LiteRT quantizer's dynamic int8 is the smallest and
    loads in tflite-runtime 2.14.0, but was measured computing wrong outputs there. With
    --verify-runtime each candidate is run on the real 2.14 and 2.3 runtimes before it can win,
    and the bundle is signed only for one that passes."""
    env = {
        **os.environ,
        "EDGEKIT_RUNTIME_CACHE": str(runtime_cache),
        "EDGEKIT_HOME": str(tmp_path / "home"),
        "EDGEKIT_KEY_PASSPHRASE": "pw",
    }
    assert (
        subprocess.run(
            [sys.executable, "-m", "edgekit", "keys", "generate", "rel"], env=env, check=False
        ).returncode
        == 0
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "edgekit", "convert", str(keras_digits.keras_path),
         "-p", "raspberrypi-zero2", "-o", str(out),
         "--calibration", str(keras_digits.calibration_path),
         "--validation", str(keras_digits.validation_path),
         "--verify-runtime", "--sign", "rel", "--name", "kd", "--json"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    checks = {
        f"{row['package']} {row['version']}": row for row in report["verify_runtime"]["runtimes"]
    }
    assert checks["tflite-runtime 2.14.0"]["status"] == "pass", checks
    assert Path(report["bundle"]).is_file()
    rows = {row["name"]: row for row in report["candidates"]}
    refused = [
        n for n, row in rows.items() if "fails on the profile's runtimes" in (row["error"] or "")
    ]
    assert report["chosen"] not in refused
    if litert_quantizer_available():
        assert "dynamic_int8_aeq" in refused, rows["dynamic_int8_aeq"]
    _check_variant(keras_digits, out / "model.tflite", io_dtype="float32", max_drop=0.02)


def test_cli_convert_to_tflite_prints_no_framework_chatter(
    keras_digits: KerasDigitsExample, tmp_path: Path
) -> None:
    """Issue 14 item 6: TensorFlow, absl, oneDNN, XNNPACK and the TFLite converter print to
    stderr from C++; `edgekit convert` shows only its own output, and onnxruntime writes no
    telemetry queue."""
    home = tmp_path / "home"
    home.mkdir()
    own = ("ORT_DISABLE_TELEMETRY", "TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY")
    env = {k: v for k, v in os.environ.items() if k not in own} | {"HOME": str(home)}
    done = subprocess.run(
        [sys.executable, "-m", "edgekit", "convert", str(keras_digits.keras_path),
         "-p", "raspberrypi-tflite", "-o", str(tmp_path / "out"),
         "--calibration", str(keras_digits.calibration_path),
         "--validation", str(keras_digits.validation_path)],
        capture_output=True, text=True, env=env, check=False, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "chosen" in done.stdout
    chatter = ("absl", "oneDNN", "XNNPACK", "TensorFlow Lite", "fully_quantize", "inference_type")
    output = done.stdout + done.stderr
    assert [word for word in chatter if word in output] == [], done.stderr
    assert done.stderr == ""
    assert not (home / ".cache" / "Microsoft").exists()
