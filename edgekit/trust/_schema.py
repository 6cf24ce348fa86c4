"""Strict JSON reading shared by the envelope, manifest, directive and trust store parsers.

Everything here turns malformed input into the caller's `BundleError` subclass: arbitrary
bytes must never escape as `ValueError`, `RecursionError` or `UnicodeError`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from types import MappingProxyType
from typing import NoReturn

from edgekit.trust.errors import BundleError

__all__ = [
    "MAX_JSON_DEPTH",
    "NAME_PATTERN",
    "SEMVER_PATTERN",
    "Fields",
    "canonical_json",
    "format_rfc3339",
    "freeze_json",
    "load_json_object",
    "parse_rfc3339",
    "thaw_json",
]

_RFC3339_UTC = re.compile(
    r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})T(?P<h>\d{2}):(?P<mi>\d{2}):(?P<s>\d{2})"
    r"(?:\.(?P<frac>\d{1,6}))?Z",
    re.ASCII,
)
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")

SEMVER_PATTERN = re.compile(
    r"(?=.{5,128}\Z)(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?",
    re.ASCII,
)
"""Semantic Versioning 2.0.0 (semver.org's regular expression), at most 128 characters."""
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Bundle and profile names: safe in file names and topics."""


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Two parsers that pick different duplicates see different documents under one signature.
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text!r} is not finite")
    return value


def _reject_constant(text: str) -> NoReturn:
    raise ValueError(f"{text} is not JSON")


MAX_JSON_DEPTH = 32
"""Deepest nesting accepted in signed JSON: later recursive code stays far from Python's limit."""


def _check_structure(value: object, *, max_depth: int) -> None:
    # Walk without recursion: bound the nesting depth, and refuse lone surrogates ("\ud800"
    # parses into a str that cannot be encoded back to UTF-8).
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            item.encode("utf-8")
        elif isinstance(item, dict | list):
            if depth >= max_depth:
                raise ValueError(f"nesting deeper than {max_depth} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    key.encode("utf-8")
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)


def load_json_object(
    data: bytes,
    *,
    what: str,
    error: type[BundleError],
    hint: str = "",
    max_depth: int = MAX_JSON_DEPTH,
) -> dict[str, object]:
    """Parse UTF-8 JSON holding one object, strictly.

    Refused: duplicate keys, NaN/Infinity, non-finite numbers, lone surrogates, and nesting
    deeper than `max_depth`.
    """
    try:
        text = data.decode("utf-8")
        value = json.loads(
            text,
            object_pairs_hook=_reject_duplicates,
            parse_float=_finite_float,
            parse_constant=_reject_constant,
        )
        _check_structure(value, max_depth=max_depth)
    except (ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError, UnicodeDecodeError/EncodeError, huge integers.
        raise error(f"{what} is not valid JSON: {e}.{hint}") from e
    if not isinstance(value, dict):
        raise error(f"{what} must be a JSON object; found {type(value).__name__}.{hint}")
    return value


def canonical_json(value: object) -> bytes:
    """Serialize JSON deterministically: sorted keys, no whitespace, UTF-8."""
    return json.dumps(
        thaw_json(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def freeze_json(value: object) -> object:
    """Return a read-only copy of a JSON value (mappings become proxies, lists tuples)."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): freeze_json(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze_json(v) for v in value)
    return value


def thaw_json(value: object) -> object:
    """Undo `freeze_json`: plain dicts and lists that `json.dumps` accepts."""
    if isinstance(value, Mapping):
        return {str(k): thaw_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [thaw_json(v) for v in value]
    return value


def parse_rfc3339(text: str, *, what: str, error: type[BundleError]) -> datetime:
    """Parse an RFC 3339 UTC timestamp ending in `Z` into an aware datetime."""
    match = _RFC3339_UTC.fullmatch(text)
    if match is None:
        raise error(
            f"{what} must be an RFC 3339 UTC time like 2025-01-31T12:00:00Z; found {text!r}"
        )
    fraction = (match["frac"] or "").ljust(6, "0")
    try:
        return datetime(
            int(match["y"]),
            int(match["mo"]),
            int(match["d"]),
            int(match["h"]),
            int(match["mi"]),
            int(match["s"]),
            int(fraction),
            tzinfo=timezone.utc,
        )
    except ValueError as e:
        raise error(f"{what} is not a real date and time: {text!r} ({e})") from e


def format_rfc3339(moment: datetime) -> str:
    """Format an aware datetime as RFC 3339 UTC (`...Z`), microseconds only when non-zero."""
    if moment.tzinfo is None:
        raise ValueError("datetime must be timezone-aware")
    utc = moment.astimezone(timezone.utc)
    if utc.microsecond:
        return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def _short(text: str, *, limit: int = 80, quote: bool = True) -> str:
    # Untrusted strings end up in messages: keep them readable and bounded.
    clipped = text if len(text) <= limit else text[:limit] + "..."
    return repr(clipped) if quote else clipped


class Fields:
    """Typed access to one JSON object's fields, raising `error` naming the field on mismatch."""

    def __init__(self, data: Mapping[str, object], *, what: str, error: type[BundleError]) -> None:
        self._data = data
        self._what = what
        self._error = error

    def fail(self, message: str) -> NoReturn:
        """Raise this document's error type with `what` as context."""
        raise self._error(f"{self._what}: {message}")

    def only(self, allowed: Sequence[str], *, optional: Sequence[str] = ()) -> None:
        """Require exactly the `allowed` keys (plus any of `optional`): no unknown fields."""
        missing = [key for key in allowed if key not in self._data]
        if missing:
            self.fail(f"missing field(s) {', '.join(missing)}")
        unknown = sorted(set(self._data) - set(allowed) - set(optional))
        if unknown:
            shown = ", ".join(_short(key) for key in unknown[:5])
            self.fail(f"unknown field(s) {shown}; expected only {sorted((*allowed, *optional))}")

    def has(self, key: str) -> bool:
        """Whether the field is present."""
        return key in self._data

    def raw(self, key: str) -> object:
        """The field's value, any type."""
        if key not in self._data:
            self.fail(f"missing field {key!r}")
        return self._data[key]

    def string(self, key: str, *, pattern: re.Pattern[str] | None = None, hint: str = "") -> str:
        """A string field, optionally matching `pattern` entirely."""
        value = self.raw(key)
        if not isinstance(value, str):
            self.fail(f"{key!r} must be a string; found {type(value).__name__}")
        if pattern is not None and pattern.fullmatch(value) is None:
            self.fail(f"{key!r} is {_short(value)}, which is not {hint or pattern.pattern}")
        return value

    def integer(self, key: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
        """An integer field (booleans refused) within optional bounds."""
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{key!r} must be an integer; found {type(value).__name__}")
        if minimum is not None and value < minimum:
            self.fail(f"{key!r} must be >= {minimum}; found {value}")
        if maximum is not None and value > maximum:
            self.fail(f"{key!r} must be <= {maximum}; found {value}")
        return value

    def sha256(self, key: str) -> str:
        """A lowercase hex sha256 digest."""
        return self.string(key, pattern=_HEX_SHA256, hint="64 lowercase hex digits (sha256)")

    def timestamp(self, key: str) -> datetime:
        """An RFC 3339 UTC timestamp field."""
        return parse_rfc3339(self.string(key), what=f"{self._what}: {key!r}", error=self._error)

    def mapping(self, key: str) -> dict[str, object]:
        """A JSON object field."""
        value = self.raw(key)
        if not isinstance(value, dict):
            self.fail(f"{key!r} must be an object; found {type(value).__name__}")
        return value

    def array(self, key: str) -> list[object]:
        """A JSON array field."""
        value = self.raw(key)
        if not isinstance(value, list):
            self.fail(f"{key!r} must be an array; found {type(value).__name__}")
        return value

    def child(self, key: str) -> Fields:
        """`Fields` over a nested object field."""
        return Fields(
            self.mapping(key), what=f"{self._what}.{_short(key, quote=False)}", error=self._error
        )

    def item(self, value: object, *, what: str) -> Fields:
        """`Fields` over an element of an array (which must be an object)."""
        if not isinstance(value, dict):
            self.fail(f"{what} must be an object; found {type(value).__name__}")
        return Fields(value, what=f"{self._what}: {what}", error=self._error)
