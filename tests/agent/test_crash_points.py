"""Systematic crash points (slow tier): SIGKILL the agent's updater before every durable step of
an update and of a rollback, restart it, and check that it ends in a good state.

A durable step is what `edgekit.files` announces under the data directory: each write,
fsync, rename, directory fsync and removal of the journal, floor, pointer, slots, staging,
bad list and probation record. `EDGEKIT_AGENT_CRASH_STEP=N` kills the process before step N
(`edgekit.agent.journal.install_step_hook`); N runs from 1 until a run finishes without being
killed, so every step is a crash point. Scenarios: an update that commits, one whose health
check fails, one that fails in probation (batch-2 traffic against the batch1 model), and a
rollback directive that reuses the idle slot. After each kill a fresh updater on the same data
directory recovers, the retained directive is delivered again (as MQTT would), and:

- the journal ends `committed` (good update, rollback) or `rolled_back` (the failures);
- the model served is the slot the pointer names, its files re-hash to its record, and it is
  the expected bundle; a failed bundle is in bad.json with its sequence and never serves;
- no staging folder, temp file or probation record is left; the floor holds the sequence.

The counts of points and of bad states are printed (run with `-s` to see them).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from edgekit.agent.journal import CRASH_STEP_ENV, STEP_TRACE_ENV, Journal
from edgekit.agent.serving import ModelHost
from edgekit.agent.store import Store

from tests.agent.agent_helpers import (
    REPO,
    Keys,
    directive_for,
    sha_of,
    write_config,
    write_truststore,
)
from tests.agent.conftest import Bundles, Recorder
from tests.agent.crash_driver import batch2_traffic, updater_for

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Scenario:
    name: str
    bundle: str  # the Bundles field the directive names
    version: str
    sequence: int
    outcome: str  # committed or rolled_back
    serves: str  # the Bundles field that must serve at the end
    traffic: bool = False
    setup: tuple[tuple[str, str], ...] = ()  # directives applied before (bundle, version)


SCENARIOS = (
    Scenario("update", "v2", "2.0.0", 1, "committed", "v2"),
    Scenario("health check fails", "nan", "3.0.1", 1, "rolled_back", "v1"),
    Scenario("probation fails", "batch1", "3.0.3", 1, "rolled_back", "v1", traffic=True),
    Scenario("rollback", "v1", "1.0.0", 2, "committed", "v1", setup=(("v2", "2.0.0"),)),
)


@dataclass
class Tally:
    points: dict[str, int] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)
    steps: dict[str, set[str]] = field(default_factory=dict)


def _run(spec: Path, *, crash_at: int, trace: Path) -> int:
    process = subprocess.run(
        [sys.executable, "-m", "tests.agent.crash_driver", str(spec)],
        env={**_env(), CRASH_STEP_ENV: str(crash_at), STEP_TRACE_ENV: str(trace)},
        cwd=REPO,
        capture_output=True,
        timeout=300,
        check=False,
    )
    if process.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"driver exited {process.returncode}:\n{process.stderr[-3000:]!r}")
    return process.returncode


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_AGENT_")}


def _recover(spec: dict[str, object], directive: bytes, *, traffic: bool) -> ModelHost:
    """Restart: recover from the journal, then the retained directive arrives again."""
    host = ModelHost("model")
    updater = updater_for(spec, host, Recorder())
    updater.start()
    stop = threading.Event()
    load = threading.Event()
    if traffic:
        threading.Thread(target=batch2_traffic, args=(host, load), daemon=True).start()
    worker = threading.Thread(target=updater.run, args=(stop,), daemon=True)
    worker.start()
    updater.submit(directive)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (
        updater.busy or updater.record.state not in ("committed", "rolled_back")
    ):
        time.sleep(0.02)
    stop.set()
    load.set()
    worker.join(30)
    return host


def _check(
    data: Path, host: ModelHost, scenario: Scenario, bundles: Bundles, *, where: str
) -> list[str]:
    """What is wrong with the recovered device (nothing, on a good state)."""
    wrong = []
    store = Store(data)
    record = Journal(store.journal_path).read()
    if record.state != scenario.outcome or record.sequence != scenario.sequence:
        wrong.append(f"{where}: journal {record.state} {record.sequence}")
    pointer = store.pointer()
    try:
        served = store.verify_slot(pointer.active or "")
    except Exception as error:  # noqa: BLE001 - any failure here is a bad state to report
        return [*wrong, f"{where}: the active slot does not verify: {error}"]
    expected = sha_of(getattr(bundles, scenario.serves))
    if served.bundle.sha256 != expected or host.bundle is None:
        wrong.append(f"{where}: slot {pointer.active} holds {served.bundle.version}")
    elif host.bundle.sha256 != expected:
        wrong.append(f"{where}: serving {host.bundle.version}")
    failed = sha_of(getattr(bundles, scenario.bundle))
    if scenario.outcome == "rolled_back" and not store.is_bad(failed, sequence=scenario.sequence):
        wrong.append(f"{where}: the failed bundle is not in bad.json")
    if store.floor()[0].last_sequence != scenario.sequence:
        wrong.append(f"{where}: floor {store.floor()[0].last_sequence}")
    leftovers = [
        str(p.relative_to(data))
        for p in data.rglob("*")
        if p.name.endswith((".tmp", ".new")) or p.name == "probation.json"
    ]
    if leftovers:
        wrong.append(f"{where}: left behind {leftovers}")
    return wrong


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    result = Tally()
    yield result
    total = sum(result.points.values())
    print(
        f"\ncrash points: {total} ("
        + ", ".join(f"{name}: {count}" for name, count in result.points.items())
        + f"); distinct step kinds: {sorted({k for s in result.steps.values() for k in s})}; "
        f"bad states: {len(result.bad)}"
    )


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_every_durable_step_is_a_safe_crash_point(
    scenario: Scenario,
    tally: Tally,
    tmp_path: Path,
    bundles: Bundles,
    agent_keys: Keys,
) -> None:
    template = tmp_path / "template"
    template.mkdir()
    truststore = write_truststore(agent_keys, template / "truststore.json")
    files = [str(getattr(bundles, f)) for f in bundles.__dataclass_fields__]
    directive = directive_for(
        getattr(bundles, scenario.bundle),
        agent_keys,
        sequence=scenario.sequence,
        version=scenario.version,
        ttl_s=24 * 3600,
    )
    (template / "directive").write_bytes(directive)

    def spec_for(root: Path) -> tuple[Path, dict[str, object]]:
        config = write_config(
            root / "agent.toml",
            data_dir=root / "data",
            truststore=truststore,
            initial_bundle=bundles.v1,
            probation_s=1.0 if scenario.traffic else 0.3,
        )
        spec = {
            "config": str(config),
            "directive": str(template / "directive"),
            "bundles": files,
            "traffic": scenario.traffic,
        }
        path = root / "spec.json"
        path.write_text(json.dumps(spec))
        return path, spec

    # The device before the update: v1 installed (and the setup directives applied).
    _, spec = spec_for(template)
    host = ModelHost("model")
    updater = updater_for(spec, host, Recorder())
    updater.start()
    for sequence, (name, version) in enumerate(scenario.setup, start=1):
        updater.process(
            directive_for(getattr(bundles, name), agent_keys, sequence=sequence, version=version)
        )
        assert updater.record.state == "committed"
    host.close()

    points = 0
    for crash_at in range(1, 10_000):
        run = tmp_path / f"run{crash_at}"
        shutil.copytree(template / "data", run / "data")
        spec_path, spec = spec_for(run)
        trace = run / "trace"
        code = _run(spec_path, crash_at=crash_at, trace=trace)
        where = f"{scenario.name} step {crash_at}"
        if code == -signal.SIGKILL:
            points += 1
            killed = trace.read_text().splitlines()[-1].split()
            tally.steps.setdefault(scenario.name, set()).add(killed[1])
        recovered = _recover(spec, directive, traffic=scenario.traffic)
        try:
            tally.bad += _check(run / "data", recovered, scenario, bundles, where=where)
        finally:
            recovered.close()
        shutil.rmtree(run, ignore_errors=True)
        if code == 0:
            break  # this index is past the last step: every step was a crash point
    tally.points[scenario.name] = points
    print(f"\n{scenario.name}: {points} crash points, bad states so far: {len(tally.bad)}")
    assert points >= 20, "the update took fewer durable steps than expected"
    assert tally.bad == [], tally.bad


def test_at_least_200_points_were_crashed_without_a_bad_state(tally: Tally) -> None:
    if len(tally.points) < len(SCENARIOS):
        pytest.skip("run with the scenarios above (the whole module)")
    assert sum(tally.points.values()) >= 200, tally.points
    assert tally.bad == []
