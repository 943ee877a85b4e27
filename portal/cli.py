"""Command-line groups that are not owned by one domain package: ``db``.

The demo's commands live in the top-level ``demo`` package, outside the product."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import click
from flask import current_app
from flask.cli import with_appcontext

from portal.migrate import upgrade_database


def run_repeatedly(step: Callable[[], None], retryable: type[Exception], *,
                   every_seconds: float, watch: bool, failure: str) -> None:
    """Run ``step`` once, or every ``every_seconds`` with ``watch``.

    A ``retryable`` failure is reported (``failure`` with ``{}`` for the error) and waits for
    the next run; run once, it exits 1.
    """
    while True:
        try:
            step()
        except retryable as exc:
            click.echo(failure.format(exc), err=True)
            if not watch:
                sys.exit(1)
        if not watch:
            return
        time.sleep(every_seconds)


@click.group("db", help="Database schema.")
def db_cli() -> None:
    """Database commands."""


@db_cli.command("upgrade")
@with_appcontext
def upgrade_command() -> None:
    """Bring the database schema to the newest version (Alembic upgrade head)."""
    upgrade_database(current_app)
    click.echo("database is up to date")
