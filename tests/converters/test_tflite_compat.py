"""TFLite operator versions: what TF 2.21 emits, what tflite-runtime 2.14 refuses (statically
and for real, in its own venv), and the converter setting that makes such a model loadable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgekit.converters.tflite_compat import (
    AI_EDGE_LITERT_1_2_MAX_VERSIONS,
    BUILTIN_OPERATOR_NAMES,
    TFLITE_RUNTIME_2_14_MAX_VERSIONS,
    TFLiteModelError,
    UnmeasuredRuntimeError,
    blocking_ops,
    downgrade_options,
    max_op_versions,
    read_operator_codes,
    tflite_op_versions,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgekit.profiles import RuntimePin, RuntimeRange, load_profile

Converter = Callable[[dict[str, object]], bytes]


@pytest.fixture(scope="session")
def dense_model() -> Any:
    """A small Keras classifier whose dense layers are big enough for weight quantization."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((64,), name="features")
    hidden = tf.keras.layers.Dense(64, activation="relu")(inputs)
    outputs = tf.keras.layers.Dense(10, activation="softmax")(hidden)
    return tf.keras.Model(inputs, outputs)


@pytest.fixture(scope="session")
def convert_dense(dense_model: Any) -> Converter:
    """TF 2.21's TFLiteConverter with dynamic-range int8 and the given extra attributes."""
    import tensorflow as tf

    def convert(options: dict[str, object]) -> bytes:
        converter = tf.lite.TFLiteConverter.from_keras_model(dense_model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        for name, value in options.items():
            setattr(converter, name, value)
        data: bytes = converter.convert()
        return data

    return convert


@pytest.fixture(scope="session")
def dynamic_int8(convert_dense: Converter, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tflite") / "model.tflite"
    path.write_bytes(convert_dense({}))
    return path


def _schema_ops(data: bytes) -> list[tuple[str, int]]:
    """Operator codes as TensorFlow's own generated schema reads them (the independent oracle)."""
    from tensorflow.lite.python import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    return [
        (names[max(code.builtinCode, code.deprecatedBuiltinCode)], code.version)
        for code in model.operatorCodes
    ]


def test_reader_agrees_with_tensorflows_schema(
    dynamic_int8: Path, convert_dense: Converter, tmp_path: Path
) -> None:
    found = tflite_op_versions(dynamic_int8)
    assert found == _schema_ops(dynamic_int8.read_bytes())
    assert ("FULLY_CONNECTED", 12) in found  # TF 2.21: per-channel dynamic-range dense
    plain = tmp_path / "plain.tflite"
    plain.write_bytes(convert_dense({"optimizations": []}))
    assert tflite_op_versions(plain) == _schema_ops(plain.read_bytes())
    assert dict(tflite_op_versions(plain))["FULLY_CONNECTED"] == 1
    from tensorflow.lite.python import schema_py_generated as schema

    codes = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    assert tuple(codes[i] for i in range(len(codes))) == BUILTIN_OPERATOR_NAMES


def test_blocking_ops_names_the_op_the_oldest_runtime_lacks(dynamic_int8: Path) -> None:
    assert blocking_ops(dynamic_int8, load_profile("raspberrypi-tflite")) == [
        "FULLY_CONNECTED version 12 (tflite-runtime 2.14.0 loads up to version 10)"
    ]
    assert blocking_ops(dynamic_int8, load_profile("raspberrypi-zero2")) != []
    # ai-edge-litert 1.2.0 (android-arm64's oldest) loads FULLY_CONNECTED up to version 13.
    assert blocking_ops(dynamic_int8, load_profile("android-arm64")) == []


def test_downgrade_options_only_where_the_oldest_runtime_needs_them() -> None:
    assert downgrade_options(load_profile("raspberrypi-tflite")) == {
        "_experimental_disable_per_channel_quantization_for_dense_layers": True
    }
    assert downgrade_options(load_profile("android-arm64")) == {}
    assert max_op_versions(load_profile("android-arm64").runtime.newest) is None


@pytest.mark.parametrize(
    ("package", "version", "expected"),
    [
        ("ai-edge-litert", "2.3.0", None),
        ("ai-edge-litert", "2.4.1", None),
        # Only 2.3.0 was measured loading everything: 2.0-2.2 get the 1.2.0 table.
        ("ai-edge-litert", "2.2.0", AI_EDGE_LITERT_1_2_MAX_VERSIONS),
        ("ai-edge-litert", "2.0.0", AI_EDGE_LITERT_1_2_MAX_VERSIONS),
        ("ai-edge-litert", "1.2.0", AI_EDGE_LITERT_1_2_MAX_VERSIONS),
        ("tflite-runtime", "2.14.0", TFLITE_RUNTIME_2_14_MAX_VERSIONS),
        ("tensorflow", "2.16.1", TFLITE_RUNTIME_2_14_MAX_VERSIONS),
        ("tensorflow", "2.21.0", None),
    ],
)
def test_op_version_table_is_the_newest_measured_not_newer_than_the_runtime(
    package: str, version: str, expected: object
) -> None:
    assert max_op_versions(RuntimePin(package, version)) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("package", "version", "oldest"),
    [
        ("tflite-runtime", "2.13.0", "2.14.0"),
        ("tensorflow", "2.12.1", "2.14.0"),
        ("ai-edge-litert", "1.1.0", "1.2.0"),
    ],
)
def test_runtime_older_than_any_measured_table_fails_closed(
    dynamic_int8: Path, package: str, version: str, oldest: str
) -> None:
    pin = RuntimePin(package, version)  # type: ignore[arg-type]
    message = (
        f"no measured op-version table for {package} {version}; the oldest measured is {oldest}"
    )
    with pytest.raises(UnmeasuredRuntimeError, match=message):
        max_op_versions(pin)
    profile = load_profile("raspberrypi-tflite")
    import dataclasses

    old = dataclasses.replace(
        profile, runtime=RuntimeRange(oldest=pin, newest=profile.runtime.newest)
    )
    assert blocking_ops(dynamic_int8, old) == [message]
    assert downgrade_options(old) == {}


def _verify(model: Path, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgekit", "verify-runtime", str(model), "-p",
         "raspberrypi-tflite", "--json", *args],
        capture_output=True, text=True, check=False,
        env={**os.environ, "EDGEKIT_RUNTIME_CACHE": str(cache)},
    )  # fmt: skip


def test_tflite_runtime_2_14_really_refuses_what_tf_2_21_emits(
    dynamic_int8: Path, runtime_cache: Path
) -> None:
    done = _verify(dynamic_int8, runtime_cache)
    assert done.returncode == 2
    report = json.loads(done.stdout)
    rows = {row["package"]: row for row in report["runtimes"]}
    old = rows["tflite-runtime"]
    assert old["version"] == "2.14.0" and old["installed"] is True and old["loads"] is False
    # The runtime's own refusal, from the real tflite-runtime 2.14.0 wheel.
    assert old["load_error"].startswith(
        "Didn't find op for builtin opcode 'FULLY_CONNECTED' version '12'"
    )
    assert rows["ai-edge-litert"]["status"] == "pass"
    assert report["static_blockers"] == [
        "FULLY_CONNECTED version 12 (tflite-runtime 2.14.0 loads up to version 10)"
    ]
    # Checked on the profile's own CPUs (emulated aarch64): the same refusal on each.
    for cpu in ("cortex-a72", "cortex-a76"):
        assert f"tflite-runtime 2.14.0 on {cpu}: refuses the model" in done.stderr


def test_downgraded_model_loads_and_matches_on_tflite_runtime_2_14(
    convert_dense: Converter, runtime_cache: Path, tmp_path: Path
) -> None:
    from edgekit.runtimes import LiteRtBackend

    model = tmp_path / "model.tflite"
    model.write_bytes(convert_dense(downgrade_options(load_profile("raspberrypi-tflite"))))
    assert dict(tflite_op_versions(model))["FULLY_CONNECTED"] <= 10
    assert blocking_ops(model, load_profile("raspberrypi-tflite")) == []
    # Golden samples from the host's LiteRT (ai-edge-litert 2.3), replayed on 2.14 for real.
    runtime = LiteRtBackend(model)
    (spec,) = runtime.inputs
    rng = np.random.default_rng(0)
    arrays: dict[str, Any] = {
        "tolerance": np.array(json.dumps({"rtol": 0.05, "atol": 0.01, "min_cosine": 0.99}))
    }
    for index in range(4):
        feed = {spec.name: rng.random((1, 64), dtype=np.float32)}
        arrays[f"inputs/{index}/{spec.name}"] = feed[spec.name]
        for name, value in runtime.run(feed).items():
            arrays[f"outputs/{index}/{name}"] = value
    np.savez(tmp_path / "golden.npz", **arrays)
    done = _verify(model, runtime_cache)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["package"]: row for row in json.loads(done.stdout)["runtimes"]}
    assert rows["tflite-runtime"]["loads"] is True
    assert rows["tflite-runtime"]["within_tolerance"] is True
    assert rows["tflite-runtime"]["reported_version"] == "2.14.0"
    assert rows["tflite-runtime"]["numpy_version"].startswith("1.")
    assert rows["ai-edge-litert"]["within_tolerance"] is True


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_reader_never_fails_with_anything_but_a_clear_error(data: st.DataObject) -> None:
    valid = _small_model_bytes()
    mode = data.draw(st.sampled_from(["truncate", "flip", "random"]))
    if mode == "truncate":
        blob = valid[: data.draw(st.integers(0, len(valid)))]
    elif mode == "flip":
        blob = bytearray(valid)
        for _ in range(data.draw(st.integers(1, 8))):
            position = data.draw(st.integers(0, len(blob) - 1))
            blob[position] = data.draw(st.integers(0, 255))
        blob = bytes(blob)
    else:
        blob = b"\x10\x00\x00\x00TFL3" + data.draw(st.binary(max_size=200))
    try:
        codes = read_operator_codes(bytes(blob))
    except TFLiteModelError as e:
        assert "not a valid TFLite model" in str(e)
    else:
        assert all(isinstance(code.version, int) for code in codes)


_SMALL: list[bytes] = []


def _small_model_bytes() -> bytes:
    if not _SMALL:
        import tensorflow as tf

        inputs = tf.keras.Input((4,))
        model = tf.keras.Model(inputs, tf.keras.layers.Dense(2)(inputs))
        _SMALL.append(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return _SMALL[0]


@pytest.mark.slow
def test_uninstallable_oldest_runtime_falls_back_to_the_static_check(
    dynamic_int8: Path, runtime_cache: Path, tmp_path: Path
) -> None:
    profile = tmp_path / "future.yaml"
    profile.write_text(
        "extends: raspberrypi-tflite\nname: pi-no-wheel\ndescription: no such tflite-runtime\n"
        "runtime:\n  oldest: {package: tflite-runtime, version: '2.14.99'}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "edgekit", "verify-runtime", str(dynamic_int8), "-p",
         str(profile), "--json"],
        capture_output=True, text=True, check=False,
        env={**os.environ, "EDGEKIT_RUNTIME_CACHE": str(runtime_cache)},
    )  # fmt: skip
    assert done.returncode == 2
    rows = {row["package"]: row for row in json.loads(done.stdout)["runtimes"]}
    assert rows["tflite-runtime"]["status"] == "not installed"
    assert rows["ai-edge-litert"]["status"] == "pass"
    assert "(not installable here, checked statically) cannot load FULLY_CONNECTED version 12" in (
        done.stderr
    )
