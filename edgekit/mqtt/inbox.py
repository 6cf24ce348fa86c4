"""A queue of messages for code that reads them on its own thread (the fleet controller, the
registry), with "gather what the broker has retained" on top."""

from __future__ import annotations

import queue
import time
from collections.abc import Sequence

from edgekit.mqtt.client import Message, MqttClient

__all__ = ["Inbox"]


class Inbox:
    """Messages of the filters it subscribes to, queued for `drain` (thread-safe)."""

    def __init__(self, client: MqttClient) -> None:
        self.client = client
        self._queue: queue.SimpleQueue[Message] = queue.SimpleQueue()

    def put(self, message: Message) -> None:
        self._queue.put(message)

    def subscribe(self, filters: Sequence[str], *, keep: bool = True, wait_s: float = 10.0) -> None:
        """Subscribe (QoS 1) and wait for the broker's acknowledgement."""
        self.client.subscribe(filters, self.put, keep=keep, wait_s=wait_s)

    def unsubscribe(self, filters: Sequence[str]) -> None:
        self.client.unsubscribe(filters)

    def drain(self, *, timeout_s: float = 0.0, limit: int = 100_000) -> list[Message]:
        """Messages received so far; waits up to `timeout_s` for the first one."""
        messages: list[Message] = []
        try:
            messages.append(
                self._queue.get(timeout=timeout_s) if timeout_s > 0 else self._queue.get_nowait()
            )
        except queue.Empty:
            return messages
        while len(messages) < limit:
            try:
                messages.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return messages

    def collect_retained(
        self,
        filters: Sequence[str],
        *,
        quiet_s: float = 0.4,
        timeout_s: float = 10.0,
        keep: bool = True,
    ) -> list[Message]:
        """Subscribe and gather messages until no retained one arrived for `quiet_s`.

        Live (non-retained) messages that arrive meanwhile are returned too, so a busy fleet
        (telemetry never pauses) does not keep this waiting.
        """
        self.subscribe(filters, keep=keep)
        collected: list[Message] = []
        deadline = time.monotonic() + timeout_s
        last_retained = time.monotonic()
        while time.monotonic() < deadline:
            wait = quiet_s - (time.monotonic() - last_retained)
            if wait <= 0:
                break
            batch = self.drain(timeout_s=min(wait, 0.05))
            if any(message.retain for message in batch):
                last_retained = time.monotonic()
            collected.extend(batch)
        return collected
