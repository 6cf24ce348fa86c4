"""`edgekit fleet provision`: a device kit that runs the real agent, against a real Mosquitto
started from `edgekit fleet broker-config`'s output exactly as that output says, and takes a
rollout; credentials that are not overwritten by accident; a unit systemd accepts; an
install script that installs."""

from __future__ import annotations

import csv
import dataclasses
import getpass
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from edgekit.agent.config import load_config

from edgekit.cli import main
from edgekit.errors import TransportError
from edgekit.fleet.broker_config import (
    DeviceAccount,
    read_devices_csv,
    verify_password_hash,
    write_broker_config,
)
from edgekit.fleet.provision import InstallLayout, render_agent_unit
from edgekit.fleet.registry import fleet_client, load_registry
from edgekit.fleet.rollout import RolloutController, RolloutOptions, load_release
from edgekit.fleet.store import RolloutStore
from edgekit.mosquitto import free_port
from edgekit.mqtt import BrokerSettings, MqttClient
from edgekit.topics import Topics
from tests.fleet.conftest import FleetKit
from tests.fleet.tools_helpers import wait_for
from tests.tls_helpers import make_tls_files

FLEET = "plant"
DEVICE = "cam-0001"
REPO = Path(__file__).resolve().parents[2]
SYSTEMD_ANALYZE = Path("/usr/bin/systemd-analyze")
# Fast agent settings for a test (a real device keeps the defaults).
FAST = [
    "--set", "update.probation_s=1",
    "--set", "update.threads=1",
    "--set", "update.latency_runs=5",
    "--set", "telemetry.interval_s=1",
    "--set", "inference_address=127.0.0.1:0",
    "--set", "mqtt.reconnect_min_s=0.2",
    "--set", "mqtt.reconnect_max_s=1",
]  # fmt: skip


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A folder every user may enter (Mosquitto drops root; pytest's tmp base is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="edgekit-provision-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def _provision(
    work: Path, fleet_kit: FleetKit, *extra: str, device: str = DEVICE, out: str = "kit"
) -> tuple[int, str]:
    return _invoke(
        "fleet", "provision", device, "--fleet", FLEET, "--profile", "x86-64",
        "--broker", "mqtts://127.0.0.1:8883", "--truststore", str(fleet_kit.truststore_path),
        "--devices", str(work / "devices.csv"), "--broker-config", str(work / "broker"),
        "-o", str(work / out), *extra,
    )  # fmt: skip


def _start_broker(
    work: Path, tls: tuple[Path, Path, Path], port: int, service_port: int, *extra: str
) -> subprocess.Popen[bytes]:
    """Run broker-config on the test's inputs, then what its output says, as it says it."""
    ca, cert, key = tls
    run_as = [] if os.geteuid() == 0 else ["--run-as", getpass.getuser()]
    generated = subprocess.run(
        [
            sys.executable, "-m", "edgekit", "fleet", "broker-config", "--fleet", FLEET,
            "--devices", str(work / "devices.csv"), "-o", str(work / "broker"),
            "--tls-ca", str(ca), "--tls-cert", str(cert), "--tls-key", str(key),
            "--listener", str(port), "--service-listener", str(service_port),
            "--bind", "127.0.0.1", *run_as, *extra,
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    lines = generated.stdout.splitlines()
    commands = [shlex.split(line) for line in lines[lines.index("start it as root:") + 1 :] if line]
    for command in commands[:-1]:
        subprocess.run(command, check=True)
    log_path = work / "mosquitto.log"
    with log_path.open("wb") as log:
        broker = subprocess.Popen(commands[-1], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_listening(broker, [port, service_port], log_path)
    except BaseException:
        _stop(broker)
        raise
    return broker


def _wait_listening(process: subprocess.Popen[bytes], ports: list[int], log: Path) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            for port in ports:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise AssertionError(log.read_text(errors="replace")) from None
            time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_kit_alone_runs_the_agent_and_takes_a_rollout(workdir: Path, fleet_kit: FleetKit) -> None:
    ca, cert, key = make_tls_files(workdir / "tls")
    port, service_port = free_port(), free_port()
    # 1. Provision: the kit's config dir is the kit itself, the data dir one of the test's.
    kit = workdir / "kit"
    code, output = _invoke(
        "fleet", "provision", DEVICE, "--fleet", FLEET, "--profile", "x86-64",
        "--group", "line-1", "--tag", "site=berlin",
        "--broker", f"mqtts://127.0.0.1:{port}", "--broker-ca", str(ca),
        "--truststore", str(fleet_kit.truststore_path),
        "--factory-bundle", str(fleet_kit.bundle("1.0.0")),
        "--devices", str(workdir / "devices.csv"), "--broker-config", str(workdir / "broker"),
        "--config-dir", str(kit), "--data-dir", str(workdir / "agent-data"), *FAST,
        "-o", str(kit),
    )  # fmt: skip
    assert code == 0, output
    assert sorted(p.name for p in kit.iterdir()) == [
        "agent.toml", "broker-ca.pem", "edgekit-agent.service", "factory.ekb", "install.sh",
        "mqtt-password", "truststore.json",
    ]  # fmt: skip
    assert (kit / "mqtt-password").stat().st_mode & 0o777 == 0o600
    assert (kit / "agent.toml").stat().st_mode & 0o777 == 0o640
    password = (kit / "mqtt-password").read_text().strip()
    assert password not in (kit / "agent.toml").read_text()  # only in its 0600 file

    # 2. The broker, from broker-config's output, started exactly as it says.
    agent_log = workdir / "agent.log"
    broker = agent = None
    try:
        broker = _start_broker(workdir, (ca, cert, key), port, service_port)

        # 3. The agent from the kit alone: its config, nothing else (no EDGEKIT_AGENT_*).
        agent_binary = Path(sys.executable).with_name("edgekit-agent")
        environment = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT")}
        with agent_log.open("wb") as log:
            agent = subprocess.Popen(
                [str(agent_binary), "run", "--config", str(kit / "agent.toml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd=workdir,
            )
        creds = {
            r["user"]: r["password"]
            for r in csv.DictReader((workdir / "broker" / "credentials.csv").open())
        }
        assert creds[DEVICE] == (kit / "mqtt-password").read_text().strip()
        settings = BrokerSettings(
            f"mqtts://127.0.0.1:{service_port}",
            username="operator",
            password=creds["operator"],
            ca_file=ca,
        )
        v1, v2 = fleet_kit.active("1.0.0"), fleet_kit.active("2.0.0")
        with fleet_client(settings) as connection:

            def runs(version: object) -> bool:
                if agent is not None and agent.poll() is not None:
                    raise AssertionError(agent_log.read_text(errors="replace")[-3000:])
                record = load_registry(connection, Topics(FLEET), quiet_s=0.2).get(DEVICE)
                return record is not None and record.online and record.active == version

            wait_for(lambda: runs(v1), timeout_s=60, what="the agent online on its factory bundle")
            record = load_registry(connection, Topics(FLEET)).get(DEVICE)
            assert record is not None
            assert (record.group, dict(record.tags)) == ("line-1", {"site": "berlin"})

            # 4. A rollout to it, committed.
            store = RolloutStore(workdir / "fleet.db")
            try:
                controller = RolloutController(
                    connection=connection,
                    store=store,
                    fleet=FLEET,
                    signers=[fleet_kit.directives],
                    poll_s=0.1,
                )
                release = load_release([fleet_kit.bundle("2.0.0")], truststore=fleet_kit.truststore)
                rollout_id = controller.plan(
                    release,
                    RolloutOptions(
                        strategy="all", max_failure=0.0, soak_s=1.0, report_timeout_s=90
                    ),
                )
                result = controller.run(rollout_id)
                assert result.state == "completed", (
                    result.progress.reason,
                    agent_log.read_text(errors="replace")[-3000:],
                )
                assert [t.outcome for t in store.targets(rollout_id)] == ["succeeded"]
            finally:
                store.close()
            wait_for(lambda: runs(v2), timeout_s=30, what="the agent on 2.0.0")
        assert (workdir / "agent-data").is_dir()  # the kit's data dir, nothing elsewhere
    finally:
        _stop(agent)
        _stop(broker)


def test_existing_credentials_need_rotate(workdir: Path, fleet_kit: FleetKit) -> None:
    code, output = _provision(workdir, fleet_kit)
    assert code == 0, output
    first = (workdir / "kit" / "mqtt-password").read_text().strip()
    credentials = workdir / "broker" / "credentials.csv"
    before = credentials.read_bytes()

    code, output = _provision(workdir, fleet_kit, out="kit-again")
    assert code == 2
    assert output.count("\n") == 1 and "--rotate" in output and DEVICE in output, output
    assert credentials.read_bytes() == before
    assert not (workdir / "kit-again").exists()
    assert not [p for p in workdir.iterdir() if p.name.startswith(".kit")]

    # A password given in the devices CSV counts as a secret too, and --rotate clears it
    # (broker-config would prefer it over credentials.csv).
    devices = workdir / "devices.csv"
    devices.write_text(
        "device_id,password,profile,group,tags\n"
        f"{DEVICE},from-csv,x86-64,,\nother-1,keep-me,x86-64,,\n"
    )
    code, output = _provision(workdir, fleet_kit, out="kit-again")
    assert code == 2 and str(devices) in output

    code, output = _provision(workdir, fleet_kit, "--rotate", out="kit-rotated")
    assert code == 0, output
    rotated = (workdir / "kit-rotated" / "mqtt-password").read_text().strip()
    assert rotated != first
    rows = {d.device_id: d for d in read_devices_csv(devices)}
    assert rows[DEVICE].password is None and rows["other-1"].password == "keep-me"
    # broker-config, run again on its inputs, gives the broker the rotated password.
    result = write_broker_config(
        FLEET,
        read_devices_csv(devices),
        workdir / "broker",
        insecure_plaintext=True,
    )
    hashes = dict(
        line.split(":", 1) for line in (workdir / "broker" / "passwords").read_text().split()
    )
    assert verify_password_hash(rotated, hashes[DEVICE])
    assert verify_password_hash("keep-me", hashes["other-1"])
    assert DEVICE not in result.generated


def test_refusals_are_one_line(workdir: Path, fleet_kit: FleetKit) -> None:
    for extra, message in (
        (["--broker", "mqtt://127.0.0.1:1883"], "--insecure-plaintext"),
        (["--set", "mqtt.url=mqtts://x"], "provisioning writes that key"),
        (["--set", "update.probation_s=-1"], "update.probation_s must be a number >= 0"),
        (["--factory-bundle", str(fleet_kit.bundle("1.0.0", "raspberrypi"))], "raspberrypi"),
        (["--data-dir", "/var/lib/my agent"], "--data-dir"),
    ):
        code, output = _provision(workdir, fleet_kit, *extra, device="dev-x")
        assert code == 2 and output.count("\n") == 1 and message in output, (extra, output)
    assert not (workdir / "kit").exists() and not (workdir / "devices.csv").exists()
    code, output = _provision(workdir, fleet_kit, device="edgekit-x")
    assert code == 2 and "reserved" in output


def test_client_certificate_is_issued_by_the_ca(workdir: Path, fleet_kit: FleetKit) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca, _cert, _key = make_tls_files(workdir / "tls")
    code, output = _provision(
        workdir, fleet_kit, "--client-ca", str(ca), "--client-ca-key", str(workdir / "tls/ca.key")
    )
    assert code == 0, output
    kit = workdir / "kit"
    assert (kit / "client.key").stat().st_mode & 0o777 == 0o600
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca), "-purpose", "sslclient", str(kit / "client.pem")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    cert = x509.load_pem_x509_certificate((kit / "client.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DEVICE
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage
    toml = (kit / "agent.toml").read_text()
    assert 'cert_file = "/etc/edgekit/client.pem"' in toml
    unit = (kit / "edgekit-agent.service").read_text()
    assert "LoadCredential=mqtt-client-key:/etc/edgekit/client.key" in unit


def test_client_certificate_kit_connects_to_a_broker_that_requires_one(
    workdir: Path, fleet_kit: FleetKit
) -> None:
    """broker-config --require-client-cert: the kit's certificate and password get the device
    in over TLS; the password alone does not."""
    tls = make_tls_files(workdir / "tls")
    ca = tls[0]
    port, service_port = free_port(), free_port()
    code, output = _invoke(
        "fleet", "provision", DEVICE, "--fleet", FLEET, "--profile", "x86-64",
        "--broker", f"mqtts://127.0.0.1:{port}", "--broker-ca", str(ca),
        "--truststore", str(fleet_kit.truststore_path),
        "--client-ca", str(ca), "--client-ca-key", str(workdir / "tls" / "ca.key"),
        "--devices", str(workdir / "devices.csv"), "--broker-config", str(workdir / "broker"),
        "--config-dir", str(workdir / "kit"), "-o", str(workdir / "kit"),
    )  # fmt: skip
    assert code == 0, output
    kit = workdir / "kit"
    config = load_config(kit / "agent.toml", environ={})
    assert config.mqtt.cert_file == kit / "client.pem"
    broker = _start_broker(workdir, tls, port, service_port, "--require-client-cert")
    try:
        client = MqttClient(config.mqtt, client_id=f"edgekit-agent-{DEVICE}").connect()
        try:
            handle = client.publish(Topics(FLEET).status(DEVICE), b"{}", retain=False)
            assert handle.wait(10)
        finally:
            client.stop()
        without = dataclasses.replace(config.mqtt, cert_file=None, key_file=None)
        with pytest.raises(TransportError):
            MqttClient(without, client_id="edgekit-agent-x", retry_refused=False).connect(
                timeout_s=3
            )
    finally:
        _stop(broker)


# -- the systemd unit ----------------------------------------------------------------------------


@pytest.mark.skipif(not SYSTEMD_ANALYZE.exists(), reason="no /usr/bin/systemd-analyze")
@pytest.mark.parametrize("data_dir", ["/var/lib/edgekit-agent", "/srv/edgekit/data"])
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, data_dir: str) -> None:
    # ExecStart must exist for `verify`: point the venv at this interpreter's.
    venv = Path(sys.executable).parent.parent
    layout = InstallLayout(data_dir=Path(data_dir), venv=venv)
    assert (venv / "bin" / "edgekit-agent").exists()
    unit = tmp_path / "edgekit-agent.service"
    unit.write_text(render_agent_unit(layout, secrets={"mqtt-password", "client.key"}))
    checked = subprocess.run(
        [str(SYSTEMD_ANALYZE), "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stderr
    assert "edgekit-agent.service" not in checked.stdout + checked.stderr  # no warnings
    text = unit.read_text()
    assert "User=edgekit-agent" in text and "DynamicUser" not in text
    assert f"ExecStart={venv}/bin/edgekit-agent run --config /etc/edgekit/agent.toml" in text
    if data_dir.startswith("/var/lib/"):
        assert "StateDirectory=edgekit-agent" in text
    else:
        assert f"ReadWritePaths={data_dir}" in text
    # The sandbox is the one packaging/edgekit-agent.service ships, line for line.
    shipped = (REPO / "packaging" / "edgekit-agent.service").read_text()
    start = shipped.index("NoNewPrivileges=yes")
    sandbox = shipped[start : shipped.index("[Install]")].strip()
    assert sandbox in text


# -- install.sh ----------------------------------------------------------------------------------


def _install(kit: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(kit / "install.sh"), "--root", str(root), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def test_install_script_installs_under_a_fake_root(workdir: Path, fleet_kit: FleetKit) -> None:
    code, output = _provision(
        workdir, fleet_kit, "--factory-bundle", str(fleet_kit.bundle("1.0.0"))
    )
    assert code == 0, output
    kit = workdir / "kit"
    assert subprocess.run(["bash", "-n", str(kit / "install.sh")], check=False).returncode == 0
    root = workdir / "root"
    # --skip-venv: an image that ships the venv; the script still checks the agent is there.
    missing = _install(kit, root, "--skip-venv")
    assert missing.returncode == 2 and "edgekit-agent is missing" in missing.stderr
    stub = root / "opt/edgekit/venv/bin/edgekit-agent"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    installed = _install(kit, root, "--skip-venv")
    assert installed.returncode == 0, installed.stderr
    assert "--root: systemd not touched" in installed.stdout
    modes = {
        "etc/edgekit/agent.toml": 0o640,
        "etc/edgekit/mqtt-password": 0o600,
        "etc/edgekit/truststore.json": 0o644,
        "etc/edgekit/factory.ekb": 0o644,
        "etc/systemd/system/edgekit-agent.service": 0o644,
        "var/lib/edgekit-agent": 0o700,
    }
    for name, mode in modes.items():
        assert (root / name).stat().st_mode & 0o777 == mode, name
    assert (root / "etc/edgekit/agent.toml").read_bytes() == (kit / "agent.toml").read_bytes()
    shown = subprocess.run(
        ["bash", str(kit / "install.sh"), "--help"], capture_output=True, text=True, check=False
    )
    assert shown.returncode == 0 and "--wheel PATH" in shown.stdout
    assert "set -euo" not in shown.stdout  # the comment block only
    bad = _install(kit, root, "--bogus")
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="setting owners needs root")
def test_install_script_gives_the_service_user_its_files(
    workdir: Path, fleet_kit: FleetKit
) -> None:
    """With the service user present (here `nobody`, an existing account), install.sh makes
    the data dir the user's, agent.toml root's but readable by the user's group, secrets
    root's alone."""
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody on this host")
    code, output = _provision(workdir, fleet_kit, "--service-user", "nobody")
    assert code == 0, output
    kit, root = workdir / "kit", workdir / "root"
    stub = root / "opt/edgekit/venv/bin/edgekit-agent"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    installed = _install(kit, root, "--skip-venv")
    assert installed.returncode == 0, installed.stderr
    owners = {
        "etc/edgekit/agent.toml": (0, user.pw_gid, 0o640),
        "etc/edgekit/mqtt-password": (0, 0, 0o600),
        "etc/edgekit/truststore.json": (0, 0, 0o644),
        "var/lib/edgekit-agent": (user.pw_uid, user.pw_gid, 0o700),
    }
    for name, (uid, gid, mode) in owners.items():
        status = (root / name).stat()
        assert (status.st_uid, status.st_gid, status.st_mode & 0o777) == (uid, gid, mode), name
    assert "User=nobody" in (root / "etc/systemd/system/edgekit-agent.service").read_text()


def _fake_edgekit_wheel(folder: Path) -> Path:
    """A wheel named edgekit with an `edgekit-agent` entry point: pip installs it offline."""
    wheel = folder / "edgekit-0.0.1-py3-none-any.whl"
    info = "edgekit-0.0.1.dist-info"
    files = {
        "edgekit_fake_agent.py": "def main():\n    print('fake agent')\n",
        f"{info}/METADATA": (
            "Metadata-Version: 2.1\nName: edgekit\nVersion: 0.0.1\nProvides-Extra: agent\n"
        ),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
        f"{info}/entry_points.txt": "[console_scripts]\nedgekit-agent = edgekit_fake_agent:main\n",
    }
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        archive.writestr(
            f"{info}/RECORD", "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
        )
    return wheel


@pytest.mark.slow
def test_install_script_makes_the_venv_from_a_local_wheel(
    workdir: Path, fleet_kit: FleetKit
) -> None:
    code, output = _provision(workdir, fleet_kit)
    assert code == 0, output
    root = workdir / "root"
    wheel = _fake_edgekit_wheel(workdir)
    installed = _install(
        workdir / "kit",
        root,
        "--python",
        sys.executable,
        "--wheel",
        str(wheel),
        "--pip-args",
        "--no-index --no-deps",
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert re.search(r"installing /\S+edgekit-0\.0\.1-py3-none-any\.whl\[agent\]", installed.stdout)
    agent = root / "opt/edgekit/venv/bin/edgekit-agent"
    ran = subprocess.run([str(agent)], capture_output=True, text=True, check=False)
    assert ran.stdout == "fake agent\n"


def test_devices_csv_rows_survive_provisioning(workdir: Path, fleet_kit: FleetKit) -> None:
    """Other devices' rows (and their columns) are kept; the CSV is what broker-config reads."""
    devices = workdir / "devices.csv"
    devices.write_text("device_id,profile,group,tags\nold-1,raspberrypi,line-2,site=a\n")
    code, output = _provision(workdir, fleet_kit, "--group", "line-1", "--tag", "rack=3")
    assert code == 0, output
    rows = read_devices_csv(devices)
    assert rows == [
        DeviceAccount("old-1", None, "raspberrypi", "line-2", {"site": "a"}),
        DeviceAccount(DEVICE, None, "x86-64", "line-1", {"rack": "3"}),
    ]
