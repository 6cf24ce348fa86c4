"""`edgekit trust`: trust stores, thin click commands over `edgekit.trust.truststore`.

An `EdgekitError` is one line and exit code 2 (`edgekit.cli._group`). Passphrases come from
`EDGEKIT_KEY_PASSPHRASE` or a hidden prompt on the terminal (`edgekit.cli._options`).
Every file written replaces the old one atomically and durably (`edgekit.files.write_atomic`):
a kill mid-write leaves the old file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.table import Table

from edgekit.cli._group import Group
from edgekit.cli._options import PASSPHRASE_HELP, json_option
from edgekit.cli._options import load_signers as _signers
from edgekit.cli._options import parse_time as _parse_time
from edgekit.cli._output import echo_json as _echo_json
from edgekit.cli._output import key_label as _label
from edgekit.cli._output import keyring_names as _key_names
from edgekit.cli._output import plain_console as _console
from edgekit.cli._output import validity_label as _validity
from edgekit.cli._output import write_file as write_atomic
from edgekit.trust._schema import format_rfc3339
from edgekit.trust.dsse import Envelope, add_signatures, check_signatures, pae
from edgekit.trust.errors import BundleError, SignatureError, TrustStoreError
from edgekit.trust.keys import PublicKey, list_keys, load_public_key
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

__all__ = ["trust_group"]

_ROLE_CHOICE = click.Choice(ROLE_NAMES)


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
