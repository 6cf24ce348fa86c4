"""`edgekit fleet broker-config`: the files it writes, and a real Mosquitto enforcing them.

The ACL test starts Mosquitto with the generated config (only the listener rewritten to a
free loopback port) and checks with real MQTT 5 clients what each account can do. Mosquitto 2
answers a denied QoS 1 publish from an MQTT 5 client with a PUBACK carrying reason code 0x87
(Not authorized) and drops the message; a subscription the ACL does not allow is granted
(SUBACK 0x01) but nothing it may not read is ever delivered, retained or not. The test
asserts both: what the publisher is told, and what the other side never receives.
"""

from __future__ import annotations

import contextlib
import csv
import getpass
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

from edgekit.cli.fleet_tools import broker_config_command
from edgekit.fleet.broker_config import (
    BrokerConfigError,
    DeviceAccount,
    hash_password,
    read_devices_csv,
    verify_password_hash,
    write_broker_config,
)
from edgekit.mosquitto import find_mosquitto, free_port
from edgekit.topics import Topics
from tests.tls_helpers import make_tls_files, self_signed_cert

FLEET = "acl-fleet"
# PUBACK reason codes meaning "accepted": 0x00 success, 0x10 no matching subscribers.
OK = (0x00, 0x10)
TOPICS = Topics(FLEET)


def _devices_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("device_id,password,profile,group,tags\n" + "\n".join(rows) + "\n")
    return path


def test_password_hash_is_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    hashed = hash_password("s3cret", salt=b"0123456789ab")
    match = re.fullmatch(r"\$7\$(\d+)\$[A-Za-z0-9+/=]{16}\$[A-Za-z0-9+/=]{88}", hashed)
    assert match and int(match.group(1)) >= 10_000  # far above mosquitto_passwd's 101
    assert verify_password_hash("s3cret", hashed)
    assert not verify_password_hash("other", hashed)
    # Cross-check with the real tool when it is installed.
    tool = tmp_path / "pw"
    tool.write_text("")
    try:
        subprocess.run(["mosquitto_passwd", "-b", str(tool), "u", "s3cret"], check=True)
    except FileNotFoundError:
        return
    assert verify_password_hash("s3cret", tool.read_text().strip().split(":", 1)[1])


def test_devices_csv_is_validated(tmp_path: Path) -> None:
    good = _devices_csv(tmp_path / "d.csv", ["a-1,,x86-64,lab,site=a;rack=3", "b-2,pw,,,"])
    devices = read_devices_csv(good)
    assert devices[0] == DeviceAccount("a-1", None, "x86-64", "lab", {"site": "a", "rack": "3"})
    assert devices[1].password == "pw"
    for rows, message in (
        (["bad/id,,,,"], r"bad\.csv:2: device id 'bad/id' cannot be a broker account: .*'/'"),
        (["ok,,,,", "has:colon,,,,"], r":3: .*'has:colon'.*':' \(the broker's password-file"),
        (["wild+card,,,,"], r":2: .*MQTT wildcard"),
        (["hash#,,,,"], r":2: .*MQTT wildcard"),
        ([",pw,x86-64,,"], r":2: .*it is empty"),
        (["x" * 129 + ",,,,"], r":2: .*129 characters; at most 128"),
        (["edgekit-agent-1,,,,"], r":2: .*reserved for service client ids"),
        (["a,,,,", "a,,,,"], "twice"),
        (["a,,,,x"], "key=value"),
    ):
        with pytest.raises(BrokerConfigError, match=message):
            read_devices_csv(_devices_csv(tmp_path / "bad.csv", rows))
    (tmp_path / "nohdr.csv").write_text("a,b\n")
    with pytest.raises(BrokerConfigError, match="header"):
        read_devices_csv(tmp_path / "nohdr.csv")
    with pytest.raises(BrokerConfigError, match="service account"):
        write_broker_config(
            FLEET, [DeviceAccount("operator")], tmp_path / "out", insecure_plaintext=True
        )


def test_files_and_rerun_keep_passwords(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    first = write_broker_config(
        FLEET, [DeviceAccount("d1"), DeviceAccount("d2", "given")], out, insecure_plaintext=True
    )
    assert set(first.generated) == {"operator", "monitor", "d1"}
    assert (out / "credentials.csv").stat().st_mode & 0o777 == 0o600
    assert (out / "passwords").stat().st_mode & 0o777 == 0o640  # read by mosquitto's group
    creds = {r["user"]: r for r in csv.DictReader((out / "credentials.csv").open())}
    assert creds["d2"]["password"] == "given" and creds["d1"]["role"] == "device"
    hashes = dict(line.split(":", 1) for line in (out / "passwords").read_text().splitlines())
    assert all(verify_password_hash(creds[u]["password"], h) for u, h in hashes.items())
    assert set(hashes) == {"d1", "d2"}  # devices only: service accounts live elsewhere
    service = (out / "service-passwords").read_text().splitlines()
    assert {line.split(":", 1)[0] for line in service} == {"operator", "monitor"}
    assert (out / "service-passwords").stat().st_mode & 0o777 == 0o640
    acl = (out / "acl").read_text()
    assert f"user d1\ntopic read {TOPICS.desired('d1')}\n" in acl
    assert "pattern" not in acl  # service accounts must not inherit device rights
    conf = (out / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "listener 1883" in conf
    assert "listener 1884" in conf and "use_username_as_clientid true" in conf
    # Adding a device keeps every existing password.
    second = write_broker_config(
        FLEET,
        [DeviceAccount("d1"), DeviceAccount("d2", "given"), DeviceAccount("d3")],
        out,
        insecure_plaintext=True,
    )
    assert second.generated == ("d3",)
    again = {r["user"]: r["password"] for r in csv.DictReader((out / "credentials.csv").open())}
    assert again["d1"] == creds["d1"]["password"]
    assert not list(out.glob(".*tmp*"))


def test_cli_writes_tls_stanzas(tmp_path: Path) -> None:
    devices = _devices_csv(tmp_path / "d.csv", ["dev-a,,,,"])
    out = tmp_path / "o"
    result = CliRunner().invoke(
        broker_config_command,
        [
            "--fleet",
            FLEET,
            "--devices",
            str(devices),
            "-o",
            str(out),
            "--tls-ca",
            "/etc/ca.pem",
            "--tls-cert",
            "/etc/s.pem",
            "--tls-key",
            "/etc/s.key",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    conf = (out / "mosquitto.conf").read_text()
    assert "listener 8883" in conf and "cafile /etc/ca.pem" in conf and "keyfile /etc/s.key" in conf
    bad = CliRunner().invoke(
        broker_config_command,
        ["--fleet", FLEET, "--devices", str(devices), "-o", str(out), "--tls-ca", "/x"],
    )
    assert bad.exit_code == 2 and "--tls-cert" in bad.output


def test_plaintext_device_listener_is_refused_without_the_flag(tmp_path: Path) -> None:
    devices = _devices_csv(tmp_path / "d.csv", ["dev-a,,,,"])
    out = tmp_path / "o"
    refused = CliRunner().invoke(
        broker_config_command, ["--fleet", FLEET, "--devices", str(devices), "-o", str(out)]
    )
    assert refused.exit_code == 2
    lines = refused.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no TLS for the device listener")
    for option in ("--tls-ca", "--tls-cert", "--tls-key", "--insecure-plaintext"):
        assert option in lines[0]
    assert not out.exists()
    allowed = CliRunner().invoke(
        broker_config_command,
        ["--fleet", FLEET, "--devices", str(devices), "-o", str(out), "--insecure-plaintext"],
    )
    assert allowed.exit_code == 0, allowed.output
    assert "listener 1883\n" in (out / "mosquitto.conf").read_text()
    assert "no TLS" in allowed.output  # the warning says so


def test_output_says_what_to_do_elsewhere_and_what_stands_in_the_way(tmp_path: Path) -> None:
    devices = _devices_csv(tmp_path / "d.csv", ["dev-a,,,,"])
    tls = ["--tls-ca", "/etc/ca.pem", "--tls-cert", "/etc/s.pem", "--tls-key", "/etc/s.key"]
    # Generated here for another host: the commands name the broker host's paths.
    remote = CliRunner().invoke(
        broker_config_command,
        ["--fleet", FLEET, "--devices", str(devices), "-o", str(tmp_path / "o"), *tls,
         "--install-dir", "/etc/mosquitto/plant"],
    )  # fmt: skip
    assert remote.exit_code == 0, remote.output
    assert (
        "copy " in remote.output and "to /etc/mosquitto/plant on the broker host" in remote.output
    )
    assert _start_commands(remote.output) == [
        ["chown", "root:mosquitto", *(f"/etc/mosquitto/plant/{n}" for n in
                                      ("passwords", "service-passwords", "acl"))],
        ["chown", "mosquitto:mosquitto", "/etc/mosquitto/plant/data"],
        ["mosquitto", "-c", "/etc/mosquitto/plant/mosquitto.conf"],
    ]  # fmt: skip
    # In place, in a folder the service user cannot enter, with TLS files that are not here.
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        return
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    local = CliRunner().invoke(
        broker_config_command,
        ["--fleet", FLEET, "--devices", str(devices), "-o", str(closed / "broker"), *tls],
    )
    assert local.exit_code == 0, local.output
    match = re.search(r"warning: user mosquitto cannot enter (\S+) \(mode 0700\)", local.output)
    assert match and str(closed).startswith(match.group(1)), local.output
    assert "TLS file /etc/s.key does not exist on this host" in local.output


def _start_commands(output: str) -> list[list[str]]:
    """The commands under "start it as root:" in broker-config's output, in order."""
    lines = output.splitlines()
    start = lines.index("start it as root:")
    return [shlex.split(line) for line in lines[start + 1 :] if line.startswith("  ")]


@pytest.mark.skipif(os.geteuid() != 0, reason="started as root is the case under test")
def test_output_starts_under_the_real_mosquitto_as_root_with_tls() -> None:
    """Run as root, do exactly what the output says, and Mosquitto, having dropped to its
    service user, serves a device over TLS with the generated credentials."""
    try:
        mosquitto_user = pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no mosquitto user on this host (the Mosquitto package creates it)")
    # Not under pytest's tmp_path: its base is 0700 root, which no service user can enter.
    work = Path(tempfile.mkdtemp(prefix="edgekit-broker-", dir="/tmp"))
    work.chmod(0o755)
    process = None
    try:
        ca, cert, key = make_tls_files(work / "tls")
        assert key.stat().st_mode & 0o777 == 0o600 and key.stat().st_uid == 0
        devices = _devices_csv(work / "devices.csv", ["dev-a,,x86-64,,", "dev-b,,x86-64,,"])
        port, service_port = free_port(), free_port()
        out = work / "broker"
        generated = subprocess.run(
            [
                sys.executable, "-m", "edgekit", "fleet", "broker-config",
                "--fleet", FLEET, "--devices", str(devices), "-o", str(out),
                "--tls-ca", str(ca), "--tls-cert", str(cert), "--tls-key", str(key),
                "--listener", str(port), "--service-listener", str(service_port),
                "--bind", "127.0.0.1",
            ],
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        assert generated.returncode == 0, generated.stderr
        assert generated.stderr == ""  # no warnings: everything is in place
        for name in ("passwords", "service-passwords", "acl"):
            status = (out / name).stat()
            assert (status.st_uid, status.st_gid) == (0, mosquitto_user.pw_gid), name
            assert status.st_mode & 0o777 == 0o640, name
        assert (out / "data").stat().st_uid == mosquitto_user.pw_uid
        commands = _start_commands(generated.stdout)
        # The TLS key is root's 0600: the output says how to let mosquitto's group read it.
        assert commands[:-1] == [["chgrp", "mosquitto", str(key)], ["chmod", "g+r", str(key)]]
        assert commands[-1] == ["mosquitto", "-c", str(out / "mosquitto.conf")]
        for command in commands[:-1]:
            subprocess.run(command, check=True)
        log = (work / "mosquitto.log").open("wb")
        process = subprocess.Popen(commands[-1], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                for number in (port, service_port):
                    socket.create_connection(("127.0.0.1", number), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise AssertionError((work / "mosquitto.log").read_text()) from None
                time.sleep(0.05)
        # It dropped root: the real situation, where 0600 root files could not be opened.
        status = Path(f"/proc/{process.pid}/status").read_text()
        assert re.search(rf"(?m)^Uid:\s+{mosquitto_user.pw_uid}\s", status), status
        creds = {r["user"]: r["password"] for r in csv.DictReader((out / "credentials.csv").open())}
        operator = _Client(service_port, "operator", creds["operator"], ca=ca)
        device = _Client(port, "dev-a", creds["dev-a"], ca=ca)
        try:
            assert operator.connect_reason == 0 and device.connect_reason == 0
            operator.subscribe(TOPICS.status("dev-a"))
            assert device.publish(TOPICS.status("dev-a"), b"over-tls", retain=True) in OK
            _wait(lambda: operator.received("dev-a/status") == [b"over-tls"], "the status")
            wrong = _Client(port, "dev-a", "wrong", ca=ca)
            assert wrong.connect_reason in (0x86, 0x87)
            wrong.close()
        finally:
            operator.close()
            device.close()
        log_text = (work / "mosquitto.log").read_text()
        assert "Unable to open" not in log_text and "Error" not in log_text, log_text
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


# --- the broker enforces it ---------------------------------------------------------------


class _Client:
    """A connected MQTT 5 client that records messages and PUBACK reason codes."""

    def __init__(
        self,
        port: int,
        user: str | None,
        password: str | None,
        *,
        ca: Path | None = None,
        wait: bool = True,
        client_id: str | None = None,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.disconnects: list[int] = []
        self.acks: dict[int, int] = {}
        self.subacks: dict[int, list[int]] = {}
        self.connect_reason: int | None = None
        self._lock = threading.Lock()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id
            if client_id is not None
            else f"edgekit-{user}-{time.monotonic_ns()}",
            protocol=mqtt.MQTTv5,
        )
        if user is not None:
            client.username_pw_set(user, password)
        if ca is not None:
            client.tls_set(ca_certs=str(ca))
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        self.client = client
        client.connect("127.0.0.1", port)
        client.loop_start()
        if wait:
            _wait(lambda: self.connect_reason is not None, "CONNACK")

    def _on_connect(self, _c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        self.connect_reason = reason.value  # type: ignore[attr-defined]

    def _on_disconnect(
        self, _c: object, _u: object, _f: object, reason: object, _p: object
    ) -> None:
        self.disconnects.append(reason.value)  # type: ignore[attr-defined]

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))

    def _on_publish(self, _c: object, _u: object, mid: int, reason: object, _p: object) -> None:
        self.acks[mid] = reason.value  # type: ignore[attr-defined]

    def _on_subscribe(
        self, _c: object, _u: object, mid: int, reasons: list[object], _p: object
    ) -> None:
        self.subacks[mid] = [r.value for r in reasons]  # type: ignore[attr-defined]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Publish at QoS 1 and return the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        _wait(lambda: info.mid in self.acks, f"PUBACK for {topic}")
        return self.acks[info.mid]

    def subscribe(self, topic: str) -> list[int]:
        _rc, mid = self.client.subscribe(topic, qos=1)
        _wait(lambda: mid in self.subacks, f"SUBACK for {topic}")
        return self.subacks[mid]

    def received(self, topic_part: str) -> list[bytes]:
        with self._lock:
            return [payload for topic, payload, _ in self.messages if topic_part in topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _wait(predicate: object, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def _run_generated(
    tmp_path: Path, extra_args: list[str], *, listener: int = 1883
) -> Iterator[tuple[int, int, dict[str, str]]]:
    """Generate a config with the CLI, start Mosquitto with it (only the two listeners moved
    to free loopback ports), yield (device port, service port, credentials)."""
    devices = _devices_csv(tmp_path / "devices.csv", ["dev-a,,x86-64,,", "dev-b,,x86-64,,"])
    out = tmp_path / "broker"
    result = CliRunner().invoke(
        broker_config_command,
        [
            "--fleet",
            FLEET,
            "--devices",
            str(devices),
            "-o",
            str(out),
            "--run-as",
            getpass.getuser(),
            *(extra_args or ["--insecure-plaintext"]),
        ],
    )
    assert result.exit_code == 0, result.output
    port, service_port = free_port(), free_port()
    conf = (out / "mosquitto.conf").read_text()
    for default, moved in ((listener, port), (listener + 1, service_port)):
        conf, count = re.subn(rf"(?m)^listener {default}$", f"listener {moved} 127.0.0.1", conf)
        assert count == 1
    (out / "mosquitto.conf").write_text(conf)
    log = (tmp_path / "mosquitto.log").open("wb")
    process = subprocess.Popen(
        [find_mosquitto(), "-c", str(out / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                for number in (port, service_port):
                    socket.create_connection(("127.0.0.1", number), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise AssertionError((tmp_path / "mosquitto.log").read_text()) from None
                time.sleep(0.05)
        creds = {r["user"]: r["password"] for r in csv.DictReader((out / "credentials.csv").open())}
        yield port, service_port, creds
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture
def generated_broker(tmp_path: Path) -> Iterator[tuple[int, int, dict[str, str]]]:
    with _run_generated(tmp_path, []) as running:
        yield running


def test_generated_tls_config_serves_devices(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    tls = ["--tls-ca", str(cert), "--tls-cert", str(cert), "--tls-key", str(key)]
    with _run_generated(tmp_path, tls, listener=8883) as (port, _service, creds):
        plain = _Client(port, "dev-a", creds["dev-a"], wait=False)
        time.sleep(0.5)
        assert plain.connect_reason is None  # a plain MQTT client gets no CONNACK from TLS
        plain.close()
        device = _Client(port, "dev-a", creds["dev-a"], ca=cert)
        assert device.connect_reason == 0
        assert device.publish(TOPICS.status("dev-a"), b"tls-status") in OK
        assert device.publish(TOPICS.status("dev-b"), b"tls-forged") == 0x87
        device.close()


def test_acl_enforced_by_real_mosquitto(
    generated_broker: tuple[int, int, dict[str, str]],
) -> None:
    port, service, creds = generated_broker
    operator = _Client(service, "operator", creds["operator"])
    monitor = _Client(service, "monitor", creds["monitor"])
    b = _Client(port, "dev-b", creds["dev-b"])
    a = _Client(port, "dev-a", creds["dev-a"])
    clients = [operator, monitor, a, b]
    try:
        # Wrong password and anonymous access are refused at CONNECT.
        for user, password in (("dev-a", "wrong"), (None, None)):
            refused = _Client(port, user, password)
            assert refused.connect_reason in (0x86, 0x87)  # bad password / not authorized
            refused.close()
        # The operator writes both directives (retained) and a bundle chunk.
        assert operator.publish(TOPICS.desired("dev-a"), b"directive-a", retain=True) in OK
        assert operator.publish(TOPICS.desired("dev-b"), b"directive-b", retain=True) in OK
        chunk = TOPICS.bundle("ab" * 32).chunk(0)
        assert operator.publish(chunk, b"chunk", retain=True) in OK
        assert operator.subscribe(f"{TOPICS.prefix}/#") == [1]
        monitor.subscribe(f"$share/mon/{TOPICS.prefix}/devices/+/status")
        monitor.subscribe(f"$share/mon/{TOPICS.prefix}/devices/+/telemetry")
        b.subscribe(TOPICS.desired("dev-b"))
        _wait(lambda: b.received("dev-b/desired") == [b"directive-b"], "B's own directive")

        # A reads its own directive and bundle chunks, not B's directive (retained, never sent).
        a.subscribe(TOPICS.desired("dev-a"))
        a.subscribe(f"{TOPICS.prefix}/bundles/#")
        # Mosquitto 2 grants these subscriptions (SUBACK QoS 1) and filters at delivery.
        assert a.subscribe(TOPICS.desired("dev-b")) == [1]
        assert a.subscribe(f"{TOPICS.prefix}/devices/+/desired") == [1]
        _wait(lambda: a.received("dev-a/desired") and a.received("/chunks/0"), "A's own reads")
        # A writes its own status and telemetry: B... no, the monitor and operator see them.
        assert a.publish(TOPICS.status("dev-a"), b"status-a", retain=True) in OK
        assert a.publish(TOPICS.telemetry("dev-a"), b"telemetry-a") in OK
        # A cannot publish B's status: PUBACK 0x87 (not authorized), nobody receives it.
        assert a.publish(TOPICS.status("dev-b"), b"forged-by-a", retain=True) == 0x87
        # ... nor a directive, for itself or anyone.
        assert a.publish(TOPICS.desired("dev-a"), b"self-directive", retain=True) == 0x87
        # B cannot read the monitor's topics either, but writes its own status.
        assert b.publish(TOPICS.status("dev-b"), b"status-b", retain=True) in OK
        # A fresh subscriber (operator, reading everything) sees the retained truth.
        late = _Client(service, "operator", creds["operator"])
        clients.append(late)
        late.subscribe(f"{TOPICS.prefix}/#")
        _wait(lambda: late.received("dev-b/status") == [b"status-b"], "retained statuses")
        _wait(lambda: monitor.received("telemetry") == [b"telemetry-a"], "monitor telemetry")
        _wait(lambda: len(monitor.received("/status")) == 2, "monitor statuses")
        time.sleep(0.3)  # give a wrongly delivered message the time to arrive
        assert a.received("dev-b/desired") == []
        assert b"forged-by-a" not in operator.received("dev-b/status")
        assert b"forged-by-a" not in late.received("dev-b/status")
        assert late.received("dev-a/desired") == [b"directive-a"]
        assert sorted(monitor.received("/status")) == [b"status-a", b"status-b"]
        # The monitor cannot write, and reads nothing but status/telemetry/events.
        assert monitor.publish(TOPICS.desired("dev-b"), b"monitor-directive") == 0x87
        assert monitor.publish(TOPICS.status("dev-b"), b"monitor-status") == 0x87
        monitor.subscribe(TOPICS.desired("dev-b"))
        time.sleep(0.3)
        assert monitor.received("desired") == []
    finally:
        for client in clients:
            client.close()


def test_writes_never_follow_a_planted_temp_name(tmp_path: Path) -> None:
    """A link planted where a predictable temp file would go is never written through."""
    out = tmp_path / "broker"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    for name in ("passwords", "credentials.csv", "acl", "mosquitto.conf"):
        (out / f".{name}.tmp-{os.getpid()}").symlink_to(victim)
    write_broker_config(FLEET, [DeviceAccount("d1")], out, insecure_plaintext=True)
    assert victim.read_text() == "precious\n"
    assert (out / "passwords").stat().st_mode & 0o777 == 0o640
    assert not (out / "passwords").is_symlink()
    leftovers = {p.name for p in out.iterdir() if p.name.startswith(".")}
    assert leftovers == {
        f".{n}.tmp-{os.getpid()}" for n in ("passwords", "credentials.csv", "acl", "mosquitto.conf")
    }


def test_a_device_cannot_knock_another_offline_with_its_client_id(
    generated_broker: tuple[int, int, dict[str, str]],
) -> None:
    """Mosquitto disconnects the older of two connections with one client id; on the device
    listener the client id is the user name, so A reusing B's client id takes nothing."""
    port, service, creds = generated_broker
    b = _Client(port, "dev-b", creds["dev-b"], client_id="edgekit-agent-dev-b")
    clients = [b]
    try:
        assert b.connect_reason == 0
        b.subscribe(TOPICS.desired("dev-b"))
        a = _Client(port, "dev-a", creds["dev-a"], client_id="edgekit-agent-dev-b")
        clients.append(a)
        assert a.connect_reason == 0
        time.sleep(0.5)  # a takeover disconnects B at once (reason 0x8E, session taken over)
        assert b.disconnects == [] and b.client.is_connected()
        assert a.disconnects == []
        assert b.publish(TOPICS.status("dev-b"), b"still-here", retain=True) in OK
        # A's connection acts as A: B's topics stay closed to it.
        assert a.publish(TOPICS.status("dev-b"), b"forged", retain=True) == 0x87
        # Devices have no account on the service listener.
        refused = _Client(service, "dev-a", creds["dev-a"], client_id="edgekit-fleet-x")
        clients.append(refused)
        assert refused.connect_reason in (0x86, 0x87)
        # Two exporters (and two controllers) share one account there, with their own ids.
        monitors = [
            _Client(service, "monitor", creds["monitor"], client_id=f"edgekit-monitor-{n}")
            for n in range(2)
        ]
        operators = [
            _Client(service, "operator", creds["operator"], client_id=f"edgekit-fleet-{n}")
            for n in range(2)
        ]
        clients += monitors + operators
        for monitor in monitors:
            monitor.subscribe(f"$share/mon/{TOPICS.prefix}/devices/+/telemetry")
        for n in range(20):
            assert b.publish(TOPICS.telemetry("dev-b"), f"t{n}".encode()) in OK
        assert operators[0].publish(TOPICS.desired("dev-b"), b"directive", retain=True) in OK
        _wait(lambda: b.received("dev-b/desired") == [b"directive"], "B's directive")
        _wait(
            lambda: sum(len(m.received("telemetry")) for m in monitors) == 20,
            "telemetry split over the shared subscription",
        )
        time.sleep(0.3)
        assert all(m.disconnects == [] for m in monitors + operators)
        assert all(m.received("telemetry") for m in monitors)  # both got a share
    finally:
        for client in clients:
            client.close()


def test_service_accounts_cannot_take_over_a_device_session(
    generated_broker: tuple[int, int, dict[str, str]],
) -> None:
    """Client ids are one namespace across Mosquitto's listeners: with the monitor's or the
    operator's password, connecting with a device's client id (its user name) would kick the
    device off and fire its last will. The generated config refuses every such id."""
    port, service, creds = generated_broker
    will = (TOPICS.status("dev-b"), b"offline-will")
    b = _Client(port, "dev-b", creds["dev-b"], client_id="edgekit-agent-dev-b", will=will)
    watcher = _Client(service, "monitor", creds["monitor"], client_id="edgekit-monitor-watch")
    clients = [b, watcher]
    try:
        assert b.connect_reason == 0
        watcher.subscribe(TOPICS.status("dev-b"))
        b.subscribe(TOPICS.desired("dev-b"))
        for user in ("monitor", "operator"):
            # dev-b is the device's effective client id; "" asks the broker to assign one.
            for taken in ("dev-b", "", "auto-dev-b"):
                attacker = _Client(service, user, creds[user], client_id=taken)
                clients.append(attacker)
                assert attacker.connect_reason == 0x87, (user, taken)  # not authorized
                attacker.close()
        # A device's own listener replaces whatever id it gives by its user name: a device
        # giving the monitor's id stays itself (and does not knock the monitor off).
        a = _Client(port, "dev-a", creds["dev-a"], client_id="edgekit-monitor-watch")
        clients.append(a)
        assert a.connect_reason == 0
        time.sleep(0.5)  # a takeover disconnects at once (reason 0x8E)
        assert b.disconnects == [] and b.client.is_connected()
        assert watcher.disconnects == [] and watcher.client.is_connected()
        assert watcher.received("dev-b/status") == []  # no last will was fired
        assert b.publish(TOPICS.status("dev-b"), b"still-here", retain=True) in OK
        _wait(lambda: watcher.received("dev-b/status") == [b"still-here"], "B's status")
    finally:
        for client in clients:
            client.close()
