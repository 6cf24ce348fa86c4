"""One update (or rollback) by the agent's real updater, in its own process, for the crash-point
suite: `python -m tests.agent.crash_driver SPEC.json`.

The spec names the agent config, the directive envelope, the bundle files the fetch seam
serves, and whether to send batch-2 traffic (the batch1 model fails on it in probation).
`EDGEKIT_AGENT_CRASH_STEP=N` makes the process SIGKILL itself before its N-th durable step
(`edgekit.agent.journal.install_step_hook`), exactly as it would in `edgekit-agent run`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
from edgekit.agent.config import load_config
from edgekit.agent.journal import install_step_hook
from edgekit.agent.serving import ModelHost
from edgekit.agent.store import Store
from edgekit.agent.updater import Updater

from edgekit.errors import EdgekitError
from edgekit.profiles import load_profile
from edgekit.trust import load_truststore
from tests.agent.conftest import LocalFetcher, Recorder


def batch2_traffic(host: ModelHost, stop: threading.Event) -> None:
    """Batch-2 requests until `stop`: the batch1 model fails every one of them."""
    x = np.random.default_rng(5).normal(size=(2, 8)).astype(np.float32)
    while not stop.is_set():
        with contextlib.suppress(EdgekitError):  # failures are the point; the host counts them
            host.infer({"x": x})
        stop.wait(0.005)


def updater_for(spec: dict[str, Any], host: ModelHost, reporter: Recorder) -> Updater:
    config = load_config(Path(spec["config"]), environ={})
    return Updater(
        config=config,
        profile=load_profile(config.profile),
        store=Store(config.data_dir),
        trust=load_truststore(config.truststore.read_bytes()),
        host=host,
        fetcher=LocalFetcher([Path(p) for p in spec["bundles"]]),
        reporter=reporter,
    )


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    host = ModelHost("model")
    updater = updater_for(spec, host, Recorder())
    install_step_hook(updater.config.data_dir)
    updater.start()
    stop = threading.Event()
    if spec.get("traffic"):
        threading.Thread(target=batch2_traffic, args=(host, stop), daemon=True).start()
    updater.process(Path(spec["directive"]).read_bytes(), stop=threading.Event())
    stop.set()
    host.close()
    print(json.dumps({"state": updater.record.state}), flush=True)


if __name__ == "__main__":
    main()
