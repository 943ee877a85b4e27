"""``flask --app app clients ...``: machine clients for /dicomweb."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from flask import current_app
from flask.cli import with_appcontext
from sqlalchemy import select

from portal.access import clients
from portal.access.models import MachineClient, User
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


@click.group("users", help="People: roles, practices, deactivation.")
def users_cli() -> None:
    """User commands."""


def _one_user(who: str) -> User:
    from portal.access.users import find_users

    found = find_users(db.session, who)
    if not found:
        raise click.ClickException(f"nobody with subject or e-mail {who!r} has signed in yet")
    if len(found) > 1:
        raise click.ClickException(f"{who!r} matches {len(found)} accounts; use the subject")
    return found[0]


@users_cli.command("grant-role")
@click.argument("who")
@click.argument("role")
@with_appcontext
def grant_role_command(who: str, role: str) -> None:
    """Give ROLE to the user whose subject or e-mail is WHO (after their first sign-in)."""
    from portal import audit
    from portal.access.users import UserError, set_roles

    upgrade_database(current_app)
    user = _one_user(who)
    try:
        set_roles(db.session, user, [*user.roles, role])
    except UserError as exc:
        raise click.ClickException(str(exc)) from exc
    audit.append(db.session, audit.SECURITY_ALERT, action="U", outcome=audit.OUTCOME_SUCCESS,
                 who="cli", details={"type": audit.USER_SECURITY_CHANGED,
                                     "user": f"{user.issuer}|{user.subject}",
                                     "roles": user.roles})
    db.session.commit()
    click.echo(f"{user.email or user.subject}: {', '.join(user.roles)}")


@users_cli.command("list")
@with_appcontext
def list_users_command() -> None:
    """List users with their roles."""
    for user in db.session.scalars(select(User).order_by(User.id)):
        state = "active" if user.active else "deactivated"
        click.echo(f"{user.subject}\t{user.email}\t{','.join(user.roles) or '-'}\t{state}")


@click.group("audit", help="The audit trail.")
def audit_cli() -> None:
    """Audit commands."""


@audit_cli.command("verify")
@click.option("--repository", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="the audit repository's log (what AUDIT_SYSLOG_URL received): every record "
                   "in it must still be in the database, unchanged")
@with_appcontext
def verify_audit_command(repository: Path | None) -> None:
    """Recompute the hash chain and check its end against the signed checkpoints (and the
    repository's log); exit 1 if any record was changed or removed."""
    from portal.audit import checkpoints_from, verify_trail
    from portal.audit_forward import read_repository

    settings = current_app.config["PORTAL"]
    received, received_checkpoints = read_repository(repository) if repository else (None, [])
    verdict = verify_trail(db.session,
                           checkpoints=checkpoints_from(settings, current_app.instance_path),
                           received=received, received_checkpoints=received_checkpoints)
    if repository is None and settings["AUDIT_SYSLOG_URL"]:
        verdict.notes.append("pass --repository FILE (the repository's log) to compare the "
                             "records with what AUDIT_SYSLOG_URL received")
    if verdict.unsealed:
        oldest = verdict.oldest_unsealed
        age = f", the oldest written {oldest:%Y-%m-%d %H:%M:%S}Z" if oldest else ""
        click.echo(f"{verdict.unsealed} record(s) not sealed yet{age}: committed, not yet "
                   "in the chain (audit seal chains them)")
    if not verdict.problems:
        click.echo(f"audit trail intact: {verdict.checked} records")
    else:
        click.echo(f"audit trail BROKEN ({verdict.checked} records in the database):")
        for problem in verdict.problems:
            click.echo(f"  - {problem}")
    for note in verdict.notes:
        click.echo(f"note: {note}", err=True)
    if verdict.problems:
        sys.exit(1)


@audit_cli.command("seal")
@click.option("--watch", type=click.FloatRange(0, 3600), default=0,
              help="keep sealing every this many seconds (0: once)")
@with_appcontext
def seal_audit_command(watch: float) -> None:
    """Chain the committed records not sealed yet (one sealer at a time per database)."""
    from sqlalchemy.exc import OperationalError

    from portal.audit import seal
    from portal.repeat import run_repeatedly

    database = db._get_current_object()  # type: ignore[attr-defined]

    def step() -> None:
        sealed = seal(database)
        if not watch:
            click.echo("another sealer holds the lock" if sealed is None
                       else f"sealed {sealed} audit record(s)")

    run_repeatedly(step, OperationalError, every_seconds=watch, watch=bool(watch),
                   failure="sealing failed ({}); the records wait for the next run")


@audit_cli.command("checkpoint")
@click.option("--watch", type=click.IntRange(0, 86400), default=0,
              help="sign a checkpoint every this many seconds (0: once)")
@with_appcontext
def checkpoint_audit_command(watch: int) -> None:
    """Sign the trail's current end with AUDIT_CHECKPOINT_KEY, append it to the checkpoint
    file and send it to AUDIT_SYSLOG_URL when set."""
    from portal.audit import CheckpointRefused, checkpoint_now, checkpoints_from
    from portal.audit_forward import ForwardFailed, send_checkpoint
    from portal.repeat import run_repeatedly

    settings = current_app.config["PORTAL"]
    checkpoints = checkpoints_from(settings, current_app.instance_path)
    if checkpoints is None:
        click.echo("AUDIT_CHECKPOINT_KEY is not set", err=True)
        sys.exit(1)
    database = db._get_current_object()  # type: ignore[attr-defined]

    def step() -> None:
        try:
            checkpoint = checkpoint_now(database, checkpoints)
        except CheckpointRefused as exc:
            click.echo(f"no checkpoint: {exc}", err=True)
            sys.exit(1)
        if checkpoint is None:
            click.echo("the audit trail is empty: nothing to sign yet")
            return
        click.echo(f"checkpoint: {checkpoint.count} records, newest {checkpoint.record_id} "
                   f"({checkpoint.at})")
        if settings["AUDIT_SYSLOG_URL"]:
            send_checkpoint(settings["AUDIT_SYSLOG_URL"], checkpoint,
                            ca_file=settings["AUDIT_SYSLOG_CA"])

    run_repeatedly(step, ForwardFailed, every_seconds=watch, watch=bool(watch),
                   failure="{}; the checkpoint is in the file and goes with the next forward")


@audit_cli.command("forward")
@click.option("--watch", type=click.IntRange(0, 86400), default=0,
              help="keep forwarding every this many seconds (0: once)")
@with_appcontext
def forward_audit_command(watch: int) -> None:
    """Send new audit records to AUDIT_SYSLOG_URL; what cannot be sent waits for next time."""
    from portal.audit import checkpoints_from
    from portal.audit_forward import ForwardFailed, forward
    from portal.jobs import once_per_cluster
    from portal.repeat import run_repeatedly

    settings = current_app.config["PORTAL"]
    if not settings["AUDIT_SYSLOG_URL"]:
        click.echo("AUDIT_SYSLOG_URL is not set", err=True)
        sys.exit(1)
    database = db._get_current_object()  # type: ignore[attr-defined]

    checkpoints = checkpoints_from(settings, current_app.instance_path)

    def step() -> None:
        # One forwarder per cluster at a time (the job audit-forward takes the same lock).
        with once_per_cluster("audit-forward") as mine:
            if not mine:
                click.echo("another forwarder is running; this run is skipped", err=True)
                return
            sent = forward(database, settings["AUDIT_SYSLOG_URL"],
                           ca_file=settings["AUDIT_SYSLOG_CA"], checkpoints=checkpoints)
        click.echo(f"forwarded {sent} audit record(s)")

    run_repeatedly(step, ForwardFailed, every_seconds=watch, watch=bool(watch),
                   failure="{}; the records wait for the next run")


@audit_cli.command("protect")
@click.argument("role")
@with_appcontext
def protect_audit_command(role: str) -> None:
    """PostgreSQL: let ROLE (the portal's database user) only add and read audit records."""
    from portal.audit_forward import protect_table

    try:
        protect_table(db._get_current_object(), role)  # type: ignore[attr-defined]
    except ValueError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    click.echo(f"{role} may now only insert and read audit records")
