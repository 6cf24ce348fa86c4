"""Shared fleet fixtures: an operator keyring, a trust store, signed bundles per profile.

`fleet_kit` (session-wide) gives:
- `home`: an EDGEKIT_HOME with keyring key `ops` (the directives role; passphrase
  `passphrase`) and bundle signing key `release`; `env()` is the environment for running
  `edgekit` as a subprocess with them;
- `truststore` / `truststore_path`: a signed trust store devices are provisioned with;
- `bundle(version, profile)`: a signed `.ekb` holding a tiny ONNX model (y = 2x + 1) built
  here, with golden samples, reference stats and report, for versions 1.0.0, 2.0.0 and
  profiles x86-64 and raspberrypi.
Keep these names stable: the fleet tools tests may use them too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from edgekit.bundle import build_bundle, collect_bundle_inputs
from edgekit.fleet.store import RolloutStore
from edgekit.messages import BundleId
from edgekit.trust import (
    Signer,
    TrustStore,
    create_truststore,
    generate_key,
    load_private_key,
    sign_truststore,
)

KEY_NAME = "ops"
PASSPHRASE = "passphrase"
VERSIONS = ("1.0.0", "2.0.0")
PROFILES = ("x86-64", "raspberrypi")
CREATED = datetime(2025, 6, 1, 12, 0, 0, tzinfo=timezone.utc)


@dataclass(frozen=True)
class FleetKit:
    home: Path
    directives: Signer
    bundles_signer: Signer
    truststore: TrustStore
    truststore_path: Path
    bundles: dict[tuple[str, str], Path]

    def bundle(self, version: str, profile: str = "x86-64") -> Path:
        return self.bundles[(version, profile)]

    def active(self, version: str, profile: str = "x86-64") -> BundleId:
        path = self.bundle(version, profile)
        return BundleId("tiny", version, hashlib.sha256(path.read_bytes()).hexdigest())

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"EDGEKIT_HOME": str(self.home), "EDGEKIT_KEY_PASSPHRASE": PASSPHRASE})
        env.update(extra)
        return env


def _tiny_model(folder: Path, *, scale: float, profile: str) -> None:
    """model.onnx computing y = scale * x + 1 on float32[1, 4], and what a bundle carries."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "scale"], ["scaled"]),
            helper.make_node("Add", ["scaled", "one"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[
            helper.make_tensor("scale", TensorProto.FLOAT, [1], [scale]),
            helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    session = onnxruntime.InferenceSession(
        str(folder / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for index in range(4):
        x = rng.standard_normal((1, 4)).astype(np.float32)
        arrays[f"inputs/{index}/x"] = x
        arrays[f"outputs/{index}/y"] = session.run(None, {"x": x})[0]
    tolerance = {"rtol": 1e-3, "atol": 1e-4, "min_cosine": 0.999, "min_top1_agreement": 1.0}
    arrays["tolerance"] = np.array(json.dumps(tolerance))
    with (folder / "golden.npz").open("wb") as handle:
        np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]
    (folder / "reference_stats.json").write_text(
        json.dumps(
            {
                "schema": "edgekit.reference_stats/v1",
                "inputs": {
                    "x": {
                        "dtype": "float32",
                        "bin_edges": [-3.0, -1.0, 0.0, 1.0, 3.0],
                        "bin_fractions": [0.16, 0.34, 0.34, 0.16],
                        "mean": 0.0,
                        "std": 1.0,
                    }
                },
            }
        )
    )
    signature = {
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 4]}],
    }
    (folder / "report.json").write_text(
        json.dumps(
            {
                "profile": profile,
                "runtime": {"format": "onnx", "oldest": {"onnxruntime": "1.16"}},
                "signature": signature,
            }
        )
    )


@pytest.fixture(scope="session")
def fleet_kit(tmp_path_factory: pytest.TempPathFactory) -> FleetKit:
    root = tmp_path_factory.mktemp("fleet-kit")
    home = root / "home"
    keyring = home / "keys"
    generate_key(KEY_NAME, PASSPHRASE, keyring_dir=keyring)
    generate_key("release", PASSPHRASE, keyring_dir=keyring)
    directives = load_private_key(KEY_NAME, PASSPHRASE, keyring_dir=keyring)
    bundles_signer = load_private_key("release", PASSPHRASE, keyring_dir=keyring)
    root_key = Signer.generate()
    store = create_truststore(
        root_keys=[root_key.public_key],
        bundles_keys=[bundles_signer.public_key],
        directives_keys=[directives.public_key],
    )
    truststore_path = root / "truststore.json"
    truststore_path.write_bytes(sign_truststore(store, [root_key]))
    bundles: dict[tuple[str, str], Path] = {}
    for number, version in enumerate(VERSIONS, start=1):
        for profile in PROFILES:
            source = root / "src" / f"{version}-{profile}"
            _tiny_model(source, scale=float(number + 1), profile=profile)
            bundles[(version, profile)] = build_bundle(
                collect_bundle_inputs(source),
                out_path=root / "bundles" / f"tiny-{version}-{profile}.ekb",
                name="tiny",
                version=version,
                security_epoch=0,
                profile=profile,
                signers=[bundles_signer],
                created=CREATED,
            )
    return FleetKit(home, directives, bundles_signer, store, truststore_path, bundles)


@pytest.fixture
def rollout_store(tmp_path: Path) -> Iterator[RolloutStore]:
    """A fresh rollout database in the test's directory."""
    store = RolloutStore(tmp_path / "fleet.db")
    try:
        yield store
    finally:
        store.close()
