"""Bundles over MQTT against a real Mosquitto: publish retained chunks, fetch them back with a
window of subscriptions, resume after an interrupted fetch and across a broker restart."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgekit.messages import BundleMeta
from edgekit.mosquitto import MosquittoBroker
from edgekit.mqtt import BrokerSettings, MqttClient
from edgekit.topics import Topics
from edgekit.transfer import (
    ChunkAssembler,
    MqttBundleFetcher,
    TransferError,
    TransferStorageError,
    publish_bundle,
)

TOPICS = Topics("t")


def _connected(broker: MosquittoBroker, client_id: str = "") -> MqttClient:
    settings = BrokerSettings(broker.url, reconnect_min_s=0.1, reconnect_max_s=0.5)
    name = client_id or f"edgekit-test-{os.urandom(4).hex()}"
    return MqttClient(settings, client_id=name).connect(timeout_s=5)


@pytest.fixture
def clients(mosquitto: MosquittoBroker) -> Iterator[list[MqttClient]]:
    made: list[MqttClient] = []
    yield made
    for client in made:
        client.stop()


def _bundle(tmp_path: Path, size: int) -> tuple[Path, str]:
    path = tmp_path / "b.ekb"
    path.write_bytes(os.urandom(size))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_publish_then_fetch_round_trip(
    mosquitto: MosquittoBroker, clients: list[MqttClient], tmp_path: Path
) -> None:
    source, sha = _bundle(tmp_path, 1_000_003)
    publisher = _connected(mosquitto)
    clients.append(publisher)
    meta = publish_bundle(publisher, TOPICS, source, chunk_size=64 * 1024, version="1.0.0")
    assert (meta.sha256, meta.size_bytes, meta.chunks) == (sha, 1_000_003, 16)

    device = _connected(mosquitto)
    clients.append(device)
    fetcher = MqttBundleFetcher(
        device, TOPICS.bundle_prefix(sha), tmp_path / "dl", sha256=sha, size_bytes=meta.size_bytes
    )
    seen: list[int] = []
    out = fetcher.fetch(tmp_path / "got.ekb", timeout_s=30, progress=lambda d, _t: seen.append(d))
    assert out.read_bytes() == source.read_bytes()
    assert fetcher.chunks_received == 16
    assert seen[-1] == meta.size_bytes
    assert not list((tmp_path / "dl").glob("*.part"))


def test_fetch_refuses_meta_that_disagrees_with_the_pin(
    mosquitto: MosquittoBroker, clients: list[MqttClient], tmp_path: Path
) -> None:
    source, sha = _bundle(tmp_path, 5000)
    publisher = _connected(mosquitto)
    clients.append(publisher)
    publish_bundle(publisher, TOPICS, source, chunk_size=1024)
    device = _connected(mosquitto)
    clients.append(device)
    fetcher = MqttBundleFetcher(
        device, TOPICS.bundle_prefix(sha), tmp_path / "dl", sha256=sha, size_bytes=4999
    )
    with pytest.raises(TransferError, match="pins"):
        fetcher.fetch(tmp_path / "got.ekb", timeout_s=10)


def test_interrupted_fetch_resumes_after_broker_restart(
    mosquitto: MosquittoBroker, clients: list[MqttClient], tmp_path: Path
) -> None:
    source, sha = _bundle(tmp_path, 200 * 1024)
    publisher = _connected(mosquitto)
    clients.append(publisher)
    meta = publish_bundle(publisher, TOPICS, source, chunk_size=1024)

    class StopError(Exception):
        pass

    def stop_after_half(done: int, _total: int) -> None:
        if done >= meta.size_bytes // 2:
            raise StopError

    first = _connected(mosquitto)
    clients.append(first)
    fetcher = MqttBundleFetcher(
        first,
        TOPICS.bundle_prefix(sha),
        tmp_path / "dl",
        sha256=sha,
        size_bytes=meta.size_bytes,
        window=4,
    )
    with pytest.raises(StopError):
        fetcher.fetch(tmp_path / "got.ekb", progress=stop_after_half)
    assert fetcher.assembler is not None
    held_before = fetcher.assembler.held
    assert 0 < held_before < meta.chunks

    mosquitto.restart()  # retained chunks survive through the broker's persistence
    second = _connected(mosquitto)
    clients.append(second)
    resumed = MqttBundleFetcher(
        second, TOPICS.bundle_prefix(sha), tmp_path / "dl", sha256=sha, size_bytes=meta.size_bytes
    )
    out = resumed.fetch(tmp_path / "got.ekb", timeout_s=30)
    assert out.read_bytes() == source.read_bytes()
    assert resumed.assembler is not None
    assert resumed.assembler.resumed_chunks == held_before
    assert resumed.assembler.written_chunks == meta.chunks - held_before


def test_broker_restart_during_fetch_does_not_start_over(
    mosquitto: MosquittoBroker, clients: list[MqttClient], tmp_path: Path
) -> None:
    source, sha = _bundle(tmp_path, 3000 * 256)
    publisher = _connected(mosquitto)
    clients.append(publisher)
    meta = publish_bundle(publisher, TOPICS, source, chunk_size=256, window=64)
    publisher.stop()
    clients.remove(publisher)

    device = _connected(mosquitto, client_id="edgekit-test-dev-1")
    clients.append(device)
    fetcher = MqttBundleFetcher(
        device, TOPICS.bundle_prefix(sha), tmp_path / "dl", sha256=sha, size_bytes=meta.size_bytes,
        window=1, stall_s=1.0,
    )  # fmt: skip
    result: list[Path | BaseException] = []

    def run() -> None:
        try:
            result.append(fetcher.fetch(tmp_path / "got.ekb", timeout_s=120))
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            result.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while (
        fetcher.assembler is None or fetcher.assembler.held < 200
    ) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert fetcher.assembler is not None
    held_at_restart = fetcher.assembler.held
    assert held_at_restart < meta.chunks, "fetch finished before the broker could be restarted"
    mosquitto.restart(down_s=0.5)
    thread.join(120)
    assert result and isinstance(result[0], Path), result
    assert result[0].read_bytes() == source.read_bytes()
    # Every chunk was written once: the restart did not make the device start over.
    assert fetcher.assembler.written_chunks == meta.chunks
    assert fetcher.chunks_received < meta.chunks + held_at_restart


def test_assembler_rejects_wrong_lengths_and_bad_hash(tmp_path: Path) -> None:
    data = os.urandom(2500)
    meta = BundleMeta.for_size(hashlib.sha256(data).hexdigest(), 2500, chunk_size=1000)
    assembler = ChunkAssembler(tmp_path, meta)
    with pytest.raises(TransferError, match="expected 500"):
        assembler.add(2, data[2000:2400])
    assembler.add(0, data[:1000])
    assert not assembler.add(0, data[:1000])
    assembler.add(1, b"\0" * 1000)  # wrong bytes, right length
    assembler.add(2, data[2000:])
    with pytest.raises(TransferError, match="discarded"):
        assembler.finish(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not assembler.part_path.exists()


def test_assembler_bitmap_survives_reopen(tmp_path: Path) -> None:
    data = os.urandom(3000)
    meta = BundleMeta.for_size(hashlib.sha256(data).hexdigest(), 3000, chunk_size=1000)
    first = ChunkAssembler(tmp_path, meta)
    first.add(1, data[1000:2000])
    first.close()
    second = ChunkAssembler(tmp_path, meta)
    assert second.missing() == [0, 2]
    second.add(0, data[:1000])
    second.add(2, data[2000:])
    assert second.finish(tmp_path / "out").read_bytes() == data


def test_assembler_refuses_a_meta_with_too_many_chunks(tmp_path: Path) -> None:
    # The meta comes from the broker; only sha256 and size are pinned by the directive.
    meta = BundleMeta.for_size("a" * 64, 1_000_000, chunk_size=1)
    with pytest.raises(TransferError, match="65536-chunk limit"):
        ChunkAssembler(tmp_path, meta)
    assert not list(tmp_path.iterdir())


def test_disk_errors_end_the_fetch_as_storage_errors(
    mosquitto: MosquittoBroker, clients: list[MqttClient], tmp_path: Path
) -> None:
    source, sha = _bundle(tmp_path, 5000)
    publisher = _connected(mosquitto)
    clients.append(publisher)
    publish_bundle(publisher, TOPICS, source, chunk_size=1024)
    device = _connected(mosquitto)
    clients.append(device)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    fetcher = MqttBundleFetcher(
        device, TOPICS.bundle_prefix(sha), blocker / "dl", sha256=sha, size_bytes=5000
    )
    with pytest.raises(TransferStorageError, match="cannot write"):
        fetcher.fetch(tmp_path / "got.ekb", timeout_s=10)
    assert device.connected  # the error did not escape into paho's network loop
