"""The update state machine in process: real store, journal, ModelHost and onnxruntime."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from edgekit.agent.daemon import describe_state
from edgekit.agent.journal import Journal, JournalRecord
from edgekit.agent.serving import ModelHost
from edgekit.agent.store import Pointer

from tests.agent.agent_helpers import (
    DEVICE,
    INPUT,
    Keys,
    directive_for,
    expired_issue_time,
    run_model,
    sample_inputs,
    sha_of,
)
from tests.agent.conftest import Bundles, MakeDevice, serves


def test_initial_bundle_is_installed_and_served(make_device: MakeDevice, bundles: Bundles) -> None:
    device = make_device()
    assert serves(device, bundles.v1)
    x = sample_inputs(1)[0]
    y = device.host.infer({INPUT: x})["y"]
    expected = run_model(device.store.slot_info(device.store.pointer().active).model_path, x)
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    assert device.updater.record.state == "committed"
    assert device.updater.status().active.version == "1.0.0"


def test_update_commits_and_reports_each_transition(
    make_device: MakeDevice, bundles: Bundles, agent_keys: Keys
) -> None:
    device = make_device()
    device.process(directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0"))
    assert serves(device, bundles.v2)
    states = [e.state for e in device.recorder.of("state")]
    assert states == [
        "downloading",
        "verifying",
        "installing",
        "checking",
        "activating",
        "probation",
        "committed",
    ]
    assert "directive_accepted" in device.recorder.kinds()
    health = device.recorder.of("health_check")
    assert health and health[-1].ok is True and "golden_match" in health[-1].details
    status = device.recorder.statuses[-1]
    assert status.state == "committed"
    assert status.active is not None and status.active.sha256 == sha_of(bundles.v2)
    assert status.previous is not None and status.previous.version == "1.0.0"
    assert status.last_sequence == 1 and status.rollout_id == "r1"
    assert Journal(device.store.journal_path).read().state == "committed"


@pytest.mark.parametrize(
    ("attribute", "words"),
    [
        ("perturbed", "golden_match"),
        ("nan", "finite"),
        ("slow", "latency"),
    ],
)
def test_failed_health_check_rolls_back(
    make_device: MakeDevice, bundles: Bundles, agent_keys: Keys, attribute: str, words: str
) -> None:
    device = make_device()
    device.process(directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0"))
    bad = getattr(bundles, attribute)
    version = {"perturbed": "3.0.0", "nan": "3.0.1", "slow": "3.0.2"}[attribute]
    device.process(directive_for(bad, agent_keys, sequence=2, version=version))
    assert serves(device, bundles.v2)
    rolled = device.recorder.of("rolled_back")
    assert rolled and rolled[-1].sequence == 2 and words in (rolled[-1].reason or "")
    status = device.recorder.statuses[-1]
    assert status.state == "rolled_back" and status.last_sequence == 2
    assert status.active is not None and status.active.version == "2.0.0"
    # The bundle it rolled back from is not a bundle to go back to (issue 14, item 7).
    assert status.previous is None or status.previous.sha256 != sha_of(bad)
    assert device.store.is_bad(sha_of(bad), sequence=2)
    # The same directive again (retained re-delivery) is ignored, not retried.
    calls = device.fetcher.calls
    device.process(directive_for(bad, agent_keys, sequence=2, version=version))
    assert device.fetcher.calls == calls


def test_runtime_errors_in_probation_roll_back(
    make_device: MakeDevice, bundles: Bundles, agent_keys: Keys
) -> None:
    device = make_device(probation_s=1.5)
    done = threading.Event()

    def traffic() -> None:
        x = np.concatenate(sample_inputs(2))  # batch 2: the batch1 model fails on it
        while not done.is_set():
            with contextlib.suppress(Exception):  # the host counts the failures
                device.host.infer({INPUT: x})
            time.sleep(0.005)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        device.process(directive_for(bundles.batch1, agent_keys, sequence=1, version="3.0.3"))
    finally:
        done.set()
        thread.join()
    assert serves(device, bundles.v1)
    rolled = device.recorder.of("rolled_back")
    assert rolled and "error ratio" in (rolled[-1].reason or "")
    assert device.store.pointer().active is not None
    assert device.store.slot_info(device.store.pointer().active).bundle.version == "1.0.0"
    # The status names what it runs, not the bundle it rolled back from as `previous`.
    status = device.updater.status()
    assert status.active is not None and status.active.version == "1.0.0"
    assert status.previous is None or status.previous.sha256 != sha_of(bundles.batch1)
    shown = describe_state(device.config)  # `edgekit-agent status`
    assert shown["active"]["version"] == "1.0.0"
    assert shown["previous"] is None or shown["previous"]["sha256"] != sha_of(bundles.batch1)


def test_shadow_disagreement_blocks_promotion(
    make_device: MakeDevice, bundles: Bundles, agent_keys: Keys
) -> None:
    device = make_device(probation_s=1.0, extra_update="shadow = true\nshadow_agreement = 0.95")
    done = threading.Event()

    def traffic() -> None:
        for x in sample_inputs(1000, seed=3):
            if done.is_set():
                return
            device.host.infer({INPUT: x})
            time.sleep(0.005)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        device.process(directive_for(bundles.disagree, agent_keys, sequence=1, version="3.0.4"))
    finally:
        done.set()
        thread.join()
    rolled = device.recorder.of("rolled_back")
    assert rolled and "shadow agreement" in (rolled[-1].reason or "")
    assert serves(device, bundles.v1)


def test_shadow_agreement_allows_promotion(
    make_device: MakeDevice, bundles: Bundles, agent_keys: Keys
) -> None:
    """The positive control of the test above: with no agreement required, shadow mode
    compares and promotes."""
    device = make_device(probation_s=0.5, extra_update="shadow = true\nshadow_agreement = 0.0")
    device.process(directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0"))
    assert serves(device, bundles.v2)


@pytest.mark.parametrize("case", ["forged", "replayed", "expired", "downgrade", "wrong_device"])
def test_bad_directives_are_refused_with_events(
    make_device: MakeDevice, bundles: Bundles, agent_keys: Keys, case: str
) -> None:
    device = make_device()
    device.process(
        directive_for(
            bundles.v4_epoch2, agent_keys, sequence=5, version="4.0.0", min_security_epoch=2
        )
    )
    assert serves(device, bundles.v4_epoch2)
    arguments = {
        "forged": {"sequence": 6, "signer": agent_keys.outsider, "min_security_epoch": 2},
        "replayed": {"sequence": 4, "min_security_epoch": 2},
        "expired": {
            "sequence": 6,
            "issued_at": expired_issue_time(),
            "ttl_s": 60,
            "min_security_epoch": 2,
        },
        "downgrade": {"sequence": 6, "min_security_epoch": 1},
        "wrong_device": {"sequence": 6, "device": "dev-2", "min_security_epoch": 2},
    }[case]
    before = len(device.recorder.events)
    device.process(directive_for(bundles.v2, agent_keys, version="2.0.0", **arguments))
    refused = [e for e in device.recorder.events[before:] if e.kind == "directive_refused"]
    assert len(refused) == 1, device.recorder.events[before:]
    assert refused[0].sequence == arguments["sequence"]
    assert refused[0].reason
    rule = {
        "forged": "Untrusted",
        "replayed": "Replay",
        "expired": "Expired",
        "downgrade": "Epoch",
        "wrong_device": "WrongTarget",
    }[case]
    assert rule in refused[0].details["rule"]
    assert serves(device, bundles.v4_epoch2)
    assert device.store.floor()[0].last_sequence == 5
    assert "state" not in [e.kind for e in device.recorder.events[before:]]


def test_bundle_for_another_profile_is_refused(
    make_device: MakeDevice, bundles: Bundles, agent_keys: Keys
) -> None:
    device = make_device()
    device.process(directive_for(bundles.other_profile, agent_keys, sequence=1, version="3.0.5"))
    refused = device.recorder.of("bundle_refused")
    assert refused and "profile" in (refused[0].reason or "") and refused[0].sequence == 1
    assert device.recorder.statuses[-1].state == "rolled_back"
    assert serves(device, bundles.v1)


def test_bundle_below_the_epoch_floor_is_refused(
    make_device: MakeDevice, bundles: Bundles, agent_keys: Keys
) -> None:
    device = make_device()
    device.process(
        directive_for(
            bundles.v4_epoch2, agent_keys, sequence=1, version="4.0.0", min_security_epoch=2
        )
    )
    # A rollback directive (newer sequence, current epoch) naming a bundle of epoch 0.
    device.process(
        directive_for(bundles.v2, agent_keys, sequence=2, version="2.0.0", min_security_epoch=2)
    )
    refused = device.recorder.of("bundle_refused")
    assert refused and "epoch" in (refused[-1].reason or "").lower()
    assert serves(device, bundles.v4_epoch2)


def test_rollback_directive_to_the_previous_bundle_reuses_its_slot(
    make_device: MakeDevice, bundles: Bundles, agent_keys: Keys
) -> None:
    device = make_device()
    device.process(directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0"))
    calls = device.fetcher.calls
    device.process(directive_for(bundles.v1, agent_keys, sequence=2, version="1.0.0"))
    assert serves(device, bundles.v1)
    assert device.fetcher.calls == calls  # v1 was still installed in the idle slot
    assert device.recorder.statuses[-1].state == "committed"


def test_directive_for_the_active_bundle_commits_at_once(
    make_device: MakeDevice, bundles: Bundles, agent_keys: Keys
) -> None:
    device = make_device()
    device.process(directive_for(bundles.v1, agent_keys, sequence=3, version="1.0.0"))
    status = device.recorder.statuses[-1]
    assert status.state == "committed" and status.last_sequence == 3
    assert status.active is not None and status.active.sha256 == sha_of(bundles.v1)
    assert device.fetcher.calls == 0


def test_download_failure_keeps_serving(
    make_device: MakeDevice, bundles: Bundles, agent_keys: Keys, tmp_path
) -> None:
    device = make_device()
    device.fetcher.files.clear()
    import edgekit.agent.updater as updater_module

    original = updater_module._DOWNLOAD_ATTEMPTS
    updater_module._DOWNLOAD_ATTEMPTS = 1
    try:
        device.process(directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0"))
    finally:
        updater_module._DOWNLOAD_ATTEMPTS = original
    rolled = device.recorder.of("rolled_back")
    assert rolled and "download failed" in (rolled[-1].reason or "")
    assert not device.store.is_bad(sha_of(bundles.v2), sequence=1)  # not the bundle's fault
    assert serves(device, bundles.v1)


def test_corrupt_journal_is_reported_and_the_last_good_modelserves(
    make_device: MakeDevice, bundles: Bundles
) -> None:
    device = make_device()
    device.store.journal_path.write_bytes(b"\x00garbage{")
    again = make_device()  # same data dir, a fresh process
    assert serves(again, bundles.v1)
    errors = again.recorder.of("error")
    assert errors and "journal" in (errors[0].reason or "")


def test_data_dir_removed_while_running_keeps_serving_and_reports(
    make_device: MakeDevice, bundles: Bundles, agent_keys: Keys
) -> None:
    device = make_device()
    shutil.rmtree(device.config.data_dir)
    device.process(directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0"))
    assert serves(device, bundles.v1)  # the model in memory keeps answering
    x = sample_inputs(1)[0]
    assert device.host.infer({INPUT: x})["y"].shape == (1, 4)
    errors = device.recorder.of("error")
    assert errors and "data" in (errors[0].reason or "")
    again = make_device()  # a restart recreates the data dir and installs the factory bundle
    assert again.store.slots_dir.is_dir() and serves(again, bundles.v1)


@pytest.mark.parametrize(
    "state",
    ["downloading", "verifying", "installing", "checking", "activating", "probation"],
)
def test_recovery_finishes_an_interrupted_update(
    make_device: MakeDevice, bundles: Bundles, agent_keys: Keys, state: str
) -> None:
    """A journal left in any state (as a crash would leave it) ends committed on restart."""
    device = make_device()
    envelope = directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0")
    device.process(envelope)  # committed v2 in slot b: use it to craft the crash states
    store = device.store
    journal = Journal(store.journal_path)
    from edgekit.messages import BundleId

    record = JournalRecord(
        state=state,
        sequence=1,
        rollout_id="r1",
        bundle=BundleId("demo", "2.0.0", sha_of(bundles.v2)),
        directive=envelope,
        slot="b",
        previous_slot="a",
    )
    if state != "probation":
        store.set_pointer(Pointer("a", None))
        if state in ("downloading", "verifying", "installing"):
            store.clear_slot("b")
    journal.write(record)
    again = make_device()
    stop = threading.Event()
    thread = threading.Thread(target=again.updater.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and again.updater.record.state not in (
        "committed",
        "rolled_back",
    ):
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=10)
    assert again.updater.record.state == "committed", again.recorder.kinds()
    assert serves(again, bundles.v2)
    assert store.verify_slot(store.pointer().active).bundle.version == "2.0.0"
    assert store.pointer() == Pointer("b", "a")


def test_second_restart_in_probation_rolls_back(
    make_device: MakeDevice, bundles: Bundles, agent_keys: Keys
) -> None:
    device = make_device()
    envelope = directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0")
    device.process(envelope)
    from edgekit.messages import BundleId

    Journal(device.store.journal_path).write(
        JournalRecord(
            state="probation",
            sequence=1,
            rollout_id="r1",
            bundle=BundleId("demo", "2.0.0", sha_of(bundles.v2)),
            directive=envelope,
            slot="b",
            previous_slot="a",
            probation_restarts=1,
        )
    )
    again = make_device()
    assert again.updater.record.state == "rolled_back"
    assert serves(again, bundles.v1)
    assert again.store.is_bad(sha_of(bundles.v2), sequence=1)
    assert DEVICE


def test_a_damaged_active_slot_falls_back_to_the_previous_one(
    make_device: MakeDevice, bundles: Bundles, agent_keys: Keys
) -> None:
    device = make_device()
    device.process(directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0"))
    active = device.store.slot_info(device.store.pointer().active or "a")
    assert active is not None
    with active.model_path.open("r+b") as f:  # flip a byte of the serving model
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ 0xFF]))
    again = make_device()
    assert serves(again, bundles.v1)
    errors = again.recorder.of("error")
    assert errors and "verified hash" in (errors[0].reason or "")


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs (needs root; skipped where mounting is not allowed)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_keeps_serving_and_reports(
    tiny_disk: Path, bundles: Bundles, agent_keys: Keys, tmp_path: Path
) -> None:
    from edgekit.agent.config import load_config
    from edgekit.agent.serving import ModelHost
    from edgekit.agent.store import Store
    from edgekit.agent.updater import Updater

    from edgekit.profiles import load_profile
    from edgekit.trust import load_truststore
    from tests.agent.agent_helpers import write_config, write_truststore
    from tests.agent.conftest import LocalFetcher, Recorder

    truststore = write_truststore(agent_keys, tmp_path / "truststore.json")
    config = load_config(
        write_config(
            tmp_path / "agent.toml",
            data_dir=tiny_disk / "data",
            truststore=truststore,
            initial_bundle=bundles.v1,
        ),
        environ={},
    )
    host = ModelHost("model")
    recorder = Recorder()
    updater = Updater(
        config=config,
        profile=load_profile(config.profile),
        store=Store(config.data_dir),
        trust=load_truststore(truststore.read_bytes()),
        host=host,
        fetcher=LocalFetcher([bundles.v1, bundles.slow, bundles.v2]),
        reporter=recorder,
    )
    updater.start()
    try:
        assert _serves_host(host, bundles.v1)
        filler = tiny_disk / "filler"
        # Fill the disk to the last block.
        with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
        with contextlib.suppress(OSError):
            filler.with_suffix(".2").write_bytes(b"\0" * 4096)
        updater.process(directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0"))
        assert _serves_host(host, bundles.v1)
        x = sample_inputs(1)[0]
        assert host.infer({INPUT: x})["y"].shape == (1, 4)
        reasons = [e.reason or "" for e in recorder.events if e.kind in ("error", "rolled_back")]
        assert any("No space left" in r for r in reasons), recorder.kinds()
        # Space again: a newer directive goes through.
        filler.unlink()
        filler.with_suffix(".2").unlink(missing_ok=True)
        updater.process(directive_for(bundles.v2, agent_keys, sequence=2, version="2.0.0"))
        assert _serves_host(host, bundles.v2)
    finally:
        host.close()


def _serves_host(host: ModelHost, bundle: Path) -> bool:
    return host.bundle is not None and host.bundle.sha256 == sha_of(bundle)


def test_rollback_directive_cannot_reuse_an_idle_slot_below_the_epoch_floor(
    make_device: MakeDevice, bundles: Bundles, agent_keys: Keys
) -> None:
    """Review #1: v1 (epoch 0) stays in the idle slot after an epoch-2 update; a newer
    directive at epoch 2 naming v1 must not bring it back through slot reuse."""
    device = make_device()
    device.process(
        directive_for(
            bundles.v4_epoch2, agent_keys, sequence=1, version="4.0.0", min_security_epoch=2
        )
    )
    assert serves(device, bundles.v4_epoch2)
    assert device.store.floor()[0].min_security_epoch == 2
    device.process(
        directive_for(bundles.v1, agent_keys, sequence=2, version="1.0.0", min_security_epoch=2)
    )
    assert serves(device, bundles.v4_epoch2)
    refused = device.recorder.of("bundle_refused")
    assert refused and refused[-1].sequence == 2 and "epoch" in (refused[-1].reason or "")
    status = device.recorder.statuses[-1]
    assert status.state == "rolled_back"
    assert status.active is not None and status.active.version == "4.0.0"
    assert device.store.pointer().active is not None
    assert device.store.slot_info(device.store.pointer().active).bundle.version == "4.0.0"


def test_directive_for_the_active_bundle_below_its_epoch_is_refused(
    make_device: MakeDevice, bundles: Bundles, agent_keys: Keys
) -> None:
    """Review #1: the "already running it" shortcut checks the directive's epoch too."""
    device = make_device()
    device.process(
        directive_for(bundles.v1, agent_keys, sequence=1, version="1.0.0", min_security_epoch=2)
    )
    refused = device.recorder.of("bundle_refused")
    assert refused and refused[-1].sequence == 1 and "epoch" in (refused[-1].reason or "")
    assert "committed" not in device.recorder.kinds()
    status = device.recorder.statuses[-1]
    assert status.state == "rolled_back" and status.last_sequence == 1
    assert device.store.floor()[0].min_security_epoch == 2
    assert serves(device, bundles.v1)  # nothing else is verified: it keeps serving
    assert device.store.is_bad(sha_of(bundles.v1), sequence=1)


def test_reused_slot_is_reverified_against_the_current_trust_store(
    make_device: MakeDevice, bundles: Bundles, agent_keys: Keys, tmp_path: Path
) -> None:
    """Review #1: a bundle kept in the idle slot whose signing key was removed from the trust
    store since it was installed is not served again by a rollback directive."""
    from edgekit.trust import load_truststore
    from tests.agent.agent_helpers import write_truststore

    device = make_device()
    device.process(directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0"))
    assert serves(device, bundles.v2)
    rotated = Keys(agent_keys.root, agent_keys.outsider, agent_keys.directives, agent_keys.bundles)
    device.updater.trust = load_truststore(
        write_truststore(rotated, tmp_path / "rotated.json").read_bytes()
    )
    calls = device.fetcher.calls
    device.process(directive_for(bundles.v1, agent_keys, sequence=2, version="1.0.0"))
    assert serves(device, bundles.v2)
    refused = device.recorder.of("bundle_refused")
    assert refused and refused[-1].sequence == 2, device.recorder.kinds()
    assert device.fetcher.calls == calls  # refused from the slot, not re-downloaded
    assert device.recorder.statuses[-1].state == "rolled_back"


def test_restart_in_rolled_back_after_a_download_failure_does_not_mark_the_bundle_bad(
    make_device: MakeDevice, bundles: Bundles, agent_keys: Keys
) -> None:
    """Review #14: finishing a rollback at start must not turn a transport or storage
    failure (mark_bad=False) into a bad bundle."""
    device = make_device()
    device.fetcher.files.clear()
    import edgekit.agent.updater as updater_module

    original = updater_module._DOWNLOAD_ATTEMPTS
    updater_module._DOWNLOAD_ATTEMPTS = 1
    try:
        device.process(directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0"))
    finally:
        updater_module._DOWNLOAD_ATTEMPTS = original
    assert Journal(device.store.journal_path).read().state == "rolled_back"
    assert not device.store.bad_bundles()
    again = make_device()  # a restart while the journal says rolled_back
    assert again.updater.record.state == "rolled_back"
    assert not again.store.bad_bundles()
    assert serves(again, bundles.v1)


def test_oversized_desired_payload_is_dropped_before_queueing(
    make_device: MakeDevice, bundles: Bundles
) -> None:
    """Review #5: a desired payload over the directive envelope limit is never queued."""
    from edgekit.trust import DEFAULT_MAX_ENVELOPE_BYTES

    device = make_device()
    for _ in range(3):
        assert device.updater.submit(b"{" * (DEFAULT_MAX_ENVELOPE_BYTES + 1)) is False
    assert not device.updater.busy
    refused = device.recorder.of("directive_refused")
    assert len(refused) == 3 and refused[0].details["rule"] == "LimitError"
    assert "bytes" in (refused[0].reason or "")
    assert serves(device, bundles.v1)
