"""Benchmark: building the emulated aarch64 runtime environments with uv against pip.

For each runtime of the Raspberry Pi profiles (onnxruntime 1.16.3 and 1.32.0, tflite-runtime
2.14.0, ai-edge-litert 2.3.0), builds the environment `edgekit.emulation.EmulationCache`
makes (aarch64 manylinux wheels for CPython 3.11 installed from this host, then an import
check under QEMU) twice per installer, each in a fresh cache folder:

- `cold`: the installer's own download cache is empty (a new machine, a CI runner);
- `warm`: its download cache holds the wheels (a developer's second runtime set).

The sysroot is built once beforehand (shared: it does not depend on the installer). Each time
includes the emulated import check (the same for both). Writes JSON to stdout and to `--out`
(default benchmarks/results/emulation_env.json); `ratio = pip_s / uv_s` per case.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekit.emulation import EmulationCache, Installer
from edgekit.profiles import RuntimePin

PINS = (
    RuntimePin("onnxruntime", "1.16.3"),
    RuntimePin("onnxruntime", "1.32.0"),
    RuntimePin("tflite-runtime", "2.14.0"),
    RuntimePin("ai-edge-litert", "2.3.0"),
)


def _build(root: Path, sysroot: Path, pin: RuntimePin, installer: Installer) -> float:
    root.mkdir(parents=True)
    cache = EmulationCache(root, installer=installer)
    (root / sysroot.name).symlink_to(sysroot)  # the shared sysroot, already built
    (root / f"{sysroot.name}.lock").touch()
    started = time.monotonic()
    environment = cache.runtime(pin)
    seconds = time.monotonic() - started
    assert environment.created and environment.installer == installer
    return seconds


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
                os.environ["UV_CACHE_DIR"] = str(downloads / "uv")
                os.environ["PIP_CACHE_DIR"] = str(downloads / "pip")
                for state in ("cold", "warm"):
                    root = work / f"{installer}-{state}-{pin.package}-{pin.version}"
                    seconds = _build(root, sysroot.path, pin, installer)  # type: ignore[arg-type]
                    row[f"{installer}_{state}_s"] = round(seconds, 1)
                    shutil.rmtree(root)
                    print(f"{row['runtime']}: {installer} {state} {seconds:.1f} s", file=sys.stderr)
            for state in ("cold", "warm"):
                row[f"ratio_{state}"] = round(
                    float(row[f"pip_{state}_s"]) / float(row[f"uv_{state}_s"]),  # type: ignore[arg-type]
                    2,
                )
            rows.append(row)
    result = {
        "benchmark": "emulation_env",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sysroot_s": round(sysroot_s, 1),
        "sysroot_mb": round(sysroot_mb, 1),
        "cpu_count": os.cpu_count(),
        "runtimes": rows,
        "note": "each time includes the emulated import check (identical for both installers)",
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
