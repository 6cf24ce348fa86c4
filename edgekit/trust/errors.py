"""Why a bundle, envelope, manifest, directive, trust store or key was refused.

Every class here is a `BundleError`: the input is untrusted or broken, not edgekit's fault.
The hierarchy follows python-tuf's `tuf.api.exceptions`: callers that only care whether
something is trustworthy catch `BundleError`; callers that react to one rule (the agent
ignores an exact replay of the directive it already runs) catch the subclass. Messages say
what was expected, what was found, and what to do.
"""

from __future__ import annotations

from edgekit.errors import BundleError

__all__ = [
    "ArchiveError",
    "BundleError",
    "DirectiveError",
    "EnvelopeError",
    "EpochError",
    "ExpiredError",
    "HashMismatchError",
    "KeyringError",
    "LimitError",
    "ManifestError",
    "MissingFileError",
    "NotYetValidError",
    "ReplayError",
    "RotationError",
    "SchemaError",
    "SignatureError",
    "ThresholdError",
    "TrustStoreError",
    "TrustUpdateError",
    "UnexpectedFileError",
    "UnsafeMemberError",
    "UnsignedError",
    "UntrustedKeyError",
    "WrongTargetError",
]


class EnvelopeError(BundleError):
    """A DSSE envelope is malformed: not JSON, missing fields, bad base64, wrong payloadType."""


class SignatureError(BundleError):
    """The signatures on an envelope do not satisfy the signing policy."""


class ThresholdError(SignatureError):
    """Fewer distinct trusted keys produced a valid signature than the role's threshold."""


class UnsignedError(ThresholdError):
    """The envelope carries no signature at all."""


class UntrustedKeyError(ThresholdError):
    """The envelope is signed, but by none of the keys the role trusts."""


class SchemaError(BundleError):
    """A signed payload does not match its schema."""


class ManifestError(SchemaError):
    """A bundle manifest is invalid (schema, semver, paths, sizes, hashes)."""


class DirectiveError(SchemaError):
    """A deployment directive payload is invalid."""


class TrustStoreError(SchemaError):
    """A trust store payload is invalid, or an edit would make it invalid."""


class ArchiveError(BundleError):
    """The bundle's tar is malformed or not the canonical layout edgekit writes."""


class UnsafeMemberError(ArchiveError):
    """A tar member is unsafe: absolute path, traversal, link, device, fifo, duplicate name."""


class UnexpectedFileError(ArchiveError):
    """The tar holds a file the signed manifest does not list."""


class MissingFileError(ArchiveError):
    """A file the signed manifest lists is absent from the tar."""


class LimitError(BundleError):
    """A size or count limit was exceeded (envelope, member count, file, total, tar bomb)."""


class HashMismatchError(BundleError):
    """Bytes differ from what was signed: a file's length or sha256, or the whole bundle's."""


class EpochError(BundleError):
    """A security epoch is below the device's floor (a refused rollback)."""


class ReplayError(BundleError):
    """A message is not newer than one already accepted (sequence or version not above it).

    `found` and `last_accepted` let a caller tell an exact re-delivery (equal, e.g. a retained
    MQTT message seen again after reconnect) from an older message.
    """

    def __init__(self, message: str, *, found: int, last_accepted: int) -> None:
        super().__init__(message)
        self.found = found
        self.last_accepted = last_accepted


class ExpiredError(BundleError):
    """A directive or trust store has expired."""


class NotYetValidError(BundleError):
    """A directive was issued in the future, beyond the allowed clock skew."""


class WrongTargetError(BundleError):
    """A directive is addressed to another fleet or device."""


class RotationError(BundleError):
    """A new trust store version does not follow the root rotation rule."""


class TrustUpdateError(BundleError):
    """A trust message (or a provisioned trust store) cannot be applied: malformed, for
    another fleet, a broken chain, or a version that does not follow the rotation rule. The
    one error `edgekit.trust.rotation` raises; the rule's own error is its cause."""


class KeyringError(BundleError):
    """A signing key is missing, unreadable, malformed, or its passphrase is wrong."""
