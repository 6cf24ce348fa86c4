"""`convert`: source -> candidates -> validate -> [fallback] -> benchmark -> choose -> outputs.

Orchestration only. The pieces live beside it:

- `sources`: read the ONNX/Keras/SavedModel source, the reference runtime;
- `candidates`: each candidate kind as a recipe of registered passes, and the builder;
- `edgekit.accuracy`: accuracy per output kind, with the sample-size-aware decision rules;
- `fallback`: the fewest tensors kept in float that meet the tolerance;
- `benchmark` and `choice`: paired latency measurements and the stated decision rule;
- `outputs`: artifact, golden samples, reference statistics, report, atomic publish.

Everything is built in a scratch folder; the output folder receives its files only once the
conversion has succeeded, so a failed run leaves nothing half-written behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy.typing as npt
from edgekit.converters import outputs
from edgekit.converters.candidates import (
    CandidateReport,
    Recipe,
    build_candidate,
    order_key,
    recipes_for,
)
from edgekit.converters.choice import choose
from edgekit.converters.data import Dataset, prepare_datasets
from edgekit.converters.fallback import FALLBACK_KINDS, rank_float_candidates, search_float_set
from edgekit.converters.latency import DeviceLatency, HostLatency
from edgekit.converters.layout import LayoutMap
from edgekit.converters.passes.base import PassContext, PassResult, Step
from edgekit.converters.passes.onnx_passes import scratch_cwd
from edgekit.converters.passes.tflite_passes import (
    LITERT_QUANTIZER_RECIPES,
    SourceKind,
    litert_quantizer_available,
    source_kind,
)
from edgekit.converters.sources import (
    LoadedSource,
    datasets_to_artifact,
    from_litert_torch,
    load_source,
    to_saved_model,
)

from edgekit.accuracy import OUTPUT_KINDS, compare_outputs
from edgekit.errors import ConversionError, EdgekitError, InputDataError, first_line
from edgekit.messages import Measurements, MessageError
from edgekit.profiles import OutputKind, Profile, load_profile
from edgekit.quiet import quiet_native_output
from edgekit.runtimes import Runtime, dequantize_output, model_feed, open_runtime

if TYPE_CHECKING:
    from edgekit.converters.frontends.torch_frontend import TorchProgram

__all__ = ["CandidateReport", "ConvertResult", "ProgressCallback", "convert"]

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]
ProgressCallback = Callable[[str, int, int], None]
DeviceCheck = Callable[[Path, Path], "str | None"]
DeviceBench = Callable[[Mapping[str, Path]], Measurements]
"""(file name -> path of each candidate and reference.npz) -> the device's measurements."""
"""(model, golden.npz) -> None when the profile's runtimes load and match it, else why not."""


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


@quiet_native_output
def convert(
    model: Path | Any,
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
    output_kinds: Mapping[str, OutputKind] | None = None,
    measurements: Measurements | Path | None = None,
    device_bench: DeviceBench | None = None,
    example_inputs: Sequence[Any] | None = None,
    output_names: Sequence[str] | None = None,
) -> ConvertResult:
    """Convert `model` for `profile`, writing `model.onnx` or `model.tflite` and `report.json`.

    `model` is an ONNX file, a Keras `.keras` file, a TensorFlow SavedModel folder, a PyTorch
    `.pt2` file (`torch.export.save`) or a `torch.nn.Module` with `example_inputs` (one example
    per `forward()` argument; `output_names` names its outputs, default `output_0`, ...).
    PyTorch models are exported to ONNX with the dynamo exporter and judged against PyTorch's
    own outputs. ONNX (given or exported) for a TFLite profile goes through onnx2tf in its own
    cached venv; the input layout it gives the artifact (NCHW -> NHWC) is in the report's
    `layout` and golden.npz holds samples in that layout. Also
    written into `output_dir`: `golden.npz` (inputs and expected outputs for the on-device
    self-test) and `reference_stats.json` (input distribution for drift), which bundles carry.
    With `keep_candidates`, every candidate that was built is kept in `output_dir/candidates/`.
    `output_kinds` names how outputs are judged (classifier, map, regression, state) where the
    profile's `accuracy.output_kinds` and the guess are not what you want. `measurements` (what
    `edgekit-agent bench` measured on the device, or its file) replaces this host's latency and
    memory: candidates are matched by sha256, and one the device did not measure, or measured
    outside the tolerance, is not eligible. `device_bench(files)` measures on a device now
    (`edgekit.fleet.bench.bench_on_device`): it gets every built candidate and `reference.npz`
    by file name and returns the device's measurements, used as `measurements` are.

    `device_check(model, golden)` proves a candidate on the device's runtimes (see
    `edgekit.verify_runtime`): it gets the candidate as `model.onnx`/`model.tflite` with its
    own `golden.npz` beside it and returns None when every runtime loads it and matches, or the
    reason it does not. The choice then goes down the ranking until a candidate passes.
    """
    chosen_profile = profile if isinstance(profile, Profile) else load_profile(profile)
    source, kind, named = _source(model, example_inputs=example_inputs, output_names=output_names)
    # Absolute paths: the passes run with the scratch folder as the working directory.
    output_dir = output_dir.absolute()
    calibration = calibration.absolute() if calibration else None
    validation = validation.absolute() if validation else None
    outputs.check_output_dir(output_dir)
    device = _read_measurements(measurements)
    host_threads = os.cpu_count() or 1
    used_threads = threads or min(chosen_profile.threads, host_threads)
    recipes = _recipes(chosen_profile, verified=device_check is not None)
    through_onnx2tf = chosen_profile.target_format == "tflite" and kind in ("onnx", "torch")
    steps = _Steps(progress, total=6 + len(recipes) + (device_bench is not None) + through_onnx2tf)
    with (
        tempfile.TemporaryDirectory(prefix="edgekit-convert-") as scratch,
        scratch_cwd(Path(scratch)),
    ):
        workdir = Path(scratch)
        steps.advance("loading and checking the model")
        context = PassContext(profile=chosen_profile, workdir=workdir, threads=used_threads)
        loaded = load_source(source, kind, context)
        steps.advance("reading calibration and validation data")
        calibration_set, validation_set, data_notes = prepare_datasets(
            loaded.original.inputs,
            calibration,
            validation,
            preprocessing=chosen_profile.preprocessing,
        )
        if loaded.needs_onnx2tf:
            steps.advance(f"converting to TensorFlow with onnx2tf ({', '.join(loaded.route)})")
            try:
                loaded = to_saved_model(
                    loaded,
                    replace(context, validation=validation_set, progress=_log_progress),
                    name=str(named),
                )
            except ConversionError as refused:
                # PyTorch has a second route: litert-torch (re-raises for an ONNX source).
                loaded = from_litert_torch(loaded, context, refused=refused)
                recipes = _recipes(
                    chosen_profile, verified=device_check is not None, float_tflite=True
                )
            calibration_set, validation_set = datasets_to_artifact(
                loaded, calibration_set, validation_set
            )
        inputs = loaded.original.inputs
        context = replace(context, calibration=calibration_set, validation=validation_set)
        kinds = _output_kinds(chosen_profile, output_kinds, loaded.original)
        judge = _Judge(
            reference=_run_all(loaded.original, validation_set, what="the original model"),
            dataset=validation_set,
            profile=chosen_profile,
            threads=used_threads,
            kinds=kinds,
            input_shapes={spec.name: _concrete(spec.shape) for spec in inputs},
        )

        steps.advance("optimizing the graph")
        prepared, optimize_result = _prepare(loaded, context)
        context = replace(context, reference_path=prepared)

        candidates: list[CandidateReport] = []
        for recipe, skip in recipes:
            if skip is not None:
                if candidates and candidates[-1].name == recipe.name.removesuffix("_aeq"):
                    candidates[-1].notes.append(skip)
                elif loaded.float_tflite:  # no TFLiteConverter twin: a row says why not
                    row = CandidateReport(name=recipe.name, passes=())
                    reason = skip.split(": only TFLiteConverter", 1)[0]
                    row.fail(reason, reason=f"not built: {reason}")
                    candidates.append(row)
                continue
            steps.advance(f"building candidate {recipe.name}")
            candidates.append(_candidate(_isolate(recipe, loaded), prepared, context, judge))
        _refuse_if_all_blocked(candidates, chosen_profile)

        if device_bench is not None:
            steps.advance("measuring the candidates on the device")
            device = device_bench(_bench_files(candidates, judge, workdir))
        steps.advance(
            f"applying the measurements of {device.source}"
            if device is not None
            else "benchmarking candidates on this host"
        )
        source_row = CandidateReport(
            name="original", passes=(), path=loaded.runnable, verdict="reference"
        )
        source_row.validation = judge.compare(judge.reference)
        if loaded.runnable is None:
            source_row.notes.append(
                f"the source runs in {loaded.original.engine} {loaded.original.version}, not on "
                "the device runtime: its outputs are the reference, its latency is not measured"
            )
        latency: HostLatency | DeviceLatency
        if device is not None:
            latency = DeviceLatency(device, profile=chosen_profile)
            latency.apply(candidates)
        else:
            latency = HostLatency(
                validation_set.single_sample_feed(),
                threads=used_threads,
                workdir=workdir,
                seconds=benchmark_seconds,
                profile=chosen_profile,
            )
            latency.measure([source_row, *candidates])

        steps.advance("choosing")
        note = latency.note()
        winner = choose(candidates, chosen_profile, latency.compare, latency_note=note)
        while device_check is not None:
            refusal = _device_refusal(
                winner, device_check, validation_set, chosen_profile, loaded.layout
            )
            if refusal is None:
                winner.notes.append("verified on the profile's runtimes (device_check)")
                break
            winner.fail(f"fails on the profile's runtimes: {refusal}")
            winner.verdict = "lost"
            for row in candidates:
                row.reason = "" if row.status == "ok" else row.reason
                row.comparison = {}
            winner = choose(candidates, chosen_profile, latency.compare, latency_note=note)

        steps.advance("writing the artifact, golden samples and report")
        report = _write_outputs(
            model=named,
            output_dir=output_dir,
            profile=chosen_profile,
            loaded=loaded,
            optimize_result=optimize_result,
            calibration_set=calibration_set,
            validation_set=validation_set,
            data_notes=data_notes,
            source_row=source_row,
            candidates=candidates,
            winner=winner,
            threads=used_threads,
            keep_candidates=keep_candidates,
            decision={**_decision_rule(chosen_profile), **latency.decision()},
            reference=judge.reference,
        )
    return ConvertResult(
        artifact=output_dir / f"model.{chosen_profile.target_format}",
        report_path=output_dir / "report.json",
        report=report,
        chosen=winner.name,
    )


def _source(
    model: Path | Any,
    *,
    example_inputs: Sequence[Any] | None,
    output_names: Sequence[str] | None,
) -> tuple[Path | TorchProgram, SourceKind, Path | str]:
    """What `load_source` reads, its kind, and how the report names it (a path, or the
    module's description for an nn.Module)."""
    if not isinstance(model, (str, Path)):
        from edgekit.converters.frontends.torch_frontend import export_module

        if example_inputs is None:
            raise ConversionError(
                f"convert got a {type(model).__name__}, not a path: give an nn.Module with "
                "example_inputs=[one example per forward() argument], or a model file's path"
            )
        program = export_module(model, example_inputs, output_names=output_names)
        return program, "torch", program.source
    path = Path(model).absolute()
    if example_inputs is not None:
        raise ConversionError(
            f"{path}: example_inputs are for an nn.Module; a model file carries its own"
        )
    kind = source_kind(path)
    if output_names is not None and kind != "torch":
        raise ConversionError(
            f"{path}: output_names are for a PyTorch model; this {kind} model names its own"
        )
    if kind == "torch":
        from edgekit.converters.frontends.torch_frontend import load_pt2

        return load_pt2(path, output_names=output_names), kind, path
    return path, kind, path


def _isolate(recipe: Recipe, loaded: LoadedSource) -> Recipe:
    """Full int8 from an onnx2tf SavedModel calibrates in a child process: TFLiteConverter's
    calibrator was measured crashing the process on one (a PyTorch GRU's)."""
    if loaded.layout is None or recipe.name != "full_int8":
        return recipe
    return recipe.with_option("tflite_convert", isolated=True)


def _log_progress(message: str) -> None:
    log.info("%s", message)


def _read_measurements(given: Measurements | Path | None) -> Measurements | None:
    if given is None or isinstance(given, Measurements):
        return given
    try:
        payload = given.read_bytes()
    except OSError as e:
        raise InputDataError(f"cannot read measurements {given}: {e}") from e
    try:
        return Measurements.from_json(payload)
    except MessageError as e:
        raise InputDataError(
            f"{given}: not measurements written by `edgekit-agent bench`: {e}"
        ) from e


def _decision_rule(profile: Profile) -> dict[str, Any]:
    return {
        "rule": (
            "eligible = within tolerance and budgets; preference = smaller file, more "
            "accurate, smaller zstd, fixed candidate order; a less preferred candidate wins "
            "only when its latency ratio's confidence interval lies below 1 - min_speedup"
            if profile.priority == "latency"
            else "eligible = within tolerance and budgets; the smallest file wins"
        ),
        "min_speedup": profile.quantization.min_speedup,
        "confidence": 0.95,
    }


def _recipes(
    profile: Profile, *, verified: bool, float_tflite: bool = False
) -> list[tuple[Recipe, str | None]]:
    """Every recipe of the profile's candidate list, each with the reason it is skipped (or
    None); an unknown kind for the format becomes a failed row, not an error. `float_tflite`:
    the candidates start from litert-torch's float32 .tflite."""
    found: list[tuple[Recipe, str | None]] = []
    for kind in profile.quantization.candidates:
        try:
            recipes = recipes_for(kind, profile.target_format, float_tflite=float_tflite)
        except ConversionError as e:
            found.append((Recipe(name=kind, target=profile.target_format, steps=()), str(e)))
            continue
        for recipe in recipes:
            skip = None
            if recipe.name.endswith("_aeq"):
                skip = _litert_quantizer_skip_reason(
                    recipe.name.removesuffix("_aeq"), profile, verified=verified
                )
            found.append((recipe, skip))
    return found


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


def _concrete(shape: Sequence[Any]) -> tuple[int, ...]:
    return tuple(dim if isinstance(dim, int) else -1 for dim in shape)


def _output_kinds(
    profile: Profile, given: Mapping[str, OutputKind] | None, original: Runtime
) -> dict[str, OutputKind]:
    names = {spec.name for spec in original.outputs}
    kinds: dict[str, OutputKind] = {**profile.accuracy.output_kinds, **(given or {})}
    for name, kind in kinds.items():
        if name not in names:
            raise InputDataError(
                f"output kind given for {name!r}, which the model does not have; its outputs "
                f"are {', '.join(sorted(names))}"
            )
        if kind not in OUTPUT_KINDS:
            raise InputDataError(
                f"output kind {kind!r} for {name!r}: expected one of {', '.join(OUTPUT_KINDS)}"
            )
    return kinds


@dataclass(frozen=True)
class _Judge:
    """Runs a candidate on the validation data and compares it with the reference."""

    reference: dict[str, list[Array]]
    dataset: Dataset
    profile: Profile
    threads: int
    kinds: Mapping[str, OutputKind]
    input_shapes: Mapping[str, tuple[int, ...]]

    def compare(self, found: Mapping[str, Sequence[Array]]) -> Any:
        return compare_outputs(
            self.reference,
            found,
            self.profile.accuracy,
            kinds=self.kinds,
            rule="statistical",
            input_shapes=self.input_shapes,
        )

    def validate(self, candidate: CandidateReport) -> None:
        assert candidate.path is not None
        try:
            runtime = open_runtime(candidate.path, threads=self.threads)
            found = _run_all(runtime, self.dataset, what=f"candidate {candidate.name}")
        except EdgekitError as e:
            candidate.fail(str(e), reason=f"does not run: {e}")
            return
        candidate.validation = self.compare(found)


def _prepare(loaded: LoadedSource, context: PassContext) -> tuple[Path, PassResult]:
    """The model every candidate is built from: the optimized graph (ONNX) or the SavedModel."""
    if context.profile.target_format != "onnx":
        return loaded.path, PassResult(
            details={"skipped": "TFLiteConverter optimizes the graph while converting"}
        )
    optimized = context.workdir / "optimized.onnx"
    result = Step.of("optimize").build(context.profile).run(loaded.path, optimized, context)
    return optimized, result


def _candidate(
    recipe: Recipe, prepared: Path, context: PassContext, judge: _Judge
) -> CandidateReport:
    """Build and validate one candidate; search for a float set when it misses the tolerance."""
    if not recipe.steps:  # a kind the format does not build (see _recipes)
        candidate = CandidateReport(name=recipe.name, passes=())
        candidate.fail(f"{recipe.name} is not built for {recipe.target} profiles")
        return candidate
    candidate = build_candidate(recipe, prepared, context)
    if candidate.status != "ok":
        return candidate
    judge.validate(candidate)
    if (
        candidate.validation is None
        or candidate.validation.meets_tolerance
        or recipe.name not in FALLBACK_KINDS
    ):
        return candidate
    try:
        ranking = rank_float_candidates(candidate, prepared, context)
    except Exception as e:  # noqa: BLE001  (the debug tooling raises bare exceptions)
        candidate.notes.append(f"accuracy fallback unavailable: {first_line(e)}")
        return candidate

    def evaluate(attempt: Recipe, label: str) -> CandidateReport:
        trial = build_candidate(attempt, prepared, context, label=label)
        if trial.status == "ok":
            judge.validate(trial)
        return trial

    return search_float_set(
        candidate,
        recipe,
        ranking,
        evaluate,
        max_builds=context.profile.quantization.fallback_attempts,
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


def _run_all(runtime: Runtime, dataset: Dataset, *, what: str) -> dict[str, list[Array]]:
    """Every output for every feed, as real values (quantized I/O converted both ways)."""
    results: dict[str, list[Array]] = {spec.name: [] for spec in runtime.outputs}
    output_specs = {spec.name: spec for spec in runtime.outputs}
    for index, feed in enumerate(dataset.feeds):
        try:
            raw = runtime.run(model_feed(runtime, feed))
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


def _bench_files(
    candidates: Sequence[CandidateReport],
    judge: _Judge,
    workdir: Path,
) -> dict[str, Path]:
    """Every built candidate and the reference outputs, by the file names a device sees."""
    reference = workdir / "bench-reference.npz"
    kinds = {
        metric.name: metric.kind
        for row in candidates
        if row.validation is not None
        for metric in row.validation.outputs
    }
    outputs.write_reference(reference, judge.dataset, judge.reference, judge.profile, kinds=kinds)
    files = {
        f"{row.name}{row.path.suffix}": row.path
        for row in candidates
        if row.status == "ok" and row.path is not None
    }
    return {**files, "reference.npz": reference}


def _row_kinds(row: CandidateReport) -> dict[str, str]:
    """The output kinds the winner was judged by (given or guessed), for the device bench."""
    if row.validation is None:
        return {}
    return {metric.name: metric.kind for metric in row.validation.outputs}


def _device_refusal(
    candidate: CandidateReport,
    check: DeviceCheck,
    dataset: Dataset,
    profile: Profile,
    layout: LayoutMap | None,
) -> str | None:
    """Run `check` on the candidate laid out as the device will see it."""
    assert candidate.path is not None
    with tempfile.TemporaryDirectory(prefix="edgekit-device-check-") as folder:
        model = Path(folder) / f"model.{profile.target_format}"
        outputs.copy_artifact(candidate.path, model)
        golden = Path(folder) / "golden.npz"
        outputs.write_golden(golden, open_runtime(model), dataset, profile, layout=layout)
        return check(model, golden)


def _write_outputs(
    *,
    model: Path | str,
    output_dir: Path,
    profile: Profile,
    loaded: LoadedSource,
    optimize_result: PassResult,
    calibration_set: Dataset,
    validation_set: Dataset,
    data_notes: Sequence[str],
    source_row: CandidateReport,
    candidates: Sequence[CandidateReport],
    winner: CandidateReport,
    threads: int,
    keep_candidates: bool,
    decision: dict[str, Any],
    reference: Mapping[str, Sequence[Array]],
) -> dict[str, Any]:
    import json

    assert winner.path is not None
    artifact_name = f"model.{profile.target_format}"
    staging = Path(
        tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=outputs.staging_parent(output_dir))
    )
    try:
        artifact = staging / artifact_name
        outputs.copy_artifact(winner.path, artifact)
        if keep_candidates:
            kept = staging / "candidates"
            kept.mkdir()
            for row in candidates:
                if row.path is not None and row.status == "ok":
                    outputs.copy_artifact(row.path, kept / f"{row.name}{row.path.suffix}")
            outputs.write_reference(
                kept / "reference.npz", validation_set, reference, profile, kinds=_row_kinds(winner)
            )
        chosen_runtime = open_runtime(artifact, threads=threads)
        outputs.write_golden(
            staging / "golden.npz", chosen_runtime, validation_set, profile, layout=loaded.layout
        )
        device_data = replace(
            validation_set,
            feeds=tuple(model_feed(chosen_runtime, feed) for feed in validation_set.feeds),
        )
        stats = outputs.reference_stats(device_data, chosen_runtime.inputs)
        (staging / "reference_stats.json").write_text(
            json.dumps(stats, indent=2) + "\n", encoding="utf-8"
        )
        warnings = [
            *dict.fromkeys(
                warning
                for row in [winner]
                if row.validation is not None
                for warning in row.validation.warnings
            )
        ]
        report = outputs.build_report(
            model=model,
            profile=profile,
            inputs=loaded.signature[0],
            outputs=loaded.signature[1],
            load_result=loaded.result,
            route=loaded.route,
            layout=loaded.layout,
            optimize_result=optimize_result,
            calibration_set=calibration_set,
            validation_set=validation_set,
            data_notes=data_notes,
            source_row=source_row,
            candidates=sorted(candidates, key=lambda row: order_key(row.name)),
            winner=winner,
            decision=decision,
            warnings=warnings,
            artifact=artifact,
            artifact_runtime=chosen_runtime,
            threads=threads,
        )
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        outputs.publish(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report
