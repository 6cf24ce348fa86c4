"""Start a real Mosquitto on a free loopback port: for tests, demos and benchmarks.

The broker runs with a config this module writes (listener on 127.0.0.1 only, optional
password file, ACL and TLS), in its own directory, and is stopped (and can be restarted on the
same port, keeping its persistence) by the caller. It never touches a broker that is already
running, such as a system Mosquitto on 1883.
"""

from __future__ import annotations

import atexit
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from edgekit.errors import EdgekitError

__all__ = ["MosquittoBroker", "MosquittoUnavailableError", "find_mosquitto", "free_port"]

_SEARCH = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


class MosquittoUnavailableError(EdgekitError):
    """No mosquitto binary on this machine, or it would not start."""


def find_mosquitto() -> str:
    """Path of the mosquitto binary: `EDGEKIT_MOSQUITTO`, PATH, then the usual sbin places."""
    explicit = os.environ.get("EDGEKIT_MOSQUITTO")
    if explicit:
        return explicit
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _SEARCH:
        if os.access(candidate, os.X_OK):
            return candidate
    raise MosquittoUnavailableError(
        "mosquitto not found: install it (Debian/Ubuntu: apt-get install mosquitto) or set "
        "EDGEKIT_MOSQUITTO to its path"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """Server side of a TLS listener (PEM files); `require_certificate` asks clients for one."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False


class MosquittoBroker:
    """A Mosquitto process owned by the caller.

    `users` maps user name to password (written with `mosquitto_passwd`); with users given,
    anonymous clients are refused. `acl` is the ACL file's text. `extra` lines are appended to
    the config verbatim (e.g. `max_inflight_messages 100`).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        tls: TlsFiles | None = None,
        extra: Sequence[str] = (),
        persistence: bool = True,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.users = dict(users or {})
        self.acl = acl
        self.tls = tls
        self.extra = tuple(extra)
        self.persistence = persistence
        self.binary = find_mosquitto()
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} {self.host}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "max_queued_messages 100000",
            # Started as root, mosquitto would drop to the `mosquitto` user and lose access to
            # the caller's (private) work directory: stay the caller.
            f"user {getpass.getuser()}",
            "message_size_limit 0",
            # Small MQTT round trips otherwise wait on delayed ACKs (~40 ms each).
            "set_tcp_nodelay true",
        ]
        if self.persistence:
            data = self.workdir / "data"
            data.mkdir(exist_ok=True)
            lines += ["persistence true", f"persistence_location {data}/", "autosave_interval 1"]
        if self.users:
            password_file = self.workdir / "passwords"
            password_file.write_text("")
            password_file.chmod(0o600)
            for user, password in self.users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(password_file), user, password],
                    check=True,
                    capture_output=True,
                )
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None:
            acl_file = self.workdir / "acl"
            acl_file.write_text(self.acl)
            lines.append(f"acl_file {acl_file}")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.cafile}",
                f"certfile {self.tls.certfile}",
                f"keyfile {self.tls.keyfile}",
                f"require_certificate {'true' if self.tls.require_certificate else 'false'}",
            ]
        lines += list(self.extra)
        self.config_path.write_text("\n".join(lines) + "\n")
        return self.config_path

    def start(self, *, timeout_s: float = 10.0) -> MosquittoBroker:
        if self._process is not None and self._process.poll() is None:
            return self
        if not self.config_path.exists():
            self.write_config()
        log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        # The broker runs in its own session (a Ctrl-C meant for the caller must not kill it
        # first), so nothing else stops it: a caller that exits or fails without stop() would
        # leave it running. atexit is the safety net.
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise MosquittoUnavailableError(
                    f"mosquitto exited with code {self._process.returncode}; log:\n"
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise MosquittoUnavailableError(f"mosquitto did not listen on {self.port} in {timeout_s} s")

    def stop(self, *, kill: bool = False) -> None:
        process, self._process = self._process, None
        atexit.unregister(self.stop)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self, *, down_s: float = 0.0) -> None:
        """Stop (saving persistence), stay down `down_s` seconds, start on the same port."""
        self.stop()
        if down_s:
            time.sleep(down_s)
        self.start()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m edgekit.mosquitto DIR [--port N]`: run a local broker until SIGTERM/Ctrl-C.

    Prints the broker URL on the first line of stdout; for demos and local trials only
    (anonymous access on 127.0.0.1).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m edgekit.mosquitto", description=main.__doc__)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    broker = MosquittoBroker(args.workdir, port=args.port)
    stop = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with broker:
        print(broker.url, flush=True)
        while not stop and broker.running:
            time.sleep(0.2)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
