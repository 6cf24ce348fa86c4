"""The rollout database: sequences, rollouts, waves, targets, the controller lease."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekit.fleet.store import ReleaseBundle, RolloutStore, StoreError, default_db_path


def _rollout(store: RolloutStore, rollout_id: str = "r-1") -> None:
    store.create_rollout(
        rollout_id=rollout_id,
        fleet="plant",
        kind="rollout",
        spec={"options": {"strategy": "canary"}, "release": []},
        waves=[(0.5, ["a"]), (1.0, ["b"])],
        targets=[
            (
                "a",
                "x86-64",
                0,
                "f" * 64,
                {"name": "m", "version": "1.0.0", "sha256": "e" * 64},
                "planned",
            ),
            ("b", "x86-64", 1, "f" * 64, None, "planned"),
            ("c", "x86-64", -1, "f" * 64, None, "skipped"),
        ],
    )


def test_sequences_increase_and_survive_a_lost_database(tmp_path: Path) -> None:
    with RolloutStore(tmp_path / "one.db") as store:
        first = store.allocate_sequences("plant", 10)
        second = store.allocate_sequences("plant", 1)
        assert second >= first + 10
        assert store.allocate_sequences("other", 1) >= int(time.time() * 1000) - 5000
        # Above what the broker shows, even when that is far ahead.
        assert store.allocate_sequences("plant", 1, at_least=second + 10**9) == second + 10**9 + 1
    # The operator lost the database: a fresh one still issues sequences above the old ones
    # (the clock in milliseconds), so devices accept its directives.
    with RolloutStore(tmp_path / "fresh.db") as fresh:
        assert fresh.allocate_sequences("plant", 1) > first


def test_rollout_roundtrip(rollout_store: RolloutStore) -> None:
    _rollout(rollout_store)
    record = rollout_store.rollout("r-1")
    assert (record.state, record.current_wave, record.fleet) == ("running", 0, "plant")
    assert record.spec["options"]["strategy"] == "canary"
    assert [w.fraction for w in rollout_store.waves("r-1")] == [0.5, 1.0]
    targets = {t.device: t for t in rollout_store.targets("r-1")}
    assert targets["a"].previous == {"name": "m", "version": "1.0.0", "sha256": "e" * 64}
    assert targets["c"].outcome == "skipped"
    rollout_store.record_directives("r-1", [("a", 7, b"envelope")], start_wave=0)
    rollout_store.set_outcomes("r-1", [("a", "succeeded", None)])
    (a,) = rollout_store.targets("r-1", wave=0)
    assert (a.sequence, a.envelope, a.outcome) == (7, b"envelope", "succeeded")
    assert rollout_store.waves("r-1")[0].state == "active"
    rollout_store.begin_revert(
        "r-1", reason="gate", then="halted", directives=[("a", 8, b"back")], unrevertable=[]
    )
    (a,) = rollout_store.targets("r-1", wave=0)
    assert (a.revert_sequence, a.revert_envelope, a.outcome) == (8, b"back", "reverting")
    assert rollout_store.rollout("r-1").after_revert == "halted"
    rollout_store.set_state("r-1", "halted", reason="gate")
    assert rollout_store.rollout("r-1").terminal
    with pytest.raises(StoreError, match="already halted"):
        rollout_store.request("r-1", "pause")
    with pytest.raises(StoreError, match="already exists"):
        _rollout(rollout_store)
    with pytest.raises(StoreError, match="no rollout"):
        rollout_store.rollout("r-nope")


def test_requests_are_taken_once(rollout_store: RolloutStore) -> None:
    _rollout(rollout_store)
    rollout_store.request("r-1", "pause")
    assert rollout_store.take_request("r-1") == "pause"
    assert rollout_store.take_request("r-1") is None


def test_bundles_by_version(rollout_store: RolloutStore) -> None:
    for profile, sha in (("x86-64", "a" * 64), ("raspberrypi", "b" * 64)):
        rollout_store.record_bundle(
            ReleaseBundle(
                sha, "m", "1.0.0", profile, 10, 0, sources=({"kind": "mqtt", "topic_prefix": "p"},)
            )
        )
    found = rollout_store.bundles_by_version("1.0.0")
    assert [b.profile for b in found] == ["raspberrypi", "x86-64"]
    assert found[0].sources == ({"kind": "mqtt", "topic_prefix": "p"},)
    assert rollout_store.bundles_by_version("2.0.0") == []


def test_a_live_controller_holds_the_rollout(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    with RolloutStore(db) as store:
        _rollout(store)  # created by this process, which holds it until released
        assert store.controller_alive("r-1")
        store.release("r-1")
    # Another process claims it and stays alive: this one is refused.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from edgekit.fleet.store import RolloutStore; "
            f"s = RolloutStore(__import__('pathlib').Path({str(db)!r})); s.claim('r-1'); "
            "print('claimed', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"claimed"
        with RolloutStore(db) as store:
            assert store.controller_alive("r-1")
            with pytest.raises(StoreError, match="being driven by"):
                store.claim("r-1")
    finally:
        holder.kill()
        holder.wait()
    # Killed: its lease is dead at once (same host, pid gone), so a new controller takes over.
    with RolloutStore(db) as store:
        assert not store.controller_alive("r-1")
        store.claim("r-1")
        assert store.controller_alive("r-1")


def test_default_path_follows_edgekit_home(tmp_path: Path) -> None:
    assert default_db_path({"EDGEKIT_HOME": str(tmp_path)}) == tmp_path / "fleet.db"


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    with RolloutStore(db) as store:
        store._db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    with pytest.raises(StoreError, match="newer edgekit"):
        RolloutStore(db)
