"""The agent's configuration: one TOML file, every key overridable by an environment variable.

Keys live at the top level or in one of the tables `[tags]`, `[mqtt]`, `[budgets]`,
`[update]`, `[telemetry]`, `[bench]`. The variable for a key is `EDGEKIT_AGENT_<TABLE>_<KEY>` (or
`EDGEKIT_AGENT_<KEY>` at the top level) in upper case, e.g. `EDGEKIT_AGENT_MQTT_URL`,
`EDGEKIT_AGENT_UPDATE_PROBATION_S`; `EDGEKIT_AGENT_TAGS` is `key=value,key=value`. An invalid
value raises `ConfigError` naming the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgekit.errors import EdgekitError, TransportError
from edgekit.messages import MessageError
from edgekit.mqtt.settings import BrokerSettings
from edgekit.topics import check_identifier

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 devices: `pip install tomli`
    import tomli as tomllib

__all__ = [
    "ENV_PREFIX",
    "AgentConfig",
    "BenchSettings",
    "BudgetOverrides",
    "ConfigError",
    "InferenceSettings",
    "MqttSettings",
    "TelemetrySettings",
    "UpdateSettings",
    "load_config",
    "parse_config",
]

ENV_PREFIX = "EDGEKIT_AGENT_"


class ConfigError(EdgekitError):
    """The agent's configuration file or environment is missing a key or has a bad value."""


MqttSettings = BrokerSettings
"""The `[mqtt]` table: `edgekit.mqtt.BrokerSettings` (the one broker settings type). The agent
keeps a persistent session: `session_expiry_s` defaults to a day here."""
_AGENT_SESSION_EXPIRY_S = 24 * 3600


@dataclass(frozen=True)
class BudgetOverrides:
    """Limits that replace the profile's budgets when set (None: the profile decides)."""

    max_latency_ms: float | None = None
    max_ram_bytes: int | None = None
    max_model_bytes: int | None = None


@dataclass(frozen=True)
class UpdateSettings:
    """How an update is checked and soaked before it is committed."""

    probation_s: float = 60.0
    max_error_ratio: float = 0.01  # runtime errors / requests during probation
    max_latency_regression: float = 1.5  # new p95 / previous p95
    min_probation_requests: int = 0  # fewer requests than this: latency is not compared
    shadow: bool = False
    shadow_agreement: float = 0.99
    max_bundle_bytes: int = 512 << 20
    latency_runs: int = 20  # health check: batch-1 runs measured for the latency budget
    https_ca_file: Path | None = None
    threads: int | None = None
    download_timeout_s: float = 1800.0  # fetching one bundle, every attempt and source
    min_download_bytes_per_s: float = 1024.0  # slower over download_window_s: dropped
    download_window_s: float = 30.0


@dataclass(frozen=True)
class InferenceSettings:
    """What local inference may cost (see `edgekit.agent.oip.InferenceLimits`).

    `memory_bytes` (default: the profile's RAM budget, or 256 MiB without one) is what the
    concurrent requests may use together; the body, request and response caps derive from
    it unless set here.
    """

    memory_bytes: int | None = None
    max_concurrent: int = 2
    queue_wait_s: float = 1.0
    max_connections: int = 16
    request_timeout_s: float = 30.0
    idle_timeout_s: float = 30.0
    max_body_bytes: int | None = None
    max_request_elements: int | None = None
    max_response_elements: int | None = None


@dataclass(frozen=True)
class TelemetrySettings:
    """Telemetry interval and the bounded on-disk queue of unsent messages."""

    interval_s: float = 60.0
    queue_max_messages: int = 10_000
    qos: int = 1


@dataclass(frozen=True)
class BenchSettings:
    """Whether the device measures candidates a signed bench request asks for (`edgekit
    convert --bench-device`), and within what limits. Off unless enabled: a bench takes CPU."""

    enabled: bool = False
    max_bytes: int = 256 << 20  # all the request's files together
    timeout_s: float = 600.0  # fetching the files
    threads: int | None = None  # None: the request's, else every core
    # A test aid for the measurement loop, "NAME=FACTOR[,NAME=FACTOR]": this device reports
    # candidate NAME FACTOR times slower than it runs (a device that disagrees with the host).
    throttle: str = ""

    def throttles(self) -> dict[str, float]:
        """`throttle` as name -> factor (checked when the config is read)."""
        found: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in self.throttle.split(","))):
            name, _, factor = item.partition("=")
            found[name.strip()] = float(factor)
        return found


@dataclass(frozen=True)
class AgentConfig:
    """Everything `edgekit-agent run` needs."""

    device_id: str
    fleet: str
    profile: str
    mqtt: MqttSettings
    truststore: Path
    data_dir: Path
    group: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    inference_address: str = "127.0.0.1:8080"
    allow_remote_inference: bool = False  # the OIP server has no authentication
    model_name: str = "model"  # the OIP model name: /v2/models/<model_name>/infer
    initial_bundle: Path | None = None
    log_level: str = "INFO"
    budgets: BudgetOverrides = field(default_factory=BudgetOverrides)
    update: UpdateSettings = field(default_factory=UpdateSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    bench: BenchSettings = field(default_factory=BenchSettings)
    source: str = "<memory>"


# (table, key) -> (kind, required). Table "" is the top level.
_SCHEMA: dict[tuple[str, str], tuple[str, bool]] = {
    ("", "device_id"): ("id", True),
    ("", "fleet"): ("id", True),
    ("", "profile"): ("str", True),
    ("", "truststore"): ("path", True),
    ("", "data_dir"): ("path", True),
    ("", "group"): ("str", False),
    ("", "inference_address"): ("address", False),
    ("", "allow_remote_inference"): ("bool", False),
    ("", "model_name"): ("id", False),
    ("", "initial_bundle"): ("path", False),
    ("", "log_level"): ("level", False),
    ("mqtt", "url"): ("url", True),
    ("mqtt", "ca_file"): ("path", False),
    ("mqtt", "cert_file"): ("path", False),
    ("mqtt", "key_file"): ("path", False),
    ("mqtt", "username"): ("str", False),
    ("mqtt", "password"): ("str", False),
    ("mqtt", "password_file"): ("path", False),
    ("mqtt", "keepalive_s"): ("posint", False),
    ("mqtt", "session_expiry_s"): ("posint", False),
    ("mqtt", "reconnect_min_s"): ("posfloat", False),
    ("mqtt", "reconnect_max_s"): ("posfloat", False),
    ("budgets", "max_latency_ms"): ("posfloat", False),
    ("budgets", "max_ram_bytes"): ("posint", False),
    ("budgets", "max_model_bytes"): ("posint", False),
    ("update", "probation_s"): ("nonnegfloat", False),
    ("update", "max_error_ratio"): ("ratio", False),
    ("update", "max_latency_regression"): ("posfloat", False),
    ("update", "min_probation_requests"): ("nonnegint", False),
    ("update", "shadow"): ("bool", False),
    ("update", "shadow_agreement"): ("ratio", False),
    ("update", "max_bundle_bytes"): ("posint", False),
    ("update", "latency_runs"): ("posint", False),
    ("update", "https_ca_file"): ("path", False),
    ("update", "threads"): ("posint", False),
    ("update", "download_timeout_s"): ("posfloat", False),
    ("update", "min_download_bytes_per_s"): ("nonnegfloat", False),
    ("update", "download_window_s"): ("posfloat", False),
    ("inference", "memory_bytes"): ("posint", False),
    ("inference", "max_concurrent"): ("posint", False),
    ("inference", "queue_wait_s"): ("posfloat", False),
    ("inference", "max_connections"): ("posint", False),
    ("inference", "request_timeout_s"): ("posfloat", False),
    ("inference", "idle_timeout_s"): ("posfloat", False),
    ("inference", "max_body_bytes"): ("posint", False),
    ("inference", "max_request_elements"): ("posint", False),
    ("inference", "max_response_elements"): ("posint", False),
    ("telemetry", "interval_s"): ("posfloat", False),
    ("telemetry", "queue_max_messages"): ("posint", False),
    ("telemetry", "qos"): ("qos", False),
    ("bench", "enabled"): ("bool", False),
    ("bench", "max_bytes"): ("posint", False),
    ("bench", "timeout_s"): ("posfloat", False),
    ("bench", "threads"): ("posint", False),
    ("bench", "throttle"): ("throttle", False),
}
_TABLES = ("mqtt", "budgets", "update", "inference", "telemetry", "bench")
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _env_name(table: str, key: str) -> str:
    return f"{ENV_PREFIX}{table.upper()}_{key.upper()}" if table else f"{ENV_PREFIX}{key.upper()}"


def _key_name(table: str, key: str) -> str:
    return f"{table}.{key}" if table else key


def load_config(path: Path, *, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read the TOML file at `path`, apply `EDGEKIT_AGENT_*` overrides and validate."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist: create it (see docs/agent.md) or pass --config"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}); fix the syntax") from e
    return parse_config(
        document, environ=os.environ if environ is None else environ, source=str(path)
    )


def parse_config(
    document: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    source: str = "<memory>",
) -> AgentConfig:
    """Validate a parsed TOML document plus environment overrides into an `AgentConfig`."""
    env = dict(environ or {})
    values: dict[tuple[str, str], tuple[Any, str]] = {}  # value, where it came from
    for name, value in document.items():
        if name == "tags":
            continue
        if name in _TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{name}] must be a table")
            for key, item in value.items():
                if (name, key) not in _SCHEMA:
                    raise ConfigError(_unknown(source, name, key))
                values[(name, key)] = (item, source)
        elif ("", name) in _SCHEMA:
            values[("", name)] = (value, source)
        else:
            raise ConfigError(_unknown(source, "", name))
    for table, key in _SCHEMA:
        variable = _env_name(table, key)
        if variable in env:
            values[(table, key)] = (env[variable], f"environment variable {variable}")
    tags = _tags(document.get("tags"), env, source)
    parsed: dict[tuple[str, str], Any] = {}
    for (table, key), (kind, required) in _SCHEMA.items():
        if (table, key) not in values:
            if required:
                raise ConfigError(
                    f"{source}: required key {_key_name(table, key)!r} is missing (or set "
                    f"{_env_name(table, key)})"
                )
            continue
        raw, origin = values[(table, key)]
        parsed[(table, key)] = _convert(raw, kind, key=_key_name(table, key), origin=origin)

    def section(table: str) -> dict[str, Any]:
        return {key: value for (t, key), value in parsed.items() if t == table}

    mqtt_values = {"session_expiry_s": _AGENT_SESSION_EXPIRY_S, **section("mqtt")}
    url = str(mqtt_values.get("url", ""))
    if urlsplit(url).scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"{source}: mqtt.url {url!r} must start with mqtt:// or mqtts://")
    if ("cert_file" in mqtt_values) != ("key_file" in mqtt_values):
        raise ConfigError(
            f"{source}: mqtt.cert_file and mqtt.key_file go together: set both or neither"
        )
    try:
        mqtt = _with_password_file(BrokerSettings(**mqtt_values), values)
    except TransportError as e:
        raise ConfigError(f"{source}: mqtt: {e}") from None
    if mqtt.reconnect_max_s < mqtt.reconnect_min_s:
        raise ConfigError(f"{source}: mqtt.reconnect_max_s must be >= mqtt.reconnect_min_s")
    top = section("")
    address = top.get("inference_address", "127.0.0.1:8080")
    allow_remote = bool(top.get("allow_remote_inference", False))
    if not allow_remote and not _is_loopback(address.rpartition(":")[0]):
        origin = values[("", "inference_address")][1]
        raise ConfigError(
            f"{origin}: inference_address {address!r} is not a loopback address; the inference "
            "server has no authentication: bind 127.0.0.1 (or ::1), or set "
            "allow_remote_inference = true to serve the network on purpose"
        )
    return AgentConfig(
        device_id=top["device_id"],
        fleet=top["fleet"],
        profile=top["profile"],
        mqtt=mqtt,
        truststore=top["truststore"],
        data_dir=top["data_dir"],
        group=top.get("group", ""),
        tags=tags,
        inference_address=address,
        allow_remote_inference=allow_remote,
        model_name=top.get("model_name", "model"),
        initial_bundle=top.get("initial_bundle"),
        log_level=top.get("log_level", "INFO"),
        budgets=BudgetOverrides(**section("budgets")),
        update=UpdateSettings(**section("update")),
        inference=InferenceSettings(**section("inference")),
        telemetry=TelemetrySettings(**section("telemetry")),
        bench=BenchSettings(**section("bench")),
        source=source,
    )


def _is_loopback(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1 (a bracketed IPv6 host too)."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything


def _with_password_file(
    mqtt: MqttSettings, values: Mapping[tuple[str, str], tuple[Any, str]]
) -> MqttSettings:
    """Read `mqtt.password_file` (one line; a trailing newline is dropped) into the password."""
    path = mqtt.password_file
    if path is None:
        return mqtt
    origin = values[("mqtt", "password_file")][1]
    if mqtt.password is not None:
        other = values[("mqtt", "password")][1]
        raise ConfigError(
            f"{origin}: mqtt.password_file is set and so is mqtt.password ({other}): keep one"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{origin}: mqtt.password_file {path} does not exist; create it (mode 0600) or, "
            "under systemd, check LoadCredential= and $CREDENTIALS_DIRECTORY"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{origin}: cannot read mqtt.password_file {path}: {e}") from e
    password = text.removesuffix("\n").removesuffix("\r")
    if not password or "\n" in password:
        raise ConfigError(f"{origin}: mqtt.password_file {path} must hold the password on one line")
    return dataclasses.replace(mqtt, password=password)


def _unknown(source: str, table: str, key: str) -> str:
    known = sorted(_key_name(t, k) for t, k in _SCHEMA)
    return f"{source}: unknown key {_key_name(table, key)!r}; known keys: tags.*, " + ", ".join(
        known
    )


def _tags(value: object, env: Mapping[str, str], source: str) -> dict[str, str]:
    variable = f"{ENV_PREFIX}TAGS"
    if variable in env:
        tags: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in env[variable].split(","))):
            key, sep, tag = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"{variable}: expected key=value[,key=value]; found {item!r}")
            tags[key.strip()] = tag.strip()
        return tags
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"{source}: [tags] must be a table of strings")
    return {str(k): str(v) for k, v in value.items()}


def _convert(raw: Any, kind: str, *, key: str, origin: str) -> Any:
    from_env = isinstance(raw, str) and origin.startswith("environment")

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{origin}: {key} must be {expected}; found {raw!r}")

    if kind == "throttle":
        if not isinstance(raw, str):
            raise fail('a string like "weight_int8=4"')
        for item in filter(None, (part.strip() for part in raw.split(","))):
            name, sep, factor = item.partition("=")
            try:
                slowdown = float(factor)
            except ValueError:
                slowdown = 0.0
            if not sep or not name.strip() or not 1.0 <= slowdown <= 100.0:
                raise fail("NAME=FACTOR[,NAME=FACTOR] with FACTOR from 1 to 100")
        return raw
    if kind in ("str", "url", "address", "id", "level", "path"):
        if not isinstance(raw, str) or (kind != "str" and not raw):
            raise fail("a non-empty string")
        if kind == "path":
            return Path(raw).expanduser()
        if kind == "id":
            try:
                return check_identifier(raw, what=key)
            except MessageError as e:
                raise ConfigError(f"{origin}: {e}") from None
        if kind == "level":
            if raw.upper() not in _LEVELS:
                raise fail(f"one of {', '.join(_LEVELS)}")
            return raw.upper()
        if kind == "address":
            host, sep, port = raw.rpartition(":")
            if not sep or not host or not port.isdecimal() or not 0 <= int(port) < 65536:
                raise fail("host:port (e.g. 127.0.0.1:8080; port 0 picks a free one)")
        return raw
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if from_env and raw.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return raw.lower() in ("1", "true", "yes", "on")
        raise fail("true or false")
    if kind in ("posint", "nonnegint", "qos"):
        value: Any = raw
        if from_env:
            try:
                value = int(raw)
            except ValueError:
                raise fail("an integer") from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise fail("an integer")
        if kind == "posint" and value < 1:
            raise fail("an integer >= 1")
        if kind == "nonnegint" and value < 0:
            raise fail("an integer >= 0")
        if kind == "qos" and value not in (0, 1):
            raise fail("0 or 1")
        return value
    # floats
    number: Any = raw
    if from_env:
        try:
            number = float(raw)
        except ValueError:
            raise fail("a number") from None
    if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
        raise fail("a number")
    number = float(number)
    if kind == "posfloat" and number <= 0:
        raise fail("a number > 0")
    if kind == "nonnegfloat" and number < 0:
        raise fail("a number >= 0")
    if kind == "ratio" and not 0 <= number <= 1:
        raise fail("a number between 0 and 1")
    return number
