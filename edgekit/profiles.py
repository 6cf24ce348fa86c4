"""Device profiles: what is true of a device class and what the converter must produce for it.

A profile is a YAML file. Built-in profiles ship in the `profiles/` folder of the repository
(installed as `edgekit.profiles_builtin`); users add their own by path, optionally starting from a
built-in one with `extends: NAME`. Every field is typed and checked; an invalid profile raises
`ProfileError` naming the field (`quantization.calibration_method: expected one of ...`).
"""

from __future__ import annotations

import dataclasses
import platform
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from edgekit.errors import ProfileError

__all__ = [
    "EMULATED_CPUS",
    "AccuracyTolerance",
    "Budgets",
    "HealthCheckTolerance",
    "ImagePreprocessing",
    "OutputKind",
    "Profile",
    "PruningSpec",
    "QuantizationSpec",
    "RuntimePin",
    "RuntimeRange",
    "builtin_profile_names",
    "host_arch",
    "load_profile",
    "parse_profile",
]

TargetFormat = Literal["onnx", "tflite"]
RuntimePackage = Literal["onnxruntime", "tflite-runtime", "ai-edge-litert", "tensorflow"]
CandidateKind = Literal[
    "fp32", "weight_int8", "dynamic_int8", "static_int8", "fp16", "full_int8", "pruned"
]
CalibrationMethod = Literal["minmax", "entropy", "percentile"]
QuantFormat = Literal["qdq", "qoperator"]
IntType = Literal["int8", "uint8"]
IoType = Literal["float32", "int8", "uint8"]
Priority = Literal["latency", "size"]
Layout = Literal["NCHW", "NHWC"]
OutputKind = Literal["classifier", "map", "regression", "state"]

# The CPU models a profile may name in `cpu:`, per architecture: the ones user-mode QEMU
# (Debian bookworm's 7.2) emulates and `edgekit.emulation` knows the /proc/cpuinfo of.
# QEMU's `max` is left out on purpose: it enables SVE, which no Raspberry Pi has, and runs
# about 20 times slower.
EMULATED_CPUS: dict[str, tuple[str, ...]] = {
    "aarch64": (
        "cortex-a35",
        "cortex-a53",
        "cortex-a57",
        "cortex-a72",
        "cortex-a76",
        "neoverse-n1",
    ),
}


@dataclass(frozen=True)
class RuntimePin:
    """One runtime release: the pip package and its exact version."""

    package: RuntimePackage
    version: str


@dataclass(frozen=True)
class RuntimeRange:
    """The runtime versions an artifact must load on: the oldest and newest the fleet runs."""

    oldest: RuntimePin
    newest: RuntimePin


@dataclass(frozen=True)
class QuantizationSpec:
    """Which candidates the converter tries and how it quantizes them."""

    candidates: tuple[CandidateKind, ...] = ("fp32", "weight_int8", "dynamic_int8", "static_int8")
    format: QuantFormat = "qdq"
    per_channel: bool = True
    calibration_method: CalibrationMethod = "minmax"
    activation_type: IntType = "int8"
    weight_type: IntType = "int8"
    # Input/output tensor type of full-int8 TFLite models (Coral wants uint8).
    io_type: IoType = "float32"
    # Builds the accuracy fallback may spend searching for the fewest tensors kept in float.
    fallback_attempts: int = 8
    # A candidate beats a smaller or earlier one only when its latency ratio's confidence
    # interval lies entirely below 1 - min_speedup. 10%: a paired interval from one process
    # does not cover what changes between processes (measured: a 0.958 ratio moved by +-0.01
    # between conversions), and a host's few-percent difference says little about a device.
    min_speedup: float = 0.10


@dataclass(frozen=True)
class PruningSpec:
    """Unstructured magnitude pruning: fraction of weights set to zero (0 disables it)."""

    sparsity: float = 0.0
    # Tensors smaller than this keep all their weights (biases, norms).
    min_tensor_elements: int = 1024


@dataclass(frozen=True)
class Budgets:
    """Limits of the device class; None means no limit."""

    max_model_bytes: int | None = None
    max_ram_bytes: int | None = None
    max_latency_ms: float | None = None  # p95 of one batch-1 inference on the target


@dataclass(frozen=True)
class AccuracyTolerance:
    """How close a candidate's outputs must stay to the original model's, per output.

    See docs/converter.md ("Accuracy decisions") for how sample size enters each limit.
    """

    min_top1_agreement: float = 0.99  # classifier outputs only
    min_cosine: float = 0.99
    min_snr_db: float | None = None
    max_abs_error: float | None = None
    min_iou: float = 0.9  # map outputs: mask IoU at map_threshold
    map_threshold: float | None = None  # None: 0.5 for maps within [0, 1], else 0 (logits)
    confidence: float = 0.95  # one-sided confidence of the bounds the decisions use
    # Output name -> classifier | map | regression | state (others are guessed).
    output_kinds: dict[str, OutputKind] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthCheckTolerance:
    """What the agent accepts when it replays the bundle's golden samples on the device."""

    rtol: float = 0.05
    atol: float = 0.05
    min_cosine: float = 0.98
    min_top1_agreement: float = 0.95

    def to_dict(self) -> dict[str, float]:
        """The form golden.npz stores as its `tolerance`."""
        return {
            "rtol": self.rtol,
            "atol": self.atol,
            "min_cosine": self.min_cosine,
            "min_top1_agreement": self.min_top1_agreement,
        }


@dataclass(frozen=True)
class ImagePreprocessing:
    """How a folder of images becomes model input."""

    size: tuple[int, int] = (224, 224)  # height, width in pixels
    layout: Layout = "NCHW"
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: float = 1.0 / 255.0  # applied to raw 0..255 pixels before mean/std
    grayscale: bool = False
    dtype: Literal["float32", "uint8", "int8"] = "float32"


@dataclass(frozen=True)
class Profile:
    """A device class and what the converter must produce for it."""

    name: str
    description: str
    target_format: TargetFormat
    runtime: RuntimeRange
    arch: str = "aarch64"
    # The device's CPU models (`cortex-a72` for a Pi 4, `cortex-a76` for a Pi 5): verify-runtime
    # runs the golden samples under emulation of each. One name or a list in YAML.
    cpu: tuple[str, ...] = ()
    ram_bytes: int | None = None
    threads: int = 4
    priority: Priority = "latency"
    quantization: QuantizationSpec = field(default_factory=QuantizationSpec)
    pruning: PruningSpec = field(default_factory=PruningSpec)
    budgets: Budgets = field(default_factory=Budgets)
    accuracy: AccuracyTolerance = field(default_factory=AccuracyTolerance)
    health_check: HealthCheckTolerance = field(default_factory=HealthCheckTolerance)
    preprocessing: ImagePreprocessing | None = None
    source: str = "<builtin>"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form (tuples become lists)."""
        plain: dict[str, Any] = _plain(dataclasses.asdict(self))
        return plain


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def host_arch() -> str:
    """This machine's architecture in profile terms (`x86_64`, `aarch64`)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def builtin_profile_names() -> list[str]:
    """Names of the profiles shipped with edgekit, sorted."""
    folder = resources.files("edgekit.profiles_builtin")
    return sorted(
        entry.name.removesuffix(".yaml")
        for entry in folder.iterdir()
        if entry.name.endswith(".yaml")
    )


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a built-in profile by name, or a user profile from a YAML file path."""
    text, source = _read_profile_text(name_or_path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ProfileError(f"{source}: not valid YAML ({e}); fix the file's syntax") from e
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: expected a mapping of profile fields, found {_kind(data)}")
    base = data.pop("extends", None)
    if base is not None:
        if not isinstance(base, str):
            raise ProfileError(f"{source}: extends: expected a profile name, found {_kind(base)}")
        parent = load_profile(base).to_dict()
        parent.pop("source", None)
        data = _merge(parent, data)
    return parse_profile(data, source=source)


def parse_profile(data: Mapping[str, Any], *, source: str = "<memory>") -> Profile:
    """Build a `Profile` from a mapping, checking every field; raises `ProfileError`."""
    fields = dict(data)
    fields.pop("source", None)
    if isinstance(fields.get("cpu"), str):
        fields["cpu"] = [fields["cpu"]]  # `cpu: cortex-a72` is a list of one
    profile = _build(Profile, fields, path="", source=source)
    profile = dataclasses.replace(profile, source=source)
    _check_semantics(profile, source)
    return profile


def _read_profile_text(name_or_path: str | Path) -> tuple[str, str]:
    candidate = Path(name_or_path)
    looks_like_path = isinstance(name_or_path, Path) or (
        "/" in str(name_or_path) or str(name_or_path).endswith((".yaml", ".yml"))
    )
    if looks_like_path:
        try:
            return candidate.read_text(encoding="utf-8"), str(candidate)
        except FileNotFoundError as e:
            raise ProfileError(
                f"profile file {candidate} does not exist; give a built-in name "
                f"({', '.join(builtin_profile_names())}) or a path to a YAML file"
            ) from e
        except (OSError, UnicodeDecodeError) as e:
            raise ProfileError(f"cannot read profile file {candidate}: {e}") from e
    name = str(name_or_path)
    resource = resources.files("edgekit.profiles_builtin").joinpath(f"{name}.yaml")
    if not resource.is_file():
        raise ProfileError(
            f"unknown profile {name!r}; built-in profiles: {', '.join(builtin_profile_names())} "
            "(or give a path to your own YAML file; see `edgekit profiles list`)"
        )
    return resource.read_text(encoding="utf-8"), f"builtin:{name}"


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _kind(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


T = typing.TypeVar("T")


def _build(cls: type[T], data: Any, *, path: str, source: str) -> T:
    if not isinstance(data, Mapping):
        raise ProfileError(
            f"{source}: {path or 'profile'}: expected a mapping, found {_kind(data)}"
        )
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProfileError(
            f"{source}: {path + '.' if path else ''}{unknown[0]}: unknown field; "
            f"expected one of {', '.join(sorted(known))}"
        )
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        field_path = f"{path}.{f.name}" if path else f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProfileError(f"{source}: {field_path}: required field is missing")
            continue
        values[f.name] = _coerce(hints[f.name], data[f.name], path=field_path, source=source)
    return cls(**values)


def _coerce(hint: Any, value: Any, *, path: str, source: str) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        non_none = [option for option in options if option is not type(None)]
        return _coerce(non_none[0], value, path=path, source=source)
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ProfileError(
                f"{source}: {path}: expected one of {', '.join(map(str, allowed))}, "
                f"found {_kind(value)}"
            )
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ProfileError(f"{source}: {path}: expected a mapping, found {_kind(value)}")
        key_hint, value_hint = get_args(hint)
        return {
            _coerce(key_hint, key, path=f"{path}.{key}", source=source): _coerce(
                value_hint, item, path=f"{path}.{key}", source=source
            )
            for key, item in value.items()
        }
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ProfileError(f"{source}: {path}: expected a list, found {_kind(value)}")
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(
                _coerce(args[0], item, path=f"{path}[{i}]", source=source)
                for i, item in enumerate(value)
            )
        if len(value) != len(args):
            raise ProfileError(
                f"{source}: {path}: expected a list of {len(args)} items, found {len(value)}"
            )
        return tuple(
            _coerce(arg, item, path=f"{path}[{i}]", source=source)
            for i, (arg, item) in enumerate(zip(args, value, strict=True))
        )
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type[Any], hint), value, path=path, source=source)
    if hint is bool:
        if not isinstance(value, bool):
            raise ProfileError(f"{source}: {path}: expected true or false, found {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProfileError(f"{source}: {path}: expected an integer, found {_kind(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProfileError(f"{source}: {path}: expected a number, found {_kind(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ProfileError(f"{source}: {path}: expected a string, found {_kind(value)}")
        return str(value)
    raise ProfileError(f"{source}: {path}: unsupported field type {hint!r}")  # pragma: no cover


def _check_semantics(profile: Profile, source: str) -> None:
    def fail(path: str, message: str) -> None:
        raise ProfileError(f"{source}: {path}: {message}")

    if profile.threads < 1:
        fail("threads", f"expected at least 1, found {profile.threads}")
    if not 0.0 <= profile.pruning.sparsity < 1.0:
        fail("pruning.sparsity", f"expected a fraction in [0, 1), found {profile.pruning.sparsity}")
    known_cpus = EMULATED_CPUS.get(profile.arch, ())
    for index, cpu in enumerate(profile.cpu):
        if cpu == "max":
            fail(
                f"cpu[{index}]",
                "QEMU's `max` CPU is no device (it takes SVE paths and runs ~20x slower); name "
                f"the device's core: one of {', '.join(known_cpus) or 'none for this arch'}",
            )
        if cpu not in known_cpus:
            fail(
                f"cpu[{index}]",
                f"expected an {profile.arch} CPU model edgekit can emulate "
                f"({', '.join(known_cpus) or 'none known for this arch'}), found {cpu!r}",
            )
    if len(set(profile.cpu)) != len(profile.cpu):
        fail("cpu", f"names a CPU twice: {list(profile.cpu)}")
    if not profile.quantization.candidates:
        fail("quantization.candidates", "expected at least one candidate kind")
    if "pruned" in profile.quantization.candidates and profile.pruning.sparsity <= 0.0:
        fail(
            "quantization.candidates",
            "pruned needs pruning.sparsity in (0, 1) (found 0: pruning disabled); set "
            "pruning.sparsity or drop pruned from the candidates",
        )
    if profile.quantization.fallback_attempts < 0:
        fail("quantization.fallback_attempts", "expected 0 or more")
    for name in ("min_top1_agreement", "min_cosine", "min_iou"):
        value = getattr(profile.accuracy, name)
        if not 0.0 <= value <= 1.0:
            fail(f"accuracy.{name}", f"expected a fraction in [0, 1], found {value}")
    if not 0.5 <= profile.accuracy.confidence < 1.0:
        fail(
            "accuracy.confidence",
            f"expected a level in [0.5, 1), found {profile.accuracy.confidence}",
        )
    if not 0.0 <= profile.quantization.min_speedup < 1.0:
        fail(
            "quantization.min_speedup",
            f"expected a fraction in [0, 1), found {profile.quantization.min_speedup}",
        )
    onnx_runtimes = {"onnxruntime"}
    for end in ("oldest", "newest"):
        pin: RuntimePin = getattr(profile.runtime, end)
        is_onnx_runtime = pin.package in onnx_runtimes
        if (profile.target_format == "onnx") != is_onnx_runtime:
            fail(
                f"runtime.{end}.package",
                f"{pin.package} does not run {profile.target_format} models",
            )
        if not re.fullmatch(r"\d+(\.\d+)*", pin.version, re.ASCII):
            fail(f"runtime.{end}.version", f"expected a version like 1.16.3, found {pin.version!r}")
    only_for = {"weight_int8": "onnx", "static_int8": "onnx", "full_int8": "tflite"}
    wrong = [
        kind
        for kind in profile.quantization.candidates
        if only_for.get(kind, profile.target_format) != profile.target_format
    ]
    if wrong:
        fail(
            "quantization.candidates",
            f"{', '.join(wrong)} cannot target {profile.target_format}; onnx profiles use "
            "fp32, weight_int8, dynamic_int8, static_int8, fp16, pruned; tflite profiles use "
            "fp32, fp16, dynamic_int8, full_int8, pruned",
        )
