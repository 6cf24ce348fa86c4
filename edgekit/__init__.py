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
from edgekit.quiet import configure_environment as _configure_environment

__version__ = "0.1.0"

# Before any framework is imported: no onnxruntime telemetry, no TensorFlow INFO chatter
# (each only when the variable is not set already; see edgekit.quiet).
_configure_environment()

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
