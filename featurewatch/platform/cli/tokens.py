"""`featurewatch token ...`: the dashboard's login tokens and their roles."""

from __future__ import annotations

from typing import Annotated

import typer

from featurewatch.dashboard.auth import TokenStore
from featurewatch.errors import ConfigError
from featurewatch.platform.cli.common import (
    ConfigOpt,
    HomeOpt,
    cli_config,
    fail,
    print_json,
)

app = typer.Typer(
    help="Dashboard login tokens and their roles.", no_args_is_help=True, add_completion=False
)


@app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="Who the token is for.")],
    role: Annotated[str, typer.Option(help="viewer (read) or operator (edit, approve).")],
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Make a token; it is printed once and stored only hashed."""
    try:
        token = TokenStore(cli_config(config, home).dashboard_tokens_file).create(name, role)
    except ConfigError as err:  # a bad name or role, or a name taken
        fail(str(err), 2)
    typer.echo(token)


@app.command("list")
def token_list(config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Names, roles and creation times (never the tokens)."""
    print_json({"tokens": TokenStore(cli_config(config, home).dashboard_tokens_file).entries()})


@app.command("revoke")
def token_revoke(
    name: Annotated[str, typer.Argument(help="The token's name.")],
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Revoke a token at once: the next request that carries it is refused."""
    try:
        TokenStore(cli_config(config, home).dashboard_tokens_file).revoke(name)
    except ConfigError as err:  # no such token
        fail(str(err), 2)
    typer.echo(f"revoked {name}")
