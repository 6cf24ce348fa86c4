"""The pass registry: each conversion step is a class with a typed config and one `run` method.

Subclasses register themselves by `name` (Olive's `__init_subclass__` registry). A pass imports
its heavy library inside `run`, so importing the registry costs nothing on a device.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from edgekit.errors import ConversionError
from edgekit.profiles import Profile

__all__ = ["Pass", "PassContext", "PassResult", "get_pass", "registered_passes"]

log = logging.getLogger(__name__)

_REGISTRY: dict[str, type[Pass]] = {}


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


class Pass(abc.ABC):
    """One conversion step: read the model at `source`, write the result to `destination`."""

    name: ClassVar[str]

    def __init__(self, config: Any = None) -> None:
        self.config = config

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
