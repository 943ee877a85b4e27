"""``flask --app app demo`` and ``flask --app app demo-idp``, registered by ``app.py`` in
development only (``register``)."""

from __future__ import annotations

import logging
from pathlib import Path

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

from portal.db import db
from portal.migrate import upgrade_database


@click.command("demo")
@click.option("--samples/--no-samples", default=True,
              help="Also import the sample files of the pydicom and pydicom-data packages.")
@with_appcontext
def demo_command(samples: bool) -> None:
    """Generate the demo studies and import them (running it again adds nothing)."""
    from demo import studies
    from demo.people import demo_config, register_demo_people
    from demo.reports import seed_reports
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

        studies.generate_demo_set(target, progress=progress)
        click.echo("", err=True)
        marker.touch()
    paths = [target]
    if samples:
        paths.extend(studies.sample_files())
    # pydicom's samples reuse UIDs on purpose; their security alerts are expected here.
    alerts = logging.getLogger("portal.audit")
    level = alerts.level
    alerts.setLevel(logging.ERROR)
    try:
        summary = import_paths(paths, who="cli:demo")
    finally:
        alerts.setLevel(level)
    click.echo(f"stored: {summary.counts['stored']}, already stored: "
               f"{summary.counts['already_stored']}, refused: {len(summary.rejected)} "
               "(some pydicom samples are deliberately broken or share UIDs)")
    if demo_config(Path(current_app.instance_path)):
        click.echo("wrote instance/config.toml: sign-in through the demo provider")
    with db.write_transaction() as session:
        created = register_demo_people(session)
    if created:
        click.echo(f"registered {created} demo people (physicians, an office manager, "
                   "a newcomer, a patient)")
    sent = seed_reports(db._get_current_object())  # type: ignore[attr-defined]
    click.echo(f"sent {sent} demo report messages (HL7 ORU^R01) through the RIS path")


@click.command("demo-idp")
@click.option("--port", default=5001, show_default=True)
def demo_idp_command(port: int) -> None:
    """Run the demo identity provider on localhost (it lets anyone sign in: demo only)."""
    from demo.people import run_identity_provider

    click.echo(f"demo identity provider on http://localhost:{port} (Ctrl-C stops it)")
    run_identity_provider(port)


def register(app: Flask) -> None:
    """Add the demo commands to a development app; refuse any other."""
    # A second guard behind app.py's: the demo's provider lets anyone sign in as anyone.
    if app.config["PORTAL"]["ENV"] != "development":
        raise RuntimeError("the demo commands exist only in development")
    for command in (demo_command, demo_idp_command):
        app.cli.add_command(command)
