"""Conversion benchmark: original vs the toolchain's own defaults (the peer) vs edgekit's choice.

ONNX rows: for the digits CNN (trained here), the shared magika and silero models, onnxruntime's
quantize_dynamic/quantize_static are the peers. TFLite rows: for a Keras digits CNN (trained
here) and an untrained MobileNetV2 (alpha 0.35, 96x96; architecture only, nothing downloaded),
the original is the Keras model's plain TFLite fp32 conversion and the peer is TFLiteConverter's
own default optimization (`optimizations=[tf.lite.Optimize.DEFAULT]`, no representative data:
dynamic range). Latency (batch 1, this host, all variants timed round-robin in one process),
file size, zstd size and accuracy (cosine / top-1 against the original on validation inputs).
Writes JSON; ratios are to fp32.

PyTorch rows (`torch_rows`): the PyTorch digits CNN (trained here) for `raspberrypi`, beside
the plain path a user takes without edgekit (`torch.onnx.export` + onnxruntime's
`quantize_dynamic`), and for `raspberrypi-tflite` along both of edgekit's paths (ONNX + onnx2tf
+ the TFLite candidates; litert-torch + ai-edge-quantizer), beside litert-torch's defaults.
Accuracy is against PyTorch's own outputs.

    .venv/bin/python benchmarks/convert.py --out benchmarks/results/convert.json
    .venv/bin/python benchmarks/convert.py --only tflite --out /tmp/convert-tflite.json
    .venv/bin/python benchmarks/convert.py --only torch --out /tmp/convert-torch.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from edgekit.converters import convert
from edgekit.converters.benchmark import compressed_size, file_size, measure
from edgekit.converters.data import load_dataset
from edgekit.converters.examples import (
    export_digits_cnn,
    machine_files,
    magika_inputs,
    silero_stream,
)
from edgekit.converters.passes.onnx_passes import _FeedReader, scratch_cwd
from edgekit.converters.tflite_examples import export_keras_digits
from edgekit.converters.validate import compare_outputs

from edgekit.errors import first_line
from edgekit.profiles import load_profile
from edgekit.runtimes import LiteRtBackend, OnnxRuntimeBackend, dequantize_output, quantize_input

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"


def _models(workdir: Path) -> dict[str, tuple[Path, Path, Path]]:
    digits = export_digits_cnn(workdir / "digits")
    models = {"digits_cnn": (digits.model_path, digits.calibration_path, digits.validation_path)}
    x = magika_inputs(machine_files())
    order = np.random.default_rng(0).permutation(len(x))
    np.savez(workdir / "magika_cal.npz", bytes=x[order[:96]])
    np.savez(workdir / "magika_val.npz", bytes=x[order[96:256]])
    magika = SHARED / "magika-standard-v3.3" / "model.onnx"
    models["magika"] = (magika, workdir / "magika_cal.npz", workdir / "magika_val.npz")
    silero = SHARED / "silero-vad-16k-op15" / "model.onnx"
    stream = silero_stream(silero, chunks=96)
    np.savez(workdir / "silero_cal.npz", **{k: v[0::2] if v.ndim else v for k, v in stream.items()})
    np.savez(workdir / "silero_val.npz", **{k: v[1::2] if v.ndim else v for k, v in stream.items()})
    models["silero_vad"] = (silero, workdir / "silero_cal.npz", workdir / "silero_val.npz")
    return models


def _peers(model: Path, calibration: Path, workdir: Path) -> dict[str, Path | str]:
    """onnxruntime's quantize_dynamic and quantize_static with their default settings."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static

    peers: dict[str, Path | str] = {}
    inputs = OnnxRuntimeBackend(model).inputs
    data = load_dataset(calibration, inputs)
    reader = type("_Reader", (_FeedReader, CalibrationDataReader), {})
    with scratch_cwd(workdir):
        for name in ("ort_quantize_dynamic", "ort_quantize_static"):
            out = workdir / f"{model.parent.name}-{name}.onnx"
            try:
                if name == "ort_quantize_dynamic":
                    quantize_dynamic(str(model), str(out))
                else:
                    quantize_static(str(model), str(out), reader(list(data.feeds)))
                OnnxRuntimeBackend(out)
                peers[name] = out
            except Exception as e:  # noqa: BLE001  (a peer that fails is a result, not a crash)
                peers[name] = f"failed: {first_line(e)[:200]}"
    return peers


def _accuracy(reference: Path, candidate: Path, validation: Path) -> dict[str, Any]:
    runtime = OnnxRuntimeBackend(reference)
    data = load_dataset(validation, runtime.inputs)
    other = OnnxRuntimeBackend(candidate)
    ref: dict[str, list[Any]] = {o.name: [] for o in runtime.outputs}
    found: dict[str, list[Any]] = {o.name: [] for o in runtime.outputs}
    for feed in data.feeds:
        for name, value in runtime.run(feed).items():
            ref[name].append(value)
        for name, value in other.run(feed).items():
            found[name].append(value)
    result = compare_outputs(ref, found, load_profile("raspberrypi").accuracy)
    outputs: dict[str, Any] = {
        m.name: {"cosine": m.cosine, "top1_agreement": m.top1_agreement} for m in result.outputs
    }
    return {"outputs": outputs, "meets_tolerance": result.meets_tolerance}


def _keras_models(workdir: Path) -> dict[str, tuple[Path, Path, Path]]:
    import tensorflow as tf

    digits = export_keras_digits(workdir / "keras_digits")
    models = {
        "digits_keras_cnn": (digits.keras_path, digits.calibration_path, digits.validation_path)
    }
    tf.keras.utils.set_random_seed(0)
    mobilenet = tf.keras.applications.MobileNetV2(
        input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=10
    )
    mobilenet.save(workdir / "mobilenetv2.keras")
    rng = np.random.default_rng(0)

    # Smooth random images (upsampled noise) in [-1, 1], MobileNet's input range.
    def images(count: int) -> np.ndarray:
        coarse = rng.uniform(-1, 1, size=(count, 12, 12, 3)).astype(np.float32)
        return np.ascontiguousarray(coarse.repeat(8, axis=1).repeat(8, axis=2))

    np.savez(workdir / "mobilenet_cal.npz", input_layer=images(64))
    np.savez(workdir / "mobilenet_val.npz", input_layer=images(64))
    models["mobilenetv2_035_96_untrained"] = (
        workdir / "mobilenetv2.keras",
        workdir / "mobilenet_cal.npz",
        workdir / "mobilenet_val.npz",
    )
    return models


def _tflite_peers(model: Path, workdir: Path) -> dict[str, Path | str]:
    """The Keras model's plain fp32 TFLite (the original) and TFLiteConverter's defaults."""
    import tensorflow as tf

    keras_model = tf.keras.models.load_model(model, compile=False)
    variants: dict[str, Path | str] = {}
    for name in ("original_tflite_fp32", "tflite_converter_default"):
        out = workdir / f"{model.stem}-{name}.tflite"
        try:
            converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
            if name == "tflite_converter_default":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            out.write_bytes(converter.convert())
            variants[name] = out
        except Exception as e:  # noqa: BLE001  (a peer that fails is a result, not a crash)
            variants[name] = f"failed: {first_line(e)[:200]}"
    return variants


def _tflite_accuracy(reference: Path, candidate: Path, validation: Path) -> dict[str, Any]:
    runtime = LiteRtBackend(reference)
    other = LiteRtBackend(candidate)
    data = load_dataset(validation, runtime.inputs)
    ref: dict[str, list[Any]] = {o.name: [] for o in runtime.outputs}
    found: dict[str, list[Any]] = {o.name: [] for o in runtime.outputs}
    # The plain Keras conversion names its output output_0; edgekit keeps the layer's name.
    pairs = list(zip(runtime.outputs, other.outputs, strict=True))
    for feed in data.feeds:
        for name, value in runtime.run(feed).items():
            ref[name].append(value)
        given = {
            spec.name: quantize_input(spec, feed[runtime.inputs[0].name]) for spec in other.inputs
        }
        values = other.run(given)
        for mine, theirs in pairs:
            found[mine.name].append(dequantize_output(theirs, values[theirs.name]))
    result = compare_outputs(ref, found, load_profile("raspberrypi-tflite").accuracy)
    outputs: dict[str, Any] = {
        m.name: {"cosine": m.cosine, "top1_agreement": m.top1_agreement} for m in result.outputs
    }
    return {"outputs": outputs, "meets_tolerance": result.meets_tolerance}


def _tflite_rows(workdir: Path, seconds: float) -> dict[str, Any]:
    profile = "raspberrypi-tflite"
    threads = min(load_profile(profile).threads, os.cpu_count() or 1)
    results: dict[str, Any] = {"profile": profile, "threads": threads, "models": {}}
    for name, (model, calibration, validation) in _keras_models(workdir).items():
        print(f"== {name} (tflite)", file=sys.stderr)
        converted = convert(
            model,
            profile=profile,
            output_dir=workdir / f"{name}-tflite-out",
            calibration=calibration,
            validation=validation,
        )
        variants = _tflite_peers(model, workdir)
        variants["edgekit"] = converted.artifact
        runnable = {k: v for k, v in variants.items() if isinstance(v, Path)}
        original = runnable["original_tflite_fp32"]
        feed = load_dataset(validation, LiteRtBackend(original).inputs).single_sample_feed()
        # The worker feeds each model by its own input names; the variants share one input.
        timings = measure(
            runnable,
            feed,
            threads=threads,
            workdir=workdir,
            seconds_per_model=seconds,
        )
        accuracy = {
            variant: _tflite_accuracy(original, path, validation)
            for variant, path in runnable.items()
        }
        rows = _variant_rows(
            variants,
            timings,
            accuracy,
            "original_tflite_fp32",
            accuracy_key="accuracy_vs_original",
        )
        edgekit = rows["edgekit"]
        edgekit["chosen_candidate"] = converted.chosen
        peer = rows.get("tflite_converter_default", {})
        if "p50_ms" in peer:
            edgekit["latency_ratio_vs_peer"] = edgekit["p50_ms"] / peer["p50_ms"]
            edgekit["size_ratio_vs_peer"] = edgekit["size_bytes"] / peer["size_bytes"]
        results["models"][name] = rows
    return results


def _variant_rows(
    variants: dict[str, Path | str],
    timings: dict[str, Any],
    accuracy: dict[str, dict[str, Any]],
    base: str,
    *,
    accuracy_key: str = "accuracy_vs_pytorch",
) -> dict[str, Any]:
    """One row per variant: latency, memory, sizes, ratios to `base`, and its accuracy."""
    rows: dict[str, Any] = {}
    base_time = timings[base].p50_ms
    base_size = file_size(variants[base]) if isinstance(variants[base], Path) else None
    for variant, path in variants.items():
        if not isinstance(path, Path):
            rows[variant] = {"error": path}
            continue
        t = timings[variant]
        rows[variant] = {
            "p50_ms": t.p50_ms,
            "p95_ms": t.p95_ms,
            "noise": t.noise,
            "peak_memory_bytes": t.peak_memory_bytes,
            "size_bytes": file_size(path),
            "zstd_bytes": compressed_size(path),
            "latency_ratio_vs_fp32": t.p50_ms / base_time,
            "size_ratio_vs_fp32": file_size(path) / base_size if base_size else None,
            accuracy_key: accuracy[variant],
        }
    return rows


def _torch_accuracy(
    path: Path, reference: Any, x: Any, labels: Any, *, layout: Any = None
) -> dict[str, Any]:
    """Cosine and top-1 agreement with PyTorch's logits, and top-1 on the held-out digits."""
    from edgekit.converters.validate import compare_outputs

    runtime = LiteRtBackend(path) if path.suffix == ".tflite" else OnnxRuntimeBackend(path)
    (given,), (taken,) = runtime.inputs, runtime.outputs
    found = []
    for i in range(len(x)):
        row = x[i : i + 1] if layout is None else layout.to_artifact(x[i : i + 1])
        value = runtime.run({given.name: quantize_input(given, row)})[taken.name]
        found.append(dequantize_output(taken, value).astype(np.float64))
    result = compare_outputs(
        {"logits": list(reference[:, None, :])},
        {"logits": [f[:, None, :] if f.ndim == 2 else f for f in found]},
        load_profile("raspberrypi").accuracy,
    )
    (metrics,) = result.outputs
    predicted = np.concatenate(found).argmax(1)
    return {
        "cosine": metrics.cosine,
        "top1_agreement": metrics.top1_agreement,
        "meets_tolerance": result.meets_tolerance,
        "test_accuracy": float((predicted == labels).mean()),
    }


def torch_rows(
    workdir: Path, seconds: float, *, runtime_cache: Path | None = None
) -> dict[str, Any]:
    """The PyTorch digits CNN -> `raspberrypi` and -> `raspberrypi-tflite`, edgekit's paths
    side by side with the plain ones (see the module docstring). `runtime_cache` is where the
    onnx2tf venv lives (None: EDGEKIT_RUNTIME_CACHE or ~/.cache/edgekit/runtimes)."""
    import litert_torch
    import torch
    from edgekit.converters.frontends.onnx2tf_frontend import convert_onnx_to_saved_model
    from edgekit.converters.frontends.torch_frontend import (
        export_litert,
        export_onnx,
        load_pt2,
    )
    from edgekit.converters.passes.tflite_passes import quantize_with_litert
    from edgekit.converters.torch_examples import export_torch_digits
    from onnxruntime.quantization import quantize_dynamic

    example = export_torch_digits(workdir / "torch_digits", kind="cnn")
    x, labels, reference = example.x_test, example.y_test, example.logits_test
    program = load_pt2(example.pt2_path)
    results: dict[str, Any] = {
        "model": "PyTorch digits CNN (trained here)",
        "pytorch_test_accuracy": example.test_accuracy,
    }

    # raspberrypi: plain torch.onnx.export (+ quantize_dynamic) vs edgekit.
    print("== torch digits -> raspberrypi", file=sys.stderr)
    profile = "raspberrypi"
    threads = min(load_profile(profile).threads, os.cpu_count() or 1)
    plain = workdir / "torch-plain.onnx"
    torch.onnx.export(example.module, (torch.from_numpy(x[:1]),), str(plain), dynamo=True)
    variants: dict[str, Path | str] = {"plain_torch_onnx_export_fp32": plain}
    dynamic = workdir / "torch-plain-quantize-dynamic.onnx"
    with scratch_cwd(workdir):
        quantize_dynamic(str(plain), str(dynamic))
    variants["plain_ort_quantize_dynamic"] = dynamic
    exported = export_onnx(program, workdir / "torch-edgekit.onnx").path
    converted = convert(
        exported,
        profile=profile,
        output_dir=workdir / "torch-raspberrypi-out",
        calibration=example.calibration_path,
        validation=example.validation_path,
    )
    variants["edgekit"] = converted.artifact
    paths = {k: v for k, v in variants.items() if isinstance(v, Path)}
    # The plain export names its input after forward()'s argument too (`pixels`).
    timings = measure(
        paths, {"pixels": x[:1]}, threads=threads, workdir=workdir, seconds_per_model=seconds
    )
    accuracy = {k: _torch_accuracy(v, reference, x, labels) for k, v in paths.items()}
    rows = _variant_rows(variants, timings, accuracy, "plain_torch_onnx_export_fp32")
    rows["edgekit"]["chosen_candidate"] = converted.chosen
    rows["edgekit"]["latency_ratio_vs_peer"] = (
        rows["edgekit"]["p50_ms"] / rows["plain_ort_quantize_dynamic"]["p50_ms"]
    )
    results[profile] = {"threads": threads, "rows": rows}

    # raspberrypi-tflite: litert-torch defaults vs edgekit's two paths.
    print("== torch digits -> raspberrypi-tflite", file=sys.stderr)
    profile = "raspberrypi-tflite"
    threads = min(load_profile(profile).threads, os.cpu_count() or 1)
    nchw: dict[str, Path] = {}
    default = workdir / "litert-torch-default.tflite"
    litert_torch.convert(example.module, (torch.from_numpy(x[:1]),)).export(str(default))
    nchw["plain_litert_torch_default"] = default
    litert_fp32 = export_litert(program, workdir / "edgekit-litert-fp32.tflite").path
    nchw["edgekit_litert_torch_fp32"] = litert_fp32
    content, _ = quantize_with_litert(litert_fp32.read_bytes(), "dynamic_int8")
    dynamic_tflite = workdir / "edgekit-litert-dynamic-int8.tflite"
    dynamic_tflite.write_bytes(content)
    nchw["edgekit_litert_torch_dynamic_int8_aeq"] = dynamic_tflite
    feeds = [{"pixels": x[i : i + 1]} for i in range(4)]
    onnx2tf = convert_onnx_to_saved_model(
        exported, workdir / "torch-saved-model", sample_feeds=feeds, cache_dir=runtime_cache
    )
    layout = onnx2tf.layout
    # Today's convert() reads the SavedModel: data in its (NHWC, batch-1) layout, one sample
    # per feed (a leading samples axis).
    nhwc_data = {}
    for name, path in (("calibration", example.calibration_path),
                       ("validation", example.validation_path)):  # fmt: skip
        with np.load(path) as archive:
            moved = np.ascontiguousarray(archive["pixels"].transpose(0, 2, 3, 1))
        nhwc_data[name] = workdir / f"torch-{name}-nhwc.npz"
        np.savez(nhwc_data[name], pixels=moved[:, None])
    converted_tflite = convert(
        onnx2tf.saved_model,
        profile=profile,
        output_dir=workdir / "torch-raspberrypi-tflite-out",
        calibration=nhwc_data["calibration"],
        validation=nhwc_data["validation"],
    )
    nhwc: dict[str, Path] = {"edgekit_onnx2tf": converted_tflite.artifact}
    # One feed per measurement: the NCHW models and the NHWC one are timed in separate groups.
    pixels = layout.input("pixels")
    nhwc_feed = {"pixels": pixels.to_artifact(x[:1]) if pixels else x[:1]}
    # litert-torch's own default names its input args_0; the LiteRT worker ignores extra keys.
    timings = measure(
        nchw,
        {"pixels": x[:1], "args_0": x[:1]},
        threads=threads,
        workdir=workdir,
        seconds_per_model=seconds,
    )
    timings |= measure(nhwc, nhwc_feed, threads=threads, workdir=workdir, seconds_per_model=seconds)
    accuracy = {k: _torch_accuracy(v, reference, x, labels) for k, v in nchw.items()}
    accuracy["edgekit_onnx2tf"] = _torch_accuracy(
        converted_tflite.artifact, reference, x, labels, layout=layout.input("pixels")
    )
    rows = _variant_rows({**nchw, **nhwc}, timings, accuracy, "plain_litert_torch_default")
    rows["edgekit_onnx2tf"]["chosen_candidate"] = converted_tflite.chosen
    rows["edgekit_onnx2tf"]["layout"] = layout.to_dict()
    rows["edgekit_onnx2tf"]["note"] = "timed in a separate round-robin group (NHWC input)"
    for name in ("edgekit_onnx2tf", "edgekit_litert_torch_dynamic_int8_aeq"):
        rows[name]["latency_ratio_vs_peer"] = (
            rows[name]["p50_ms"] / rows["plain_litert_torch_default"]["p50_ms"]
        )
    results[profile] = {"threads": threads, "rows": rows}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/convert.json"))
    parser.add_argument("--profile", default="raspberrypi")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget per variant")
    parser.add_argument("--only", choices=("all", "onnx", "tflite", "torch"), default="all")
    args = parser.parse_args()
    threads = min(load_profile(args.profile).threads, os.cpu_count() or 1)
    results: dict[str, Any] = {
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": threads},
        "profile": args.profile,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        if args.only in ("all", "tflite"):
            results["tflite"] = _tflite_rows(workdir, args.seconds)
        if args.only in ("all", "torch"):
            results["torch"] = torch_rows(workdir, args.seconds)
        onnx_models = _models(workdir) if args.only in ("all", "onnx") else {}
        for name, (model, calibration, validation) in onnx_models.items():
            print(f"== {name}", file=sys.stderr)
            converted = convert(
                model,
                profile=args.profile,
                output_dir=workdir / f"{name}-out",
                calibration=calibration,
                validation=validation,
            )
            variants: dict[str, Path | str] = {"original_fp32": model}
            variants.update(_peers(model, calibration, workdir))
            variants["edgekit"] = converted.artifact
            runnable = {k: v for k, v in variants.items() if isinstance(v, Path)}
            feed = load_dataset(validation, OnnxRuntimeBackend(model).inputs).single_sample_feed()
            timings = measure(
                runnable, feed, threads=threads, workdir=workdir, seconds_per_model=args.seconds
            )
            accuracy = {
                variant: _accuracy(model, path, validation) for variant, path in runnable.items()
            }
            rows = _variant_rows(
                variants, timings, accuracy, "original_fp32", accuracy_key="accuracy_vs_original"
            )
            rows["edgekit"]["chosen_candidate"] = converted.chosen
            # The bar: the fastest of fp32 and the peers that keep the profile's accuracy.
            best_other = min(
                rows[v]["p50_ms"]
                for v in rows
                if v != "edgekit"
                and "p50_ms" in rows[v]
                and rows[v]["accuracy_vs_original"]["meets_tolerance"]
            )
            rows["edgekit"]["latency_ratio_vs_best_accurate_other"] = (
                rows["edgekit"]["p50_ms"] / best_other
            )
            results["models"][name] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2)
    args.out.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
