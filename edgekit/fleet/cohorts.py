"""Cohorts: which devices each wave of a rollout updates.

A device's place in line is the sha256 of its id (optionally salted), so the same device is
always among the first to get an update, whichever rollout and whatever other devices the
selection holds. Waves are stratified by profile: each wave takes its share of every profile's
devices (at least one of each profile in the first wave), so a canary exercises every bundle
variant of the release. Pure module.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Literal

from edgekit.errors import EdgekitError

__all__ = [
    "STRATEGIES",
    "CohortError",
    "Strategy",
    "assign_waves",
    "device_rank",
    "parse_percent",
    "wave_fractions",
]

Strategy = Literal["all", "canary", "waves", "exponential"]
STRATEGIES: tuple[Strategy, ...] = ("all", "canary", "waves", "exponential")

# Cumulative fractions are compared after this rounding, so "33.3%,66.6%,100%" behaves.
_EPSILON = 1e-9


class CohortError(EdgekitError):
    """A rollout strategy or percentage that cannot describe waves."""


def parse_percent(text: str, *, what: str) -> float:
    """`"5%"` -> 0.05; a bare number is a fraction (`"0.05"`). Must be in (0, 1].

    A bare number of 1 or more (`"5"`) is refused, not read as 500%, 5 devices or everyone:
    the error asks whether 5% was meant.
    """
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise CohortError(f"{what} {text!r} is not a percentage: write e.g. 5% or 0.05") from None
    if not raw.endswith("%") and value >= 1:
        raise CohortError(
            f"{what} {raw}: did you mean {raw}%? A share is a percentage (5%) or a fraction "
            "(0.05), not a number of devices; every device is 100%"
        )
    if not (0 < value <= 1 + _EPSILON) or math.isnan(value):
        raise CohortError(f"{what} {text!r} must be above 0% and at most 100%")
    return min(value, 1.0)


def wave_fractions(
    strategy: Strategy,
    *,
    canary: float = 0.05,
    waves: Sequence[float] = (0.1, 0.5, 1.0),
    growth: float = 2.0,
) -> tuple[float, ...]:
    """Cumulative share of the selected devices updated after each wave (ends with 1.0).

    `all`: one wave. `canary`: `canary`, then everyone. `waves`: the explicit list, which
    must increase and end at 100%. `exponential`: `canary`, then multiplied by `growth` each
    wave until everyone.
    """
    if strategy == "all":
        return (1.0,)
    if strategy in ("canary", "exponential") and not 0 < canary <= 1:
        raise CohortError(f"canary share must be in (0, 1]; found {canary}")
    if strategy == "canary":
        return (canary, 1.0) if canary < 1 - _EPSILON else (1.0,)
    if strategy == "exponential":
        if growth <= 1:
            raise CohortError(f"exponential growth factor must be above 1; found {growth}")
        fractions = []
        share = canary
        while share < 1 - _EPSILON:
            fractions.append(share)
            share *= growth
        return (*fractions, 1.0)
    if strategy == "waves":
        values = tuple(waves)
        if not values:
            raise CohortError("--waves needs at least one percentage, e.g. 10%,50%,100%")
        for before, after in itertools.pairwise(values):
            if after <= before + _EPSILON:
                raise CohortError(
                    f"waves must increase: {before:.0%} is followed by {after:.0%} "
                    "(each wave is the cumulative share, e.g. 10%,50%,100%)"
                )
        if abs(values[-1] - 1.0) > _EPSILON:
            raise CohortError(
                f"the last wave must be 100% (found {values[-1]:.0%}): a rollout ends with "
                "every selected device updated; narrow the selection to update fewer"
            )
        return (*values[:-1], 1.0)
    raise CohortError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")


def device_rank(device: str, *, salt: str = "") -> int:
    """The device's stable place in line: the first 8 bytes of sha256(salt:device)."""
    digest = hashlib.sha256(f"{salt}:{device}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def assign_waves(
    devices: Mapping[str, str], fractions: Sequence[float], *, salt: str = ""
) -> list[list[str]]:
    """Split `devices` (device id -> profile) into waves, stratified by profile.

    Wave `i` holds, of every profile's devices ordered by `device_rank`, those between
    `ceil(fractions[i-1] * n)` and `ceil(fractions[i] * n)`. Waves that would be empty are
    dropped; each wave's ids are sorted.
    """
    if not fractions or abs(fractions[-1] - 1.0) > _EPSILON:
        raise CohortError("wave fractions must end with 1.0 so every device gets a wave")
    by_profile: dict[str, list[str]] = {}
    for device, profile in devices.items():
        by_profile.setdefault(profile, []).append(device)
    waves: list[list[str]] = [[] for _ in fractions]
    for members in by_profile.values():
        members.sort(key=lambda device: (device_rank(device, salt=salt), device))
        count = len(members)
        start = 0
        for index, fraction in enumerate(fractions):
            end = min(count, math.ceil(fraction * count - _EPSILON))
            waves[index].extend(members[start:end])
            start = max(start, end)
    return [sorted(wave) for wave in waves if wave]
