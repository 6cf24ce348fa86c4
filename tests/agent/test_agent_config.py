"""Config parsing, environment overrides, errors naming the key; journal and store basics;
the agent's import footprint."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from edgekit.agent.config import ConfigError, load_config, parse_config
from edgekit.agent.journal import Journal, JournalError, JournalRecord, write_json_atomic
from edgekit.agent.store import Pointer, SlotError, Store
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekit.topics import ActiveBundle

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
        bundle=ActiveBundle("demo", "1.0.0", "a" * 64),
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
        "import sys, edgekit.agent.daemon, edgekit.agent.cli;"
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

    from edgekit.agent.mqtt import Backoff

    backoff = Backoff(0.5, 8.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(30)]
    assert all(0.25 <= d <= 8.0 for d in delays)
    assert len({round(d, 6) for d in delays}) > 20  # jittered, not a fixed ladder
    assert max(delays[:2]) <= 1.0 and max(delays[10:]) > 2.0  # grows
    backoff.reset()
    assert backoff.next_delay() <= 0.5
