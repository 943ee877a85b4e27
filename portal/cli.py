"""Command-line groups that are not owned by one domain package: ``db`` and ``demo``."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
from flask import current_app
from flask.cli import with_appcontext

from portal.db import db
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


@click.command("demo")
@click.option("--samples/--no-samples", default=True,
              help="Also import the sample files of the pydicom and pydicom-data packages.")
@with_appcontext
def demo_command(samples: bool) -> None:
    """Generate the demo studies and import them (running it again adds nothing)."""
    from portal import demo
    from portal.archive.cli import import_paths

    upgrade_database(current_app)
    target = Path(current_app.instance_path) / "demo"
    marker = target / ".complete"
    if not marker.exists():
        target.mkdir(parents=True, exist_ok=True)
        done = 0

        def progress(count: int) -> None:
            nonlocal done
            done += count
            click.echo(f"\rGenerating demo studies: {done} files", nl=False, err=True)

        demo.generate_demo_set(target, progress=progress)
        click.echo("", err=True)
        marker.touch()
    paths = [target]
    if samples:
        paths.extend(demo.sample_files())
    # pydicom's samples reuse UIDs on purpose; their security alerts are expected here.
    alerts = logging.getLogger("portal.access.audit")
    level = alerts.level
    alerts.setLevel(logging.ERROR)
    try:
        summary = import_paths(paths, who="cli:demo")
    finally:
        alerts.setLevel(level)
    click.echo(f"stored: {summary.counts['stored']}, already stored: "
               f"{summary.counts['already_stored']}, refused: {len(summary.rejected)} "
               "(some pydicom samples are deliberately broken or share UIDs)")
    from portal.demo_people import demo_config, register_demo_people

    if demo_config(Path(current_app.instance_path)):
        click.echo("wrote instance/config.toml: sign-in through the demo provider")
    with db.write_transaction() as session:
        created = register_demo_people(session)
    if created:
        click.echo(f"registered {created} demo people (physicians, an office manager, "
                   "a newcomer, a patient)")
    from portal.reports.demo import seed_reports

    sent = seed_reports(db._get_current_object())  # type: ignore[attr-defined]
    click.echo(f"sent {sent} demo report messages (HL7 ORU^R01) through the RIS path")


@click.command("demo-idp")
@click.option("--port", default=5001, show_default=True)
def demo_idp_command(port: int) -> None:
    """Run the demo identity provider on localhost (it lets anyone sign in: demo only)."""
    from portal.demo_people import run_identity_provider

    click.echo(f"demo identity provider on http://localhost:{port} (Ctrl-C stops it)")
    run_identity_provider(port)
