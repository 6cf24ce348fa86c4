"""`edgekit verify-runtime` and `convert --verify-runtime` against real runtime versions, each
installed in its own venv from the configured package index (no mock runtime).

The venvs are cached for the session (or across sessions when EDGEKIT_RUNTIME_CACHE names a
folder, as CI can do): the first test to need onnxruntime 1.16.3 pays ~10 s to build it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from edgekit.converters.examples import DigitsExample

from edgekit.bundle import build_bundle, collect_bundle_inputs
from edgekit.profiles import RuntimePin, load_profile
from edgekit.trust import Signer, create_truststore, sign_truststore
from edgekit.verify_runtime import RuntimeCache, RuntimeInstallError, runtime_requirements
from tests.conftest import MAGIKA, require_shared


@pytest.fixture
def env(runtime_cache: Path, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "EDGEKIT_RUNTIME_CACHE": str(runtime_cache),
        "EDGEKIT_HOME": str(tmp_path / "home"),
        "EDGEKIT_KEY_PASSPHRASE": "pw",
        # These tests are about the host venvs; the emulated aarch64 rows have their own tests
        # (tests/test_emulation.py).
        "EDGEKIT_EMULATION": "off",
    }


def _edgekit(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgekit", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )


def _by_version(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["version"]: row for row in report["runtimes"]}


@pytest.fixture(scope="session")
def magika_dir(tmp_path_factory: pytest.TempPathFactory, magika_data: tuple[Path, Path]) -> Path:
    """The shared magika model with a golden.npz of 4 real files, run by the host onnxruntime."""
    import onnxruntime as ort

    folder = tmp_path_factory.mktemp("magika-verify")
    shutil.copyfile(MAGIKA, folder / "model.onnx")
    with np.load(magika_data[1]) as validation:
        rows = validation["bytes"][:4]
    session = ort.InferenceSession(str(MAGIKA), providers=["CPUExecutionProvider"])
    health = load_profile("raspberrypi").health_check
    arrays: dict[str, Any] = {
        "tolerance": np.array(
            json.dumps(
                {
                    "rtol": health.rtol,
                    "atol": health.atol,
                    "min_cosine": health.min_cosine,
                    "min_top1_agreement": health.min_top1_agreement,
                }
            )
        )
    }
    for index, row in enumerate(rows):
        feed = row[None, :].astype(np.int32)
        arrays[f"inputs/{index}/bytes"] = feed
        arrays[f"outputs/{index}/target_label"] = session.run(None, {"bytes": feed})[0]
    np.savez_compressed(folder / "golden.npz", **arrays)
    return folder


# -- (a) the shared magika model on onnxruntime 1.16.3 and the newest ------------------------


@pytest.mark.slow
def test_magika_loads_and_matches_golden_on_ort_1_16_3_and_newest(
    magika_dir: Path, env: dict[str, str]
) -> None:
    done = _edgekit(
        "verify-runtime", magika_dir / "model.onnx", "--profile", "raspberrypi", "--json", env=env
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] is True
    assert report["golden"] == "golden.npz beside model.onnx"
    rows = _by_version(report)
    assert set(rows) == {"1.16.3", "1.32.0"}
    for version, row in rows.items():
        assert row["status"] == "pass", row
        assert row["installed"] and row["loads"] and row["within_tolerance"] is True
        # The probe really ran that release, not the host's onnxruntime.
        assert row["reported_version"] == version
        assert row["samples"] == 4
        assert row["latency_ms"]["p50"] > 0
        assert row["metrics"]["target_label"]["cosine"] > 0.999
        assert row["metrics"]["target_label"]["top1_agreement"] == 1.0
    # onnxruntime 1.16.3 wheels are built against numpy 1: its venv must hold numpy<2.
    assert rows["1.16.3"]["numpy_version"].startswith("1.")
    assert "numpy<2" in rows["1.16.3"]["requirements"]

    human = _edgekit("verify-runtime", magika_dir / "model.onnx", "-p", "raspberrypi", env=env)
    assert human.returncode == 0, human.stderr
    assert "onnxruntime 1.16.3" in human.stdout and "onnxruntime 1.32.0" in human.stdout
    assert "yes (cached)" in human.stdout  # the second run reuses the venvs
    assert "verify-runtime passed" in human.stdout


def test_outputs_outside_the_golden_tolerance_fail(
    magika_dir: Path, env: dict[str, str], tmp_path: Path
) -> None:
    shutil.copyfile(magika_dir / "model.onnx", tmp_path / "model.onnx")
    with np.load(magika_dir / "golden.npz") as golden:
        arrays = {key: golden[key] for key in golden.files}
    for key in list(arrays):
        if key.startswith("outputs/"):
            arrays[key] = arrays[key][:, ::-1].copy()  # other classes win: top-1 disagrees
    np.savez(tmp_path / "golden.npz", **arrays)
    done = _edgekit(
        "verify-runtime", tmp_path / "model.onnx", "-p", "raspberrypi", "--runtime", "oldest",
        "--json", env=env,
    )  # fmt: skip
    assert done.returncode == 2
    row = _by_version(json.loads(done.stdout))["1.16.3"]
    assert row["loads"] is True and row["within_tolerance"] is False
    assert any("top-1 agreement" in failure for failure in row["failures"])
    assert done.stderr.startswith("error: ") and "onnxruntime 1.16.3" in done.stderr
    assert "outside the golden tolerance" in done.stderr


def test_bare_model_without_golden_reports_loads_and_latency_only(
    env: dict[str, str], tmp_path: Path
) -> None:
    require_shared(MAGIKA)
    shutil.copyfile(MAGIKA, tmp_path / "model.onnx")
    done = _edgekit(
        "verify-runtime", tmp_path / "model.onnx", "-p", "raspberrypi", "--runtime", "newest",
        "--json", env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["golden"].startswith("none (synthetic inputs")
    (row,) = report["runtimes"]
    assert row["loads"] is True and row["within_tolerance"] is None
    assert row["latency_ms"]["p50"] > 0


# -- bundles: extracted structurally; signatures only with --trust ---------------------------


def test_bundle_signature_not_checked_without_trust_and_checked_with_it(
    magika_dir: Path, env: dict[str, str], tmp_path: Path
) -> None:
    root, release, outsider = Signer.generate(), Signer.generate(), Signer.generate()
    bundle = build_bundle(
        collect_bundle_inputs(magika_dir),
        out_path=tmp_path / "magika.ekb",
        name="magika",
        version="1.0.0",
        security_epoch=0,
        profile="raspberrypi",
        signers=[release],
    )

    def store(bundle_key: Signer, name: str) -> Path:
        trust = create_truststore(
            root_keys=[root.public_key],
            bundles_keys=[bundle_key.public_key],
            directives_keys=[root.public_key],
        )
        path = tmp_path / name
        path.write_bytes(sign_truststore(trust, [root]))
        return path

    unchecked = _edgekit(
        "verify-runtime", bundle, "-p", "raspberrypi", "--runtime", "oldest", "--json", env=env
    )
    assert unchecked.returncode == 0, unchecked.stderr
    report = json.loads(unchecked.stdout)
    assert report["signature"].startswith("not checked")
    assert report["golden"] == "the bundle's golden.npz"
    assert report["runtimes"][0]["within_tolerance"] is True

    checked = _edgekit(
        "verify-runtime", bundle, "-p", "raspberrypi", "--runtime", "oldest", "--json",
        "--trust", store(release, "trust.json"), env=env,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["signature"].startswith("verified against")

    refused = _edgekit(
        "verify-runtime", bundle, "-p", "raspberrypi", "--runtime", "oldest",
        "--trust", store(outsider, "other.json"), env=env,
    )  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: ")


# -- (c) a runtime version that cannot be installed here --------------------------------------


def _profile_with_oldest(tmp_path: Path, version: str) -> Path:
    path = tmp_path / "no-wheel.yaml"
    path.write_text(
        "extends: raspberrypi\n"
        "name: ort-no-wheel\n"
        "description: onnxruntime 1.10 has no wheel for Python 3.11\n"
        "runtime:\n"
        f"  oldest: {{package: onnxruntime, version: '{version}'}}\n"
    )
    return path


@pytest.mark.slow
def test_uninstallable_runtime_is_reported_and_the_others_still_checked(
    magika_dir: Path, env: dict[str, str], tmp_path: Path, runtime_cache: Path
) -> None:
    # onnxruntime 1.10.0 shipped wheels for Python 3.6-3.9 only.
    profile = _profile_with_oldest(tmp_path, "1.10.0")
    done = _edgekit("verify-runtime", magika_dir / "model.onnx", "-p", profile, "--json", env=env)
    assert done.returncode == 0, done.stderr
    rows = _by_version(json.loads(done.stdout))
    assert rows["1.10.0"]["status"] == "not installed"
    assert rows["1.10.0"]["loads"] is None
    assert (
        "onnxruntime 1.10.0 cannot be installed here: no wheel for cp3"
        in (rows["1.10.0"]["install_error"])
    )
    assert rows["1.32.0"]["status"] == "pass"
    assert rows["1.32.0"]["within_tolerance"] is True
    # Nothing half-built is left in the cache for the failed version.
    leftovers = [p.name for p in runtime_cache.iterdir() if "1.10.0" in p.name]
    assert all(name.endswith(".lock") for name in leftovers), leftovers

    alone = _edgekit(
        "verify-runtime", magika_dir / "model.onnx", "-p", profile, "--runtime", "oldest", env=env
    )
    assert alone.returncode == 2  # nothing could be checked: not a pass
    assert "not installed" in alone.stdout
    assert "nothing verified" in alone.stderr


@pytest.mark.slow
def test_onnx_too_new_for_an_uninstallable_oldest_runtime_fails_statically(
    runtime_cache: Path, tmp_path: Path
) -> None:
    from edgekit.verify_runtime import verify_runtime

    # Opset 19 / IR 9: onnxruntime 1.32 runs it; 1.10 (IR 8, opset 15) cannot load it and has
    # no wheel for this Python, so only the static check speaks for it.
    model = _deform_conv_model(tmp_path / "deform.onnx")
    profile = load_profile(str(_profile_with_oldest(tmp_path, "1.10.0")))
    report = verify_runtime(
        model, profile, cache_dir=runtime_cache, latency_seconds=0.1, emulation="off"
    )
    rows = {check.version: check for check in report.checks}
    assert rows["1.10.0"].status == "not installed"
    assert rows["1.32.0"].status == "pass"
    assert report.static_blockers == [
        "IR version 9 (onnxruntime 1.10.0 loads up to 8)",
        "ai.onnx opset 19 (onnxruntime 1.10.0 loads up to 15)",
    ]
    assert not report.passed
    assert any("checked statically" in line for line in report.problems())


@pytest.mark.slow
def test_interrupted_build_is_cleaned_and_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    cache = RuntimeCache(tmp_path / "cache")
    pin = RuntimePin("onnxruntime", "1.10.0")
    cache.root.mkdir()
    stale = cache.root / f".{cache.key(pin)}.build-killed"  # what a killed run leaves
    (stale / "bin").mkdir(parents=True)
    with pytest.raises(RuntimeInstallError, match="no wheel"):
        cache.ensure(pin)
    assert not stale.exists()
    assert sorted(p.name for p in cache.root.iterdir()) == [f"{cache.key(pin)}.lock"]
    # The failure is remembered for the process: a second attempt does not run pip again
    # (it would have removed this leftover first).
    stale.mkdir()
    with pytest.raises(RuntimeInstallError, match="no wheel"):
        RuntimeCache(tmp_path / "cache").ensure(pin)
    assert stale.exists()


def test_a_runtime_that_does_not_import_is_not_installed_not_refusing(tmp_path: Path) -> None:
    from edgekit import verify_runtime as vr

    # This interpreter's venv has numpy and onnxruntime but no tflite_runtime.
    here = Path(sys.prefix)
    with pytest.raises(RuntimeInstallError, match=r"importing tflite_runtime\.interpreter after"):
        vr._check_import(here, RuntimePin("tflite-runtime", "2.14.0"), ["tflite-runtime==2.14.0"])
    vr._check_import(here, RuntimePin("onnxruntime", "1.32.0"), ["onnxruntime==1.32.0"])

    check = vr.RuntimeCheck(end="oldest", package="tflite-runtime", version="2.14.0")
    check.installed = True
    environment = vr.RuntimeEnvironment(RuntimePin("tflite-runtime", "2.14.0"), here, (), False, 0)
    subject = vr._Subject(MAGIKA, None, "none", "n/a")

    def probe(check: vr.RuntimeCheck, environment: vr.RuntimeEnvironment) -> None:
        vr._probe(
            check, [str(environment.python)], environment.path, environment.pin.package,
            subject, workdir=tmp_path, outputs=tmp_path / "outputs.npz", threads=1,
            latency_seconds=0.1, max_samples=None,
        )  # fmt: skip

    probe(check, environment)
    assert check.status == "not installed"
    assert check.loads is None
    assert "does not import" in (check.install_error or "")
    assert "tflite_runtime" in (check.install_error or "")

    # A venv without numpy: the probe itself cannot start its work; still "not installed".
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    check = vr.RuntimeCheck(end="newest", package="onnxruntime", version="1.32.0")
    check.installed = True
    environment = vr.RuntimeEnvironment(RuntimePin("onnxruntime", "1.32.0"), bare, (), False, 0)
    probe(check, environment)
    assert check.status == "not installed"
    assert "does not import: numpy" in (check.install_error or "")

    # An interpreter that cannot even be started: one line, not a traceback.
    gone = vr.RuntimeEnvironment(
        RuntimePin("onnxruntime", "1.16.3"), tmp_path / "gone", (), False, 0
    )
    with pytest.raises(RuntimeInstallError, match=r"cannot run .*gone/bin/python"):
        probe(check, gone)


def test_pip_time_limit_holds_while_pip_prints_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgekit import verify_runtime as vr

    monkeypatch.setattr(vr, "_PIP_TIMEOUT_S", 1.0)
    silent = [sys.executable, "-c", "import time; time.sleep(60)"]
    lines = vr._stream(silent, progress=None, prefix="")
    assert lines is not None and "did not finish within 1 s" in lines[-1]


def test_pip_settings_that_install_elsewhere_are_not_passed_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edgekit import verify_runtime as vr

    for name in ("PIP_TARGET", "PIP_PREFIX", "PIP_ROOT", "PIP_USER"):
        monkeypatch.setenv(name, "/somewhere")
    monkeypatch.setenv("PIP_INDEX_URL", "https://example.invalid/simple")
    env = vr._clean_env()
    assert not {"PIP_TARGET", "PIP_PREFIX", "PIP_ROOT", "PIP_USER"} & set(env)
    assert env["PIP_INDEX_URL"] == "https://example.invalid/simple"


def test_probe_reports_the_tensorflow_version_of_a_tensorflow_cpu_install() -> None:
    from importlib import metadata

    from edgekit import _runtime_probe

    assert _runtime_probe._distribution_version("tensorflow") == metadata.version("tensorflow-cpu")


def test_unreadable_trust_store_is_a_one_line_error(tmp_path: Path) -> None:
    from edgekit import verify_runtime as vr
    from edgekit.errors import EdgekitError

    bundle = tmp_path / "x.ekb"
    bundle.write_bytes(b"")
    unreadable = tmp_path / "trust"  # a folder: reading it fails even as root
    unreadable.mkdir()
    with pytest.raises(EdgekitError, match=r"cannot read trust store .*trust: ") as info:
        vr._extract(bundle, tmp_path / "out", trust=unreadable)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_two_runs_building_the_same_runtime_share_one_build(tmp_path: Path) -> None:
    cache = RuntimeCache(tmp_path / "cache")
    pin = RuntimePin("tflite-runtime", "2.14.0")
    results: list[Any] = []

    def build() -> None:
        results.append(cache.ensure(pin))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2
    assert sorted(result.created for result in results) == [False, True]
    assert results[0].path == results[1].path == cache.path(pin)
    assert runtime_requirements(pin) == ("tflite-runtime==2.14.0", "numpy<2")
    marker = json.loads((cache.path(pin) / "edgekit-runtime.json").read_text())
    assert marker["requirements"] == ["tflite-runtime==2.14.0", "numpy<2"]
    assert not [p for p in cache.root.iterdir() if ".build-" in p.name]


# -- (d) convert --verify-runtime refuses to sign ---------------------------------------------


def _fp32_profile(tmp_path: Path) -> Path:
    path = tmp_path / "fp32.yaml"
    path.write_text(
        "extends: raspberrypi\nname: pi-fp32\ndescription: fp32 only\n"
        "quantization:\n  candidates: [fp32]\n"
    )
    return path


def _deform_conv_model(path: Path) -> Path:
    """A valid opset-19 model onnxruntime 1.32 runs but 1.16.3 has no kernel for."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("DeformConv", ["x", "w", "offset"], ["y"])],
        "deform",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4]),
            helper.make_tensor_value_info("offset", TensorProto.FLOAT, [1, 8, 3, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 3, 3])],
        [numpy_helper.from_array(np.full((1, 1, 2, 2), 0.25, np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def test_convert_verify_runtime_refuses_to_sign_when_a_runtime_refuses(
    env: dict[str, str], tmp_path: Path
) -> None:
    assert _edgekit("keys", "generate", "release", env=env).returncode == 0
    model = _deform_conv_model(tmp_path / "deform.onnx")
    out = tmp_path / "out"
    done = _edgekit(
        "convert", model, "-p", _fp32_profile(tmp_path), "-o", out, "--verify-runtime",
        "--sign", "release", "--name", "deform", env=env,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: no bundle signed: ")
    assert "onnxruntime 1.16.3: refuses the model" in done.stderr
    assert "DeformConv" in done.stderr
    assert not list(out.glob("*.ekb"))
    # Every candidate was tried on the runtimes and failed: the conversion fails as a whole and,
    # as for any failed conversion, writes nothing.
    assert "fails on the profile's runtimes" in done.stderr
    assert not out.exists() or not any(out.iterdir())


def test_convert_verify_runtime_signs_when_every_runtime_passes(
    digits: DigitsExample, env: dict[str, str], tmp_path: Path
) -> None:
    assert _edgekit("keys", "generate", "release", env=env).returncode == 0
    out = tmp_path / "out"
    done = _edgekit(
        "convert", digits.model_path, "-p", _fp32_profile(tmp_path), "-o", out,
        "--validation", digits.validation_path, "--verify-runtime", "--sign", "release",
        "--name", "digits", "--json", env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["verify_runtime"]["passed"] is True
    rows = _by_version(report["verify_runtime"])
    assert rows["1.16.3"]["within_tolerance"] is True
    assert rows["1.32.0"]["within_tolerance"] is True
    assert Path(report["bundle"]).is_file()
    # The record stays with the output and travels in the signed bundle.
    written = json.loads((out / "report.json").read_text())
    assert written["verify_runtime"]["passed"] is True
    assert _by_version(written["verify_runtime"])["1.16.3"]["status"] == "pass"
    from edgekit.bundle import inspect_bundle

    with open(report["bundle"], "rb") as handle:
        member = next(f for f in inspect_bundle(handle).files if f.entry.path == "report.json")
        handle.seek(member.offset_bytes)
        carried = json.loads(handle.read(member.entry.size_bytes))
    assert carried["verify_runtime"]["passed"] is True


@pytest.mark.slow
def test_convert_verify_runtime_stops_at_once_when_no_runtime_installs(
    digits: DigitsExample, env: dict[str, str], tmp_path: Path
) -> None:
    offline = {
        **env,
        "EDGEKIT_RUNTIME_CACHE": str(tmp_path / "empty-cache"),
        "PIP_NO_INDEX": "1",  # nothing can be installed
        "PIP_FIND_LINKS": "",
    }
    out = tmp_path / "out"
    done = _edgekit(
        "convert", digits.model_path, "-p", "raspberrypi", "-o", out,
        "--validation", digits.validation_path, "--verify-runtime", env=offline,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --verify-runtime cannot check"), lines
    assert "onnxruntime 1.16.3: onnxruntime 1.16.3 cannot be installed here" in lines[0]
    assert "onnxruntime 1.32.0" in lines[0]
    assert "no candidate" not in lines[0]  # not blamed on the candidates


@pytest.mark.slow  # a fault test: two real builds, one killed mid-install
def test_a_build_killed_mid_install_is_never_trusted(tmp_path: Path) -> None:
    import signal
    import time

    cache = RuntimeCache(tmp_path / "cache")
    pin = RuntimePin("tflite-runtime", "2.14.0")
    builder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from edgekit.profiles import RuntimePin; "
         "from edgekit.verify_runtime import RuntimeCache; "
         "RuntimeCache(Path(sys.argv[1])).ensure(RuntimePin('tflite-runtime', '2.14.0'))",
         str(cache.root)],
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    # Wait until pip is installing into the build folder, then kill the whole run.
    while time.monotonic() < deadline and builder.poll() is None:
        building = list(cache.root.glob(f".{cache.key(pin)}.build-*/lib/python*/site-packages/*"))
        if any(p.name.startswith(("numpy", "tflite")) for p in building):
            break
        time.sleep(0.05)
    assert builder.poll() is None, "the build finished before it could be interrupted"
    os.killpg(builder.pid, signal.SIGKILL)
    builder.wait()
    assert not cache.path(pin).exists()  # nothing a later run would trust
    assert list(cache.root.glob(f".{cache.key(pin)}.build-*"))
    environment = cache.ensure(pin)
    assert environment.created and environment.path == cache.path(pin)
    assert not list(cache.root.glob(f".{cache.key(pin)}.build-*"))  # the leftover is gone


# -- quantized (int8/uint8) outputs are compared as real values --------------------------------


def _stored(golden: Path) -> dict[str, Any]:
    with np.load(golden) as archive:
        return {key: archive[key] for key in archive.files}


def _real_cosine(stored: Any, other: Any, quantization: Any) -> float:
    scale, zero_point = quantization
    a = (stored.astype(np.float64) - zero_point) * scale
    b = (other.astype(np.float64) - zero_point) * scale
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).mean())


@pytest.mark.parametrize(
    ("profile", "io_type"),
    [pytest.param("coral-edgetpu", "uint8", marks=pytest.mark.slow), ("cortex-m", "int8")],
)
def test_quantized_outputs_are_compared_as_real_values(
    profile: str, io_type: Literal["int8", "uint8"], runtime_cache: Path, tmp_path: Path
) -> None:
    from edgekit.verify_runtime import verify_runtime
    from tests.quantized_models import quantized_classifier, write_golden

    model = quantized_classifier(tmp_path / "out", io_type)
    golden = write_golden(model, profile)
    arrays = _stored(golden)
    quantization = arrays["quantization/outputs/output_0"]
    assert quantization.shape == (2,) and quantization[0] > 0  # [scale, zero_point]
    assert arrays["outputs/0/output_0"].dtype == np.dtype(io_type)
    assert arrays["quantization/inputs/features"][0] > 0
    loaded = load_profile(profile)

    def check(outputs: dict[str, Any], *, keep_quantization: bool = True) -> dict[str, Any]:
        kept = {
            key: outputs.get(key, value)
            for key, value in arrays.items()
            if keep_quantization or not key.startswith("quantization/")
        }
        np.savez(golden, **kept)
        report = verify_runtime(
            model, loaded, cache_dir=runtime_cache, which="newest", emulation="off"
        )
        (row,) = report.checks
        assert row.loads, row.to_dict()
        return row.to_dict()

    # As written: passes, and top-1 agreement is measured (a classifier's real-valued logits).
    row = check({})
    assert row["within_tolerance"] is True, row
    assert row["metrics"]["output_0"]["top1_agreement"] == 1.0
    # One quantization step off everywhere (as two runtimes may round): still passes.
    info = np.iinfo(io_type)
    stepped = {
        key: np.clip(value.astype(np.int64) + 1, info.min, info.max).astype(io_type)
        for key, value in arrays.items()
        if key.startswith("outputs/")
    }
    row = check(stepped)
    assert row["within_tolerance"] is True, row
    # Wrong outputs (classes reversed): caught by cosine on real values and by top-1.
    wrong = {
        key: value[:, ::-1].copy() for key, value in arrays.items() if key.startswith("outputs/")
    }
    row = check(wrong)
    assert row["within_tolerance"] is False
    failures = " ".join(row["failures"])
    assert "cosine" in failures and "top-1 agreement" in failures, failures
    expected_cosine = np.mean(
        [_real_cosine(arrays[key], wrong[key], quantization) for key in sorted(wrong)]
    )
    assert row["metrics"]["output_0"]["cosine"] == pytest.approx(expected_cosine, abs=1e-4)
    assert row["metrics"]["output_0"]["top1_agreement"] < loaded.health_check.min_top1_agreement
    # An older golden.npz without quantization entries: the runtime's own scale and zero point.
    row = check(wrong, keep_quantization=False)
    assert row["within_tolerance"] is False
    assert row["metrics"]["output_0"]["cosine"] == pytest.approx(expected_cosine, abs=1e-4)
    row = check({}, keep_quantization=False)
    assert row["within_tolerance"] is True, row
