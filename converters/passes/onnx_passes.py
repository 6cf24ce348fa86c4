"""The ONNX passes: load, canonicalize, optimize, weight-only int8, pruning, dynamic/static int8,
fp16 and compat.

Every model an ONNX pass writes is canonical (`edgekit.converters.onnx_graph.canonicalize`):
weights are initializers, nodes are named and topologically sorted, so the next pass sees the
same graph whichever tools ran before it, and the same inputs give the same bytes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from edgekit.converters.compat import onnx_limits_for_onnxruntime
from edgekit.converters.onnx_graph import (
    all_graphs,
    canonicalize,
    opset_version,
    weight_tensors,
)
from edgekit.converters.passes.base import Pass, PassContext, PassResult, configure

from edgekit.errors import ConversionError, first_line
from edgekit.profiles import Profile
from edgekit.quiet import disable_onnxruntime_telemetry

if TYPE_CHECKING:
    import onnx

__all__ = [
    "CanonicalizePass",
    "CompatPass",
    "DynamicInt8Pass",
    "Fp16Pass",
    "LoadPass",
    "OptimizePass",
    "PrunePass",
    "StaticInt8Pass",
    "WeightInt8Pass",
    "load_model",
    "rank_nodes_by_quantization_error",
    "rank_weights_by_error",
    "save_model",
    "scratch_cwd",
]

log = logging.getLogger(__name__)

Feed = Mapping[str, npt.NDArray[Any]]

# protobuf cannot serialize a message over 2 GiB: bigger models keep their weights outside.
_PROTOBUF_LIMIT_BYTES = 2**31 - 1
_EXTERNAL_DATA_THRESHOLD_BYTES = 1800 * 2**20
# Per-channel DequantizeLinear (the `axis` attribute) needs opset 13.
_PER_CHANNEL_MIN_OPSET = 13


def load_model(path: Path, *, what: str = "model") -> onnx.ModelProto:
    """Read an ONNX file (with its external data) or raise a `ConversionError` saying why."""
    import onnx
    from google.protobuf.message import DecodeError

    if not path.exists():
        raise ConversionError(f"{what} file {path} does not exist; check the path")
    if path.is_dir():
        raise ConversionError(f"{what} {path} is a folder; expected an .onnx file")
    if path.stat().st_size == 0:
        raise ConversionError(f"{what} file {path} is empty; expected an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except DecodeError as e:
        raise ConversionError(
            f"{path} is not an ONNX model or is truncated (protobuf: {e}); re-export it"
        ) from e
    except (OSError, ValueError, RuntimeError) as e:
        raise ConversionError(
            f"cannot read {path}: {e}; if the model keeps its weights in external data files, "
            "keep them beside it under the names the model records"
        ) from e
    if not model.graph.node or not model.opset_import:
        raise ConversionError(
            f"{path} is not an ONNX model (no graph nodes or no opset); re-export it as ONNX"
        )
    return model


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Canonicalize and write a model; one over the protobuf limit keeps its weights in
    `<name>.data` beside it."""
    import onnx

    canonicalize(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = model.ByteSize()
    if size > _EXTERNAL_DATA_THRESHOLD_BYTES:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


def _canonicalize_file(path: Path) -> None:
    """Rewrite a model another tool wrote (onnxruntime's quantizers) in canonical form."""
    model = load_model(path)
    path.with_name(path.name + ".data").unlink(missing_ok=True)
    save_model(model, path)


@contextlib.contextmanager
def scratch_cwd(workdir: Path) -> Iterator[None]:
    """Run onnxruntime's quantization tools inside the scratch folder.

    They drop temporary files (`sym_shape_infer_temp.onnx`, `<uuid>.data`) into the current
    directory, which would otherwise be the user's.
    """
    previous = Path.cwd()
    os.chdir(workdir)
    try:
        yield
    finally:
        os.chdir(previous)


def _check(model_path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(model_path))
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise ConversionError(
            f"{model_path.name}: the ONNX checker refuses the model: {first}"
        ) from e


def _node_count(model: onnx.ModelProto) -> int:
    return sum(len(graph.node) for graph in all_graphs(model.graph))


@dataclass(frozen=True)
class LoadConfig:
    """Shape inference can be skipped for models it cannot handle."""

    infer_shapes: bool = True


class LoadPass(Pass):
    """Read, check (ONNX checker), canonicalize and shape-infer the source model."""

    name = "load"

    def __init__(self, config: LoadConfig | None = None) -> None:
        self.config = config or LoadConfig()

    @classmethod
    def config_for(cls, profile: Profile, **options: Any) -> LoadConfig:
        return configure(LoadConfig(), options, cls.name)

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        import onnx

        model = load_model(source)
        notes = []
        _check(source)
        details: dict[str, Any] = {
            "ir_version": model.ir_version,
            "opsets": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
            "nodes": len(model.graph.node),
            "producer": f"{model.producer_name} {model.producer_version}".strip(),
        }
        changes = canonicalize(model)
        if changes["constants"]:
            notes.append(
                f"{changes['constants']} Constant node(s) turned into initializers, so every "
                "pass sees the model's weights"
            )
        details["canonical"] = changes
        if self.config.infer_shapes:
            try:
                model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
            except (onnx.shape_inference.InferenceError, RuntimeError, ValueError) as e:
                notes.append(f"shape inference failed, continuing without it: {first_line(e)}")
        save_model(model, destination)
        return PassResult(notes=tuple(notes), details=details)


class CanonicalizePass(Pass):
    """The canonical form alone (see `edgekit.converters.onnx_graph`)."""

    name = "canonicalize"

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        model = load_model(source)
        changes = canonicalize(model)
        save_model(model, destination)
        return PassResult(details=changes)


@dataclass(frozen=True)
class OptimizeConfig:
    """`auto` tries onnxslim and onnxruntime's basic offline optimization (see OptimizePass)."""

    method: str = "auto"  # auto | onnxslim | ort | none


# The fixed order that breaks ties between optimizers (first wins).
_OPTIMIZER_ORDER = ("onnxslim", "ort", "none")


class OptimizePass(Pass):
    """Graph simplification that stays portable (no hardware-specific layouts or fused kernels).

    `auto` runs both optimizers, drops any whose outputs differ from the source's, and keeps
    the graph with the fewest nodes (ties: onnxslim, then onnxruntime, then the model as
    loaded). The rule is structural on purpose: timing the variants decided on 3-6%
    differences that flipped under load, and the device's runtime optimizes the graph again
    when it loads it; what this step buys is a smaller, simpler graph for the quantizers.
    """

    name = "optimize"

    def __init__(self, config: OptimizeConfig | None = None) -> None:
        self.config = config or OptimizeConfig()

    @classmethod
    def config_for(cls, profile: Profile, **options: Any) -> OptimizeConfig:
        return configure(OptimizeConfig(), options, cls.name)

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        methods = ["onnxslim", "ort"] if self.config.method == "auto" else [self.config.method]
        source_model = load_model(source)
        outcomes: dict[str, Any] = {"none": {"nodes": _node_count(source_model)}}
        choices: list[tuple[int, int, str, Path]] = [
            (_node_count(source_model), _OPTIMIZER_ORDER.index("none"), "none", source)
        ]
        if methods == ["none"]:
            shutil.copyfile(source, destination)
            return PassResult(details={"method": "none", "measured": outcomes})
        feed = context.validation.single_sample_feed() if context.validation else None
        for method in methods:
            out = context.workdir / f"optimized-{method}.onnx"
            try:
                if method == "onnxslim":
                    _optimize_onnxslim(source, out)
                elif method == "ort":
                    _optimize_ort_basic(source, out)
                else:
                    raise ConversionError(f"unknown optimize method {method!r}")
                _check(out)
            except ConversionError as e:
                outcomes[method] = {"error": str(e)}
                continue
            if feed is not None and not _same_outputs(source, out, feed):
                outcomes[method] = {"error": "outputs differ from the source model"}
                continue
            nodes = _node_count(load_model(out))
            outcomes[method] = {"nodes": nodes}
            choices.append((nodes, _OPTIMIZER_ORDER.index(method), method, out))
        if self.config.method != "auto":
            choices = [choice for choice in choices if choice[2] == self.config.method] or choices
        _, _, method, path = min(choices)
        shutil.copyfile(path, destination)
        notes = () if method != "none" else ("no optimizer made the graph smaller",)
        return PassResult(
            notes=notes,
            details={
                "method": method,
                "rule": "fewest nodes; ties: onnxslim, ort, none",
                "measured": outcomes,
            },
        )


def _optimize_onnxslim(source: Path, destination: Path) -> None:
    import onnxslim

    try:
        model = onnxslim.slim(str(source))
    except Exception as e:
        raise ConversionError(f"onnxslim failed: {first_line(e)}") from e
    if model is None:
        raise ConversionError("onnxslim returned no model")
    save_model(model, destination)


def _optimize_ort_basic(source: Path, destination: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Basic level only: constant folding and redundant-node removal with standard ONNX ops.
    # Extended/all levels emit ORT-only fused kernels and CPU-specific layouts (NCHWc).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(destination)
    disable_onnxruntime_telemetry(ort)
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ConversionError(f"onnxruntime offline optimization failed: {first_line(e)}") from e
    _canonicalize_file(destination)


def _same_outputs(reference: Path, candidate: Path, feed: Feed) -> bool:
    from edgekit.runtimes import OnnxRuntimeBackend

    expected = OnnxRuntimeBackend(reference).run(feed)
    found = OnnxRuntimeBackend(candidate).run(feed)
    for name, value in expected.items():
        other = found.get(name)
        if other is None or other.shape != value.shape:
            return False
        if value.dtype.kind == "f":
            if not np.allclose(value, other, rtol=1e-3, atol=1e-4, equal_nan=True):
                return False
        elif not np.array_equal(value, other):
            return False
    return True


# -- weight-only int8 ---------------------------------------------------------------------------


def _int8_per_channel(
    values: npt.NDArray[np.float32], axis: int
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Symmetric per-channel int8 of `values` along `axis`: (int8 values, broadcastable scale)."""
    reduce_axes = tuple(i for i in range(values.ndim) if i != axis)
    scale = np.abs(values).max(axis=reduce_axes) / 127.0
    scale[scale == 0] = 1.0
    broadcast = [1] * values.ndim
    broadcast[axis] = -1
    scale_b = scale.reshape(broadcast).astype(np.float32)
    quantized = np.clip(np.rint(values / scale_b), -127, 127).astype(np.int8)
    return quantized, scale_b


def int8_round_trip(values: npt.NDArray[np.float32], axis: int) -> npt.NDArray[np.float32]:
    """What `weight_int8` turns `values` into once the runtime folds it back to float."""
    quantized, scale = _int8_per_channel(values, axis)
    return (quantized.astype(np.float32) * scale).astype(np.float32)


@dataclass(frozen=True)
class WeightInt8Config:
    """Weights of at least `min_elements` are stored as symmetric per-channel int8, except the
    tensors named in `float_tensors` (the accuracy fallback's choice)."""

    min_elements: int = 256
    float_tensors: tuple[str, ...] = ()


class WeightInt8Pass(Pass):
    """Weight-only int8: int8 storage, float compute.

    Each weight becomes `Cast(int8 initializer) * per-channel scale`, in the graph (or `If`/
    `Loop` body) that holds it: a quarter of the bytes on disk and over the air, and every
    runtime folds the two constant nodes back into a float weight when it loads the model, so
    inference runs exactly as fast as fp32 (unlike DequantizeLinear, which onnxruntime keeps
    unfolded and runs on every call).
    """

    name = "weight_int8"

    def __init__(self, config: WeightInt8Config | None = None) -> None:
        self.config = config or WeightInt8Config()

    @classmethod
    def config_for(cls, profile: Profile, **options: Any) -> WeightInt8Config:
        return configure(WeightInt8Config(), options, cls.name)

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        import onnx
        from onnx import helper, numpy_helper

        model = load_model(source)
        graphs = list(all_graphs(model.graph))
        keep_float = set(self.config.float_tensors)
        quantized: list[str] = []
        stored_bytes = 0
        for weight in weight_tensors(model, min_elements=self.config.min_elements):
            if weight.name in keep_float:
                continue
            graph = graphs[weight.graph_index]
            init = next(init for init in graph.initializer if init.name == weight.name)
            values = numpy_helper.to_array(init).astype(np.float32)
            q, scale_b = _int8_per_channel(values, weight.axis)
            graph.initializer.remove(init)
            q_name, s_name, f_name = (
                f"{weight.name}__int8",
                f"{weight.name}__scale",
                f"{weight.name}__float",
            )
            graph.initializer.extend(
                [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale_b, s_name)]
            )
            new_nodes = [
                helper.make_node(
                    "Cast", [q_name], [f_name], to=onnx.TensorProto.FLOAT, name=f"{q_name}/cast"
                ),
                helper.make_node("Mul", [f_name, s_name], [weight.name], name=f"{q_name}/scale"),
            ]
            for node in reversed(new_nodes):
                graph.node.insert(0, node)
            quantized.append(weight.name)
            stored_bytes += q.nbytes + scale_b.nbytes
        if not quantized:
            raise ConversionError(
                f"no float weight tensor of {self.config.min_elements} or more elements to store "
                "as int8"
            )
        save_model(model, destination)
        return PassResult(
            details={
                "weights": len(quantized),
                "float_tensors": sorted(keep_float),
                "int8_bytes": stored_bytes,
            }
        )


def rank_weights_by_error(
    float_model: Path, feeds: Sequence[Feed], *, min_elements: int
) -> list[tuple[str, float]]:
    """Weight tensors ranked worst first by the output error their int8 storage alone causes.

    For each weight `weight_int8` would store as int8, the float model runs with just that
    tensor replaced by its int8 round trip; the score is the error energy relative to the
    signal energy, summed over the float outputs (each output normalized on its own, so a
    small output such as a probability is not drowned by a large one such as a state).
    """
    import onnx
    from onnx import numpy_helper

    from edgekit.runtimes import OnnxRuntimeBackend

    model = load_model(float_model)
    graphs = list(all_graphs(model.graph))
    reference_runtime = OnnxRuntimeBackend(float_model)
    reference = [reference_runtime.run(feed) for feed in feeds]
    float_outputs = [
        name for name, value in reference[0].items() if np.asarray(value).dtype.kind == "f"
    ]
    energy = {
        name: sum(float(np.sum(np.asarray(out[name], np.float64) ** 2)) for out in reference)
        for name in float_outputs
    }
    ranked: list[tuple[str, float]] = []
    for weight in weight_tensors(model, min_elements=min_elements):
        graph = graphs[weight.graph_index]
        init = next(init for init in graph.initializer if init.name == weight.name)
        original = onnx.TensorProto()
        original.CopyFrom(init)
        values = numpy_helper.to_array(init).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(int8_round_trip(values, weight.axis), weight.name))
        try:
            runtime = OnnxRuntimeBackend(model.SerializeToString())
            error = dict.fromkeys(float_outputs, 0.0)
            for feed, expected in zip(feeds, reference, strict=True):
                found = runtime.run(feed)
                for name in float_outputs:
                    diff = np.asarray(expected[name], np.float64) - np.asarray(
                        found[name], np.float64
                    )
                    error[name] += float(np.sum(diff**2))
        finally:
            init.CopyFrom(original)
        score = sum(
            error[name] / energy[name] if energy[name] > 0 else error[name] for name in error
        )
        ranked.append((weight.name, score))
    return sorted(ranked, key=lambda item: (-item[1], item[0]))


@dataclass(frozen=True)
class PruneConfig:
    """Unstructured magnitude pruning of weight tensors."""

    sparsity: float = 0.5
    min_elements: int = 1024


class PrunePass(Pass):
    """Zero the smallest-magnitude fraction of each weight tensor (unstructured), in any graph.

    Dense CPU kernels run no faster on zeros; what pruning buys is a smaller compressed bundle
    (zstd over int8 zeros), which the report shows as `compressed_size_bytes`.
    """

    name = "prune"

    def __init__(self, config: PruneConfig | None = None) -> None:
        self.config = config or PruneConfig()

    @classmethod
    def config_for(cls, profile: Profile, **options: Any) -> PruneConfig:
        defaults = PruneConfig(
            sparsity=profile.pruning.sparsity or 0.5,
            min_elements=profile.pruning.min_tensor_elements,
        )
        return configure(defaults, options, cls.name)

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        from edgekit.converters.passes.tflite_prune import magnitude_mask
        from onnx import numpy_helper

        if not 0.0 < self.config.sparsity < 1.0:
            raise ConversionError(f"pruning sparsity must be in (0, 1), got {self.config.sparsity}")
        model = load_model(source)
        graphs = list(all_graphs(model.graph))
        pruned = 0
        total = 0
        for weight in weight_tensors(model, min_elements=self.config.min_elements):
            graph = graphs[weight.graph_index]
            init = next(init for init in graph.initializer if init.name == weight.name)
            values = numpy_helper.to_array(init).astype(np.float32)
            mask = magnitude_mask(values, self.config.sparsity)
            if not mask.any():
                continue
            values = np.where(mask, np.float32(0.0), values).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(values, weight.name))
            pruned += int(mask.sum())
            total += values.size
        if total == 0:
            raise ConversionError(
                f"no weight tensor of {self.config.min_elements} or more elements to prune"
            )
        save_model(model, destination)
        return PassResult(details={"sparsity": pruned / total, "weights_pruned": pruned})


# -- onnxruntime quantization -------------------------------------------------------------------


# ConvInteger with int8 weights first runs in onnxruntime 1.24 (microsoft/onnxruntime#26585);
# older releases refuse the model ("Could not find an implementation for ConvInteger(10)").
_CONV_INTEGER_INT8_SINCE = (1, 24)


@dataclass(frozen=True)
class DynamicInt8Config:
    """onnxruntime's `quantize_dynamic`: int8 weights, activations quantized at run time."""

    per_channel: bool = True
    weight_type: str = "int8"
    # Op types left in float (Conv for runtimes without an int8-weight ConvInteger).
    exclude_op_types: tuple[str, ...] = ()


class DynamicInt8Pass(Pass):
    """Dynamic int8 via `onnxruntime.quantization.quantize_dynamic`."""

    name = "dynamic_int8"

    def __init__(self, config: DynamicInt8Config | None = None) -> None:
        self.config = config or DynamicInt8Config()

    @classmethod
    def config_for(cls, profile: Profile, **options: Any) -> DynamicInt8Config:
        from edgekit.converters.compat import parse_version

        quant = profile.quantization
        oldest = parse_version(profile.runtime.oldest.version)
        int8_conv = quant.weight_type != "int8" or oldest >= _CONV_INTEGER_INT8_SINCE
        defaults = DynamicInt8Config(
            per_channel=quant.per_channel,
            weight_type=quant.weight_type,
            exclude_op_types=() if int8_conv else ("Conv",),
        )
        return configure(defaults, options, cls.name)

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        weight_type = QuantType.QInt8 if self.config.weight_type == "int8" else QuantType.QUInt8
        excluded = set(self.config.exclude_op_types)
        op_types = sorted(set(IntegerOpsRegistry) - excluded) if excluded else None
        try:
            quantize_dynamic(
                str(source),
                str(destination),
                per_channel=self.config.per_channel,
                weight_type=weight_type,
                op_types_to_quantize=op_types,
            )
        except Exception as e:
            raise ConversionError(f"quantize_dynamic failed: {first_line(e)}") from e
        _canonicalize_file(destination)
        notes: tuple[str, ...] = ()
        if "Conv" in excluded:
            notes = (
                f"Conv stays float: onnxruntime {context.profile.runtime.oldest.version} (the "
                "profile's oldest) has no ConvInteger with int8 weights (added in 1.24)",
            )
        return PassResult(notes=notes, details={"float_op_types": sorted(excluded)})


@dataclass(frozen=True)
class StaticInt8Config:
    """onnxruntime's `quantize_static` with calibration, and the nodes kept in float."""

    quant_format: str = "qdq"
    per_channel: bool = True
    activation_type: str = "int8"
    weight_type: str = "int8"
    calibration_method: str = "minmax"
    nodes_to_exclude: tuple[str, ...] = ()
    # onnxruntime's calibrators keep every intermediate tensor of every feed in memory.
    max_calibration_samples: int = 128


class _FeedReader:
    """`CalibrationDataReader` over a list of feeds (duck-typed: get_next and rewind)."""

    def __init__(self, feeds: Sequence[dict[str, npt.NDArray[Any]]]) -> None:
        self._feeds = list(feeds)
        self._index = 0

    def get_next(self) -> dict[str, npt.NDArray[Any]] | None:
        if self._index >= len(self._feeds):
            return None
        self._index += 1
        return self._feeds[self._index - 1]

    def rewind(self) -> None:
        self._index = 0

    def __iter__(self) -> Iterator[dict[str, npt.NDArray[Any]]]:
        return iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)


def feed_reader(feeds: Sequence[dict[str, npt.NDArray[Any]]]) -> Any:
    """An onnxruntime `CalibrationDataReader` over `feeds`."""
    from onnxruntime.quantization import CalibrationDataReader

    reader_cls = type("_Reader", (_FeedReader, CalibrationDataReader), {})
    return reader_cls(feeds)


def _upgrade_opset(source: Path, destination: Path, opset: int) -> str | None:
    """Write `source` at opset >= `opset` to `destination`; the change made, or None."""
    from onnx import version_converter

    model = load_model(source)
    current = opset_version(model)
    if current >= opset:
        shutil.copyfile(source, destination)
        return None
    try:
        upgraded = version_converter.convert_version(model, opset)
    except Exception as e:
        raise ConversionError(
            f"per-channel int8 needs opset {opset} and the model's opset {current} cannot be "
            f"converted up: {first_line(e)}; re-export the model at opset >= {opset}"
        ) from e
    save_model(upgraded, destination)
    return f"opset {current} -> {opset} (per-channel DequantizeLinear needs opset {opset})"


class StaticInt8Pass(Pass):
    """Static int8 (QDQ, per-channel) calibrated on the calibration data."""

    name = "static_int8"

    def __init__(self, config: StaticInt8Config | None = None) -> None:
        self.config = config or StaticInt8Config()

    @classmethod
    def config_for(cls, profile: Profile, **options: Any) -> StaticInt8Config:
        quant = profile.quantization
        defaults = StaticInt8Config(
            quant_format=quant.format,
            per_channel=quant.per_channel,
            activation_type=quant.activation_type,
            weight_type=quant.weight_type,
            calibration_method=quant.calibration_method,
        )
        return configure(defaults, options, cls.name)

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        if context.calibration is None:
            raise ConversionError("static int8 needs calibration data")
        feeds = context.calibration.head_samples(self.config.max_calibration_samples).feeds
        notes: list[str] = []
        config = self.config
        self._quantize(source, destination, context, config, feeds, notes)
        broken = _runs_or_why(destination, feeds[0]) if config.per_channel else None
        if broken is not None:
            # A quantizer bug seen on graphs that onnxruntime's optimizer had rewritten: a
            # per-channel scale that does not match its axis. Per-tensor weights avoid it.
            config = replace(config, per_channel=False)
            notes.append(f"per-channel int8 does not run ({broken}); rebuilt per-tensor")
            self._quantize(source, destination, context, config, feeds, notes)
        return PassResult(
            notes=tuple(notes),
            details={
                "calibration_feeds": len(feeds),
                "per_channel": config.per_channel,
                "float_nodes": list(config.nodes_to_exclude),
            },
        )

    def _quantize(
        self,
        source: Path,
        destination: Path,
        context: PassContext,
        config: StaticInt8Config,
        feeds: Sequence[dict[str, npt.NDArray[Any]]],
        notes: list[str],
    ) -> None:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        upgraded = context.workdir / f"{destination.stem}-opset.onnx"
        needed = _PER_CHANNEL_MIN_OPSET if config.per_channel else 10
        change = _upgrade_opset(source, upgraded, needed)
        if change:
            notes.append(change)
        prepared = context.workdir / f"{destination.stem}-prep.onnx"
        try:
            quant_pre_process(str(upgraded), str(prepared), skip_optimization=True)
        except Exception as e:  # noqa: BLE001  (symbolic shape inference fails on some graphs)
            notes.append(f"quantization pre-processing skipped: {first_line(e)}")
            shutil.copyfile(upgraded, prepared)
        types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
        methods = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }
        extra: dict[str, Any] = {"ActivationSymmetric": config.activation_type == "int8"}
        qdq = config.quant_format == "qdq"
        arguments: dict[str, Any] = {
            "quant_format": QuantFormat.QDQ if qdq else QuantFormat.QOperator,
            "per_channel": config.per_channel,
            "activation_type": types[config.activation_type],
            "weight_type": types[config.weight_type],
            "calibrate_method": methods[config.calibration_method],
            "nodes_to_exclude": list(config.nodes_to_exclude),
        }
        try:
            quantize_static(
                str(prepared),
                str(destination),
                feed_reader(feeds),
                **arguments,
                extra_options=extra,
            )
        except Exception as first:  # noqa: BLE001  (the quantizer raises bare exceptions)
            # Some onnxruntime releases fail while widening weight scales for int32 biases on
            # per-channel weights; without that adjustment the quantizer completes.
            extra["QDQDisableWeightAdjustForInt32Bias"] = True
            try:
                quantize_static(
                    str(prepared),
                    str(destination),
                    feed_reader(feeds),
                    **arguments,
                    extra_options=extra,
                )
            except Exception as e:
                raise ConversionError(f"quantize_static failed: {first_line(e)}") from e
            notes.append(f"int32 bias scale adjustment disabled ({first_line(first)})")
        _canonicalize_file(destination)


def _runs_or_why(model: Path, feed: Feed) -> str | None:
    """None when onnxruntime loads `model` and runs `feed`, else its message."""
    from edgekit.runtimes import OnnxRuntimeBackend

    try:
        OnnxRuntimeBackend(model, threads=1).run(feed)
    except Exception as e:  # noqa: BLE001  (load errors and onnxruntime's own run errors)
        return first_line(e)
    return None


def rank_nodes_by_quantization_error(
    float_model: Path, qdq_model: Path, feeds: Sequence[dict[str, npt.NDArray[Any]]], workdir: Path
) -> list[tuple[str, float]]:
    """Nodes of the float model ranked worst first by the accuracy they lose when quantized.

    Each activation of the QDQ model is compared with the same tensor of the float model
    (SQNR in dB). A node's score is how much SQNR it loses: the worst SQNR among its inputs
    minus the worst among its outputs, so the node where the error appears ranks first, not
    every node downstream of it.
    """
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_signal_to_quantization_noice_ratio,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    collected = []
    for model_path in (float_model, qdq_model):
        augmented = workdir / f"{model_path.stem}-debug.onnx"
        modify_model_output_intermediate_tensors(str(model_path), str(augmented))
        collected.append(collect_activations(str(augmented), feed_reader(list(feeds))))
    float_acts, qdq_acts = collected
    sqnr: dict[str, float] = {}
    for tensor, pair in create_activation_matching(qdq_acts, float_acts).items():
        if pair.get("float") is None or pair.get("post_qdq") is None:
            continue
        sqnr[tensor] = float(
            compute_signal_to_quantization_noice_ratio(pair["float"], pair["post_qdq"])
        )
    model = load_model(float_model)
    ranked: list[tuple[str, float]] = []
    for node in model.graph.node:
        outs = [sqnr[name] for name in node.output if name in sqnr]
        if not node.name or not outs:
            continue
        ins = [sqnr[name] for name in node.input if name in sqnr]
        before = min(ins) if ins else 200.0
        drop = min(before, 200.0) - min(*outs, 200.0)
        if math.isfinite(drop):
            ranked.append((node.name, drop))
    return sorted(ranked, key=lambda item: (-item[1], item[0]))


# -- fp16 ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fp16Config:
    """Float16 weights and compute with float32 inputs and outputs."""

    keep_io_types: bool = True
    op_block_list: tuple[str, ...] = field(default=())


class Fp16Pass(Pass):
    """fp16 via onnxconverter-common."""

    name = "fp16"

    def __init__(self, config: Fp16Config | None = None) -> None:
        self.config = config or Fp16Config()

    @classmethod
    def config_for(cls, profile: Profile, **options: Any) -> Fp16Config:
        return configure(Fp16Config(), options, cls.name)

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        from onnxconverter_common import float16

        model = load_model(source)
        try:
            converted = float16.convert_float_to_float16(
                model,
                keep_io_types=self.config.keep_io_types,
                op_block_list=list(self.config.op_block_list) or None,
            )
        except Exception as e:
            raise ConversionError(f"fp16 conversion failed: {first_line(e)}") from e
        save_model(converted, destination)
        return PassResult()


# -- compat -------------------------------------------------------------------------------------

# Tensor element types and the IR version that introduced them.
_TYPE_MIN_IR = {17: 9, 18: 9, 19: 9, 20: 9, 21: 10, 22: 10, 23: 11}
_TYPE_NAMES = {
    17: "float8e4m3fn",
    18: "float8e4m3fnuz",
    19: "float8e5m2",
    20: "float8e5m2fnuz",
    21: "uint4",
    22: "int4",
    23: "float4e2m1",
}


@dataclass(frozen=True)
class CompatConfig:
    """Which onnxruntime release the artifact must load on (the profile's oldest)."""

    runtime_version: str = "1.16.3"


class CompatPass(Pass):
    """Make the IR version and opsets loadable by the oldest runtime, or fail naming why."""

    name = "compat"

    def __init__(self, config: CompatConfig | None = None) -> None:
        self.config = config or CompatConfig()

    @classmethod
    def config_for(cls, profile: Profile, **options: Any) -> CompatConfig:
        defaults = CompatConfig(runtime_version=profile.runtime.oldest.version)
        return configure(defaults, options, cls.name)

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        import onnx
        from onnx import version_converter

        limits = onnx_limits_for_onnxruntime(self.config.runtime_version)
        model = load_model(source)
        changes = []
        opsets = {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}
        current = opsets.get("ai.onnx", 0)
        if current > limits.max_opset:
            try:
                model = version_converter.convert_version(model, limits.max_opset)
            except Exception as e:
                raise ConversionError(
                    f"opset {current} cannot be converted down to {limits.max_opset}, the newest "
                    f"onnxruntime {limits.runtime_version} loads: {first_line(e)}; re-export "
                    f"the model at opset <= {limits.max_opset} or raise the profile's oldest "
                    "runtime"
                ) from e
            changes.append(f"opset {current} -> {limits.max_opset}")
        used_domains = {
            node.domain or "ai.onnx" for graph in all_graphs(model.graph) for node in graph.node
        }
        for imp in list(model.opset_import):
            if imp.domain == "ai.onnx.ml" and imp.version > limits.max_ml_opset:
                if "ai.onnx.ml" in used_domains:
                    raise ConversionError(
                        f"ai.onnx.ml opset {imp.version} is newer than onnxruntime "
                        f"{limits.runtime_version} loads ({limits.max_ml_opset})"
                    )
                model.opset_import.remove(imp)
                changes.append(f"unused ai.onnx.ml opset {imp.version} dropped")
        if model.ir_version > limits.max_ir_version:
            blocking = _types_needing_ir(model, limits.max_ir_version)
            if blocking:
                raise ConversionError(
                    f"IR version {model.ir_version} cannot be lowered to "
                    f"{limits.max_ir_version} (onnxruntime {limits.runtime_version}): the model "
                    f"uses {', '.join(blocking)}"
                )
            changes.append(f"IR version {model.ir_version} -> {limits.max_ir_version}")
            model.ir_version = limits.max_ir_version
        save_model(model, destination)
        _check(destination)
        final = onnx.load(str(destination), load_external_data=False)
        return PassResult(
            details={
                "runtime": f"onnxruntime {limits.runtime_version}",
                "max_ir_version": limits.max_ir_version,
                "max_opset": limits.max_opset,
                "ir_version": final.ir_version,
                "opset": next(
                    (imp.version for imp in final.opset_import if imp.domain in ("", "ai.onnx")),
                    None,
                ),
                "changes": changes,
            }
        )


def _types_needing_ir(model: onnx.ModelProto, max_ir: int) -> list[str]:
    found = set()
    for init in model.graph.initializer:
        if _TYPE_MIN_IR.get(init.data_type, 0) > max_ir:
            found.add(_TYPE_NAMES[init.data_type])
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        elem = value.type.tensor_type.elem_type
        if _TYPE_MIN_IR.get(elem, 0) > max_ir:
            found.add(_TYPE_NAMES[elem])
    return sorted(found)
