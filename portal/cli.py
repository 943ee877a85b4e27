"""Command-line groups that are not owned by one domain package: ``db``.

The demo's commands live in the top-level ``demo`` package, outside the product."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import with_appcontext

from portal.migrate import upgrade_database


@click.group("db", help="Database schema.")
def db_cli() -> None:
    """Database commands."""


@db_cli.command("upgrade")
@with_appcontext
def upgrade_command() -> None:
    """Bring the database schema to the newest version (Alembic upgrade head)."""
    upgrade_database(current_app)
    click.echo("database is up to date")
