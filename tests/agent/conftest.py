"""Fixtures for the agent core tests: keys, tiny bundles, an in-process updater."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from edgekit.agent.config import AgentConfig, load_config
from edgekit.agent.download import DownloadStats
from edgekit.agent.serving import ModelHost
from edgekit.agent.store import Store
from edgekit.agent.updater import Updater

from edgekit.errors import TransportError
from edgekit.files import hash_file
from edgekit.messages import Event, Status
from edgekit.profiles import load_profile
from edgekit.trust import BundleRef, load_truststore
from tests.agent.agent_helpers import (
    Keys,
    batch1_model,
    linear_model,
    make_bundle,
    make_keys,
    slow_model,
    write_config,
    write_truststore,
)


@pytest.fixture(scope="session")
def agent_keys() -> Keys:
    return make_keys()


@dataclass(frozen=True)
class Bundles:
    v1: Path
    v2: Path
    perturbed: Path  # v3: golden outputs do not match the model
    nan: Path  # v3: outputs NaN
    slow: Path  # v3: far over the latency budget
    batch1: Path  # v3: passes golden samples, fails live requests of batch 2
    disagree: Path  # v3: golden from itself, outputs far from v2's (shadow mode)
    other_profile: Path  # v3 for raspberrypi
    v4_epoch2: Path  # security epoch 2


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory, agent_keys: Keys) -> Bundles:
    work = tmp_path_factory.mktemp("bundles")

    def at(name: str) -> Path:
        folder = work / name
        folder.mkdir()
        return folder

    return Bundles(
        v1=make_bundle(
            at("v1"), agent_keys, version="1.0.0", model=lambda p: linear_model(p, seed=1)
        ),
        v2=make_bundle(
            at("v2"), agent_keys, version="2.0.0", model=lambda p: linear_model(p, seed=2)
        ),
        perturbed=make_bundle(
            at("perturbed"),
            agent_keys,
            version="3.0.0",
            model=lambda p: linear_model(p, seed=3),
            perturb=0.5,
        ),
        nan=make_bundle(
            at("nan"),
            agent_keys,
            version="3.0.1",
            model=lambda p: linear_model(p, seed=3, nan=True),
        ),
        slow=make_bundle(
            at("slow"), agent_keys, version="3.0.2", model=lambda p: slow_model(p, seed=3)
        ),
        batch1=make_bundle(
            at("batch1"), agent_keys, version="3.0.3", model=lambda p: batch1_model(p, seed=3)
        ),
        disagree=make_bundle(
            at("disagree"), agent_keys, version="3.0.4", model=lambda p: linear_model(p, seed=99)
        ),
        other_profile=make_bundle(
            at("other"),
            agent_keys,
            version="3.0.5",
            model=lambda p: linear_model(p, seed=2),
            profile="raspberrypi",
        ),
        v4_epoch2=make_bundle(
            at("v4"),
            agent_keys,
            version="4.0.0",
            model=lambda p: linear_model(p, seed=4),
            security_epoch=2,
        ),
    )


class LocalFetcher:
    """The updater's fetch seam served from local files (the MQTT and HTTPS fetchers are
    tested against a real broker and a real HTTPS server elsewhere)."""

    def __init__(self, files: list[Path]) -> None:
        self.files = {hash_file(path)[1]: path for path in files}
        self.last = DownloadStats()
        self.calls = 0

    def fetch(
        self,
        bundle: BundleRef,
        destination: Path,
        *,
        should_stop: Callable[[], bool] | None = None,
        deadline: float | None = None,
    ) -> Path:
        self.calls += 1
        source = self.files.get(bundle.sha256)
        if source is None:
            raise TransportError(f"no local copy of {bundle.sha256[:12]}")
        self.last = DownloadStats(source="test")
        shutil.copyfile(source, destination)
        return destination


@dataclass
class Recorder:
    events: list[Event] = field(default_factory=list)
    statuses: list[Status] = field(default_factory=list)

    def event(self, event: Event) -> None:
        self.events.append(event)

    def status(self, status: Status) -> None:
        self.statuses.append(status)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]


@dataclass
class Device:
    """An in-process updater over a real store, ModelHost and trust store."""

    config: AgentConfig
    updater: Updater
    host: ModelHost
    store: Store
    recorder: Recorder
    fetcher: LocalFetcher

    def process(self, envelope: bytes) -> None:
        self.updater.process(envelope, stop=threading.Event())


MakeDevice = Callable[..., Device]


def serves(device: Device, bundle: Path) -> bool:
    """Whether `device` serves the model of `bundle` now."""
    serving = device.host.bundle
    return serving is not None and serving.sha256 == hash_file(bundle)[1]


def start_device(
    config_path: Path, truststore: Path, sources: list[Path], hosts: list[ModelHost]
) -> Device:
    """An updater (started) over the config's data dir, fetching bundles from `sources`."""
    config = load_config(config_path, environ={})
    host = ModelHost("model")
    hosts.append(host)
    store = Store(config.data_dir)
    recorder = Recorder()
    fetcher = LocalFetcher(sources)
    updater = Updater(
        config=config,
        profile=load_profile(config.profile),
        store=store,
        trust=load_truststore(truststore.read_bytes()),
        host=host,
        fetcher=fetcher,
        reporter=recorder,
    )
    updater.start()
    return Device(config, updater, host, store, recorder, fetcher)


@pytest.fixture
def make_device(tmp_path: Path, agent_keys: Keys, bundles: Bundles) -> Iterator[MakeDevice]:
    hosts: list[ModelHost] = []

    def _make(*, name: str = "device", initial: bool = True, **config_args: Any) -> Device:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        truststore = write_truststore(agent_keys, root / "truststore.json")
        config_path = write_config(
            root / "agent.toml",
            data_dir=root / "data",
            truststore=truststore,
            initial_bundle=bundles.v1 if initial else None,
            **config_args,
        )
        sources = [getattr(bundles, f) for f in bundles.__dataclass_fields__]
        return start_device(config_path, truststore, sources, hosts)

    yield _make
    for host in hosts:
        host.close()
