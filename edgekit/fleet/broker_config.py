"""Mosquitto configuration for a fleet: config file, per-device ACL, password file, credentials.

`edgekit fleet broker-config` reads a devices CSV (`device_id`, optional `password`,
`profile`, `group`, `tags`) and writes into one directory:

- `mosquitto.conf`: two listeners (TLS stanzas when given), no anonymous access,
  persistence, and limits sized for bundle chunks. Client ids are one namespace across
  Mosquitto's listeners (it disconnects the older of two connections with one id), so every
  id a client supplies must start with `edgekit-` (`clientid_prefixes`: deprecated in
  Mosquitto 2, but global, which is what this needs) and device ids may not; the device
  listener then replaces it by the user name (`use_username_as_clientid`). So no account can
  take over a device's session, while the service listener (operator and monitor, their own
  password file; devices cannot log in there) keeps ids as given for shared accounts;
- `acl`: per-user blocks. A device (user name == device id) reads its own `desired` and the
  fleet's `bundles/#`, and writes only its own `status`, `events` and `telemetry`. The
  `operator` account (rollouts) writes `desired` and `bundles` and reads the whole fleet; the
  `monitor` account reads status, telemetry and events (also through `$share/...`);
- `passwords` (devices) and `service-passwords` (operator, monitor): Mosquitto 2
  PBKDF2-SHA512 hashes (the format `mosquitto_passwd` writes);
- `credentials.csv`: every account's plain password (mode 0600). Running the command again
  keeps the passwords already in it, so adding devices does not re-key the fleet.

Mosquitto started as root reads `mosquitto.conf`, binds its ports, drops to its service user
(`user` in the config, else `mosquitto`) and only then opens the password files, the ACL, the
TLS key and its persistence directory. So those files are written mode 0640 and, when this
runs as root and the service user exists here, handed to its group (`data/` to the user);
otherwise `BrokerConfig.setup_commands` says exactly what to run as root first, and
`start_command` how to start the broker. A device listener without TLS (passwords in clear
text) is refused unless asked for (`insecure_plaintext`).

Every file is written to a temporary name and renamed into place: a failure leaves the
previous files whole. Explicit per-user blocks (not `pattern` lines) keep the service
accounts from inheriting device rights, and let Mosquitto find a user's rules by name.
"""

from __future__ import annotations

import base64
import csv
import grp
import hashlib
import io
import os
import pwd
import secrets
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgekit import files
from edgekit.errors import EdgekitError
from edgekit.messages import MessageError
from edgekit.topics import CLIENT_ID_PREFIX, Topics, check_identifier, identifier_problem
from edgekit.transfer import MAX_CHUNK_BYTES

__all__ = [
    "BrokerConfig",
    "BrokerConfigError",
    "DeviceAccount",
    "TlsSettings",
    "device_id_problem",
    "hash_password",
    "new_password",
    "read_credentials",
    "read_devices_csv",
    "render_acl",
    "render_mosquitto_conf",
    "store_password",
    "verify_password_hash",
    "write_broker_config",
]

# mosquitto_passwd 2.0 writes 101 iterations; the broker reads the count from each line, so a
# stronger one works with every Mosquitto 2. Not more: the broker pays it on every CONNECT.
_PBKDF2_ITERATIONS = 20_000
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
    passwords: Path  # devices
    service_passwords: Path  # operator and monitor
    credentials: Path
    accounts: Mapping[str, str]  # user -> role (device, operator, monitor)
    generated: tuple[str, ...]  # users whose password was generated in this run
    service_user: str = "mosquitto"  # the user Mosquitto drops to after reading its config
    setup_commands: tuple[str, ...] = ()  # to run as root before the first start
    start_command: str = ""  # how to start the broker with this config (as root)
    warnings: tuple[str, ...] = ()  # what stands in the way and could not be fixed here


def new_password() -> str:
    """A fresh random account password (24 URL-safe characters)."""
    return secrets.token_urlsafe(_PASSWORD_BYTES)


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
        problem = device_id_problem(device_id)
        if problem is not None:
            raise BrokerConfigError(
                f"{where}: device id {device_id[:80]!r} cannot be a broker account: {problem}; "
                "fix that row"
            )
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


def device_id_problem(device_id: str) -> str | None:
    """Why `device_id` cannot be a device account on the generated broker (None if it can)."""
    problem = identifier_problem(device_id)
    if problem is None and device_id.startswith(CLIENT_ID_PREFIX):
        problem = (
            f"ids starting with {CLIENT_ID_PREFIX!r} are reserved for service client ids (a "
            "device's client id is its user name)"
        )
    return problem


def render_acl(
    fleet: str, device_ids: Iterable[str], *, operator_user: str, monitor_user: str
) -> str:
    """The ACL file's text: one block per account, nothing for anonymous clients."""
    topics = Topics(fleet)
    lines = [
        f"# edgekit fleet {fleet}: generated by `edgekit fleet broker-config`; do not edit.",
        "# No rules before the first `user` line: anonymous clients get nothing.",
        "",
        f"user {operator_user}",
        f"topic readwrite {topics.everything}",
        "",
        f"user {monitor_user}",
        *(f"topic read {topics.all_devices(leaf)}" for leaf in ("status", "events", "telemetry")),
        "",
    ]
    for device in device_ids:
        lines += [
            f"user {device}",
            f"topic read {topics.desired(device)}",
            f"topic read {topics.all_bundles}",
            f"topic write {topics.status(device)}",
            f"topic write {topics.events(device)}",
            f"topic write {topics.telemetry(device)}",
            f"topic read {topics.bench(device)}",
            f"topic write {topics.bench_result(device)}",
            "",
        ]
    return "\n".join(lines)


def render_mosquitto_conf(
    *,
    fleet: str,
    install_dir: Path,
    port: int,
    service_port: int,
    bind_address: str | None = None,
    tls: TlsSettings | None = None,
    run_as: str | None = None,
    devices: int = 0,
) -> str:
    """`mosquitto.conf` for the fleet, naming files under `install_dir` (the broker host's)."""

    def listener(number: int) -> list[str]:
        lines = [f"listener {number}" + (f" {bind_address}" if bind_address else "")]
        lines += ["protocol mqtt", "allow_anonymous false"]
        if tls is not None:
            lines += [
                f"cafile {tls.cafile}",
                f"certfile {tls.certfile}",
                f"keyfile {tls.keyfile}",
                "tls_version tlsv1.2",
                f"require_certificate {'true' if tls.require_certificate else 'false'}",
            ]
        return lines

    lines = [
        f"# edgekit fleet {fleet} ({devices} devices): generated by `edgekit fleet broker-config`.",
        "# Each listener has its own accounts: devices on one, operator and monitor on the other.",
        "per_listener_settings true",
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
        "# Client ids: every id a client gives must start with this prefix (checked before the",
        "# device listener replaces it by the user name); device ids never do. So no account",
        "# can connect with a device's client id and take its session over.",
        f"clientid_prefixes {CLIENT_ID_PREFIX}",
        "",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
    ]
    if run_as:
        lines.append(f"user {run_as}")
    lines += [
        "",
        "# Devices. The client id becomes the user name (the device id): a device cannot",
        "# disconnect another one, or take its session, by connecting with its client id.",
        *listener(port),
        "use_username_as_clientid true",
        f"password_file {install_dir / 'passwords'}",
        f"acl_file {install_dir / 'acl'}",
        "",
        "# Operator and monitor: client ids as given (edgekit-...), so several controllers and",
        "# exporters can share one account. Device accounts do not exist here.",
        *listener(service_port),
        f"password_file {install_dir / 'service-passwords'}",
        f"acl_file {install_dir / 'acl'}",
    ]
    return "\n".join(lines) + "\n"


def _credential_rows(path: Path) -> list[tuple[str, str, str]]:
    """(user, password, role) rows of a `credentials.csv` (none when there is none yet)."""
    if not path.exists():
        return []
    try:
        with path.open(newline="") as handle:
            return [
                (row["user"], row["password"], row.get("role") or "")
                for row in csv.DictReader(handle)
                if row.get("user") and row.get("password")
            ]
    except (OSError, KeyError, csv.Error) as error:
        raise BrokerConfigError(
            f"cannot read existing {path}: {error}; move it away to generate new passwords"
        ) from None


def read_credentials(path: Path) -> dict[str, str]:
    """User -> plain password from a `credentials.csv` (empty when there is none yet)."""
    return {user: password for user, password, _ in _credential_rows(path)}


def _credentials_csv(rows: Iterable[tuple[str, str, str]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["user", "password", "role"])
    writer.writerows(rows)
    return buffer.getvalue().encode()


def store_password(path: Path, user: str, password: str, *, role: str = "device") -> None:
    """Set `user`'s password in `credentials.csv` (created 0600 when missing); the next
    `write_broker_config` into that folder keeps it."""
    rows = [row for row in _credential_rows(path) if row[0] != user]
    rows.append((user, password, role))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomic(path, _credentials_csv(rows), mode=0o600)
    except OSError as error:
        raise BrokerConfigError(f"cannot write {path}: {error}") from None


def write_broker_config(
    fleet: str,
    devices: Sequence[DeviceAccount],
    out_dir: Path,
    *,
    port: int | None = None,
    service_port: int | None = None,
    bind_address: str | None = None,
    tls: TlsSettings | None = None,
    install_dir: Path | None = None,
    operator_user: str = "operator",
    monitor_user: str = "monitor",
    run_as: str | None = None,
    insecure_plaintext: bool = False,
) -> BrokerConfig:
    """Write config, ACL, password file and credentials for `fleet` into `out_dir`.

    Without `tls` the device listener sends passwords in clear text: refused unless
    `insecure_plaintext`. The result says how to start Mosquitto with the files.
    """
    if tls is None and not insecure_plaintext:
        raise BrokerConfigError(
            "no TLS for the device listener (device passwords would cross the network in "
            "clear text): pass --tls-ca, --tls-cert and --tls-key (paths on the broker host), "
            "or --insecure-plaintext for a test broker on a trusted network"
        )
    try:
        check_identifier(fleet, what="fleet")
        for user in (operator_user, monitor_user):
            check_identifier(user, what="account")
    except MessageError as error:
        raise BrokerConfigError(str(error)) from None
    if operator_user == monitor_user:
        raise BrokerConfigError("the operator and monitor accounts need different names")
    ids = [device.device_id for device in devices]
    for index, device_id in enumerate(ids):
        problem = device_id_problem(device_id)
        if problem is not None:
            raise BrokerConfigError(
                f"device {index + 1} ({device_id[:80]!r}) cannot be a broker account: {problem}"
            )
    for reserved in (operator_user, monitor_user):
        if reserved in ids:
            raise BrokerConfigError(
                f"device id {reserved!r} is the name of a service account: rename the device "
                "or pass --operator-user/--monitor-user"
            )
    if len(set(ids)) != len(ids):
        raise BrokerConfigError("device ids must be unique")
    device_port = port or (8883 if tls else 1883)
    service_port = service_port or device_port + 1
    for number in (device_port, service_port):
        if not 1 <= number <= 65535:
            raise BrokerConfigError(f"listener port must be 1..65535; got {number}")
    if device_port == service_port:
        raise BrokerConfigError(
            f"the device and service listeners need different ports; both are {device_port}"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BrokerConfigError(f"cannot create {out_dir}: {error.strerror}") from None
    credentials_path = out_dir / "credentials.csv"
    known = read_credentials(credentials_path)
    accounts = {operator_user: "operator", monitor_user: "monitor", **dict.fromkeys(ids, "device")}
    given = {device.device_id: device.password for device in devices if device.password}
    generated = [user for user in accounts if user not in given and user not in known]
    passwords = {**known, **given, **{user: new_password() for user in generated}}
    where = install_dir if install_dir is not None else out_dir.resolve()
    conf = render_mosquitto_conf(
        fleet=fleet,
        install_dir=where,
        port=device_port,
        service_port=service_port,
        bind_address=bind_address,
        tls=tls,
        run_as=run_as,
        devices=len(devices),
    )
    acl = render_acl(fleet, ids, operator_user=operator_user, monitor_user=monitor_user)
    # Devices log in on one listener, the service accounts on the other.
    password_files = {"passwords": "", "service-passwords": ""}
    for user, role in accounts.items():
        name = "passwords" if role == "device" else "service-passwords"
        password_files[name] += f"{user}:{hash_password(passwords[user])}\n"
    service_user = run_as or _MOSQUITTO_USER
    try:
        (out_dir / "data").mkdir(mode=0o700, exist_ok=True)
        # write_atomic creates its temp file 0600 (O_EXCL): a secret is never readable by
        # others, even briefly; each file gets its mode before the rename.
        credentials = _credentials_csv(
            (user, passwords[user], role) for user, role in accounts.items()
        )
        files.write_atomic(credentials_path, credentials, mode=0o600)
        # Read by Mosquitto after it dropped to its service user: group-readable, no more.
        for name, text in (*password_files.items(), ("acl", acl)):
            files.write_atomic(out_dir / name, text.encode(), mode=0o640)
        files.write_atomic(out_dir / "mosquitto.conf", conf.encode())
        in_place = install_dir is None or install_dir.resolve() == out_dir.resolve()
        setup, warnings = _hand_over(
            out_dir, where, service_user=service_user, tls=tls, in_place=in_place, fleet=fleet
        )
    except OSError as error:
        raise BrokerConfigError(f"cannot write the broker config in {out_dir}: {error}") from None
    return BrokerConfig(
        directory=out_dir,
        conf=out_dir / "mosquitto.conf",
        acl=out_dir / "acl",
        passwords=out_dir / "passwords",
        service_passwords=out_dir / "service-passwords",
        credentials=credentials_path,
        accounts=accounts,
        generated=tuple(generated),
        service_user=service_user,
        setup_commands=setup,
        start_command=shlex.join(["mosquitto", "-c", str(where / "mosquitto.conf")]),
        warnings=warnings,
    )


_MOSQUITTO_USER = "mosquitto"  # Mosquitto's own default when the config names no `user`
_READ_AFTER_DROP = ("passwords", "service-passwords", "acl")


@dataclass(frozen=True)
class _ServiceAccount:
    uid: int
    gid: int
    group: str
    gids: frozenset[int]


def _service_account(name: str) -> _ServiceAccount | None:
    """The local user `name` with its groups, or None when this host has no such user."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        group = str(entry.pw_gid)
    gids = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
    return _ServiceAccount(entry.pw_uid, entry.pw_gid, group, frozenset(gids))


def _allows(path: Path, account: _ServiceAccount, want: int) -> bool:
    """Whether `account` has the permission bits `want` (4 read, 1 enter) on `path`."""
    if account.uid == 0:
        return True
    status = path.stat()
    if status.st_uid == account.uid:
        bits = status.st_mode >> 6
    elif status.st_gid in account.gids:
        bits = status.st_mode >> 3
    else:
        bits = status.st_mode
    return bits & want == want


def _closed_folder(path: Path, account: _ServiceAccount) -> Path | None:
    """The first folder above `path` that `account` cannot enter (None: it reaches it)."""
    for folder in reversed(path.resolve().parents):
        if not _allows(folder, account, 0o1):
            return folder
    return None


def _hand_over(
    out_dir: Path,
    where: Path,
    *,
    service_user: str,
    tls: TlsSettings | None,
    in_place: bool,
    fleet: str,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Give Mosquitto's service user what it opens after dropping root, or say how to.

    Done here when the files stay where they are written, this process is root and the user
    exists on this host; otherwise returned as commands to run as root. Returns
    (setup commands, warnings)."""
    account = _service_account(service_user)
    if service_user == "root" or (account is not None and account.uid == os.geteuid()):
        return (), ()  # the files are the service user's own already
    group = account.group if account is not None else service_user
    commands: list[str] = []
    warnings: list[str] = []
    if in_place and account is not None and os.geteuid() == 0:
        for name in _READ_AFTER_DROP:
            os.chown(out_dir / name, 0, account.gid)
        os.chown(out_dir / "data", account.uid, account.gid)
    else:
        paths = [str(where / name) for name in _READ_AFTER_DROP]
        commands.append(shlex.join(["chown", f"root:{group}", *paths]))
        commands.append(shlex.join(["chown", f"{service_user}:{group}", str(where / "data")]))
    if not in_place:
        warnings.append(
            f"copy {out_dir} to {where} on the broker host (credentials.csv stays with the "
            "operator), then run the commands below there as root"
        )
        return tuple(commands), tuple(warnings)
    if account is None:
        warnings.append(
            f"there is no user {service_user!r} on this host: install Mosquitto (it creates "
            "the user) or pass --run-as with the user it runs as"
        )
        return tuple(commands), tuple(warnings)
    closed = _closed_folder(out_dir / "acl", account)
    if closed is not None:
        warnings.append(
            f"user {service_user} cannot enter {closed} (mode "
            f"{closed.stat().st_mode & 0o777:04o}), so Mosquitto will not open the files in "
            f"{out_dir}: write them elsewhere (e.g. -o /etc/mosquitto/{fleet}) or allow it "
            f"(chmod o+x {shlex.quote(str(closed))})"
        )
    for path in dict.fromkeys((tls.cafile, tls.certfile, tls.keyfile) if tls else ()):
        if not path.exists():
            warnings.append(f"TLS file {path} does not exist on this host")
            continue
        closed = _closed_folder(path, account)
        if closed is not None:
            warnings.append(f"user {service_user} cannot enter {closed}, so it cannot read {path}")
        elif not _allows(path, account, 0o4):
            commands.append(shlex.join(["chgrp", group, str(path)]))
            commands.append(shlex.join(["chmod", "g+r", str(path)]))
    return tuple(commands), tuple(warnings)
