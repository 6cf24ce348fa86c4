"""Getting a bundle onto the device: MQTT chunks or HTTPS with resume, pinned by the directive.

One seam per transport (`_fetch_mqtt`, `HttpsDownloader.download`); `BundleFetcher.fetch`
tries the directive's sources in order and turns every failure into `TransportError`, except
a local disk failure (full, read-only), which is raised as `StorageError`. Both
transports resume: MQTT from the chunk bitmap (`edgekit.transfer.ChunkAssembler`), HTTPS
with a `Range` request from the partial file's length. The finished file's size and sha256
must match the directive's pin before it is handed over; nothing here trusts the server, the
caller still verifies the bundle's signatures.
"""

from __future__ import annotations

import errno
import logging
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgekit.agent.journal import StorageError

from edgekit.bundle import fsync_dir, hash_file
from edgekit.errors import EdgekitError, TransportError, first_line
from edgekit.trust import BundleRef

if TYPE_CHECKING:
    from edgekit.mqtt import MqttClient

__all__ = [
    "BundleFetcher",
    "DownloadStats",
    "Fetcher",
    "HttpsDownloader",
    "file_matches",
    "storage_cause",
]

log = logging.getLogger(__name__)

_BLOCK = 256 * 1024
_SLICE_S = 5.0  # longest a stopping agent waits for an MQTT fetch to notice


_STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES, errno.EPERM}
)


def storage_cause(error: BaseException) -> OSError | None:
    """The local-disk `OSError` behind `error` (itself, or in its cause/context chain), if any.

    `edgekit.transfer` and `HttpsDownloader` wrap a failed write in a transport error; a full,
    read-only or failing disk must still be told apart from a lost connection (socket errors
    are `OSError`s too, but not with these errno values).
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if (
            isinstance(current, OSError)
            and not isinstance(current, (ConnectionError, TimeoutError, ssl.SSLError))
            and current.errno in _STORAGE_ERRNOS
        ):
            return current
        current = current.__cause__ or current.__context__
    return None


def file_matches(path: Path, *, sha256: str, size: int) -> bool:
    """True if `path` exists with exactly `size` bytes hashing to `sha256`."""
    try:
        if path.stat().st_size != size:
            return False
    except OSError:
        return False
    return hash_file(path)[1] == sha256


@dataclass
class DownloadStats:
    """What the last fetch did: where from, and how much it could reuse."""

    source: str = ""
    resumed_bytes: int = 0
    resumed_chunks: int = 0
    written_chunks: int = 0
    received_chunks: int = 0  # chunk messages that arrived (duplicates included)
    resubscribes: int = 0


class Fetcher(Protocol):
    """The seam the updater downloads through (`BundleFetcher`, or a local copy in tests)."""

    last: DownloadStats

    def fetch(self, bundle: BundleRef, destination: Path) -> Path:
        """The bundle at `destination`, size and sha256 checked; raises `TransportError`
        (`StorageError` if the local disk refuses the download)."""
        ...


class HttpsDownloader:
    """HTTPS GET with resume: a partial file grows with `Range: bytes=<have>-` requests."""

    def __init__(self, *, ca_file: Path | None = None, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self._context = ssl.create_default_context(
            cafile=str(ca_file) if ca_file is not None else None
        )

    def download(
        self, url: str, destination: Path, *, sha256: str, size: int, stats: DownloadStats
    ) -> Path:
        """Fetch `url` to `destination` (pinned by `sha256` and `size`), resuming a partial."""
        if not url.startswith("https://"):
            raise TransportError(f"refusing to download {url[:100]!r}: only https:// URLs")
        partial = destination.with_name(destination.name + ".https.part")
        have = partial.stat().st_size if partial.exists() else 0
        if have > size:
            partial.unlink()
            have = 0
        stats.resumed_bytes = have
        if have < size:
            request = urllib.request.Request(url)  # noqa: S310 - scheme checked above
            if have:
                request.add_header("Range", f"bytes={have}-")
            try:
                response = urllib.request.urlopen(  # noqa: S310
                    request, timeout=self.timeout_s, context=self._context
                )
            except urllib.error.HTTPError as e:
                if e.code == 416 and have:  # the server thinks we have everything
                    response = None
                else:
                    raise TransportError(f"GET {url}: HTTP {e.code} {e.reason}") from e
            except (urllib.error.URLError, OSError) as e:
                raise TransportError(f"GET {url}: {first_line(e)}") from e
            if response is not None:
                with response:
                    status = response.status
                    if have and status == 200:
                        log.info("server ignored the Range request; downloading from the start")
                        have = 0
                    elif status not in (200, 206):
                        raise TransportError(f"GET {url}: unexpected HTTP status {status}")
                    with partial.open("r+b" if have else "wb") as out:
                        out.seek(have)
                        out.truncate(have)
                        try:
                            while have < size and (block := response.read(_BLOCK)):
                                out.write(block[: size - have])
                                have += min(len(block), size - have)
                        except OSError as e:
                            raise TransportError(
                                f"GET {url}: connection lost after {have} of {size} bytes "
                                f"({first_line(e)}); the next attempt resumes"
                            ) from e
                        finally:
                            out.flush()
                            os.fsync(out.fileno())
        if have < size:
            raise TransportError(f"GET {url}: got {have} of {size} bytes; the next attempt resumes")
        if not file_matches(partial, sha256=sha256, size=size):
            partial.unlink(missing_ok=True)
            raise TransportError(
                f"GET {url}: the downloaded bytes do not hash to the directive's sha256 "
                f"{sha256[:12]}; discarded"
            )
        os.replace(partial, destination)
        fsync_dir(destination.parent)
        return destination


class BundleFetcher:
    """Fetches the bundle a directive names from its sources, in order.

    `mqtt_client` returns the connected `MqttClient` or None when
    the agent has no broker session.
    """

    def __init__(
        self,
        directory: Path,
        *,
        mqtt_client: Callable[[], MqttClient | None],
        https: HttpsDownloader | None = None,
        max_bytes: int | None = None,
        timeout_s: float = 600.0,
        chunk_window: int = 8,
        cancel: threading.Event | None = None,
    ) -> None:
        self.directory = directory
        self._mqtt_client = mqtt_client
        self._https = https or HttpsDownloader()
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.chunk_window = chunk_window
        self.last = DownloadStats()
        self.cancel = cancel or threading.Event()
        """Set it to end a fetch early (the partial download stays for the next one)."""

    def fetch(self, bundle: BundleRef, destination: Path) -> Path:
        """The bundle at `destination`, size and sha256 checked; raises `TransportError`
        (`StorageError` if the local disk refuses the download)."""
        if file_matches(destination, sha256=bundle.sha256, size=bundle.size_bytes):
            self.last = DownloadStats(source="local", resumed_bytes=bundle.size_bytes)
            return destination
        errors = []
        for source in bundle.sources:
            stats = DownloadStats(source=f"{source.kind}:{source.location}")
            self.last = stats
            try:
                if source.kind == "mqtt":
                    return self._fetch_mqtt(source.location, bundle, destination, stats)
                return self._https.download(
                    source.location,
                    destination,
                    sha256=bundle.sha256,
                    size=bundle.size_bytes,
                    stats=stats,
                )
            except (EdgekitError, OSError) as e:
                cause = storage_cause(e)
                if cause is not None:
                    # The device's disk, not the network: another source or attempt would
                    # fail the same way. Report it as what it is.
                    raise StorageError(
                        f"cannot store bundle {bundle.sha256[:12]} in {self.directory}: "
                        f"{cause.strerror or cause} (free space on the data disk?)"
                    ) from e
                log.warning("fetching from %s failed: %s", stats.source, first_line(e))
                errors.append(f"{source.kind}: {first_line(e)}")
        raise TransportError(
            f"cannot fetch bundle {bundle.sha256[:12]} from any source: " + "; ".join(errors)
        )

    def _fetch_mqtt(
        self, prefix: str, bundle: BundleRef, destination: Path, stats: DownloadStats
    ) -> Path:
        from edgekit.transfer import MqttBundleFetcher, TransferTimeoutError

        deadline = time.monotonic() + self.timeout_s
        first = True
        # Fetch in slices so that a stopping agent is never stuck in a fetch: each slice ends
        # by persisting the chunk bitmap, and the next one resumes from it.
        while True:
            if self.cancel.is_set():
                raise TransportError("fetch cancelled: the agent is stopping")
            client = self._mqtt_client()
            if client is None:
                raise TransportError("no MQTT session to fetch chunks with")
            fetcher = MqttBundleFetcher(
                client,
                prefix,
                self.directory,
                sha256=bundle.sha256,
                size=bundle.size_bytes,
                window=self.chunk_window,
                max_bytes=self.max_bytes,
            )
            remaining = deadline - time.monotonic()
            try:
                return fetcher.fetch(destination, timeout_s=max(0.1, min(_SLICE_S, remaining)))
            except TransportError as e:
                if not isinstance(e, TransferTimeoutError) or time.monotonic() >= deadline:
                    raise
            finally:
                assembler: Any = fetcher.assembler
                if assembler is not None:
                    if first:
                        stats.resumed_chunks = int(assembler.resumed_chunks)
                        first = False
                    stats.written_chunks += int(assembler.written_chunks)
                stats.resubscribes += fetcher.resubscribes
                stats.received_chunks += fetcher.chunks_received
