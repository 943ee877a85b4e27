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
from portal.reports.service import study_of_report

log = logging.getLogger(__name__)


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
            study = study_of_report(session, report)
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


def send_digest(app: Flask) -> int:
    """E-mail every active physician who has unread final reports how many (no patient data);
    returns how many e-mails went out. Meant for a daily timer (``reports digest``)."""
    from sqlalchemy import func

    from portal.access.policy import study_filter
    from portal.access.principal import user_principal
    from portal.reports.service import unread_report_condition
    from portal.sharing.delivery import DeliveryFailed, send_email

    settings = app.config["PORTAL"]
    if not settings["SMTP_URL"]:
        raise DeliveryFailed("e-mail is not configured on this portal (PORTAL_SMTP_URL)")
    link = (settings["PUBLIC_URL"] or "").rstrip("/") + "/studies?report=new"
    sent = 0
    with app.extensions["db"].new_session() as session:
        users = list(session.scalars(select(User).where(User.active.is_(True),
                                                        User.email != "")))
        for user in users:
            if "physician" not in user.roles:
                continue
            principal = user_principal(user, "session")
            count = session.scalar(select(func.count(Study.id)).where(
                study_filter(principal), unread_report_condition(principal))) or 0
            if not count:
                continue
            body = (f"Hello,\n\n{count} stud{'y has' if count == 1 else 'ies have'} a new "
                    f"report in the referrer portal.\n\nSign in to read them:\n{link}\n")
            try:
                send_email(settings, user.email, "New reports", body)
                sent += 1
            except DeliveryFailed:
                log.warning("digest e-mail to user %s failed", user.id)
    return sent
