"""Load a model in one runtime and replay samples: run inside an isolated runtime venv.

STANDALONE: this file is executed by the venv's own interpreter (`python -I _runtime_probe.py
REQUEST.json`), where edgekit is not installed. It may import only the standard library, numpy
(1.x or 2.x) and the runtime under test, and must run on Python 3.9+.

The request (JSON) names the engine, the model, an optional golden `.npz` (`inputs/<i>/<name>`,
`outputs/<i>/<name>`) and how many of its samples to replay (`max_samples`, for slow emulated
runs), thread count, latency repetitions and where to write results. The
result JSON is rewritten atomically after each stage (`started`, `loaded`, `ran`), so the
caller knows how far a probe got even when the runtime crashes the process. Outputs are
written to an `.npz` as `outputs/<i>/<name>` with the golden output names, for the caller
to compare, with `quantization/outputs/<name>` = [scale, zero_point] for each quantized
integer output.
"""

# zip(strict=...) needs Python 3.10; the probe also runs on older device interpreters.
# ruff: noqa: B905

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time
import traceback
from typing import Any

try:
    import numpy as np
except Exception as _error:  # noqa: BLE001  (reported by main as a runtime that does not import)
    _NUMPY_ERROR: str | None = f"numpy: {_error}"
else:
    _NUMPY_ERROR = None

# Input and output naming mirrors edgekit.runtimes (LiteRtBackend): a TFLite model with exactly
# one serving signature is addressed by the signature's names, otherwise by tensor names.

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


# The module each engine's code below imports (imported first on its own: see main).
_RUNTIME_MODULES = {
    "onnxruntime": "onnxruntime",
    "ai-edge-litert": "ai_edge_litert.interpreter",
    "tflite-runtime": "tflite_runtime.interpreter",
    "tensorflow": "tensorflow",
}


def _write_json(path: str, document: dict[str, Any]) -> None:
    temp = path + ".tmp"
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(document, handle)
    os.replace(temp, path)


def _message(error: BaseException) -> str:
    text = str(error).strip()
    return text or type(error).__name__


class _Onnx:
    def __init__(self, model: str, threads: int) -> None:
        import onnxruntime as ort

        self.version = str(ort.__version__)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        disable = getattr(ort, "disable_telemetry_events", None)  # no telemetry (edgekit.quiet)
        if callable(disable):
            disable()
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.inputs = [
            (arg.name, _ORT_TYPES.get(arg.type, "float32"), list(arg.shape or ()))
            for arg in self.session.get_inputs()
        ]
        self.outputs = [arg.name for arg in self.session.get_outputs()]
        self.quantization: dict[str, list[float]] = {}

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        values = self.session.run(None, feeds)
        return {name: np.asarray(value) for name, value in zip(self.outputs, values)}


class _Lite:
    def __init__(self, engine: str, model: str, threads: int) -> None:
        if engine == "ai-edge-litert":
            from ai_edge_litert.interpreter import Interpreter
        elif engine == "tflite-runtime":
            from tflite_runtime.interpreter import Interpreter
        else:
            import tensorflow as tf

            Interpreter = tf.lite.Interpreter  # noqa: N806
        self.version = _distribution_version(engine)
        interpreter = Interpreter(model_path=model, num_threads=threads)
        interpreter.allocate_tensors()
        self.interpreter = interpreter
        input_details = interpreter.get_input_details()
        output_details = interpreter.get_output_details()
        input_names = {d["index"]: str(d["name"]) for d in input_details}
        output_names = {d["index"]: str(d["name"]) for d in output_details}
        signatures = interpreter.get_signature_list()
        if len(signatures) == 1:
            runner = interpreter.get_signature_runner(next(iter(signatures)))
            input_names = {d["index"]: name for name, d in runner.get_input_details().items()}
            output_names = {d["index"]: name for name, d in runner.get_output_details().items()}
        self.input_index = {input_names[d["index"]]: int(d["index"]) for d in input_details}
        self.shapes = {int(d["index"]): [int(x) for x in d["shape"]] for d in input_details}
        self.inputs = [
            (
                input_names[d["index"]],
                np.dtype(d["dtype"]).name,
                [int(x) if int(x) >= 0 else None for x in d.get("shape_signature", d["shape"])],
            )
            for d in input_details
        ]
        self.output_index = [(output_names[d["index"]], int(d["index"])) for d in output_details]
        self.outputs = [name for name, _ in self.output_index]
        # [scale, zero_point] of each quantized integer output: real = scale * (q - zero_point).
        self.quantization: dict[str, list[float]] = {}
        for d in output_details:
            scale, zero_point = d.get("quantization", (0.0, 0))
            if scale and np.dtype(d["dtype"]).kind in "iu":
                self.quantization[output_names[d["index"]]] = [float(scale), int(zero_point)]

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        interpreter = self.interpreter
        resized = False
        for name, index in self.input_index.items():
            shape = [int(x) for x in np.shape(feeds[name])]
            if shape != self.shapes[index]:
                interpreter.resize_tensor_input(index, shape, strict=False)
                self.shapes[index] = shape
                resized = True
        if resized:
            interpreter.allocate_tensors()
        for name, index in self.input_index.items():
            interpreter.set_tensor(index, np.ascontiguousarray(feeds[name]))
        interpreter.invoke()
        return {name: np.array(interpreter.get_tensor(index)) for name, index in self.output_index}


def _distribution_version(engine: str) -> str:
    from importlib import metadata

    if engine in ("ai-edge-litert", "tflite-runtime"):
        names = [engine]
    else:  # edgekit installs tensorflow-cpu (the same tensorflow module)
        names = ["tensorflow", "tensorflow-cpu"]
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def _golden_samples(path: str) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Input feeds and the output names of each sample, in file order."""
    feeds: dict[int, dict[str, Any]] = {}
    outputs: dict[int, list[str]] = {}
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            parts = key.split("/", 2)
            if len(parts) != 3 or not parts[1].isdecimal():
                continue
            index = int(parts[1])
            if parts[0] == "inputs":
                feeds.setdefault(index, {})[parts[2]] = archive[key]
            elif parts[0] == "outputs":
                outputs.setdefault(index, []).append(parts[2])
    order = sorted(feeds)
    return [feeds[i] for i in order], [outputs.get(i, []) for i in order]


def _synthetic_feed(inputs: list[tuple[str, str, list[Any]]]) -> dict[str, Any]:
    generator = np.random.default_rng(0)
    feed = {}
    for name, dtype, shape in inputs:
        dims = [dim if isinstance(dim, int) and dim > 0 else 1 for dim in shape]
        kind = np.dtype(dtype).kind if dtype != "bool" else "b"
        if kind == "f":
            value = generator.random(dims).astype(dtype)
        elif kind in "iu":
            value = generator.integers(0, 10, size=dims).astype(dtype)
        else:
            value = np.zeros(dims, dtype=bool)
        feed[name] = value
    return feed


def _bind(
    feed: dict[str, Any], inputs: list[tuple[str, str, list[Any]]]
) -> tuple[dict[str, Any], str | None]:
    """The feed keyed by the model's input names, cast to their dtypes (None: no mismatch)."""
    names = [name for name, _, _ in inputs]
    dtypes = {name: dtype for name, dtype, _ in inputs}
    if set(feed) == set(names):
        bound = dict(feed)
        note = None
    elif len(feed) == len(names):
        # Golden files written by another naming (tensor vs signature names): same order.
        bound = dict(zip(names, feed.values()))
        note = f"golden inputs {sorted(feed)} matched to model inputs {names} by position"
    else:
        raise ValueError(f"golden samples hold inputs {sorted(feed)}; the model takes {names}")
    return {
        name: np.asarray(value).astype(dtypes[name], copy=False) for name, value in bound.items()
    }, note


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as handle:
        request = json.load(handle)
    result_path = request["result"]
    result: dict[str, Any] = {"stage": "started", "notes": []}
    _write_json(result_path, result)
    engine = request["engine"]
    threads = int(request.get("threads", 1))
    try:
        if _NUMPY_ERROR is not None:
            raise ImportError(_NUMPY_ERROR)
        importlib.import_module(_RUNTIME_MODULES.get(engine, engine))
    except Exception as error:  # noqa: BLE001  (a broken runtime, not the model's fault)
        result.update(stage="import_failed", import_error=_message(error))
        _write_json(result_path, result)
        return 0
    try:
        runtime: Any = (
            _Onnx(request["model"], threads)
            if engine == "onnxruntime"
            else _Lite(engine, request["model"], threads)
        )
    except Exception as error:  # noqa: BLE001  (the runtime's own refusal is the result)
        result.update(stage="load_failed", load_error=_message(error))
        _write_json(result_path, result)
        return 0
    result.update(
        stage="loaded",
        runtime_version=runtime.version,
        numpy_version=np.__version__,
        machine=platform.machine(),
        inputs=[{"name": n, "dtype": d, "shape": s} for n, d, s in runtime.inputs],
        outputs=list(runtime.outputs),
    )
    _write_json(result_path, result)

    golden = request.get("golden")
    try:
        if golden:
            feeds, output_names = _golden_samples(golden)
            if not feeds:
                raise ValueError(f"{golden} holds no inputs/<i>/<name> samples")
            result["samples_available"] = len(feeds)
            if request.get("max_samples"):  # emulated runs keep the golden set small
                feeds = feeds[: int(request["max_samples"])]
                output_names = output_names[: len(feeds)]
        else:
            feeds, output_names = [_synthetic_feed(runtime.inputs)], [[]]
        arrays: dict[str, Any] = {}
        for index, (feed, names) in enumerate(zip(feeds, output_names)):
            bound, note = _bind(feed, runtime.inputs)
            if note and note not in result["notes"]:
                result["notes"].append(note)
            values = runtime.run(bound)
            produced = list(values.values())
            if names and set(names) != set(values):
                if len(names) != len(produced):
                    raise ValueError(
                        f"golden samples expect outputs {names}; the model gives {list(values)}"
                    )
                renamed = dict(zip(names, produced))
                note = f"golden outputs {names} matched to model outputs {list(values)} by position"
                if note not in result["notes"]:
                    result["notes"].append(note)
            else:
                renamed = values
            for (name, value), own in zip(renamed.items(), values):
                arrays[f"outputs/{index}/{name}"] = value
                if own in runtime.quantization:
                    arrays[f"quantization/outputs/{name}"] = np.array(
                        runtime.quantization[own], dtype=np.float64
                    )
        with open(request["outputs"], "wb") as handle:
            np.savez(handle, **arrays)
        first, _ = _bind(feeds[0], runtime.inputs)
        timings: list[float] = []
        deadline = time.perf_counter() + float(request.get("latency_seconds", 1.0))
        for _ in range(int(request.get("warmup", 2))):
            runtime.run(first)
        while len(timings) < int(request.get("max_runs", 50)) and (
            len(timings) < 5 or time.perf_counter() < deadline
        ):
            start = time.perf_counter()
            runtime.run(first)
            timings.append((time.perf_counter() - start) * 1000.0)
    except Exception as error:  # noqa: BLE001  (reported, not raised: the caller decides)
        result.update(stage="run_failed", run_error=_message(error))
        result["traceback"] = traceback.format_exc(limit=3)
        _write_json(result_path, result)
        return 0
    ordered = sorted(timings)
    result.update(
        stage="ran",
        samples=len(feeds),
        synthetic=not golden,
        latency_ms={
            "p50": ordered[len(ordered) // 2],
            "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
            "runs": len(ordered),
        },
    )
    _write_json(result_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
