"""The TensorFlow passes: read a Keras/SavedModel source, convert it to TFLite, export ONNX.

`tf_load` turns a `.keras` file or a SavedModel folder into a SavedModel with one serving
signature whose inputs and outputs carry the model's own names; every TFLite candidate is
converted from it by `tflite_convert` (TFLiteConverter: float32, float16, dynamic-range int8,
full int8 with a representative dataset and int8/uint8/float32 I/O). `rank_tflite_layers` asks
TensorFlow's quantization debugger which layers lose the most to int8, for the accuracy
fallback. `tf2onnx` exports the SavedModel as ONNX for onnx profiles.

TensorFlow is imported inside each pass, never at module import.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import importlib.util
import io
import logging
import os
import shutil
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from edgekit.converters.passes.base import Pass, PassContext, PassResult, configure
from edgekit.converters.tflite_compat import blocking_ops, downgrade_options

from edgekit.errors import ConversionError, first_line
from edgekit.profiles import Profile
from edgekit.runtimes import Feeds, Runtime, TensorSpec

__all__ = [
    "LITERT_QUANTIZER_RECIPES",
    "SIGNATURE_KEY",
    "BlockedOpsError",
    "LiteRtQuantizeConfig",
    "LiteRtQuantizePass",
    "OpVersionsConfig",
    "OpVersionsPass",
    "SourceKind",
    "TensorFlowModel",
    "Tf2OnnxConfig",
    "Tf2OnnxPass",
    "TfLoadConfig",
    "TfLoadPass",
    "TfliteConvertConfig",
    "TfliteConvertPass",
    "TfliteKind",
    "litert_quantizer_available",
    "quantize_with_litert",
    "rank_tflite_layers",
    "source_kind",
]

log = logging.getLogger(__name__)

SIGNATURE_KEY = "serving_default"
SourceKind = Literal["onnx", "saved_model", "keras", "torch"]
# PyTorch files: `.pt2` is what torch.export.save writes; `.pt`/`.pth` are read only to refuse
# a TorchScript archive or a pickle with the way to save a program (torch_frontend).
_TORCH_SUFFIXES = (".pt2", ".pt", ".pth")
TfliteKind = Literal["fp32", "fp16", "dynamic_int8", "full_int8"]
Array = npt.NDArray[Any]

# How many calibration samples the representative dataset and the debugger see.
_CALIBRATION_SAMPLES = 128
_DEBUG_SAMPLES = 32


def source_kind(path: Path) -> SourceKind:
    """What kind of model `path` holds: an ONNX file, a Keras `.keras` file, a SavedModel or a
    PyTorch file (`torch`: checked and read by the torch frontend)."""
    if not path.exists():
        raise ConversionError(f"model {path} does not exist; check the path")
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return "saved_model"
        raise ConversionError(
            f"{path} is a folder without saved_model.pb; expected a TensorFlow SavedModel "
            "folder, a Keras .keras file or an .onnx file"
        )
    if path.suffix == ".keras":
        if not zipfile.is_zipfile(path):
            raise ConversionError(
                f"{path} is not a Keras .keras file (not a zip archive); re-save the model "
                "with model.save('model.keras')"
            )
        return "keras"
    if path.suffix in (".h5", ".hdf5"):
        raise ConversionError(
            f"{path}: legacy Keras HDF5 files are not read; re-save the model with "
            "model.save('model.keras') or model.export('saved_model_dir')"
        )
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if path.suffix.lower() in _TORCH_SUFFIXES:
        return "torch"
    if path.suffix.lower() == ".tflite":
        raise ConversionError(
            f"{path} is already a TFLite model: there is nothing to convert; check it on the "
            "device runtimes with `edgekit verify-runtime` and pack it with `edgekit bundle build`"
        )
    raise ConversionError(
        f"{path}: unsupported model format; expected .onnx, .keras, a SavedModel folder or a "
        "PyTorch .pt2 file (torch.export.save)"
    )


def _tf() -> Any:
    if "tensorflow" not in sys.modules:
        # TensorFlow's C++ INFO/WARNING lines would bury the converter's own output.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ConversionError(
            "TFLite conversion needs TensorFlow: pip install 'edgekit[tflite]'"
        ) from e
    return tf


@dataclass(frozen=True)
class TfLoadConfig:
    """Which kind of source to read (see `source_kind`)."""

    kind: Literal["saved_model", "keras"]


class TfLoadPass(Pass):
    """Read a Keras file or SavedModel; write a SavedModel with one named serving signature."""

    name = "tf_load"

    def __init__(self, config: TfLoadConfig) -> None:
        self.config = config

    @classmethod
    def config_for(cls, profile: Profile, **options: Any) -> TfLoadConfig:
        return configure(TfLoadConfig(kind="saved_model"), options, cls.name)

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        tf = _tf()
        if self.config.kind == "keras":
            _export_keras(source, destination)
        else:
            try:
                loaded = tf.saved_model.load(str(source))
            except Exception as e:  # TF raises OSError/ValueError/its own errors, undocumented
                raise ConversionError(
                    f"{source}: TensorFlow cannot load the SavedModel: {first_line(e)}; "
                    "re-export it with tf.saved_model.save or model.export"
                ) from e
            signatures = dict(loaded.signatures)
            if SIGNATURE_KEY not in signatures:
                found = ", ".join(sorted(signatures)) or "none"
                raise ConversionError(
                    f"{source}: the SavedModel has no {SIGNATURE_KEY!r} signature (found: "
                    f"{found}); export it with signatures={{'{SIGNATURE_KEY}': fn}}"
                )
            shutil.copytree(source, destination)
        model = TensorFlowModel(destination)
        return PassResult(
            details={
                "format": self.config.kind,
                "tensorflow": str(tf.__version__),
                "signature": SIGNATURE_KEY,
                "inputs": [spec.to_dict() for spec in model.inputs],
                "outputs": [spec.to_dict() for spec in model.outputs],
            }
        )


def _export_keras(source: Path, destination: Path) -> None:
    """A Keras model as a SavedModel whose signature names its outputs after the output layers."""
    tf = _tf()
    keras = tf.keras  # Keras 3 under TensorFlow 2.21

    try:
        model = keras.models.load_model(str(source), compile=False)
    except Exception as e:  # keras raises ValueError/OSError/zipfile errors, undocumented
        raise ConversionError(
            f"{source}: Keras cannot load the model: {first_line(e)}; re-save it with "
            "model.save('model.keras')"
        ) from e
    inputs = list(model.inputs)
    output_names = _keras_output_names(model)
    specs = [
        tf.TensorSpec(tensor.shape, tensor.dtype, name=_clean_name(tensor.name, f"input_{i}"))
        for i, tensor in enumerate(inputs)
    ]

    def serve(*args: Any) -> dict[str, Any]:
        result = model(list(args) if len(args) > 1 else args[0], training=False)
        values = list(result) if isinstance(result, (list, tuple)) else [result]
        if isinstance(result, dict):
            values = [result[key] for key in result]
        return dict(zip(output_names, values, strict=True))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name=SIGNATURE_KEY, fn=serve, input_signature=specs)
    try:
        archive.write_out(str(destination), verbose=False)
    except TypeError:  # older Keras without `verbose`
        archive.write_out(str(destination))


def _keras_output_names(model: Any) -> list[str]:
    names = []
    for index, tensor in enumerate(model.outputs):
        history = getattr(tensor, "_keras_history", None)
        operation = getattr(history, "operation", None) if history is not None else None
        name = getattr(operation, "name", None) or f"output_{index}"
        names.append(_clean_name(str(name), f"output_{index}"))
    if len(set(names)) != len(names):
        names = [f"output_{index}" for index in range(len(names))]
    return names


def _clean_name(name: str, fallback: str) -> str:
    cleaned = "".join(
        ch if ch.isalnum() or ch == "_" else "_" for ch in name.split(":", maxsplit=1)[0]
    )
    return cleaned or fallback


class TensorFlowModel(Runtime):
    """The source model itself, run by TensorFlow through its serving signature.

    The reference every TFLite candidate is validated against.
    """

    engine = "tensorflow"

    def __init__(self, saved_model: Path) -> None:
        tf = _tf()
        self.version = str(tf.__version__)
        self._module = tf.saved_model.load(str(saved_model))
        self._function = self._module.signatures[SIGNATURE_KEY]
        _, keyword_specs = self._function.structured_input_signature
        self._inputs = tuple(
            TensorSpec(
                name=name,
                dtype=spec.dtype.name,
                shape=tuple(spec.shape.as_list()) if spec.shape.rank is not None else (),
            )
            for name, spec in keyword_specs.items()
        )
        outputs = self._function.structured_outputs
        self._outputs = tuple(
            TensorSpec(
                name=name,
                dtype=tensor.dtype.name,
                shape=tuple(tensor.shape.as_list()) if tensor.shape.rank is not None else (),
            )
            for name, tensor in outputs.items()
        )

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def run(self, feeds: Feeds) -> dict[str, Array]:
        tf = _tf()
        values = self._function(**{name: tf.constant(value) for name, value in feeds.items()})
        return {spec.name: np.asarray(values[spec.name].numpy()) for spec in self._outputs}


@dataclass(frozen=True)
class TfliteConvertConfig:
    """One TFLiteConverter run: the kind of candidate and, for full int8, its I/O type."""

    kind: TfliteKind
    io_type: Literal["float32", "int8", "uint8"] = "float32"
    # Output tensor names of layers kept in float (quantization debugger's denylist).
    float_layers: tuple[str, ...] = ()
    calibration_samples: int = _CALIBRATION_SAMPLES
    # Extra TFLiteConverter attributes (e.g. `tflite_compat.downgrade_options` for old runtimes).
    converter_options: tuple[tuple[str, object], ...] = ()
    # Convert in a child process, so that a converter crash (TFLiteConverter's calibrator
    # segfaults on some onnx2tf SavedModels, e.g. a PyTorch GRU's) fails this candidate only.
    isolated: bool = False


class TfliteConvertPass(Pass):
    """TFLiteConverter from the SavedModel: fp32, fp16, dynamic-range int8 or full int8.

    When the profile's oldest runtime cannot load an operator version the build emits, the
    model is rebuilt once with `tflite_compat.downgrade_options` (e.g. per-tensor dense weights
    for tflite-runtime 2.14), and the note says so; `op_versions` makes the final check.
    """

    name = "tflite_convert"

    def __init__(self, config: TfliteConvertConfig) -> None:
        self.config = config

    @classmethod
    def config_for(cls, profile: Profile, **options: Any) -> TfliteConvertConfig:
        defaults = TfliteConvertConfig(kind="fp32", io_type=profile.quantization.io_type)
        return configure(defaults, options, cls.name)

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        result = self._convert(source, destination, context, self.config)
        blocking = blocking_ops(destination, context.profile)
        downgrade = tuple(downgrade_options(context.profile).items())
        if not blocking or not downgrade:
            return result
        # Rebuild with the settings that keep op versions loadable on the oldest runtime.
        config = replace(self.config, converter_options=downgrade)
        rebuilt = self._convert(source, destination, context, config)
        oldest = context.profile.runtime.oldest
        note = (
            f"rebuilt with {', '.join(option for option, _ in downgrade)} so that "
            f"{oldest.package} {oldest.version} loads it (was: {'; '.join(blocking)})"
        )
        return PassResult(notes=(note, *rebuilt.notes), details=rebuilt.details)

    def _convert(
        self, source: Path, destination: Path, context: PassContext, config: TfliteConvertConfig
    ) -> PassResult:
        tf = _tf()
        notes: list[str] = []
        try:
            with _quiet_converter():
                if config.kind == "full_int8" and config.float_layers:
                    content = _quantize_with_float_layers(source, context, config)
                    notes.append(f"{len(config.float_layers)} layer(s) kept in float")
                elif config.isolated:
                    content = _convert_isolated(source, context, config)
                    notes.append("converted in a child process (isolated from converter crashes)")
                else:
                    converter = make_converter(source, config.kind, context, config=config)
                    content = converter.convert()
        except ConversionError:
            raise
        except Exception as e:  # TFLiteConverter raises ConverterError/ValueError/...
            raise ConversionError(
                f"TFLiteConverter cannot build {config.kind}: {first_line(e)}"
            ) from e
        destination.write_bytes(content)
        return PassResult(
            notes=tuple(notes),
            details={
                "converter": f"TFLiteConverter (tensorflow {tf.__version__})",
                "kind": config.kind,
                "io_type": config.io_type if config.kind == "full_int8" else "float32",
                "float_layers": list(config.float_layers),
                "converter_options": dict(config.converter_options),
            },
        )


class BlockedOpsError(ConversionError):
    """The profile's oldest runtime cannot load operator versions of a built model."""

    def __init__(self, message: str, *, ops: Sequence[str], details: dict[str, Any]) -> None:
        super().__init__(message)
        self.ops = tuple(ops)
        self.details = details


@dataclass(frozen=True)
class OpVersionsConfig:
    """The I/O dtype the built model must have (`profile`: the profile's `io_type`)."""

    io_type: Literal["float32", "int8", "uint8", "profile"] = "float32"


class OpVersionsPass(Pass):
    """Check a TFLite model's operator versions against the profile's oldest runtime and its
    input/output dtypes against what the candidate promises; the file passes through as is."""

    name = "op_versions"

    def __init__(self, config: OpVersionsConfig | None = None) -> None:
        self.config = config or OpVersionsConfig()

    @classmethod
    def config_for(cls, profile: Profile, **options: Any) -> OpVersionsConfig:
        config = configure(OpVersionsConfig(), options, cls.name)
        if config.io_type == "profile":
            config = OpVersionsConfig(io_type=profile.quantization.io_type)
        return config

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        from edgekit.runtimes import LiteRtBackend, RuntimeLoadError

        profile = context.profile
        oldest = profile.runtime.oldest
        blocking = blocking_ops(source, profile)
        details: dict[str, Any] = {
            "checked": True,
            "oldest_runtime": f"{oldest.package} {oldest.version}",
            "blocking": list(blocking),
        }
        if blocking:
            raise BlockedOpsError(
                f"blocked: {oldest.package} {oldest.version} (the profile's oldest runtime) "
                f"cannot load it: {'; '.join(blocking)}",
                ops=blocking,
                details=details,
            )
        shutil.copyfile(source, destination)
        try:
            built = LiteRtBackend(destination)
        except RuntimeLoadError:
            return PassResult(details=details)  # the host runtime's refusal shows in validation
        specs = (*built.inputs, *built.outputs)
        wanted = self.config.io_type
        details["io_types"] = sorted({spec.dtype for spec in specs})
        # Integer tensors of the model itself (magika's int32 bytes, token ids) are not what
        # quantization changes: only real-valued I/O must have the promised type.
        wrong = [
            f"{spec.name} is {spec.dtype}"
            for spec in specs
            if spec.dtype in _REAL_IO_TYPES and spec.dtype != wanted
        ]
        if wrong:
            raise ConversionError(
                f"wrong I/O type: inputs/outputs are not {wanted} ({', '.join(wrong)}); the "
                f"profile wants {wanted} I/O"
            )
        return PassResult(details=details)


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
    """TFLiteConverter calibrates with tf.lite.Interpreter, which warns it is deprecated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"tensorflow\.lite\..*")
        warnings.filterwarnings("ignore", category=UserWarning, message=".*tf.lite.Interpreter.*")
        yield


def _tf_dtype(name: str) -> Any:
    tf = _tf()
    return {"float32": tf.float32, "int8": tf.int8, "uint8": tf.uint8}[name]


def representative_feeds(context: PassContext, limit: int) -> list[dict[str, Array]]:
    """Up to `limit` calibration feeds (batch 1 each), for the representative dataset."""
    dataset = context.calibration
    if dataset is None:
        raise ConversionError("full int8 needs calibration data; give --calibration")
    feeds: list[dict[str, Array]] = list(dataset.head_samples(limit).feeds)
    return feeds[:limit]


_ISOLATED_TIMEOUT_S = 1800.0
# I/O dtypes that carry real values (float, or quantized reals): what `op_versions` checks.
_REAL_IO_TYPES = frozenset({"float32", "float16", "int8", "uint8"})


def _convert_isolated(source: Path, context: PassContext, config: TfliteConvertConfig) -> bytes:
    """Run `converter_for(...).convert()` in a child Python (`_tflite_convert_worker`)."""
    import json
    import subprocess
    import tempfile

    feeds = (
        representative_feeds(context, config.calibration_samples)
        if (config.kind == "full_int8")
        else []
    )
    with tempfile.TemporaryDirectory(prefix="tflite-isolated-", dir=context.workdir) as folder:
        work = Path(folder)
        arrays = {
            f"{i}/{name}": np.asarray(v) for i, feed in enumerate(feeds) for name, v in feed.items()
        }
        np.savez(work / "feeds.npz", **arrays)  # type: ignore[arg-type]
        request = {
            "saved_model": str(source.absolute()),
            "feeds": str(work / "feeds.npz"),
            "count": len(feeds),
            "output": str(work / "model.tflite"),
            "config": {
                "kind": config.kind,
                "io_type": config.io_type,
                "calibration_samples": config.calibration_samples,
                "converter_options": [list(item) for item in config.converter_options],
            },
        }
        (work / "request.json").write_text(json.dumps(request))
        try:
            done = subprocess.run(
                [sys.executable, "-m", "edgekit.converters._tflite_convert_worker",
                 str(work / "request.json")],
                capture_output=True,
                text=True,
                timeout=_ISOLATED_TIMEOUT_S,
                check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ConversionError(f"TFLiteConverter did not finish {config.kind}: {e}") from e
        output = work / "model.tflite"
        if done.returncode != 0 or not output.is_file():
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            why = (
                f"crashed (signal {-done.returncode})"
                if done.returncode < 0
                else f"failed: {lines[-1] if lines else f'exit status {done.returncode}'}"
            )
            raise ConversionError(f"TFLiteConverter {why} building {config.kind}")
        return output.read_bytes()


def make_converter(
    saved_model: Path,
    kind: TfliteKind,
    context: PassContext,
    *,
    config: TfliteConvertConfig | None = None,
) -> Any:
    """A TFLiteConverter set up for one candidate kind (not yet run)."""
    samples = config.calibration_samples if config else _CALIBRATION_SAMPLES
    feeds = representative_feeds(context, samples) if kind == "full_int8" else []
    return converter_for(saved_model, kind, feeds, config=config)


def converter_for(
    saved_model: Path,
    kind: TfliteKind,
    feeds: Sequence[Mapping[str, Array]],
    *,
    config: TfliteConvertConfig | None = None,
) -> Any:
    """`make_converter` with the representative feeds given (full int8 only)."""
    tf = _tf()
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model), signature_keys=[SIGNATURE_KEY]
    )
    for attribute, value in config.converter_options if config else ():
        setattr(converter, attribute, value)
    if kind == "fp32":
        return converter
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if kind == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    elif kind == "full_int8":

        def representative() -> Iterator[dict[str, Array]]:
            for feed in feeds:
                yield dict(feed)

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io_type = config.io_type if config else "float32"
        converter.inference_input_type = _tf_dtype(io_type)
        converter.inference_output_type = _tf_dtype(io_type)
    return converter


def _debug_dataset(
    context: PassContext, input_order: Sequence[str], limit: int
) -> Callable[[], Iterator[list[Array]]]:
    feeds = representative_feeds(context, limit)

    def dataset() -> Iterator[list[Array]]:
        for feed in feeds:
            yield [feed[name] for name in input_order]

    return dataset


def _input_order(saved_model: Path, context: PassContext) -> list[str]:
    """The interpreter's input order (the debugger feeds inputs by position)."""
    from edgekit.runtimes import LiteRtBackend

    content = make_converter(saved_model, "fp32", context).convert()
    return [spec.name for spec in LiteRtBackend(content).inputs]


def _debugger(
    saved_model: Path,
    context: PassContext,
    config: TfliteConvertConfig,
    float_layers: Sequence[str],
) -> Any:
    tf = _tf()
    converter = make_converter(
        saved_model,
        "full_int8",
        context,
        config=replace(config, float_layers=()),
    )
    # The debugger quantizes with float I/O itself; the I/O type is applied afterwards.
    converter.inference_input_type = tf.float32
    converter.inference_output_type = tf.float32
    options = tf.lite.experimental.QuantizationDebugOptions(
        denylisted_nodes=list(float_layers) or None
    )
    order = _input_order(saved_model, context)
    return tf.lite.experimental.QuantizationDebugger(
        converter=converter,
        debug_dataset=_debug_dataset(context, order, _DEBUG_SAMPLES),
        debug_options=options,
    )


def _quantize_with_float_layers(
    saved_model: Path, context: PassContext, config: TfliteConvertConfig
) -> bytes:
    """Full int8 with `config.float_layers` left in float (selective quantization)."""
    from tensorflow.lite.python.util import modify_model_io_type

    debugger = _debugger(saved_model, context, config, config.float_layers)
    content: bytes = debugger.get_nondebug_quantized_model()
    if config.io_type != "float32":
        # Inputs/outputs next to a float layer stay float: TF keeps their original type.
        io_type = _tf_dtype(config.io_type)
        content = modify_model_io_type(content, io_type, io_type)
    return content


def rank_tflite_layers(
    saved_model: Path, context: PassContext, config: TfliteConvertConfig
) -> list[tuple[str, float]]:
    """Layers of the full-int8 model by quantization error, worst first: (tensor, rmse/scale).

    From TensorFlow's quantization debugger: the root mean squared difference between each
    layer's float and dequantized int8 output, in units of the layer's quantization step (1 is
    one step; above ~0.7 the layer loses more than rounding alone explains).
    """
    with _quiet_converter():
        debugger = _debugger(saved_model, context, config, ())
        # Read before run(): it rebuilds the debugger's interpreter with other tensor indices.
        edge = _io_adjacent_tensors(debugger) if config.io_type != "float32" else set()
        debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    ranked = []
    for row in csv.DictReader(io.StringIO(dump.getvalue())):
        try:
            scale = float(row["scale"])
            mse = float(row["mean_squared_error"])
        except (KeyError, ValueError):
            continue
        if not scale or not np.isfinite(mse):
            continue
        ranked.append((row["tensor_name"], float(np.sqrt(mse) / scale)))
    # A float layer next to a graph input or output leaves that input or output in float32
    # (TF keeps its original type): never offered for an int8/uint8-I/O profile.
    ranked = [item for item in ranked if item[0] not in edge]
    ranked.sort(key=lambda item: item[1], reverse=True)
    return ranked


_IO_PASSTHROUGH_OPS = {"QUANTIZE", "DEQUANTIZE"}


def _io_adjacent_tensors(debugger: Any) -> set[str]:
    """Names of the tensors whose op reads a graph input or writes a graph output, looking
    through the QUANTIZE/DEQUANTIZE ops the float-I/O debug model has at its edges."""
    # Private attributes: the debugger keeps its model there and relies on _get_ops_details.
    interpreter = debugger._quant_interpreter
    ops = interpreter._get_ops_details()
    names = {int(t["index"]): str(t["name"]) for t in interpreter.get_tensor_details()}
    producer = {int(out): op for op in ops for out in op["outputs"]}
    edge: set[int] = set()
    inputs = {int(d["index"]) for d in interpreter.get_input_details()}
    frontier = set(inputs)
    while frontier:
        reached: set[int] = set()
        for op in ops:
            if not frontier & {int(i) for i in op["inputs"]}:
                continue
            outs = {int(o) for o in op["outputs"]}
            if op["op_name"] in _IO_PASSTHROUGH_OPS:
                reached |= outs - inputs
            else:
                edge |= outs
        inputs |= reached
        frontier = reached
    for detail in interpreter.get_output_details():
        tensor = int(detail["index"])
        seen: set[int] = set()
        while tensor in producer and tensor not in seen:
            seen.add(tensor)
            op = producer[tensor]
            edge.add(tensor)
            if op["op_name"] not in _IO_PASSTHROUGH_OPS or not len(op["inputs"]):
                break
            tensor = int(op["inputs"][0])
    return {names[index] for index in edge if index in names}


# Candidate kind -> the ai-edge-quantizer recipe that builds it, and the I/O type it gives.
LITERT_QUANTIZER_RECIPES: dict[str, tuple[str, str]] = {
    "dynamic_int8": ("dynamic_wi8_afp32", "float32"),
    "full_int8": ("static_wi8_ai8", "int8"),
}


def litert_quantizer_available() -> bool:
    """Whether ai-edge-quantizer (the LiteRT quantizer) is installed."""
    return importlib.util.find_spec("ai_edge_quantizer") is not None


@dataclass(frozen=True)
class LiteRtQuantizeConfig:
    """One ai-edge-quantizer run (see `LITERT_QUANTIZER_RECIPES`)."""

    kind: Literal["dynamic_int8", "full_int8"]
    calibration_samples: int = _CALIBRATION_SAMPLES


class LiteRtQuantizePass(Pass):
    """The LiteRT quantizer (ai-edge-quantizer) on the float32 TFLite model of the SavedModel.

    A second source for the int8 candidates besides TFLiteConverter; validation and the
    benchmark decide which one ships.
    """

    name = "litert_quantize"

    def __init__(self, config: LiteRtQuantizeConfig) -> None:
        self.config = config

    @classmethod
    def config_for(cls, profile: Profile, **options: Any) -> LiteRtQuantizeConfig:
        return configure(LiteRtQuantizeConfig(kind="dynamic_int8"), options, cls.name)

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        if source.suffix == ".tflite":  # a float32 model already (litert-torch's)
            float_model = source.read_bytes()
        else:
            try:
                with _quiet_converter():
                    float_model = bytes(make_converter(source, "fp32", context).convert())
            except Exception as e:  # TFLiteConverter raises ConverterError/ValueError/...
                raise ConversionError(f"TFLiteConverter cannot build fp32: {first_line(e)}") from e
        feeds = (
            representative_feeds(context, self.config.calibration_samples)
            if self.config.kind == "full_int8"
            else []
        )
        content, details = quantize_with_litert(
            float_model, self.config.kind, calibration=feeds, threads=context.threads
        )
        destination.write_bytes(content)
        return PassResult(details=details)


def quantize_with_litert(
    float_model: bytes,
    kind: Literal["dynamic_int8", "full_int8"],
    *,
    calibration: Sequence[Mapping[str, Array]] = (),
    threads: int = 1,
) -> tuple[bytes, dict[str, Any]]:
    """A float32 TFLite model quantized by ai-edge-quantizer (`LITERT_QUANTIZER_RECIPES`);
    full int8 calibrates on `calibration` feeds (keyed by the model's signature names).
    Used for TFLiteConverter's fp32 output and for float models from litert-torch alike."""
    try:
        quantizer = importlib.import_module("ai_edge_quantizer.quantizer")
        recipe = importlib.import_module("ai_edge_quantizer.recipe")
    except ImportError as e:
        raise ConversionError(
            "the LiteRT quantizer is not installed: pip install ai-edge-quantizer"
        ) from e
    from importlib import metadata

    recipe_name, io_type = LITERT_QUANTIZER_RECIPES[kind]
    if kind == "full_int8" and not calibration:
        raise ConversionError("full int8 needs calibration data; give --calibration")
    try:
        with _quiet_converter():
            engine = quantizer.Quantizer(float_model)
            engine.load_quantization_recipe(getattr(recipe, recipe_name)())
            calibrated = None
            if kind == "full_int8":
                calibrated = engine.calibrate(
                    {SIGNATURE_KEY: [dict(feed) for feed in calibration]},
                    num_threads=max(1, threads),
                )
            result = engine.quantize(
                calibrated, enable_progress_bar=False, enable_progress_report=False
            )
    except Exception as e:  # the quantizer raises ValueError/RuntimeError, undocumented
        raise ConversionError(f"ai-edge-quantizer cannot build {kind}: {first_line(e)}") from e
    if result.quantized_model is None:
        raise ConversionError(f"ai-edge-quantizer built no model for {kind}")
    return bytes(result.quantized_model), {
        "converter": f"ai-edge-quantizer {metadata.version('ai-edge-quantizer')}",
        "recipe": recipe_name,
        "kind": kind,
        "io_type": io_type,
    }


@dataclass(frozen=True)
class Tf2OnnxConfig:
    """ONNX opset for the export (the compat pass lowers it further when a profile needs)."""

    opset: int = 17
    extra: Mapping[str, Any] = field(default_factory=dict)


class Tf2OnnxPass(Pass):
    """Export the SavedModel's serving signature as ONNX with tf2onnx."""

    name = "tf2onnx"

    def __init__(self, config: Tf2OnnxConfig | None = None) -> None:
        self.config = config or Tf2OnnxConfig()

    @classmethod
    def config_for(cls, profile: Profile, **options: Any) -> Tf2OnnxConfig:
        return configure(Tf2OnnxConfig(), options, cls.name)

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        _tf()
        try:
            import tf2onnx
        except ImportError as e:
            raise ConversionError(
                "converting a TensorFlow model for an onnx profile needs tf2onnx: "
                "pip install 'edgekit[tflite]'"
            ) from e
        from tf2onnx import tf_loader

        try:
            graph_def, inputs, outputs, renames = tf_loader.from_saved_model(
                str(source),
                None,
                None,
                tag="serve",
                signatures=[SIGNATURE_KEY],
                return_tensors_to_rename=True,
            )
            # Inputs and outputs keep the signature's names (pixels, logits).
            tf2onnx.convert.from_graph_def(
                graph_def,
                input_names=inputs,
                output_names=outputs,
                opset=self.config.opset,
                tensors_to_rename=renames,
                output_path=str(destination),
            )
        except Exception as e:  # tf2onnx raises whatever TF or its handlers raise
            raise ConversionError(
                f"tf2onnx cannot export the model: {first_line(e)}; try a tflite profile"
            ) from e
        return PassResult(
            details={"converter": f"tf2onnx {tf2onnx.__version__}", "opset": self.config.opset}
        )
