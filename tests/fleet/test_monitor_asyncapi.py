"""docs/asyncapi.yaml describes every topic and payload of edgekit/topics.py (and the
directive), with examples the real parsers accept."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgekit.messages import AGENT_STATES, EVENT_KINDS, BundleMeta, Event, Status, Telemetry
from edgekit.topics import Topics
from edgekit.trust import BundleRef, BundleSource, build_directive

SPEC = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"
WIRE_NAMES = {"size_bytes": "size"}  # Python attribute -> its JSON field


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    document = yaml.safe_load(SPEC.read_text())
    assert document["asyncapi"].startswith("3.")
    return document  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("name", "cls"),
    [("Status", Status), ("Event", Event), ("Telemetry", Telemetry), ("BundleMeta", BundleMeta)],
)
def test_schemas_name_every_field(spec: dict[str, Any], name: str, cls: type) -> None:
    properties = set(spec["components"]["schemas"][name]["properties"])
    fields = {WIRE_NAMES.get(name, name) for name in cls.__struct_fields__} | {"schema"}
    assert properties == fields


@pytest.mark.parametrize(
    ("message", "cls"),
    [("status", Status), ("event", Event), ("telemetry", Telemetry), ("bundleMeta", BundleMeta)],
)
def test_examples_parse_with_the_real_parsers(spec: dict[str, Any], message: str, cls: Any) -> None:
    examples = spec["components"]["messages"][message]["examples"]
    assert examples
    for example in examples:
        parsed = cls.from_json(json.dumps(example["payload"]))
        # Round trip: what we write is what the example shows (modulo key order).
        assert json.loads(parsed.to_json()) == example["payload"]


def test_enums_match_the_vocabulary(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    assert tuple(schemas["AgentState"]["enum"]) == AGENT_STATES
    assert tuple(schemas["Event"]["properties"]["kind"]["enum"]) == EVENT_KINDS


def test_channels_match_topics(spec: dict[str, Any]) -> None:
    topics = Topics("FLEET")
    sha = "0" * 64
    expected = {
        topics.status("DEVICE"),
        topics.desired("DEVICE"),
        topics.events("DEVICE"),
        topics.telemetry("DEVICE"),
        topics.trust(),
        topics.bundle(sha).meta,
        topics.bundle(sha).chunk(7),
        topics.bench("DEVICE"),
        topics.bench_result("DEVICE"),
    }
    addresses = {
        channel["address"]
        .replace("{fleet}", "FLEET")
        .replace("{device}", "DEVICE")
        .replace("{sha256}", sha)
        .replace("{index}", "7")
        for channel in spec["channels"].values()
    }
    assert addresses == expected
    # Every channel has an operation on each side.
    for name in spec["channels"]:
        actions = {
            op["action"]
            for op in spec["operations"].values()
            if op["channel"]["$ref"] == f"#/channels/{name}"
        }
        assert actions == {"send", "receive"}, name


def test_the_measurements_example_parses_and_names_every_field(spec: dict[str, Any]) -> None:
    from edgekit.messages import CandidateMeasurement, Measurements

    example = spec["components"]["messages"]["measurements"]["examples"][0]["payload"]
    parsed = Measurements.from_json(json.dumps(example))
    assert json.loads(parsed.to_json()) == example
    schema = spec["components"]["schemas"]["Measurements"]
    assert set(schema["properties"]) == set(Measurements.__struct_fields__) | {"schema"}
    candidate = schema["properties"]["candidates"]["items"]["properties"]
    assert set(candidate) == set(CandidateMeasurement.__struct_fields__)


def test_directive_schema_names_every_payload_field(spec: dict[str, Any]) -> None:
    issued = datetime(2026, 1, 1, tzinfo=timezone.utc)
    directive = build_directive(
        fleet="f",
        device="d",
        rollout_id="r",
        sequence=1,
        bundle=BundleRef("0" * 64, 10, "digits", "1.0.0", (BundleSource("mqtt", "x/y"),)),
        min_security_epoch=0,
        issued_at=issued,
    )
    payload = json.loads(directive.to_payload())
    schema = spec["components"]["schemas"]["Directive"]
    assert set(schema["properties"]) == set(payload)
    assert set(schema["properties"]["bundle"]["properties"]) == set(payload["bundle"])
