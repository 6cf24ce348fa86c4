"""edgekit: take a trained model from a workstation to a fleet of small devices."""

from edgekit.errors import (
    BundleError,
    ConversionError,
    EdgekitError,
    HealthCheckError,
    InputDataError,
    ProfileError,
    TransportError,
)

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "ConversionError",
    "EdgekitError",
    "HealthCheckError",
    "InputDataError",
    "ProfileError",
    "TransportError",
    "__version__",
]
