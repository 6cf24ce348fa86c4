"""The ONNX passes: load, optimize, weight-only int8, pruning, dynamic/static int8, fp16, compat."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from edgekit.converters.compat import onnx_limits_for_onnxruntime
from edgekit.converters.passes.base import Pass, PassContext, PassResult

from edgekit.errors import ConversionError, first_line

if TYPE_CHECKING:
    import onnx

__all__ = [
    "CompatPass",
    "DynamicInt8Pass",
    "Fp16Pass",
    "LoadPass",
    "OptimizePass",
    "PrunePass",
    "StaticInt8Pass",
    "WeightInt8Pass",
    "load_model",
    "save_model",
    "scratch_cwd",
]

log = logging.getLogger(__name__)

# protobuf cannot serialize a message over 2 GiB: bigger models keep their weights outside.
_PROTOBUF_LIMIT_BYTES = 2**31 - 1
_EXTERNAL_DATA_THRESHOLD_BYTES = 1800 * 2**20


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
    """Write a model; one over the protobuf limit keeps its weights in `<name>.data` beside it."""
    import onnx

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


@dataclass(frozen=True)
class LoadConfig:
    """Shape inference can be skipped for models it cannot handle."""

    infer_shapes: bool = True


class LoadPass(Pass):
    """Read, check (ONNX checker) and shape-infer the source model."""

    name = "load"

    def __init__(self, config: LoadConfig | None = None) -> None:
        self.config = config or LoadConfig()

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        import onnx

        model = load_model(source)
        notes = []
        _check(source)
        if self.config.infer_shapes:
            try:
                model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
            except (onnx.shape_inference.InferenceError, RuntimeError, ValueError) as e:
                notes.append(f"shape inference failed, continuing without it: {e}")
        save_model(model, destination)
        return PassResult(
            notes=tuple(notes),
            details={
                "ir_version": model.ir_version,
                "opsets": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
                "nodes": len(model.graph.node),
                "producer": f"{model.producer_name} {model.producer_version}".strip(),
            },
        )


@dataclass(frozen=True)
class OptimizeConfig:
    """`auto` measures onnxslim and onnxruntime's basic offline optimization; keeps the faster."""

    method: str = "auto"  # auto | onnxslim | ort | none


class OptimizePass(Pass):
    """Graph simplification that stays portable (no hardware-specific layouts or fused kernels)."""

    name = "optimize"

    def __init__(self, config: OptimizeConfig | None = None) -> None:
        self.config = config or OptimizeConfig()

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        from edgekit.converters.benchmark import quick_latency_ms

        methods = ["onnxslim", "ort"] if self.config.method == "auto" else [self.config.method]
        if methods == ["none"]:
            shutil.copyfile(source, destination)
            return PassResult(details={"method": "none"})
        feed = context.validation.single_sample_feed() if context.validation else None
        outcomes: dict[str, Any] = {}
        best: tuple[float, str, Path] | None = None
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
            if feed is None or len(methods) == 1:
                latency = 0.0
            else:
                latency = quick_latency_ms(out, feed, threads=context.threads)
                if not _same_outputs(source, out, feed):
                    outcomes[method] = {"error": "outputs differ from the source model"}
                    continue
            outcomes[method] = {"latency_ms": latency}
            # The first method that works is the default; another must be clearly faster (3%)
            # to replace it, so run-to-run noise does not flip the graph between conversions.
            if best is None or latency < best[0] * 0.97:
                best = (latency, method, out)
        if best is None:
            shutil.copyfile(source, destination)
            return PassResult(
                notes=("no optimizer succeeded; using the model as loaded",),
                details={"method": "none", "measured": outcomes},
            )
        if feed is not None and len(methods) > 1:
            source_latency = quick_latency_ms(source, feed, threads=context.threads)
            outcomes["none"] = {"latency_ms": source_latency}
            if source_latency < best[0] * 0.97:
                best = (source_latency, "none", source)
        shutil.copyfile(best[2], destination)
        return PassResult(details={"method": best[1], "measured": outcomes})


def _optimize_onnxslim(source: Path, destination: Path) -> None:
    import onnxslim

    try:
        model = onnxslim.slim(str(source))
    except Exception as e:
        raise ConversionError(f"onnxslim failed: {e}") from e
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
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ConversionError(f"onnxruntime offline optimization failed: {e}") from e


def _same_outputs(reference: Path, candidate: Path, feed: dict[str, npt.NDArray[Any]]) -> bool:
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

# (op type, input index) -> the axis that holds output channels, for per-channel scales.
_WEIGHT_INPUTS: dict[tuple[str, int], int] = {
    ("Conv", 1): 0,
    ("MatMul", 1): -1,
    ("Gemm", 1): -1,  # replaced by 0 when transB=1
    ("Gather", 0): 0,  # embedding tables
}


@dataclass(frozen=True)
class _WeightTensor:
    name: str
    axis: int


def _weight_tensors(model: onnx.ModelProto, *, min_elements: int) -> Iterator[_WeightTensor]:
    """Float32 initializers of the main graph used as Conv/MatMul/Gemm weights or embeddings."""
    import onnx

    inits = {init.name: init for init in model.graph.initializer}
    graph_inputs = {value.name for value in model.graph.input}
    seen = set()
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            key = (node.op_type, index)
            if key not in _WEIGHT_INPUTS or name not in inits or name in seen:
                continue
            init = inits[name]
            if init.data_type != onnx.TensorProto.FLOAT or name in graph_inputs:
                continue
            elements = math.prod(init.dims)
            if elements < min_elements or len(init.dims) < 2:
                continue
            axis = _WEIGHT_INPUTS[key]
            if node.op_type == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                axis = 0 if trans_b else 1
            seen.add(name)
            yield _WeightTensor(name=name, axis=axis % len(init.dims))


@dataclass(frozen=True)
class WeightInt8Config:
    """Weights of at least `min_elements` are stored as symmetric per-channel int8."""

    min_elements: int = 256


class WeightInt8Pass(Pass):
    """Weight-only int8: int8 storage, float compute.

    Each weight becomes `Cast(int8 initializer) * per-channel scale`: a quarter of the bytes on
    disk and over the air, and every runtime folds the two constant nodes back into a float
    weight when it loads the model, so inference runs exactly as fast as fp32 (unlike
    DequantizeLinear, which onnxruntime keeps unfolded and runs on every call).
    """

    name = "weight_int8"

    def __init__(self, config: WeightInt8Config | None = None) -> None:
        self.config = config or WeightInt8Config()

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        import onnx
        from onnx import helper, numpy_helper

        model = load_model(source)
        inits = {init.name: init for init in model.graph.initializer}
        new_nodes = []
        quantized = []
        for weight in list(_weight_tensors(model, min_elements=self.config.min_elements)):
            values = numpy_helper.to_array(inits[weight.name]).astype(np.float32)
            reduce_axes = tuple(i for i in range(values.ndim) if i != weight.axis)
            scale = np.abs(values).max(axis=reduce_axes) / 127.0
            scale[scale == 0] = 1.0
            broadcast = [1] * values.ndim
            broadcast[weight.axis] = -1
            scale_b = scale.reshape(broadcast).astype(np.float32)
            q = np.clip(np.rint(values / scale_b), -127, 127).astype(np.int8)
            model.graph.initializer.remove(inits[weight.name])
            q_name, s_name, f_name = (
                f"{weight.name}__int8",
                f"{weight.name}__scale",
                f"{weight.name}__float",
            )
            model.graph.initializer.extend(
                [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale_b, s_name)]
            )
            new_nodes.append(
                helper.make_node(
                    "Cast", [q_name], [f_name], to=onnx.TensorProto.FLOAT, name=f"{q_name}/cast"
                )
            )
            new_nodes.append(
                helper.make_node("Mul", [f_name, s_name], [weight.name], name=f"{q_name}/scale")
            )
            quantized.append(weight.name)
        if not quantized:
            raise ConversionError(
                f"no float weight tensor of {self.config.min_elements} or more elements to store "
                "as int8"
            )
        for node in reversed(new_nodes):
            model.graph.node.insert(0, node)
        save_model(model, destination)
        return PassResult(details={"weights": len(quantized)})


@dataclass(frozen=True)
class PruneConfig:
    """Unstructured magnitude pruning of weight tensors."""

    sparsity: float = 0.5
    min_elements: int = 1024


class PrunePass(Pass):
    """Zero the smallest-magnitude fraction of each weight tensor (unstructured).

    Dense CPU kernels run no faster on zeros; what pruning buys is a smaller compressed bundle
    (zstd over int8 zeros), which the report shows as `compressed_size_bytes`.
    """

    name = "prune"

    def __init__(self, config: PruneConfig | None = None) -> None:
        self.config = config or PruneConfig()

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        from edgekit.converters.passes.tflite_prune import magnitude_mask
        from onnx import numpy_helper

        if not 0.0 < self.config.sparsity < 1.0:
            raise ConversionError(f"pruning sparsity must be in (0, 1), got {self.config.sparsity}")
        model = load_model(source)
        inits = {init.name: init for init in model.graph.initializer}
        pruned = 0
        total = 0
        for weight in list(_weight_tensors(model, min_elements=self.config.min_elements)):
            values = numpy_helper.to_array(inits[weight.name]).astype(np.float32)
            mask = magnitude_mask(values, self.config.sparsity)
            if not mask.any():
                continue
            values = np.where(mask, np.float32(0.0), values).astype(np.float32)
            inits[weight.name].CopyFrom(numpy_helper.from_array(values, weight.name))
            pruned += int(mask.sum())
            total += values.size
        if total == 0:
            raise ConversionError(
                f"no weight tensor of {self.config.min_elements} or more elements to prune"
            )
        save_model(model, destination)
        return PassResult(details={"sparsity": pruned / total, "weights_pruned": pruned})


# -- onnxruntime quantization -------------------------------------------------------------------


@dataclass(frozen=True)
class DynamicInt8Config:
    """onnxruntime's `quantize_dynamic`: int8 weights, activations quantized at run time."""

    per_channel: bool = True
    weight_type: str = "int8"


class DynamicInt8Pass(Pass):
    """Dynamic int8 via `onnxruntime.quantization.quantize_dynamic`."""

    name = "dynamic_int8"

    def __init__(self, config: DynamicInt8Config | None = None) -> None:
        self.config = config or DynamicInt8Config()

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        weight_type = QuantType.QInt8 if self.config.weight_type == "int8" else QuantType.QUInt8
        try:
            quantize_dynamic(
                str(source),
                str(destination),
                per_channel=self.config.per_channel,
                weight_type=weight_type,
            )
        except Exception as e:
            raise ConversionError(f"quantize_dynamic failed: {first_line(e)}") from e
        return PassResult()


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


class StaticInt8Pass(Pass):
    """Static int8 (QDQ, per-channel) calibrated on the calibration data."""

    name = "static_int8"

    def __init__(self, config: StaticInt8Config | None = None) -> None:
        self.config = config or StaticInt8Config()

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        if context.calibration is None:
            raise ConversionError("static int8 needs calibration data")
        notes = []
        prepared = context.workdir / f"{destination.stem}-prep.onnx"
        try:
            quant_pre_process(str(source), str(prepared), skip_optimization=True)
        except Exception as e:  # noqa: BLE001  (symbolic shape inference fails on some graphs)
            notes.append(f"quantization pre-processing skipped: {first_line(e)}")
            shutil.copyfile(source, prepared)
        reader_cls = type("_Reader", (_FeedReader, CalibrationDataReader), {})
        feeds = context.calibration.head_samples(self.config.max_calibration_samples).feeds
        types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
        methods = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }
        extra: dict[str, Any] = {"ActivationSymmetric": self.config.activation_type == "int8"}
        arguments: dict[str, Any] = {
            "quant_format": QuantFormat.QDQ
            if self.config.quant_format == "qdq"
            else QuantFormat.QOperator,
            "per_channel": self.config.per_channel,
            "activation_type": types[self.config.activation_type],
            "weight_type": types[self.config.weight_type],
            "calibrate_method": methods[self.config.calibration_method],
            "nodes_to_exclude": list(self.config.nodes_to_exclude),
        }
        try:
            quantize_static(
                str(prepared), str(destination), reader_cls(feeds), **arguments, extra_options=extra
            )
        except Exception as first:  # noqa: BLE001  (the quantizer raises bare exceptions)
            # Some onnxruntime releases fail while widening weight scales for int32 biases on
            # per-channel weights; without that adjustment the quantizer completes.
            extra["QDQDisableWeightAdjustForInt32Bias"] = True
            try:
                quantize_static(
                    str(prepared),
                    str(destination),
                    reader_cls(feeds),
                    **arguments,
                    extra_options=extra,
                )
            except Exception as e:
                raise ConversionError(f"quantize_static failed: {first_line(e)}") from e
            notes.append(f"int32 bias scale adjustment disabled ({first_line(first)})")
        return PassResult(
            notes=tuple(notes),
            details={
                "calibration_feeds": len(feeds),
                "float_nodes": list(self.config.nodes_to_exclude),
            },
        )


def rank_nodes_by_quantization_error(
    float_model: Path, qdq_model: Path, feeds: Sequence[dict[str, npt.NDArray[Any]]], workdir: Path
) -> list[tuple[str, float]]:
    """Nodes of the float model ranked worst first by the accuracy they lose when quantized.

    Each activation of the QDQ model is compared with the same tensor of the float model
    (SQNR in dB). A node's score is how much SQNR it loses: the worst SQNR among its inputs
    minus the worst among its outputs, so the node where the error appears ranks first, not
    every node downstream of it.
    """
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_signal_to_quantization_noice_ratio,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    reader_cls = type("_Reader", (_FeedReader, CalibrationDataReader), {})
    collected = []
    for model_path in (float_model, qdq_model):
        augmented = workdir / f"{model_path.stem}-debug.onnx"
        modify_model_output_intermediate_tensors(str(model_path), str(augmented))
        collected.append(collect_activations(str(augmented), reader_cls(list(feeds))))
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
    return sorted(ranked, key=lambda item: item[1], reverse=True)


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
        used_domains = {node.domain or "ai.onnx" for node in _all_nodes(model.graph)}
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


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.g.node:
                yield from _all_nodes(attribute.g)
            for sub in attribute.graphs:
                yield from _all_nodes(sub)


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
