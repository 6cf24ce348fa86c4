"""Options more than one command group takes, declared once: `--json`, `--fleet`, the broker
options, signing keys and their passphrase."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

import click

from edgekit.errors import EdgekitError
from edgekit.trust.keys import PASSPHRASE_ENV

if TYPE_CHECKING:
    from edgekit.mqtt import BrokerSettings
    from edgekit.trust import Signer

__all__ = [
    "PASSPHRASE_HELP",
    "BrokerOptions",
    "broker_options",
    "broker_url_option",
    "directive_key_option",
    "fleet_option",
    "json_option",
    "lazy_broker_options",
    "load_signers",
    "parse_time",
    "passphrase",
]

F = TypeVar("F", bound=Callable[..., Any])

PASSPHRASE_HELP = f"Passphrase: ${PASSPHRASE_ENV}, else asked on the terminal."


@overload
def json_option(function: F) -> F: ...
@overload
def json_option(*, help: str = ...) -> Callable[[F], F]: ...
def json_option(function: F | None = None, *, help: str = "Print JSON for scripts.") -> Any:
    """`--json` (parameter `as_json`); `@json_option` or `@json_option(help=...)`."""
    decorator = click.option("--json", "as_json", is_flag=True, help=help)
    return decorator if function is None else decorator(function)


def fleet_option(*, required: bool) -> Callable[[F], F]:
    """`--fleet` [env EDGEKIT_FLEET]."""
    return click.option(
        "--fleet",
        envvar="EDGEKIT_FLEET",
        required=required,
        help="Fleet id (topic level under edgekit/v1/) [env EDGEKIT_FLEET].",
    )


def profile_option(function: F) -> F:
    """`--profile/-p NAME|FILE` (parameter `profile_name`), required: what the model is for."""
    return click.option(
        "--profile",
        "-p",
        "profile_name",
        required=True,
        help="Built-in profile name or path to a profile YAML file.",
    )(function)


def directive_key_option(function: F) -> F:
    """`--key NAME` (parameter `key_name`): the keyring key that signs directives."""
    return click.option(
        "--key",
        "key_name",
        envvar="EDGEKIT_DIRECTIVE_KEY",
        help="Keyring key that signs directives (a key of the trust store's directives role) "
        f"[env EDGEKIT_DIRECTIVE_KEY]. {PASSPHRASE_HELP}",
    )(function)


@dataclass(frozen=True)
class BrokerOptions:
    """The broker options as given; `settings()` needs paho-mqtt's extra installed."""

    url: str
    username: str | None
    password: str | None
    ca: Path | None

    def settings(self) -> BrokerSettings:
        from edgekit.mqtt import BrokerSettings

        return BrokerSettings(
            url=self.url, username=self.username, password=self.password, ca_file=self.ca
        )


_BROKER_OPTIONS = (
    click.option(
        "--broker",
        envvar="EDGEKIT_BROKER_URL",
        default="mqtt://127.0.0.1:1883",
        show_default=True,
        help="Broker URL, mqtt://host:port or mqtts://host:port [env EDGEKIT_BROKER_URL].",
    ),
    click.option(
        "--username", envvar="EDGEKIT_BROKER_USERNAME", help="[env EDGEKIT_BROKER_USERNAME]"
    ),
    click.option(
        "--password", envvar="EDGEKIT_BROKER_PASSWORD", help="[env EDGEKIT_BROKER_PASSWORD]"
    ),
    click.option(
        "--ca",
        envvar="EDGEKIT_BROKER_CA",
        type=click.Path(dir_okay=False, path_type=Path),
        help="CA bundle (PEM) that signed the broker's certificate [env EDGEKIT_BROKER_CA].",
    ),
)


broker_url_option = _BROKER_OPTIONS[0]
"""`--broker` alone, for commands with their own account options (simulate, monitor)."""


def _with_broker_options(function: F, *, build: Callable[[BrokerOptions], tuple[str, Any]]) -> F:
    @functools.wraps(function)
    def wrapper(
        *args: Any,
        broker: str,
        username: str | None,
        password: str | None,
        ca: Path | None,
        **kwargs: Any,
    ) -> Any:
        name, value = build(BrokerOptions(broker, username, password, ca))
        return function(*args, **{name: value}, **kwargs)

    decorated: Any = wrapper
    for option in reversed(_BROKER_OPTIONS):
        decorated = option(decorated)
    return decorated  # type: ignore[no-any-return]


def broker_options(function: F) -> F:
    """Add --broker/--username/--password/--ca; the command receives `settings`."""
    return _with_broker_options(function, build=lambda given: ("settings", given.settings()))


def lazy_broker_options(function: F) -> F:
    """The same options for a command that rarely talks to a broker: it receives `broker`, a
    `BrokerOptions` (paho is imported only when it asks for `broker.settings()`)."""
    return _with_broker_options(function, build=lambda given: ("broker", given))


class PassphraseError(EdgekitError):
    """No passphrase for a private key: no environment variable and no terminal."""


def passphrase(name: str, *, confirm: bool = False) -> str:
    """The passphrase of keyring key `name`: $EDGEKIT_KEY_PASSPHRASE, else a hidden prompt on
    the terminal, else (no terminal) a line read from stdin; nothing there is an error."""
    from_environment = os.environ.get(PASSPHRASE_ENV)
    if from_environment:
        return from_environment
    interactive = sys.stdin is not None and sys.stdin.isatty()
    try:
        if interactive:
            value: str = click.prompt(
                f"Passphrase for key {name!r}", hide_input=True, confirmation_prompt=confirm
            )
        else:
            # Nobody to prompt: a passphrase piped in is read once, without a prompt or
            # getpass's "may be echoed" warning; an empty stdin ends in the error below.
            value = click.prompt("", prompt_suffix="", err=True, show_default=False)
    except click.Abort:
        if interactive:
            raise  # Ctrl-C at the prompt
        raise PassphraseError(
            f"no passphrase for key {name!r}: set {PASSPHRASE_ENV} (there is no terminal to ask on)"
        ) from None
    return value


def load_signers(names: Sequence[str]) -> list[Signer]:
    """Decrypt each keyring key in `names` (asking for its passphrase as `passphrase` does)."""
    from edgekit.trust.keys import load_private_key

    return [load_private_key(name, passphrase(name)) for name in names]


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 UTC time option (`--created`, `--expires`), or a usage error."""
    if value is None:
        return None
    from edgekit.trust._schema import parse_rfc3339
    from edgekit.trust.errors import TrustStoreError

    try:
        return parse_rfc3339(value, what="time", error=TrustStoreError)
    except TrustStoreError as e:
        raise click.BadParameter(str(e)) from e
