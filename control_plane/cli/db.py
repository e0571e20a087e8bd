"""``edgefleet db``: where the control plane's database schema stands, and upgrading it by hand.

The control plane upgrades its schema itself at every start; these commands are for an
operator who wants to do it first (before a rolling restart, or to see what a release will
change): ``edgefleet db current`` and ``edgefleet db upgrade``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from edgefleet.shared.errors import ConfigError, EdgefleetError

if TYPE_CHECKING:
    from sqlalchemy import Engine

app = typer.Typer(help="The control plane's database schema (migrations).", no_args_is_help=True)
console = Console()

DataDir = Annotated[
    Path | None, typer.Option(help="The control plane's data dir (its SQLite database). [env EDGEFLEET_DATA_DIR]")
]
DatabaseUrl = Annotated[
    str | None, typer.Option(help="SQLAlchemy URL; default SQLite in the data dir. [env EDGEFLEET_DATABASE_URL]")
]


@app.command("current")
def current(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Print the database's schema revision and this release's newest."""
    from edgefleet.control_plane.db.schema import current_revision, head_revision

    try:
        engine = _engine(data_dir, database_url, must_exist=True)
        try:
            revision = current_revision(engine)
        finally:
            engine.dispose()
    except EdgefleetError as exc:
        raise _fail(exc) from exc
    head = head_revision()
    if revision == head:
        typer.echo(f"{revision} (head)")
    else:
        typer.echo(f"{revision or 'none'} (head is {head}: run `edgefleet db upgrade`)")


@app.command("upgrade")
def upgrade(
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Upgrade the database's schema (creating the database if there is none)."""
    from edgefleet.control_plane.db.schema import upgrade_schema

    try:
        engine = _engine(data_dir, database_url, must_exist=False)
        try:
            done = upgrade_schema(engine, revision)
        finally:
            engine.dispose()
    except EdgefleetError as exc:
        raise _fail(exc) from exc
    if done.before == done.after:
        typer.echo(f"already at {done.after}")
    else:
        stamped = " (made before migrations: stamped at the baseline first)" if done.stamped else ""
        typer.echo(f"upgraded {done.before or 'none'} -> {done.after}{stamped}")


def _engine(data_dir: Path | None, database_url: str | None, *, must_exist: bool) -> Engine:
    from sqlalchemy.engine import make_url

    from edgefleet.control_plane.db.engine import create_db_engine
    from edgefleet.control_plane.settings import ServerSettings

    settings = ServerSettings.from_env(data_dir=data_dir.resolve() if data_dir else None, database_url=database_url)
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        path = Path(url.database or "")
        if must_exist and not path.is_file():
            raise ConfigError(f"no control-plane database at {path} (set --data-dir or --database-url)")
        path.parent.mkdir(parents=True, exist_ok=True)
    return create_db_engine(settings.database_url)


def _fail(exc: EdgefleetError) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(1)
