"""A slow HTTPS source cannot hold the updater: a minimum throughput, an overall deadline, and a
newer directive cancels the download. The real agent, a real Mosquitto, and a real HTTPS
server on loopback that sends one byte at a time."""

from __future__ import annotations

import contextlib
import http.server
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from edgekit.mosquitto import MosquittoBroker
from tests.agent.agent_helpers import (
    AgentProcess,
    Keys,
    Watcher,
    agent_config,
    directive_for,
    sha_of,
)
from tests.agent.conftest import Bundles
from tests.tls_helpers import self_signed_cert


class _TrickleHandler(http.server.BaseHTTPRequestHandler):
    """Announces the whole bundle, then sends one byte every `interval_s`."""

    payload = b""
    interval_s = 0.2
    stop = threading.Event()
    requests: ClassVar[list[str]] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        with contextlib.suppress(OSError):
            for byte in self.payload:
                if type(self).stop.wait(self.interval_s):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()


@dataclass
class Slow:
    url: str
    cert: Path
    watcher: Watcher
    broker: MosquittoBroker
    root: Path


@pytest.fixture
def slow(tmp_path: Path, bundles: Bundles) -> Iterator[Slow]:
    cert, key = self_signed_cert(tmp_path)
    _TrickleHandler.payload = bundles.v2.read_bytes()
    _TrickleHandler.stop = threading.Event()
    _TrickleHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TrickleHandler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    broker = MosquittoBroker(tmp_path / "mosquitto")
    broker.start()
    watcher = Watcher(broker.url)
    try:
        yield Slow(
            f"https://127.0.0.1:{server.server_address[1]}/demo-2.0.0.ekb",
            cert,
            watcher,
            broker,
            tmp_path,
        )
    finally:
        _TrickleHandler.stop.set()
        watcher.close()
        broker.stop()
        server.shutdown()
        server.server_close()


def _agent(slow: Slow, keys: Keys, bundles: Bundles, *, update: str) -> AgentProcess:
    config, data = agent_config(
        slow.root,
        keys,
        broker_url=slow.broker.url,
        initial_bundle=bundles.v1,
        probation_s=0.3,
        extra_update=f'https_ca_file = "{slow.cert}"\n{update}',
    )
    return AgentProcess(config, data)


def test_a_source_below_the_minimum_throughput_is_dropped(
    slow: Slow, agent_keys: Keys, bundles: Bundles
) -> None:
    agent = _agent(
        slow,
        agent_keys,
        bundles,
        update="download_timeout_s = 6\nmin_download_bytes_per_s = 200\ndownload_window_s = 1",
    )
    try:
        agent.url()
        slow.watcher.publish_directive(
            directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0", https_url=slow.url)
        )
        # 5 bytes/s against 200 required: each attempt ends after the 1 s window, and the
        # 6 s deadline ends the update (it used to take ~18 hours for this 10 KB bundle).
        status = slow.watcher.wait_status(
            lambda s: s.last_sequence >= 1 and s.state in ("committed", "rolled_back"),
            timeout=60,
            what="the slow download to be given up",
        )
        assert status.state == "rolled_back"
        assert status.active is not None and status.active.sha256 == sha_of(bundles.v1)
        slow.watcher.wait(
            lambda: any(e.kind == "rolled_back" for e in slow.watcher.events),
            timeout=30,
            what="the rolled_back event",
        )
        reason = next(e.reason for e in slow.watcher.events if e.kind == "rolled_back") or ""
        assert "download failed" in reason and ("too slow" in reason or "deadline" in reason)
        assert "download too slow" in agent.log.read_text()  # why the attempts were dropped
        assert len(_TrickleHandler.requests) >= 2  # retried, each attempt cut short
    finally:
        assert agent.stop() == 0, agent.output()


def test_a_newer_directive_cancels_a_slow_download(
    slow: Slow, agent_keys: Keys, bundles: Bundles
) -> None:
    _TrickleHandler.interval_s = 0.5  # ~1.4 hours for the bundle, no throughput floor
    agent = _agent(slow, agent_keys, bundles, update="min_download_bytes_per_s = 0")
    try:
        agent.url()
        slow.watcher.publish_directive(
            directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0", https_url=slow.url)
        )
        slow.watcher.wait(
            lambda: any(e.state == "downloading" for e in slow.watcher.events),
            timeout=30,
            what="the slow download to start",
        )
        time.sleep(1.0)  # bytes are trickling in
        # The operator rolls back: a newer directive, for a bundle reachable over MQTT.
        slow.watcher.publish_bundle(bundles.v4_epoch2)
        slow.watcher.publish_directive(
            directive_for(
                bundles.v4_epoch2, agent_keys, sequence=2, version="4.0.0", min_security_epoch=2
            )
        )
        status = slow.watcher.wait_status(
            lambda s: s.last_sequence >= 2 and s.state in ("committed", "rolled_back"),
            timeout=60,
            what="the newer directive to be applied",
        )
        assert status.state == "committed"
        assert status.active is not None and status.active.sha256 == sha_of(bundles.v4_epoch2)
        superseded = [e for e in slow.watcher.events if e.kind == "rolled_back" and e.sequence == 1]
        assert superseded and "superseded" in (superseded[0].reason or "")
    finally:
        _TrickleHandler.interval_s = 0.2
        assert agent.stop() == 0, agent.output()
