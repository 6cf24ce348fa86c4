"""`edgekit fleet status|history|pause|abort` over the rollout database (no broker needed)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from edgekit.cli import main
from edgekit.fleet.store import RolloutStore


def _db(tmp_path: Path) -> Path:
    db = tmp_path / "fleet.db"
    with RolloutStore(db) as store:
        store.create_rollout(
            rollout_id="r-1",
            fleet="plant",
            kind="rollout",
            spec={
                "options": {"strategy": "waves"},
                "release": [{"name": "tiny", "version": "2.0.0", "sha256": "f" * 64}],
            },
            waves=[(0.5, ["a"]), (1.0, ["b"])],
            targets=[
                ("a", "x86-64", 0, "f" * 64, None, "planned"),
                ("b", "x86-64", 1, "f" * 64, None, "planned"),
            ],
        )
        store.release("r-1")  # no controller is driving it
    return db


def test_pause_abort_status_history(tmp_path: Path) -> None:
    db = _db(tmp_path)
    runner = CliRunner()
    paused = runner.invoke(main, ["fleet", "pause", "r-1", "--db", str(db)])
    assert paused.exit_code == 0, paused.output
    status = runner.invoke(main, ["fleet", "status", "--json", "--devices", "--db", str(db)])
    document = json.loads(status.output)
    assert document["state"] == "paused"
    assert document["controller_running"] is False
    assert [d["device"] for d in document["devices"]] == ["a", "b"]

    aborted = runner.invoke(main, ["fleet", "abort", "r-1", "--db", str(db), "--json"])
    assert aborted.exit_code == 0, aborted.output
    history = json.loads(
        runner.invoke(main, ["fleet", "history", "--json", "--db", str(db)]).output
    )
    assert [(h["rollout_id"], h["state"], h["release"]) for h in history] == [
        ("r-1", "aborted", "tiny 2.0.0")
    ]
    again = runner.invoke(main, ["fleet", "pause", "r-1", "--db", str(db)])
    assert again.exit_code == 2
    assert "already aborted" in again.output

    table = runner.invoke(main, ["fleet", "status", "r-1", "--db", str(db)])
    assert table.exit_code == 0
    assert "aborted" in table.output


def test_missing_database_and_rollout_are_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(main, ["fleet", "status", "--db", str(tmp_path / "none.db")])
    assert missing.exit_code == 2
    assert "no rollout database" in missing.output
    assert not (tmp_path / "none.db").exists()
    db = _db(tmp_path)
    unknown = runner.invoke(main, ["fleet", "status", "r-404", "--db", str(db)])
    assert unknown.exit_code == 2
    assert "no rollout 'r-404'" in unknown.output
