"""The agent across network trouble: broker restart mid-download, an outage of telemetry
intervals, an agent killed mid-download; and the HTTPS source with resume."""

from __future__ import annotations

import base64
import contextlib
import http.server
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import pytest
from edgekit.agent.config import load_config
from edgekit.agent.daemon import Agent
from edgekit.agent.download import DownloadStats, HttpsDownloader

from edgekit.errors import TransportError
from edgekit.files import hash_file
from edgekit.messages import BundleMeta, Status
from edgekit.mosquitto import MosquittoBroker
from edgekit.topics import Topics
from tests.agent.agent_helpers import (
    DEVICE,
    FLEET,
    AgentProcess,
    Keys,
    Watcher,
    directive_for,
    linear_model,
    make_bundle,
    sha_of,
    write_config,
    write_truststore,
)
from tests.agent.conftest import Bundles
from tests.tls_helpers import self_signed_cert

CHUNK = 4096


@pytest.fixture(scope="module")
def big_bundle(tmp_path_factory: pytest.TempPathFactory, agent_keys: Keys) -> Path:
    """v2 with 600 KB of padding: ~150 chunks of 4 KB."""
    return make_bundle(
        tmp_path_factory.mktemp("big"),
        agent_keys,
        version="2.0.0",
        model=lambda p: linear_model(p, seed=2),
        padding_bytes=600_000,
    )


@contextmanager
def running_agent(config_path: Path) -> Iterator[Agent]:
    agent = Agent(load_config(config_path, environ={}))
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield agent
    finally:
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive()


def publish_chunks(watcher: Watcher, bundle: Path, indices: range, *, meta: bool) -> BundleMeta:
    data = bundle.read_bytes()
    topics = Topics(FLEET)
    info = BundleMeta.for_size(sha_of(bundle), len(data), chunk_size=CHUNK)
    handles = [
        watcher.client.publish(
            topics.bundle(info.sha256).chunk(i),
            data[i * CHUNK : (i + 1) * CHUNK],
            qos=1,
            retain=True,
        )
        for i in indices
    ]
    if meta:
        handles.append(
            watcher.client.publish(
                topics.bundle(info.sha256).meta, info.to_json(), qos=1, retain=True
            )
        )
    for handle in handles:
        assert handle.wait(10)
    return info


def test_broker_restart_mid_download_resumes_without_starting_over(
    tmp_path: Path, big_bundle: Path, bundles: Bundles, agent_keys: Keys
) -> None:
    broker = MosquittoBroker(tmp_path / "mosquitto").start()
    watcher = Watcher(broker.url, client_id="restart-watcher", persistent=True)
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "agent.toml",
        data_dir=data,
        truststore=write_truststore(agent_keys, tmp_path / "truststore.json"),
        broker_url=broker.url,
        initial_bundle=bundles.v1,
        probation_s=0.2,
    )
    try:
        with running_agent(config) as agent:
            assert agent.session.wait_connected(20)
            chunks = BundleMeta.for_size(
                sha_of(big_bundle), big_bundle.stat().st_size, chunk_size=CHUNK
            ).chunks
            half = chunks // 2
            meta = publish_chunks(watcher, big_bundle, range(half), meta=True)
            watcher.publish_directive(
                directive_for(big_bundle, agent_keys, sequence=1, version="2.0.0")
            )
            part = data / "downloads" / f"{meta.sha256}.part"
            deadline = time.monotonic() + 20
            while not part.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert part.exists(), "the download never started"
            time.sleep(1.0)  # the first half arrives; the rest is not on the broker yet
            broker.restart(down_s=0.5)
            watcher.wait(lambda: watcher.client.connected, timeout=20, what="reconnect")
            publish_chunks(watcher, big_bundle, range(half, chunks), meta=False)
            status = watcher.wait_status(
                lambda s: s.state == "committed" and s.last_sequence >= 1,
                timeout=60,
                what="v2 committed after the broker restart",
            )
            assert status.active is not None and status.active.sha256 == meta.sha256
            stats: DownloadStats = agent.fetcher.last
            assert stats.source.startswith("mqtt:")
            # One fetch, every chunk written once: the first half was not fetched again.
            assert stats.written_chunks == chunks
            assert stats.received_chunks <= chunks + agent.fetcher.chunk_window
            assert agent.session.connects >= 2  # it did lose the broker in between
    finally:
        watcher.close()
        broker.stop()


def test_agent_stopped_mid_download_resumes_from_its_bitmap(
    tmp_path: Path,
    big_bundle: Path,
    bundles: Bundles,
    agent_keys: Keys,
    mosquitto: MosquittoBroker,
) -> None:
    watcher = Watcher(mosquitto.url)
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "agent.toml",
        data_dir=data,
        truststore=write_truststore(agent_keys, tmp_path / "truststore.json"),
        broker_url=mosquitto.url,
        initial_bundle=bundles.v1,
        probation_s=0.2,
    )
    chunks = BundleMeta.for_size(
        sha_of(big_bundle), big_bundle.stat().st_size, chunk_size=CHUNK
    ).chunks
    half = chunks // 2
    meta = publish_chunks(watcher, big_bundle, range(half), meta=True)
    watcher.publish_directive(directive_for(big_bundle, agent_keys, sequence=1, version="2.0.0"))
    first = AgentProcess(config, data)
    try:
        first.url()
        have = data / "downloads" / f"{meta.sha256}.have"
        deadline = time.monotonic() + 30
        # Wait for the part file, then stop the agent once the first half is in.
        while (
            time.monotonic() < deadline
            and not (data / "downloads" / f"{meta.sha256}.part").exists()
        ):
            time.sleep(0.05)
        time.sleep(1.5)
        first.process.send_signal(signal.SIGTERM)  # a clean stop persists the bitmap
        assert first.wait_exit(30) == 0, first.output()
        assert have.exists() and sum(have.read_bytes()) >= half // 2
    finally:
        first.stop()
    publish_chunks(watcher, big_bundle, range(half, chunks), meta=False)
    second = AgentProcess(config, data)
    try:
        second.url()
        watcher.wait_status(
            lambda s: s.state == "committed" and s.last_sequence >= 1,
            timeout=60,
            what="v2 committed after the restart",
        )
        watcher.wait(
            lambda: any(e.kind == "download_resumed" for e in watcher.events),
            timeout=10,
            what="download_resumed event",
        )
        resumed = next(e for e in watcher.events if e.kind == "download_resumed")
        assert resumed.details["resumed_chunks"] >= half // 2
        assert resumed.details["written_chunks"] == chunks - resumed.details["resumed_chunks"]
    finally:
        assert second.stop() == 0, second.output()
        watcher.close()


def test_outage_of_several_telemetry_intervals_loses_nothing(
    tmp_path: Path, bundles: Bundles, agent_keys: Keys
) -> None:
    broker = MosquittoBroker(tmp_path / "mosquitto").start()
    watcher = Watcher(broker.url, client_id="telemetry-watcher", persistent=True)
    config = write_config(
        tmp_path / "agent.toml",
        data_dir=tmp_path / "data",
        truststore=write_truststore(agent_keys, tmp_path / "truststore.json"),
        broker_url=broker.url,
        initial_bundle=bundles.v1,
        telemetry_interval_s=0.2,
    )
    try:
        with running_agent(config) as agent:
            assert agent.session.wait_connected(20)
            watcher.wait(lambda: len(watcher.telemetry) >= 2, timeout=20, what="telemetry")
            broker.stop()
            produced_before = agent.produced_telemetry
            time.sleep(1.6)  # 8 intervals without a broker
            assert agent.produced_telemetry >= produced_before + 5
            assert agent.queue is not None and len(agent.queue) >= 5  # buffered on disk
            broker.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(agent.queue) > 0:
                time.sleep(0.05)
            produced = agent._telemetry_seq
            watcher.wait(
                lambda: {t["seq"] for t in watcher.telemetry} >= set(range(1, produced + 1)),
                timeout=30,
                what=f"telemetry 1..{produced}",
            )
            seqs = [t["seq"] for t in watcher.telemetry]
            firsts = list(dict.fromkeys(seqs))  # at-least-once: repeats allowed, order not
            assert firsts == sorted(firsts)
            assert all(t["dropped"] == 0 for t in watcher.telemetry)
            assert all(t["device"] == DEVICE for t in watcher.telemetry)
    finally:
        watcher.close()
        broker.stop()


# -- HTTPS ---------------------------------------------------------------------------------------


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    cut_first_at: int | None = None
    requests: ClassVar[list[str | None]] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        ranges = self.headers.get("Range")
        type(self).requests.append(ranges)
        start = int(ranges.removeprefix("bytes=").rstrip("-")) if ranges else 0
        body = self.payload[start:]
        self.send_response(206 if ranges else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = type(self).cut_first_at
        if cut is not None:
            type(self).cut_first_at = None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


def test_https_download_resumes_with_a_range_request(tmp_path: Path, big_bundle: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    _RangeHandler.payload = big_bundle.read_bytes()
    _RangeHandler.cut_first_at = 200_000
    _RangeHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{server.server_address[1]}/bundle.ekb"
    size, sha = hash_file(big_bundle)
    downloader = HttpsDownloader(ca_file=cert, timeout_s=10)
    destination = tmp_path / "out.ekb"
    try:
        with pytest.raises(TransportError, match="resumes"):
            downloader.download(
                url, destination, sha256=sha, size_bytes=size, stats=DownloadStats()
            )
        stats = DownloadStats()
        downloader.download(url, destination, sha256=sha, size_bytes=size, stats=stats)
        assert stats.resumed_bytes == 200_000
        assert _RangeHandler.requests == [None, "bytes=200000-"]
        assert hash_file(destination) == (size, sha)
        with pytest.raises(TransportError, match="sha256"):
            downloader.download(
                url, tmp_path / "x.ekb", sha256="0" * 64, size_bytes=size, stats=DownloadStats()
            )
    finally:
        server.shutdown()
        server.server_close()


def test_tls_broker_with_password_and_last_will(
    tmp_path: Path, bundles: Bundles, agent_keys: Keys
) -> None:
    from edgekit.mosquitto import TlsFiles
    from tests.agent.agent_helpers import make_tls_files

    ca, cert, key = make_tls_files(tmp_path / "tls")
    broker = MosquittoBroker(
        tmp_path / "mosquitto",
        users={"dev-1": "s3cret", "watcher": "w"},
        tls=TlsFiles(ca, cert, key),
    ).start()
    config_path = write_config(
        tmp_path / "agent.toml",
        data_dir=tmp_path / "data",
        truststore=write_truststore(agent_keys, tmp_path / "truststore.json"),
        broker_url=broker.url,
        initial_bundle=bundles.v1,
    )
    text = config_path.read_text().replace(
        "[mqtt]\n", f'[mqtt]\nca_file = "{ca}"\nusername = "dev-1"\n'
    )
    config_path.write_text(text)
    received: list[bytes] = []
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5
    )
    client.username_pw_set("watcher", "w")
    client.tls_set(ca_certs=str(ca))
    client.on_message = lambda _c, _u, m: received.append(bytes(m.payload))
    client.connect("127.0.0.1", broker.port)
    client.subscribe(Topics(FLEET).status(DEVICE), qos=1)
    client.loop_start()
    try:
        wrong = load_config(config_path, environ={"EDGEKIT_AGENT_MQTT_PASSWORD": "nope"})
        agent = Agent(wrong)
        agent.session.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not agent.session.last_error:
            time.sleep(0.05)
        assert not agent.session.connected
        assert "refused" in (agent.session.last_error or "")
        agent.session.stop()
        agent.queue.close()  # type: ignore[union-attr]

        right = load_config(config_path, environ={"EDGEKIT_AGENT_MQTT_PASSWORD": "s3cret"})
        agent = Agent(right)
        stop = threading.Event()
        thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
        thread.start()
        assert agent.session.wait_connected(20)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(b'"online":true' in r for r in received):
            time.sleep(0.05)
        assert any(b'"online":true' in r for r in received)
        # Cut the agent off without a goodbye: the broker publishes its last will.
        before = len(received)
        agent.session.sever()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            b'"online":false' in r for r in received[before:]
        ):
            time.sleep(0.05)
        assert any(b'"online":false' in r for r in received[before:])
        # ... and the agent reconnects on its own and says it is back.
        assert agent.session.wait_connected(20)
        stop.set()
        thread.join(timeout=30)
    finally:
        client.loop_stop()
        client.disconnect()
        broker.stop()


def test_updater_fetches_an_https_source(
    tmp_path: Path, bundles: Bundles, agent_keys: Keys
) -> None:
    """A directive whose only source is an https:// URL, through the real `BundleFetcher`."""
    from edgekit.agent.download import BundleFetcher
    from edgekit.agent.serving import ModelHost
    from edgekit.agent.store import Store
    from edgekit.agent.updater import Updater

    from edgekit.profiles import load_profile
    from edgekit.trust import load_truststore
    from tests.agent.conftest import Recorder

    cert, key = self_signed_cert(tmp_path)
    _RangeHandler.payload = bundles.v2.read_bytes()
    _RangeHandler.cut_first_at = 1000  # the first attempt breaks off; the retry resumes
    _RangeHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}/demo-2.0.0.ekb"
    truststore = write_truststore(agent_keys, tmp_path / "truststore.json")
    config = load_config(
        write_config(
            tmp_path / "agent.toml",
            data_dir=tmp_path / "data",
            truststore=truststore,
            initial_bundle=bundles.v1,
            probation_s=0.1,
        ),
        environ={},
    )
    store = Store(config.data_dir)
    host = ModelHost("model")
    recorder = Recorder()
    updater = Updater(
        config=config,
        profile=load_profile(config.profile),
        store=store,
        trust=load_truststore(truststore.read_bytes()),
        host=host,
        fetcher=BundleFetcher(
            store.downloads_dir,
            mqtt_client=lambda: None,
            https=HttpsDownloader(ca_file=cert, timeout_s=10),
        ),
        reporter=recorder,
    )
    try:
        updater.start()
        updater.process(
            directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0", https_url=url)
        )
        assert updater.record.state == "committed", recorder.kinds()
        assert host.bundle is not None and host.bundle.sha256 == sha_of(bundles.v2)
        assert _RangeHandler.requests == [None, "bytes=1000-"]
        resumed = [e for e in recorder.events if e.kind == "download_resumed"]
        assert resumed and resumed[0].details["resumed_bytes"] == 1000
    finally:
        host.close()
        server.shutdown()
        server.server_close()


def test_last_will_carries_the_current_status(
    mosquitto: MosquittoBroker, tmp_path: Path, bundles: Bundles, agent_keys: Keys
) -> None:
    """Review #6: the will is the full status (active, previous, last_sequence), re-set on
    every status change, so a device that drops off keeps its state in the registry."""
    config_path = write_config(
        tmp_path / "agent.toml",
        data_dir=tmp_path / "data",
        truststore=write_truststore(agent_keys, tmp_path / "truststore.json"),
        broker_url=mosquitto.url,
        initial_bundle=bundles.v1,
    )
    watcher = Watcher(mosquitto.url)
    agent = Agent(load_config(config_path, environ={}))
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()

    def cut_and_catch_will() -> tuple[Status, Status]:
        before = len(watcher.statuses)
        agent.session.sever()
        watcher.wait(
            lambda: any(not s.online for s in watcher.statuses[before:]),
            timeout=30,
            what="the last will",
        )
        will = next(s for s in watcher.statuses[before:] if not s.online)
        back = watcher.wait_status(lambda s: s.online, timeout=30, what="back online")
        return will, back

    try:
        watcher.wait_status(lambda s: s.online and s.active is not None, what="online with v1")
        first, _ = cut_and_catch_will()  # the will given at the first connect
        assert first.active is not None and first.active.sha256 == sha_of(bundles.v1)
        assert first.state == "committed"
        # A status change (a directive for the active bundle raises last_sequence) is in the
        # will the agent sends with its next CONNECT.
        watcher.publish_directive(
            directive_for(bundles.v1, agent_keys, sequence=3, version="1.0.0")
        )
        watcher.wait_status(lambda s: s.online and s.last_sequence == 3, what="sequence 3")
        _, back = cut_and_catch_will()  # reconnect: the will now has sequence 3
        assert back.last_sequence == 3
        will, _ = cut_and_catch_will()
        assert will.last_sequence == 3 and will.online is False
        assert will.active is not None and will.active.sha256 == sha_of(bundles.v1)
    finally:
        stop.set()
        thread.join(timeout=30)
        watcher.close()


def test_session_refuses_packets_over_its_maximum_packet_size(mosquitto: MosquittoBroker) -> None:
    """Review #5: CONNECT carries Maximum Packet Size, so the broker never sends the agent a
    message bigger than a bundle chunk plus headroom."""
    from edgekit.agent.daemon import MAX_PACKET_BYTES

    from edgekit.mqtt import BrokerSettings, Message, MqttClient
    from edgekit.transfer import MAX_CHUNK_BYTES

    assert MAX_PACKET_BYTES > MAX_CHUNK_BYTES
    received: list[tuple[str, int]] = []
    arrived = threading.Event()

    def handler(message: Message) -> None:
        received.append((message.topic, len(message.payload)))
        if message.topic.endswith("small"):
            arrived.set()

    settings = BrokerSettings(mosquitto.url, reconnect_min_s=0.1, reconnect_max_s=1.0)
    session = MqttClient(
        settings, client_id="edgekit-test-packet-size", max_packet_bytes=MAX_PACKET_BYTES
    )
    session.subscribe("cap/#", handler)
    session.start()
    sender = MqttClient(settings, client_id="edgekit-test-sender").connect()
    try:
        assert session.wait_connected(10)
        time.sleep(0.2)  # let the SUBACK arrive
        chunk = b"c" * MAX_CHUNK_BYTES  # the largest chunk still arrives
        assert sender.publish("cap/chunk", chunk, qos=1).wait(10)
        assert sender.publish("cap/big", b"x" * (MAX_PACKET_BYTES + 1), qos=1).wait(10)
        assert sender.publish("cap/small", b"ok", qos=1).wait(10)
        assert arrived.wait(10)
        topics = [topic for topic, _size in received]
        assert "cap/chunk" in topics and "cap/big" not in topics, received
    finally:
        sender.stop()
        session.stop()


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs filled to the last block (needs root; skipped where mounting fails)."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        (mount_point / "downloads").mkdir()
        with (mount_point / "filler").open("wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
        with contextlib.suppress(OSError):
            (mount_point / "filler.2").write_bytes(b"\0" * 4096)
        yield mount_point / "downloads"
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_during_an_mqtt_download_is_a_storage_error(
    mosquitto: MosquittoBroker, full_disk: Path, big_bundle: Path, agent_keys: Keys
) -> None:
    """Review #12: a full disk is reported as storage, not as a transport failure to retry."""
    from edgekit.agent.download import BundleFetcher
    from edgekit.agent.journal import StorageError

    from edgekit.mqtt import BrokerSettings, MqttClient
    from edgekit.trust import BundleRef, BundleSource

    watcher = Watcher(mosquitto.url)
    watcher.publish_bundle(big_bundle)
    client = MqttClient(BrokerSettings(mosquitto.url), client_id="edgekit-test-fetch").connect()
    try:
        size, sha = hash_file(big_bundle)
        ref = BundleRef(
            sha, size, "demo", "2.0.0", (BundleSource("mqtt", Topics(FLEET).bundle_prefix(sha)),)
        )
        fetcher = BundleFetcher(full_disk, mqtt_client=lambda: client, timeout_s=30)
        with pytest.raises(StorageError, match="No space left") as caught:
            fetcher.fetch(ref, full_disk / f"{sha}.ekb")
        assert not isinstance(caught.value, TransportError)
    finally:
        client.stop()
        watcher.close()


def test_a_poisoned_bundle_meta_rolls_back_once_without_a_reconnect_storm(
    mosquitto: MosquittoBroker, tmp_path: Path, bundles: Bundles, agent_keys: Keys
) -> None:
    """Issue 12: a retained meta nested 5000 deep used to raise RecursionError inside paho's
    callback; the QoS 1 message was never acknowledged and came back on every reconnect. Now
    the meta parser refuses it, the fetch fails naming the bad meta, the update rolls back
    once, and the session never drops."""
    watcher = Watcher(mosquitto.url)
    sha = sha_of(bundles.v2)
    poisoned = b'{"schema":"edgekit.bundle-meta/v1","sha256":' + b"[" * 1500 + b"]" * 1500 + b"}"
    meta_topic = Topics(FLEET).bundle(sha).meta
    assert watcher.client.publish(meta_topic, poisoned, qos=1, retain=True).wait(10)
    config = write_config(
        tmp_path / "agent.toml",
        data_dir=tmp_path / "data",
        truststore=write_truststore(agent_keys, tmp_path / "truststore.json"),
        broker_url=mosquitto.url,
        initial_bundle=bundles.v1,
        probation_s=0.2,
    )
    try:
        with running_agent(config) as agent:
            assert agent.session.wait_connected(20)
            watcher.publish_directive(
                directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0")
            )
            watcher.wait(
                lambda: any(e.kind == "rolled_back" for e in watcher.events),
                timeout=90,
                what="the rollback",
            )
            rollbacks = [e for e in watcher.events if e.kind == "rolled_back"]
            assert len(rollbacks) == 1
            assert "bundle meta" in (rollbacks[0].reason or "")
            assert "too_deep" in (rollbacks[0].reason or "")
            assert agent.session.connects == 1  # no reconnect storm
            assert agent.session.rejected == {} and agent.session.handler_errors == 0
            status = watcher.wait_status(lambda s: s.state == "rolled_back", what="rolled back")
            assert status.active is not None and status.active.sha256 == sha_of(bundles.v1)
    finally:
        watcher.close()


class _ConnectProxy:
    """A CONNECT proxy on loopback (what `https_proxy` points devices to): records each
    CONNECT line and its Proxy-Authorization, then relays bytes both ways."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += client.recv(4096)
        lines = head.decode().split("\r\n")
        auth = next((line.split(": ", 1)[1] for line in lines if line.lower().startswith(
            "proxy-authorization")), None)  # fmt: skip
        self.requests.append((lines[0], auth))
        host, port = lines[0].split()[1].rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        def pump(source: socket.socket, sink: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := source.recv(65536):
                    sink.sendall(data)
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        pump(client, upstream)

    def close(self) -> None:
        self.server.close()


def test_https_download_goes_through_the_environments_proxy(
    tmp_path: Path, big_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like urllib, the downloader honours `https_proxy` (a CONNECT tunnel, with the proxy's
    credentials) and `no_proxy`."""
    cert, key = self_signed_cert(tmp_path)
    _RangeHandler.payload = big_bundle.read_bytes()
    _RangeHandler.cut_first_at = None
    _RangeHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxy = _ConnectProxy()
    port = server.server_address[1]
    url = f"https://127.0.0.1:{port}/bundle.ekb"
    size, sha = hash_file(big_bundle)
    for name in ("no_proxy", "NO_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("https_proxy", f"http://ops:s%40cret@127.0.0.1:{proxy.port}")
    try:
        downloader = HttpsDownloader(ca_file=cert, timeout_s=10)
        downloader.download(
            url, tmp_path / "via-proxy.ekb", sha256=sha, size_bytes=size, stats=DownloadStats()
        )
        assert hash_file(tmp_path / "via-proxy.ekb") == (size, sha)
        expected_auth = "Basic " + base64.b64encode(b"ops:s@cret").decode()
        assert proxy.requests == [(f"CONNECT 127.0.0.1:{port} HTTP/1.0", expected_auth)]
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        downloader.download(
            url, tmp_path / "direct.ekb", sha256=sha, size_bytes=size, stats=DownloadStats()
        )
        assert len(proxy.requests) == 1  # bypassed
    finally:
        proxy.close()
        server.shutdown()
        server.server_close()
