"""Ed25519 keys: the in-memory types every trust module uses, and the operator's keyring.

This is the only trust module that touches key files. The keyring is a directory
(`$EDGEKIT_HOME/keys`, `EDGEKIT_HOME` defaulting to `~/.config/edgekit`) holding `NAME.key`
(PKCS#8 PEM encrypted with a passphrase, mode 0600) and `NAME.pub` (SubjectPublicKeyInfo PEM).
A key id is the hex sha256 of the raw 32-byte public key, the same everywhere: envelopes,
trust stores, CLI output.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgekit.trust._schema import NAME_PATTERN
from edgekit.trust.errors import KeyringError

__all__ = [
    "HOME_ENV",
    "PASSPHRASE_ENV",
    "KeyInfo",
    "PublicKey",
    "Signer",
    "default_keyring_dir",
    "export_public",
    "generate_key",
    "key_id",
    "list_keys",
    "load_keyring_public_keys",
    "load_private_key",
    "load_public_key",
]

logger = logging.getLogger(__name__)

HOME_ENV = "EDGEKIT_HOME"
"""Environment variable naming edgekit's configuration directory (default ~/.config/edgekit)."""
PASSPHRASE_ENV = "EDGEKIT_KEY_PASSPHRASE"  # noqa: S105 - a variable name, not a secret
"""Environment variable the CLI reads a key passphrase from instead of prompting."""

_RAW_KEY_BYTES = 32
_SIGNATURE_BYTES = 64


def key_id(raw_public_key: bytes) -> str:
    """The key id of an Ed25519 public key: hex sha256 of its raw 32 bytes."""
    return hashlib.sha256(raw_public_key).hexdigest()


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key, identified by `keyid`."""

    raw: bytes
    keyid: str = field(init=False)

    def __post_init__(self) -> None:
        if len(self.raw) != _RAW_KEY_BYTES:
            raise KeyringError(
                f"an Ed25519 public key is {_RAW_KEY_BYTES} bytes; found {len(self.raw)}"
            )
        object.__setattr__(self, "keyid", key_id(self.raw))

    @classmethod
    def from_hex(cls, text: str) -> PublicKey:
        """Parse the lowercase hex of a raw public key (the trust store's `public` field)."""
        try:
            raw = bytes.fromhex(text)
        except ValueError as e:
            raise KeyringError(f"public key must be hex; found {text[:80]!r}") from e
        return cls(raw)

    @classmethod
    def from_pem(cls, data: bytes) -> PublicKey:
        """Parse a SubjectPublicKeyInfo PEM holding an Ed25519 key."""
        try:
            loaded = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as e:
            raise KeyringError(f"not a PEM public key: {e}") from e
        if not isinstance(loaded, Ed25519PublicKey):
            raise KeyringError(
                f"expected an Ed25519 public key; found {type(loaded).__name__}: "
                "generate one with `edgekit keys generate NAME`"
            )
        return cls(loaded.public_bytes_raw())

    @property
    def hex(self) -> str:
        """Lowercase hex of the raw key."""
        return self.raw.hex()

    def to_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM."""
        return Ed25519PublicKey.from_public_bytes(self.raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Whether `signature` is this key's valid Ed25519 signature over `data`."""
        if len(signature) != _SIGNATURE_BYTES:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True, eq=False)
class Signer:
    """An Ed25519 private key able to sign; `keyid` names its public half."""

    private_key: Ed25519PrivateKey
    public_key: PublicKey = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "public_key", PublicKey(self.private_key.public_key().public_bytes_raw())
        )

    @classmethod
    def generate(cls) -> Signer:
        """A fresh in-memory key (tests, ephemeral use); `generate_key` persists one."""
        return cls(Ed25519PrivateKey.generate())

    @property
    def keyid(self) -> str:
        """The key id of the public half."""
        return self.public_key.keyid

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature over `data`."""
        return self.private_key.sign(data)


@dataclass(frozen=True)
class KeyInfo:
    """A key in the keyring: its name, key id and files (`private_path` None if public only)."""

    name: str
    keyid: str
    public_path: Path
    private_path: Path | None


def default_keyring_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$EDGEKIT_HOME/keys`, with EDGEKIT_HOME defaulting to `~/.config/edgekit`."""
    env = os.environ if environ is None else environ
    home = env.get(HOME_ENV)
    base = Path(home).expanduser() if home else Path.home() / ".config" / "edgekit"
    return base / "keys"


def _keyring(keyring_dir: Path | None) -> Path:
    return default_keyring_dir() if keyring_dir is None else Path(keyring_dir)


def _check_name(name: str) -> str:
    if NAME_PATTERN.fullmatch(name) is None:
        raise KeyringError(
            f"key name must be 1-64 letters, digits, '.', '_' or '-' (not starting with a "
            f"punctuation mark); found {name!r}"
        )
    return name


def _passphrase_bytes(passphrase: str | bytes) -> bytes:
    secret = passphrase.encode("utf-8") if isinstance(passphrase, str) else passphrase
    if not secret:
        raise KeyringError(
            "an empty passphrase would leave the private key unprotected: choose one, or set "
            f"{PASSPHRASE_ENV}"
        )
    return secret


def _write_new_file(path: Path, data: bytes, *, mode: int) -> None:
    # O_EXCL: never overwrite a key; the mode is set at creation so no window leaks it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    os.chmod(path, mode)  # the umask may have narrowed the mode given to os.open


def generate_key(name: str, passphrase: str | bytes, *, keyring_dir: Path | None = None) -> KeyInfo:
    """Create a new Ed25519 key pair `NAME.key` (encrypted, 0600) and `NAME.pub` in the keyring."""
    _check_name(name)
    secret = _passphrase_bytes(passphrase)
    directory = _keyring(keyring_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_path = directory / f"{name}.key"
    public_path = directory / f"{name}.pub"
    if private_path.exists() or public_path.exists():
        raise KeyringError(
            f"key {name!r} already exists in {directory}: choose another name, or remove "
            f"{private_path.name} and {public_path.name} first"
        )
    private_key = Ed25519PrivateKey.generate()
    signer = Signer(private_key)
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(secret),
    )
    _write_new_file(private_path, private_pem, mode=0o600)
    try:
        _write_new_file(public_path, signer.public_key.to_pem(), mode=0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    logger.info("generated key %s (%s) in %s", name, signer.keyid, directory)
    return KeyInfo(name, signer.keyid, public_path, private_path)


def list_keys(*, keyring_dir: Path | None = None) -> tuple[KeyInfo, ...]:
    """Every key with a `NAME.pub` in the keyring, sorted by name."""
    directory = _keyring(keyring_dir)
    if not directory.is_dir():
        return ()
    infos = []
    for public_path in sorted(directory.glob("*.pub")):
        name = public_path.stem
        key = PublicKey.from_pem(public_path.read_bytes())
        private_path = directory / f"{name}.key"
        infos.append(
            KeyInfo(name, key.keyid, public_path, private_path if private_path.exists() else None)
        )
    return tuple(infos)


def export_public(name: str, *, keyring_dir: Path | None = None) -> bytes:
    """The public key PEM of keyring key `name`, to hand to whoever builds the trust store."""
    return load_public_key(name, keyring_dir=keyring_dir).to_pem()


def load_public_key(name_or_path: str | Path, *, keyring_dir: Path | None = None) -> PublicKey:
    """A public key by keyring name, or from a PEM file (a path with `/`, `.pem` or `.pub`)."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or text.endswith((".pem", ".pub")):
        path = Path(name_or_path)
    else:
        path = _keyring(keyring_dir) / f"{_check_name(text)}.pub"
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise KeyringError(
            f"no public key {text!r} (looked for {path}): list keys with `edgekit keys list`"
        ) from e
    return PublicKey.from_pem(data)


def load_keyring_public_keys(*, keyring_dir: Path | None = None) -> dict[str, PublicKey]:
    """Every public key in the keyring, by key id."""
    keys = {}
    for info in list_keys(keyring_dir=keyring_dir):
        key = load_public_key(info.public_path)
        keys[key.keyid] = key
    return keys


def load_private_key(
    name: str, passphrase: str | bytes, *, keyring_dir: Path | None = None
) -> Signer:
    """Decrypt keyring key `name` with `passphrase` into a `Signer`."""
    path = _keyring(keyring_dir) / f"{_check_name(name)}.key"
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise KeyringError(
            f"no private key {name!r} in {path.parent}: generate it with "
            f"`edgekit keys generate {name}` or set {HOME_ENV}"
        ) from e
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        logger.warning("private key %s is readable by others: chmod 600 %s", name, path)
    try:
        loaded = serialization.load_pem_private_key(data, _passphrase_bytes(passphrase))
    except (ValueError, TypeError) as e:
        raise KeyringError(
            f"cannot decrypt private key {name!r}: wrong passphrase or not an encrypted PKCS#8 "
            f"key ({e})"
        ) from e
    if not isinstance(loaded, Ed25519PrivateKey):
        raise KeyringError(f"key {name!r} is a {type(loaded).__name__}, not Ed25519")
    return Signer(loaded)
