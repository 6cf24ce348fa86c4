"""The stored tflite-runtime 2.14 operator table, measured again on the real wheel.

A model converted by TF 2.21 is patched in place so that one of its operator codes names each
builtin operator at versions 1-20 in turn; the tflite-runtime 2.14.0 wheel (in its own venv)
says "Didn't find op for builtin opcode ..." for every (operator, version) its resolver lacks.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest
from edgekit.converters.tflite_compat import (
    AI_EDGE_LITERT_1_2_MAX_VERSIONS,
    BUILTIN_OPERATOR_NAMES,
    TFLITE_RUNTIME_2_14_MAX_VERSIONS,
    read_operator_codes,
)

from edgekit.profiles import RuntimePin
from edgekit.verify_runtime import RuntimeCache

# Runs inside the runtime's venv: stdlib + the runtime only.
_MEASURE = r"""
import json, struct, sys, importlib
module, path, builtin_at, deprecated_at, version_at, last = sys.argv[1:7]
Interpreter = importlib.import_module(module).Interpreter
data = bytearray(open(path, "rb").read())
found = {}
for code in range(int(last) + 1):
    versions = []
    for version in range(1, 21):
        struct.pack_into("<i", data, int(builtin_at), code)
        struct.pack_into("<b", data, int(deprecated_at), min(code, 127))
        struct.pack_into("<i", data, int(version_at), version)
        try:
            Interpreter(model_content=bytes(data))
            known = True
        except Exception as error:
            text = str(error)
            known = "Didn't find op" not in text and "out of range" not in text
        if known:
            versions.append(version)
    found[code] = versions
print(json.dumps(found))
"""


@pytest.fixture(scope="session")
def runtime_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    persistent = os.environ.get("EDGEKIT_RUNTIME_CACHE")
    if persistent:
        return Path(persistent)
    return tmp_path_factory.getbasetemp() / "edgekit-runtimes"


def _probe_model(tmp_path: Path) -> tuple[Path, tuple[int, int, int]]:
    """A TF 2.21 model whose FULLY_CONNECTED code stores all three fields (version 12)."""
    import tensorflow as tf

    inputs = tf.keras.Input((64,))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(32)(inputs))
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    path = tmp_path / "probe.tflite"
    path.write_bytes(converter.convert())
    (fc,) = [c for c in read_operator_codes(path.read_bytes()) if c.name == "FULLY_CONNECTED"]
    assert fc.version == 12
    assert None not in (fc.builtin_code_offset, fc.deprecated_code_offset, fc.version_offset)
    offsets = (fc.builtin_code_offset, fc.deprecated_code_offset, fc.version_offset)
    return path, tuple(int(o) for o in offsets if o is not None)  # type: ignore[return-value]


def _measure(cache: Path, pin: RuntimePin, module: str, tmp_path: Path) -> dict[str, int]:
    environment = RuntimeCache(cache).ensure(pin)
    model, offsets = _probe_model(tmp_path)
    script = tmp_path / "measure.py"
    script.write_text(_MEASURE)
    done = subprocess.run(
        [str(environment.python), "-I", str(script), module, str(model), *map(str, offsets),
         str(len(BUILTIN_OPERATOR_NAMES) - 1)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        BUILTIN_OPERATOR_NAMES[int(code)]: max(versions)
        for code, versions in found.items()
        if versions and BUILTIN_OPERATOR_NAMES[int(code)] != "CUSTOM"
    }


@pytest.mark.slow
def test_table_matches_the_tflite_runtime_2_14_wheel(runtime_cache: Path, tmp_path: Path) -> None:
    measured = _measure(
        runtime_cache,
        RuntimePin("tflite-runtime", "2.14.0"),
        "tflite_runtime.interpreter",
        tmp_path,
    )
    assert measured == dict(TFLITE_RUNTIME_2_14_MAX_VERSIONS)
    assert measured["FULLY_CONNECTED"] == 10


@pytest.mark.slow
def test_table_matches_the_ai_edge_litert_1_2_wheel(runtime_cache: Path, tmp_path: Path) -> None:
    measured = _measure(
        runtime_cache, RuntimePin("ai-edge-litert", "1.2.0"), "ai_edge_litert.interpreter", tmp_path
    )
    assert measured == dict(AI_EDGE_LITERT_1_2_MAX_VERSIONS)


def test_patched_fields_round_trip(tmp_path: Path) -> None:
    model, (builtin_at, deprecated_at, version_at) = _probe_model(tmp_path)
    data = bytearray(model.read_bytes())
    struct.pack_into("<i", data, builtin_at, 150)
    struct.pack_into("<b", data, deprecated_at, 127)
    struct.pack_into("<i", data, version_at, 3)
    names = [(c.name, c.version) for c in read_operator_codes(bytes(data))]
    assert (BUILTIN_OPERATOR_NAMES[150], 3) in names
