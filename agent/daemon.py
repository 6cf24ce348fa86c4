"""`edgekit-agent run`: wires the store, updater, model host, inference server, MQTT session,
on-disk message queue and telemetry loop together, and runs until asked to stop.

Threads: the MQTT network thread (paho callbacks only queue work), the updater worker
(directives, downloads, checks, probation), the sender (the on-disk queue to the broker, one
acknowledged QoS 1 message at a time, in order), the telemetry loop, and the inference server.
The agent never imports tensorflow, onnx or the converter.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any

import msgspec
from edgekit.agent.bench_service import BenchService
from edgekit.agent.config import AgentConfig
from edgekit.agent.download import BundleFetcher, HttpsDownloader
from edgekit.agent.journal import (
    StorageError,
    install_step_hook,
    read_json,
    write_json_atomic,
)
from edgekit.agent.oip import InferenceServer
from edgekit.agent.queue import DiskQueue, QueueError
from edgekit.agent.serving import ModelHost
from edgekit.agent.store import Store
from edgekit.agent.telemetry import build_telemetry, resource_usage
from edgekit.agent.updater import Updater

from edgekit.errors import BundleError, EdgekitError, first_line
from edgekit.messages import Event, Status
from edgekit.mqtt import Message, MqttClient
from edgekit.profiles import load_profile
from edgekit.topics import Topics, client_id
from edgekit.transfer import MAX_CHUNK_BYTES
from edgekit.trust import (
    TrustStore,
    TrustUpdateError,
    establish_trust,
    parse_truststore_envelope,
)

__all__ = ["MAX_PACKET_BYTES", "Agent", "notify_systemd"]

log = logging.getLogger(__name__)

_QUEUE_MAX_BYTES = 64 << 20
MAX_PACKET_BYTES = MAX_CHUNK_BYTES + 64 * 1024
"""The largest MQTT packet the agent accepts (MQTT 5 Maximum Packet Size, sent in CONNECT):
a bundle chunk of the largest size `edgekit.transfer` allows, plus headroom for the topic and
properties. The broker drops bigger messages for this client instead of sending them."""
_ACK_TIMEOUT_S = 10.0


def notify_systemd(message: str) -> None:
    """sd_notify(3) without libsystemd: a datagram to $NOTIFY_SOCKET (no-op outside systemd)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as e:
        log.debug("sd_notify failed: %s", e)


class Agent:
    """The device agent; `run(stop)` blocks until `stop` is set."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        install_step_hook(config.data_dir)  # crash tests only: a no-op unless armed
        self.topics = Topics(config.fleet)
        self.profile = load_profile(config.profile)
        try:
            truststore_bytes = config.truststore.read_bytes()
        except OSError as e:
            raise EdgekitError(
                f"cannot read the trust store {config.truststore}: {e.strerror or e}; provision "
                "the device with the fleet's trust store (truststore key)"
            ) from e
        self.store = Store(config.data_dir)
        self._trust_note: tuple[str, str] | None = None  # (event kind, reason), reported at run
        self.trust, self.trust_envelope = self._establish_trust(truststore_bytes)
        self.host = ModelHost(config.model_name)
        self.queue = self._open_queue()
        self.session = MqttClient(
            config.mqtt,
            client_id=client_id("agent", config.device_id),
            will=(self.topics.status(config.device_id), self._offline_status()),
            clean_start=False,
            max_packet_bytes=MAX_PACKET_BYTES,
            on_connect=self._on_connect,
        )
        self.fetcher = BundleFetcher(
            self.store.downloads_dir,
            mqtt_client=lambda: self.session if self.session.connected else None,
            https=HttpsDownloader(
                ca_file=config.update.https_ca_file,
                min_bytes_per_s=config.update.min_download_bytes_per_s,
                window_s=config.update.download_window_s,
            ),
            max_bytes=config.update.max_bundle_bytes,
            timeout_s=config.update.download_timeout_s,
        )
        self.updater = Updater(
            config=config,
            profile=self.profile,
            store=self.store,
            trust=self.trust,
            host=self.host,
            fetcher=self.fetcher,
            reporter=self,
            trust_envelope=self.trust_envelope,
        )
        # The updater's trust store is the one bench requests are verified against too (it is
        # replaced when the trust store rotates).
        self.bench = BenchService(
            settings=config.bench,
            fleet=config.fleet,
            device=config.device_id,
            client=self.session,
            trust=lambda: self.updater.trust,
            root=self.store.root / "bench",
            emit=self.event,
        )
        host_name, _, port = config.inference_address.rpartition(":")
        host_name = host_name.strip("[]")  # [::1]:8080
        self.server = InferenceServer(
            self.host, (host_name, int(port)), limits=self.updater.inference_limits
        )
        self._kick = threading.Event()
        self._status: Status | None = None
        self._status_lock = threading.Lock()
        self._telemetry_seq = 0
        self._threads: list[threading.Thread] = []
        self.produced_telemetry = 0

    def _establish_trust(self, provisioned: bytes) -> tuple[TrustStore, bytes]:
        """The trust store to start with: the floor in the data directory (the highest
        version this device accepted) unless the provisioned file follows it by the rotation
        rule; the choice becomes the floor. An older provisioned file is ignored."""
        now = datetime.now(timezone.utc)
        try:
            self.store.ensure_layout()
            floor = self.store.trust_floor()
        except StorageError as e:
            log.error("%s; using the provisioned trust store", e)
            floor = None
        try:
            choice = establish_trust(provisioned, floor, now=now)
        except TrustUpdateError as e:
            log.error("%s", e)
            self._trust_note = ("trust_refused", str(e))
            choice = establish_trust(floor or provisioned, None)
        except BundleError as e:
            if floor is None:
                raise
            log.error("the trust floor in the data directory is unreadable (%s)", first_line(e))
            choice = establish_trust(provisioned, None, now=now)
        if choice.note:
            log.warning("trust store: %s", choice.note)
        if choice.source != "floor":
            try:
                self.store.set_trust_floor(choice.envelope)
            except StorageError as e:
                log.error("%s", e)
        if choice.source == "rotated":
            self._trust_note = ("trust_updated", choice.note)
        log.info("trust store version %d (%s)", choice.store.version, choice.source)
        return choice.store, choice.envelope

    def _open_queue(self) -> DiskQueue | None:
        try:
            self.store.ensure_layout()
            return DiskQueue(
                self.store.queue_dir,
                max_messages=self.config.telemetry.queue_max_messages,
                max_bytes=_QUEUE_MAX_BYTES,
            )
        except (QueueError, StorageError) as e:
            log.error("no on-disk message queue (%s); messages are sent only while online", e)
            return None

    def _offline_status(self) -> bytes:
        return Status(
            fleet=self.config.fleet,
            device=self.config.device_id,
            online=False,
            state="idle",
            profile=self.profile.name,
            group=self.config.group,
            tags=dict(self.config.tags),
        ).to_json()

    # -- Reporter (called by the updater) ------------------------------------------------

    def event(self, event: Event) -> None:
        self._send(self.topics.events(self.config.device_id), event.to_json(), qos=1)

    def status(self, status: Status) -> None:
        with self._status_lock:
            self._status = status
            # The last will carries the full status (active, previous, last_sequence) so an
            # offline device keeps its state in the registry; it takes effect on the next
            # (re)connect (MQTT fixes a connection's will at CONNECT).
            self.session.set_will(
                self.topics.status(self.config.device_id),
                msgspec.structs.replace(status, online=False).to_json(),
            )
        self._publish_status()

    def _publish_status(self) -> None:
        with self._status_lock:
            status = self._status
        if status is None or not self.session.connected:
            return  # published on (re)connect
        try:
            self.session.publish(
                self.topics.status(self.config.device_id), status.to_json(), qos=1, retain=True
            )
        except EdgekitError as e:
            log.warning("cannot publish status: %s", first_line(e))

    def _send(self, topic: str, payload: bytes, *, qos: int) -> None:
        """Queue on disk (sent in order by the sender thread); directly if there is no queue."""
        if self.queue is not None:
            try:
                self.queue.put(topic, payload, qos)
                self._kick.set()
                return
            except QueueError as e:
                log.error("cannot queue a message for %s: %s", topic, first_line(e))
        if self.session.connected:
            self.session.publish(topic, payload, qos=qos)

    # -- MQTT ----------------------------------------------------------------------------

    def _on_connect(self) -> None:
        # Runs on the network thread: publish and wake the others, never block.
        self.status(self.updater.status())
        self._kick.set()

    def _on_desired(self, message: Message) -> None:
        self.updater.submit(message.payload)

    def _on_trust(self, message: Message) -> None:
        if message.payload:  # an empty retained message clears the topic
            self.updater.apply_trust(bytes(message.payload))

    def _sender(self, stop: threading.Event) -> None:
        queue = self.queue
        if queue is None:
            stop.wait()  # nothing to send from; stay alive for the watchdog
            return
        while not stop.is_set():
            batch = queue.peek(1) if self.session.connected else []
            if not batch:
                self._kick.wait(0.5)
                self._kick.clear()
                continue
            message = batch[0]
            try:
                handle = self.session.publish(message.topic, message.payload, qos=message.qos)
            except EdgekitError as e:
                log.warning("publish failed: %s", first_line(e))
                stop.wait(0.5)
                continue
            if message.qos == 0 or handle.wait(_ACK_TIMEOUT_S):
                queue.ack(message.id)
            # Not acknowledged in time: paho resends on reconnect; we publish it again too
            # (at least once; telemetry carries seq so consumers drop repeats).

    # -- telemetry -----------------------------------------------------------------------

    def _next_seq(self) -> int:
        path = self.store.root / "telemetry.json"
        if self._telemetry_seq == 0:
            try:
                document = read_json(path, what="telemetry counter")
                self._telemetry_seq = int(document.get("seq", 0)) if document else 0
            except (StorageError, AttributeError, ValueError, TypeError):
                self._telemetry_seq = 0
        self._telemetry_seq += 1
        try:
            write_json_atomic(path, {"seq": self._telemetry_seq})
        except StorageError as e:
            log.warning("cannot persist the telemetry counter: %s", first_line(e))
        return self._telemetry_seq

    def send_telemetry(self, interval_s: float) -> int:
        """Build one interval's telemetry and queue it; returns its seq."""
        drift = self.host.drift
        record = self.updater.record
        message = build_telemetry(
            fleet=self.config.fleet,
            device=self.config.device_id,
            seq=self._next_seq(),
            interval_s=interval_s,
            snapshot=self.host.stats.snapshot(),
            resources=resource_usage(),
            drift_psi=drift.psi() if drift is not None else None,
            bundle=self.host.bundle,
            rollout_id=record.rollout_id,
            state=record.state,
            dropped=self.queue.dropped if self.queue is not None else 0,
        )
        self._send(
            self.topics.telemetry(self.config.device_id),
            message.to_json(),
            qos=self.config.telemetry.qos,
        )
        self.produced_telemetry += 1
        return message.seq

    def _telemetry(self, stop: threading.Event) -> None:
        interval = self.config.telemetry.interval_s
        next_at = time.monotonic() + interval
        while not stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += interval
            try:
                self.send_telemetry(interval)
            except Exception:
                log.exception("telemetry failed")  # telemetry must never stop the agent

    def _watchdog(self, stop: threading.Event) -> None:
        """Ping systemd's watchdog at half its period while every worker thread lives."""
        try:
            period_s = int(os.environ.get("WATCHDOG_USEC", "0")) / 1e6
        except ValueError:
            period_s = 0.0
        if period_s <= 0:
            return
        while not stop.wait(period_s / 2):
            dead = [t.name for t in self._threads if not t.is_alive() and t.name != "watchdog"]
            if dead:
                log.error("worker threads died (%s): letting the watchdog restart the agent", dead)
                return
            notify_systemd("WATCHDOG=1")

    # -- lifecycle -----------------------------------------------------------------------

    def _spawn(self, name: str, target: Any, stop: threading.Event) -> None:
        thread = threading.Thread(target=target, args=(stop,), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def run(self, stop: threading.Event) -> None:
        """Serve and update until `stop` is set; then publish an offline status."""
        self.updater.start()
        self.server.start()
        self.updater.emit_event(
            "agent_started",
            details={"inference_url": self.server.url, "pid": os.getpid()},
        )
        if self._trust_note is not None:
            kind, reason = self._trust_note
            self.updater.emit_event(
                kind,
                ok=kind == "trust_updated",
                reason=reason,
                bundle=None,
                rollout_id=None,
                details={"version": self.trust.version},
            )
        self.session.subscribe(self.topics.desired(self.config.device_id), self._on_desired)
        self.session.subscribe(self.bench.topic, self.bench.handle)
        self.session.subscribe(self.topics.trust(), self._on_trust)
        self.session.start()
        self._spawn("updater", self.updater.run, stop)
        self._spawn("sender", self._sender, stop)
        self._spawn("telemetry", self._telemetry, stop)
        self._spawn("watchdog", self._watchdog, stop)
        self._write_runtime_info()
        notify_systemd("READY=1")
        log.info(
            "agent %s running: inference on %s, broker %s",
            self.config.device_id,
            self.server.url,
            self.config.mqtt.url,
        )
        stop.wait()
        notify_systemd("STOPPING=1")
        log.info("stopping")
        self.fetcher.cancel.set()
        for thread in self._threads:
            thread.join(timeout=5.0)
        status = self.updater.status(online=False)
        self.session.stop(final=(self.topics.status(self.config.device_id), status.to_json()))
        self.server.stop()
        self.host.close()
        if self.queue is not None:
            self.queue.close()

    def _write_runtime_info(self) -> None:
        """`<data_dir>/agent.json`: where this agent serves (read by `edgekit-agent status`)."""
        try:
            write_json_atomic(
                self.store.root / "agent.json",
                {"pid": os.getpid(), "inference_url": self.server.url, "started": time.time()},
            )
        except StorageError as e:
            log.warning("%s", e)


def describe_state(config: AgentConfig) -> dict[str, Any]:
    """What `edgekit-agent status` shows: the on-disk state under the data directory."""
    store = Store(config.data_dir)
    result: dict[str, Any] = {"device": config.device_id, "fleet": config.fleet}
    try:
        journal = read_json(store.journal_path, what="journal") or {}
        result["state"] = journal.get("state", "idle")
        result["sequence"] = journal.get("sequence", 0)
        result["rollout_id"] = journal.get("rollout_id")
        result["reason"] = journal.get("reason")
        pointer = store.pointer()
        floor, _ = store.floor()
        result["last_sequence"] = floor.last_sequence
        result["min_security_epoch"] = floor.min_security_epoch
        failed = (journal.get("bundle") or {}) if journal.get("state") == "rolled_back" else {}
        for label, slot in (("active", pointer.active), ("previous", pointer.previous)):
            info = store.slot_info(slot) if slot else None
            if label == "previous" and info and info.bundle.sha256 == failed.get("sha256"):
                info = None  # the bundle just rolled back from is not one to go back to
            result[label] = (
                {
                    "slot": slot,
                    "name": info.bundle.name,
                    "version": info.bundle.version,
                    "sha256": info.bundle.sha256,
                }
                if info
                else None
            )
        result["bad_bundles"] = store.bad_bundles()
        floor_envelope = store.trust_floor()  # the highest trust store version accepted
        result["trust_version"] = (
            parse_truststore_envelope(floor_envelope)[0].version if floor_envelope else None
        )
        probation = store.probation()  # the resumable probation record, while one runs
        result["probation"] = (
            {key: probation.get(key) for key in ("sequence", "observed_s", "window_s", "baseline")}
            if probation
            else None
        )
        runtime = read_json(store.root / "agent.json", what="agent runtime info") or {}
        result["inference_url"] = runtime.get("inference_url")
        result["pid"] = runtime.get("pid")
    except EdgekitError as e:
        result["error"] = str(e)
    result["data_dir"] = str(config.data_dir)
    return json.loads(json.dumps(result, default=str))  # type: ignore[no-any-return]
