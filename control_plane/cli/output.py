"""What every ``edgefleet`` command shares: the ``--api-url`` and ``--json`` options, API calls, errors, output."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from edgefleet.control_plane.client import EdgefleetClient
from edgefleet.shared.errors import EdgefleetError

ApiUrl = Annotated[str, typer.Option("--api-url", envvar="EDGEFLEET_API_URL", help="Control plane URL.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
_Answer = TypeVar("_Answer")


def fail(console: Console, exc: EdgefleetError, **print_options: Any) -> typer.Exit:
    """Print ``exc`` as an error on ``console``; the caller raises the returned exit (code 1)."""
    console.print(f"[red]error:[/red] {exc}", **print_options)
    return typer.Exit(1)


def print_rows(
    rows: list[dict[str, Any]],
    columns: list[str],
    as_json: bool,
    *,
    console: Console,
    cell: Callable[[Any], str] = str,
) -> None:
    """``rows`` as JSON on stdout, or as a table of ``columns`` on ``console`` (a missing key is blank)."""
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*(cell(row.get(c, "")) for c in columns))
    console.print(table)


def print_result(
    result: dict[str, Any], as_json: bool, *, console: Console, summary: Callable[[dict[str, Any]], str]
) -> None:
    """``result`` as JSON on stdout, or its one-line ``summary`` on ``console``."""
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        console.print(summary(result))


def ask(
    api_url: str, question: Callable[[EdgefleetClient], _Answer], on_error: Callable[[EdgefleetError], typer.Exit]
) -> _Answer:
    """``question``'s answer from a client of ``api_url`` (closed after); an error raises ``on_error``'s exit."""
    try:
        with EdgefleetClient(api_url) as client:
            return question(client)
    except EdgefleetError as exc:
        raise on_error(exc) from exc
