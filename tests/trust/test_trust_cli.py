"""`edgekit keys|trust|bundle` through click's CliRunner (the groups invoked directly).

Each group reports a library error as one `error: ...` line and exit code 2; `error_of`
finds the `EdgekitError` behind that exit, to check its type.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from edgekit.cli.bundle import bundle_group
from edgekit.cli.keys import keys_group
from edgekit.cli.trust import trust_group
from edgekit.trust import (
    RotationError,
    load_truststore,
    update_truststore,
)


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.chdir(tmp_path)
    return CliRunner(
        env={"EDGEKIT_HOME": str(tmp_path / "home"), "EDGEKIT_KEY_PASSPHRASE": "passphrase"}
    )


def run(runner: CliRunner, group: click.Group, *args: str | Path, ok: bool = True) -> Result:
    result = runner.invoke(group, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    else:
        assert result.exit_code == 2, result.output
    return result


def error_of(result: Result) -> str:
    """The one `error: ...` line a failed command printed."""
    return result.output.splitlines()[-1]


def test_keys_generate_list_export(runner: CliRunner, tmp_path: Path) -> None:
    created = run(runner, keys_group, "generate", "release")
    assert "generated key release" in created.output
    listed = json.loads(run(runner, keys_group, "list", "--json").output)
    assert [(k["name"], k["has_private"]) for k in listed] == [("release", True)]
    assert len(listed[0]["keyid"]) == 64
    pem = run(runner, keys_group, "export-public", "release").output
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert pem == (tmp_path / "home" / "keys" / "release.pub").read_text()
    table = run(runner, keys_group, "list").output
    assert "release" in table
    duplicate = run(runner, keys_group, "generate", "release", ok=False)
    assert "key 'release' already exists" in error_of(duplicate)


def test_a_passphrase_piped_in_without_a_terminal(tmp_path: Path) -> None:
    runner = CliRunner(env={"EDGEKIT_HOME": str(tmp_path), "EDGEKIT_KEY_PASSPHRASE": ""})
    result = runner.invoke(keys_group, ["generate", "k"], input="pw1\n")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "keys" / "k.key").exists()
    assert "Repeat" not in result.output  # nobody to confirm with
    nothing = runner.invoke(keys_group, ["generate", "k2"], input="")
    assert nothing.exit_code == 2
    assert nothing.output.endswith(
        "error: no passphrase for key 'k2': set EDGEKIT_KEY_PASSPHRASE (there is no terminal "
        "to ask on)\n"
    )


@pytest.fixture
def fleet_keys(runner: CliRunner) -> None:
    for name in ("root1", "root2", "release", "release2", "controller"):
        run(runner, keys_group, "generate", name)


def test_build_sign_verify_inspect(
    runner: CliRunner, tmp_path: Path, model_dir: Path, fleet_keys: None
) -> None:
    run(
        runner,
        trust_group,
        "init",
        "--root-key",
        "root1",
        "--bundles-key",
        "release",
        "--bundles-key",
        "release2",
        "--bundles-threshold",
        "2",
        "--directives-key",
        "controller",
        "-o",
        "truststore.json",
    )
    store = load_truststore((tmp_path / "truststore.json").read_bytes())
    assert store.roles["bundles"].threshold == 2

    built = run(
        runner,
        bundle_group,
        "build",
        model_dir,
        "--name",
        "digits",
        "--version",
        "1.0.0",
        "--security-epoch",
        "1",
        "-o",
        "dist",
        "--sign",
        "release",
        "--created",
        "2025-01-31T12:00:00Z",
    )
    bundle = tmp_path / "dist" / "digits-1.0.0-raspberrypi.ekb"
    assert str(bundle.name) in built.output

    # Local keyring (threshold 1): valid. Trust store (2 of 2 bundle keys): not yet.
    assert "valid" in run(runner, bundle_group, "verify", bundle).output
    below = run(runner, bundle_group, "verify", bundle, "--trust", "truststore.json", ok=False)
    assert "required by role 'bundles'" in error_of(below)
    assert "1 valid signature(s) from trusted keys, 2 required" in error_of(below)

    run(runner, bundle_group, "sign", bundle, "--key", "release2")
    verified = json.loads(
        run(runner, bundle_group, "verify", bundle, "--trust", "truststore.json", "--json").output
    )
    assert verified["valid"] is True
    assert verified["manifest"]["security_epoch"] == 1
    assert len(verified["signed_by"]) == 2

    floor = run(
        runner,
        bundle_group,
        "verify",
        bundle,
        "--trust",
        "truststore.json",
        "--min-security-epoch",
        "2",
        ok=False,
    )
    assert "below the device's floor 2" in error_of(floor)

    extracted = tmp_path / "slot"
    run(
        runner, bundle_group, "verify", bundle, "--trust", "truststore.json", "--extract", extracted
    )
    assert (extracted / "model.onnx").read_bytes() == (model_dir / "model.onnx").read_bytes()

    inspected = json.loads(
        run(runner, bundle_group, "inspect", bundle, "--trust", "truststore.json", "--json").output
    )
    assert inspected["manifest"]["name"] == "digits"
    assert {s["local_key"] for s in inspected["signatures"]} == {"release", "release2"}
    assert all(s["valid"] is True for s in inspected["signatures"])
    assert all(s["truststore_roles"] == ["bundles"] for s in inspected["signatures"])
    table = run(runner, bundle_group, "inspect", bundle).output
    assert "model.onnx" in table
    assert "release2" in table

    data = bytearray(bundle.read_bytes())
    data[-2000] ^= 1
    bundle.write_bytes(bytes(data))
    tampered = run(runner, bundle_group, "verify", bundle, "--trust", "truststore.json", ok=False)
    assert "the bundle was altered" in error_of(tampered)


def test_unsigned_and_untrusted_bundles_fail_verify(
    runner: CliRunner, tmp_path: Path, model_dir: Path, fleet_keys: None
) -> None:
    run(
        runner,
        trust_group,
        "init",
        "--root-key",
        "root1",
        "--bundles-key",
        "release",
        "--directives-key",
        "controller",
    )
    run(runner, bundle_group, "build", model_dir, "--name", "digits", "--version", "1.0.0")
    bundle = tmp_path / "digits-1.0.0-raspberrypi.ekb"
    unsigned = run(runner, bundle_group, "verify", bundle, ok=False)
    assert "envelope carries no signatures" in error_of(unsigned)
    run(runner, bundle_group, "sign", bundle, "--key", "root2")
    run(runner, bundle_group, "verify", bundle)  # root2 is a local key
    untrusted = run(runner, bundle_group, "verify", bundle, "--trust", "truststore.json", ok=False)
    assert "by keys the role does not trust" in error_of(untrusted)


def test_build_from_files_needs_a_profile(
    runner: CliRunner, tmp_path: Path, model_dir: Path
) -> None:
    model = model_dir / "model.onnx"
    failed = run(
        runner, bundle_group, "build", model, "--name", "m", "--version", "1.0.0", ok=False
    )
    assert "--profile" in error_of(failed)
    run(
        runner,
        bundle_group,
        "build",
        model,
        model_dir / "golden.npz",
        "--name",
        "m",
        "--version",
        "1.0.0",
        "--profile",
        "x86-64",
    )
    assert (tmp_path / "m-1.0.0-x86-64.ekb").exists()


def test_rotation_through_the_cli(runner: CliRunner, tmp_path: Path, fleet_keys: None) -> None:
    run(
        runner,
        trust_group,
        "init",
        "--root-key",
        "root1",
        "--bundles-key",
        "release",
        "--directives-key",
        "controller",
        "-o",
        "v1.json",
    )
    again = run(
        runner,
        trust_group,
        "init",
        "--root-key",
        "root1",
        "--bundles-key",
        "release",
        "--directives-key",
        "controller",
        "-o",
        "v1.json",
        ok=False,
    )
    assert "exists" in again.output

    # Edits of a signed store start an unsigned draft of version 2; further edits stay in it.
    added = run(
        runner, trust_group, "add-key", "root", "root2", "--store", "v1.json", "-o", "v2.json"
    )
    assert "draft version 2" in added.output
    run(runner, trust_group, "remove-key", "root", "root1", "--store", "v2.json")
    run(runner, trust_group, "add-key", "bundles", "release2", "--store", "v2.json")
    run(runner, trust_group, "remove-key", "bundles", "release", "--store", "v2.json")
    v1 = load_truststore((tmp_path / "v1.json").read_bytes())
    v2_bytes = (tmp_path / "v2.json").read_bytes()
    assert load_truststore(v2_bytes, bootstrap=False).version == 2

    # Signed only by the new root: not accepted by devices.
    signed_new = run(
        runner, trust_group, "sign", "v2.json", "--key", "root2", "--previous", "v1.json"
    )
    assert "not yet accepted" in signed_new.output
    with pytest.raises(RotationError, match="old root"):
        update_truststore(v1, (tmp_path / "v2.json").read_bytes())
    # Plus the old root: accepted.
    signed_both = run(
        runner, trust_group, "sign", "v2.json", "--key", "root1", "--previous", "v1.json"
    )
    assert "devices will accept it" in signed_both.output
    v2 = update_truststore(v1, (tmp_path / "v2.json").read_bytes())
    assert len(v2.roles["root"].keyids) == 1
    assert v2.roles["root"].keyids != v1.roles["root"].keyids

    shown = json.loads(
        run(runner, trust_group, "show", "v2.json", "--previous", "v1.json", "--json").output
    )
    assert shown["version"] == 2
    assert shown["rotation"] == "valid successor of version 1"
    assert {s["name"] for s in shown["signatures"]} == {"root1", "root2"}
    assert "root" in run(runner, trust_group, "show", "v2.json").output

    # A key that is no root key cannot sign a trust store.
    refused = run(runner, trust_group, "sign", "v2.json", "--key", "release", ok=False)
    assert "not a root key" in error_of(refused)


def test_a_write_cut_short_leaves_the_trust_store_intact(runner: CliRunner, tmp_path: Path) -> None:
    """Issue 13 #7: `edgekit trust sign` whose write is cut short (a file size limit below
    the new file's size stops it part way, as a full disk or a kill would) leaves the old
    trust store whole, with the signatures it had collected; the error is one line."""
    import resource
    import subprocess
    import sys

    for name in ("root1", "root2", "release", "controller"):
        run(runner, keys_group, "generate", name)
    store = tmp_path / "truststore.json"
    run(
        runner,
        trust_group,
        *("init", "--root-key", "root1", "--root-key", "root2", "--root-threshold", "2"),
        *("--bundles-key", "release", "--directives-key", "controller", "--sign", "root1"),
        *("-o", store),
    )
    before = store.read_bytes()
    assert len(json.loads(before)["signatures"]) == 1  # one of two root signatures collected

    def limit() -> None:
        # Larger than nothing, smaller than the signed file: the write stops part way.
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))

    done = subprocess.run(
        [sys.executable, "-m", "edgekit", "trust", "sign", str(store), "--key", "root2"],
        # No bytecode cache: the limit would cut those writes short too.
        env={k: v for k, v in runner.env.items() if v is not None}
        | {"PYTHONDONTWRITEBYTECODE": "1"},
        cwd=tmp_path,
        preexec_fn=limit,
        capture_output=True,
        check=False,
    )
    assert store.read_bytes() == before  # the old file, whole: not 200 unparseable bytes
    assert done.returncode == 2, done.stderr
    message = done.stderr.decode().strip()
    assert message.startswith("error: cannot write") and "unchanged" in message, message
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # Once the limit is gone, signing works and the store becomes valid.
    run(runner, trust_group, "sign", store, "--key", "root2")
    assert len(load_truststore(store.read_bytes()).roles["root"].keyids) == 2
