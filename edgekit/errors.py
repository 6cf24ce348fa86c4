"""Exceptions, split by whose fault it is (python-tuf style).

Every message says what was expected, what was found, and what to do. The CLI turns any
`EdgekitError` into one line on stderr and exit code 2; anything else is a bug (exit 1).
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "ConversionError",
    "EdgekitError",
    "HealthCheckError",
    "InputDataError",
    "ProfileError",
    "TransportError",
    "first_line",
]


class EdgekitError(Exception):
    """Base of every error edgekit raises on purpose."""


class ProfileError(EdgekitError):
    """A device profile is unknown, unreadable or invalid."""


class ConversionError(EdgekitError):
    """A model cannot be converted as asked (bad model file, no candidate meets the profile)."""


class InputDataError(ConversionError):
    """Calibration or validation data does not match the model's inputs."""


class BundleError(EdgekitError):
    """A bundle, envelope, manifest or directive is untrusted or broken."""


class TransportError(EdgekitError):
    """Moving bytes failed (MQTT, HTTPS, local file)."""


class HealthCheckError(EdgekitError):
    """A model failed its health check on the device."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (third-party errors can run to pages)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
