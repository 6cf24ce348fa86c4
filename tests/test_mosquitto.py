"""The test broker helper starts a real Mosquitto that enforces what its config says."""

from __future__ import annotations

import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgekit.messages import Status
from edgekit.mosquitto import MosquittoBroker
from edgekit.topics import Topics


def _client(
    broker: MosquittoBroker, user: str | None = None, password: str | None = None
) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if user:
        client.username_pw_set(user, password)
    return client


def test_retained_status_round_trip(mosquitto: MosquittoBroker) -> None:
    topics = Topics("demo")
    status = Status(fleet="demo", device="pi-1", online=True, state="idle", tags={"site": "a"})
    publisher = _client(mosquitto)
    publisher.connect(mosquitto.host, mosquitto.port)
    publisher.loop_start()
    publisher.publish(topics.status("pi-1"), status.to_json(), qos=1, retain=True).wait_for_publish(
        5
    )
    publisher.loop_stop()
    publisher.disconnect()

    got: list[Status] = []
    done = threading.Event()
    subscriber = _client(mosquitto)

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        got.append(Status.from_json(message.payload))
        done.set()

    subscriber.on_message = on_message
    subscriber.connect(mosquitto.host, mosquitto.port)
    subscriber.subscribe(topics.all_devices("status"), qos=1)
    subscriber.loop_start()
    assert done.wait(5)
    subscriber.loop_stop()
    subscriber.disconnect()
    assert got == [status]


def test_password_broker_refuses_wrong_password(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path, users={"op": "secret"}) as broker:
        good = _client(broker, "op", "secret")
        assert good.connect(broker.host, broker.port) == 0
        good.loop_start()
        bad = _client(broker, "op", "wrong")
        refused = threading.Event()

        def on_connect(
            _c: mqtt.Client, _u: object, _f: object, reason: mqtt.ReasonCode, _p: object
        ) -> None:
            if reason.is_failure:
                refused.set()

        bad.on_connect = on_connect
        bad.connect(broker.host, broker.port)
        bad.loop_start()
        assert refused.wait(5)
        bad.loop_stop()
        good.loop_stop()


def test_restart_keeps_port_and_retained(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker:
        port = broker.port
        client = _client(broker)
        client.connect(broker.host, broker.port)
        client.loop_start()
        client.publish("edgekit/v1/x/keep", b"1", qos=1, retain=True).wait_for_publish(5)
        client.loop_stop()
        client.disconnect()
        broker.restart()
        assert broker.port == port and broker.running
        got = threading.Event()
        reader = _client(broker)
        reader.on_message = lambda *_: got.set()
        reader.connect(broker.host, broker.port)
        reader.subscribe("edgekit/v1/x/keep", qos=1)
        reader.loop_start()
        assert got.wait(5)
        reader.loop_stop()
    with pytest.raises(OSError):
        import socket

        socket.create_connection(("127.0.0.1", port), timeout=0.5)


def test_a_broker_left_running_stops_when_its_process_exits(tmp_path: Path) -> None:
    """A test that fails before stop() must not leave its Mosquitto running (it runs in a
    session of its own, so nothing else would stop it)."""
    import os
    import subprocess
    import sys
    import time

    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from edgekit.mosquitto import MosquittoBroker\n"
        f"broker = MosquittoBroker(Path({str(tmp_path)!r}) / 'mq', persistence=False).start()\n"
        "print(broker._process.pid, flush=True)\n"
        "raise SystemExit(3)  # no stop()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 3, done.stderr
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    raise AssertionError(f"mosquitto (pid {pid}) outlived the process that started it")
