"""How long-running commands (`fleet simulate`, `monitor`) wait: until Ctrl-C, SIGTERM or a
time limit."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

__all__ = ["wait_for_interrupt"]


def wait_for_interrupt(
    duration_s: float | None, *, every_s: float = 1.0, tick: Callable[[], None] | None = None
) -> None:
    """Block until Ctrl-C / SIGTERM or `duration_s` seconds, calling `tick` every `every_s`."""
    stop = threading.Event()

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, handler)
    deadline = None if duration_s is None else time.monotonic() + duration_s
    try:
        while not stop.is_set():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            stop.wait(timeout=every_s if remaining is None else min(every_s, remaining))
            if tick is not None:
                tick()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
