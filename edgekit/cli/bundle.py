"""`edgekit bundle`: signed bundles (.ekb), thin click commands over `edgekit.bundle`.

An `EdgekitError` is one line and exit code 2 (`edgekit.cli._group`). Passphrases come from
`EDGEKIT_KEY_PASSPHRASE` or a hidden prompt on the terminal (`edgekit.cli._options`).
Every file written replaces the old one atomically and durably (`edgekit.files.write_atomic`):
a kill mid-write leaves the old file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import click
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
from edgekit.cli._options import PASSPHRASE_HELP, json_option
from edgekit.cli._options import load_signers as _signers
from edgekit.cli._options import parse_time as _parse_time
from edgekit.cli._output import echo_json as _echo_json
from edgekit.cli._output import key_label as _label
from edgekit.cli._output import keyring_names as _key_names
from edgekit.cli._output import plain_console as _console
from edgekit.cli._output import validity_label as _validity
from edgekit.trust._schema import format_rfc3339
from edgekit.trust.dsse import SignaturePolicy
from edgekit.trust.keys import load_keyring_public_keys
from edgekit.trust.truststore import TrustStore, load_truststore_file

__all__ = ["bundle_group"]


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
