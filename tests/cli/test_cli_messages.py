"""Help texts and one-line errors a newcomer meets first (issue 14 item 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from edgekit.cli import main
from edgekit.errors import EdgekitError
from edgekit.fleet.cohorts import CohortError, parse_percent
from edgekit.profiles import load_profile

PASSPHRASE_VARIABLE = "EDGEKIT_KEY_PASSPHRASE"


def _commands(command: click.Command, path: str = "edgekit") -> list[tuple[str, click.Command]]:
    found = [(path, command)]
    if isinstance(command, click.Group):
        context = click.Context(command)
        for name in command.list_commands(context):
            sub = command.get_command(context, name)
            assert sub is not None
            found += _commands(sub, f"{path} {name}")
    return found


def _help(path: str, command: click.Command) -> str:
    return command.get_help(click.Context(command, info_name=path))


def test_every_command_that_uses_a_private_key_says_where_its_passphrase_comes_from() -> None:
    signing = [
        (path, command)
        for path, command in _commands(main)
        if path == "edgekit keys generate"
        or any(
            {"--key", "--sign"} & set(param.opts)
            for param in command.params
            if isinstance(param, click.Option)
        )
    ]
    assert len(signing) >= 9  # keys generate, trust init/sign, bundle build/sign, convert, fleet
    undocumented = [
        path for path, command in signing if PASSPHRASE_VARIABLE not in _help(path, command)
    ]
    assert undocumented == []


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.txt").write_text("a model, not a trust store\n")
    (tmp_path / "b.ekb").write_bytes(b"not really a bundle")
    return tmp_path / "home"


def _run(home: Path, *args: str) -> Result:
    runner = CliRunner(env={"EDGEKIT_HOME": str(home), PASSPHRASE_VARIABLE: "pw"})
    return runner.invoke(main, list(args))


def test_keys_generate_without_a_terminal_or_the_variable_is_one_line_and_exit_2(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != PASSPHRASE_VARIABLE}
    env["EDGEKIT_HOME"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "edgekit", "keys", "generate", "ops"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
        text=True,
        env=env,
        start_new_session=True,  # no controlling terminal for getpass to open
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == (
        "error: no passphrase for key 'ops': set EDGEKIT_KEY_PASSPHRASE (there is no terminal "
        "to ask on)\n"
    )
    assert "Aborted" not in done.stdout + done.stderr
    assert not (tmp_path / "keys" / "ops.key").exists()


def test_a_bare_canary_number_asks_whether_a_percentage_was_meant(home: Path) -> None:
    result = _run(home, "fleet", "rollout", "b.ekb", "--fleet", "f", "--canary", "5")
    assert result.exit_code == 2
    assert "error: --canary 5: did you mean 5%?" in result.output
    for bare in ("5", "1", "100"):
        with pytest.raises(CohortError, match=f"did you mean {bare}%"):
            parse_percent(bare, what="--canary")
    assert parse_percent("0.05", what="--canary") == pytest.approx(0.05)
    assert parse_percent("5%", what="--canary") == pytest.approx(0.05)


def test_a_missing_bundle_is_not_found(home: Path) -> None:
    result = _run(home, "fleet", "rollout", "nothere.ekb", "--fleet", "f", "--key", "ops")
    assert result.exit_code == 2
    assert result.output == (
        "error: bundle nothere.ekb not found: give the .ekb files to roll out\n"
    )


@pytest.mark.parametrize(
    "args",
    [
        ("bundle", "verify", "b.ekb", "--trust", "model.txt"),
        ("bundle", "inspect", "b.ekb", "--trust", "model.txt"),
        ("fleet", "rollout", "b.ekb", "--fleet", "f", "--trust", "model.txt"),
        ("fleet", "simulate", "--fleet", "f", "--trust", "model.txt", "--duration", "0"),
        ("verify-runtime", "b.ekb", "--profile", "x86-64", "--trust", "model.txt"),
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_a_trust_option_naming_a_file_that_is_no_trust_store_names_it(
    home: Path, args: tuple[str, ...]
) -> None:
    result = _run(home, *args)
    assert result.exit_code == 2, result.output
    last = result.output.splitlines()[-1]
    assert last.startswith("error: model.txt is not a trust store ("), result.output
    assert "edgekit trust init" in last


def test_a_model_of_the_wrong_format_is_named_with_its_article(tmp_path: Path) -> None:
    from edgekit.verify_runtime import _check_format

    with pytest.raises(EdgekitError) as info:
        _check_format(tmp_path / "m.onnx", load_profile("raspberrypi-tflite"))
    assert "m.onnx is an ONNX model but profile raspberrypi-tflite runs TFLite models" in str(
        info.value
    )
    with pytest.raises(EdgekitError, match=r"m\.tflite is a TFLite model but profile x86-64 runs "):
        _check_format(tmp_path / "m.tflite", load_profile("x86-64"))


@pytest.mark.parametrize("path", ["edgekit verify-runtime", "edgekit convert"])
def test_help_says_the_runtime_cache_moves_under_edgekit_home(path: str) -> None:
    command = dict(_commands(main))[path]
    text = " ".join(_help(path, command).split())
    assert "$EDGEKIT_HOME/runtimes when EDGEKIT_HOME is set" in text
