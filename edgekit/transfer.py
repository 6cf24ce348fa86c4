"""Moving a bundle over MQTT: retained chunks out, resumable windowed fetch in.

The fleet controller publishes `bundles/<sha>/chunks/<n>` (raw bytes, retained, QoS 1) and then
`bundles/<sha>/meta` (`BundleMeta`, retained, QoS 1): meta last, so whoever sees it can get
every chunk. A device fetches with a window of per-chunk subscriptions (retained messages
arrive on subscribe), writes each chunk at its offset in a partial file, and records which
chunks it holds in a bitmap that is only written after the data it describes is fsync'd. A
broker restart, a reconnect or an agent restart resumes from the bitmap; the whole file's size
and sha256 are checked against the pin before the file is handed over. Nothing here trusts
the broker: the caller still verifies the bundle's signatures (`edgekit.bundle.verify_bundle`).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.errors import TransportError
from edgekit.files import fsync_dir, hash_file
from edgekit.messages import BundleMeta, MessageError
from edgekit.topics import BundleTopics, Topics

if TYPE_CHECKING:
    from edgekit.mqtt import Message, MqttClient, PublishHandle

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "ChunkAssembler",
    "MqttBundleFetcher",
    "TransferError",
    "TransferStorageError",
    "TransferTimeoutError",
    "publish_bundle",
    "unpublish_bundle",
]

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 128 * 1024
MAX_CHUNK_BYTES = 4 * 1024 * 1024
MAX_CHUNKS = 65536
"""A device refuses a bundle split into more chunks: the meta comes from the broker (only the
sha256 and size are pinned by the signed directive), and a 1-byte chunk size would otherwise
cost a subscription and a bitmap entry per byte."""
_PERSIST_EVERY_BYTES = 4 * 1024 * 1024  # fsync + bitmap: at most 4 MiB re-fetched after a crash

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes total)."""


class TransferError(TransportError):
    """A bundle could not be moved over MQTT: broker refused, timed out, or bytes do not match."""


class TransferTimeoutError(TransferError):
    """The fetch's time ran out; what arrived is kept and a later fetch resumes from it."""


class TransferStorageError(TransferError):
    """The download could not be written to the device's disk (full, read-only, removed)."""


def publish_bundle(
    client: MqttClient,
    topics: Topics,
    bundle: Path,
    *,
    chunk_size: int = DEFAULT_CHUNK_BYTES,
    name: str = "",
    version: str = "",
    window: int = 16,
    timeout_s: float = 60.0,
    progress: Progress | None = None,
) -> BundleMeta:
    """Publish `bundle` as retained chunks and then its meta; returns the meta.

    At most `window` chunks are unacknowledged at a time; each acknowledgement must arrive
    within `timeout_s`.
    """
    if not 1 <= chunk_size <= MAX_CHUNK_BYTES:
        raise TransferError(f"chunk size must be 1..{MAX_CHUNK_BYTES} bytes; got {chunk_size}")
    try:
        size, sha256 = hash_file(bundle)
    except OSError as error:
        raise TransferError(f"cannot read bundle {bundle}: {error.strerror}") from None
    if size == 0:
        raise TransferError(f"bundle {bundle} is empty")
    meta = BundleMeta.for_size(sha256, size, chunk_size=chunk_size, name=name, version=version)
    pending: deque[PublishHandle] = deque()
    names = topics.bundle(meta.sha256)

    def settle(keep: int) -> None:
        while len(pending) > keep:
            if not pending.popleft().wait(timeout_s):
                raise TransferError(
                    f"broker did not acknowledge a chunk of {bundle.name} within {timeout_s} s"
                )

    try:
        with bundle.open("rb") as handle:
            for index, block in enumerate(iter(partial(handle.read, chunk_size), b"")):
                pending.append(client.publish(names.chunk(index), block, qos=1, retain=True))
                settle(window)
                if progress:
                    progress(min((index + 1) * chunk_size, size), size)
        settle(0)
        pending.append(client.publish(names.meta, meta.to_json(), qos=1, retain=True))
        settle(0)
    except TransferError:
        raise
    except TransportError as error:
        raise TransferError(f"publishing {bundle.name} failed: {error}") from error
    return meta


def unpublish_bundle(
    client: MqttClient, topics: Topics, meta: BundleMeta, *, timeout_s: float = 60.0
) -> None:
    """Clear a bundle's retained meta (first) and chunks from the broker."""
    names = topics.bundle(meta.sha256)
    handles = [client.publish(names.meta, b"", qos=1, retain=True)]
    handles += [client.publish(names.chunk(i), b"", qos=1, retain=True) for i in range(meta.chunks)]
    for handle in handles:
        handle.wait(timeout_s)


class ChunkAssembler:
    """A bundle being assembled from chunks in `directory`, resumable across restarts.

    Files: `<sha>.part` (the bytes, at their offsets) and `<sha>.have` (one byte per chunk,
    1 = held). The bitmap is written (temp, fsync, rename) only after the part file's data is
    fsync'd, so it never claims bytes that a power cut could lose.
    """

    def __init__(
        self,
        directory: Path,
        meta: BundleMeta,
        *,
        max_bytes: int | None = None,
        max_chunks: int = MAX_CHUNKS,
    ) -> None:
        if meta.chunks > max_chunks:
            raise TransferError(
                f"bundle {meta.sha256[:12]}: {meta.chunks} chunks of {meta.chunk_size} bytes "
                f"exceed the {max_chunks}-chunk limit; publish it with bigger chunks"
            )
        if meta.chunk_size > MAX_CHUNK_BYTES:
            raise TransferError(
                f"bundle {meta.sha256[:12]}: chunk size {meta.chunk_size} exceeds the "
                f"{MAX_CHUNK_BYTES}-byte limit"
            )
        if max_bytes is not None and meta.size_bytes > max_bytes:
            raise TransferError(
                f"bundle {meta.sha256[:12]} is {meta.size_bytes} bytes; the limit is {max_bytes}"
            )
        self.meta = meta
        directory.mkdir(parents=True, exist_ok=True)
        self.part_path = directory / f"{meta.sha256}.part"
        self.have_path = directory / f"{meta.sha256}.have"
        self._have = bytearray(meta.chunks)
        if self.part_path.exists() and self.have_path.exists():
            saved = self.have_path.read_bytes()
            if len(saved) == meta.chunks and set(saved) <= {0, 1}:
                self._have = bytearray(saved)
            else:
                log.warning("ignoring a corrupt chunk bitmap %s", self.have_path)
        self._file = self.part_path.open("r+b" if self.part_path.exists() else "w+b")
        self._file.truncate(meta.size_bytes)
        self.held = sum(self._have)
        self.resumed_chunks = self.held
        self.written_chunks = 0
        self._unsynced = 0

    @property
    def complete(self) -> bool:
        return self.held == self.meta.chunks

    def missing(self) -> list[int]:
        return list(self.iter_missing())

    def iter_missing(self) -> Iterator[int]:
        """Indices not yet held, in order (lazily: the fetcher only needs a window of them)."""
        index = self._have.find(0)
        while index != -1:
            yield index
            index = self._have.find(0, index + 1)

    def expected_length(self, index: int) -> int:
        return min(self.meta.chunk_size, self.meta.size_bytes - index * self.meta.chunk_size)

    def add(self, index: int, data: bytes) -> bool:
        """Store chunk `index`; False if it was already held. Wrong lengths raise."""
        if not 0 <= index < self.meta.chunks:
            raise TransferError(f"chunk {index} is outside 0..{self.meta.chunks - 1}")
        if len(data) != self.expected_length(index):
            raise TransferError(
                f"chunk {index} has {len(data)} bytes; expected {self.expected_length(index)}"
            )
        if self._have[index]:
            return False
        self._file.seek(index * self.meta.chunk_size)
        self._file.write(data)
        self._have[index] = 1
        self.held += 1
        self.written_chunks += 1
        self._unsynced += len(data)
        if self._unsynced >= _PERSIST_EVERY_BYTES:
            self.persist()
        return True

    def persist(self) -> None:
        """fsync the data, then record which chunks it holds."""
        self._file.flush()
        os.fsync(self._file.fileno())
        temp = self.have_path.with_suffix(".have.tmp")
        with temp.open("wb") as handle:
            handle.write(self._have)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.have_path)
        with suppress(OSError):
            fsync_dir(self.have_path.parent)
        self._unsynced = 0

    def finish(self, destination: Path) -> Path:
        """Check size and sha256, then move the file to `destination` (atomically)."""
        if not self.complete:
            missing = self.meta.chunks - self.held
            raise TransferError(f"bundle {self.meta.sha256[:12]}: {missing} chunks missing")
        self.persist()
        self._file.close()
        _, actual = hash_file(self.part_path)
        if actual != self.meta.sha256:
            self.discard()
            raise TransferError(
                f"bundle {self.meta.sha256[:12]}: assembled bytes hash to {actual[:12]}; "
                "discarded the partial download"
            )
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.part_path, destination)
        with suppress(OSError):
            fsync_dir(destination.parent)
        self.have_path.unlink(missing_ok=True)
        return destination

    def close(self) -> None:
        if not self._file.closed:
            with suppress(OSError):
                self.persist()
            self._file.close()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        for path in (self.part_path, self.have_path):
            path.unlink(missing_ok=True)


class MqttBundleFetcher:
    """Fetch one bundle from retained chunks under `prefix` with an `MqttClient`.

    Handlers are added for this bundle's topics only, so the fetcher lives beside the client's
    other subscriptions; they run on the client's network thread and never raise (errors end
    the fetch, in `fetch`'s thread). The fetch pins `sha256` and `size` (from a verified
    directive): a meta message that disagrees is refused. When nothing arrives for `stall_s`
    (broker restarted, session lost), the outstanding subscriptions are issued again.
    """

    def __init__(
        self,
        client: MqttClient,
        prefix: str,
        directory: Path,
        *,
        sha256: str,
        size_bytes: int,
        window: int = 8,
        max_bytes: int | None = None,
        stall_s: float = 3.0,
    ) -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")
        self.names = BundleTopics(self.prefix)
        self.directory = directory
        self.sha256 = sha256
        self.size_bytes = size_bytes
        self.window = max(1, window)
        self.max_bytes = max_bytes
        self.stall_s = stall_s
        self.assembler: ChunkAssembler | None = None
        self.chunks_received = 0
        self.resubscribes = 0
        self._outstanding: set[int] = set()
        self._changed = threading.Condition()
        self._error: TransferError | None = None
        self._cancelled = False

    def cancel(self) -> None:
        """Stop a running `fetch` from another thread (it raises `TransferError`; what arrived
        is kept for a resume)."""
        with self._changed:
            self._cancelled = True
            self._changed.notify_all()

    def _on_meta(self, message: Message) -> None:
        with self._changed:
            if self.assembler is not None or not message.payload:
                return
            try:
                meta = BundleMeta.from_json(message.payload)
                if meta.sha256 != self.sha256 or meta.size_bytes != self.size_bytes:
                    raise TransferError(
                        f"bundle meta under {self.prefix} names sha {meta.sha256[:12]} and "
                        f"{meta.size_bytes} bytes; the directive pins {self.sha256[:12]} and "
                        f"{self.size_bytes} bytes"
                    )
                self.assembler = ChunkAssembler(self.directory, meta, max_bytes=self.max_bytes)
            except MessageError as error:
                self._error = TransferError(
                    f"bundle meta under {self.prefix} is invalid ({error.reason}): {error}"
                )
            except TransferError as error:
                self._error = error
            except OSError as error:
                self._error = self._storage_error(error)
            self._changed.notify_all()

    def _on_chunk(self, message: Message) -> None:
        index = self.names.chunk_index(message.topic)  # MessageError: counted by the client
        with self._changed:
            assembler = self.assembler
            if assembler is None or not message.payload:
                return
            self.chunks_received += 1
            try:
                assembler.add(index, bytes(message.payload))
            except TransferError as error:
                self._error = error
            except OSError as error:  # never let it escape into paho's network loop
                self._error = self._storage_error(error)
            if index in self._outstanding:
                self._outstanding.discard(index)
                self.client.unsubscribe(self.names.chunk(index), handlers=False)
            self._changed.notify_all()

    def _storage_error(self, error: OSError) -> TransferStorageError:
        failure = TransferStorageError(
            f"cannot write bundle {self.sha256[:12]} to {self.directory}: {error.strerror or error}"
        )
        failure.__cause__ = error
        return failure

    def _request_more(self, assembler: ChunkAssembler) -> None:
        """Subscribe to missing chunks until `window` are outstanding (lock held).

        Requests go out in order and chunks only leave the missing ones, so the outstanding
        chunks are always among the first `window` missing: the rest of those are wanted.
        """
        if len(self._outstanding) >= self.window:
            return
        first = itertools.islice(assembler.iter_missing(), self.window)
        wanted = [index for index in first if index not in self._outstanding]
        if wanted:
            self._outstanding.update(wanted)
            self.client.subscribe([self.names.chunk(index) for index in wanted], keep=False)

    def fetch(
        self, destination: Path, *, timeout_s: float = 600.0, progress: Progress | None = None
    ) -> Path:
        """Block until the bundle is at `destination` (checked), or raise `TransferError`."""
        self.client.on(self.names.meta, self._on_meta)
        self.client.on(self.names.chunks, self._on_chunk)
        deadline = time.monotonic() + timeout_s
        try:
            self.client.subscribe(self.names.meta, keep=False)
            last_progress = time.monotonic()
            last_held = -1
            with self._changed:
                while True:
                    if self._error is not None:
                        raise self._error
                    if self._cancelled:
                        raise TransferError(
                            f"fetch of bundle {self.sha256[:12]} cancelled; a later fetch resumes"
                        )
                    now = time.monotonic()
                    assembler = self.assembler
                    if now > deadline:
                        held = assembler.held if assembler else 0
                        total = assembler.meta.chunks if assembler else "?"
                        raise TransferTimeoutError(
                            f"timed out after {timeout_s:.0f} s fetching bundle "
                            f"{self.sha256[:12]} over MQTT ({held}/{total} chunks)"
                        )
                    if assembler is not None and assembler.complete:
                        break
                    if assembler is not None and assembler.held != last_held:
                        last_held, last_progress = assembler.held, now
                        if progress:
                            done = last_held * assembler.meta.chunk_size
                            progress(min(done, self.size_bytes), self.size_bytes)
                    elif now - last_progress > self.stall_s:
                        # Broker restarted or the session dropped our subscriptions.
                        self.resubscribes += 1
                        last_progress = now
                        self._outstanding.clear()  # empty until the meta arrived
                        if assembler is None:
                            self.client.subscribe(self.names.meta, keep=False)
                    if assembler is not None:
                        self._request_more(assembler)
                    self._changed.wait(timeout=0.5)
            if progress:
                progress(self.size_bytes, self.size_bytes)
            try:
                return assembler.finish(destination)
            except OSError as error:
                raise self._storage_error(error) from error
        finally:
            self.client.off(self.names.meta)
            self.client.off(self.names.chunks)
            with self._changed:
                topics = [self.names.meta] + [self.names.chunk(i) for i in self._outstanding]
                self._outstanding.clear()
                if self.assembler is not None and not self.assembler.complete:
                    self.assembler.close()
            self.client.unsubscribe(topics, handlers=False)
