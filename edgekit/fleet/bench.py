"""The converter's side of the online bench loop: ask one device to measure the candidates.

`bench_on_device` publishes every candidate file and `reference.npz` as retained chunks
(`edgekit.transfer`, each under its own sha256), sends a signed bench request
(`edgekit.trust.bench`) to `devices/<id>/bench`, reports the device's progress events, and
returns the `Measurements` the device publishes on `devices/<id>/bench/result` for this
request, or raises `BenchRemoteError` (refused, failed on the device, or no answer in time).
The chunks are removed from the broker afterwards.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.fleet.registry import fleet_client
from edgekit.messages import BundleMeta, Event, Measurements
from edgekit.mqtt import BrokerSettings, Message
from edgekit.topics import Topics
from edgekit.transfer import publish_bundle, unpublish_bundle
from edgekit.trust import Signer
from edgekit.trust.bench import BenchFile, BenchRequest, sign_bench_request

__all__ = ["BenchRemoteError", "bench_on_device"]

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


class BenchRemoteError(EdgekitError):
    """The device refused the bench request, failed it, or did not answer in time."""


def bench_on_device(
    files: Mapping[str, Path],
    *,
    device: str,
    fleet: str,
    settings: BrokerSettings,
    signers: Iterable[Signer],
    seconds_per_model: float = 2.0,
    threads: int | None = None,
    timeout_s: float = 900.0,
    progress: Progress | None = None,
) -> Measurements:
    """Have `device` measure `files` (name -> path: candidates and `reference.npz`)."""
    say = progress or (lambda _message: None)
    topics = Topics(fleet)
    request_id = f"bench-{uuid.uuid4().hex[:16]}"
    inbox: queue.Queue[Measurements | Event] = queue.Queue()

    def on_result(message: Message) -> None:
        result = Measurements.from_json(message.payload)  # MessageError: counted by the client
        if result.request_id == request_id:
            inbox.put(result)

    def on_event(message: Message) -> None:
        event = Event.from_json(message.payload)
        if event.details.get("request_id") == request_id or event.kind == "bench_refused":
            inbox.put(event)

    metas: list[BundleMeta] = []
    with fleet_client(settings, role="bench") as client:
        client.subscribe(topics.bench_result(device), on_result)
        client.subscribe(topics.events(device), on_event)
        try:
            bench_files = []
            for name, path in sorted(files.items()):
                say(f"publishing {name} ({path.stat().st_size} bytes)")
                meta = publish_bundle(client, topics, path, name=name)
                metas.append(meta)
                bench_files.append(
                    BenchFile(
                        name=name,
                        sha256=meta.sha256,
                        size_bytes=meta.size_bytes,
                        topic_prefix=topics.bundle_prefix(meta.sha256),
                    )
                )
            now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
            request = BenchRequest(
                fleet=fleet,
                device=device,
                request_id=request_id,
                issued_at=now,
                expires_at=now + dt.timedelta(seconds=max(60.0, timeout_s)),
                files=tuple(bench_files),
                seconds_per_model=seconds_per_model,
                threads=threads,
            )
            envelope = sign_bench_request(request, signers)
            say(f"asking {device} to measure {len(bench_files) - 1} candidate(s)")
            if not client.publish(topics.bench(device), envelope, qos=1).wait(30.0):
                raise BenchRemoteError("the broker did not acknowledge the bench request")
            return _wait(inbox, device=device, timeout_s=timeout_s, say=say)
        finally:
            for meta in metas:
                try:
                    unpublish_bundle(client, topics, meta, timeout_s=30.0)
                except EdgekitError as error:
                    log.warning("cannot remove bench file %s: %s", meta.name, error)


def _wait(
    inbox: queue.Queue[Measurements | Event], *, device: str, timeout_s: float, say: Progress
) -> Measurements:
    deadline = time.monotonic() + timeout_s
    started = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            what = "finish the bench" if started else "start the bench"
            raise BenchRemoteError(
                f"device {device} did not {what} within {timeout_s:.0f} s: is it online, is "
                "[bench] enabled = true in its agent.toml, and does it trust the key that "
                "signed the request (the directives role)? (--bench-timeout sets the wait)"
            )
        say(f"waiting for {device} (up to {left:.0f} s more)")
        try:
            item = inbox.get(timeout=min(left, 10.0))
        except queue.Empty:
            continue
        if isinstance(item, Measurements):
            return item
        if item.kind == "bench_refused":
            raise BenchRemoteError(f"device {device} refused the bench request: {item.reason}")
        if item.kind == "bench_started":
            started = True
            say(f"{device} is fetching and measuring the candidates")
        elif item.kind == "bench_done" and item.ok is False:
            raise BenchRemoteError(f"the bench failed on device {device}: {item.reason}")
