"""Candidates as data: each kind is a recipe of passes, built the same way for both formats.

A recipe is a tuple of `Step`s (pass name + options over the profile's defaults); building a
candidate runs its steps in order from the prepared source (the optimized, canonical ONNX
model or the SavedModel), then the format's finishing steps. The accuracy fallback rebuilds a
recipe with one option changed (the tensors kept in float), so it needs no code of its own per
kind beyond the ranking (`edgekit.converters.fallback`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgekit.converters.benchmark import LatencySamples, Measurement, compressed_size, file_size
from edgekit.converters.passes.base import PassContext, Step

from edgekit.accuracy import ValidationResult
from edgekit.errors import ConversionError, EdgekitError
from edgekit.profiles import Profile, TargetFormat

__all__ = [
    "CANDIDATE_ORDER",
    "CandidateReport",
    "Recipe",
    "build_candidate",
    "recipes_for",
]

# Candidate kind -> the passes that build it from the optimized fp32 model.
_ONNX_RECIPES: dict[str, tuple[Step, ...]] = {
    "fp32": (),
    "weight_int8": (Step.of("weight_int8"),),
    "dynamic_int8": (Step.of("dynamic_int8"),),
    "static_int8": (Step.of("static_int8"),),
    "fp16": (Step.of("fp16"),),
    "pruned": (Step.of("prune"), Step.of("weight_int8")),
}
_ONNX_FINISH = (Step.of("compat"),)

# TFLite kinds: one TFLiteConverter (or LiteRT quantizer) run from the SavedModel, then the
# operator-version and I/O-type check against the profile.
_TFLITE_RECIPES: dict[str, tuple[Step, ...]] = {
    "fp32": (Step.of("tflite_convert", kind="fp32"),),
    "fp16": (Step.of("tflite_convert", kind="fp16"),),
    "dynamic_int8": (Step.of("tflite_convert", kind="dynamic_int8"),),
    "full_int8": (Step.of("tflite_convert", kind="full_int8"),),
    # Magnitude pruning of the dynamic-range int8 model's weights (int8 per channel, set to the
    # zero point): the same recipe as ONNX's prune + weight_int8, pruned after quantizing
    # because TFLiteConverter would quantize the zeros away from zero. Its gain is the zstd size.
    "pruned": (Step.of("tflite_convert", kind="dynamic_int8"), Step.of("tflite_prune")),
    "dynamic_int8_aeq": (Step.of("litert_quantize", kind="dynamic_int8"),),
    "full_int8_aeq": (Step.of("litert_quantize", kind="full_int8"),),
}
_TFLITE_IO = {"full_int8": "profile", "full_int8_aeq": "int8"}

# TFLite kinds built from a float32 .tflite (litert-torch's) rather than a SavedModel: only the
# LiteRT quantizer and the TFLite pruner read one. fp32 is the file itself (op_versions checks
# and copies it); fp16 needs TFLiteConverter and is not built.
_FLOAT_TFLITE_RECIPES: dict[str, tuple[Step, ...]] = {
    "fp32": (),
    "pruned": (Step.of("tflite_prune"),),
    "dynamic_int8_aeq": (Step.of("litert_quantize", kind="dynamic_int8"),),
    "full_int8_aeq": (Step.of("litert_quantize", kind="full_int8"),),
}

# The fixed order that breaks ties (and orders rows in the report).
CANDIDATE_ORDER: tuple[str, ...] = (
    "fp32",
    "weight_int8",
    "pruned",
    "fp16",
    "dynamic_int8",
    "dynamic_int8_aeq",
    "static_int8",
    "full_int8",
    "full_int8_aeq",
)


@dataclass(frozen=True)
class Recipe:
    """A candidate's name, target format and the steps that build it."""

    name: str
    target: TargetFormat
    steps: tuple[Step, ...]

    @property
    def suffix(self) -> str:
        """File suffix of what it builds."""
        return f".{self.target}"

    def with_option(self, pass_name: str, **options: Any) -> Recipe:
        """The same recipe with options set on its `pass_name` step."""
        steps = []
        found = False
        for step in self.steps:
            if step.pass_name == pass_name:
                merged = {**dict(step.options), **options}
                steps.append(Step(step.pass_name, tuple(sorted(merged.items()))))
                found = True
            else:
                steps.append(step)
        if not found:
            raise ConversionError(f"candidate {self.name} has no {pass_name} step")
        return replace(self, steps=tuple(steps))


def recipes_for(kind: str, target: TargetFormat, *, float_tflite: bool = False) -> list[Recipe]:
    """The recipe(s) for a profile's candidate kind: a TFLite int8 kind also gets its LiteRT
    quantizer twin (`<kind>_aeq`), which the pipeline may skip. With `float_tflite` (the
    candidates start from a float32 .tflite), the int8 kinds are only their `_aeq` twins."""
    if float_tflite:
        return _float_tflite_recipes(kind)
    table = _ONNX_RECIPES if target == "onnx" else _TFLITE_RECIPES
    if kind not in table:
        formats = "onnx" if target == "onnx" else "tflite"
        raise ConversionError(
            f"candidate kind {kind} is not built for {formats} profiles (built: "
            f"{', '.join(sorted(name for name in table if not name.endswith('_aeq')))})"
        )
    names = [kind]
    if target == "tflite" and f"{kind}_aeq" in table:
        names.append(f"{kind}_aeq")
    recipes = []
    for name in names:
        if target == "onnx":
            steps = (*_ONNX_RECIPES[name], *_ONNX_FINISH)
        else:
            io_type = _TFLITE_IO.get(name, "float32")
            steps = (*_TFLITE_RECIPES[name], Step.of("op_versions", io_type=io_type))
        recipes.append(Recipe(name=name, target=target, steps=steps))
    return recipes


def _float_tflite_recipes(kind: str) -> list[Recipe]:
    name = kind if kind in _FLOAT_TFLITE_RECIPES else f"{kind}_aeq"
    if name not in _FLOAT_TFLITE_RECIPES:
        raise ConversionError(
            f"{kind} is not built from litert-torch's float32 model (it needs TFLiteConverter "
            "and a SavedModel)"
        )
    io_type = _TFLITE_IO.get(name, "float32")
    steps = (*_FLOAT_TFLITE_RECIPES[name], Step.of("op_versions", io_type=io_type))
    return [Recipe(name=name, target="tflite", steps=steps)]


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
    latency: LatencySamples | None = None
    measurement: Measurement | None = None
    size_bytes: int | None = None
    compressed_size_bytes: int | None = None
    float_tensors: tuple[str, ...] = ()
    fallback: dict[str, Any] = field(default_factory=dict)
    equal_to: str | None = None  # same folded graph as this candidate: equal latency
    comparison: dict[str, Any] = field(default_factory=dict)
    verdict: str = "lost"  # chosen | lost | reference
    reason: str = ""

    @property
    def usable(self) -> bool:
        """Built, loaded, validated and measured."""
        return (
            self.status == "ok"
            and self.validation is not None
            and self.measurement is not None
            and self.latency is not None
        )

    def fail(self, error: str, *, reason: str | None = None) -> None:
        """Mark the candidate failed with `error` (`reason`: the report's one-line why)."""
        self.status = "failed"
        self.error = error
        self.reason = reason or f"failed: {error}"

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
                {"p50": self.latency.p50_ms, "p95": self.latency.p95_ms, "p99": self.latency.p99_ms}
                if self.latency
                else None
            ),
            "latency": self.latency.to_dict() if self.latency else None,
            "equal_latency_to": self.equal_to,
            "comparison": self.comparison,
            "memory": self.measurement.to_dict() if self.measurement else None,
            "peak_memory_bytes": self.measurement.peak_memory_bytes if self.measurement else None,
            "size_bytes": self.size_bytes,
            "compressed_size_bytes": self.compressed_size_bytes,
            "float_nodes": list(self.float_tensors),
            "fallback": self.fallback,
            "verdict": self.verdict,
            "reason": self.reason,
        }


def build_candidate(
    recipe: Recipe,
    source: Path,
    context: PassContext,
    *,
    label: str | None = None,
) -> CandidateReport:
    """Run `recipe` from `source` in the scratch folder; failures are recorded, not raised."""
    name = label or recipe.name
    candidate = CandidateReport(name=name, passes=tuple(str(step) for step in recipe.steps))
    current = source
    try:
        for index, step in enumerate(recipe.steps):
            last = index == len(recipe.steps) - 1
            out = context.workdir / (
                f"{name}{recipe.suffix}"
                if last
                else f"{name}-{index}-{step.pass_name}{recipe.suffix}"
            )
            try:
                result = step.build(context.profile).run(current, out, context)
            except EdgekitError as e:
                details = getattr(e, "details", None)
                if isinstance(details, dict):
                    candidate.details[step.pass_name] = details
                raise
            candidate.notes.extend(result.notes)
            candidate.details[step.pass_name] = result.details
            current = out
    except EdgekitError as e:
        candidate.fail(str(e), reason=f"failed to build: {e}")
        return candidate
    if current == source:  # a recipe without steps (none today): the source itself
        out = context.workdir / f"{name}{recipe.suffix}"
        out.write_bytes(source.read_bytes())
        current = out
    candidate.path = current
    candidate.size_bytes = file_size(current)
    candidate.compressed_size_bytes = compressed_size(current)
    return candidate


def order_key(name: str) -> int:
    """Position of a candidate kind in `CANDIDATE_ORDER` (unknown names last)."""
    base = name.split("-", 1)[0]
    return CANDIDATE_ORDER.index(base) if base in CANDIDATE_ORDER else len(CANDIDATE_ORDER)


def profile_recipes(profile: Profile) -> list[Recipe]:
    """Every recipe the profile's candidate list asks for, in the profile's order."""
    found: list[Recipe] = []
    for kind in profile.quantization.candidates:
        found.extend(recipes_for(kind, profile.target_format))
    return found
