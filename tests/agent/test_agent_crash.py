"""Crash consistency: SIGKILL the agent during an update, restart it, check what it serves.

The fault hook `EDGEKIT_AGENT_CRASH_AT=<state>/<step>` makes the agent SIGKILL itself at a
named point (right after a journal write, between extracting and recording a slot, after the
pointer swap, ...); the slow tier adds kills after random delays. After the restart the agent
must serve a slot whose files re-hash to its record and end `committed` (the new bundle) or
`rolled_back` (the old one), with journal, pointer and retained status agreeing. Every
durable step of the updater, one by one, is crashed in `test_crash_points.py` (slow tier).
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from edgekit.agent.journal import Journal
from edgekit.agent.store import Store

from edgekit.mosquitto import MosquittoBroker
from tests.agent.agent_helpers import (
    AgentProcess,
    Keys,
    Watcher,
    agent_config,
    directive_for,
    infer,
    run_model,
    sample_inputs,
    sha_of,
)
from tests.agent.conftest import Bundles

GOOD_POINTS = (
    "downloading/journaled",
    "downloading/done",
    "verifying/journaled",
    "verifying/done",
    "installing/journaled",
    "installing/extracted",
    "installing/recorded",
    "installing/removed",
    "installing/done",
    "checking/journaled",
    "checking/done",
    "activating/journaled",
    "activating/pointer",
    "activating/done",
    "probation/journaled",
    "probation/done",
    "committed/journaled",
)
BAD_POINTS = (
    "downloading/journaled",
    "verifying/done",
    "installing/extracted",
    "checking/journaled",
    "rolled_back/journaled",
    "rolled_back/pointer",
)


@dataclass
class Lab:
    broker: MosquittoBroker
    watcher: Watcher
    keys: Keys
    bundles: Bundles
    root: Path
    runs: int = 0

    def publish(self, bundle: Path, version: str) -> None:
        """Make `bundle` the device's desired state (sequence 1: every run has a new device)."""
        self.watcher.publish_bundle(bundle)
        self.watcher.publish_directive(
            directive_for(bundle, self.keys, sequence=1, version=version)
        )

    def crash_and_recover(self, *, point: str | None, good: bool, delay_s: float = 0.0) -> str:
        self.runs += 1
        config, data = _lab_config(self, f"run{self.runs}", probation_s=0.5)
        env = {"EDGEKIT_AGENT_CRASH_AT": point} if point else {}
        first = AgentProcess(config, data, env=env)
        if point is None:
            first.url()
            time.sleep(delay_s)
            first.process.send_signal(signal.SIGKILL)
        code = first.wait_exit(60)
        assert code == -signal.SIGKILL, f"{point}: exit {code}\n{first.output()}"
        restarted = time.time()
        second = AgentProcess(config, data)
        try:
            url = second.url()
            status = self.watcher.wait_status(
                lambda s: (
                    s.online
                    and s.ts >= restarted
                    and s.last_sequence >= 1
                    and s.state in ("committed", "rolled_back")
                ),
                what=f"final status after a crash at {point or f'{delay_s:.2f} s'}",
            )
            store = Store(data)
            pointer = store.pointer()
            assert pointer.active is not None
            served = store.verify_slot(pointer.active)  # complete and intact, never half-installed
            expected_sha = sha_of(self.bundles.v2 if good else self.bundles.v1)
            if good and status.state == "committed":
                assert served.bundle.sha256 == expected_sha
            else:
                assert served.bundle.sha256 == sha_of(self.bundles.v1)
            assert status.active is not None and status.active.sha256 == served.bundle.sha256
            assert Journal(store.journal_path).read().state == status.state
            assert not list(store.slots_dir.glob(".*.new"))
            x = sample_inputs(1, seed=11)[0]
            np.testing.assert_allclose(infer(url, x), run_model(served.model_path, x), rtol=1e-5)
            return status.state
        finally:
            code = second.stop()
            assert code == 0, second.output()


@pytest.fixture
def lab(tmp_path: Path, bundles: Bundles, agent_keys: Keys) -> Iterator[Lab]:
    broker = MosquittoBroker(tmp_path / "mosquitto")
    broker.start()
    watcher = Watcher(broker.url)
    try:
        yield Lab(broker, watcher, agent_keys, bundles, tmp_path)
    finally:
        watcher.close()
        broker.stop()


@pytest.mark.parametrize(
    ("point", "good"),
    [
        ("installing/extracted", True),
        ("activating/pointer", True),
        ("probation/journaled", True),
        ("rolled_back/journaled", False),
    ],
)
def test_sigkill_during_an_update_recovers(lab: Lab, point: str, good: bool) -> None:
    bundle, version = (lab.bundles.v2, "2.0.0") if good else (lab.bundles.nan, "3.0.1")
    lab.publish(bundle, version)
    state = lab.crash_and_recover(point=point, good=good)
    assert state == ("committed" if good else "rolled_back")


@pytest.mark.slow
def test_sigkill_at_fifty_random_points(lab: Lab) -> None:
    rng = random.Random(20251123)
    outcomes: dict[str, int] = {}
    plan: list[tuple[str | None, bool, float]] = [(p, True, 0.0) for p in GOOD_POINTS]
    plan += [(p, False, 0.0) for p in BAD_POINTS]
    while len(plan) < 56:
        good = rng.random() < 0.7
        if rng.random() < 0.5:
            points = GOOD_POINTS if good else BAD_POINTS
            plan.append((rng.choice(points), good, 0.0))
        else:
            plan.append((None, good, rng.uniform(0.0, 2.5)))
    rng.shuffle(plan)
    published: bool | None = None
    for point, good, delay in plan:
        if published is not good:
            bundle, version = (lab.bundles.v2, "2.0.0") if good else (lab.bundles.nan, "3.0.1")
            lab.publish(bundle, version)
            published = good
        state = lab.crash_and_recover(point=point, good=good, delay_s=delay)
        outcomes[state] = outcomes.get(state, 0) + 1
    assert lab.runs >= 50
    assert outcomes.get("committed", 0) > 0 and outcomes.get("rolled_back", 0) > 0


def test_dying_twice_in_the_health_check_rolls_back_and_marks_the_bundle_bad(lab: Lab) -> None:
    """Review #3: a candidate that kills the agent in a pre-activation state (an onnxruntime
    segfault or the OOM killer in the health check) must not crash-loop the agent."""
    lab.publish(lab.bundles.v2, "2.0.0")
    config, data = _lab_config(lab, "twice", probation_s=0.5)
    for attempt in range(2):
        crashing = AgentProcess(config, data, env={"EDGEKIT_AGENT_CRASH_AT": "checking/health"})
        code = crashing.wait_exit(60)
        assert code == -signal.SIGKILL, f"run {attempt}: exit {code}\n{crashing.output()}"
    assert Journal(Store(data).journal_path).read().state == "checking"
    restarted = time.time()
    third = AgentProcess(config, data)
    try:
        third.url()
        status = lab.watcher.wait_status(
            lambda s: s.online and s.ts >= restarted and s.state in ("committed", "rolled_back"),
            what="the status after the second crash in checking",
        )
        assert status.state == "rolled_back"
        assert status.active is not None and status.active.sha256 == sha_of(lab.bundles.v1)
        lab.watcher.wait(
            lambda: any(
                e.kind == "rolled_back" and e.ts >= restarted and "checking" in (e.reason or "")
                for e in lab.watcher.events
            ),
            timeout=30,
            what="a rolled_back event naming the state",
        )
        store = Store(data)
        assert store.is_bad(sha_of(lab.bundles.v2), sequence=1)
        assert Journal(store.journal_path).read().state == "rolled_back"
    finally:
        assert third.stop() == 0, third.output()


def _batch2_traffic(url: str, stop: threading.Event) -> None:
    """Requests of batch 2: the batch1 model fails every one of them (runtime errors)."""
    x = np.concatenate(sample_inputs(2, seed=5))
    while not stop.is_set():
        with contextlib.suppress(OSError, ValueError, KeyError):
            infer(url, x, timeout=5)
        stop.wait(0.01)


def _lab_config(lab: Lab, name: str, *, probation_s: float) -> tuple[Path, Path]:
    return agent_config(
        lab.root / name,
        lab.keys,
        broker_url=lab.broker.url,
        initial_bundle=lab.bundles.v1,
        probation_s=probation_s,
    )


def test_a_rollback_is_journaled_before_the_bundle_is_marked_bad(lab: Lab) -> None:
    """Issue 13 #3: killed right after probation decided to roll back, the agent restarts
    into the rollback (journal first), never into a probation that commits the bundle."""
    lab.publish(lab.bundles.batch1, "3.0.3")
    config, data = _lab_config(lab, "decided", probation_s=4.0)
    first = AgentProcess(config, data, env={"EDGEKIT_AGENT_CRASH_AT": "rolled_back/decided"})
    stop = threading.Event()
    traffic = threading.Thread(target=_batch2_traffic, args=(first.url(), stop), daemon=True)
    traffic.start()
    try:
        code = first.wait_exit(60)
    finally:
        stop.set()
        traffic.join(10)
    assert code == -signal.SIGKILL, first.output()
    store = Store(data)
    record = Journal(store.journal_path).read()
    assert record.state == "rolled_back" and "error ratio" in (record.reason or "")
    assert store.is_bad(sha_of(lab.bundles.batch1), sequence=1) is None  # not yet marked
    restarted = time.time()
    second = AgentProcess(config, data)  # no traffic: a resumed probation would commit
    try:
        second.url()
        status = lab.watcher.wait_status(
            lambda s: s.online and s.ts >= restarted and s.state in ("committed", "rolled_back"),
            what="the status after the restart",
        )
        assert status.state == "rolled_back"
        assert status.active is not None and status.active.sha256 == sha_of(lab.bundles.v1)
        assert store.is_bad(sha_of(lab.bundles.batch1), sequence=1)  # the restart marked it
    finally:
        assert second.stop() == 0, second.output()


def test_a_bad_list_entry_for_the_update_is_a_decided_rollback(lab: Lab) -> None:
    """The state an agent that marked the bundle bad before journaling leaves behind: the
    journal still in probation, bad.json naming the bundle and sequence. On restart the
    rollback is finished; a resumed probation without traffic would commit the bad bundle."""
    lab.publish(lab.bundles.v2, "2.0.0")
    config, data = _lab_config(lab, "crafted", probation_s=0.5)
    first = AgentProcess(config, data)
    try:
        first.url()
        lab.watcher.wait_status(
            lambda s: s.last_sequence >= 1 and s.state == "committed", what="v2 committed"
        )
    finally:
        assert first.stop() == 0, first.output()
    store = Store(data)
    record = Journal(store.journal_path).read()
    assert record.slot is not None and store.pointer().active == record.slot
    Journal(store.journal_path).write(record.advance("probation", probation_restarts=0))
    store.mark_bad(sha_of(lab.bundles.v2), sequence=1, reason="runtime error ratio 1.000")
    restarted = time.time()
    second = AgentProcess(config, data)
    try:
        second.url()
        status = lab.watcher.wait_status(
            lambda s: s.online and s.ts >= restarted and s.state in ("committed", "rolled_back"),
            what="the status after the restart",
        )
        assert status.state == "rolled_back", status
        assert status.active is not None and status.active.sha256 == sha_of(lab.bundles.v1)
        assert Journal(store.journal_path).read().state == "rolled_back"
    finally:
        assert second.stop() == 0, second.output()
