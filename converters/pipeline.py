"""`convert`: candidates -> validate -> benchmark -> choose -> compat -> report.

One flow for both target formats. ONNX sources for onnx profiles go through the ONNX passes;
Keras/SavedModel sources for tflite profiles through TFLiteConverter (`tflite_passes`), and for
onnx profiles through tf2onnx first, then the ONNX passes. Validation, benchmark, choice, golden
samples and the report are shared.

Everything is built in a scratch folder; the output folder receives its files only once the
conversion has succeeded, each moved in with `os.replace`, so a failed run leaves nothing
half-written behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from edgekit.converters.benchmark import Measurement, compressed_size, file_size, measure
from edgekit.converters.data import Dataset, load_dataset, synthetic_dataset
from edgekit.converters.passes.base import PassContext, PassResult, get_pass
from edgekit.converters.passes.onnx_passes import (
    CompatConfig,
    CompatPass,
    DynamicInt8Config,
    Fp16Config,
    LoadPass,
    OptimizePass,
    PruneConfig,
    StaticInt8Config,
    WeightInt8Config,
    rank_nodes_by_quantization_error,
    scratch_cwd,
)
from edgekit.converters.passes.tflite_passes import (
    LITERT_QUANTIZER_RECIPES,
    LiteRtQuantizeConfig,
    LiteRtQuantizePass,
    SourceKind,
    TensorFlowModel,
    Tf2OnnxPass,
    TfliteConvertConfig,
    TfliteConvertPass,
    TfliteKind,
    TfLoadConfig,
    TfLoadPass,
    litert_quantizer_available,
    rank_tflite_layers,
    source_kind,
)
from edgekit.converters.tflite_compat import blocking_ops, downgrade_options
from edgekit.converters.validate import ValidationResult, compare_outputs

from edgekit import __version__
from edgekit.bundle import hash_file
from edgekit.errors import ConversionError, EdgekitError, first_line
from edgekit.profiles import Profile, load_profile
from edgekit.runtimes import (
    LiteRtBackend,
    OnnxRuntimeBackend,
    Runtime,
    RuntimeLoadError,
    TensorSpec,
    dequantize_output,
    open_runtime,
    quantize_input,
)

__all__ = ["CandidateReport", "ConvertResult", "ProgressCallback", "convert"]

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]
ProgressCallback = Callable[[str, int, int], None]
DeviceCheck = Callable[[Path, Path], "str | None"]
"""(model, golden.npz) -> None when the profile's runtimes load and match it, else why not."""
REPORT_SCHEMA = "edgekit.report/v1"
GOLDEN_SAMPLES = 8

# Candidate kind -> the passes that build it from the optimized fp32 model.
_CANDIDATE_PASSES: dict[str, tuple[str, ...]] = {
    "fp32": (),
    "weight_int8": ("weight_int8",),
    "dynamic_int8": ("dynamic_int8",),
    "static_int8": ("static_int8",),
    "fp16": ("fp16",),
    "pruned": ("prune", "weight_int8"),
}
# TFLite candidate kinds: each one TFLiteConverter run from the SavedModel.
_TFLITE_KINDS = ("fp32", "fp16", "dynamic_int8", "full_int8")


@dataclass
class CandidateReport:
    """One candidate: how it was built, how it measured, and why it won or lost."""

    name: str
    passes: tuple[str, ...]
    path: Path | None = None
    status: str = "ok"  # ok | failed
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    validation: ValidationResult | None = None
    measurement: Measurement | None = None
    size_bytes: int | None = None
    compressed_size_bytes: int | None = None
    float_nodes: tuple[str, ...] = ()
    fallback: list[dict[str, Any]] = field(default_factory=list)
    verdict: str = "lost"  # chosen | lost | reference
    reason: str = ""

    @property
    def usable(self) -> bool:
        """Built, loaded and measured."""
        return self.status == "ok" and self.measurement is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "passes": list(self.passes),
            "status": self.status,
            "error": self.error,
            "notes": self.notes,
            "details": self.details,
            "accuracy": self.validation.to_dict() if self.validation else None,
            "latency_ms": (
                {"p50": self.measurement.p50_ms, "p95": self.measurement.p95_ms}
                if self.measurement
                else None
            ),
            "benchmark": self.measurement.to_dict() if self.measurement else None,
            "peak_memory_bytes": self.measurement.peak_memory_bytes if self.measurement else None,
            "size_bytes": self.size_bytes,
            "compressed_size_bytes": self.compressed_size_bytes,
            "float_nodes": list(self.float_nodes),
            "fallback": self.fallback,
            "verdict": self.verdict,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ConvertResult:
    """What `convert` wrote and the report it wrote."""

    artifact: Path
    report_path: Path
    report: dict[str, Any]
    chosen: str

    @property
    def candidates(self) -> list[dict[str, Any]]:
        """The report's candidate rows."""
        rows: list[dict[str, Any]] = self.report["candidates"]
        return rows


def convert(
    model: Path,
    *,
    profile: Profile | str,
    output_dir: Path,
    calibration: Path | None = None,
    validation: Path | None = None,
    threads: int | None = None,
    progress: ProgressCallback | None = None,
    benchmark_seconds: float = 2.0,
    keep_candidates: bool = False,
    device_check: DeviceCheck | None = None,
) -> ConvertResult:
    """Convert `model` for `profile`, writing `model.onnx` or `model.tflite` and `report.json`.

    `model` is an ONNX file, a Keras `.keras` file or a TensorFlow SavedModel folder. Also
    written into `output_dir`: `golden.npz` (inputs and expected outputs for the on-device
    self-test) and `reference_stats.json` (input distribution for drift), which bundles carry.
    With `keep_candidates`, every candidate that was built is kept in `output_dir/candidates/`.

    `device_check(model, golden)` proves a candidate on the device's runtimes (see
    `edgekit.verify_runtime`): it gets the candidate as `model.onnx`/`model.tflite` with its
    own `golden.npz` beside it and returns None when every runtime loads it and matches, or the
    reason it does not. The choice then goes down the ranking until a candidate passes: the
    fastest artifact that meets the tolerance *and* runs right on the profile's runtimes.
    """
    chosen_profile = profile if isinstance(profile, Profile) else load_profile(profile)
    # Absolute paths: the passes run with the scratch folder as the working directory.
    model = model.absolute()
    output_dir = output_dir.absolute()
    calibration = calibration.absolute() if calibration else None
    validation = validation.absolute() if validation else None
    kind = source_kind(model)
    target = chosen_profile.target_format
    if target == "tflite" and kind == "onnx":
        raise ConversionError(_ONNX_TO_TFLITE.format(model=model, profile=chosen_profile.name))
    _check_output_dir(output_dir)
    host_threads = os.cpu_count() or 1
    used_threads = threads or min(chosen_profile.threads, host_threads)
    steps = _Steps(progress, total=6 + len(chosen_profile.quantization.candidates))
    with (
        tempfile.TemporaryDirectory(prefix="edgekit-convert-") as scratch,
        scratch_cwd(Path(scratch)),
    ):
        workdir = Path(scratch)
        steps.advance("loading and checking the model")
        context = PassContext(profile=chosen_profile, workdir=workdir, threads=used_threads)
        loaded = _load(model, kind, context)
        original = loaded.original
        inputs, outputs = original.inputs, original.outputs

        steps.advance("reading calibration and validation data")
        calibration_set, validation_set = _datasets(inputs, calibration, validation, chosen_profile)
        context = replace(context, calibration=calibration_set, validation=validation_set)
        reference = _run_all(original, validation_set, what="the original model")

        steps.advance("optimizing the graph")
        if target == "onnx":
            optimized = workdir / "optimized.onnx"
            optimize_result = OptimizePass().run(loaded.path, optimized, context)
        else:
            optimized = loaded.path
            optimize_result = PassResult(
                details={"skipped": "TFLiteConverter optimizes the graph while converting"}
            )
        context = replace(context, reference_path=optimized)

        candidates: list[CandidateReport] = []
        for candidate_kind in chosen_profile.quantization.candidates:
            steps.advance(f"building candidate {candidate_kind}")
            candidate = _build_candidate(candidate_kind, optimized, context)
            if candidate.status == "ok":
                _validate(candidate, reference, validation_set, chosen_profile, used_threads)
                if candidate_kind == "static_int8":
                    candidate = _static_fallback(candidate, optimized, reference, context)
                elif candidate_kind == "full_int8":
                    candidate = _tflite_fallback(candidate, optimized, reference, context)
            candidates.append(candidate)
            if target != "tflite" or candidate_kind not in LITERT_QUANTIZER_RECIPES:
                continue
            skip = _litert_quantizer_skip_reason(
                candidate_kind, chosen_profile, verified=device_check is not None
            )
            if skip is not None:
                candidate.notes.append(skip)
            else:
                steps.advance(f"building candidate {candidate_kind} with ai-edge-quantizer")
                second = _build_litert_quantizer_candidate(candidate_kind, optimized, context)
                if second.status == "ok":
                    _validate(second, reference, validation_set, chosen_profile, used_threads)
                candidates.append(second)
        _refuse_if_all_blocked(candidates, chosen_profile)

        steps.advance("benchmarking candidates on this host")
        source_row = CandidateReport(
            name="original", passes=(), path=loaded.runnable, verdict="reference"
        )
        source_row.validation = compare_outputs(reference, reference, chosen_profile.accuracy)
        if loaded.runnable is None:
            source_row.notes.append(
                f"the source runs in {original.engine} {original.version}, not on the device "
                "runtime: its outputs are the reference, its latency is not measured"
            )
        _benchmark(
            [source_row, *candidates], validation_set, used_threads, workdir, benchmark_seconds
        )

        steps.advance("choosing")
        winner = _choose(candidates, chosen_profile)
        while device_check is not None:
            refusal = _device_refusal(winner, device_check, validation_set, chosen_profile)
            if refusal is None:
                winner.notes.append("verified on the profile's runtimes (device_check)")
                break
            winner.status, winner.verdict = "failed", "lost"
            winner.error = f"fails on the profile's runtimes: {refusal}"
            winner.reason = ""
            winner = _choose(candidates, chosen_profile)

        steps.advance("writing the artifact, golden samples and report")
        assert winner.path is not None
        artifact_name = f"model.{target}"
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=_parent(output_dir)))
        try:
            artifact = staging / artifact_name
            _copy_artifact(winner.path, artifact)
            if keep_candidates:
                kept = staging / "candidates"
                kept.mkdir()
                for row in candidates:
                    if row.path is not None and row.status == "ok":
                        _copy_artifact(row.path, kept / f"{row.name}{row.path.suffix}")
            chosen_runtime = open_runtime(artifact, threads=used_threads)
            _write_golden(staging / "golden.npz", chosen_runtime, validation_set, chosen_profile)
            device_data = replace(
                validation_set,
                feeds=tuple(_model_feed(chosen_runtime, feed) for feed in validation_set.feeds),
            )
            stats = reference_stats(device_data, chosen_runtime.inputs)
            (staging / "reference_stats.json").write_text(
                json.dumps(stats, indent=2) + "\n", encoding="utf-8"
            )
            report = _report(
                model=model,
                profile=chosen_profile,
                inputs=inputs,
                outputs=outputs,
                load_result=loaded.result,
                optimize_result=optimize_result,
                calibration_set=calibration_set,
                validation_set=validation_set,
                source_row=source_row,
                candidates=candidates,
                winner=winner,
                artifact=artifact,
                artifact_runtime=chosen_runtime,
                threads=used_threads,
            )
            (staging / "report.json").write_text(
                json.dumps(report, indent=2) + "\n", encoding="utf-8"
            )
            _publish(staging, output_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return ConvertResult(
        artifact=output_dir / artifact_name,
        report_path=output_dir / "report.json",
        report=report,
        chosen=winner.name,
    )


_ONNX_TO_TFLITE = (
    "{model}: profile {profile} needs TFLite, and no maintained ONNX-to-TFLite converter "
    "coexists with edgekit's pinned dependencies (onnx2tf pins tensorflow 2.19, onnxruntime "
    "1.23 and numpy<2); export the model from its training framework as a SavedModel folder "
    "or a .keras file and convert that, or pick an onnx profile (raspberrypi, x86-64, "
    "jetson-orin)"
)


@dataclass(frozen=True)
class _Loaded:
    """The source model, read and checked."""

    path: Path  # what the candidates are built from: loaded.onnx or a SavedModel folder
    original: Runtime  # runs the source model: the reference outputs
    runnable: Path | None  # the source as the benchmark worker can load it (None: TF only)
    result: PassResult


def _load(model: Path, kind: SourceKind, context: PassContext) -> _Loaded:
    workdir = context.workdir
    notes: list[str] = []
    details: dict[str, Any] = {}
    if kind != "onnx":
        saved_model = workdir / "source_saved_model"
        loaded_tf = TfLoadPass(TfLoadConfig(kind=kind)).run(model, saved_model, context)
        if context.profile.target_format == "tflite":
            return _Loaded(
                path=saved_model,
                original=TensorFlowModel(saved_model),
                runnable=None,
                result=loaded_tf,
            )
        # An onnx profile: export ONNX with tf2onnx, then the ONNX flow from there.
        exported = workdir / "exported.onnx"
        exported_result = Tf2OnnxPass().run(saved_model, exported, context)
        details = {"source_format": kind, **loaded_tf.details, "tf2onnx": exported_result.details}
        notes.append(f"exported to ONNX with {exported_result.details['converter']}")
        model = exported
    loaded = workdir / "loaded.onnx"
    load_result = LoadPass().run(model, loaded, context)
    try:
        original = OnnxRuntimeBackend(loaded, threads=context.threads)
    except RuntimeLoadError as e:
        raise ConversionError(f"{model}: {e}") from e
    result = PassResult(
        notes=(*notes, *load_result.notes), details={**load_result.details, **details}
    )
    return _Loaded(path=loaded, original=original, runnable=loaded, result=result)


class _Steps:
    def __init__(self, callback: ProgressCallback | None, *, total: int) -> None:
        self._callback = callback
        self._total = total
        self._done = 0

    def advance(self, description: str) -> None:
        log.info("%s", description)
        if self._callback is not None:
            self._callback(description, self._done, self._total)
        self._done += 1


def _parent(output_dir: Path) -> Path:
    parent = output_dir.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def _check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"output {output_dir} exists and is not a folder; pick another -o")


_OUTPUT_FILES = (
    "model.onnx",
    "model.onnx.data",
    "model.tflite",
    "golden.npz",
    "reference_stats.json",
    "report.json",
)


def _publish(staging: Path, output_dir: Path) -> None:
    """Move the finished files into `output_dir`, replacing earlier outputs of ours."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in _OUTPUT_FILES:
        target = output_dir / name
        if not (staging / name).exists() and target.exists():
            target.unlink()  # a stale file from an earlier conversion (e.g. external data)
    for name in _OUTPUT_FILES:
        if (staging / name).exists():
            os.replace(staging / name, output_dir / name)
    kept = output_dir / "candidates"
    if kept.is_dir():
        shutil.rmtree(kept)
    if (staging / "candidates").is_dir():
        os.replace(staging / "candidates", kept)


def _datasets(
    inputs: Sequence[TensorSpec],
    calibration: Path | None,
    validation: Path | None,
    profile: Profile,
) -> tuple[Dataset, Dataset]:
    prep = profile.preprocessing
    calibration_set = load_dataset(calibration, inputs, preprocessing=prep) if calibration else None
    validation_set = load_dataset(validation, inputs, preprocessing=prep) if validation else None
    if calibration_set is None and validation_set is None:
        synthetic = synthetic_dataset(inputs)
        return synthetic, synthetic
    if validation_set is None:
        assert calibration_set is not None
        validation_set = replace(
            calibration_set,
            notes=(*calibration_set.notes, "validated on the calibration data (no --validation)"),
        )
    if calibration_set is None:
        calibration_set = replace(
            validation_set,
            notes=(*validation_set.notes, "calibrated on the validation data (no --calibration)"),
        )
    return calibration_set, validation_set


def _model_feed(runtime: Runtime, feed: dict[str, Array]) -> dict[str, Array]:
    """A feed of real values in the model's own input dtypes (quantized for int8/uint8 I/O)."""
    specs = {spec.name: spec for spec in runtime.inputs}
    return {
        name: quantize_input(specs[name], value) if name in specs else value
        for name, value in feed.items()
    }


def _run_all(runtime: Runtime, dataset: Dataset, *, what: str) -> dict[str, list[Array]]:
    """Every output for every feed, as real values (quantized I/O converted both ways)."""
    results: dict[str, list[Array]] = {spec.name: [] for spec in runtime.outputs}
    output_specs = {spec.name: spec for spec in runtime.outputs}
    for index, feed in enumerate(dataset.feeds):
        try:
            raw = runtime.run(_model_feed(runtime, feed))
            values = {name: dequantize_output(output_specs[name], v) for name, v in raw.items()}
        except Exception as e:
            hint = (
                "; the inputs are synthetic: give real data with --calibration/--validation"
                if dataset.kind == "synthetic"
                else ""
            )
            raise ConversionError(
                f"{what} fails on input feed {index} from {dataset.source}: {first_line(e)}{hint}"
            ) from e
        for name, value in values.items():
            results[name].append(value)
    return results


def _pass_config(name: str, profile: Profile) -> Any:
    quant = profile.quantization
    if name == "weight_int8":
        return WeightInt8Config()
    if name == "prune":
        return PruneConfig(
            sparsity=profile.pruning.sparsity or 0.5,
            min_elements=profile.pruning.min_tensor_elements,
        )
    if name == "dynamic_int8":
        return DynamicInt8Config(per_channel=quant.per_channel, weight_type=quant.weight_type)
    if name == "static_int8":
        return StaticInt8Config(
            quant_format=quant.format,
            per_channel=quant.per_channel,
            activation_type=quant.activation_type,
            weight_type=quant.weight_type,
            calibration_method=quant.calibration_method,
        )
    if name == "fp16":
        return Fp16Config()
    return None


def _build_candidate(
    kind: str,
    optimized: Path,
    context: PassContext,
    *,
    static_config: StaticInt8Config | None = None,
    label: str | None = None,
) -> CandidateReport:
    if context.profile.target_format == "tflite":
        return _build_tflite_candidate(kind, optimized, context, label=label)
    passes = _CANDIDATE_PASSES.get(kind)
    if passes is None:
        raise ConversionError(f"unknown candidate kind {kind!r}")
    name = label or kind
    candidate = CandidateReport(name=name, passes=(*passes, "compat"))
    current = optimized
    try:
        for index, pass_name in enumerate(passes):
            config = (
                static_config
                if pass_name == "static_int8" and static_config  # noqa: S105  (not a password)
                else _pass_config(pass_name, context.profile)
            )
            step = get_pass(pass_name)(config) if config is not None else get_pass(pass_name)()
            out = context.workdir / f"{name}-{index}-{pass_name}.onnx"
            result = step.run(current, out, context)
            candidate.notes.extend(result.notes)
            candidate.details[pass_name] = result.details
            current = out
        final = context.workdir / f"{name}.onnx"
        compat = CompatPass(CompatConfig(runtime_version=context.profile.runtime.oldest.version))
        candidate.details["compat"] = compat.run(current, final, context).details
        candidate.path = final
        candidate.size_bytes = file_size(final)
        candidate.compressed_size_bytes = compressed_size(final)
        if static_config is not None:
            candidate.float_nodes = static_config.nodes_to_exclude
    except EdgekitError as e:
        candidate.status = "failed"
        candidate.error = str(e)
        candidate.reason = f"failed to build: {e}"
    return candidate


def _build_tflite_candidate(
    kind: str,
    saved_model: Path,
    context: PassContext,
    *,
    float_layers: tuple[str, ...] = (),
    label: str | None = None,
) -> CandidateReport:
    """One TFLiteConverter run, then the op-version check against the profile's runtimes."""
    name = label or kind
    candidate = CandidateReport(name=name, passes=("tflite_convert", "op_versions"))
    if kind not in _TFLITE_KINDS:
        candidate.status = "failed"
        candidate.error = (
            f"{kind} is not built for TFLite profiles (only {', '.join(_TFLITE_KINDS)})"
        )
        candidate.reason = f"failed to build: {candidate.error}"
        return candidate
    config = _tflite_config(kind, context.profile, float_layers=float_layers)
    final = context.workdir / f"{name}.tflite"
    try:
        result = TfliteConvertPass(config).run(saved_model, final, context)
        blocking = _blocking_ops(final, context.profile)
        downgrade = _downgrade_options(context.profile)
        if blocking.blocking and downgrade:
            # Rebuild with the settings that keep op versions loadable on the oldest runtime.
            config = replace(config, converter_options=downgrade)
            result = TfliteConvertPass(config).run(saved_model, final, context)
            candidate.notes.append(
                f"rebuilt with {', '.join(option for option, _ in downgrade)} so that "
                f"{context.profile.runtime.oldest.package} "
                f"{context.profile.runtime.oldest.version} loads it (was: "
                f"{'; '.join(blocking.blocking)})"
            )
            blocking = _blocking_ops(final, context.profile)
    except EdgekitError as e:
        candidate.status = "failed"
        candidate.error = str(e)
        candidate.reason = f"failed to build: {e}"
        return candidate
    candidate.notes.extend(result.notes)
    candidate.details["tflite_convert"] = result.details
    candidate.float_nodes = float_layers
    built = _check_tflite_candidate(
        candidate,
        final,
        blocking,
        context.profile,
        io_type=config.io_type if kind == "full_int8" else "float32",
    )
    if built:
        # What was built, not what was asked for (a float layer can leave I/O in float32).
        candidate.details["tflite_convert"] = {**result.details, "io_type": "/".join(built)}
    return candidate


def _build_litert_quantizer_candidate(
    kind: str, saved_model: Path, context: PassContext
) -> CandidateReport:
    """The same kind built by ai-edge-quantizer, the second int8 source (see docs)."""
    name = f"{kind}_aeq"
    candidate = CandidateReport(name=name, passes=("litert_quantize", "op_versions"))
    final = context.workdir / f"{name}.tflite"
    try:
        config = LiteRtQuantizeConfig(kind=typing.cast(Any, kind))
        result = LiteRtQuantizePass(config).run(saved_model, final, context)
        blocking = _blocking_ops(final, context.profile)
    except EdgekitError as e:
        candidate.status = "failed"
        candidate.error = str(e)
        candidate.reason = f"failed to build: {e}"
        return candidate
    candidate.details["litert_quantize"] = result.details
    _check_tflite_candidate(
        candidate, final, blocking, context.profile, io_type=LITERT_QUANTIZER_RECIPES[kind][1]
    )
    return candidate


def _litert_quantizer_skip_reason(kind: str, profile: Profile, *, verified: bool) -> str | None:
    """Why ai-edge-quantizer does not build `kind` for `profile` (None: it does)."""
    if not litert_quantizer_available():
        return "ai-edge-quantizer is not installed: only TFLiteConverter built this kind"
    oldest = profile.runtime.oldest
    if oldest.package == "tflite-runtime" and not verified:
        # Measured on the digits CNN: ai-edge-quantizer 0.10's dynamic int8 passes the op-version
        # check and loads in tflite-runtime 2.14.0, but computes wrong outputs there (cosine
        # 0.02 against the same file in ai-edge-litert 2.3). Only a run on that runtime can
        # clear it, so it is offered only with the device check (`--verify-runtime`).
        return (
            f"ai-edge-quantizer's output is not offered for {oldest.package} {oldest.version} "
            "without --verify-runtime: it loads there but was measured computing wrong outputs"
        )
    io_type = LITERT_QUANTIZER_RECIPES[kind][1]
    wanted = "float32" if kind == "dynamic_int8" else profile.quantization.io_type
    if io_type != wanted:
        return (
            f"ai-edge-quantizer's {kind} has {io_type} I/O and the profile wants {wanted}: "
            "only TFLiteConverter built this kind"
        )
    return None


def _check_tflite_candidate(
    candidate: CandidateReport,
    final: Path,
    blocking: _OpVersionCheck,
    profile: Profile,
    *,
    io_type: str,
) -> tuple[str, ...]:
    """Op versions against the oldest runtime and the built I/O dtypes against `io_type`.

    Returns the distinct I/O dtypes of the built model, sorted (empty when it does not load).
    """
    candidate.path = final
    candidate.size_bytes = file_size(final)
    candidate.compressed_size_bytes = compressed_size(final)
    candidate.details["op_versions"] = blocking.details
    if blocking.blocking:
        candidate.status = "failed"
        candidate.error = "blocked: " + "; ".join(blocking.blocking)
        candidate.reason = (
            f"{profile.runtime.oldest.package} {profile.runtime.oldest.version} "
            f"(the profile's oldest runtime) cannot load it: {'; '.join(blocking.blocking)}"
        )
    try:
        built = LiteRtBackend(final)
    except RuntimeLoadError:
        return ()  # the host runtime's refusal shows when the candidate is validated
    specs = (*built.inputs, *built.outputs)
    wrong = [f"{spec.name} is {spec.dtype}" for spec in specs if spec.dtype != io_type]
    if wrong and candidate.status == "ok":
        candidate.status = "failed"
        candidate.error = (
            f"inputs/outputs are not {io_type} ({', '.join(wrong)}); the profile wants "
            f"{io_type} I/O"
        )
        candidate.reason = f"wrong I/O type: {candidate.error}"
    return tuple(sorted({spec.dtype for spec in specs}))


def _tflite_config(
    kind: str, profile: Profile, *, float_layers: tuple[str, ...] = ()
) -> TfliteConvertConfig:
    return TfliteConvertConfig(
        kind=typing.cast(TfliteKind, kind),  # checked against _TFLITE_KINDS by the callers
        io_type=profile.quantization.io_type,
        float_layers=float_layers,
    )


def _downgrade_options(profile: Profile) -> tuple[tuple[str, object], ...]:
    return tuple(downgrade_options(profile).items())


@dataclass(frozen=True)
class _OpVersionCheck:
    blocking: tuple[str, ...]
    details: dict[str, Any]


def _blocking_ops(model: Path, profile: Profile) -> _OpVersionCheck:
    """Ops of `model` the profile's oldest runtime cannot load (from `tflite_compat`)."""
    found = tuple(blocking_ops(model, profile))
    return _OpVersionCheck(
        blocking=found,
        details={
            "checked": True,
            "oldest_runtime": f"{profile.runtime.oldest.package} {profile.runtime.oldest.version}",
            "blocking": list(found),
        },
    )


def _refuse_if_all_blocked(candidates: Sequence[CandidateReport], profile: Profile) -> None:
    blocked = [row for row in candidates if (row.error or "").startswith("blocked: ")]
    if not blocked or len(blocked) != len(candidates):
        return
    ops = sorted({op for row in blocked for op in row.details["op_versions"]["blocking"]})
    oldest = profile.runtime.oldest
    raise ConversionError(
        f"no candidate loads on {oldest.package} {oldest.version}, the oldest runtime of profile "
        f"{profile.name}: {'; '.join(ops)}; raise the profile's runtime.oldest or change the "
        "model to avoid these ops"
    )


def _validate(
    candidate: CandidateReport,
    reference: dict[str, list[Array]],
    dataset: Dataset,
    profile: Profile,
    threads: int,
) -> None:
    assert candidate.path is not None
    try:
        runtime = open_runtime(candidate.path, threads=threads)
        found = _run_all(runtime, dataset, what=f"candidate {candidate.name}")
    except EdgekitError as e:
        candidate.status = "failed"
        candidate.error = str(e)
        candidate.reason = f"does not run: {e}"
        return
    candidate.validation = compare_outputs(reference, found, profile.accuracy)


def _static_fallback(
    candidate: CandidateReport,
    optimized: Path,
    reference: dict[str, list[Array]],
    context: PassContext,
) -> CandidateReport:
    """Retry static int8 with the worst nodes kept in float until it meets the tolerance."""
    if not _needs_fallback(candidate, context.profile) or candidate.path is None:
        return candidate
    try:
        ranked = rank_nodes_by_quantization_error(
            optimized, candidate.path, context.calibration.head_samples(32).feeds, context.workdir
        )
    except Exception as e:  # noqa: BLE001  (the debug tooling raises bare exceptions)
        candidate.notes.append(f"accuracy fallback unavailable: {e}")
        return candidate

    def rebuild(excluded: tuple[str, ...], label: str) -> CandidateReport:
        config = replace(_pass_config("static_int8", context.profile), nodes_to_exclude=excluded)
        return _build_candidate(
            "static_int8", optimized, context, static_config=config, label=label
        )

    return _accuracy_fallback(
        candidate, [name for name, _ in ranked], rebuild, reference, context, unit="node"
    )


def _tflite_fallback(
    candidate: CandidateReport,
    saved_model: Path,
    reference: dict[str, list[Array]],
    context: PassContext,
) -> CandidateReport:
    """Retry full int8 with the worst layers (quantization debugger) kept in float."""
    if not _needs_fallback(candidate, context.profile):
        return candidate
    try:
        ranked = rank_tflite_layers(
            saved_model, context, _tflite_config("full_int8", context.profile)
        )
    except Exception as e:  # noqa: BLE001  (the quantization debugger raises bare exceptions)
        candidate.notes.append(f"accuracy fallback unavailable: {first_line(e)}")
        return candidate

    def rebuild(float_layers: tuple[str, ...], label: str) -> CandidateReport:
        return _build_tflite_candidate(
            "full_int8", saved_model, context, float_layers=float_layers, label=label
        )

    best = _accuracy_fallback(
        candidate, [name for name, _ in ranked], rebuild, reference, context, unit="layer"
    )
    # The debugger's ranking: RMSE of each layer's int8 output in quantization steps.
    best.details["layer_errors"] = {name: round(error, 4) for name, error in ranked}
    return best


def _needs_fallback(candidate: CandidateReport, profile: Profile) -> bool:
    return (
        candidate.validation is not None
        and not candidate.validation.meets_tolerance
        and profile.quantization.fallback_attempts > 0
    )


def _accuracy_fallback(
    candidate: CandidateReport,
    ranked: Sequence[str],
    rebuild: Callable[[tuple[str, ...], str], CandidateReport],
    reference: dict[str, list[Array]],
    context: PassContext,
    *,
    unit: str,
) -> CandidateReport:
    """Rebuild with the worst-ranked nodes in float, more each attempt, until within tolerance.

    Keeps 10%, 25%, 62%... of `ranked` in float (at least one more each attempt), up to the
    profile's `fallback_attempts`; returns the most accurate build under the original's name.
    """
    profile = context.profile
    assert candidate.validation is not None
    if not ranked:
        candidate.notes.append(f"accuracy fallback: no per-{unit} errors to rank")
        return candidate
    history: list[dict[str, Any]] = [
        {
            f"float_{unit}s": 0,
            "worst_cosine": candidate.validation.worst_cosine,
            "meets_tolerance": False,
        }
    ]
    best = candidate
    for attempt in range(1, profile.quantization.fallback_attempts + 1):
        fraction = min(1.0, 0.1 * (2.5 ** (attempt - 1)))
        count = min(len(ranked), max(attempt, round(len(ranked) * fraction)))
        kept = tuple(ranked[:count])
        retry = rebuild(kept, f"{candidate.name}-fb{attempt}")
        if retry.status == "ok":
            _validate(retry, reference, context.validation, profile, context.threads)
        if retry.validation is None:
            history.append({f"float_{unit}s": len(kept), "error": retry.error})
            continue
        history.append(
            {
                f"float_{unit}s": len(kept),
                "worst_cosine": retry.validation.worst_cosine,
                "meets_tolerance": retry.validation.meets_tolerance,
            }
        )
        assert best.validation is not None
        if retry.validation.worst_cosine > best.validation.worst_cosine or (
            retry.validation.meets_tolerance and not best.validation.meets_tolerance
        ):
            best = retry
        if retry.validation.meets_tolerance or count == len(ranked):
            break
    best.name = candidate.name
    best.fallback = history
    best.notes.append(
        f"accuracy fallback: {len(best.float_nodes)} {unit}(s) kept in float"
        if best.float_nodes
        else f"accuracy fallback did not improve on plain {candidate.name}"
    )
    return best


def _benchmark(
    rows: Sequence[CandidateReport],
    dataset: Dataset,
    threads: int,
    workdir: Path,
    seconds: float,
) -> None:
    usable = {row.name: row for row in rows if row.status == "ok" and row.path is not None}
    if not usable:
        return
    paths = {name: row.path for name, row in usable.items() if row.path is not None}
    measurements = measure(
        paths,
        dataset.single_sample_feed(),
        threads=threads,
        workdir=workdir,
        seconds_per_model=seconds,
    )
    for name, row in usable.items():
        row.measurement = measurements[name]
        if row.size_bytes is None and row.path is not None:
            row.size_bytes = file_size(row.path)
            row.compressed_size_bytes = compressed_size(row.path)


def _choose(candidates: Sequence[CandidateReport], profile: Profile) -> CandidateReport:
    budgets = profile.budgets
    eligible: list[CandidateReport] = []
    for row in candidates:
        if not row.usable:
            row.reason = row.reason or f"failed: {row.error}"
            continue
        assert row.validation is not None and row.measurement is not None
        assert row.size_bytes is not None
        if not row.validation.meets_tolerance:
            row.reason = "misses the accuracy tolerance: " + "; ".join(row.validation.failures)
            continue
        if budgets.max_model_bytes is not None and row.size_bytes > budgets.max_model_bytes:
            row.reason = f"over the size budget: {row.size_bytes} > {budgets.max_model_bytes} bytes"
            continue
        if (
            budgets.max_ram_bytes is not None
            and row.measurement.peak_memory_bytes > budgets.max_ram_bytes
        ):
            row.reason = (
                f"over the RAM budget: {row.measurement.peak_memory_bytes} > "
                f"{budgets.max_ram_bytes} bytes"
            )
            continue
        eligible.append(row)
    if not eligible:
        detail = "; ".join(f"{row.name}: {row.reason}" for row in candidates)
        raise ConversionError(
            f"no candidate meets profile {profile.name}: {detail}; loosen the profile's accuracy "
            "tolerance or budgets, or give calibration data closer to real inputs"
        )

    def p50(row: CandidateReport) -> float:
        assert row.measurement is not None
        return row.measurement.p50_ms

    def accuracy(row: CandidateReport) -> float:
        assert row.validation is not None
        return row.validation.worst_cosine

    def size(row: CandidateReport) -> int:
        assert row.size_bytes is not None
        return row.size_bytes

    fastest = min(eligible, key=p50)
    assert fastest.measurement is not None
    # Two candidates whose medians differ by less than the run-to-run spread are equally fast.
    margin = max(0.03, min(0.10, max(row.measurement.noise for row in eligible if row.measurement)))
    if profile.priority == "size":
        winner = min(
            eligible, key=lambda row: (size(row), row.compressed_size_bytes or 0, p50(row))
        )
        why = "smallest file within tolerance and budgets (profile priority: size)"
    else:
        near = [row for row in eligible if p50(row) <= p50(fastest) * (1 + margin)]
        winner = min(
            near, key=lambda row: (size(row), -accuracy(row), row.compressed_size_bytes or 0)
        )
        why = (
            f"fastest within noise ({margin:.0%} of the fastest p50 {p50(fastest):.3f} ms) "
            "and, among those, the smallest file"
        )
    winner.verdict = "chosen"
    winner.reason = why
    for row in eligible:
        if row is winner:
            continue
        if profile.priority == "size":
            row.reason = f"larger: {size(row)} bytes vs {size(winner)}"
        elif p50(row) > p50(fastest) * (1 + margin):
            row.reason = (
                f"slower: p50 {p50(row):.3f} ms vs {p50(winner):.3f} ms "
                f"({p50(row) / p50(winner) - 1:+.0%})"
            )
        else:
            row.reason = (
                "as fast within noise but "
                f"{'larger' if size(row) > size(winner) else 'less accurate'}"
                f": {size(row)} bytes vs {size(winner)}, worst cosine {accuracy(row):.5f} vs "
                f"{accuracy(winner):.5f}"
            )
    return winner


def _copy_artifact(source: Path, dest: Path) -> None:
    """Copy a candidate to `dest`; an ONNX model with external data is saved again so that
    its tensors live in `<dest name>.data` and the model names that file (copying the bytes
    would leave it pointing at the candidate's data file)."""
    if source.suffix != ".onnx":
        shutil.copyfile(source, dest)
        return
    import onnx
    from onnx.external_data_helper import uses_external_data

    header = onnx.load(str(source), load_external_data=False)
    if not any(uses_external_data(tensor) for tensor in header.graph.initializer):
        shutil.copyfile(source, dest)
        return
    try:
        model = onnx.load(str(source))  # with its external data, found beside it
        dest.with_name(dest.name + ".data").unlink(missing_ok=True)  # onnx refuses to overwrite
        # onnx looks for an existing data file relative to the working directory (which may
        # be the scratch folder holding the candidate's own `<name>.data`).
        with contextlib.chdir(dest.parent):
            onnx.save_model(
                model,
                str(dest),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=dest.name + ".data",
                size_threshold=0,
            )
    except (OSError, ValueError, onnx.checker.ValidationError) as e:
        raise ConversionError(f"cannot write {dest} with its external data: {e}") from e


def _device_refusal(
    candidate: CandidateReport, check: DeviceCheck, dataset: Dataset, profile: Profile
) -> str | None:
    """Run `check` on the candidate laid out as the device will see it."""
    assert candidate.path is not None
    with tempfile.TemporaryDirectory(prefix="edgekit-device-check-") as folder:
        model = Path(folder) / f"model.{profile.target_format}"
        _copy_artifact(candidate.path, model)
        golden = Path(folder) / "golden.npz"
        _write_golden(golden, open_runtime(model), dataset, profile)
        return check(model, golden)


def _write_golden(path: Path, runtime: Runtime, dataset: Dataset, profile: Profile) -> None:
    """Inputs and the chosen artifact's own outputs, for the agent's health check.

    Both in the artifact's own dtypes (int8/uint8 for a model with quantized I/O), keyed by
    its input and output names; each quantized tensor's [scale, zero_point] is stored as
    `quantization/inputs/<name>` or `quantization/outputs/<name>` (real = scale * (q - zp)).
    """
    arrays: dict[str, Array] = {}
    for index, real_feed in enumerate(dataset.feeds[:GOLDEN_SAMPLES]):
        feed = _model_feed(runtime, real_feed)
        for name, value in feed.items():
            arrays[f"inputs/{index}/{name}"] = value
        for name, value in runtime.run(feed).items():
            arrays[f"outputs/{index}/{name}"] = value
    for side, specs in (("inputs", runtime.inputs), ("outputs", runtime.outputs)):
        for spec in specs:
            if spec.quantization is not None:
                scale, zero_point = spec.quantization
                arrays[f"quantization/{side}/{spec.name}"] = np.array(
                    [scale, zero_point], dtype=np.float64
                )
    arrays["tolerance"] = np.array(json.dumps(profile.health_check.to_dict()))
    with path.open("wb") as handle:
        np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]


def reference_stats(dataset: Dataset, inputs: Sequence[TensorSpec]) -> dict[str, Any]:
    """Per input: decile bin edges and the share of values in each bin (for PSI drift)."""
    stats: dict[str, Any] = {"schema": "edgekit.reference_stats/v1", "inputs": {}}
    for spec in inputs:
        values = np.concatenate(
            [np.asarray(feed[spec.name], dtype=np.float64).ravel() for feed in dataset.feeds]
        )
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            continue
        edges = np.unique(np.quantile(finite, np.linspace(0, 1, 11)))
        counts, _ = np.histogram(finite, bins=edges) if edges.size > 1 else (np.array([1]), None)
        stats["inputs"][spec.name] = {
            "dtype": spec.dtype,
            "bin_edges": [float(edge) for edge in edges],
            "bin_fractions": [float(c) for c in counts / max(1, counts.sum())],
            "mean": float(finite.mean()),
            "std": float(finite.std()),
            "samples": dataset.samples,
            "source": dataset.kind,
        }
    return stats


def _sha256(path: Path) -> str:
    if path.is_dir():  # a SavedModel: its graph and weights
        digest = hashlib.sha256()
        for part in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(part.relative_to(path).as_posix().encode() + b"\0")
            digest.update(hash_file(part)[1].encode())
        return digest.hexdigest()
    return hash_file(path)[1]


def _source_size(path: Path) -> int:
    if path.is_dir():
        return sum(part.stat().st_size for part in path.rglob("*") if part.is_file())
    return file_size(path)


def _host_engines(profile: Profile, artifact_runtime: Runtime) -> dict[str, str]:
    engines = {artifact_runtime.engine: artifact_runtime.version}
    if profile.target_format == "tflite":
        import tensorflow

        engines["tensorflow"] = str(tensorflow.__version__)
    return engines


def _report(
    *,
    model: Path,
    profile: Profile,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    load_result: PassResult,
    optimize_result: PassResult,
    calibration_set: Dataset,
    validation_set: Dataset,
    source_row: CandidateReport,
    candidates: Sequence[CandidateReport],
    winner: CandidateReport,
    artifact: Path,
    artifact_runtime: Runtime,
    threads: int,
) -> dict[str, Any]:
    validated = validation_set.kind == "file"
    fp32 = next((row for row in candidates if row.name == "fp32" and row.usable), None)
    summary: dict[str, Any] = {}
    if fp32 and fp32.measurement and winner.measurement and fp32.size_bytes and winner.size_bytes:
        summary = {
            "speedup_vs_fp32": fp32.measurement.p50_ms / winner.measurement.p50_ms,
            "size_ratio_vs_fp32": winner.size_bytes / fp32.size_bytes,
        }
    return {
        "schema": REPORT_SCHEMA,
        "edgekit_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "path": str(model),
            "sha256": _sha256(model),
            "size_bytes": _source_size(model),
            **load_result.details,
            "signature": {
                "inputs": [spec.to_dict() for spec in inputs],
                "outputs": [spec.to_dict() for spec in outputs],
            },
            "notes": list(load_result.notes),
        },
        "profile": profile.name,
        "profile_source": profile.source,
        "runtime": {
            "format": profile.target_format,
            "oldest": {
                "package": profile.runtime.oldest.package,
                "version": profile.runtime.oldest.version,
            },
            "newest": {
                "package": profile.runtime.newest.package,
                "version": profile.runtime.newest.version,
            },
        },
        "host": {
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": threads,
            **_host_engines(profile, artifact_runtime),
            "note": "latency and memory are measured on this host, not on the device",
        },
        # The artifact's own I/O (dtype, shape, quantization): the bundle manifest's signature.
        "signature": {
            "inputs": [spec.to_dict() for spec in artifact_runtime.inputs],
            "outputs": [spec.to_dict() for spec in artifact_runtime.outputs],
        },
        "data": {
            "calibration": calibration_set.describe(),
            "validation": validation_set.describe(),
            "accuracy": "validated" if validated else "unvalidated",
        },
        "tolerance": profile.to_dict()["accuracy"],
        "optimize": optimize_result.details,
        "original": source_row.to_dict(),
        "candidates": [row.to_dict() for row in candidates],
        "chosen": winner.name,
        "summary": summary,
        "artifact": {
            "path": artifact.name,
            "sha256": _sha256(artifact),
            "size_bytes": file_size(artifact),
            "compressed_size_bytes": winner.compressed_size_bytes,
            "inputs": [spec.to_dict() for spec in artifact_runtime.inputs],
            "outputs": [spec.to_dict() for spec in artifact_runtime.outputs],
            **winner.details.get("compat", {}),
            **(
                {"op_versions": winner.details["op_versions"]}
                if "op_versions" in winner.details
                else {}
            ),
        },
    }
