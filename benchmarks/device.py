"""Benchmark: does the host's ranking of candidates pick the winner the device's arch would?

For each model (the digits CNN built here, and the shared magika and silero models), runs the
existing CLI `edgekit convert MODEL -p raspberrypi --keep-candidates` (host-measured latency
per candidate, from its report.json), then loads every kept candidate in the aarch64 build of
the profile's newest onnxruntime under QEMU, once per CPU the profile names (Pi 4: Cortex-A72,
Pi 5: Cortex-A76), replaying a few samples whose expected outputs come from the original model
on the host: the device-side signal is whether the device's kernels keep the profile's accuracy
limits (cosine and top-1 against the original, on those few samples), and the emulated latency.

Side by side per model: each candidate's host p50 and emulated p50 per CPU, its device-side
fidelity, the winner each signal picks (the lowest p50 among candidates that meet the
tolerance), and how often the host's winner differs from the emulated one.

Emulated latency is QEMU's time on this host, NOT the device's: it counts instructions
translated and executed by TCG, weighted by how expensive each is to emulate (SIMD and
floating point far more than integer code). It is shown because it is the only device-arch
timing this machine has; `emulated_rank_agreement_a72_a76` shows how far it can be trusted (a
Pi 5 is faster than a Pi 4 on every candidate; emulation need not say so). No cost estimate is
printed (see docs/device-emulation.md: none held up).

Writes JSON to stdout and to `--out` (default benchmarks/results/device.json). Takes tens of
minutes (emulated fp32 runs ~100-300x slower than native); `--models digits` for a quick run.
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
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekit.profiles import load_profile
from edgekit.verify_runtime import verify_runtime

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGEKIT_SHARED_MODELS", REPO.parent / "shared" / "models"))
PROFILE = "raspberrypi"
SAMPLES = 2  # golden samples replayed per emulated run: emulation is slow


def _digits(work: Path) -> tuple[Path, Path, Path]:
    from edgekit.converters.examples import export_digits_cnn

    example = export_digits_cnn(work / "digits")
    return example.model_path, example.calibration_path, example.validation_path


def _magika(work: Path) -> tuple[Path, Path, Path]:
    from edgekit.converters.examples import machine_files, magika_inputs

    x = magika_inputs(machine_files())
    order = np.random.default_rng(0).permutation(len(x))
    folder = work / "magika"
    folder.mkdir()
    np.savez(folder / "calibration.npz", bytes=x[order[:96]])
    np.savez(folder / "validation.npz", bytes=x[order[96:256]])
    return (
        SHARED / "magika-standard-v3.3" / "model.onnx",
        folder / "calibration.npz",
        folder / "validation.npz",
    )


def _silero(work: Path) -> tuple[Path, Path, Path]:
    from edgekit.converters.examples import silero_stream

    model = SHARED / "silero-vad-16k-op15" / "model.onnx"
    stream = silero_stream(model, chunks=96)
    folder = work / "silero"
    folder.mkdir()
    np.savez(folder / "calibration.npz", **{k: v[0::2] if v.ndim else v for k, v in stream.items()})
    np.savez(folder / "validation.npz", **{k: v[1::2] if v.ndim else v for k, v in stream.items()})
    return model, folder / "calibration.npz", folder / "validation.npz"


MODELS = {"digits": _digits, "magika": _magika, "silero": _silero}


def _golden(original: Path, validation: Path, path: Path) -> None:
    """Expected outputs of the original model on the host for the first validation rows."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    arrays: dict[str, Any] = {
        "tolerance": np.array(json.dumps(load_profile(PROFILE).health_check.to_dict()))
    }
    with np.load(validation) as data:
        for index in range(SAMPLES):
            feed = {}
            for name, spec in inputs.items():
                value = data[name]
                # A leading samples axis (silero's input and state) or a batch axis.
                if value.ndim == 0:
                    feed[name] = value
                elif value.ndim == len(spec.shape) + 1:
                    feed[name] = value[index]
                else:
                    feed[name] = value[index : index + 1]
                arrays[f"inputs/{index}/{name}"] = feed[name]
            for name, value in zip(names, session.run(None, feed), strict=True):
                arrays[f"outputs/{index}/{name}"] = value
    np.savez(path, **arrays)


def _winner(latencies: dict[str, float | None]) -> str | None:
    measured = {name: value for name, value in latencies.items() if value is not None}
    return min(measured, key=lambda name: measured[name]) if measured else None


def _ranks(latencies: dict[str, float | None]) -> list[str]:
    return sorted(
        (name for name, value in latencies.items() if value is not None),
        key=lambda name: latencies[name],  # type: ignore[arg-type, return-value]
    )


def run_model(name: str, work: Path) -> dict[str, Any]:
    model, calibration, validation = MODELS[name](work)
    out = work / f"{name}-out"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "edgekit", "convert", str(model), "-p", PROFILE, "-o", str(out),
         "--calibration", str(calibration), "--validation", str(validation),
         "--keep-candidates", "--json"],
        capture_output=True, text=True, check=False,
        env={**os.environ, "EDGEKIT_EMULATION": "off"},
    )  # fmt: skip
    if done.returncode != 0:
        return {"model": name, "error": done.stderr.strip()[-500:]}
    convert_s = time.monotonic() - started
    report = json.loads(done.stdout)
    profile = load_profile(PROFILE)
    rows: dict[str, dict[str, Any]] = {}
    for candidate in report["candidates"]:
        kind = candidate["name"]
        file = out / "candidates" / f"{kind}.onnx"
        if candidate.get("status") != "ok" or not file.is_file():
            continue
        rows[kind] = {
            "host_p50_ms": candidate["latency_ms"]["p50"],
            "host_meets_tolerance": candidate["accuracy"]["meets_tolerance"],
            "size_bytes": candidate["size_bytes"],
        }
        folder = work / f"{name}-{kind}"
        folder.mkdir()
        shutil.copyfile(file, folder / "model.onnx")
        _golden(model, validation, folder / "golden.npz")
        print(f"{name}/{kind}: emulating {', '.join(profile.cpu)}", file=sys.stderr)
        checked = verify_runtime(
            folder, profile, which="newest", emulation="require", emulated_samples=SAMPLES,
            latency_seconds=0.0,
        )  # fmt: skip
        for check in checked.checks:
            # Candidate vs the original model: the profile's accuracy limits (as the converter
            # judges), not the health check's per-value rtol/atol (artifact vs itself).
            cosine = min((m["cosine"] for m in check.metrics.values()), default=None)
            top1 = [m["top1_agreement"] for m in check.metrics.values()]
            top1_ok = all(t is None or t >= profile.accuracy.min_top1_agreement for t in top1)
            rows[kind][f"emulated_{check.cpu}_p50_ms"] = check.latency_p50_ms
            rows[kind][f"emulated_{check.cpu}_cosine"] = cosine
            rows[kind][f"emulated_{check.cpu}_within_tolerance"] = bool(
                check.loads
                and cosine is not None
                and cosine >= profile.accuracy.min_cosine
                and top1_ok
            )
    host = {k: r["host_p50_ms"] if r["host_meets_tolerance"] else None for k, r in rows.items()}
    winners: dict[str, Any] = {"host": _winner(host)}
    rankings: dict[str, list[str]] = {"host": _ranks(host)}
    for cpu in profile.cpu:
        emulated = {
            k: r.get(f"emulated_{cpu}_p50_ms")
            if r["host_meets_tolerance"] and r.get(f"emulated_{cpu}_within_tolerance")
            else None
            for k, r in rows.items()
        }
        winners[f"emulated_{cpu}"] = _winner(emulated)
        rankings[f"emulated_{cpu}"] = _ranks(emulated)
    return {
        "model": name,
        "convert_s": round(convert_s, 1),
        "chosen_by_convert": report.get("chosen"),
        "candidates": rows,
        "rankings": rankings,
        "winners": winners,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,magika,silero")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/device.json"))
    args = parser.parse_args()
    profile = load_profile(PROFILE)
    results = []
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-device-") as scratch:
        for name in args.models.split(","):
            started = time.monotonic()
            result = run_model(name, Path(scratch))
            result["seconds"] = round(time.monotonic() - started, 1)
            results.append(result)
            print(json.dumps(result.get("winners")), file=sys.stderr)
    comparisons = [
        (r["winners"]["host"], r["winners"][f"emulated_{cpu}"])
        for r in results
        if "winners" in r
        for cpu in profile.cpu
    ]
    differ = sum(1 for host, device in comparisons if host != device)
    agree_cpus = [
        r["rankings"][f"emulated_{profile.cpu[0]}"] == r["rankings"][f"emulated_{profile.cpu[-1]}"]
        for r in results
        if "rankings" in r
    ]
    summary = {
        "benchmark": "device",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "profile": PROFILE,
        "cpus": list(profile.cpu),
        "samples_per_emulated_run": SAMPLES,
        "host_winner_differs": differ,
        "comparisons": len(comparisons),
        "host_winner_differs_ratio": round(differ / len(comparisons), 2) if comparisons else None,
        "emulated_rank_agreement_a72_a76": agree_cpus,
        "latency_note": "emulated_* latencies are QEMU TCG time on this host, not device time",
        "models": results,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
