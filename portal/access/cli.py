"""``flask --app app clients ...``: machine clients for /dicomweb."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import with_appcontext
from sqlalchemy import select

from portal.access import clients
from portal.access.models import MachineClient
from portal.db import db
from portal.migrate import upgrade_database


@click.group("clients", help="Machine clients (modalities, scripts, archives) for /dicomweb.")
def clients_cli() -> None:
    """Machine client commands."""


@clients_cli.command("create")
@click.argument("name")
@click.option("--read", "can_read", is_flag=True,
              help="May also search and retrieve every study (trusted integrations only).")
@click.option("--no-store", "no_store", is_flag=True, help="May not store instances.")
@with_appcontext
def create_command(name: str, can_read: bool, no_store: bool) -> None:
    """Register a client and print its secret once (only a hash is kept)."""
    upgrade_database(current_app)
    try:
        secret = clients.create_client(db.session, name, can_read=can_read,
                                       can_store=not no_store)
        db.session.commit()
    except clients.ClientError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"client: {name}")
    click.echo(f"secret: {secret}")
    rights = ", ".join(r for r, on in (("store", not no_store), ("read", can_read)) if on)
    click.echo(f"rights: {rights or 'none'}", err=True)
    click.echo("Use them as HTTP Basic credentials for /dicomweb. The secret is shown only "
               "now.", err=True)


@clients_cli.command("list")
@with_appcontext
def list_command() -> None:
    """List clients and their rights (never their secrets)."""
    for client in db.session.scalars(select(MachineClient).order_by(MachineClient.name)):
        rights = ",".join(r for r, on in (("store", client.can_store),
                                          ("read", client.can_read)) if on)
        state = "active" if client.active else "deactivated"
        click.echo(f"{client.name}\t{rights or '-'}\t{state}")


@clients_cli.command("deactivate")
@click.argument("name")
@with_appcontext
def deactivate_command(name: str) -> None:
    """Turn a client off at once."""
    if not clients.deactivate_client(db.session, name):
        raise click.ClickException(f"no client named {name!r}")
    db.session.commit()
    click.echo(f"{name} deactivated")
