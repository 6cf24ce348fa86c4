"""DiskQueue: order, bounds with drop-oldest, persistence, corruption, SIGKILL mid-put."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from edgekit.agent.queue import DiskQueue, QueueError


def _payloads(queue: DiskQueue) -> list[bytes]:
    return [message.payload for message in queue.peek(len(queue) + 10)]


def test_fifo_order_ids_and_ack(tmp_path: Path) -> None:
    with DiskQueue(tmp_path / "q", max_messages=100, max_bytes=1 << 20) as queue:
        ids = [queue.put(f"t/{i}", f"m{i}".encode(), qos=i % 2) for i in range(5)]
        assert ids == sorted(ids) and len(set(ids)) == 5
        assert len(queue) == 5
        first_two = queue.peek(2)
        assert [(m.topic, m.payload, m.qos) for m in first_two] == [
            ("t/0", b"m0", 0),
            ("t/1", b"m1", 1),
        ]
        assert first_two[0].queued_at > 0
        assert queue.peek(2) == first_two  # peek does not remove
        assert queue.ack(first_two[0].id) and not queue.ack(first_two[0].id)
        assert _payloads(queue) == [b"m1", b"m2", b"m3", b"m4"]
        assert queue.ack(ids[3])  # acks may come out of order (QoS 1 in flight)
        assert _payloads(queue) == [b"m1", b"m2", b"m4"]
        assert queue.dropped == 0


def test_overflow_drops_oldest_and_counts_persistently(tmp_path: Path) -> None:
    directory = tmp_path / "q"
    with DiskQueue(directory, max_messages=5, max_bytes=1 << 20) as queue:
        last = 0
        for i in range(8):
            last = queue.put("t", str(i).encode())
        assert len(queue) == 5 and queue.dropped == 3
        assert _payloads(queue) == [b"3", b"4", b"5", b"6", b"7"]
    with DiskQueue(directory, max_messages=5, max_bytes=1 << 20) as queue:
        assert queue.dropped == 3
        assert _payloads(queue) == [b"3", b"4", b"5", b"6", b"7"]
        assert queue.put("t", b"8") > last  # ids keep increasing across a reopen
        assert queue.dropped == 4


def test_byte_budget_drops_oldest(tmp_path: Path) -> None:
    with DiskQueue(tmp_path / "q", max_messages=1000, max_bytes=2000) as queue:
        for i in range(10):
            queue.put("t", bytes([i]) * 400)
        assert queue.size_bytes <= 2000
        kept = _payloads(queue)
        assert 1 < len(kept) < 10 and queue.dropped == 10 - len(kept)
        assert [payload[0] for payload in kept] == list(range(10 - len(kept), 10))
        with pytest.raises(QueueError, match="more than the queue's max_bytes 2000"):
            queue.put("t", b"x" * 5000)
        with pytest.raises(QueueError, match="qos must be"):
            queue.put("t", b"x", qos=3)


def test_ids_keep_increasing_after_the_queue_drained(tmp_path: Path) -> None:
    directory = tmp_path / "q"
    with DiskQueue(directory, max_messages=10, max_bytes=1 << 20) as queue:
        for message_id in [queue.put("t", b"a"), queue.put("t", b"b")]:
            queue.ack(message_id)
        assert len(queue) == 0
    with DiskQueue(directory, max_messages=10, max_bytes=1 << 20) as queue:
        assert queue.put("t", b"c") == 3


def test_corrupt_and_partial_files_are_skipped_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "q"
    with DiskQueue(directory, max_messages=100, max_bytes=1 << 20) as queue:
        for i in range(5):
            queue.put("t", f"payload-{i}".encode())
    files = sorted(directory.glob("*.msg"))
    damaged = bytearray(files[1].read_bytes())
    damaged[-3] ^= 0xFF  # a flipped bit in the payload
    files[1].write_bytes(bytes(damaged))
    files[3].write_bytes(files[3].read_bytes()[:7])  # a torn write
    (directory / "00000000000000000099.msg.tmp").write_bytes(b"half")  # killed before rename
    (directory / "notes.msg").write_bytes(b"?")
    with (
        caplog.at_level(logging.WARNING),
        DiskQueue(directory, max_messages=100, max_bytes=1 << 20) as queue,
    ):
        assert not (directory / "00000000000000000099.msg.tmp").exists()
        assert _payloads(queue) == [b"payload-0", b"payload-2", b"payload-4"]
        assert queue.corrupt == 2 and len(queue) == 3
        assert "checksum mismatch" in caplog.text and "shorter than the record" in caplog.text
        assert "unexpected file notes.msg" in caplog.text
        assert queue.put("t", b"next") == 6


def test_a_queue_directory_is_used_by_one_process_at_a_time(tmp_path: Path) -> None:
    with (
        DiskQueue(tmp_path / "q", max_messages=10, max_bytes=1000),
        pytest.raises(QueueError, match="in use by another process"),
    ):
        DiskQueue(tmp_path / "q", max_messages=10, max_bytes=1000)
    with pytest.raises(QueueError, match="must be positive"):
        DiskQueue(tmp_path / "q2", max_messages=0, max_bytes=1000)
    (tmp_path / "file").write_text("")
    with pytest.raises(QueueError, match="cannot open the message queue directory"):
        DiskQueue(tmp_path / "file" / "q", max_messages=10, max_bytes=1000)


def test_counted_drops_are_not_counted_twice_after_a_crash(tmp_path: Path) -> None:
    """A crash between persisting the dropped count and deleting the files leaves dropped
    messages on disk: reopening deletes them without counting them again."""
    directory = tmp_path / "q"
    with DiskQueue(directory, max_messages=3, max_bytes=1 << 20) as queue:
        for i in range(3):
            queue.put("t", str(i).encode())
        survivor = (directory / "00000000000000000001.msg").read_bytes()
        queue.put("t", b"3")  # drops message 1
        assert queue.dropped == 1
    (directory / "00000000000000000001.msg").write_bytes(survivor)  # as if unlink never ran
    with DiskQueue(directory, max_messages=3, max_bytes=1 << 20) as queue:
        assert queue.dropped == 1
        assert _payloads(queue) == [b"1", b"2", b"3"]


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from edgekit.agent.queue import DiskQueue

    queue = DiskQueue(Path(sys.argv[1]), max_messages=int(sys.argv[2]), max_bytes=1 << 20)
    start = int(sys.argv[3])
    for i in range(start, start + 100000):
        queue.put("edgekit/v1/f/devices/d/telemetry", str(i).encode())
        print(i, flush=True)
    """
)


def _kill_mid_put(directory: Path, *, max_messages: int, start: int, after: int) -> int:
    """Run a writer, SIGKILL it after it reported `after` puts; the last reported index."""
    process = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(directory), str(max_messages), str(start)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    last = -1
    try:
        for line in process.stdout:
            last = int(line)
            if last >= start + after:
                break
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    remaining = process.stdout.read().split()
    return int(remaining[-1]) if remaining else last


def _check_after_kill(directory: Path, *, max_messages: int, reported: int) -> int:
    with DiskQueue(directory, max_messages=max_messages, max_bytes=1 << 20) as queue:
        values = [int(payload) for payload in _payloads(queue)]
        assert queue.corrupt == 0
        assert values == list(range(values[0], values[0] + len(values))), "order or gap"
        # Every put that returned is there; at most the one being written when killed more.
        assert reported <= values[-1] <= reported + 1
        # Drop-oldest and its counter stayed consistent through the kill.
        assert values[0] == queue.dropped
        assert len(values) <= max_messages
        ids = [message.id for message in queue.peek(len(queue))]
        assert ids == sorted(ids)
        return values[-1]


@pytest.mark.parametrize("round_", range(3))
def test_sigkill_mid_put_loop_keeps_order_and_counts(tmp_path: Path, round_: int) -> None:
    rng = random.Random(round_)
    directory = tmp_path / "q"
    max_messages = 40
    reported = _kill_mid_put(
        directory, max_messages=max_messages, start=0, after=rng.randint(45, 90)
    )
    last = _check_after_kill(directory, max_messages=max_messages, reported=reported)
    # A second writer continues the same queue after the crash, and is killed too.
    reported = _kill_mid_put(
        directory, max_messages=max_messages, start=last + 1, after=rng.randint(5, 30)
    )
    _check_after_kill(directory, max_messages=max_messages, reported=reported)


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(25))
def test_sigkill_soak(tmp_path: Path, round_: int) -> None:
    rng = random.Random(1000 + round_)
    directory = tmp_path / "q"
    max_messages = rng.choice([5, 40, 500])
    last = -1
    for _ in range(4):
        reported = _kill_mid_put(
            directory, max_messages=max_messages, start=last + 1, after=rng.randint(1, 120)
        )
        last = _check_after_kill(directory, max_messages=max_messages, reported=reported)
