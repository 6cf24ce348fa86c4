"""Device profiles: the built-in ones load, invalid ones name the field, users add their own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekit.cli import main
from edgekit.errors import ProfileError
from edgekit.profiles import builtin_profile_names, load_profile

REQUIRED = {
    "raspberrypi",
    "raspberrypi-tflite",
    "raspberrypi-zero2",
    "jetson-orin",
    "coral-edgetpu",
    "x86-64",
    "android-arm64",
    "cortex-m",
}


def test_builtin_profiles_load() -> None:
    names = set(builtin_profile_names())
    assert names >= REQUIRED
    for name in names:
        profile = load_profile(name)
        assert profile.name == name
        assert profile.accuracy.min_cosine > 0.9
    assert load_profile("raspberrypi").runtime.oldest.version == "1.16.3"
    assert load_profile("raspberrypi-tflite").runtime.oldest.package == "tflite-runtime"
    assert load_profile("coral-edgetpu").quantization.io_type == "uint8"
    assert load_profile("cortex-m").budgets.max_model_bytes == 1048576


def test_user_profile_extends_builtin(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("extends: raspberrypi\nname: mine\nthreads: 2\naccuracy: {min_cosine: 0.95}\n")
    profile = load_profile(str(path))
    assert (profile.name, profile.threads, profile.accuracy.min_cosine) == ("mine", 2, 0.95)
    # Untouched fields come from the base profile.
    assert (
        profile.accuracy.min_top1_agreement
        == load_profile("raspberrypi").accuracy.min_top1_agreement
    )
    assert profile.source == str(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "extends: raspberrypi\nthreads: many\n",
            r"threads: expected an integer, found str 'many'",
        ),
        (
            "extends: raspberrypi\nquantization: {calibration_method: magic}\n",
            r"quantization.calibration_method: expected one of minmax, entropy, percentile",
        ),
        ("extends: raspberrypi\nbogus: 1\n", r"bogus: unknown field"),
        (
            "extends: raspberrypi\npruning: {sparsity: 1.5}\n",
            r"pruning.sparsity: expected a fraction",
        ),
        ("name: x\ndescription: y\ntarget_format: onnx\n", r"runtime: required field is missing"),
        (
            "extends: raspberrypi\n"
            "runtime: {oldest: {package: tflite-runtime, version: '2.14.0'}}\n",
            r"runtime.oldest.package: tflite-runtime does not run onnx models",
        ),
        (
            "extends: raspberrypi\nquantization: {candidates: [full_int8]}\n",
            r"quantization.candidates: full_int8 cannot target onnx",
        ),
        (
            # A superscript two passes str.isdigit but is no version number.
            "extends: raspberrypi\n"
            "runtime: {oldest: {package: onnxruntime, version: '1.\u00b2.0'}}\n",
            r"runtime.oldest.version: expected a version like 1.16.3",
        ),
        ("extends: raspberrypi\ncpu: max\n", r"cpu\[0\]: QEMU's `max` CPU is no device"),
        (
            "extends: raspberrypi\ncpu: [cortex-a72, cortex-a9]\n",
            r"cpu\[1\]: expected an aarch64 CPU model edgekit can emulate \(cortex-a35, ",
        ),
        ("extends: raspberrypi\ncpu: [cortex-a72, cortex-a72]\n", r"cpu: names a CPU twice"),
        ("extends: cortex-m\ncpu: cortex-a53\n", r"cpu\[0\]: .*none known for this arch"),
        (
            "extends: android-arm64\nquantization: {candidates: [fp32, pruned]}\n",
            r"quantization.candidates: pruned needs pruning.sparsity in \(0, 1\)",
        ),
        ("- just\n- a list\n", r"expected a mapping of profile fields"),
        ("extends: raspberrypi\nthreads: [\n", r"not valid YAML"),
    ],
)
def test_invalid_profile_names_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(str(path))
    assert str(path) in str(info.value)


def test_unknown_profile_lists_the_builtin_ones() -> None:
    with pytest.raises(ProfileError, match=r"unknown profile 'raspberry'.*raspberrypi"):
        load_profile("raspberry")
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile("./nowhere.yaml")


def test_profiles_cli() -> None:
    runner = CliRunner()
    listed = runner.invoke(main, ["profiles", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert {p["name"] for p in json.loads(listed.output)} >= REQUIRED
    shown = runner.invoke(main, ["profiles", "show", "jetson-orin", "--json"])
    assert shown.exit_code == 0
    assert json.loads(shown.output)["quantization"]["candidates"] == ["fp32", "fp16"]
    table = runner.invoke(main, ["profiles", "list"])
    assert "raspberrypi-zero2" in table.output
    missing = runner.invoke(main, ["profiles", "show", "nope"])
    assert missing.exit_code == 2
    assert "unknown profile 'nope'" in missing.output
