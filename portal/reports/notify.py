""""Report ready" notices to the study's referring physicians: e-mail (PORTAL_SMTP_URL) and,
optionally, the text-message webhook. Neutral text with a sign-in link, no patient data."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

from flask import Flask, current_app
from flask_babel import force_locale, ngettext
from flask_babel import gettext as _
from sqlalchemy import select
from sqlalchemy.orm import Session

from portal.access.models import ReferrerIdentifier, User
from portal.db import utcnow
from portal.index.models import Study, StudyReferrer
from portal.reports.models import Report
from portal.reports.service import study_of_report

log = logging.getLogger(__name__)
PORTAL_NAME = "The referrer portal"  # the English name; messages use _(PORTAL_NAME)


def recipients(session: Session, study: Study) -> list[User]:
    """Active users whose referrer identifiers the study names."""
    return list(session.scalars(
        select(User).join(ReferrerIdentifier, ReferrerIdentifier.user_fk == User.id)
        .join(StudyReferrer, StudyReferrer.key == ReferrerIdentifier.key)
        .where(StudyReferrer.study_fk == study.id, User.active.is_(True)).distinct()))


def report_link(public_url: str) -> str:
    """Where a notice sends its reader: sign in, then the studies with new reports."""
    return (public_url or "").rstrip("/") + "/studies?report=new"


def message(public_url: str) -> tuple[str, str]:
    """Subject and body: no name, no study, no finding; just where to sign in."""
    link = report_link(public_url)
    return (_("A report is ready"),
            _("Hello,\n\na radiology report for one of your patients is ready in the referrer "
              "portal.\n\nSign in to read it:\n%(link)s\n", link=link))


def sms_text(public_url: str) -> str:
    """The text message: as neutral as the e-mail, the same link."""
    return str(_("%(portal)s: a new report is ready. Sign in to read it: %(link)s",
                 portal=_("The referrer portal"), link=report_link(public_url)))


# Who the audit trail names for a notice that could not be delivered: the console counts
# and lists these (a failed send is otherwise only a log line, gone with the log).
NOTICE_WHO = "portal:report-notice"


def record_failed_notice(app: Flask, *, report_id: int, user_id: int, channel: str,
                         study_uid: str, patient_id: str) -> None:
    """Keep one failed notice in the audit trail (refused outcome), never the address."""
    from portal import audit

    audit.record(app.extensions["db"], audit.APPLICATION_ACTIVITY, action="E",
                 outcome=audit.OUTCOME_MINOR_FAILURE, who=NOTICE_WHO,
                 study_instance_uid=study_uid, patient_id=patient_id,
                 details={"notice": channel, "report": report_id, "user": user_id})


def notifier(app: Flask) -> Callable[[int], None]:
    """A function that sends the notices for a report id (used by every way in): the job
    ``report-notice`` (``send_notices``), on the job queue when it has workers, else here
    and now as before (portal/jobs.py)."""
    from portal import jobs

    def notify(report_id: int) -> None:
        jobs.enqueue("report-notice", report_id, app=app)

    return notify


def send_notices(report_id: int) -> None:
    """Send the notices for a report id: an e-mail to each recipient with an address, and a
    text message to each who chose one and has a number. One failed message is logged and
    kept in the audit trail (the console lists it) and loses neither the others nor the
    report."""
    from portal.notify import DeliveryFailed, send_email, send_sms

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    settings = app.config["PORTAL"]
    if not settings["SMTP_URL"] and not settings["SMS_WEBHOOK_URL"]:
        return
    database = app.extensions["db"]
    # Who, read first: no transaction stays open while mail and gateway answer.
    with database.new_session() as session:
        report = session.get(Report, report_id)
        if report is None:
            return
        study = study_of_report(session, report)
        if study is None:
            return  # unmatched: the notice goes when the study arrives (waiting_notices)
        people = [(u.id, u.email, u.phone_number if u.notify_by_sms else "", u.language)
                  for u in recipients(session, study)]
        study_uid = study.study_instance_uid
        patient_id = study.patient.patient_id
    sent = False
    for user_id, email, phone, language in people:
        # In the recipient's own language (portal/i18n.py), else the portal's default.
        with force_locale(language or "en"):
            subject, body = message(settings["PUBLIC_URL"] or "")
            text = sms_text(settings["PUBLIC_URL"] or "")
        channels: list[tuple[str, Callable[[], None]]] = []
        if email and settings["SMTP_URL"]:
            channels.append(("e-mail", partial(send_email, settings, email, subject, body)))
        if phone and settings["SMS_WEBHOOK_URL"]:
            channels.append(("text message", partial(send_sms, settings, phone, text, "notice")))
        for words, send in channels:
            try:
                send()
                sent = True
            except DeliveryFailed:
                log.warning("report-ready %s to user %s failed", words, user_id)
                record_failed_notice(app, report_id=report_id, user_id=user_id,
                                     channel="email" if words == "e-mail" else "text",
                                     study_uid=study_uid, patient_id=patient_id)
    if sent:
        with database.write_transaction() as session:
            report = session.get(Report, report_id)
            if report is not None:
                report.notified_at = utcnow()


def waiting_notices(session: Session, study_uids: list[str]) -> list[int]:
    """Final reports of these studies that no notice has announced yet: those that came
    before their study (or before anyone could be told), for the after-ingest step."""
    from portal.reports.service import reports_of

    waiting = []
    for study in session.scalars(select(Study).where(Study.study_instance_uid.in_(study_uids))):
        waiting += [r.id for r in reports_of(session, study)
                    if r.status in ("final", "amended") and r.final_at is not None
                    and r.notified_at is None]
    return waiting


def send_digest(app: Flask) -> int:
    """E-mail every active physician who has unread final reports how many (no patient data);
    returns how many e-mails went out. Meant for a daily timer (``reports digest``)."""
    from sqlalchemy import func

    from portal.access.policy import study_filter
    from portal.access.principal import user_principal
    from portal.notify import DeliveryFailed, send_email
    from portal.reports.service import unread_report_condition

    settings = app.config["PORTAL"]
    if not settings["SMTP_URL"]:
        raise DeliveryFailed("e-mail is not configured on this portal (PORTAL_SMTP_URL)")
    link = report_link(settings["PUBLIC_URL"] or "")
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
            with force_locale(user.language or "en"):
                body = ngettext(
                    "Hello,\n\n%(num)d study has a new report in the referrer portal.\n\n"
                    "Sign in to read it:\n%(link)s\n",
                    "Hello,\n\n%(num)d studies have a new report in the referrer portal.\n\n"
                    "Sign in to read them:\n%(link)s\n", count, link=link)
                subject = _("New reports")
            try:
                send_email(settings, user.email, subject, body)
                sent += 1
            except DeliveryFailed:
                log.warning("digest e-mail to user %s failed", user.id)
    return sent


def send_digest_now() -> int:
    """The periodic job ``report-digest`` (portal/jobs.py)."""
    return send_digest(current_app._get_current_object())  # type: ignore[attr-defined]
