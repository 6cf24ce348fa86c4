"""The message layer under hostile input: every registered parser and every consumer.

Property tests (hypothesis) feed arbitrary JSON, deep nesting, huge numbers, NaN/Infinity
tokens, wrong types and oversized payloads to every parser in `edgekit.messages.PARSERS` and to
the consumers' entry points (monitor ingest, device registry, rollout controller, bundle
fetcher meta/chunk handlers, the MQTT client's dispatch guard): only `MessageError` escapes a
parser, and no consumer raises or changes state on a refused message.
"""

from __future__ import annotations

import json
import pathlib
import re
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgekit.contract  # noqa: F401 - registers the directive-envelope parser
from edgekit.fleet.monitor import FleetMonitor
from edgekit.fleet.registry import DeviceRegistry
from edgekit.fleet.rollout import RolloutController
from edgekit.messages import (
    MAX_DEPTH,
    PARSERS,
    REJECT_REASONS,
    BundleMeta,
    Event,
    MessageError,
    Status,
    Telemetry,
)
from edgekit.mqtt import BrokerSettings, Message, MqttClient
from edgekit.topics import BundleTopics, Topics
from edgekit.transfer import MqttBundleFetcher

FLEET = "hostile"
TOPICS = Topics(FLEET)
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)
FIELD_NAMES = sorted(
    {name for cls in (Status, Event, Telemetry, BundleMeta) for name in cls.__struct_fields__}
    | {"p50", "p95", "p99", "name", "version", "sha256"}
)


def _with_schema(schema: str, draw_fields: dict[str, Any]) -> bytes:
    document = {"schema": schema, **draw_fields}
    return json.dumps(document, allow_nan=True, default=str).encode()


@st.composite
def hostile_payloads(draw: st.DrawFn, schema: str) -> bytes:
    """Payloads that look like `schema` messages with hostile field values, plus raw junk."""
    kind = draw(st.sampled_from(["fields", "junk", "deep", "tokens", "huge", "big"]))
    if kind == "fields":
        fields = draw(st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=10))
        return _with_schema(schema, fields)
    if kind == "junk":
        return draw(st.binary(max_size=300))
    if kind == "deep":
        depth = draw(st.integers(min_value=MAX_DEPTH - 2, max_value=200_000))
        where = draw(st.sampled_from(["details", "tags", "unknown", "latency_ms"]))
        nest = draw(st.sampled_from(["[", '{"a":']))
        closing = "]" if nest == "[" else "}"
        return (
            f'{{"schema":"{schema}","{where}":' + nest * depth + "1" + closing * depth + "}"
        ).encode()
    if kind == "tokens":
        token = draw(
            st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" * 400])
        )
        field = draw(st.sampled_from(FIELD_NAMES))
        return f'{{"schema":"{schema}","{field}":{token}}}'.encode()
    if kind == "huge":
        field = draw(st.sampled_from(["requests", "errors", "seq", "size", "last_sequence"]))
        return f'{{"schema":"{schema}","{field}":{10**308}}}'.encode()
    return b'{"schema":"' + schema.encode() + b'","reason":"' + b"x" * 70_000 + b'"}'


@pytest.mark.parametrize("name", sorted(PARSERS))
@SETTINGS
@given(data=st.data())
def test_only_message_error_escapes_a_parser(name: str, data: st.DataObject) -> None:
    parser = PARSERS[name]
    payload = data.draw(hostile_payloads(name))
    try:
        parser.parse(payload)
    except MessageError as error:
        assert error.reason in REJECT_REASONS
        assert str(error)


@SETTINGS
@given(fields=st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=10))
def test_accepted_messages_are_within_their_limits(fields: dict[str, Any]) -> None:
    """Whatever a parser accepts has finite numbers within range: safe to sum and export."""
    payload = _with_schema("edgekit.telemetry/v1", fields)
    try:
        telemetry = Telemetry.from_json(payload)
    except MessageError:
        return
    assert 0 <= telemetry.requests <= 2**40 and 0 <= telemetry.errors <= 2**40
    assert all(0 <= value <= 1e9 for value in telemetry.latency_ms.values())
    assert float(telemetry.requests) * 2**200 < float("inf")


def test_the_hostile_payloads_of_issue_12_are_refused_with_a_reason() -> None:
    base = {"schema": "edgekit.telemetry/v1", "fleet": FLEET, "device": "d", "seq": 1}
    base |= {"interval_s": 1.0, "requests": 1, "errors": 0}
    cases = {
        "invalid": [
            {**base, "latency_ms": {"p95": "x"}},
            {**base, "latency_ms": {"p95": {}}},
            {**base, "requests": 10**308},
            {**base, "requests": True},
        ],
        "schema": [{**base, "schema": "edgekit.status/v1"}, [base]],
    }
    for reason, documents in cases.items():
        for document in documents:
            with pytest.raises(MessageError) as caught:
                Telemetry.from_json(json.dumps(document))
            assert caught.value.reason == reason, document
    nested = b'{"schema":"edgekit.status/v1","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for parse, reason in ((Status.from_json, "too_large"), (Event.from_json, "too_large")):
        with pytest.raises(MessageError) as caught:
            parse(nested)
        assert caught.value.reason == reason
    deep = b'{"schema":"edgekit.status/v1","x":' + b"[" * 40 + b"]" * 40 + b"}"
    with pytest.raises(MessageError) as caught:
        Status.from_json(deep)
    assert caught.value.reason == "too_deep"
    with pytest.raises(MessageError) as caught:
        Telemetry.from_json(json.dumps(base).replace('"seq": 1', '"seq": NaN'))
    assert caught.value.reason == "not_json"
    meta = b'{"schema":"edgekit.bundle-meta/v1","sha256":' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(MessageError):
        BundleMeta.from_json(meta)


def test_round_trip_of_every_json_message() -> None:
    status = Status(FLEET, "d", True, "committed", tags={"site": "a"}, last_sequence=3)
    event = Event(FLEET, "d", "health_check", ok=True, details={"latency_ms": [1.0, 2.0]})
    telemetry = Telemetry(FLEET, "d", 1, 1.0, 10, 0, latency_ms={"p95": 2.5}, drift_psi=0.1)
    meta = BundleMeta.for_size("a" * 64, 10, chunk_size=4)
    for message in (status, event, telemetry, meta):
        assert type(message).from_json(message.to_json()) == message


# -- consumers ------------------------------------------------------------------------------


def _monitor() -> FleetMonitor:
    return FleetMonitor(BrokerSettings("mqtt://127.0.0.1:1"), FLEET, max_series_per_device=4)


@SETTINGS
@given(data=st.data())
def test_no_consumer_raises_or_changes_on_a_refused_message(data: st.DataObject) -> None:
    leaf = data.draw(st.sampled_from(["status", "events", "telemetry"]))
    schema = {"status": Status, "events": Event, "telemetry": Telemetry}[leaf]._schema
    payload = data.draw(hostile_payloads(schema))
    topic = TOPICS.status("d") if leaf == "status" else getattr(TOPICS, leaf)("d")
    message = Message(topic, payload)
    try:
        accepted = schema is not None and PARSERS[schema].parse(payload) is not None
    except MessageError:
        accepted = False

    monitor = _monitor()
    try:
        monitor._on_message(message)
    except MessageError:
        assert not accepted
        assert monitor.ingested == {"telemetry": 0, "events": 0, "status": 0}
        assert sum(monitor.rejected.values()) == 1
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    list(text_string_to_metric_families(generate_latest(monitor.registry).decode()))

    registry = DeviceRegistry(TOPICS)
    registry.handle(message)  # never raises
    if not accepted:
        assert len(registry) == 0

    controller = RolloutController.__new__(RolloutController)
    controller.fleet, controller.topics, controller.registry = FLEET, TOPICS, registry
    controller.rejected = __import__("collections").Counter()
    controller._observed = __import__("edgekit.fleet.rollout", fromlist=["_Observed"])._Observed()
    controller._driving = None
    controller._handle([message])  # never raises


@SETTINGS
@given(data=st.data())
def test_fetcher_handlers_refuse_hostile_meta_and_chunks(
    data: st.DataObject, tmp_path: pathlib.Path
) -> None:
    prefix = TOPICS.bundle_prefix("b" * 64)
    fetcher = MqttBundleFetcher(
        _offline_client(), prefix, tmp_path / "dl", sha256="b" * 64, size_bytes=100
    )
    payload = data.draw(hostile_payloads("edgekit.bundle-meta/v1"))
    fetcher._on_meta(Message(f"{prefix}/meta", payload))  # never raises
    error = fetcher._error
    assert fetcher.assembler is None
    assert error is None or "bundle meta" in str(error)
    index = data.draw(st.text(max_size=12))
    try:
        fetcher._on_chunk(Message(f"{prefix}/chunks/{index}", b"x"))
    except MessageError as refused:
        assert refused.reason == "invalid"


def _offline_client() -> MqttClient:
    return MqttClient(BrokerSettings("mqtt://127.0.0.1:1"), client_id="edgekit-test-offline")


def test_chunk_topics_parse_only_their_own_indices() -> None:
    names = BundleTopics(TOPICS.bundle_prefix("c" * 64))
    assert names.chunk_index(names.chunk(7)) == 7
    for bad in (f"{names.prefix}/chunks/-1", f"{names.prefix}/chunks/x", f"{names.prefix}/meta",
                f"{names.prefix}/chunks/{'9' * 40}", "other/chunks/1"):  # fmt: skip
        with pytest.raises(MessageError):
            names.chunk_index(bad)


def test_the_client_guard_counts_and_survives_every_handler_failure() -> None:
    """The one guard every network callback runs in: counted, acknowledged, loop alive."""
    client = _offline_client()
    calls: list[str] = []

    def refuses(message: Message) -> None:
        calls.append("refuses")
        raise MessageError("bad", reason="too_deep")

    def crashes(message: Message) -> None:
        calls.append("crashes")
        raise RecursionError("deep")

    client.on("a/#", refuses)
    client.on("a/+", crashes)

    class Raw:
        topic = "a/b"
        payload = b"{}"
        retain = False

    for _ in range(3):
        client._handle_message(client._paho, None, Raw())
    assert calls.count("refuses") == 3 and calls.count("crashes") == 3
    assert client.rejected == {"too_deep": 3}
    assert client.handler_errors == 3
    assert threading.current_thread().is_alive()


def test_only_the_mqtt_seam_imports_paho() -> None:
    root = pathlib.Path(__file__).resolve().parents[1]
    importers = {
        str(path.relative_to(root))
        for folder in ("edgekit", "agent", "converters")
        for path in (root / folder).rglob("*.py")
        if re.search(r"^\s*(import|from)\s+paho\b", path.read_text(), re.MULTILINE)
    }
    assert importers == {"edgekit/mqtt/client.py"}


@pytest.mark.parametrize("index", ["²", "٣", "-1", "1 ", "", "12345678901"])
def test_chunk_index_accepts_ascii_digits_only(index: str) -> None:
    """'²' is a digit to str.isdigit() but not to int() (hypothesis found it on the fetcher)."""
    names = BundleTopics(TOPICS.bundle_prefix("d" * 64))
    with pytest.raises(MessageError):
        names.chunk_index(f"{names.prefix}/chunks/{index}")
    assert names.chunk_index(f"{names.prefix}/chunks/42") == 42
