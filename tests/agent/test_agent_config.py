"""Config parsing, environment overrides, errors naming the key; journal and store basics;
the agent's import footprint."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from edgekit.agent.config import ConfigError, load_config, parse_config
from edgekit.agent.journal import Journal, JournalError, JournalRecord, write_json_atomic
from edgekit.agent.store import Pointer, SlotError, Store
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekit.messages import BundleId

MINIMAL = {
    "device_id": "pi-1",
    "fleet": "f",
    "profile": "raspberrypi",
    "truststore": "/etc/edgekit/truststore.json",
    "data_dir": "/var/lib/edgekit-agent",
    "mqtt": {"url": "mqtts://broker.example:8883", "ca_file": "/etc/ca.pem"},
}


def test_minimal_config_has_defaults() -> None:
    config = parse_config(MINIMAL)
    assert config.mqtt.tls and config.mqtt.port == 8883 and config.mqtt.host == "broker.example"
    assert config.update.probation_s == 60.0 and not config.update.shadow
    assert config.telemetry.interval_s == 60.0
    assert config.inference_address == "127.0.0.1:8080"


def test_environment_overrides_file_values() -> None:
    config = parse_config(
        MINIMAL,
        environ={
            "EDGEKIT_AGENT_DEVICE_ID": "pi-9",
            "EDGEKIT_AGENT_MQTT_URL": "mqtt://127.0.0.1:1884",
            "EDGEKIT_AGENT_UPDATE_PROBATION_S": "5",
            "EDGEKIT_AGENT_UPDATE_SHADOW": "true",
            "EDGEKIT_AGENT_BUDGETS_MAX_LATENCY_MS": "12.5",
            "EDGEKIT_AGENT_TAGS": "site=berlin, line=2",
        },
    )
    assert config.device_id == "pi-9"
    assert config.mqtt.port == 1884 and not config.mqtt.tls
    assert config.update.probation_s == 5.0 and config.update.shadow
    assert config.budgets.max_latency_ms == 12.5
    assert dict(config.tags) == {"site": "berlin", "line": "2"}


@pytest.mark.parametrize(
    ("change", "environ", "words"),
    [
        ({"device_id": None}, {}, "'device_id' is missing"),
        ({"mqtt": {"url": "http://x"}}, {}, "mqtt.url"),
        ({"fleet": "a/b"}, {}, "fleet"),
        ({"colour": "red"}, {}, "unknown key 'colour'"),
        ({"update": {"probation_s": -1}}, {}, "update.probation_s"),
        ({}, {"EDGEKIT_AGENT_UPDATE_SHADOW_AGREEMENT": "1.5"}, "EDGEKIT_AGENT_UPDATE_SHADOW"),
        ({}, {"EDGEKIT_AGENT_TELEMETRY_INTERVAL_S": "often"}, "telemetry.interval_s"),
        ({"mqtt": {"url": "mqtt://h:1", "cert_file": "/c.pem"}}, {}, "key_file"),
        ({"inference_address": "localhost"}, {}, "inference_address"),
        ({"inference_address": "0.0.0.0:8080"}, {}, "allow_remote_inference"),
        ({}, {"EDGEKIT_AGENT_INFERENCE_ADDRESS": "192.168.1.7:80"}, "allow_remote_inference"),
        ({"inference_address": "edge.local:8080"}, {}, "not a loopback address"),
        ({"mqtt": {**MINIMAL["mqtt"], "password_file": "/nonexistent/pw"}}, {}, "password_file"),
    ],
)
def test_errors_name_the_key(change: dict, environ: dict, words: str) -> None:  # type: ignore[type-arg]
    document = {**MINIMAL, **change}
    document = {k: v for k, v in document.items() if v is not None}
    with pytest.raises(ConfigError, match=words):
        parse_config(document, environ=environ)


def test_load_config_reports_toml_errors(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("device_id = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", environ={})


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_journal_parser_never_crashes_on_garbage(data: bytes) -> None:
    try:
        document = json.loads(data)
    except ValueError:
        return
    with contextlib.suppress(JournalError):
        JournalRecord.from_json(document)


def test_journal_round_trip_and_corruption(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.json")
    assert journal.read().state == "idle"
    record = JournalRecord(
        state="checking",
        sequence=7,
        rollout_id="r",
        bundle=BundleId("demo", "1.0.0", "a" * 64),
        directive=b"\x00\x01envelope",
        slot="b",
        previous_slot="a",
    )
    journal.write(record)
    assert journal.read() == record
    assert not list(tmp_path.glob(".journal.json.*"))  # no temp files left behind
    (tmp_path / "journal.json").write_text('{"schema": "edgekit.agent-journal/v1", "state": "x"}')
    with pytest.raises(JournalError, match="unknown state"):
        journal.read()


def test_store_pointer_and_bad_list(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    store.ensure_layout()
    assert store.pointer() == Pointer() and store.idle_slot() == "a"
    store.set_pointer(Pointer("a", None))
    assert store.idle_slot() == "b"
    store.mark_bad("c" * 64, sequence=3, reason="golden")
    assert store.is_bad("c" * 64, sequence=3) == "golden"
    assert store.is_bad("c" * 64, sequence=4) is None  # a newer directive may retry it
    with pytest.raises(SlotError):
        store.verify_slot("a")


def test_write_json_atomic_leaves_old_content_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"v": object()})
    assert json.loads(target.read_text()) == {"v": 1}


def test_agent_never_imports_the_converter_or_heavy_frameworks() -> None:
    code = (
        "import sys, edgekit.agent.daemon, edgekit.cli.agent;"
        "bad = [m for m in ('tensorflow', 'onnx', 'edgekit.converters', 'tf2onnx', 'onnxslim')"
        " if m in sys.modules];"
        "print(','.join(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"agent imported {result.stdout.strip()}"


def test_backoff_is_jittered_exponential_and_bounded() -> None:
    import random

    from edgekit.mqtt import Backoff

    backoff = Backoff(0.5, 8.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(30)]
    assert all(0.25 <= d <= 8.0 for d in delays)
    assert len({round(d, 6) for d in delays}) > 20  # jittered, not a fixed ladder
    assert max(delays[:2]) <= 1.0 and max(delays[10:]) > 2.0  # grows
    backoff.reset()
    assert backoff.next_delay() <= 0.5


@pytest.mark.parametrize(
    "address", ["127.0.0.1:8080", "127.0.0.53:1", "[::1]:8080", "localhost:0", "0.0.0.0:8080"]
)
def test_inference_address_is_loopback_unless_remote_is_allowed(address: str) -> None:
    """Review #13: the unauthenticated inference server binds beyond loopback only when
    `allow_remote_inference = true` says so."""
    remote = address.startswith("0.0.0.0")
    document = {**MINIMAL, "inference_address": address}
    if remote:
        with pytest.raises(ConfigError, match="allow_remote_inference"):
            parse_config(document)
        config = parse_config({**document, "allow_remote_inference": True})
    else:
        config = parse_config(document)
    assert config.inference_address == address
    assert config.allow_remote_inference is remote
    environ = {"EDGEKIT_AGENT_ALLOW_REMOTE_INFERENCE": "true"}
    assert parse_config(document, environ=environ).allow_remote_inference is True


def test_mqtt_password_file_and_its_environment_override(tmp_path: Path) -> None:
    """Review #9: the password can come from a file (a systemd credential), never inline."""
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    mqtt = {**MINIMAL["mqtt"], "username": "pi-1"}
    config = parse_config({**MINIMAL, "mqtt": {**mqtt, "password_file": str(secret)}})
    assert config.mqtt.password == "s3cret" and config.mqtt.password_file == secret
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "mqtt-password").write_text("from-credential")
    environ = {"EDGEKIT_AGENT_MQTT_PASSWORD_FILE": str(credentials / "mqtt-password")}
    config = parse_config({**MINIMAL, "mqtt": mqtt}, environ=environ)
    assert config.mqtt.password == "from-credential"
    with pytest.raises(ConfigError, match="keep one"):
        parse_config({**MINIMAL, "mqtt": {**mqtt, "password": "x"}}, environ=environ)
    (credentials / "mqtt-password").write_text("two\nlines\n")
    with pytest.raises(ConfigError, match="one line"):
        parse_config({**MINIMAL, "mqtt": mqtt}, environ=environ)


UNIT = Path(__file__).resolve().parents[2] / "packaging" / "edgekit-agent.service"


def _unit_values(key: str) -> list[str]:
    prefix = f"{key}="
    return [
        line.removeprefix(prefix).strip()
        for line in UNIT.read_text().splitlines()
        if line.startswith(prefix)
    ]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """Review #2/#9: `systemd-analyze verify` accepts the unit without warnings (ExecStart is
    pointed at an existing binary: the agent is not installed on the test machine)."""
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/edgekit-agent", shutil.which("true")))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert UNIT.name not in output, output  # no "Unknown key ... ignoring" or other warning


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_lets_onnxruntime_set_thread_affinity() -> None:
    """Review #2: onnxruntime calls sched_setaffinity at session creation; a deny list that
    covers it kills the agent (SIGSYS); anything else denied fails with EPERM instead."""
    denied: set[str] = set()
    for value in _unit_values("SystemCallFilter"):
        if not value.startswith("~"):
            continue
        for group in value[1:].split():
            if not group.startswith("@"):
                denied.add(group)
                continue
            listing = subprocess.run(
                ["systemd-analyze", "syscall-filter", group],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            denied.update(line.strip() for line in listing.splitlines())
    assert "sched_setaffinity" not in denied
    assert _unit_values("SystemCallErrorNumber") == ["EPERM"]


def test_systemd_unit_loads_secrets_as_credentials() -> None:
    """Review #9: under DynamicUser=yes the password is a credential, not a world-readable
    file, and the agent is told where it is."""
    assert "mqtt-password:/etc/edgekit/mqtt-password" in _unit_values("LoadCredential")
    assert "EDGEKIT_AGENT_MQTT_PASSWORD_FILE=%d/mqtt-password" in _unit_values("Environment")
