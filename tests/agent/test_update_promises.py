"""The updater keeps its promises (issue 13): shadow mode is not fooled by NaN inputs, a
bundle may name its files anything (the slot's bookkeeping lives beside them), the bundle is
verified once per install, and the verified directive is passed on, not re-parsed.

Real store, journal, trust store, ModelHost and onnxruntime, in process.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from edgekit.agent.serving import allclose_comparison

from edgekit.bundle import verify as bundle_verify
from edgekit.trust import directive as trust_directive
from tests.agent.agent_helpers import (
    FEATURES,
    INPUT,
    Keys,
    directive_for,
    linear_model,
    make_bundle,
    sample_inputs,
    sha_of,
)
from tests.agent.conftest import Bundles, Device, MakeDevice, serves


def _known(device: Device, *bundles: Path) -> None:
    """Let the device's local fetcher hand out these bundles too."""
    for bundle in bundles:
        device.fetcher.files[sha_of(bundle)] = bundle


def test_equal_non_finite_outputs_agree() -> None:
    compare = allclose_comparison(rtol=0.01, atol=0.01)
    nan = np.array([[np.nan, 0.5, np.inf, -np.inf]], np.float32)
    assert compare({"y": nan}, {"y": nan.copy()})
    assert not compare({"y": nan}, {"y": np.array([[0.1, 0.5, np.inf, -np.inf]], np.float32)})
    assert not compare({"y": nan}, {"y": np.array([[np.nan, 0.5, -np.inf, -np.inf]], np.float32)})
    assert not compare({"y": np.zeros((1, 4), np.float32)}, {"y": nan})


def test_nan_inputs_do_not_fake_a_shadow_disagreement(
    make_device: MakeDevice, agent_keys: Keys, bundles: Bundles, tmp_path: Path
) -> None:
    """Identical models (v2 and a re-release of it), 2 % of requests with a NaN input:
    both answer NaN for those, which is agreement; the update commits."""
    twin = make_bundle(
        tmp_path, agent_keys, version="2.0.1", model=lambda p: linear_model(p, seed=2)
    )
    device = make_device(
        probation_s=2.0,
        extra_update="shadow = true\nshadow_agreement = 0.99\nmin_probation_requests = 50",
    )
    _known(device, twin)
    device.process(directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0"))
    assert serves(device, bundles.v2)
    done = threading.Event()
    sent = [0]

    def traffic() -> None:
        rng = np.random.default_rng(13)
        while not done.is_set():
            x = rng.normal(size=(1, FEATURES)).astype(np.float32)
            if sent[0] % 50 == 0:
                x[0, 3] = np.nan  # 2 % of requests
            device.host.infer({INPUT: x})
            sent[0] += 1
            time.sleep(0.002)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        device.process(directive_for(twin, agent_keys, sequence=2, version="2.0.1"))
    finally:
        done.set()
        thread.join(10)
    assert device.updater.record.state == "committed", device.recorder.of("rolled_back")
    assert serves(device, twin)
    probation = [e for e in device.recorder.of("state") if e.state == "probation"][-1]
    assert probation.details["shadow"] is True
    assert sent[0] >= 100  # NaN requests were among those compared


def test_bundle_files_may_be_named_like_the_slot_bookkeeping(
    make_device: MakeDevice, agent_keys: Keys, tmp_path: Path
) -> None:
    """`slot.json`, `slot.envelope.json` (what the slot's bookkeeping was called) and `bundle`
    (the folder it uses now) are just files of a bundle."""
    odd = make_bundle(
        tmp_path, agent_keys, version="6.0.0", model=lambda p: linear_model(p, seed=6)
    )
    names = {
        "slot.json": b'{"not": "a record"}',
        "slot.envelope.json": b"{}",
        "bundle": b"x",
    }
    odd = _with_files(tmp_path, agent_keys, odd, names)
    device = make_device()
    _known(device, odd)
    device.process(directive_for(odd, agent_keys, sequence=1, version="6.0.0"))
    assert device.updater.record.state == "committed", device.recorder.of("rolled_back")
    assert serves(device, odd)
    slot = device.store.verify_slot(device.store.pointer().active or "")
    assert {entry.path for entry in slot.files} >= set(names)
    for name, data in names.items():
        assert (slot.directory / name).read_bytes() == data
    # A restart re-reads the slot from disk: still intact, still serving.
    again = make_device()
    assert serves(again, odd)
    x = sample_inputs(1)[0]
    assert again.host.infer({INPUT: x})["y"].shape == (1, 4)


def _with_files(workdir: Path, keys: Keys, bundle: Path, extra: dict[str, bytes]) -> Path:
    """`bundle` rebuilt with extra files (role other), same name, version and signer."""
    from edgekit.bundle import BundleInput, build_bundle, extract_bundle, inspect_bundle

    folder = workdir / "odd-source"
    with bundle.open("rb") as f:
        manifest = inspect_bundle(f).manifest
    with bundle.open("rb") as f:
        extract_bundle(f, folder, trust=_policy(keys))
    for name, data in extra.items():
        (folder / name).write_bytes(data)
    inputs = [BundleInput(e.path, folder / e.path, e.role) for e in manifest.files]
    inputs += [BundleInput(name, folder / name, "other") for name in extra]
    out = workdir / "odd.ekb"
    return build_bundle(
        sorted(inputs, key=lambda i: i.path),
        out_path=out,
        name=manifest.name,
        version=manifest.version,
        security_epoch=manifest.security_epoch,
        profile=manifest.profile,
        signers=[keys.bundles],
        created=manifest.created,
    )


def _policy(keys: Keys) -> object:
    from edgekit.trust import SignaturePolicy

    return SignaturePolicy({keys.bundles.keyid: keys.bundles.public_key}, 1, "bundles")


def test_the_bundle_is_verified_once_per_install_and_the_directive_parsed_once(
    make_device: MakeDevice, agent_keys: Keys, bundles: Bundles, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = make_device()
    envelope = directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0")
    reads: list[str] = []
    parses: list[int] = []
    read_bundle = bundle_verify.read_bundle
    from_payload = trust_directive.Directive.from_payload

    def counting_read(*args: object, **kwargs: object) -> object:
        reads.append("read")
        return read_bundle(*args, **kwargs)  # type: ignore[arg-type]

    def counting_parse(payload: bytes) -> object:
        parses.append(len(payload))
        return from_payload(payload)

    monkeypatch.setattr(bundle_verify, "read_bundle", counting_read)
    monkeypatch.setattr("edgekit.bundle.extract.read_bundle", counting_read)
    monkeypatch.setattr(trust_directive.Directive, "from_payload", staticmethod(counting_parse))
    hashed: list[Path] = []
    verify_slot = device.store.verify_slot
    monkeypatch.setattr(
        device.store, "verify_slot", lambda slot: hashed.append(slot) or verify_slot(slot)
    )
    device.process(envelope)
    assert device.updater.record.state == "committed"
    assert reads == ["read"]  # verified while extracting; no separate pass before or after
    assert hashed == []  # not re-hashed right after its own verification
    assert len(parses) == 1  # verify_directive's parse; the update used that object


def test_a_slot_written_by_an_earlier_agent_still_serves(
    make_device: MakeDevice, agent_keys: Keys, bundles: Bundles
) -> None:
    """Slots installed before the bookkeeping moved beside the bundle (files, `slot.json` and
    `slot.envelope.json` in one folder) are read, re-verified and reused as they are."""
    import json
    import shutil

    device = make_device()
    device.process(directive_for(bundles.v2, agent_keys, sequence=1, version="2.0.0"))
    store = device.store
    for slot in ("a", "b"):  # rewrite both slots in the earlier layout
        folder = store.slot_dir(slot)
        for entry in (folder / "bundle").iterdir():
            shutil.move(entry, folder / entry.name)
        (folder / "bundle").rmdir()
        (folder / "envelope.json").rename(folder / "slot.envelope.json")
        record = json.loads((folder / "slot.json").read_text())
        del record["schema"]
        (folder / "slot.json").write_text(json.dumps(record))
    again = make_device()
    assert serves(again, bundles.v2)
    assert again.store.slot_info("a") is not None
    assert again.store.slot_info("a").directory == again.store.slot_dir("a")  # type: ignore[union-attr]
    # A rollback directive reuses the idle slot: re-verified with its kept signed manifest.
    again.process(directive_for(bundles.v1, agent_keys, sequence=2, version="1.0.0"))
    assert again.updater.record.state == "committed", again.recorder.of("rolled_back")
    assert serves(again, bundles.v1)
    assert again.fetcher.calls == 0  # nothing downloaded: the old slot was reused
