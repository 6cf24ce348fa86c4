"""Run Python code as the device's CPU would: aarch64 under user-mode QEMU, on this host.

What it builds, each cached and built atomically like the runtime venvs
(`edgekit.verify_runtime.build_cached`: built in `.KEY.build-*`, locked by `KEY.lock`, renamed
into place after a marker file is fsynced):

- a **sysroot**: Debian bookworm arm64 (Python 3.11, libstdc++ and their dependencies, the
  userland of Raspberry Pi OS 12), made from `.deb` files with a private apt state
  (`apt-get -o APT::Architecture=arm64 ... download`, `dpkg -x`): the host's own package state
  is never touched. Beside it, one view per CPU model (`cpu/<name>/`: links to the tree plus a
  `proc/cpuinfo` of that core), because onnxruntime >= 1.2x and LiteRT read `/proc/cpuinfo`
  and crash on the host's x86 one; QEMU's `-L` prefix makes them read the view's file;
- an **environment** per requirement set (a runtime version, or `edgekit[agent]`): a venv
  layout whose `bin/python` is the sysroot's interpreter and whose site-packages hold the
  aarch64 manylinux wheels, installed from this host with `uv` (or pip) for the target
  platform. It runs as `qemu-aarch64-static -L SYSROOT/cpu/<cpu> -cpu <cpu> ENV/bin/python ...`
  (`EmulatedEnvironment.command`).

Emulation proves what runs and what it computes with the device's instruction set and the
kernels its runtime picks for that CPU (e.g. onnxruntime's dot-product int8 path on a
Cortex-A76, none on an A72). Times measured under it are the emulator's, not the device's:
reports label them `emulated`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from edgekit.errors import EdgekitError, first_line
from edgekit.profiles import EMULATED_CPUS, RuntimePin
from edgekit.verify_runtime import (
    RuntimeInstallError,
    _clean_env,
    _stream,
    build_cached,
    default_cache_dir,
    make_cache_root,
    runtime_requirements,
)

__all__ = [
    "SYSROOT_PYTHON",
    "SYSROOT_SUITE",
    "EmulatedEnvironment",
    "EmulationCache",
    "EmulationError",
    "Installer",
    "Sysroot",
    "cpuinfo_text",
    "emulation_env",
    "find_qemu",
    "runtime_module",
]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str], None]
Installer = Literal["uv", "pip"]

# Raspberry Pi OS 12 is bookworm: its Python (3.11) decides which wheels a Pi installs.
SYSROOT_SUITE = "bookworm"
SYSROOT_PYTHON = "3.11"
# Bump when the sysroot or environment layout changes: old entries are simply not found.
_LAYOUT = "1"
_SYSROOT_MARKER = "edgekit-sysroot.json"
_ENV_MARKER = "edgekit-runtime.json"
_SYSROOT_ROOTS = ("python3.11", "libstdc++6")
# In the dependency closure but useless for running Python (and perl is most of the size).
_SYSROOT_SKIP = frozenset(
    {
        "dpkg",
        "tar",
        "install-info",
        "perl",
        "perl-base",
        "perl-modules-5.36",
        "libperl5.36",
        "mailcap",
        "mime-support",
        "libgdbm-compat4",
    }
)
_DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# bookworm's glibc is 2.36: every manylinux tag up to it installs there. pip 23 needs each tag
# listed to find wheels tagged only with a newer one (ai-edge-litert: manylinux_2_27+).
_GLIBC_MINOR = 36
_APT_TIMEOUT_S = 600.0
_CHECK_TIMEOUT_S = 900.0
# The CPU the import check runs on: the most capable non-`max` model.
_CHECK_CPU = "neoverse-n1"
_RUNTIME_MODULES = {
    "onnxruntime": "onnxruntime",
    "tflite-runtime": "tflite_runtime.interpreter",
    "ai-edge-litert": "ai_edge_litert.interpreter",
    "tensorflow": "tensorflow",
}
_DEBIAN_ARCH = {"aarch64": "arm64"}
_WHEEL_ARCH = {"aarch64": "aarch64"}


class EmulationError(EdgekitError):
    """This host cannot emulate the device (no QEMU, not a Debian host, no Debian mirror)."""


# ---------------------------------------------------------------------------------------------
# CPUs


@dataclass(frozen=True)
class _Core:
    implementer: str
    part: str
    variant: str
    revision: int
    features: str


# What Linux shows in /proc/cpuinfo on these cores. The Pi 4's BCM2711 and the Pi Zero 2's
# RP3A0 have no crypto extensions; the Pi 5's BCM2712 (A76) has them and the dot product.
_CORES: dict[str, _Core] = {
    "cortex-a35": _Core(
        "0x41", "0xd04", "0x0", 2, "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"
    ),
    "cortex-a53": _Core("0x41", "0xd03", "0x0", 4, "fp asimd evtstrm crc32 cpuid"),
    "cortex-a57": _Core(
        "0x41", "0xd07", "0x1", 3, "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"
    ),
    "cortex-a72": _Core("0x41", "0xd08", "0x0", 3, "fp asimd evtstrm crc32 cpuid"),
    "cortex-a76": _Core(
        "0x41",
        "0xd0b",
        "0x4",
        1,
        "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc "
        "dcpop asimddp",
    ),
    "neoverse-n1": _Core(
        "0x41",
        "0xd0c",
        "0x3",
        1,
        "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc "
        "dcpop asimddp ssbs",
    ),
}


def cpuinfo_text(cpu: str, *, cores: int = 4) -> str:
    """The `/proc/cpuinfo` an aarch64 Linux shows on `cores` cores of model `cpu`."""
    core = _CORES.get(cpu)
    if core is None:
        raise EmulationError(
            f"no /proc/cpuinfo known for CPU {cpu!r}; expected one of {', '.join(_CORES)}"
        )
    block = (
        "processor\t: {index}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\n"
        "CPU implementer\t: {implementer}\nCPU architecture: 8\nCPU variant\t: {variant}\n"
        "CPU part\t: {part}\nCPU revision\t: {revision}\n\n"
    )
    return "".join(
        block.format(
            index=index,
            features=core.features,
            implementer=core.implementer,
            variant=core.variant,
            part=core.part,
            revision=core.revision,
        )
        for index in range(cores)
    )


def find_qemu(arch: str) -> Path:
    """The user-mode QEMU for `arch` (`qemu-aarch64-static`); raises `EmulationError`."""
    if arch not in EMULATED_CPUS:
        raise EmulationError(f"edgekit cannot emulate {arch} devices")
    for name in (f"qemu-{arch}-static", f"qemu-{arch}"):
        found = shutil.which(name) or (
            f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None
        )
        if found:
            return Path(found)
    raise EmulationError(
        f"qemu-{arch}-static is not installed, so {arch} devices cannot be emulated here; "
        "install it (Debian/Ubuntu: `apt-get install qemu-user-static`) or check on the host "
        "only (`--emulation off`)"
    )


def runtime_module(package: str) -> str:
    """The module a runtime package is imported as."""
    return _RUNTIME_MODULES.get(package, package.replace("-", "_"))


# ---------------------------------------------------------------------------------------------
# Sysroot


@dataclass(frozen=True)
class Sysroot:
    """A Debian arm64 tree with Python, and one `-L` view per CPU model."""

    path: Path
    arch: str
    created: bool

    @property
    def python(self) -> Path:
        """The tree's interpreter (an aarch64 ELF file)."""
        return self.path / "base" / "usr" / "bin" / f"python{SYSROOT_PYTHON}"

    def view(self, cpu: str) -> Path:
        """The `-L` prefix for `cpu`: the tree, plus that core's `/proc/cpuinfo`."""
        folder = self.path / "cpu" / cpu
        if not (folder / "proc" / "cpuinfo").is_file():
            raise EmulationError(
                f"the sysroot {self.path} has no view for CPU {cpu!r}; expected one of "
                f"{', '.join(EMULATED_CPUS.get(self.arch, ()))}"
            )
        return folder


def _apt_sources(debian_arch: str) -> str:
    """A sources.list for bookworm on this host's Debian mirror (or `$EDGEKIT_SYSROOT_SOURCES`)."""
    explicit = os.environ.get("EDGEKIT_SYSROOT_SOURCES")
    if explicit:
        try:
            return Path(explicit).read_text(encoding="utf-8")
        except OSError as e:
            raise EmulationError(
                f"cannot read EDGEKIT_SYSROOT_SOURCES={explicit}: {e.strerror or e}"
            ) from e
    main, security = _host_debian_mirrors()
    if main is None:
        raise EmulationError(
            "no Debian mirror found in /etc/apt/sources.list{,.d/*} to fetch the arm64 sysroot "
            "from; set EDGEKIT_SYSROOT_SOURCES to a sources.list naming a Debian bookworm mirror"
        )
    if not _DEBIAN_KEYRING.is_file():
        raise EmulationError(
            f"{_DEBIAN_KEYRING} is missing, so the sysroot's packages cannot be verified; "
            "install the debian-archive-keyring package"
        )
    options = f"[arch={debian_arch} signed-by={_DEBIAN_KEYRING}]"
    lines = [
        f"deb {options} {main} {SYSROOT_SUITE} main",
        f"deb {options} {main} {SYSROOT_SUITE}-updates main",
    ]
    if security is not None:
        lines.append(f"deb {options} {security} {SYSROOT_SUITE}-security main")
    return "\n".join(lines) + "\n"


def _host_debian_mirrors() -> tuple[str | None, str | None]:
    """The URIs of the host's Debian archive and security archive, from its apt sources."""
    uris: list[str] = []
    folder = Path("/etc/apt/sources.list.d")
    files = [Path("/etc/apt/sources.list")]
    if folder.is_dir():
        files += sorted(folder.glob("*.list")) + sorted(folder.glob("*.sources"))
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if line.startswith("URIs:"):
                uris.extend(line.removeprefix("URIs:").split())
            elif line.startswith("deb "):
                words = [w for w in line.split() if not w.startswith("[") and not w.endswith("]")]
                if len(words) >= 2 and "=" not in words[1]:
                    uris.append(words[1])
    main = next((uri.rstrip("/") for uri in uris if uri.rstrip("/").endswith("/debian")), None)
    security = next(
        (uri.rstrip("/") for uri in uris if uri.rstrip("/").endswith("/debian-security")), None
    )
    return main, security


def _apt_options(state: Path, debian_arch: str) -> list[str]:
    """apt options for a private state under `state`: the host's lists, cache, status and
    architecture settings are neither read nor written."""
    settings = {
        "APT::Architecture": debian_arch,
        "APT::Architectures::": debian_arch,
        "Dir::State": state,
        "Dir::State::Lists": state / "lists",
        "Dir::State::status": state / "status",
        "Dir::Cache": state / "cache",
        "Dir::Etc::SourceList": state / "sources.list",
        "Dir::Etc::SourceParts": state / "sources.list.d",
        "Dir::Etc::Preferences": state / "preferences",
        "Dir::Etc::PreferencesParts": state / "preferences.d",
        "Dir::Etc::Trusted": state / "trusted.gpg",
        "Dir::Etc::TrustedParts": state / "trusted.gpg.d",
        "APT::Sandbox::User": "root" if os.geteuid() == 0 else "",
        "Debug::NoLocking": "1",
    }
    options: list[str] = []
    for key, value in settings.items():
        if value == "":
            continue
        options += ["-o", f"{key}={value}"]
    return options


def _run_tool(command: Sequence[str], *, what: str, cwd: Path | None = None) -> str:
    try:
        completed = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=_APT_TIMEOUT_S,
            check=False,
            cwd=cwd,
            env={**_clean_env(), "LC_ALL": "C"},
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EmulationError(f"{what} failed: {first_line(e)}") from e
    if completed.returncode != 0:
        lines = (completed.stderr or completed.stdout).strip().splitlines()
        errors = [line for line in lines if line.startswith(("E:", "dpkg"))] or lines
        raise EmulationError(f"{what} failed: {errors[-1] if errors else 'no output'}")
    return completed.stdout


def _build_sysroot(folder: Path, *, arch: str, progress: ProgressCallback | None) -> dict[str, Any]:
    debian_arch = _DEBIAN_ARCH[arch]
    for tool in ("apt-get", "apt-cache", "dpkg"):
        if shutil.which(tool) is None:
            raise EmulationError(
                f"{tool} is not installed: building the {arch} sysroot needs a Debian-based host"
            )
    state = folder / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "trusted.gpg.d").mkdir()
    (state / "status").touch()
    (state / "sources.list").write_text(_apt_sources(debian_arch), encoding="utf-8")
    options = _apt_options(state, debian_arch)
    if progress is not None:
        progress(f"building the {arch} sysroot: reading Debian {SYSROOT_SUITE} package lists")
    _run_tool(["apt-get", *options, "-q", "update"], what=f"apt-get update ({debian_arch})")
    listing = _run_tool(
        [
            "apt-cache", *options, "depends", "--recurse", "--no-recommends", "--no-suggests",
            "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *_SYSROOT_ROOTS,
        ],
        what="resolving the sysroot's packages",
    )  # fmt: skip
    packages = sorted(
        {
            line.strip()
            for line in listing.splitlines()
            if line and not line.startswith((" ", "<")) and line.strip() not in _SYSROOT_SKIP
        }
    )
    debs = folder / "debs"
    debs.mkdir()
    if progress is not None:
        progress(f"building the {arch} sysroot: downloading {len(packages)} packages")
    _run_tool(
        ["apt-get", *options, "-q", "download", *packages],
        what="downloading the sysroot's packages",
        cwd=debs,
    )
    base = folder / "base"
    base.mkdir()
    versions: dict[str, str] = {}
    for deb in sorted(debs.glob("*.deb")):
        name, version = deb.name.split("_")[:2]
        versions[name] = version.replace("%3a", ":")
        _run_tool(["dpkg", "-x", str(deb), str(base)], what=f"unpacking {deb.name}")
    shutil.rmtree(debs)
    shutil.rmtree(state)
    python = base / "usr" / "bin" / f"python{SYSROOT_PYTHON}"
    if not python.is_file():
        raise EmulationError(f"the sysroot has no {python.relative_to(base)} after unpacking")
    for cpu in EMULATED_CPUS[arch]:
        view = folder / "cpu" / cpu
        (view / "proc").mkdir(parents=True)
        (view / "proc" / "cpuinfo").write_text(cpuinfo_text(cpu), encoding="utf-8")
        for entry in base.iterdir():
            (view / entry.name).symlink_to(Path("..", "..", "base", entry.name))
    return {
        "arch": arch,
        "suite": SYSROOT_SUITE,
        "python": SYSROOT_PYTHON,
        "packages": versions,
        "cpus": list(EMULATED_CPUS[arch]),
    }


# ---------------------------------------------------------------------------------------------
# Environments


@dataclass(frozen=True)
class EmulatedEnvironment:
    """A cached aarch64 environment: the sysroot's Python plus aarch64 wheels."""

    path: Path
    sysroot: Sysroot
    qemu: Path
    requirements: tuple[str, ...]
    created: bool  # False: found in the cache
    seconds: float  # time spent getting it (building, or just checking the cache)
    installer: str  # what installed the wheels: "uv" or "pip" (from the marker when cached)

    @property
    def python(self) -> Path:
        """The environment's interpreter (run it with `command`, not directly)."""
        return self.path / "bin" / "python"

    @property
    def site_packages(self) -> Path:
        """Where the wheels are installed."""
        return self.path / "lib" / f"python{SYSROOT_PYTHON}" / "site-packages"

    def command(self, argv: Sequence[str], *, cpu: str) -> list[str]:
        """`python argv...` in this environment, emulating `cpu` (e.g. `cortex-a72`)."""
        return [
            str(self.qemu),
            "-L",
            str(self.sysroot.view(cpu)),
            "-cpu",
            cpu,
            str(self.python),
            *argv,
        ]


def emulation_env() -> dict[str, str]:
    """The environment for emulated processes: ours, minus settings that would redirect QEMU
    or the guest Python."""
    return {key: value for key, value in _clean_env().items() if not key.startswith("QEMU_")}


class EmulationCache:
    """Builds and caches the sysroot and the aarch64 environments (beside the runtime venvs).

    A build that failed is remembered for the rest of the process, so checking several CPUs
    or candidates does not retry it.
    """

    _failures: ClassVar[dict[str, str]] = {}

    def __init__(
        self, root: Path | None = None, *, arch: str = "aarch64", installer: Installer | None = None
    ) -> None:
        if arch not in EMULATED_CPUS:
            raise EmulationError(f"edgekit cannot emulate {arch} devices")
        self.root = Path(root) if root is not None else default_cache_dir()
        self.arch = arch
        self.installer = installer

    # -- the sysroot

    def sysroot_key(self) -> str:
        """`sysroot-debian-bookworm-arm64-<hash of the recipe>`."""
        recipe: list[Any] = [_LAYOUT, SYSROOT_SUITE, list(_SYSROOT_ROOTS), sorted(_SYSROOT_SKIP)]
        recipe.append({cpu: cpuinfo_text(cpu) for cpu in EMULATED_CPUS[self.arch]})
        digest = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:10]
        return f"sysroot-debian-{SYSROOT_SUITE}-{_DEBIAN_ARCH[self.arch]}-{digest}"

    def sysroot(self, *, progress: ProgressCallback | None = None) -> Sysroot:
        """The cached sysroot, built first if needed (~5 s and ~65 MB on a fast mirror)."""
        key = self.sysroot_key()
        make_cache_root(self.root)
        self._raise_remembered(key)
        try:
            path, created = build_cached(
                self.root,
                key,
                build=lambda folder: _build_sysroot(folder, arch=self.arch, progress=progress),
                what=f"the {self.arch} sysroot",
                progress=progress,
                marker=_SYSROOT_MARKER,
                ready=lambda folder: (folder / _SYSROOT_MARKER).is_file(),
            )
        except EmulationError as e:
            EmulationCache._failures[str(self.root / key)] = str(e)
            raise
        return Sysroot(path, self.arch, created)

    # -- environments

    def key(self, requirements: Sequence[str], *, label: str) -> str:
        """`<label>-cp311-linux_aarch64-<hash of requirements and sysroot>`."""
        tag = "cp" + SYSROOT_PYTHON.replace(".", "")
        digest = hashlib.sha256(
            json.dumps([_LAYOUT, self.sysroot_key(), list(requirements)]).encode()
        ).hexdigest()[:10]
        return f"{label}-{tag}-linux_{_WHEEL_ARCH[self.arch]}-{digest}"

    def runtime(
        self, pin: RuntimePin, *, progress: ProgressCallback | None = None
    ) -> EmulatedEnvironment:
        """The aarch64 environment holding exactly `pin` (requirements as for the host venvs)."""
        return self.environment(
            runtime_requirements(pin),
            label=f"{pin.package}-{pin.version}",
            modules=("numpy", runtime_module(pin.package)),
            progress=progress,
        )

    def environment(
        self,
        requirements: Sequence[str],
        *,
        label: str,
        modules: Sequence[str] = (),
        progress: ProgressCallback | None = None,
    ) -> EmulatedEnvironment:
        """The cached environment holding `requirements` (pip requirement strings, local wheel
        paths included), built first if needed; `modules` must import in it under emulation.
        Raises `RuntimeInstallError` (no aarch64 wheel, no index) or `EmulationError`."""
        started = time.monotonic()
        qemu = find_qemu(self.arch)
        sysroot = self.sysroot(progress=progress)
        key = self.key(requirements, label=label)
        self._raise_remembered(key)

        def build(folder: Path) -> dict[str, Any]:
            used = self._install(folder, requirements, sysroot=sysroot, progress=progress)
            environment = EmulatedEnvironment(
                folder, sysroot, qemu, tuple(requirements), True, 0.0, used
            )
            if modules:
                if progress is not None:
                    progress(f"importing {', '.join(modules)} under emulation ({label})")
                _check_emulated_import(environment, modules)
            return {
                "requirements": list(requirements),
                "arch": self.arch,
                "python": SYSROOT_PYTHON,
                "sysroot": sysroot.path.name,
                "installer": used,
            }

        try:
            path, created = build_cached(
                self.root,
                key,
                build=build,
                what=f"{label} ({self.arch})",
                progress=progress,
                marker=_ENV_MARKER,
                ready=lambda folder: (folder / _ENV_MARKER).is_file(),
            )
        except (RuntimeInstallError, EmulationError) as e:
            EmulationCache._failures[str(self.root / key)] = str(e)
            raise
        installer = "unknown"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            installer = str(json.loads((path / _ENV_MARKER).read_text())["installer"])
        return EmulatedEnvironment(
            path,
            sysroot,
            qemu,
            tuple(requirements),
            created,
            time.monotonic() - started,
            installer,
        )

    def _raise_remembered(self, key: str) -> None:
        failure = EmulationCache._failures.get(str(self.root / key))
        if failure is not None:
            raise RuntimeInstallError(failure)

    def _install(
        self,
        folder: Path,
        requirements: Sequence[str],
        *,
        sysroot: Sysroot,
        progress: ProgressCallback | None,
    ) -> str:
        site = folder / "lib" / f"python{SYSROOT_PYTHON}" / "site-packages"
        site.mkdir(parents=True)
        (folder / "bin").mkdir()
        # A venv whose home is the device's /usr/bin: QEMU's -L maps it into the sysroot.
        (folder / "bin" / "python").symlink_to(sysroot.python)
        (folder / "pyvenv.cfg").write_text(
            f"home = /usr/bin\ninclude-system-site-packages = false\nversion = {SYSROOT_PYTHON}\n",
            encoding="utf-8",
        )
        installer = self.installer or _default_installer()
        command = _install_command(installer, site, requirements, arch=self.arch)
        what = " ".join(requirements)
        lines = _stream(command, progress=progress, prefix=f"installing {what} ({self.arch}): ")
        if lines is None:
            return installer
        raise RuntimeInstallError(
            _failure(requirements, lines, installer=installer, arch=self.arch)
        )


# uv's diagnostics start with these (a cross and an arrow).
_UV_MARKS = "\u00d7\u2570\u2500\u25b6"


def _failure(
    requirements: Sequence[str], lines: Sequence[str], *, installer: str, arch: str
) -> str:
    """One line saying why the wheels could not be installed (pip's or uv's words)."""
    text = [line.strip() for line in lines if line.strip()]
    marked = [
        line.removeprefix("ERROR:").removeprefix("error:").lstrip(_UV_MARKS + " ").strip()
        for line in text
        if line.startswith(("ERROR", "error", *_UV_MARKS)) or "because" in line.lower()
    ]
    detail = marked[-1] if marked else (text[-1] if text else f"{installer} failed without output")
    what = " ".join(requirements)
    where = f"cp{SYSROOT_PYTHON.replace('.', '')} manylinux {arch}"
    missing = ("No matching distribution", "Could not find a version", "no version of",
               "No solution found", "no wheels", "not available")  # fmt: skip
    if any(word.lower() in line.lower() for line in text for word in missing):
        return (
            f"{what} cannot be installed for {arch}: no {where} wheel on the configured package "
            f"index ({installer}: {detail})"
        )
    return f"{what} cannot be installed for {arch} ({where}): {installer}: {detail}"


def _default_installer() -> Installer:
    """uv when it is installed (`$EDGEKIT_INSTALLER` = uv or pip decides), else pip."""
    chosen = os.environ.get("EDGEKIT_INSTALLER", "")
    if chosen == "pip":
        return "pip"
    if _uv() is not None:
        return "uv"
    if chosen == "uv":
        raise EmulationError("EDGEKIT_INSTALLER=uv but uv is not installed (pip install uv)")
    return "pip"


def _uv() -> Path | None:
    try:
        from uv import find_uv_bin  # the `uv` package on PyPI ships the binary

        return Path(find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        return Path(found) if found else None


def _install_command(
    installer: Installer, site: Path, requirements: Sequence[str], *, arch: str
) -> list[str]:
    wheel_arch = _WHEEL_ARCH[arch]
    version = SYSROOT_PYTHON
    if installer == "uv":
        uv = _uv()
        if uv is None:
            raise EmulationError("uv is not installed (pip install uv)")
        return [
            str(uv), "pip", "install", "--target", str(site),
            "--python", sys.executable, "--python-version", version,
            "--python-platform", f"{wheel_arch}-manylinux_2_{_GLIBC_MINOR}",
            "--only-binary", ":all:", "--no-python-downloads", "--no-progress",
            *_uv_index_options(), *requirements,
        ]  # fmt: skip
    platforms: list[str] = []
    for minor in range(17, _GLIBC_MINOR + 1):
        platforms += ["--platform", f"manylinux_2_{minor}_{wheel_arch}"]
    return [
        sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
        "--no-warn-conflicts", "--target", str(site), *platforms,
        "--platform", f"manylinux2014_{wheel_arch}", "--python-version", version,
        "--implementation", "cp", "--abi", "cp" + version.replace(".", ""),
        "--only-binary=:all:", "--no-compile", "--progress-bar", "off", *requirements,
    ]  # fmt: skip


def _uv_index_options() -> list[str]:
    """pip's configured package sources (pip.conf and PIP_* variables) as uv options, so both
    installers read the same index; uv's own UV_* settings still apply on top."""
    settings: dict[str, list[str]] = {}
    try:
        listing = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=_clean_env(),
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        listing = ""
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in ("index-url", "extra-index-url", "find-links", "no-index"):
            settings.setdefault(name, []).extend(value.strip().strip("'\"").split())
    for name in ("index-url", "extra-index-url", "find-links", "no-index"):
        variable = "PIP_" + name.upper().replace("-", "_")
        if variable in os.environ:
            settings[name] = os.environ[variable].split()
    options: list[str] = []
    for url in settings.get("index-url", [])[:1]:
        options += ["--index-url", url]
    for url in settings.get("extra-index-url", []):
        options += ["--extra-index-url", url]
    for location in settings.get("find-links", []):
        if location:
            options += ["--find-links", location]
    if any(value.lower() in ("1", "true", "yes", "on") for value in settings.get("no-index", [])):
        options.append("--no-index")
    if settings.get("extra-index-url") or settings.get("find-links"):
        options += ["--index-strategy", "unsafe-best-match"]  # pip's rule: best over all
    return options


def _check_emulated_import(environment: EmulatedEnvironment, modules: Sequence[str]) -> None:
    command = environment.command(["-I", "-c", f"import {', '.join(modules)}"], cpu=_CHECK_CPU)
    what = f"importing {', '.join(modules)} under emulation after installing " + " ".join(
        environment.requirements
    )
    try:
        completed = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=_CHECK_TIMEOUT_S,
            env=emulation_env(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeInstallError(f"{what} failed: {first_line(e)}") from e
    if completed.returncode != 0:
        detail = (completed.stderr or completed.stdout).strip().splitlines()
        how = f"signal {-completed.returncode}" if completed.returncode < 0 else "an error"
        raise RuntimeInstallError(
            f"{what} failed with {how}: {detail[-1] if detail else 'no output'}"
        )
