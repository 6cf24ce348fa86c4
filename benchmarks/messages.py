"""Benchmark: the telemetry parser, msgspec (`edgekit.messages`) vs a hand-written validator.

Why `edgekit.messages` uses msgspec (issue 12): both parsers are total (only `MessageError`
escapes) and enforce the same limits on a telemetry message; this measures, in one process on
the same payloads:
- `throughput`: microseconds per valid telemetry message (median of `--repeat` runs of
  `--count` parses), and the ratio hand-written / msgspec;
- `strictness`: over a corpus of hostile payloads (wrong types, bool-as-int, NaN/Infinity
  tokens, huge numbers, deep nesting, oversized, missing schema), how many each parser
  refuses and how many raised anything other than `MessageError` (must be 0).

Writes JSON to stdout and to `--out` (default benchmarks/results/messages.json).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekit.messages import MAX_DEPTH, BundleId, MessageError, Telemetry, check_depth


def hand_written(payload: bytes) -> dict[str, Any]:
    """A total hand-written telemetry validator with the limits of `edgekit.messages`."""
    if len(payload) > 8 * 1024:
        raise MessageError("too large", reason="too_large")
    check_depth(payload, limit=MAX_DEPTH)
    try:
        document = json.loads(payload, parse_constant=_no_constant)
    except (ValueError, RecursionError) as error:
        raise MessageError(f"not JSON: {error}", reason="not_json") from None
    if not isinstance(document, dict) or document.get("schema") != "edgekit.telemetry/v1":
        raise MessageError("schema", reason="schema")

    def text(key: str, limit: int, *, required: bool = True) -> None:
        value = document.get(key)
        if value is None and not required:
            return
        if not isinstance(value, str) or not 1 <= len(value) <= limit:
            raise MessageError(f"{key}: expected a string of 1..{limit}")

    def number(key: str, low: float, high: float, *, integer: bool, required: bool) -> None:
        value = document.get(key)
        if value is None and not required:
            return
        kinds: tuple[type, ...] = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise MessageError(f"{key}: wrong type")
        if not (math.isfinite(value) and low <= value <= high):
            raise MessageError(f"{key}: out of range")

    text("fleet", 128)
    text("device", 128)
    number("seq", 0, 2**53, integer=True, required=True)
    number("interval_s", 0, 1e7, integer=False, required=True)
    number("requests", 0, 2**40, integer=True, required=True)
    number("errors", 0, 2**40, integer=True, required=True)
    for key, low, high, integer in (
        ("cpu_percent", 0, 1e5, False),
        ("rss_bytes", 0, 2**53, True),
        ("temperature_c", -300, 1000, False),
        ("drift_psi", 0, 1e9, False),
        ("dropped", 0, 2**53, True),
        ("ts", 0, 1e11, False),
    ):
        number(key, low, high, integer=integer, required=False)
    text("rollout_id", 128, required=False)
    text("state", 32, required=False)
    latency = document.get("latency_ms", {})
    if not isinstance(latency, dict) or len(latency) > 8:
        raise MessageError("latency_ms: expected an object")
    for key, value in latency.items():
        if len(key) > 16 or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MessageError("latency_ms: wrong type")
        if not (math.isfinite(value) and 0 <= value <= 1e9):
            raise MessageError("latency_ms: out of range")
    bundle = document.get("bundle")
    if bundle is not None:
        if not isinstance(bundle, dict):
            raise MessageError("bundle: expected an object")
        for key, limit in (("name", 128), ("version", 128)):
            if not isinstance(bundle.get(key), str) or len(bundle[key]) > limit:
                raise MessageError(f"bundle.{key}")
        if not isinstance(bundle.get("sha256"), str) or len(bundle["sha256"]) != 64:
            raise MessageError("bundle.sha256")
    return document


def _no_constant(token: str) -> float:
    raise ValueError(f"{token} is not JSON")


def _valid() -> bytes:
    return Telemetry(
        "plant-7",
        "pi-0042",
        1234,
        60.0,
        1200,
        3,
        latency_ms={"p50": 11.2, "p95": 18.4, "p99": 25.0},
        cpu_percent=23.5,
        rss_bytes=61_000_000,
        temperature_c=51.2,
        drift_psi=0.031,
        bundle=BundleId("digits", "2.1.0", "a" * 64),
        rollout_id="r-20250601T120000-abc123",
        state="committed",
        dropped=0,
        ts=1_750_000_000.0,
    ).to_json()


def _hostile() -> list[bytes]:
    good = _valid()
    swaps = [
        (b'"requests":1200', b'"requests":true'),
        (b'"requests":1200', b'"requests":"1200"'),
        (b'"requests":1200', b'"requests":' + str(10**308).encode()),
        (b'"requests":1200', b'"requests":-1'),
        (b'"requests":1200', b'"requests":1200.5'),
        (b'"p95":18.4', b'"p95":"x"'),
        (b'"p95":18.4', b'"p95":{}'),
        (b'"p95":18.4', b'"p95":NaN'),
        (b'"p95":18.4', b'"p95":Infinity'),
        (b'"p95":18.4', b'"p95":1e400'),
        (b'"cpu_percent":23.5', b'"cpu_percent":-Infinity'),
        (b'"seq":1234', b'"seq":null'),
        (b'"device":"pi-0042"', b'"device":7'),
        (b'"schema":"edgekit.telemetry/v1",', b""),
        (b'"schema":"edgekit.telemetry/v1"', b'"schema":"edgekit.status/v1"'),
        (b'"state":"committed"', b'"state":"' + b"x" * 100 + b'"'),
        (b'"sha256":"' + b"a" * 64, b'"sha256":"' + b"a" * 63),
    ]
    corpus = [good.replace(old, new) for old, new in swaps]
    corpus += [
        b"[" * 50_000 + b"]" * 50_000,
        b'{"schema":"edgekit.telemetry/v1","x":' + b"[" * 3000 + b"]" * 3000 + b"}",
        good[:-1] + b',"x":"' + b"y" * 9000 + b'"}',
        b"\xff\xfe",
        b"null",
        b"[]",
    ]
    return corpus


def _time(parse: Any, payload: bytes, count: int, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(count):
            parse(payload)
        runs.append((time.perf_counter() - start) / count)
    return statistics.median(runs) * 1e6


def _strictness(parse: Any, corpus: list[bytes]) -> dict[str, int]:
    refused = escaped = 0
    for payload in corpus:
        try:
            parse(payload)
        except MessageError:
            refused += 1
        except Exception:  # noqa: BLE001 - counted: a parser must never let these out
            escaped += 1
    return {"hostile": len(corpus), "refused": refused, "escaped": escaped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/messages.json"))
    args = parser.parse_args()
    payload = _valid()
    assert hand_written(payload) and Telemetry.from_json(payload)
    msgspec_us = _time(Telemetry.from_json, payload, args.count, args.repeat)
    hand_us = _time(hand_written, payload, args.count, args.repeat)
    corpus = _hostile()
    result = {
        "benchmark": "messages",
        "payload_bytes": len(payload),
        "throughput_us_per_message": {
            "msgspec": round(msgspec_us, 2),
            "hand_written": round(hand_us, 2),
            "ratio_hand_written_over_msgspec": round(hand_us / msgspec_us, 2),
        },
        "strictness": {
            "msgspec": _strictness(Telemetry.from_json, corpus),
            "hand_written": _strictness(hand_written, corpus),
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
