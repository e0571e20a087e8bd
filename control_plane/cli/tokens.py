"""``edgefleet tokens`` and ``edgefleet audit``: API tokens (create, list, revoke) and the audit log.

Both need an admin token (``$EDGEFLEET_TOKEN``, a token file: see
:func:`edgefleet.control_plane.client.resolve_token`). A new token is printed once, alone on
stdout, so ``TOKEN=$(edgefleet tokens create ... --quiet)`` captures it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console

from edgefleet.control_plane.cli.output import ApiUrl, AsJson, ask, fail, print_rows
from edgefleet.control_plane.client import DEFAULT_API_URL
from edgefleet.shared.errors import EdgefleetError

app = typer.Typer(help="API tokens: create (shown once), list, revoke. Needs an admin token.", no_args_is_help=True)
console = Console(stderr=True)  # messages; stdout carries only what a script reads

ROLES = ("viewer", "operator", "publisher", "admin")


def _fail(exc: EdgefleetError) -> typer.Exit:
    return fail(console, exc, markup=True, highlight=False)


def _print(rows: list[dict[str, Any]], columns: list[str], as_json: bool) -> None:
    # On stdout, with the JSON; a null (no expiry, not revoked) is a blank cell.
    print_rows(rows, columns, as_json, console=Console(), cell=lambda value: "" if value is None else str(value))


@app.command("create")
def create(
    role: Annotated[str, typer.Option(help=f"What the token may do: one of {', '.join(ROLES)}.")],
    name: Annotated[str, typer.Option(help='What it is for: "ci", "alice".')],
    expires_in: Annotated[
        int | None, typer.Option("--expires-in", help="Seconds until it expires; default never.", min=1)
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the token.")] = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    as_json: AsJson = False,
) -> None:
    """Create an API token; it is printed this once (only its hash is kept)."""
    if role not in ROLES:
        raise _fail(EdgefleetError(f"--role must be one of {', '.join(ROLES)}"))
    created = ask(api_url, lambda client: client.create_token(name=name, role=role, expires_in_s=expires_in), _fail)
    if as_json:
        typer.echo(json.dumps(created, indent=2))
        return
    if not quiet:
        expiry = created["expires_at"] or "never"
        console.print(f"token {created['id']} ({created['name']}, {created['role']}, expires {expiry}), shown once:")
    typer.echo(created["token"])


@app.command("list")
def list_(api_url: ApiUrl = DEFAULT_API_URL, as_json: AsJson = False) -> None:
    """List every token (never the tokens themselves), revoked and expired ones too."""
    rows = ask(api_url, lambda client: client.tokens(), _fail)
    _print(rows, ["id", "name", "role", "created_at", "expires_at", "revoked_at"], as_json)


@app.command("revoke")
def revoke(
    token_id: Annotated[int, typer.Argument(help="The token's id (`edgefleet tokens list`).")],
    api_url: ApiUrl = DEFAULT_API_URL,
) -> None:
    """Revoke a token: from now on it gets 401."""
    row = ask(api_url, lambda client: client.revoke_token(token_id), _fail)
    console.print(f"token {row['id']} ({row['name']}) revoked at {row['revoked_at']}")


def audit(
    token_id: Annotated[int | None, typer.Option(help="Only what this token asked for.")] = None,
    operation: Annotated[str | None, typer.Option(help="Only this operation, e.g. create_deployments.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many entries.", min=1)] = 100,
    api_url: ApiUrl = DEFAULT_API_URL,
    as_json: AsJson = False,
) -> None:
    """Show the audit log, newest first: who asked for which change, when, and how it ended."""
    rows = ask(api_url, lambda client: client.audit(token_id=token_id, operation=operation, limit=limit), _fail)
    _print(rows, ["id", "at", "actor", "operation", "target", "status_code"], as_json)
