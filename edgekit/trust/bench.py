"""Bench requests: what `edgekit convert --bench-device` asks one device to measure.

A bench request is a DSSE envelope (payloadType `application/vnd.edgekit.bench+json`) signed
by the trust store's `directives` role, like a deployment directive, but it can never install
anything: its payload type is not a directive's, it names model *files* (the candidates and
their `reference.npz`), not a bundle, and the agent only runs them in benchmark child
processes. Each file travels over the chunked MQTT transfer under its own sha256, and the
device checks every byte against the hashes signed here. Pure functions, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from edgekit.trust._schema import Fields, canonical_json, format_rfc3339, load_json_object
from edgekit.trust.directive import DEFAULT_CLOCK_SKEW_S
from edgekit.trust.dsse import (
    DEFAULT_MAX_ENVELOPE_BYTES,
    check_signatures,
    parse_envelope,
    sign_envelope,
)
from edgekit.trust.errors import (
    DirectiveError,
    EnvelopeError,
    ExpiredError,
    NotYetValidError,
    WrongTargetError,
)
from edgekit.trust.keys import Signer
from edgekit.trust.truststore import TrustStore, check_not_expired

__all__ = [
    "BENCH_PAYLOAD_TYPE",
    "BENCH_REQUEST_SCHEMA",
    "MAX_BENCH_FILES",
    "BenchFile",
    "BenchRequest",
    "sign_bench_request",
    "verify_bench_request",
]

BENCH_PAYLOAD_TYPE = "application/vnd.edgekit.bench+json"
BENCH_REQUEST_SCHEMA = "edgekit.bench-request/v1"
MAX_BENCH_FILES = 32
MAX_BENCH_TTL_S = 24 * 3600
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Plain file names: no separators, no traversal; the suffix says what the file is.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}\.(onnx|tflite|npz)")
_TOPIC_PREFIX = re.compile(r"[A-Za-z0-9._/-]{1,512}")


@dataclass(frozen=True)
class BenchFile:
    """One file the device fetches: a candidate model or the reference outputs."""

    name: str
    sha256: str
    size_bytes: int
    topic_prefix: str  # where its chunks are (the MQTT transfer's `bundles/<sha>`)


@dataclass(frozen=True)
class BenchRequest:
    """A bench request's payload."""

    fleet: str
    device: str
    request_id: str
    issued_at: datetime
    expires_at: datetime
    files: tuple[BenchFile, ...]
    seconds_per_model: float = 2.0
    threads: int | None = None

    @property
    def total_bytes(self) -> int:
        """Bytes the device downloads for this request."""
        return sum(item.size_bytes for item in self.files)

    def to_payload(self) -> bytes:
        """The canonical JSON payload."""
        return canonical_json(
            {
                "schema": BENCH_REQUEST_SCHEMA,
                "fleet": self.fleet,
                "device": self.device,
                "request_id": self.request_id,
                "issued_at": format_rfc3339(self.issued_at),
                "expires_at": format_rfc3339(self.expires_at),
                "seconds_per_model": self.seconds_per_model,
                "threads": self.threads,
                "files": [
                    {
                        "name": item.name,
                        "sha256": item.sha256,
                        "size": item.size_bytes,
                        "topic_prefix": item.topic_prefix,
                    }
                    for item in self.files
                ],
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes) -> BenchRequest:
        """Parse and validate a payload (no signature check: see `verify_bench_request`)."""
        document = load_json_object(payload, what="bench request", error=DirectiveError)
        fields = Fields(document, what="bench request", error=DirectiveError)
        fields.only(
            (
                "schema",
                "fleet",
                "device",
                "request_id",
                "issued_at",
                "expires_at",
                "seconds_per_model",
                "threads",
                "files",
            )
        )
        if fields.string("schema") != BENCH_REQUEST_SCHEMA:
            fields.fail(f"schema must be {BENCH_REQUEST_SCHEMA!r}")
        items = fields.array("files")
        if not 1 <= len(items) <= MAX_BENCH_FILES:
            fields.fail(f"files must list 1 to {MAX_BENCH_FILES} files; found {len(items)}")
        files = []
        for index, item in enumerate(items):
            entry = fields.item(item, what=f"files[{index}]")
            entry.only(("name", "sha256", "size", "topic_prefix"))
            files.append(
                BenchFile(
                    name=entry.string(
                        "name", pattern=_FILE_NAME, hint="a plain .onnx, .tflite or .npz file name"
                    ),
                    sha256=entry.sha256("sha256"),
                    size_bytes=entry.integer("size", minimum=1, maximum=2**32),
                    topic_prefix=entry.string(
                        "topic_prefix",
                        pattern=_TOPIC_PREFIX,
                        hint="an MQTT topic without wildcards",
                    ),
                )
            )
        if len({item.name for item in files}) != len(files):
            fields.fail("two files have the same name")
        issued_at = fields.timestamp("issued_at")
        expires_at = fields.timestamp("expires_at")
        if not issued_at < expires_at <= issued_at + timedelta(seconds=MAX_BENCH_TTL_S):
            fields.fail(f"expires_at must be after issued_at, by at most {MAX_BENCH_TTL_S} s")
        seconds = fields.raw("seconds_per_model")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            fields.fail("seconds_per_model must be a number")
        if not 0.1 <= float(seconds) <= 600:
            fields.fail("seconds_per_model must be between 0.1 and 600")
        threads = fields.raw("threads")
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 256
        ):
            fields.fail("threads must be null or an integer from 1 to 256")
        return cls(
            fleet=fields.string("fleet", pattern=_IDENTIFIER, hint="a fleet id"),
            device=fields.string("device", pattern=_IDENTIFIER, hint="a device id"),
            request_id=fields.string("request_id", pattern=_IDENTIFIER, hint="a request id"),
            issued_at=issued_at,
            expires_at=expires_at,
            files=tuple(files),
            seconds_per_model=float(seconds),
            threads=threads,
        )


def sign_bench_request(request: BenchRequest, signers: Iterable[Signer]) -> bytes:
    """The request as a DSSE envelope signed by `signers` (keys of the `directives` role)."""
    # One validator for what we write and what we read: round-trip through the parser.
    checked = BenchRequest.from_payload(request.to_payload())
    return sign_envelope(checked.to_payload(), BENCH_PAYLOAD_TYPE, signers)


def verify_bench_request(
    envelope_bytes: bytes,
    *,
    truststore: TrustStore,
    fleet: str,
    device: str,
    now: datetime,
    clock_skew_s: float = DEFAULT_CLOCK_SKEW_S,
    max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
) -> BenchRequest:
    """Verify a bench request for this device, or raise the `BundleError` naming the rule.

    Order: size limit, payloadType, signatures (threshold of the `directives` role), schema,
    trust store expiry, fleet and device, not issued in the future, not expired.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    envelope = parse_envelope(envelope_bytes, max_envelope_bytes=max_envelope_bytes)
    if envelope.payload_type != BENCH_PAYLOAD_TYPE:
        raise EnvelopeError(
            f"expected payloadType {BENCH_PAYLOAD_TYPE!r}; found "
            f"{envelope.payload_type[:100]!r}: this is not a bench request"
        )
    check_signatures(envelope, truststore.policy("directives"))
    request = BenchRequest.from_payload(envelope.payload)
    check_not_expired(truststore, now)
    if request.fleet != fleet or request.device != device:
        raise WrongTargetError(
            f"bench request is for device {request.device!r} of fleet {request.fleet!r}; this "
            f"is device {device!r} of fleet {fleet!r}"
        )
    if request.issued_at > now + timedelta(seconds=clock_skew_s):
        raise NotYetValidError(
            f"bench request issued at {format_rfc3339(request.issued_at)}, ahead of the "
            f"device's clock ({format_rfc3339(now)}): check both clocks (NTP)"
        )
    if now >= request.expires_at:
        raise ExpiredError(
            f"bench request expired at {format_rfc3339(request.expires_at)} (now "
            f"{format_rfc3339(now)})"
        )
    return request
