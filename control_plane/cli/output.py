"""What every ``edgefleet`` command shares: the ``--api-url`` and ``--json`` options, errors, tables."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from edgefleet.shared.errors import EdgefleetError

ApiUrl = Annotated[str, typer.Option("--api-url", envvar="EDGEFLEET_API_URL", help="Control plane URL.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


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
