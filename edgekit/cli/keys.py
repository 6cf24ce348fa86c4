"""`edgekit keys`: the local keyring, thin click commands over `edgekit.trust.keys`.

An `EdgekitError` is one line and exit code 2 (`edgekit.cli._group`). Passphrases come from
`EDGEKIT_KEY_PASSPHRASE` or a hidden prompt on the terminal (`edgekit.cli._options`).
Every file written replaces the old one atomically and durably (`edgekit.files.write_atomic`):
a kill mid-write leaves the old file.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from edgekit.cli._group import Group
from edgekit.cli._options import json_option, passphrase
from edgekit.cli._output import echo_json as _echo_json
from edgekit.cli._output import plain_console as _console
from edgekit.cli._output import write_file as write_atomic
from edgekit.trust.keys import default_keyring_dir, export_public, generate_key, list_keys

__all__ = ["keys_group"]


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
