"""Conversion benchmark: original vs the toolchains' own defaults (the peers) vs edgekit's choice.

ONNX rows: for the digits CNN (trained here), the shared magika and silero models, the peers are
onnxruntime's `quantize_dynamic`/`quantize_static` and Microsoft Olive's
`OnnxDynamicQuantization`/`OnnxStaticQuantization` passes at their defaults (Olive runs in its
own cached venv, `benchmarks/peers/olive_peer.py`; `--no-olive` skips it), all calibrated on the
same samples as edgekit. Each model's data is split three ways: calibration, validation (what
edgekit decides on) and a held-out split nobody saw, on which every variant's fidelity is
reported. edgekit converts each model `--repeats` times (default 5): the rows say how many runs
chose the same bytes. Latency: every variant timed side by side in one worker, paired per
round; each ratio to fp32 comes with its 95% interval (`edgekit.converters.benchmark`).

TFLite rows: for a Keras digits CNN (trained here) and an untrained MobileNetV2 (alpha 0.35,
96x96; architecture only, nothing downloaded), the original is the Keras model's plain TFLite
fp32 conversion and the peer is TFLiteConverter's own default optimization
(`optimizations=[tf.lite.Optimize.DEFAULT]`, no representative data: dynamic range).

PyTorch rows (`torch_rows`): the PyTorch digits CNN (trained here), `edgekit convert
digits_cnn.pt2` for `raspberrypi`, beside the plain path a user takes without edgekit
(`torch.onnx.export` + onnxruntime's `quantize_dynamic`), and for `raspberrypi-tflite` (ONNX +
onnx2tf + the TFLite candidates; also litert-torch + ai-edge-quantizer for comparison), beside
litert-torch's defaults. Accuracy is against PyTorch's own outputs.

    .venv/bin/python benchmarks/convert.py --out benchmarks/results/convert.json
    .venv/bin/python benchmarks/convert.py --only onnx --repeats 2 --no-olive --out /tmp/c.json
    .venv/bin/python benchmarks/convert.py --only tflite --out /tmp/convert-tflite.json
    .venv/bin/python benchmarks/convert.py --only torch --seconds 1 \
        --out benchmarks/results/convert-torch.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from edgekit.converters import convert
from edgekit.converters.benchmark import (
    compressed_size,
    file_size,
    measure,
    measure_latency,
    measure_memory,
    paired_ratio,
)
from edgekit.converters.data import load_dataset
from edgekit.converters.examples import (
    export_digits_cnn,
    machine_files,
    magika_inputs,
    silero_stream,
)
from edgekit.converters.passes.onnx_passes import feed_reader, scratch_cwd
from edgekit.converters.tflite_examples import export_keras_digits

from edgekit.accuracy import compare_outputs
from edgekit.errors import first_line
from edgekit.profiles import load_profile
from edgekit.runtimes import LiteRtBackend, OnnxRuntimeBackend, dequantize_output, quantize_input

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers.olive_peer import OlivePeerError, olive_quantize, olive_version

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
SIZE_GOAL = 0.35  # weight-only int8 promise: <= 0.35x fp32 bytes at fp32 latency


def _split(workdir: Path, name: str, arrays: dict[str, np.ndarray]) -> tuple[Path, Path, Path]:
    """Every third sample (offset 0, 1, 2) to calibration, validation and held-out test."""
    paths = []
    for offset, part in enumerate(("cal", "val", "test")):
        path = workdir / f"{name}_{part}.npz"
        np.savez(path, **{k: v[offset::3] if v.ndim else v for k, v in arrays.items()})
        paths.append(path)
    return paths[0], paths[1], paths[2]


def _models(workdir: Path) -> dict[str, tuple[Path, Path, Path, Path]]:
    """name -> (model, calibration, validation, held-out test)."""
    digits = export_digits_cnn(workdir / "digits")
    with np.load(digits.calibration_path) as cal, np.load(digits.validation_path) as val:
        pixels = np.concatenate([cal["pixels"], val["pixels"]])
    models = {"digits_cnn": (digits.model_path, *_split(workdir, "digits", {"pixels": pixels}))}
    x = magika_inputs(machine_files())
    order = np.random.default_rng(0).permutation(len(x))
    magika = SHARED / "magika-standard-v3.3" / "model.onnx"
    models["magika"] = (magika, *_split(workdir, "magika", {"bytes": x[order[:360]]}))
    silero = SHARED / "silero-vad-16k-op15" / "model.onnx"
    models["silero_vad"] = (silero, *_split(workdir, "silero", silero_stream(silero, chunks=144)))
    return models


def _ort_peers(model: Path, calibration: Path, workdir: Path) -> dict[str, Path | str]:
    """onnxruntime's quantize_dynamic and quantize_static with their default settings."""
    from onnxruntime.quantization import quantize_dynamic, quantize_static

    peers: dict[str, Path | str] = {}
    data = load_dataset(calibration, OnnxRuntimeBackend(model).inputs)
    with scratch_cwd(workdir):
        for name in ("ort_quantize_dynamic", "ort_quantize_static"):
            out = workdir / f"{model.parent.name}-{name}.onnx"
            try:
                if name == "ort_quantize_dynamic":
                    quantize_dynamic(str(model), str(out))
                else:
                    quantize_static(str(model), str(out), feed_reader(list(data.feeds)))
                OnnxRuntimeBackend(out)
                peers[name] = out
            except Exception as e:  # noqa: BLE001  (a peer that fails is a result, not a crash)
                peers[name] = f"failed: {first_line(e)[:200]}"
    return peers


def _olive_peers(model: Path, calibration: Path, workdir: Path) -> dict[str, Path | str]:
    peers: dict[str, Path | str] = {}
    for kind in ("dynamic", "static"):
        try:
            out = olive_quantize(model, calibration, workdir, kind=kind)  # type: ignore[arg-type]
            OnnxRuntimeBackend(out)
            peers[f"olive_{kind}"] = out
        except (OlivePeerError, Exception) as e:  # noqa: BLE001  (a failed peer is a result)
            peers[f"olive_{kind}"] = f"failed: {first_line(e)[:200]}"
    return peers


def _outputs(path: Path, feeds: list[dict[str, Any]]) -> dict[str, list[Any]]:
    runtime = OnnxRuntimeBackend(path)
    names = {spec.name for spec in runtime.inputs}
    found: dict[str, list[Any]] = {o.name: [] for o in runtime.outputs}
    for feed in feeds:
        for name, value in runtime.run({k: v for k, v in feed.items() if k in names}).items():
            found[name].append(value)
    return found


def _accuracy(
    reference: dict[str, list[Any]], candidate: Path, feeds: list[dict[str, Any]], profile: str
) -> dict[str, Any]:
    result = compare_outputs(
        reference, _outputs(candidate, feeds), load_profile(profile).accuracy, rule="statistical"
    )
    outputs: dict[str, Any] = {
        m.name: {
            "kind": m.kind,
            "cosine": round(m.cosine, 6),
            "cosine_lower_bound": round(m.cosine_lower_bound, 6),
            "top1_agreement": m.top1_agreement,
        }
        for m in result.outputs
    }
    return {"outputs": outputs, "meets_tolerance": result.meets_tolerance, "samples": len(feeds)}


def _ratio(estimate: Any) -> dict[str, Any]:
    data: dict[str, Any] = estimate.to_dict()
    return data


def _onnx_rows(
    workdir: Path, profile: str, seconds: float, repeats: int, *, olive: bool
) -> dict[str, Any]:
    threads = min(load_profile(profile).threads, os.cpu_count() or 1)
    results: dict[str, Any] = {"profile": profile, "threads": threads, "models": {}}
    if olive:
        results["olive_version"] = olive_version()
    for name, (model, calibration, validation, test) in _models(workdir).items():
        print(f"== {name}", file=sys.stderr)
        digests, chosen = [], []
        for index in range(repeats):
            converted = convert(
                model,
                profile=profile,
                output_dir=workdir / f"{name}-out-{index}",
                calibration=calibration,
                validation=validation,
                benchmark_seconds=seconds,
            )
            digests.append(hashlib.sha256(converted.artifact.read_bytes()).hexdigest())
            chosen.append(converted.chosen)
        variants: dict[str, Path | str] = {"original_fp32": model}
        variants.update(_ort_peers(model, calibration, workdir))
        if olive:
            variants.update(_olive_peers(model, calibration, workdir))
        variants["edgekit"] = converted.artifact
        runnable = {k: v for k, v in variants.items() if isinstance(v, Path)}
        inputs = OnnxRuntimeBackend(model).inputs
        feed = load_dataset(validation, inputs).single_sample_feed()
        timings = measure_latency(
            runnable, feed, threads=threads, workdir=workdir, seconds_per_model=seconds * 2
        )
        held_out = list(load_dataset(test, inputs).feeds)
        reference = _outputs(model, held_out)
        base, base_size = timings["original_fp32"], file_size(model)
        rows: dict[str, Any] = {}
        for variant, path in variants.items():
            if not isinstance(path, Path):
                rows[variant] = {"error": path}
                continue
            t = timings[variant]
            memory = measure_memory(path, feed, threads=threads, workdir=workdir)
            rows[variant] = {
                "p50_ms": t.p50_ms,
                "p95_ms": t.p95_ms,
                "latency_vs_fp32": _ratio(paired_ratio(t, base)),
                "peak_memory_bytes": memory.peak_memory_bytes,
                "size_bytes": file_size(path),
                "zstd_bytes": compressed_size(path),
                "size_ratio_vs_fp32": file_size(path) / base_size,
                "held_out_fidelity": _accuracy(reference, path, held_out, profile),
            }
        edgekit = rows["edgekit"]
        edgekit["chosen_candidate"] = converted.chosen
        edgekit["repeat_conversions"] = {
            "runs": repeats,
            "same_bytes_as_first": sum(digest == digests[0] for digest in digests),
            "chosen": chosen,
        }
        report_rows = {row["name"]: row for row in converted.report["candidates"]}
        weight = report_rows.get("weight_int8", {})
        int8_ok = bool(weight.get("accuracy") and weight["accuracy"]["meets_tolerance"])
        latency = edgekit["latency_vs_fp32"]
        at_fp32_speed = (latency["low"] or 0) <= 1.0 <= (latency["high"] or math.inf) or (
            converted.report["summary"].get("latency_vs_fp32", {}).get("equal") is not None
        )
        edgekit["size_goal"] = {
            "applies": int8_ok,
            "goal": f"<= {SIZE_GOAL}x fp32 bytes at fp32 latency where int8 weights meet the "
            "tolerance",
            "met": (not int8_ok) or (edgekit["size_ratio_vs_fp32"] <= SIZE_GOAL and at_fp32_speed),
        }
        results["models"][name] = rows
    return results


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
        timings = measure_latency(
            runnable, feed, threads=threads, workdir=workdir, seconds_per_model=seconds
        )
        accuracy = {
            variant: _tflite_accuracy(original, path, validation)
            for variant, path in runnable.items()
        }
        rows = _variant_rows(
            variants,
            (timings, _memory(runnable, feed, threads=threads, workdir=workdir)),
            accuracy,
            "original_tflite_fp32",
            accuracy_key="accuracy_vs_original",
        )
        edgekit = rows["edgekit"]
        edgekit["chosen_candidate"] = converted.chosen
        peer = rows.get("tflite_converter_default", {})
        if "p50_ms" in peer:
            edgekit["latency_vs_peer"] = _ratio(
                paired_ratio(timings["edgekit"], timings["tflite_converter_default"])
            )
            edgekit["size_ratio_vs_peer"] = edgekit["size_bytes"] / peer["size_bytes"]
        results["models"][name] = rows
    return results


def _memory(paths: dict[str, Path], feed: Any, *, threads: int, workdir: Path) -> dict[str, Any]:
    return {
        name: measure_memory(path, feed, threads=threads, workdir=workdir)
        for name, path in paths.items()
    }


def _variant_rows(
    variants: dict[str, Path | str],
    measured: tuple[dict[str, Any], dict[str, Any]],
    accuracy: dict[str, dict[str, Any]],
    base: str,
    *,
    accuracy_key: str = "accuracy_vs_pytorch",
) -> dict[str, Any]:
    """One row per variant: latency (with its paired ratio to `base` where both were timed
    side by side), memory, sizes, ratios to `base`, and its accuracy."""
    latency, memory = measured
    rows: dict[str, Any] = {}
    base_size = file_size(variants[base]) if isinstance(variants[base], Path) else None
    for variant, path in variants.items():
        if not isinstance(path, Path):
            rows[variant] = {"error": path}
            continue
        t = latency[variant]
        rows[variant] = {
            "p50_ms": t.p50_ms,
            "p95_ms": t.p95_ms,
            "latency_vs_fp32": _ratio(paired_ratio(t, latency[base])),
            "p50_ratio_vs_fp32": t.p50_ms / latency[base].p50_ms,
            "peak_memory_bytes": memory[variant].peak_memory_bytes,
            "size_bytes": file_size(path),
            "zstd_bytes": compressed_size(path),
            "size_ratio_vs_fp32": file_size(path) / base_size if base_size else None,
            accuracy_key: accuracy[variant],
        }
    return rows


def _torch_accuracy(
    path: Path, reference: Any, x: Any, labels: Any, *, layout: Any = None
) -> dict[str, Any]:
    """Cosine and top-1 agreement with PyTorch's logits, and top-1 on the held-out digits."""
    from edgekit.accuracy import compare_outputs

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


def torch_rows(workdir: Path, seconds: float) -> dict[str, Any]:
    """The PyTorch digits CNN -> `raspberrypi` and -> `raspberrypi-tflite` with `edgekit convert`
    on its `.pt2`, side by side with the plain paths (see the module docstring). The onnx2tf
    venv lives in EDGEKIT_RUNTIME_CACHE (else ~/.cache/edgekit/runtimes)."""
    import litert_torch
    import torch
    from edgekit.converters.frontends.torch_frontend import export_litert, load_pt2
    from edgekit.converters.layout import LayoutMap
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

    # raspberrypi: plain torch.onnx.export (+ quantize_dynamic) vs `edgekit convert x.pt2`.
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
    converted = convert(
        example.pt2_path,
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
    rows["edgekit"]["route"] = converted.report["source"]["route"]
    rows["edgekit"]["latency_ratio_vs_peer"] = (
        rows["edgekit"]["p50_ms"] / rows["plain_ort_quantize_dynamic"]["p50_ms"]
    )
    results[profile] = {"threads": threads, "rows": rows}

    # raspberrypi-tflite: litert-torch defaults vs `edgekit convert x.pt2` (ONNX + onnx2tf +
    # the TFLite candidates) and, for comparison, litert-torch + ai-edge-quantizer.
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
    converted_tflite = convert(
        example.pt2_path,
        profile=profile,
        output_dir=workdir / "torch-raspberrypi-tflite-out",
        calibration=example.calibration_path,
        validation=example.validation_path,
    )
    layout = LayoutMap.from_dict(converted_tflite.report["layout"])
    nhwc: dict[str, Path] = {"edgekit_onnx2tf": converted_tflite.artifact}
    # One feed per measurement: the NCHW models and the NHWC one are timed in separate groups.
    pixels = layout.input("pixels")
    nhwc_feed = {"pixels": pixels.to_artifact(x[:1]) if pixels else x[:1]}
    # litert-torch's own default names its input args_0; the LiteRT worker ignores extra keys.
    latency, memory = measure(
        nchw,
        {"pixels": x[:1], "args_0": x[:1]},
        threads=threads,
        workdir=workdir,
        seconds_per_model=seconds,
    )
    more_latency, more_memory = measure(
        nhwc, nhwc_feed, threads=threads, workdir=workdir, seconds_per_model=seconds
    )
    timings = ({**latency, **more_latency}, {**memory, **more_memory})
    accuracy = {k: _torch_accuracy(v, reference, x, labels) for k, v in nchw.items()}
    accuracy["edgekit_onnx2tf"] = _torch_accuracy(
        converted_tflite.artifact, reference, x, labels, layout=pixels
    )
    rows = _variant_rows({**nchw, **nhwc}, timings, accuracy, "plain_litert_torch_default")
    rows["edgekit_onnx2tf"]["chosen_candidate"] = converted_tflite.chosen
    rows["edgekit_onnx2tf"]["route"] = converted_tflite.report["source"]["route"]
    rows["edgekit_onnx2tf"]["layout"] = layout.to_dict()
    rows["edgekit_onnx2tf"]["candidates_zstd_bytes"] = {
        row["name"]: row["compressed_size_bytes"] for row in converted_tflite.candidates
    }
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
    parser.add_argument("--seconds", type=float, default=2.0, help="timing budget per variant")
    parser.add_argument("--repeats", type=int, default=5, help="edgekit conversions per model")
    parser.add_argument("--no-olive", action="store_true", help="skip the Olive peer")
    parser.add_argument("--only", choices=("all", "onnx", "tflite", "torch"), default="all")
    args = parser.parse_args()
    threads = min(load_profile(args.profile).threads, os.cpu_count() or 1)
    results: dict[str, Any] = {
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": threads},
        "profile": args.profile,
    }
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        if args.only in ("all", "onnx"):
            results["onnx"] = _onnx_rows(
                workdir, args.profile, args.seconds, args.repeats, olive=not args.no_olive
            )
        if args.only in ("all", "tflite"):
            results["tflite"] = _tflite_rows(workdir, args.seconds)
        if args.only in ("all", "torch"):
            results["torch"] = torch_rows(workdir, args.seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2)
    args.out.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
