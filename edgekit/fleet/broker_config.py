"""Mosquitto configuration for a fleet: config file, per-device ACL, password file, credentials.

`edgekit fleet broker-config` reads a devices CSV (`device_id`, optional `password`,
`profile`, `group`, `tags`) and writes into one directory:

- `mosquitto.conf`: one listener (TLS stanzas when given), no anonymous access, persistence,
  the password file and ACL, and limits sized for bundle chunks;
- `acl`: per-user blocks. A device (user name == device id) reads its own `desired` and the
  fleet's `bundles/#`, and writes only its own `status`, `events` and `telemetry`. The
  `operator` account (rollouts) writes `desired` and `bundles` and reads the whole fleet; the
  `monitor` account reads status, telemetry and events (also through `$share/...`);
- `passwords`: Mosquitto 2 PBKDF2-SHA512 hashes (the format `mosquitto_passwd` writes);
- `credentials.csv`: every account's plain password (mode 0600). Running the command again
  keeps the passwords already in it, so adding devices does not re-key the fleet.

Every file is written to a temporary name and renamed into place: a failure leaves the
previous files whole. Explicit per-user blocks (not `pattern` lines) keep the service
accounts from inheriting device rights, and let Mosquitto find a user's rules by name.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.topics import MessageError, Topics, check_identifier
from edgekit.transfer import MAX_CHUNK_BYTES

__all__ = [
    "BrokerConfig",
    "BrokerConfigError",
    "DeviceAccount",
    "TlsSettings",
    "hash_password",
    "read_devices_csv",
    "render_acl",
    "render_mosquitto_conf",
    "verify_password_hash",
    "write_broker_config",
]

_PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes; the broker reads the count per line
_SALT_BYTES = 12
_PASSWORD_BYTES = 18  # 24 URL-safe characters
_CSV_COLUMNS = ("device_id", "password", "profile", "group", "tags")


class BrokerConfigError(EdgekitError):
    """The devices file or the options cannot make a broker configuration."""


@dataclass(frozen=True)
class DeviceAccount:
    """One device row: its id (also its MQTT user name), optional password and metadata."""

    device_id: str
    password: str | None = None
    profile: str = ""
    group: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TlsSettings:
    """Server TLS files as they will be found on the broker host."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False


@dataclass(frozen=True)
class BrokerConfig:
    """What `write_broker_config` wrote and the accounts it configured."""

    directory: Path
    conf: Path
    acl: Path
    passwords: Path
    credentials: Path
    accounts: Mapping[str, str]  # user -> role (device, operator, monitor)
    generated: tuple[str, ...]  # users whose password was generated in this run


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """A Mosquitto 2 password-file hash: `$7$<iterations>$<salt b64>$<sha512 b64>`."""
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PBKDF2_ITERATIONS)
    return (
        f"$7${_PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}$"
        f"{base64.b64encode(digest).decode()}"
    )


def verify_password_hash(password: str, hashed: str) -> bool:
    """Whether `hashed` (a `$7$` line value) matches `password`."""
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        if kind != "7":
            return False
        computed = hashlib.pbkdf2_hmac(
            "sha512", password.encode(), base64.b64decode(salt), int(iterations)
        )
    except ValueError:
        return False
    return secrets.compare_digest(base64.b64encode(computed).decode(), digest)


def _parse_tags(text: str, *, where: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.replace(",", ";").split(";"))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BrokerConfigError(f"{where}: tag {item!r} is not key=value; separate tags by ';'")
        tags[key.strip()] = value.strip()
    return tags


def read_devices_csv(path: Path) -> list[DeviceAccount]:
    """Parse a devices CSV (header row naming `device_id` and any of the optional columns)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise BrokerConfigError(f"cannot read devices file {path}: {error}") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip() for name in reader.fieldnames or []]
    if "device_id" not in header:
        raise BrokerConfigError(
            f"{path}: the first row must be a header naming device_id (and optionally "
            f"{', '.join(_CSV_COLUMNS[1:])}); found {header[:8]}"
        )
    unknown = set(header) - set(_CSV_COLUMNS)
    if unknown:
        raise BrokerConfigError(
            f"{path}: unknown column(s) {sorted(unknown)}; known: {', '.join(_CSV_COLUMNS)}"
        )
    devices: list[DeviceAccount] = []
    seen: set[str] = set()
    for line, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(row.values()):
            continue
        where = f"{path}:{line}"
        device_id = row.get("device_id", "")
        try:
            check_identifier(device_id, what="device")
        except MessageError as error:
            raise BrokerConfigError(f"{where}: {error}") from None
        if device_id in seen:
            raise BrokerConfigError(f"{where}: device {device_id!r} is listed twice")
        seen.add(device_id)
        password = row.get("password") or None
        if password is not None and ("\n" in password or ":" in password):
            raise BrokerConfigError(f"{where}: passwords cannot contain ':' or line breaks")
        devices.append(
            DeviceAccount(
                device_id=device_id,
                password=password,
                profile=row.get("profile", ""),
                group=row.get("group", ""),
                tags=_parse_tags(row.get("tags", ""), where=where),
            )
        )
    if not devices:
        raise BrokerConfigError(f"{path} lists no devices")
    return devices


def render_acl(
    fleet: str, device_ids: Iterable[str], *, operator_user: str, monitor_user: str
) -> str:
    """The ACL file's text: one block per account, nothing for anonymous clients."""
    topics = Topics(fleet)
    prefix = topics.prefix
    lines = [
        f"# edgekit fleet {fleet}: generated by `edgekit fleet broker-config`; do not edit.",
        "# No rules before the first `user` line: anonymous clients get nothing.",
        "",
        f"user {operator_user}",
        f"topic readwrite {prefix}/#",
        "",
        f"user {monitor_user}",
    ]
    for leaf in ("status", "events", "telemetry"):
        lines.append(f"topic read {topics.prefix}/devices/+/{leaf}")
    lines.append("")
    for device in device_ids:
        lines += [
            f"user {device}",
            f"topic read {topics.desired(device)}",
            f"topic read {prefix}/bundles/#",
            f"topic write {topics.status(device)}",
            f"topic write {topics.events(device)}",
            f"topic write {topics.telemetry(device)}",
            "",
        ]
    return "\n".join(lines)


def render_mosquitto_conf(
    *,
    fleet: str,
    install_dir: Path,
    port: int,
    bind_address: str | None = None,
    tls: TlsSettings | None = None,
    run_as: str | None = None,
    devices: int = 0,
) -> str:
    """`mosquitto.conf` for the fleet, naming files under `install_dir` (the broker host's)."""
    listener = f"listener {port}" + (f" {bind_address}" if bind_address else "")
    lines = [
        f"# edgekit fleet {fleet} ({devices} devices): generated by `edgekit fleet broker-config`.",
        "# Global security settings apply to every listener.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {install_dir / 'passwords'}",
        f"acl_file {install_dir / 'acl'}",
        "",
        "# Retained status, directives and bundle chunks must survive a broker restart.",
        "persistence true",
        f"persistence_location {install_dir / 'data'}/",
        "autosave_interval 60",
        "",
        "# Limits: a bundle chunk is at most 4 MiB; devices send small JSON.",
        f"max_packet_size {MAX_CHUNK_BYTES + 64 * 1024}",
        "max_keepalive 600",
        "max_inflight_messages 64",
        "max_queued_messages 10000",
        "max_queued_bytes 268435456",
        "persistent_client_expiration 7d",
        "",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
    ]
    if run_as:
        lines.append(f"user {run_as}")
    lines += ["", listener, "protocol mqtt"]
    if tls is not None:
        lines += [
            f"cafile {tls.cafile}",
            f"certfile {tls.certfile}",
            f"keyfile {tls.keyfile}",
            "tls_version tlsv1.2",
            f"require_certificate {'true' if tls.require_certificate else 'false'}",
        ]
    return "\n".join(lines) + "\n"


def _read_credentials(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        with path.open(newline="") as handle:
            return {
                row["user"]: row["password"]
                for row in csv.DictReader(handle)
                if row.get("user") and row.get("password")
            }
    except (OSError, KeyError, csv.Error) as error:
        raise BrokerConfigError(
            f"cannot read existing {path}: {error}; move it away to generate new passwords"
        ) from None


def _write_atomic(path: Path, text: str, *, mode: int = 0o644) -> None:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_broker_config(
    fleet: str,
    devices: Sequence[DeviceAccount],
    out_dir: Path,
    *,
    port: int | None = None,
    bind_address: str | None = None,
    tls: TlsSettings | None = None,
    install_dir: Path | None = None,
    operator_user: str = "operator",
    monitor_user: str = "monitor",
    run_as: str | None = None,
) -> BrokerConfig:
    """Write config, ACL, password file and credentials for `fleet` into `out_dir`."""
    try:
        check_identifier(fleet, what="fleet")
        for user in (operator_user, monitor_user):
            check_identifier(user, what="account")
    except MessageError as error:
        raise BrokerConfigError(str(error)) from None
    if operator_user == monitor_user:
        raise BrokerConfigError("the operator and monitor accounts need different names")
    ids = [device.device_id for device in devices]
    for reserved in (operator_user, monitor_user):
        if reserved in ids:
            raise BrokerConfigError(
                f"device id {reserved!r} is the name of a service account: rename the device "
                "or pass --operator-user/--monitor-user"
            )
    if len(set(ids)) != len(ids):
        raise BrokerConfigError("device ids must be unique")
    if port is not None and not 1 <= port <= 65535:
        raise BrokerConfigError(f"listener port must be 1..65535; got {port}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BrokerConfigError(f"cannot create {out_dir}: {error.strerror}") from None
    credentials_path = out_dir / "credentials.csv"
    known = _read_credentials(credentials_path)
    accounts: dict[str, str] = {operator_user: "operator", monitor_user: "monitor"}
    accounts.update({device.device_id: "device" for device in devices})
    given = {device.device_id: device.password for device in devices if device.password}
    passwords: dict[str, str] = {}
    generated: list[str] = []
    for user in accounts:
        if user in given:
            passwords[user] = given[user]
        elif user in known:
            passwords[user] = known[user]
        else:
            passwords[user] = secrets.token_urlsafe(_PASSWORD_BYTES)
            generated.append(user)
    where = install_dir if install_dir is not None else out_dir.resolve()
    conf = render_mosquitto_conf(
        fleet=fleet,
        install_dir=where,
        port=port or (8883 if tls else 1883),
        bind_address=bind_address,
        tls=tls,
        run_as=run_as,
        devices=len(devices),
    )
    acl = render_acl(fleet, ids, operator_user=operator_user, monitor_user=monitor_user)
    password_lines = "".join(f"{user}:{hash_password(passwords[user])}\n" for user in accounts)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["user", "password", "role"])
    for user, role in accounts.items():
        writer.writerow([user, passwords[user], role])
    try:
        (out_dir / "data").mkdir(exist_ok=True)
        _write_atomic(credentials_path, buffer.getvalue(), mode=0o600)
        _write_atomic(out_dir / "passwords", password_lines, mode=0o600)
        _write_atomic(out_dir / "acl", acl)
        _write_atomic(out_dir / "mosquitto.conf", conf)
    except OSError as error:
        raise BrokerConfigError(f"cannot write the broker config in {out_dir}: {error}") from None
    return BrokerConfig(
        directory=out_dir,
        conf=out_dir / "mosquitto.conf",
        acl=out_dir / "acl",
        passwords=out_dir / "passwords",
        credentials=credentials_path,
        accounts=accounts,
        generated=tuple(generated),
    )
