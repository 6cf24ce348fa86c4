"""`edgekit keys|trust|bundle`: thin click commands over `edgekit.trust` and `edgekit.bundle`.

An `EdgekitError` is one line and exit code 2 (`edgekit.cli._group`). Passphrases come from
`EDGEKIT_KEY_PASSPHRASE` or a hidden prompt on the terminal (`edgekit.cli._options`).
Every file written (trust stores, drafts, signatures, public keys) replaces the old one
atomically and durably (`edgekit.files.write_atomic`): a kill mid-write leaves the old file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from edgekit.bundle import (
    BundleInspection,
    Manifest,
    VerifiedBundle,
    extract_bundle,
    inspect_bundle,
    sign_and_build_bundle,
    sign_bundle,
    verify_bundle,
)
from edgekit.cli._group import Group
from edgekit.cli._options import PASSPHRASE_HELP, json_option, load_signers, passphrase
from edgekit.cli._output import echo_json as _echo_json
from edgekit.errors import EdgekitError
from edgekit.files import write_atomic as _replace_file
from edgekit.trust._schema import format_rfc3339, parse_rfc3339
from edgekit.trust.dsse import Envelope, SignaturePolicy, add_signatures, check_signatures, pae
from edgekit.trust.errors import BundleError, SignatureError, TrustStoreError
from edgekit.trust.keys import (
    PublicKey,
    Signer,
    default_keyring_dir,
    export_public,
    generate_key,
    list_keys,
    load_keyring_public_keys,
    load_public_key,
)
from edgekit.trust.truststore import (
    ROLE_NAMES,
    TRUSTSTORE_PAYLOAD_TYPE,
    TrustStore,
    create_truststore,
    load_truststore_file,
    parse_truststore_envelope,
    sign_truststore,
    update_truststore,
)

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["bundle_group", "keys_group", "trust_group"]

_ROLE_CHOICE = click.Choice(ROLE_NAMES)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` atomically and durably, or say what failed (the old file stays)."""
    try:
        _replace_file(path, data)
    except OSError as e:
        raise EdgekitError(
            f"cannot write {path}: {e.strerror or e}; {path} is unchanged (free space, "
            "permissions?)"
        ) from e


def _console() -> Console:
    # Created per command so CliRunner's captured stdout is the one rich writes to.
    return Console(highlight=False, soft_wrap=True)


def _signers(names: Sequence[str]) -> list[Signer]:
    return load_signers(names)


def _key_names() -> dict[str, str]:
    """Local keyring names by key id, to label key ids in output."""
    return {info.keyid: info.name for info in list_keys()}


def _label(keyid: str, names: Mapping[str, str]) -> str:
    return f"{keyid[:16]} ({names[keyid]})" if keyid in names else keyid[:16]


def _parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_rfc3339(value, what="time", error=TrustStoreError)
    except TrustStoreError as e:
        raise click.BadParameter(str(e)) from e


# ---------------------------------------------------------------------------------------------
# edgekit keys


@click.group("keys", cls=Group)
def keys_group() -> None:
    """Signing keys in the local keyring ($EDGEKIT_HOME/keys, default ~/.config/edgekit/keys)."""


@keys_group.command("generate")
@click.argument("name")
def keys_generate(name: str) -> None:
    """Create Ed25519 key NAME (private key encrypted with a passphrase, mode 0600).

    The passphrase comes from $EDGEKIT_KEY_PASSPHRASE, else it is asked twice on the
    terminal; without either the command stops (exit code 2). Every command that signs with
    the key reads the passphrase the same way.
    """
    info = generate_key(name, passphrase(name, confirm=True))
    console = _console()
    console.print(f"generated key [bold]{info.name}[/bold]")
    console.print(f"  key id:  {info.keyid}")
    console.print(f"  private: {info.private_path}")
    console.print(f"  public:  {info.public_path}")


@keys_group.command("list")
@json_option
def keys_list(as_json: bool) -> None:
    """List the keys in the keyring."""
    infos = list_keys()
    if as_json:
        _echo_json(
            [
                {
                    "name": i.name,
                    "keyid": i.keyid,
                    "public_path": str(i.public_path),
                    "has_private": i.private_path is not None,
                }
                for i in infos
            ]
        )
        return
    console = _console()
    if not infos:
        console.print(
            f"no keys in {default_keyring_dir()}: create one with `edgekit keys generate`"
        )
        return
    table = Table("name", "key id", "private")
    for info in infos:
        table.add_row(info.name, info.keyid, "yes" if info.private_path else "no")
    console.print(table)


@keys_group.command("export-public")
@click.argument("name")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
def keys_export_public(*, name: str, output: Path | None) -> None:
    """Print (or write) the public key PEM of NAME, to add it to a trust store elsewhere."""
    pem = export_public(name)
    if output is None:
        click.echo(pem.decode("ascii"), nl=False)
    else:
        write_atomic(output, pem)
        click.echo(f"wrote {output}")


# ---------------------------------------------------------------------------------------------
# edgekit trust


@click.group("trust", cls=Group)
def trust_group() -> None:
    """Trust stores: which keys devices trust to sign trust stores, bundles and directives.

    Changing a signed store writes an unsigned draft of the next version; sign it with a
    threshold of the old root keys and of the new root keys (`trust sign --previous OLD`).
    """


def _read_store(path: Path) -> tuple[TrustStore, Envelope]:
    return parse_truststore_envelope(path.read_bytes())


def _write_draft(store: TrustStore, source: Envelope, output: Path) -> TrustStore:
    # A signed store is a published version: edits start version N+1. An unsigned draft is
    # edited in place, so several edits make one new version.
    draft = store.next_version() if source.signatures else store
    write_atomic(output, sign_truststore(draft, []))
    return draft


def _draft_message(draft: TrustStore, output: Path) -> str:
    return (
        f"wrote unsigned draft version {draft.version} to {output}: sign it with "
        f"`edgekit trust sign {output} --key ROOTKEY --previous OLD.json` using a threshold "
        "of the old root keys and of the new ones"
    )


def _public_key(name_or_path: str) -> PublicKey:
    return load_public_key(name_or_path)


@trust_group.command("init")
@click.option("--root-key", "root_keys", multiple=True, required=True, help="Key name or .pub.")
@click.option("--root-threshold", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--bundles-key", "bundles_keys", multiple=True, required=True)
@click.option("--bundles-threshold", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--directives-key", "directives_keys", multiple=True, required=True)
@click.option("--directives-threshold", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--expires", default=None, help="RFC 3339 UTC expiry, e.g. 2027-01-01T00:00:00Z.")
@click.option(
    "--sign",
    "sign_names",
    multiple=True,
    help="Root key(s) to sign with. Default: every --root-key with a local private key. "
    + PASSPHRASE_HELP,
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("truststore.json"),
    show_default=True,
)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def trust_init(
    *,
    root_keys: tuple[str, ...],
    root_threshold: int,
    bundles_keys: tuple[str, ...],
    bundles_threshold: int,
    directives_keys: tuple[str, ...],
    directives_threshold: int,
    expires: str | None,
    sign_names: tuple[str, ...],
    output: Path,
    force: bool,
) -> None:
    """Create trust store version 1, signed by its root keys."""
    if output.exists() and not force:
        raise click.UsageError(f"{output} exists: pass --force to replace it")
    store = create_truststore(
        root_keys=[_public_key(k) for k in root_keys],
        bundles_keys=[_public_key(k) for k in bundles_keys],
        directives_keys=[_public_key(k) for k in directives_keys],
        root_threshold=root_threshold,
        bundles_threshold=bundles_threshold,
        directives_threshold=directives_threshold,
        expires=_parse_time(expires),
    )
    if not sign_names:
        local_private = {i.name for i in list_keys() if i.private_path is not None}
        sign_names = tuple(k for k in root_keys if k in local_private)
    write_atomic(output, sign_truststore(store, _signers(sign_names)))
    _print_self_status(output)


def _store_edit_options(function: F) -> F:
    """The options `trust add-key` and `trust remove-key` share."""
    function = click.option(
        "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None
    )(function)
    function = click.option(
        "--store",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=Path("truststore.json"),
        show_default=True,
    )(function)
    return click.option(
        "--threshold", type=click.IntRange(min=1), default=None, help="New threshold."
    )(function)


@trust_group.command("add-key")
@click.argument("role", type=_ROLE_CHOICE)
@click.argument("key")
@_store_edit_options
def trust_add_key(
    *, role: str, key: str, threshold: int | None, store: Path, output: Path | None
) -> None:
    """Trust KEY (keyring name or .pub file) for ROLE in the next trust store version."""
    current, envelope = _read_store(store)
    changed = current.with_key(role, _public_key(key), threshold=threshold)
    target = output or store
    draft = _write_draft(changed, envelope, target)
    _console().print(_draft_message(draft, target))


@trust_group.command("remove-key")
@click.argument("role", type=_ROLE_CHOICE)
@click.argument("keyid")
@_store_edit_options
def trust_remove_key(
    *, role: str, keyid: str, threshold: int | None, store: Path, output: Path | None
) -> None:
    """Stop trusting KEYID (a key id, an 8+ digit prefix, or a keyring name) for ROLE."""
    current, envelope = _read_store(store)
    names = {name: kid for kid, name in _key_names().items()}
    changed = current.without_key(role, names.get(keyid, keyid), threshold=threshold)
    target = output or store
    draft = _write_draft(changed, envelope, target)
    _console().print(_draft_message(draft, target))


@trust_group.command("sign")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--key", "key_names", multiple=True, required=True, help=f"Root key name. {PASSPHRASE_HELP}"
)
@click.option(
    "--previous",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The version this one replaces: report whether the rotation is complete.",
)
def trust_sign(*, file: Path, key_names: tuple[str, ...], previous: Path | None) -> None:
    """Add root-key signatures to trust store FILE (in place)."""
    store, _ = _read_store(file)
    previous_store = load_truststore_file(previous) if previous else None
    allowed = set(store.roles["root"].keyids)
    if previous_store is not None:
        allowed |= set(previous_store.roles["root"].keyids)
    signers = _signers(key_names)
    for name, signer in zip(key_names, signers, strict=True):
        if signer.keyid not in allowed:
            raise TrustStoreError(
                f"key {name!r} ({signer.keyid[:16]}) is not a root key of version "
                f"{store.version}"
                + (" or of the previous version" if previous_store else "")
                + ": only root keys sign trust stores"
            )
    write_atomic(
        file, add_signatures(file.read_bytes(), signers, payload_type=TRUSTSTORE_PAYLOAD_TYPE)
    )
    _print_self_status(file)
    if previous_store is not None:
        _print_rotation_status(previous_store, file)


def _self_status(data: bytes) -> tuple[TrustStore, str]:
    store, envelope = parse_truststore_envelope(data)
    try:
        check_signatures(envelope, store.policy("root"))
    except SignatureError as e:
        return store, f"not yet valid: {e}"
    return store, "signed by a threshold of its own root keys"


def _print_self_status(path: Path) -> None:
    store, status = _self_status(path.read_bytes())
    _console().print(f"{path}: trust store version {store.version}: {status}")


def _print_rotation_status(previous: TrustStore, path: Path) -> None:
    try:
        update_truststore(previous, path.read_bytes())
    except BundleError as e:
        _console().print(f"rotation from version {previous.version}: not yet accepted: {e}")
    else:
        _console().print(f"rotation from version {previous.version}: devices will accept it")


@trust_group.command("show")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--previous",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Also check FILE as the successor of this version.",
)
@json_option
def trust_show(*, file: Path, previous: Path | None, as_json: bool) -> None:
    """Show a trust store's version, roles, keys and signatures."""
    data = file.read_bytes()
    store, envelope = parse_truststore_envelope(data)
    _, status = _self_status(data)
    rotation: str | None = None
    if previous is not None:
        old = load_truststore_file(previous)
        try:
            update_truststore(old, data)
            rotation = f"valid successor of version {old.version}"
        except BundleError as e:
            rotation = f"not a valid successor of version {old.version}: {e}"
    names = _key_names()
    message = pae(envelope.payload_type, envelope.payload)
    checked = [
        (s.keyid, store.keys[s.keyid].verify(s.sig, message) if s.keyid in store.keys else None)
        for s in envelope.signatures
    ]
    if as_json:
        _echo_json(
            {
                "version": store.version,
                "expires": format_rfc3339(store.expires) if store.expires else None,
                "roles": {
                    name: {"keyids": list(role.keyids), "threshold": role.threshold}
                    for name, role in store.roles.items()
                },
                "signatures": [
                    {"keyid": keyid, "name": names.get(keyid), "valid": valid}
                    for keyid, valid in checked
                ],
                "status": status,
                "rotation": rotation,
            }
        )
        return
    console = _console()
    expires = format_rfc3339(store.expires) if store.expires else "never"
    console.print(f"trust store version {store.version}, expires {expires}")
    roles = Table("role", "threshold", "keys")
    for name, role in store.roles.items():
        roles.add_row(name, str(role.threshold), "\n".join(_label(k, names) for k in role.keyids))
    console.print(roles)
    table = Table("signature by", "verifies")
    for keyid, valid in checked:
        table.add_row(_label(keyid, names), _validity(valid))
    console.print(table)
    console.print(f"status: {status}")
    if rotation is not None:
        console.print(f"rotation: {rotation}")


# ---------------------------------------------------------------------------------------------
# edgekit bundle


@click.group("bundle", cls=Group)
def bundle_group() -> None:
    """Signed bundles (.ekb): build, sign, verify and inspect."""


@bundle_group.command("build")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--name", required=True, help="Bundle name, e.g. digits.")
@click.option("--version", "version", required=True, help="Semantic version, e.g. 1.2.0.")
@click.option("--security-epoch", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--profile", default=None, help="Device profile (default: report.json's).")
@click.option(
    "-o",
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
)
@click.option(
    "--sign", "sign_names", multiple=True, help=f"Key name(s) to sign with. {PASSPHRASE_HELP}"
)
@click.option("--created", default=None, help="RFC 3339 UTC build time (default: inputs').")
def bundle_build(
    *,
    sources: tuple[Path, ...],
    name: str,
    version: str,
    security_epoch: int,
    profile: str | None,
    output_dir: Path,
    sign_names: tuple[str, ...],
    created: str | None,
) -> None:
    """Bundle a converter output directory, or files, into <DIR>/<name>-<version>-<profile>.ekb."""
    source: Path | Sequence[Path] = sources[0] if len(sources) == 1 else list(sources)
    path = sign_and_build_bundle(
        source,
        name=name,
        version=version,
        security_epoch=security_epoch,
        profile=profile,
        out_dir=output_dir,
        signers=_signers(sign_names),
        created=_parse_time(created),
    )
    state = f"signed by {', '.join(sign_names)}" if sign_names else "unsigned"
    _console().print(f"wrote {path} ({state})")


@bundle_group.command("sign")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--key",
    "key_names",
    multiple=True,
    required=True,
    help=f"Key name to sign with. {PASSPHRASE_HELP}",
)
def bundle_sign(*, file: Path, key_names: tuple[str, ...]) -> None:
    """Add signatures to bundle FILE, rewriting it deterministically."""
    sign_bundle(file, _signers(key_names))
    _console().print(f"signed {file} with {', '.join(key_names)}")


def _manifest_json(manifest: Manifest) -> object:
    return json.loads(manifest.to_payload())


def _bundle_json(verified: VerifiedBundle) -> dict[str, object]:
    return {
        "valid": True,
        "manifest": _manifest_json(verified.manifest),
        "signed_by": sorted(verified.signed_by),
        "size_bytes": verified.size_bytes,
        "extracted": [str(f.path) for f in verified.files if f.path is not None],
    }


def _trust_policy(trust: Path | None) -> TrustStore | SignaturePolicy:
    if trust is not None:
        return load_truststore_file(trust, now=datetime.now(timezone.utc))
    return SignaturePolicy(load_keyring_public_keys(), threshold=1, role="local keyring")


@bundle_group.command("verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--trust",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Trust store: verify exactly as a device does. Default: any local keyring key.",
)
@click.option("--min-security-epoch", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--extract",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also extract into this (absent or empty) directory.",
)
@json_option
def bundle_verify(
    *, file: Path, trust: Path | None, min_security_epoch: int, extract: Path | None, as_json: bool
) -> None:
    """Verify bundle FILE: signatures, manifest, epoch, layout and every file's sha256."""
    policy = _trust_policy(trust)
    with open(file, "rb") as f:
        if extract is not None:
            verified = extract_bundle(
                f, extract, trust=policy, min_security_epoch=min_security_epoch
            )
        else:
            verified = verify_bundle(f, trust=policy, min_security_epoch=min_security_epoch)
    if as_json:
        _echo_json(_bundle_json(verified))
        return
    names = _key_names()
    manifest = verified.manifest
    signers = ", ".join(_label(k, names) for k in sorted(verified.signed_by))
    _console().print(
        f"[green]valid[/green]: {manifest.name} {manifest.version} for {manifest.profile}, "
        f"security epoch {manifest.security_epoch}, {len(manifest.files)} files, "
        f"signed by {signers}"
    )


def _key_roles(trust: TrustStore | None) -> dict[str, list[str]]:
    if trust is None:
        return {}
    roles: dict[str, list[str]] = {}
    for name, role in trust.roles.items():
        for keyid in role.keyids:
            roles.setdefault(keyid, []).append(name)
    return roles


@bundle_group.command("inspect")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--trust",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Also show which signatures match this trust store's keys.",
)
@json_option
def bundle_inspect(*, file: Path, trust: Path | None, as_json: bool) -> None:
    """Show bundle FILE's manifest, files and signatures (checks integrity, trusts no key)."""
    store = load_truststore_file(trust) if trust is not None else None
    known = dict(load_keyring_public_keys())
    if store is not None:
        known.update(store.keys)
    with open(file, "rb") as f:
        inspection = inspect_bundle(f, known_keys=known)
    names = _key_names()
    roles = _key_roles(store)
    signatures: list[dict[str, object]] = [
        {
            "keyid": s.keyid,
            "valid": s.valid,
            "local_key": names.get(s.keyid),
            "truststore_roles": roles.get(s.keyid, []),
        }
        for s in inspection.signatures
    ]
    if as_json:
        _echo_json(
            {
                "manifest": _manifest_json(inspection.manifest),
                "size_bytes": inspection.size_bytes,
                "signatures": signatures,
            }
        )
        return
    _print_inspection(inspection, signatures)


def _validity(valid: bool | None) -> str:
    return "unknown key" if valid is None else ("yes" if valid else "NO")


def _print_inspection(inspection: BundleInspection, signatures: list[dict[str, object]]) -> None:
    console = _console()
    manifest = inspection.manifest
    summary = Table(show_header=False)
    summary.add_row("name", manifest.name)
    summary.add_row("version", manifest.version)
    summary.add_row("profile", manifest.profile)
    summary.add_row("security epoch", str(manifest.security_epoch))
    summary.add_row("created", format_rfc3339(manifest.created))
    summary.add_row("runtime", json.dumps(json.loads(manifest.to_payload())["runtime"]))
    summary.add_row("size", f"{inspection.size_bytes} bytes")
    console.print(summary)
    files = Table("path", "role", "bytes", "sha256")
    for entry in manifest.files:
        files.add_row(entry.path, entry.role, str(entry.size_bytes), entry.sha256)
    console.print(files)
    table = Table("signature key id", "verifies", "local key", "trust store roles")
    for item in signatures:
        valid = item["valid"]
        roles = item["truststore_roles"]
        table.add_row(
            str(item["keyid"]),
            _validity(valid if isinstance(valid, bool) else None),
            str(item["local_key"] or "-"),
            ", ".join(str(r) for r in roles) if isinstance(roles, list) else "-",
        )
    if not signatures:
        console.print("no signatures: sign with `edgekit bundle sign FILE --key NAME`")
    else:
        console.print(table)
