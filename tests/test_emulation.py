"""verify-runtime on the device's architecture: the aarch64 builds of the profile's runtimes
under user-mode QEMU (qemu-user-static, installed by scripts/test.sh), one row per runtime
version and CPU, in a real Debian arm64 sysroot with real aarch64 wheels (no mock runtime).

The default tier uses the digits CNN (an emulated run takes seconds); magika and silero run in
the slow tier. The sysroot and environments are cached for the session like the runtime venvs
(EDGEKIT_RUNTIME_CACHE keeps them across sessions).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgekit.converters.examples import DigitsExample

from edgekit.bundle import build_bundle, collect_bundle_inputs
from edgekit.emulation import EmulationCache, cpuinfo_text, find_qemu
from edgekit.profiles import EMULATED_CPUS, RuntimePin, load_profile
from edgekit.trust import Signer
from tests.conftest import MAGIKA, SILERO
from tests.test_verify_runtime import _edgekit

PI_ROWS = {
    ("1.16.3", "cortex-a72"),
    ("1.16.3", "cortex-a76"),
    ("1.32.0", "cortex-a72"),
    ("1.32.0", "cortex-a76"),
}


@pytest.fixture
def env(runtime_cache: Path, tmp_path: Path) -> dict[str, str]:
    environment = {
        **os.environ,
        "EDGEKIT_RUNTIME_CACHE": str(runtime_cache),
        "EDGEKIT_HOME": str(tmp_path / "home"),
    }
    environment.pop("EDGEKIT_EMULATION", None)  # the default: auto
    return environment


def _rows(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(row["version"], row["cpu"]): row for row in report["runtimes"]}


def _golden_folder(model: Path, feeds: list[dict[str, Any]], folder: Path) -> Path:
    """`model.onnx` and a golden.npz whose outputs come from the host's onnxruntime (x86_64):
    the emulated aarch64 runtimes must reproduce them within the profile's tolerance."""
    import onnxruntime as ort

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, folder / "model.onnx")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    tolerance = load_profile("raspberrypi").health_check.to_dict()
    arrays: dict[str, Any] = {"tolerance": np.array(json.dumps(tolerance))}
    for index, feed in enumerate(feeds):
        for name, value in feed.items():
            arrays[f"inputs/{index}/{name}"] = value
        for name, value in zip(names, session.run(None, feed), strict=True):
            arrays[f"outputs/{index}/{name}"] = value
    np.savez_compressed(folder / "golden.npz", **arrays)
    return folder


def _bundle(folder: Path, name: str) -> Path:
    return build_bundle(
        collect_bundle_inputs(folder),
        out_path=folder.parent / f"{name}.ekb",
        name=name,
        version="1.0.0",
        security_epoch=0,
        profile="raspberrypi",
        signers=[Signer.generate()],
    )


@pytest.fixture(scope="session")
def digits_bundle(digits: DigitsExample, tmp_path_factory: pytest.TempPathFactory) -> Path:
    with np.load(digits.validation_path) as validation:
        images = validation["pixels"][:8].astype(np.float32)
    feeds = [{"pixels": images[i : i + 1]} for i in range(len(images))]
    folder = _golden_folder(
        digits.model_path, feeds, tmp_path_factory.mktemp("digits-emulated") / "digits"
    )
    return _bundle(folder, "digits")


# -- profiles and CPUs ------------------------------------------------------------------------


def test_pi_profiles_name_their_cores_and_each_core_has_a_cpuinfo() -> None:
    assert load_profile("raspberrypi").cpu == ("cortex-a72", "cortex-a76")
    assert load_profile("raspberrypi-tflite").cpu == ("cortex-a72", "cortex-a76")
    assert load_profile("raspberrypi-zero2").cpu == ("cortex-a53",)  # `cpu: NAME` is a list of one
    assert load_profile("jetson-orin").cpu == ()  # QEMU 7.2 has no A78: checked on the host
    for cpu in EMULATED_CPUS["aarch64"]:
        text = cpuinfo_text(cpu)
        assert text.count("processor\t:") == 4 and "CPU implementer\t: 0x41" in text
    # The Pi 5's A76 has the dot-product instructions onnxruntime's int8 kernels use; the
    # Pi 4's A72 has none.
    assert "asimddp" in cpuinfo_text("cortex-a76")
    assert "asimddp" not in cpuinfo_text("cortex-a72")


# -- the default tier: the digits CNN on the emulated Pi 4 and Pi 5 ----------------------------


def test_verify_runtime_on_emulated_pi_reports_each_version_and_cpu(
    digits_bundle: Path, env: dict[str, str], runtime_cache: Path
) -> None:
    lists = sorted(Path("/var/lib/apt/lists").glob("*arm64*"))
    done = _edgekit("verify-runtime", digits_bundle, "--profile", "raspberrypi", "--json", env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] is True
    assert report["target"] == {
        "arch": "aarch64",
        "emulated": True,
        "cpus": ["cortex-a72", "cortex-a76"],
    }
    rows = _rows(report)
    assert set(rows) == PI_ROWS
    for (version, cpu), row in rows.items():
        assert row["arch"] == "aarch64" and row["emulated"] is True
        assert row["machine"] == "aarch64"  # the probe's process really ran as aarch64
        assert row["reported_version"] == version  # that release's aarch64 build
        assert row["status"] == "pass" and row["loads"] and row["within_tolerance"] is True
        assert row["samples"] == 4 and row["samples_available"] == 8  # a small emulated set
        assert row["latency_ms"]["source"] == f"emulated:{cpu}"
        assert row["latency_ms"]["p50"] > 0
        assert row["metrics"]["logits"]["top1_agreement"] == 1.0
    assert rows[("1.16.3", "cortex-a72")]["numpy_version"].startswith("1.")
    # Building the arm64 sysroot used a private apt state: the host's lists are untouched.
    assert sorted(Path("/var/lib/apt/lists").glob("*arm64*")) == lists
    cached = [p.name for p in runtime_cache.iterdir()]
    assert any(name.startswith("sysroot-debian-bookworm-arm64-") for name in cached)
    assert not [name for name in cached if ".build-" in name]  # nothing half-built left

    human = _edgekit("verify-runtime", digits_bundle, "-p", "raspberrypi", env=env)
    assert human.returncode == 0, human.stderr
    assert human.stdout.count("aarch64") >= 4
    assert "cortex-a72 (qemu)" in human.stdout and "cortex-a76 (qemu)" in human.stdout
    assert "(emulated)" in human.stdout
    assert "not the device's" in human.stdout
    assert "yes (cached)" in human.stdout  # the second run reuses the environments


def test_emulated_outputs_outside_the_tolerance_fail_per_cpu(
    digits_bundle: Path, env: dict[str, str], tmp_path: Path
) -> None:
    from edgekit.bundle import inspect_bundle

    folder = tmp_path / "wrong"
    folder.mkdir()
    with open(digits_bundle, "rb") as handle:
        for item in inspect_bundle(handle).files:
            handle.seek(item.offset_bytes)
            (folder / item.entry.path).write_bytes(handle.read(item.entry.size_bytes))
    with np.load(folder / "golden.npz") as golden:
        arrays = {key: golden[key] for key in golden.files}
    for key in arrays:
        if key.startswith("outputs/"):
            arrays[key] = arrays[key][:, ::-1].copy()  # other classes win
    np.savez(folder / "golden.npz", **arrays)
    done = _edgekit(
        "verify-runtime", folder / "model.onnx", "-p", "raspberrypi", "--runtime", "newest",
        "--cpu", "cortex-a76", "--json", env=env,
    )  # fmt: skip
    assert done.returncode == 2
    (row,) = json.loads(done.stdout)["runtimes"]
    assert (row["cpu"], row["loads"], row["within_tolerance"]) == ("cortex-a76", True, False)
    assert "onnxruntime 1.32.0 on cortex-a76: outputs outside the golden tolerance" in done.stderr


@pytest.mark.slow
def test_emulation_modes_and_cpu_choice(digits_bundle: Path, env: dict[str, str]) -> None:
    off = _edgekit(
        "verify-runtime", digits_bundle, "-p", "raspberrypi", "--runtime", "newest",
        "--emulation", "off", "--json", env=env,
    )  # fmt: skip
    assert off.returncode == 0, off.stderr
    report = json.loads(off.stdout)
    (row,) = report["runtimes"]
    assert (row["arch"], row["cpu"], row["emulated"]) == ("x86_64", None, False)
    assert row["latency_ms"]["source"] == "host"
    assert any("not the device's" in note and "emulation off" in note for note in report["notes"])

    # A profile that names no CPU cannot be emulated: required, that is an error.
    profile = Path(env["EDGEKIT_HOME"]) / "no-cpu.yaml"
    profile.parent.mkdir(parents=True, exist_ok=True)
    profile.write_text("extends: raspberrypi\nname: pi-no-cpu\ncpu: []\n")
    required = _edgekit(
        "verify-runtime", digits_bundle, "-p", profile, "--emulation", "require", env=env
    )
    assert required.returncode == 2
    assert required.stderr.startswith("error: profile pi-no-cpu names no CPU to emulate")

    wrong_cpu = _edgekit(
        "verify-runtime", digits_bundle, "-p", "raspberrypi", "--cpu", "cortex-a53", env=env
    )
    assert wrong_cpu.returncode == 2
    assert "--cpu cortex-a53: profile raspberrypi names the CPUs cortex-a72, cortex-a76" in (
        wrong_cpu.stderr
    )


@pytest.mark.slow
def test_a_version_without_an_aarch64_wheel_is_not_installed_and_remembered(
    tmp_path: Path,
) -> None:
    from edgekit.verify_runtime import RuntimeInstallError

    cache = EmulationCache(tmp_path / "cache")
    pin = RuntimePin("onnxruntime", "1.10.0")  # wheels for CPython 3.6-3.9 only
    with pytest.raises(RuntimeInstallError, match="cannot be installed for aarch64"):
        cache.runtime(pin)
    leftovers = [p.name for p in cache.root.iterdir() if p.name.startswith((".onnx", "onnx"))]
    assert all(name.endswith(".lock") for name in leftovers), leftovers  # nothing half-built
    # Remembered for the process: no second install attempt.
    with pytest.raises(RuntimeInstallError, match="cannot be installed for aarch64"):
        EmulationCache(tmp_path / "cache").runtime(pin)


def test_qemu_is_found_and_refuses_unknown_arches() -> None:
    from edgekit.emulation import EmulationError

    assert find_qemu("aarch64").name.startswith("qemu-aarch64")
    with pytest.raises(EmulationError, match="cannot emulate armv7em"):
        find_qemu("armv7em")


# -- the slow tier: the shared models, and pip as the installer --------------------------------


@pytest.mark.slow
def test_magika_and_silero_bundles_on_emulated_pi(
    magika_data: tuple[Path, Path],
    silero_data: tuple[Path, Path],
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    with np.load(magika_data[1]) as validation:
        rows = validation["bytes"][:4].astype(np.int32)
    magika = _golden_folder(MAGIKA, [{"bytes": r[None, :]} for r in rows], tmp_path / "magika")
    with np.load(silero_data[1]) as validation:
        chunks = validation["input"][:4].astype(np.float32)
        states = validation["state"][:4].astype(np.float32)
    silero_feeds = [
        {"input": chunks[i], "state": states[i], "sr": np.array(16000, dtype=np.int64)}
        for i in range(len(chunks))
    ]
    silero = _golden_folder(SILERO, silero_feeds, tmp_path / "silero")
    for folder in (magika, silero):
        bundle = _bundle(folder, folder.name)
        done = _edgekit("verify-runtime", bundle, "-p", "raspberrypi", "--json", env=env)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        found = _rows(report)
        assert set(found) == PI_ROWS, folder.name
        for row in found.values():
            assert row["machine"] == "aarch64" and row["status"] == "pass", row
            assert row["latency_ms"]["source"].startswith("emulated:")
            for metrics in row["metrics"].values():
                assert metrics["cosine"] > 0.99


@pytest.mark.slow
def test_pip_builds_the_same_environment_as_uv(tmp_path: Path) -> None:
    cache = EmulationCache(tmp_path / "pip-cache", installer="pip")
    environment = cache.runtime(RuntimePin("onnxruntime", "1.16.3"))
    assert environment.installer == "pip" and environment.created
    done = subprocess.run(
        environment.command(
            ["-I", "-c", "import platform, onnxruntime; print(platform.machine(), "
             "onnxruntime.__version__)"],
            cpu="cortex-a72",
        ),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.split() == ["aarch64", "1.16.3"]


@pytest.mark.slow
def test_convert_verify_runtime_checks_the_winner_on_the_emulated_pi(
    digits: DigitsExample, env: dict[str, str], tmp_path: Path
) -> None:
    profile = tmp_path / "int8.yaml"
    profile.write_text(
        "extends: raspberrypi\nname: pi-int8\ndescription: dynamic int8 only\n"
        "quantization:\n  candidates: [dynamic_int8]\n"
    )
    done = _edgekit(
        "convert", digits.model_path, "-p", profile, "-o", tmp_path / "out",
        "--validation", digits.validation_path, "--verify-runtime", "--json", env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    verified = json.loads(done.stdout)["verify_runtime"]
    assert verified["passed"] is True and verified["target"]["arch"] == "aarch64"
    rows = _rows(verified)
    assert set(rows) == PI_ROWS
    # The int8 kernels that judged the candidate were the device's (aarch64), per CPU.
    assert all(row["machine"] == "aarch64" and row["emulated"] for row in rows.values())
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["verify_runtime"]["target"]["cpus"] == ["cortex-a72", "cortex-a76"]
