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

import base64
import collections
import contextlib
import errno
import http.client
import logging
import math
import os
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urljoin, urlsplit

from edgekit.agent.journal import StorageError

from edgekit.errors import EdgekitError, TransportError, first_line
from edgekit.files import fsync_dir, hash_file
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
_SLICE_S = 2.0  # longest a stopping agent or a newer directive waits for an MQTT fetch
_WATCH_INTERVAL_S = 0.2
_SESSION_GRACE_S = 30.0  # how long an MQTT fetch waits for a lost broker session
_MAX_REDIRECTS = 5


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


def file_matches(path: Path, *, sha256: str, size_bytes: int) -> bool:
    """True if `path` exists with exactly `size_bytes` bytes hashing to `sha256`."""
    try:
        if path.stat().st_size != size_bytes:
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

    def fetch(
        self,
        bundle: BundleRef,
        destination: Path,
        *,
        should_stop: Callable[[], bool] | None = None,
        deadline: float | None = None,
    ) -> Path:
        """The bundle at `destination`, size and sha256 checked; raises `TransportError`
        (`StorageError` if the local disk refuses the download). The fetch ends early, with
        a `TransportError`, once `should_stop()` is true or at `deadline` (`time.monotonic`)."""
        ...


class _Watchdog:
    """Ends a blocked HTTPS read when the fetch must stop: cancelled, past its deadline, or
    slower than the minimum throughput over the last window. Shutting the socket down makes
    the reading thread's `recv` return at once, wherever it waits."""

    def __init__(
        self,
        *,
        should_stop: Callable[[], bool],
        deadline: float,
        min_bytes_per_s: float,
        window_s: float,
    ) -> None:
        self.received = 0  # bytes read so far (written by the reading thread)
        self.reason: str | None = None
        self._should_stop = should_stop
        self._deadline = deadline
        self._min_bytes_per_s = min_bytes_per_s
        self._window_s = window_s
        self._socket: socket.socket | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="https-watchdog", daemon=True)

    def watch(self, connection: socket.socket | None) -> None:
        self._socket = connection
        if not self._thread.is_alive():
            self._thread.start()

    def close(self) -> None:
        self._done.set()

    def check(self) -> None:
        """Raise `TransportError` with the reason the watchdog stopped the download, if any."""
        if self.reason is not None:
            raise TransportError(self.reason)

    def _judge(self, now: float, samples: collections.deque[tuple[float, int]]) -> str | None:
        if self._should_stop():
            return "download cancelled: the agent is stopping or a newer directive arrived"
        if now >= self._deadline:
            return "download deadline passed (update.download_timeout_s)"
        samples.append((now, self.received))
        while len(samples) > 1 and samples[1][0] <= now - self._window_s:
            samples.popleft()
        start, bytes_then = samples[0]
        if now - start >= self._window_s and self._min_bytes_per_s > 0:
            rate = (self.received - bytes_then) / (now - start)
            if rate < self._min_bytes_per_s:
                return (
                    f"download too slow: {rate:.1f} bytes/s over the last {now - start:.0f} s, "
                    f"below update.min_download_bytes_per_s = {self._min_bytes_per_s:g}"
                )
        return None

    def _run(self) -> None:
        samples: collections.deque[tuple[float, int]] = collections.deque()
        while not self._done.wait(_WATCH_INTERVAL_S):
            reason = self._judge(time.monotonic(), samples)
            if reason is not None:
                self.reason = reason
                connection = self._socket
                if connection is not None:
                    with contextlib.suppress(OSError):
                        connection.shutdown(socket.SHUT_RDWR)
                return


class HttpsDownloader:
    """HTTPS GET with resume: a partial file grows with `Range: bytes=<have>-` requests.

    Bounded in time: every socket operation by `timeout_s`, the whole download by the
    caller's deadline, and a server slower than `min_bytes_per_s` over `window_s` is dropped
    (the partial file stays: the next attempt resumes). Up to 5 redirects are followed, all
    to https:// URLs.
    """

    def __init__(
        self,
        *,
        ca_file: Path | None = None,
        timeout_s: float = 30.0,
        min_bytes_per_s: float = 1024.0,
        window_s: float = 30.0,
    ) -> None:
        self.timeout_s = timeout_s
        self.min_bytes_per_s = min_bytes_per_s
        self.window_s = window_s
        self._context = ssl.create_default_context(
            cafile=str(ca_file) if ca_file is not None else None
        )

    def _connection(self, host: str, port: int | None) -> http.client.HTTPSConnection:
        """A connection to `host`, through the `https_proxy` of the environment (a CONNECT
        tunnel) unless `no_proxy` names the host, as urllib would."""
        proxy = urllib.request.getproxies().get("https")
        if not proxy or urllib.request.proxy_bypass(host):
            return http.client.HTTPSConnection(
                host, port, timeout=self.timeout_s, context=self._context
            )
        address = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        headers = {}
        if address.username is not None:
            credentials = f"{unquote(address.username)}:{unquote(address.password or '')}"
            headers["Proxy-Authorization"] = "Basic " + base64.b64encode(
                credentials.encode()
            ).decode("ascii")
        connection = http.client.HTTPSConnection(
            address.hostname or "",
            address.port or 8080,
            timeout=self.timeout_s,
            context=self._context,
        )
        connection.set_tunnel(host, port or 443, headers=headers)
        return connection

    def _open(
        self, url: str, have: int, watchdog: _Watchdog
    ) -> tuple[http.client.HTTPSConnection, http.client.HTTPResponse]:
        """GET `url` from byte `have`, following redirects; the connection and its response."""
        for _ in range(_MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme != "https" or not parts.hostname:
                raise TransportError(f"refusing to download {url[:100]!r}: only https:// URLs")
            connection = self._connection(parts.hostname, parts.port)
            headers = {"Range": f"bytes={have}-"} if have else {}
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            try:
                connection.connect()
                watchdog.watch(connection.sock)
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
            except (OSError, http.client.HTTPException) as e:
                connection.close()
                watchdog.check()
                raise TransportError(f"GET {url}: {first_line(e)}") from e
            location = response.getheader("Location")
            if response.status in (301, 302, 303, 307, 308) and location:
                connection.close()
                url = urljoin(url, location)
                continue
            return connection, response
        raise TransportError(f"GET {url}: more than {_MAX_REDIRECTS} redirects")

    def download(
        self,
        url: str,
        destination: Path,
        *,
        sha256: str,
        size_bytes: int,
        stats: DownloadStats,
        should_stop: Callable[[], bool] | None = None,
        deadline: float | None = None,
    ) -> Path:
        """Fetch `url` to `destination` (pinned by `sha256` and `size_bytes`), resuming."""
        if not url.startswith("https://"):
            raise TransportError(f"refusing to download {url[:100]!r}: only https:// URLs")
        partial = destination.with_name(destination.name + ".https.part")
        have = partial.stat().st_size if partial.exists() else 0
        if have > size_bytes:
            partial.unlink()
            have = 0
        stats.resumed_bytes = have
        watchdog = _Watchdog(
            should_stop=should_stop or (lambda: False),
            deadline=math.inf if deadline is None else deadline,
            min_bytes_per_s=self.min_bytes_per_s,
            window_s=self.window_s,
        )
        try:
            if have < size_bytes:
                have = self._receive(url, partial, have, size_bytes, watchdog)
        finally:
            watchdog.close()
        if have < size_bytes:
            raise TransportError(
                f"GET {url}: got {have} of {size_bytes} bytes; the next attempt resumes"
            )
        if not file_matches(partial, sha256=sha256, size_bytes=size_bytes):
            partial.unlink(missing_ok=True)
            raise TransportError(
                f"GET {url}: the downloaded bytes do not hash to the directive's sha256 "
                f"{sha256[:12]}; discarded"
            )
        os.replace(partial, destination)
        fsync_dir(destination.parent)
        return destination

    def _receive(
        self, url: str, partial: Path, have: int, size_bytes: int, watchdog: _Watchdog
    ) -> int:
        """Append the server's bytes to `partial` from `have`; the new length."""
        connection, response = self._open(url, have, watchdog)
        with contextlib.closing(connection), response:
            status = response.status
            if status == 416 and have:
                return have  # the server thinks we have everything: the hash decides
            if have and status == 200:
                log.info("server ignored the Range request; downloading from the start")
                have = 0
            elif status not in (200, 206):
                raise TransportError(f"GET {url}: HTTP {status} {response.reason}")
            with partial.open("r+b" if have else "wb") as out:
                out.seek(have)
                out.truncate(have)
                try:
                    while have < size_bytes:
                        block = response.read1(_BLOCK)
                        if not block:
                            break
                        out.write(block[: size_bytes - have])
                        have += min(len(block), size_bytes - have)
                        watchdog.received += len(block)
                except (OSError, http.client.HTTPException) as e:
                    watchdog.check()
                    raise TransportError(
                        f"GET {url}: connection lost after {have} of {size_bytes} bytes "
                        f"({first_line(e)}); the next attempt resumes"
                    ) from e
                finally:
                    out.flush()
                    os.fsync(out.fileno())
            watchdog.check()
        return have


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
        timeout_s: float = 1800.0,
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

    def fetch(
        self,
        bundle: BundleRef,
        destination: Path,
        *,
        should_stop: Callable[[], bool] | None = None,
        deadline: float | None = None,
    ) -> Path:
        """The bundle at `destination`, size and sha256 checked; raises `TransportError`
        (`StorageError` if the local disk refuses the download). Ends early once
        `should_stop()` is true, the agent stops, or at `deadline` (default: `timeout_s`
        from now)."""
        if file_matches(destination, sha256=bundle.sha256, size_bytes=bundle.size_bytes):
            self.last = DownloadStats(source="local", resumed_bytes=bundle.size_bytes)
            return destination
        end = time.monotonic() + self.timeout_s if deadline is None else deadline

        def stopping() -> bool:
            return self.cancel.is_set() or (should_stop is not None and should_stop())

        errors = []
        for source in bundle.sources:
            stats = DownloadStats(source=f"{source.kind}:{source.location}")
            self.last = stats
            try:
                if source.kind == "mqtt":
                    return self._fetch_mqtt(
                        source.location, bundle, destination, stats, stopping, end
                    )
                return self._https.download(
                    source.location,
                    destination,
                    sha256=bundle.sha256,
                    size_bytes=bundle.size_bytes,
                    stats=stats,
                    should_stop=stopping,
                    deadline=end,
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
                if stopping() or time.monotonic() >= end:
                    break
        raise TransportError(
            f"cannot fetch bundle {bundle.sha256[:12]} from any source: " + "; ".join(errors)
        )

    def _fetch_mqtt(
        self,
        prefix: str,
        bundle: BundleRef,
        destination: Path,
        stats: DownloadStats,
        stopping: Callable[[], bool],
        deadline: float,
    ) -> Path:
        from edgekit.transfer import MqttBundleFetcher, TransferTimeoutError

        first = True
        lost_at: float | None = None
        # Fetch in slices so that a stopping agent or a newer directive never waits for a
        # whole fetch: each slice ends by persisting the chunk bitmap, the next resumes.
        while True:
            if stopping():
                raise TransportError(
                    "download cancelled: the agent is stopping or a newer directive arrived"
                )
            client = self._mqtt_client()
            if client is None:
                # A broker restart or a network blip: wait for the session to come back (the
                # bitmap keeps what arrived) rather than spend an attempt; give up after a
                # grace period, so another source can be tried.
                now = time.monotonic()
                lost_at = now if lost_at is None else lost_at
                if now - lost_at >= _SESSION_GRACE_S or now >= deadline:
                    raise TransportError("no MQTT session to fetch chunks with")
                time.sleep(_WATCH_INTERVAL_S)
                continue
            lost_at = None
            fetcher = MqttBundleFetcher(
                client,
                prefix,
                self.directory,
                sha256=bundle.sha256,
                size_bytes=bundle.size_bytes,
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
