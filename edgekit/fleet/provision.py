"""Provision one device: a kit with everything it needs, and its account for the broker.

`provision_device(request, out_dir)` writes a *device kit*, one directory:

- `agent.toml`: device id, fleet, profile, broker URL (TLS), user name, trust store, broker
  CA, password file, data dir, the factory bundle, any extra settings; paths are where
  `install.sh` puts the files (`InstallLayout`: /etc/edgekit, /var/lib/edgekit-agent);
- `truststore.json` (the signed trust store), `broker-ca.pem` (the CA that signed the broker's
  certificate), `mqtt-password` (0600), `client.pem`/`client.key` (0600) when a client CA is
  given (a certificate for the device id), `factory.ekb` when a factory bundle is given
  (verified against the trust store here);
- `edgekit-agent.service`: the systemd unit (`packaging/edgekit-agent.service` with a fixed
  service user instead of `DynamicUser`, this layout's paths and its secrets as systemd
  credentials);
- `install.sh`: makes a venv with `edgekit[agent]`, the service user, the data dir, installs
  the files with their owners and modes, and enables the unit.

It also registers the device in what `edgekit fleet broker-config` reads: a row in the devices
CSV (device_id, profile, group, tags), and the password in `credentials.csv` of the broker
config folder (broker-config keeps passwords it finds there). A device that already has a
password in either is refused unless `rotate`: provisioning again must not silently lock the
installed device out.

Setting `InstallLayout.config_dir` to the kit's own folder (and `data_dir` to a folder of
one's own) makes the kit runnable where it is: `edgekit-agent run --config KIT/agent.toml`.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgekit import files
from edgekit.errors import EdgekitError
from edgekit.fleet.broker_config import (
    BrokerConfigError,
    device_id_problem,
    new_password,
    read_credentials,
    read_devices_csv,
    store_password,
)
from edgekit.messages import MessageError
from edgekit.topics import check_identifier

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "AGENT_EXTRA",
    "ClientCa",
    "DeviceKit",
    "InstallLayout",
    "ProvisionError",
    "ProvisionRequest",
    "parse_setting",
    "provision_device",
    "render_agent_unit",
    "render_install_script",
]

AGENT_EXTRA = "edgekit[agent]"  # what install.sh installs by default

# Keys provisioning writes itself (from its own options): `--set` cannot change them.
_OWNED_KEYS = frozenset(
    {
        "device_id",
        "fleet",
        "profile",
        "group",
        "truststore",
        "data_dir",
        "initial_bundle",
        "mqtt.url",
        "mqtt.username",
        "mqtt.password",
        "mqtt.password_file",
        "mqtt.ca_file",
        "mqtt.cert_file",
        "mqtt.key_file",
    }
)
_TABLE_ORDER = ("mqtt", "budgets", "update", "inference", "telemetry", "bench")
# Paths land in a unit file and a shell script unquoted by systemd: keep them plain.
_PLAIN_PATH = re.compile(r"^/[A-Za-z0-9._/+-]*$")
_USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


class ProvisionError(EdgekitError):
    """The device cannot be provisioned as asked (bad option, existing secrets, files)."""


@dataclass(frozen=True)
class InstallLayout:
    """Where the kit's files live on the device (absolute paths, also baked into the kit)."""

    config_dir: Path = Path("/etc/edgekit")
    data_dir: Path = Path("/var/lib/edgekit-agent")
    venv: Path = Path("/opt/edgekit/venv")
    service_user: str = "edgekit-agent"  # also its group


@dataclass(frozen=True)
class ClientCa:
    """The CA that issues device client certificates (the broker's `--tls-ca`)."""

    cert: Path
    key: Path  # PEM, unencrypted
    days: int = 825


@dataclass(frozen=True)
class ProvisionRequest:
    """What to provision: the device, its broker, its trust, and where the inputs live."""

    device_id: str
    fleet: str
    profile: str
    broker_url: str
    truststore: Path
    devices_csv: Path  # broker-config's --devices
    broker_dir: Path  # broker-config's -o: credentials.csv lives there
    broker_ca: Path | None = None
    client_ca: ClientCa | None = None
    factory_bundle: Path | None = None
    group: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)  # "table.key" -> value
    layout: InstallLayout = field(default_factory=InstallLayout)
    pip_spec: str = AGENT_EXTRA
    rotate: bool = False
    insecure_plaintext: bool = False


@dataclass(frozen=True)
class DeviceKit:
    """What `provision_device` wrote."""

    directory: Path
    device_id: str
    files: tuple[str, ...]
    rotated: bool  # the device had credentials, replaced now
    devices_csv: Path
    credentials: Path


def parse_setting(text: str) -> tuple[str, Any]:
    """`"update.probation_s=5"` -> ("update.probation_s", 5): the value is a TOML value when
    it parses as one (number, boolean, quoted string), else the plain string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ProvisionError(f"setting {text!r} is not KEY=VALUE (e.g. update.probation_s=30)")
    try:
        value: Any = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def provision_device(request: ProvisionRequest, out_dir: Path) -> DeviceKit:
    """Write the device kit into `out_dir` (absent or empty) and register the device."""
    _check_request(request)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ProvisionError(f"{out_dir} exists and is not an empty folder: choose a new one")
    credentials_path = request.broker_dir / "credentials.csv"
    rows, columns = _read_devices(request.devices_csv)
    known = _known_password(request, rows, credentials_path)
    if known and not request.rotate:
        raise ProvisionError(
            f"device {request.device_id!r} already has credentials ({known}); pass --rotate "
            "to issue new ones (its installed kit stops working once the broker is reconfigured)"
        )
    trust_bytes = _read(request.truststore, "trust store")
    _check_truststore(trust_bytes, request)
    password = new_password()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        written = _write_kit(staging, request, trust_bytes=trust_bytes, password=password)
        _register(request, rows, columns, credentials_path, password)
        if out_dir.exists():
            out_dir.rmdir()
        files.rename(staging, out_dir)
        files.fsync_dir(out_dir.parent)
    except OSError as error:
        raise ProvisionError(f"cannot write the kit in {out_dir}: {error}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return DeviceKit(
        out_dir,
        request.device_id,
        tuple(written),
        bool(known),
        request.devices_csv,
        credentials_path,
    )


# -- checks ------------------------------------------------------------------------------------


def _check_request(request: ProvisionRequest) -> None:
    problem = device_id_problem(request.device_id)
    if problem is not None:
        raise ProvisionError(f"device id {request.device_id[:80]!r} cannot be used: {problem}")
    try:
        check_identifier(request.fleet, what="fleet")
    except MessageError as error:
        raise ProvisionError(str(error)) from None
    from edgekit.profiles import load_profile

    load_profile(request.profile)  # a ProfileError names the known ones
    url = urlsplit(request.broker_url)
    if url.scheme not in ("mqtts", "mqtt") or not url.hostname:
        raise ProvisionError(
            f"--broker {request.broker_url!r} must be mqtts://HOST[:PORT] (the device listener "
            "of `edgekit fleet broker-config`)"
        )
    if url.scheme == "mqtt" and not request.insecure_plaintext:
        raise ProvisionError(
            f"--broker {request.broker_url!r} has no TLS (the device password would cross the "
            "network in clear text): use mqtts:// with --broker-ca, or --insecure-plaintext "
            "for a test broker"
        )
    layout = request.layout
    for name, path in (
        ("--config-dir", layout.config_dir),
        ("--data-dir", layout.data_dir),
        ("--venv", layout.venv),
    ):
        if not _PLAIN_PATH.match(str(path)) or ".." in path.parts:
            raise ProvisionError(
                f"{name} {str(path)!r} must be an absolute path of letters, digits and ._/+- "
                "(it goes into the systemd unit and install.sh)"
            )
    if not _USER_NAME.match(layout.service_user):
        raise ProvisionError(
            f"service user {layout.service_user!r} is not a valid user name (lower case, "
            "digits, _ and -, up to 32)"
        )
    for key in request.settings:
        if key in _OWNED_KEYS:
            raise ProvisionError(f"--set {key}: provisioning writes that key; use its own option")
    if not _PIP_SPEC.match(request.pip_spec):
        raise ProvisionError(f"pip spec {request.pip_spec!r} has characters install.sh refuses")


_PIP_SPEC = re.compile(r"^[A-Za-z0-9._/:@+=<>!~,\[\]-]+$")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ProvisionError(f"{what} {path} not found") from None
    except OSError as error:
        raise ProvisionError(f"cannot read {what} {path}: {error.strerror}") from None


def _check_truststore(data: bytes, request: ProvisionRequest) -> None:
    """The trust store must load as a device loads it; the factory bundle must verify."""
    from edgekit.trust import BundleError, load_truststore

    try:
        store = load_truststore(data)
    except BundleError as error:
        raise ProvisionError(f"{request.truststore}: not a signed trust store: {error}") from None
    if request.factory_bundle is None:
        return
    from edgekit.bundle import verify_bundle

    bundle = request.factory_bundle
    try:
        with bundle.open("rb") as handle:
            verified = verify_bundle(handle, trust=store)
    except FileNotFoundError:
        raise ProvisionError(f"factory bundle {bundle} not found") from None
    except BundleError as error:
        raise ProvisionError(
            f"factory bundle {bundle} does not verify with {request.truststore}: {error}"
        ) from None
    if verified.manifest.profile != request.profile:
        raise ProvisionError(
            f"factory bundle {bundle} is for profile {verified.manifest.profile!r}, the device "
            f"is {request.profile!r}"
        )


# -- broker-config's inputs --------------------------------------------------------------------

_DEVICE_COLUMNS = ("device_id", "password", "profile", "group", "tags")


def _read_devices(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """Rows and header of the devices CSV as they are (empty when it does not exist)."""
    if not path.exists():
        return [], ["device_id", "profile", "group", "tags"]
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise ProvisionError(f"cannot read devices file {path}: {error}") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = [name.strip() for name in reader.fieldnames or []]
    rows = [
        {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        for raw in reader
    ]
    rows = [row for row in rows if any(row.values())]
    if rows:
        read_devices_csv(path)  # the same checks broker-config makes (BrokerConfigError)
    elif "device_id" not in columns:
        raise ProvisionError(f"{path}: the first row must be a header naming device_id")
    return rows, columns


def _known_password(
    request: ProvisionRequest, rows: Sequence[Mapping[str, str]], credentials: Path
) -> str:
    """Where the device's existing password is ("" when it has none)."""
    for row in rows:
        if row.get("device_id") == request.device_id and row.get("password"):
            return f"a password in {request.devices_csv}"
    try:
        if request.device_id in read_credentials(credentials):
            return f"a password in {credentials}"
    except BrokerConfigError as error:
        raise ProvisionError(str(error)) from None
    return ""


def _register(
    request: ProvisionRequest,
    rows: list[dict[str, str]],
    columns: list[str],
    credentials: Path,
    password: str,
) -> None:
    """Add or update the device's row (no password in the CSV: credentials.csv holds it)."""
    header = list(columns) + [c for c in _DEVICE_COLUMNS if c != "password" and c not in columns]
    row = {
        "device_id": request.device_id,
        "profile": request.profile,
        "group": request.group,
        "tags": ";".join(f"{k}={v}" for k, v in request.tags.items()),
    }
    if "password" in header:
        row["password"] = ""  # a CSV password would win over credentials.csv
    updated = [r for r in rows if r.get("device_id") != request.device_id] + [row]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(updated)
    mode = request.devices_csv.stat().st_mode & 0o777 if request.devices_csv.exists() else 0o644
    request.devices_csv.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(request.devices_csv, buffer.getvalue().encode(), mode=mode)
    try:
        store_password(credentials, request.device_id, password)
    except BrokerConfigError as error:
        raise ProvisionError(str(error)) from None


# -- the kit -----------------------------------------------------------------------------------


def _write_kit(
    kit: Path, request: ProvisionRequest, *, trust_bytes: bytes, password: str
) -> list[str]:
    """Write every file of the kit into `kit`; returns their names."""
    layout = request.layout
    written: dict[str, tuple[bytes, int]] = {
        "truststore.json": (trust_bytes, 0o644),
        "mqtt-password": (password.encode() + b"\n", 0o600),
    }
    if request.broker_ca is not None:
        written["broker-ca.pem"] = (_read(request.broker_ca, "broker CA"), 0o644)
    if request.client_ca is not None:
        cert, key = _issue_client_certificate(request.device_id, request.client_ca)
        written["client.pem"] = (cert, 0o644)
        written["client.key"] = (key, 0o600)
    if request.factory_bundle is not None:
        written["factory.ekb"] = (_read(request.factory_bundle, "factory bundle"), 0o644)
    document = _agent_document(request, has=set(written))
    written["agent.toml"] = (_render_toml(document, request).encode(), 0o640)
    secrets_present = {name for name in ("mqtt-password", "client.key") if name in written}
    written["edgekit-agent.service"] = (
        render_agent_unit(layout, secrets=secrets_present).encode(),
        0o644,
    )
    written["install.sh"] = (
        render_install_script(request, kit_files=sorted(written)).encode(),
        0o755,
    )
    for name, (data, mode) in written.items():
        files.write_atomic(kit / name, data, mode=mode)
    return sorted(written)


def _agent_document(request: ProvisionRequest, *, has: set[str]) -> dict[str, Any]:
    """agent.toml as a TOML document (validated as the agent will read it)."""
    from edgekit.agent.config import ConfigError, parse_config

    config_dir = request.layout.config_dir
    top: dict[str, Any] = {
        "device_id": request.device_id,
        "fleet": request.fleet,
        "profile": request.profile,
    }
    if request.group:
        top["group"] = request.group
    top["truststore"] = str(config_dir / "truststore.json")
    top["data_dir"] = str(request.layout.data_dir)
    if "factory.ekb" in has:
        top["initial_bundle"] = str(config_dir / "factory.ekb")
    mqtt: dict[str, Any] = {"url": request.broker_url, "username": request.device_id}
    if "broker-ca.pem" in has:
        mqtt["ca_file"] = str(config_dir / "broker-ca.pem")
    mqtt["password_file"] = str(config_dir / "mqtt-password")
    if "client.pem" in has:
        mqtt["cert_file"] = str(config_dir / "client.pem")
        mqtt["key_file"] = str(config_dir / "client.key")
    document: dict[str, Any] = {**top, "tags": dict(request.tags), "mqtt": mqtt}
    for key, value in request.settings.items():
        table, _, name = key.rpartition(".")
        target = document.setdefault(table, {}) if table else document
        if not isinstance(target, dict):
            raise ProvisionError(f"--set {key}: {table!r} is not a table of agent.toml")
        target[name] = value
    # The agent reads the password file when it loads the config; it is not installed yet.
    check = {**document, "mqtt": {k: v for k, v in mqtt.items() if k != "password_file"}}
    try:
        parse_config(check, environ={}, source="agent.toml")
    except ConfigError as error:
        raise ProvisionError(f"the agent would refuse its config: {error}") from None
    return document


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string (\uXXXX escapes are TOML too)
    raise ProvisionError(f"agent.toml cannot hold {value!r}: use a number, true/false or text")


def _render_toml(document: Mapping[str, Any], request: ProvisionRequest) -> str:
    lines = [
        f"# edgekit agent of device {request.device_id} in fleet {request.fleet}: written by "
        "`edgekit fleet provision`.",
        "# Every key can be overridden by an EDGEKIT_AGENT_* variable (docs/agent.md).",
    ]
    tables = {k: v for k, v in document.items() if isinstance(v, dict)}
    lines += [f"{k} = {_toml_value(v)}" for k, v in document.items() if k not in tables]
    for name in ("tags", *_TABLE_ORDER):
        if tables.get(name):
            lines += ["", f"[{name}]"]
            keys = tables[name].items()
            quoted = name == "tags"  # tag keys are free text
            lines += [f"{json.dumps(k) if quoted else k} = {_toml_value(v)}" for k, v in keys]
    return "\n".join(lines) + "\n"


def _issue_client_certificate(device_id: str, ca: ClientCa) -> tuple[bytes, bytes]:
    """A P-256 key and a client certificate (CN = device id) signed by the CA: PEM bytes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    try:
        ca_cert = x509.load_pem_x509_certificate(_read(ca.cert, "client CA certificate"))
        ca_key = serialization.load_pem_private_key(_read(ca.key, "client CA key"), None)
    except (ValueError, TypeError) as error:
        raise ProvisionError(
            f"cannot load the client CA ({ca.cert}, {ca.key}: PEM, key unencrypted): {error}"
        ) from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ProvisionError(f"client CA key {ca.key} must be an EC or RSA key")
    now = datetime.now(timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=ca.days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


# -- systemd unit and install script -----------------------------------------------------------

_HARDENING = """\
# Hardening: the agent needs the network, its data directory and nothing else.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=no
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallArchitectures=native
SystemCallFilter=@system-service
# Not @resources: onnxruntime calls sched_setaffinity (in @resources) when it creates a session.
SystemCallFilter=~@privileged
# A call outside the filter fails with EPERM instead of killing the agent with SIGSYS.
SystemCallErrorNumber=EPERM
CapabilityBoundingSet=
AmbientCapabilities=
UMask=0077
# Thermal zones are read for telemetry.
ReadOnlyPaths=/sys/class/thermal
"""


def render_agent_unit(layout: InstallLayout, *, secrets: Collection[str]) -> str:
    """The agent's systemd unit for `layout` (packaging/edgekit-agent.service with a fixed
    service user); `secrets` names the kit's secret files (mqtt-password, client.key)."""
    config = layout.config_dir
    state = (
        [f"StateDirectory={layout.data_dir.name}", "StateDirectoryMode=0700"]
        if layout.data_dir.parent == Path("/var/lib")
        else [f"ReadWritePaths={layout.data_dir}"]
    )
    credentials: list[str] = []
    if "mqtt-password" in secrets:
        credentials += [
            f"LoadCredential=mqtt-password:{config / 'mqtt-password'}",
            "Environment=EDGEKIT_AGENT_MQTT_PASSWORD_FILE=%d/mqtt-password",
        ]
    if "client.key" in secrets:
        credentials += [
            f"LoadCredential=mqtt-client-key:{config / 'client.key'}",
            "Environment=EDGEKIT_AGENT_MQTT_KEY_FILE=%d/mqtt-client-key",
        ]
    lines = [
        "# systemd unit for the edgekit device agent: written by `edgekit fleet provision`",
        "# (install.sh puts it in /etc/systemd/system/). See docs/provisioning.md.",
        "[Unit]",
        "Description=edgekit device agent (model updates, local inference, telemetry)",
        "Documentation=https://github.com/edgekit/edgekit/blob/main/docs/agent.md",
        "Wants=network-online.target time-sync.target",
        "After=network-online.target time-sync.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={layout.venv / 'bin' / 'edgekit-agent'} run --config {config / 'agent.toml'}",
        "Restart=on-failure",
        "RestartSec=2s",
        "# The agent pings the watchdog while its worker threads live (see docs/agent.md).",
        "WatchdogSec=60s",
        "TimeoutStopSec=30s",
        "# SIGTERM: the agent publishes an offline status and leaves the journal where it is.",
        "KillSignal=SIGTERM",
        "",
        "# The service user install.sh creates; it owns the data directory (mode 0700) and",
        "# reads agent.toml through its group (mode 0640).",
        f"User={layout.service_user}",
        f"Group={layout.service_user}",
        *state,
        "Environment=PYTHONUNBUFFERED=1",
        "",
        "# Secrets stay 0600 root; systemd (as root) hands the service a private copy under",
        "# $CREDENTIALS_DIRECTORY (%d), and the agent reads them from there.",
        *credentials,
        "",
        _HARDENING.rstrip("\n"),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


# File name in the kit -> (install mode, owner group is the service user's).
_INSTALL_MODES: dict[str, tuple[str, bool]] = {
    "agent.toml": ("0640", True),
    "truststore.json": ("0644", False),
    "broker-ca.pem": ("0644", False),
    "client.pem": ("0644", False),
    "factory.ekb": ("0644", False),
    "mqtt-password": ("0600", False),
    "client.key": ("0600", False),
}


def render_install_script(request: ProvisionRequest, *, kit_files: Sequence[str]) -> str:
    """install.sh for the kit: venv, service user, data dir, files with owners and modes,
    the unit enabled (or, without systemd, the command that starts the agent)."""
    layout = request.layout
    config_files = [name for name in kit_files if name in _INSTALL_MODES]
    put_lines = []
    for name in config_files:
        mode, group_readable = _INSTALL_MODES[name]
        group = '"$SERVICE_GROUP"' if group_readable else "root"
        put_lines.append(f'put {mode} {group} "$KIT/{name}" "$ROOT$CONFIG_DIR/{name}"')
    values = {
        "DEVICE": request.device_id,
        "FLEET": request.fleet,
        "SERVICE_USER": layout.service_user,
        "CONFIG_DIR": str(layout.config_dir),
        "DATA_DIR": str(layout.data_dir),
        "VENV": str(layout.venv),
        "PIP_SPEC": request.pip_spec,
    }
    assignments = "\n".join(f"{key}={shlex.quote(value)}" for key, value in values.items())
    template = resources.files("edgekit.fleet").joinpath("install.sh.in").read_text()
    return template.replace("@ASSIGNMENTS@", assignments).replace(
        "@PUT_FILES@", "\n".join(put_lines)
    )
