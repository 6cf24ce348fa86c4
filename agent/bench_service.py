"""The agent's side of the online bench loop: `devices/<id>/bench` in, measurements out.

A bench request (`edgekit.trust.bench`) is verified against the device's trust store (the
`directives` role), must name this device and be unexpired, and is refused, with a
`bench_refused` event saying why, unless `[bench] enabled = true` in agent.toml. An accepted
request runs on its own thread, one at a time: the files are fetched over the chunked MQTT
transfer into `<data_dir>/bench/<request_id>/` (sha256 and size pinned by the signed request,
the total bounded by `[bench] max_bytes`), measured by `edgekit.agent.bench` in low-priority
child processes, and the `Measurements` are published on `devices/<id>/bench/result`. The
folder is removed afterwards.

A bench never touches the updater: no slot, journal, pointer or probation state is read or
written, and nothing it fetched can be installed (bench files are not bundles).
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from edgekit.agent.bench import BenchSubject, run_bench
from edgekit.agent.config import BenchSettings

from edgekit.errors import EdgekitError
from edgekit.files import hash_file
from edgekit.messages import Event
from edgekit.mqtt import Message, MqttClient
from edgekit.topics import Topics
from edgekit.transfer import MqttBundleFetcher
from edgekit.trust import TrustStore
from edgekit.trust.bench import BenchRequest, verify_bench_request
from edgekit.trust.errors import BundleError

__all__ = ["BenchService"]

log = logging.getLogger(__name__)

EventSink = Callable[[Event], None]


class BenchService:
    """Verifies bench requests, runs them one at a time and publishes their measurements."""

    def __init__(
        self,
        *,
        settings: BenchSettings,
        fleet: str,
        device: str,
        client: MqttClient,
        trust: Callable[[], TrustStore],
        root: Path,
        emit: EventSink,
    ) -> None:
        self.settings = settings
        self.fleet = fleet
        self.device = device
        self.client = client
        self.topics = Topics(fleet)
        self._trust = trust
        self.root = root
        self._emit = emit
        self._lock = threading.Lock()
        self._running: threading.Thread | None = None
        self.completed = 0

    @property
    def topic(self) -> str:
        """The topic bench requests arrive on."""
        return self.topics.bench(self.device)

    def handle(self, message: Message) -> None:
        """A bench request arrived (network thread: verify, then hand over to a thread)."""
        try:
            request = verify_bench_request(
                bytes(message.payload),
                truststore=self._trust(),
                fleet=self.fleet,
                device=self.device,
                now=dt.datetime.now(dt.timezone.utc),
            )
        except BundleError as error:
            self._refuse(None, f"not a valid bench request for this device: {error}")
            return
        if not self.settings.enabled:
            self._refuse(
                request.request_id,
                "benchmarking is disabled on this device: set [bench] enabled = true in its "
                "agent.toml",
            )
            return
        if request.total_bytes > self.settings.max_bytes:
            self._refuse(
                request.request_id,
                f"the request's files hold {request.total_bytes} bytes, more than [bench] "
                f"max_bytes ({self.settings.max_bytes})",
            )
            return
        with self._lock:
            if self._running is not None and self._running.is_alive():
                self._refuse(request.request_id, "another bench is running on this device")
                return
            self._running = threading.Thread(
                target=self._run, args=(request,), name="bench", daemon=True
            )
            self._running.start()

    def wait(self, timeout_s: float) -> bool:
        """Wait for a running bench to finish (tests, shutdown)."""
        with self._lock:
            thread = self._running
        if thread is None:
            return True
        thread.join(timeout_s)
        return not thread.is_alive()

    def _refuse(self, request_id: str | None, reason: str) -> None:
        log.warning("bench request refused: %s", reason)
        details = {"request_id": request_id} if request_id else {}
        self._event("bench_refused", ok=False, reason=reason, details=details)

    def _event(self, kind: str, **fields: Any) -> None:
        self._emit(
            Event(
                fleet=self.fleet,
                device=self.device,
                kind=kind,
                ts=dt.datetime.now(dt.timezone.utc).timestamp(),
                **fields,
            )
        )

    def _run(self, request: BenchRequest) -> None:
        folder = self.root / request.request_id
        details = {"request_id": request.request_id, "files": [f.name for f in request.files]}
        self._event("bench_started", details=details)
        try:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            paths = self._fetch(request, folder)
            subjects = _subjects(paths)
            measurements = run_bench(
                subjects,
                device_id=self.device,
                threads=request.threads or self.settings.threads or _cores(),
                seconds_per_model=request.seconds_per_model,
                throttle=self.settings.throttles(),
                workdir=folder,
            )
            measurements = msgspec.structs.replace(measurements, request_id=request.request_id)
            self.client.publish(
                self.topics.bench_result(self.device), measurements.to_json(), qos=1
            )
            self.completed += 1
            self._event("bench_done", ok=True, details={"request_id": request.request_id})
        except (EdgekitError, OSError) as error:
            log.warning("bench %s failed: %s", request.request_id, error)
            self._event(
                "bench_done",
                ok=False,
                reason=str(error)[:2000],
                details={"request_id": request.request_id},
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _fetch(self, request: BenchRequest, folder: Path) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        partial = folder / ".partial"
        partial.mkdir()
        for item in request.files:
            fetcher = MqttBundleFetcher(
                self.client,
                item.topic_prefix,
                partial,
                sha256=item.sha256,
                size_bytes=item.size_bytes,
                max_bytes=self.settings.max_bytes,
            )
            target = folder / item.name
            fetcher.fetch(target, timeout_s=self.settings.timeout_s)
            if hash_file(target)[1] != item.sha256:  # the fetcher checks; a second look is cheap
                raise EdgekitError(f"bench file {item.name}: sha256 differs from the request")
            paths[item.name] = target
        return paths


def _subjects(paths: dict[str, Path]) -> list[BenchSubject]:
    reference = paths.get("reference.npz")
    return [
        BenchSubject(name=path.stem, model=path, sha256=hash_file(path)[1], reference=reference)
        for name, path in sorted(paths.items())
        if name != "reference.npz"
    ]


def _cores() -> int:
    import os

    return os.cpu_count() or 1
