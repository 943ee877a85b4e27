"""``flask --app app hl7 serve`` and ``flask --app app reports release-rule``."""

from __future__ import annotations

import sys
from zoneinfo import ZoneInfo

import click
from flask import current_app
from flask.cli import with_appcontext
from sqlalchemy import select

from portal.access.models import Practice
from portal.migrate import upgrade_database
from portal.reports.models import ReleaseRule


@click.group("hl7", help="HL7 v2 messages from the RIS.")
def hl7_cli() -> None:
    """HL7 commands."""


@hl7_cli.command("serve")
@with_appcontext
def serve_command() -> None:
    """Receive ORU^R01, ORM^O01, OMI^O23 and SIU^S12-S15 over MLLP until interrupted."""
    from portal.db import db
    from portal.reports import inbound
    from portal.reports.mllp import MllpServer
    from portal.reports.notify import notifier
    from portal.tls import server_context

    upgrade_database(current_app)
    settings = current_app.config["PORTAL"]
    allowed = inbound.parse_senders(settings["HL7_ALLOWED_SENDERS"])
    if not allowed:
        # Closed by default, like the DIMSE SCP: nobody is trusted until listed.
        click.echo("warning: HL7_ALLOWED_SENDERS is empty: every message will be refused (AR, "
                   "sender not allowed) until senders are listed as APPLICATION@address",
                   err=True)
    database = db._get_current_object()  # type: ignore[attr-defined]
    notify = notifier(current_app._get_current_object())  # type: ignore[attr-defined]
    zone = ZoneInfo(settings["TIMEZONE"])  # HL7 times without an offset are the practice's

    def on_message(raw: bytes, peer: str, oversized: bool) -> bytes:
        return inbound.handle(raw, database, peer_address=peer, allowed=allowed,
                              max_bytes=settings["HL7_MAX_BYTES"], oversized=oversized,
                              notify=notify, zone=zone)

    tls = server_context(settings["HL7_TLS_CERT"], settings["HL7_TLS_KEY"], settings["HL7_TLS_CA"])
    server = MllpServer((settings["HL7_HOST"], settings["HL7_PORT"]), on_message,
                        settings["HL7_MAX_BYTES"], tls)
    secure = "" if tls is None else (
        " (TLS 1.2+, client certificates required)" if settings["HL7_TLS_CA"] else " (TLS 1.2+)")
    click.echo(f"HL7 MLLP listener on {settings['HL7_HOST']}:{server.server_address[1]}{secure}",
               err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@click.group("reports", help="Report release rules and the daily digest.")
def reports_cli() -> None:
    """Report commands."""


@reports_cli.command("release-rule")
@click.option("--practice", default="", help="practice name (empty: every practice)")
@click.option("--modality", default="", help="modality, e.g. CT (empty: every modality)")
@click.option("--hours", type=click.IntRange(0, 24 * 365), required=True,
              help="hours after a report is final before its patient may read it")
@with_appcontext
def release_rule_command(practice: str, modality: str, hours: int) -> None:
    """Set how long patients wait for final reports (the longest matching rule applies)."""
    from portal.db import db

    upgrade_database(current_app)
    with db.write_transaction() as session:
        practice_fk = None
        if practice:
            found = session.scalars(select(Practice).where(Practice.name == practice)).first()
            if found is None:
                click.echo(f"no practice named {practice!r}", err=True)
                sys.exit(1)
            practice_fk = found.id
        rule = session.scalars(select(ReleaseRule).where(
            ReleaseRule.practice_fk.is_(None) if practice_fk is None
            else ReleaseRule.practice_fk == practice_fk,
            ReleaseRule.modality == modality.upper())).first()
        if rule is None:
            rule = ReleaseRule(practice_fk=practice_fk, modality=modality.upper())
            session.add(rule)
        rule.delay_hours = hours
    click.echo(f"patients of {practice or 'every practice'} read {modality.upper() or 'every'}"
               f" report {hours} h after it is final")


@reports_cli.command("digest")
@with_appcontext
def digest_command() -> None:
    """E-mail each physician with unread reports how many there are (run it daily)."""
    from portal.notify import DeliveryFailed
    from portal.reports.notify import send_digest

    try:
        sent = send_digest(current_app._get_current_object())  # type: ignore[attr-defined]
    except DeliveryFailed as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    click.echo(f"sent {sent} digest e-mail(s)")
