"""Fixtures for the trust core and bundle tests: in-memory keys, trust stores, bundles."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from edgekit.bundle import build_bundle, collect_bundle_inputs
from edgekit.trust import Signer, TrustStore, create_truststore
from tests.trust.trust_helpers import CREATED, BuildBundle, Keys


@pytest.fixture(scope="session")
def keys() -> Keys:
    """Fresh Ed25519 keys (session-wide: generation is cheap but not free)."""
    return Keys(
        root=Signer.generate(),
        bundles=(Signer.generate(), Signer.generate(), Signer.generate()),
        directives=Signer.generate(),
        outsider=Signer.generate(),
    )


@pytest.fixture
def truststore(keys: Keys) -> TrustStore:
    """Version 1: one root key, three bundle keys with threshold 1, one directive key."""
    return create_truststore(
        root_keys=[keys.root.public_key],
        bundles_keys=[s.public_key for s in keys.bundles],
        directives_keys=[keys.directives.public_key],
    )


@pytest.fixture
def truststore_2_of_3(keys: Keys) -> TrustStore:
    """Like `truststore`, but bundles need 2 of the 3 bundle keys."""
    return create_truststore(
        root_keys=[keys.root.public_key],
        bundles_keys=[s.public_key for s in keys.bundles],
        bundles_threshold=2,
        directives_keys=[keys.directives.public_key],
    )


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A small converter output directory: model, golden samples, stats and report."""
    directory = tmp_path / "converted"
    directory.mkdir()
    (directory / "model.onnx").write_bytes(bytes(range(256)) * 5 + b"tail")
    (directory / "golden.npz").write_bytes(b"golden-samples" * 37)
    (directory / "reference_stats.json").write_text('{"mean": [0.5], "std": [0.25]}')
    (directory / "report.json").write_text(
        '{"profile": "raspberrypi", "runtime": {"format": "onnx", "oldest": {"onnxruntime": '
        '"1.16"}}, "signature": {"inputs": [{"name": "x", "dtype": "float32", "shape": '
        '[1, 64]}], "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 10]}]}}'
    )
    return directory


@pytest.fixture
def build(tmp_path: Path, model_dir: Path) -> BuildBundle:
    """Build a bundle from `model_dir` (or `source`) and return its bytes."""
    counter = iter(range(1_000_000))

    def _build(
        signers: Sequence[Signer] = (),
        *,
        source: Path | None = None,
        version: str = "1.0.0",
        security_epoch: int = 0,
        name: str = "digits",
    ) -> bytes:
        out = tmp_path / "bundles" / f"b{next(counter)}.ekb"
        path = build_bundle(
            collect_bundle_inputs(source or model_dir),
            out_path=out,
            name=name,
            version=version,
            security_epoch=security_epoch,
            profile="raspberrypi",
            signers=signers,
            created=CREATED,
        )
        return path.read_bytes()

    return _build
