"""`edgekit profiles list|show`: the built-in device profiles and your own YAML files."""

from __future__ import annotations

import json

import click
from rich.table import Table

from edgekit.cli._group import Group
from edgekit.cli._options import json_option
from edgekit.cli._output import stdout_console
from edgekit.profiles import builtin_profile_names, load_profile

__all__ = ["profiles_group"]


@click.group("profiles", cls=Group)
def profiles_group() -> None:
    """Device profiles: list the built-in ones, show one."""


@profiles_group.command("list")
@json_option
def profiles_list(as_json: bool) -> None:
    """List the built-in device profiles."""
    loaded = [load_profile(name) for name in builtin_profile_names()]
    if as_json:
        click.echo(json.dumps([profile.to_dict() for profile in loaded], indent=2))
        return
    table = Table(title="built-in device profiles")
    for column in ("name", "format", "runtime (oldest .. newest)", "candidates", "description"):
        table.add_column(column)
    for profile in loaded:
        runtime = profile.runtime
        table.add_row(
            profile.name,
            profile.target_format,
            f"{runtime.oldest.package} {runtime.oldest.version} .. "
            f"{runtime.newest.package} {runtime.newest.version}",
            ", ".join(profile.quantization.candidates),
            profile.description,
        )
    stdout_console().print(table)


@profiles_group.command("show")
@click.argument("name_or_path")
@json_option
def profiles_show(name_or_path: str, as_json: bool) -> None:
    """Show one profile: a built-in NAME or the path of your own YAML file."""
    import yaml

    profile = load_profile(name_or_path)
    if as_json:
        click.echo(json.dumps(profile.to_dict(), indent=2))
    else:
        click.echo(yaml.safe_dump(profile.to_dict(), sort_keys=False).rstrip())
