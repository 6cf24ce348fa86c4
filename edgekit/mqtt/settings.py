"""How any edgekit client reaches a broker: one settings type for the agent, the fleet tools,
the simulator and the monitor. Pure: parsing and validation only, no paho."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from edgekit.errors import TransportError

__all__ = ["BrokerSettings"]

_SCHEMES = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True}


@dataclass(frozen=True)
class BrokerSettings:
    """Broker URL (`mqtt://host:1883`, `mqtts://host:8883`; `tcp://`, `ssl://` and a bare
    `host:port` too), account, TLS files and session options.

    A user name and password in the URL are used unless `username` is given. `ca_file` is the
    PEM bundle that verifies the broker (default: the system CAs); `cert_file` and `key_file`
    are a client certificate for brokers that require one. `session_expiry_s` asks the broker
    to keep the session (subscriptions, QoS 1 messages) that long while the client is away.
    `password_file` is where the password came from (read by whoever loads the settings).
    """

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0

    def __post_init__(self) -> None:
        parts = self._parts
        if parts.scheme not in _SCHEMES or not parts.hostname:
            raise TransportError(
                f"broker URL {self.url!r} must look like mqtt://host:1883 or mqtts://host:8883"
            )
        try:
            parts.port  # noqa: B018 - raises for a bad port
        except ValueError:
            raise TransportError(f"broker URL {self.url!r} has an invalid port") from None
        if (self.cert_file is None) != (self.key_file is None):
            raise TransportError("a client certificate needs both cert_file and key_file")
        if self.username is None and parts.username is not None:
            object.__setattr__(self, "username", parts.username)
            object.__setattr__(self, "password", parts.password)

    def replace(self, **changes: object) -> BrokerSettings:
        """A copy with `changes` applied (e.g. another account)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @functools.cached_property
    def _parts(self) -> SplitResult:
        return urlsplit(self.url if "://" in self.url else f"mqtt://{self.url}")

    @property
    def tls(self) -> bool:
        return _SCHEMES[self._parts.scheme]

    @property
    def host(self) -> str:
        return self._parts.hostname or "localhost"

    @property
    def port(self) -> int:
        return self._parts.port or (8883 if self.tls else 1883)

    @property
    def endpoint(self) -> str:
        """`mqtt(s)://host:port`: the URL without credentials, for messages and logs."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"
