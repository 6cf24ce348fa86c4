"""Benchmark: building the emulated aarch64 runtime environments with uv against pip.

For each runtime of the Raspberry Pi profiles (onnxruntime 1.16.3 and 1.32.0, tflite-runtime
2.14.0, ai-edge-litert 2.3.0), runs the install step `edgekit.emulation.EmulationCache` runs
(the aarch64 manylinux wheels for CPython 3.11, installed from this host into an empty
site-packages, exactly the command `_install_command` builds) twice per installer:

- `cold`: the installer's own download cache is empty (a new machine, a CI runner);
- `warm`: its download cache holds the wheels (a developer's second runtime set).

Then, once per runtime, the whole environment build with the default installer: install plus
the import check under QEMU (`build_s`), which no installer can speed up. The sysroot is built
once beforehand (`sysroot_s`). Writes JSON to stdout and to `--out` (default
benchmarks/results/emulation_env.json); `ratio = pip_s / uv_s` per case.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekit.emulation import EmulationCache, Installer, _install_command
from edgekit.profiles import RuntimePin
from edgekit.verify_runtime import runtime_requirements

PINS = (
    RuntimePin("onnxruntime", "1.16.3"),
    RuntimePin("onnxruntime", "1.32.0"),
    RuntimePin("tflite-runtime", "2.14.0"),
    RuntimePin("ai-edge-litert", "2.3.0"),
)


def _install(site: Path, pin: RuntimePin, installer: Installer, downloads: Path) -> float:
    site.mkdir(parents=True)
    command = _install_command(installer, site, runtime_requirements(pin), arch="aarch64")
    env = {**os.environ, "UV_CACHE_DIR": str(downloads / "uv"), "PIP_CACHE_DIR": str(downloads)}
    started = time.monotonic()
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/emulation_env.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-emulation-") as scratch:
        work = Path(scratch)
        started = time.monotonic()
        sysroot = EmulationCache(work / "sysroot").sysroot()
        sysroot_s = time.monotonic() - started
        sysroot_mb = sum(
            p.stat().st_size for p in sysroot.path.rglob("*") if p.is_file() and not p.is_symlink()
        ) / (1 << 20)
        rows = []
        for pin in PINS:
            row: dict[str, object] = {"runtime": f"{pin.package} {pin.version}"}
            for installer in ("uv", "pip"):
                downloads = work / f"downloads-{installer}-{pin.package}-{pin.version}"
                for state in ("cold", "warm"):
                    site = work / f"{installer}-{state}-{pin.package}-{pin.version}"
                    seconds = _install(site, pin, installer, downloads)  # type: ignore[arg-type]
                    row[f"{installer}_{state}_s"] = round(seconds, 1)
                    shutil.rmtree(site)
                    print(f"{row['runtime']}: {installer} {state} {seconds:.1f} s", file=sys.stderr)
            for state in ("cold", "warm"):
                pip_s, uv_s = row[f"pip_{state}_s"], row[f"uv_{state}_s"]
                row[f"ratio_{state}"] = round(float(pip_s) / max(float(uv_s), 0.1), 2)  # type: ignore[arg-type]
            root = work / f"build-{pin.package}-{pin.version}"
            root.mkdir()
            (root / sysroot.path.name).symlink_to(sysroot.path)
            started = time.monotonic()
            EmulationCache(root).runtime(pin)
            row["build_s"] = round(time.monotonic() - started, 1)
            rows.append(row)
    result = {
        "benchmark": "emulation_env",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sysroot_s": round(sysroot_s, 1),
        "sysroot_mb": round(sysroot_mb, 1),
        "cpu_count": os.cpu_count(),
        "runtimes": rows,
        "installer_default": "uv",
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
