"""The pass registry: each conversion step is a class with a typed config and one `run` method.

Subclasses register themselves by `name` (Olive's `__init_subclass__` registry). A pass imports
its heavy library inside `run`, so importing the registry costs nothing on a device. Each pass
derives its configuration from the device profile (`config_for`, like Olive's passes), so a
candidate is just data: a list of `Step`s, each a pass name and the options that make this
candidate differ from the profile's defaults.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from edgekit.errors import ConversionError
from edgekit.profiles import Profile

__all__ = [
    "Pass",
    "PassContext",
    "PassResult",
    "Step",
    "configure",
    "get_pass",
    "registered_passes",
]

log = logging.getLogger(__name__)

_REGISTRY: dict[str, type[Pass]] = {}
_Config = TypeVar("_Config")


def configure(config: _Config, options: Mapping[str, Any], pass_name: str) -> _Config:
    """`config` (a frozen dataclass) with the fields named in `options` replaced."""
    known = {item.name for item in fields(config)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConversionError(
            f"pass {pass_name} has no option {', '.join(unknown)}; it takes "
            f"{', '.join(sorted(known))}"
        )
    return replace(config, **options)  # type: ignore[type-var]


@dataclass(frozen=True)
class PassContext:
    """What every pass may read: the profile, a scratch folder and the data sets."""

    profile: Profile
    workdir: Path
    threads: int
    calibration: Any = None  # edgekit.converters.data.Dataset; Any keeps this module light
    validation: Any = None
    reference_path: Path | None = None  # the optimized fp32 model candidates compare against
    progress: Callable[[str], None] = field(default=lambda _message: None)


@dataclass(frozen=True)
class PassResult:
    """What a pass reports besides the file it wrote."""

    notes: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """One pass of a candidate's recipe: the pass name and options over the profile's config."""

    pass_name: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, pass_name: str, **options: Any) -> Step:
        """`Step.of("tflite_convert", kind="fp16")`."""
        return cls(pass_name, tuple(sorted(options.items())))

    def build(self, profile: Profile) -> Pass:
        """The pass, configured for `profile` with this step's options."""
        pass_class = get_pass(self.pass_name)
        return pass_class(pass_class.config_for(profile, **dict(self.options)))

    def __str__(self) -> str:
        if not self.options:
            return self.pass_name
        options = ", ".join(f"{key}={value}" for key, value in self.options)
        return f"{self.pass_name}({options})"


class Pass(abc.ABC):
    """One conversion step: read the model at `source`, write the result to `destination`."""

    name: ClassVar[str]

    def __init__(self, config: Any = None) -> None:
        self.config = config

    @classmethod
    def config_for(cls, profile: Profile, **options: Any) -> Any:
        """This pass's configuration for `profile`; `options` override single fields.

        Passes without settings return None; passes with a config dataclass override this.
        """
        if options:
            raise ConversionError(f"pass {cls.name} takes no options, got {sorted(options)}")
        return None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if abc.ABC in cls.__bases__:
            return
        if cls.name in _REGISTRY:
            raise TypeError(f"pass name {cls.name!r} registered twice")
        _REGISTRY[cls.name] = cls

    @abc.abstractmethod
    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        """Do the work; raise `ConversionError` with a reason on failure."""


def get_pass(name: str) -> type[Pass]:
    """The registered pass class called `name`."""
    try:
        return _REGISTRY[name]
    except KeyError as e:
        raise ConversionError(
            f"no conversion pass named {name!r}; registered: {', '.join(sorted(_REGISTRY))}"
        ) from e


def registered_passes() -> list[str]:
    """Names of every registered pass, sorted."""
    return sorted(_REGISTRY)
