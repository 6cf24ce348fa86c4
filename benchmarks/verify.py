"""Benchmark: full bundle verification + extraction against `sha256sum` of the same file.

Builds a ~100 MB bundle (random, incompressible model) in a temporary directory, then times,
in the same run and with warm page cache for both:

- `edgekit_verify_s`: `extract_bundle` as a device runs it (signatures, manifest, canonical
  layout, every file hashed while streaming in 1 MiB chunks and written to a staging
  directory, fsync, rename);
- `sha256sum_s`: coreutils `sha256sum` over the `.ekb` (one read, one hash, no writes).

`details` adds extraction without fsync, verification without writing, and an in-process
hashlib read+hash baseline (coreutils' sha256sum may not use the CPU's SHA extensions while
OpenSSL does, which flatters the main ratio; `ratio_vs_hashlib` does not have that bias).

Each is the median of several repetitions. `ratio = sha256sum_s / edgekit_verify_s`; the goal
is >= 0.7, i.e. verifying and installing costs at most ~1.43x merely hashing the file.
Writes JSON to stdout and to `--out` (default benchmarks/results/verify.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekit.bundle import BundleInput, build_bundle, extract_bundle, verify_bundle
from edgekit.trust import Signer, create_truststore

GOAL = 0.7


def _time(action: object) -> float:
    start = time.perf_counter()
    action()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> None:
    """Run the benchmark and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/verify.json"))
    parser.add_argument("--model-mib", type=int, default=100)
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()

    signer = Signer.generate()
    store = create_truststore(
        root_keys=[signer.public_key],
        bundles_keys=[signer.public_key],
        directives_keys=[signer.public_key],
    )
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as temp:
        work = Path(temp)
        model = work / "model.onnx"
        with open(model, "wb") as f:
            for _ in range(args.model_mib):
                f.write(os.urandom(1 << 20))
        report = work / "report.json"
        report.write_text('{"profile": "x86-64"}')
        bundle = build_bundle(
            [
                BundleInput("model.onnx", model, "model"),
                BundleInput("report.json", report, "report"),
            ],
            out_path=work / "bench-1.0.0-x86-64.ekb",
            name="bench",
            version="1.0.0",
            security_epoch=0,
            profile="x86-64",
            signers=[signer],
            created=datetime(2025, 1, 1, tzinfo=timezone.utc),
        )
        model.unlink()

        def sha256sum() -> None:
            subprocess.run(["sha256sum", str(bundle)], check=True, stdout=subprocess.DEVNULL)

        def extract(*, fsync: bool) -> None:
            dest = work / "slot"
            try:
                with open(bundle, "rb") as f:
                    extract_bundle(f, dest, trust=store, fsync=fsync)
            finally:
                shutil.rmtree(dest, ignore_errors=True)

        def hashlib_sha256() -> None:
            # In-process baseline: read and hash in 1 MiB chunks, nothing else.
            digest = hashlib.sha256()
            buffer = memoryview(bytearray(1 << 20))
            with open(bundle, "rb") as f:
                while count := f.readinto(buffer):
                    digest.update(buffer[:count])

        def verify_only() -> None:
            with open(bundle, "rb") as f:
                verify_bundle(f, trust=store)

        sha256sum()  # warm the page cache for everyone
        extract(fsync=True)
        timings: dict[str, list[float]] = {
            "sha256sum": [],
            "extract": [],
            "nofsync": [],
            "verify": [],
            "hashlib": [],
        }
        for _ in range(args.repetitions):
            # Interleaved, so drift in machine load hits all measurements alike.
            timings["sha256sum"].append(_time(sha256sum))
            timings["extract"].append(_time(lambda: extract(fsync=True)))
            timings["nofsync"].append(_time(lambda: extract(fsync=False)))
            timings["verify"].append(_time(verify_only))
            timings["hashlib"].append(_time(hashlib_sha256))
        medians = {name: statistics.median(values) for name, values in timings.items()}
        result = {
            "bundle_bytes": bundle.stat().st_size,
            "edgekit_verify_s": round(medians["extract"], 4),
            "sha256sum_s": round(medians["sha256sum"], 4),
            "ratio": round(medians["sha256sum"] / medians["extract"], 3),
            "goal": GOAL,
            "details": {
                "repetitions": args.repetitions,
                "edgekit_verify_s_is": "extract_bundle with fsync (what a device runs)",
                "extract_without_fsync_s": round(medians["nofsync"], 4),
                "ratio_without_fsync": round(medians["sha256sum"] / medians["nofsync"], 3),
                "verify_only_s": round(medians["verify"], 4),
                "ratio_verify_only": round(medians["sha256sum"] / medians["verify"], 3),
                "hashlib_sha256_s": round(medians["hashlib"], 4),
                "ratio_vs_hashlib": round(medians["hashlib"] / medians["extract"], 3),
                "all_s": {k: [round(v, 4) for v in vs] for k, vs in timings.items()},
                "cpu_count": os.cpu_count(),
            },
        }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
