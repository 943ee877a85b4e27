""""Report ready" notices to the study's referring physicians: e-mail (PORTAL_SMTP_URL) and,
optionally, the text-message webhook. Neutral text with a sign-in link, no patient data."""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Flask
from sqlalchemy import select
from sqlalchemy.orm import Session

from portal.access.models import ReferrerIdentifier, User
from portal.db import utcnow
from portal.index.models import Study, StudyReferrer
from portal.reports.models import Report

log = logging.getLogger(__name__)


def _study_of(session: Session, report: Report) -> Study | None:
    if report.study_instance_uid:
        found = session.scalars(select(Study).where(
            Study.study_instance_uid == report.study_instance_uid)).first()
        if found is not None:
            return found
    if report.accession_number:
        return session.scalars(select(Study).where(
            Study.accession_number == report.accession_number)).first()
    return None


def recipients(session: Session, study: Study) -> list[User]:
    """Active users whose referrer identifiers the study names."""
    return list(session.scalars(
        select(User).join(ReferrerIdentifier, ReferrerIdentifier.user_fk == User.id)
        .join(StudyReferrer, StudyReferrer.key == ReferrerIdentifier.key)
        .where(StudyReferrer.study_fk == study.id, User.active.is_(True)).distinct()))


def message(public_url: str) -> tuple[str, str]:
    """Subject and body: no name, no study, no finding; just where to sign in."""
    link = (public_url or "").rstrip("/") + "/studies?report=new"
    return ("A report is ready", "Hello,\n\na radiology report for one of your patients is "
            f"ready in the referrer portal.\n\nSign in to read it:\n{link}\n")


def notifier(app: Flask) -> Callable[[int], None]:
    """A function that sends the notices for a report id (used by every way in)."""
    from portal.sharing.delivery import DeliveryFailed, send_email

    def notify(report_id: int) -> None:
        settings = app.config["PORTAL"]
        if not settings["SMTP_URL"]:
            return
        database = app.extensions["db"]
        with database.write_transaction() as session:
            report = session.get(Report, report_id)
            if report is None:
                return
            study = _study_of(session, report)
            if study is None:
                return  # unmatched: the notice goes when the study arrives and is read
            subject, body = message(settings["PUBLIC_URL"] or "")
            sent = False
            for user in recipients(session, study):
                if not user.email:
                    continue
                try:
                    send_email(settings, user.email, subject, body)
                    sent = True
                except DeliveryFailed:
                    log.warning("report-ready e-mail to user %s failed", user.id)
            if sent:
                report.notified_at = utcnow()

    return notify
