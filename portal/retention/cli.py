"""``flask retention due`` (list what the rules no longer keep) and ``flask retention apply
--approved`` (delete what an office manager approved and is still due)."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import with_appcontext
from sqlalchemy import select

from portal.db import Database

retention_cli = click.Group("retention", help="Retention: studies due for deletion.")


@retention_cli.command("due")
@click.option("--watch", is_flag=True,
              help="Keep running without a job worker: every day list the studies due and "
                   "delete the approved ones that still are (the job retention-daily).")
@with_appcontext
def due_command(watch: bool) -> None:
    """List the studies due for deletion now (and keep the console's list up to date)."""
    if watch:
        from portal.jobs import once_per_cluster
        from portal.repeat import run_repeatedly
        from portal.retention.service import run_daily

        def step() -> None:
            with once_per_cluster("retention-daily") as mine:
                if mine:
                    click.echo(f"{run_daily()} studies deleted")

        run_repeatedly(step, Exception, every_seconds=86400, watch=True,
                       failure="retention run failed: {}")
        return
    _list_due()


def _list_due() -> None:
    from portal.index.models import Patient, Study
    from portal.jobs import once_per_cluster
    from portal.retention.models import RetentionDue
    from portal.retention.service import refresh_due

    database: Database = current_app.extensions["db"]
    with once_per_cluster("retention-daily") as mine:
        if not mine:
            click.echo("another node is listing the due studies now", err=True)
            raise SystemExit(1)
        with database.write_transaction() as session:
            due = refresh_due(session)
            approved = {row.study_instance_uid: row.approved_by
                        for row in session.scalars(select(RetentionDue))}
            rows = {uid: (date, pid) for uid, date, pid in session.execute(
                select(Study.study_instance_uid, Study.study_date, Patient.patient_id)
                .join(Patient, Patient.id == Study.patient_fk)
                .where(Study.study_instance_uid.in_([d.study_instance_uid for d in due])))}
    for item in due:
        study_date, patient_id = rows.get(item.study_instance_uid, ("", ""))
        state = f"approved by {approved[item.study_instance_uid]}" \
            if approved.get(item.study_instance_uid) else "waiting for approval"
        click.echo(f"{item.study_instance_uid}  patient {patient_id}  study {study_date or '-'}"
                   f"  kept until {item.kept_until:%Y-%m-%d}  {state}")
    click.echo(f"{len(due)} stud{'y' if len(due) == 1 else 'ies'} due for deletion")


@retention_cli.command("apply")
@click.option("--approved", is_flag=True,
              help="delete the studies an office manager approved (required: nothing else is "
                   "ever deleted)")
@with_appcontext
def apply_command(approved: bool) -> None:
    """Delete the approved studies that are still due, each in one transaction."""
    from portal.jobs import once_per_cluster
    from portal.retention.service import apply_approved

    if not approved:
        click.echo("retention apply deletes only approved studies: pass --approved", err=True)
        raise SystemExit(2)
    with once_per_cluster("retention-daily") as mine:
        if not mine:
            click.echo("another node is deleting due studies now", err=True)
            raise SystemExit(1)
        failed: list[str] = []
        done = apply_approved(current_app.extensions["db"], who="cli:retention apply",
                              failed=failed)
    for item in done:
        what = "local copies" if item.local_copies_only else "study"
        click.echo(f"deleted {what} {item.study_instance_uid}: {item.instances} instances, "
                   f"{len(item.files)} files")
    click.echo(f"{len(done)} stud{'y' if len(done) == 1 else 'ies'} deleted")
    for uid in failed:
        click.echo(f"not deleted (kept whole, see the log): {uid}", err=True)
    if failed:
        raise SystemExit(1)
