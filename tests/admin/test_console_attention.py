"""The console's "needs attention" counts (issue 15 item 5): one of each thing, each count
right, each count's link a list that shows it; and a failed report-ready notice kept in the
audit trail (e-mail to a closed loopback port)."""

from __future__ import annotations

import re
from datetime import timedelta

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from portal.access.grants import create_grant
from portal.access.models import AuditEvent, User
from portal.access.principal import user_principal
from portal.db import utcnow
from portal.reports.notify import NOTICE_WHO, notifier
from portal.reports.service import IncomingReport, receive_report
from portal.sharing import service
from portal.sharing.routes import share_policy
from tests.admin.conftest import SYSTEM, Practice
from tests.conftest import IdentityProvider, free_port, signed_in


def _lock(app: Flask, token: str) -> None:
    """Wrong PINs until the link locks (which also raises a security alert)."""
    with app.test_request_context():
        policy = share_policy()
    for _attempt in range(policy.max_failed_pins + 1):
        try:
            service.exchange(app.extensions["db"], policy, token=token, pin="000000",
                             address="127.0.0.1", device="test")
        except service.LinkLocked:
            return
        except service.WrongPin:
            continue
    raise AssertionError("the link did not lock")


def _failed_notice(app: Flask, study_uid: str) -> int:
    """A final report of the study whose e-mail cannot go (nothing listens on the port)."""
    app.config["PORTAL"]["SMTP_URL"] = f"smtp://127.0.0.1:{free_port()}"
    with app.extensions["db"].write_transaction() as session:
        report, _ = receive_report(session, IncomingReport(
            source="test", source_id="R-1", status="final", study_instance_uid=study_uid,
            patient_id="DOE-1", patient_name="Doe^Jane", impression="Normal."))
        report_id = report.id
    notifier(app)(report_id)
    return report_id


def _counts(client: FlaskClient) -> dict[str, tuple[int, str]]:
    """Each "needs attention" line: its words -> (count, link)."""
    page = client.get("/admin/").get_data(as_text=True)
    block = page.split("Needs attention", 1)[1].split("</ul>", 1)[0]
    found = re.findall(r'<a href="([^"]+)"><strong>(\d+)</strong> ([^<]+)</a>', block)
    return {words: (int(count), href.replace("&amp;", "&")) for href, count, words in found}


def test_each_count_is_right_and_links_to_a_list_showing_it(practice: Practice,
                                                            idp: IdentityProvider) -> None:
    app = practice.app
    manager = signed_in(app, idp, practice.manager)
    before = _counts(manager)
    assert before["report notices not delivered this week"][0] == 0
    assert before["grants end within 7 days"][0] == 0
    assert before["share links locked (wrong PINs)"][0] == 0

    soon = utcnow() + timedelta(days=3)
    with app.test_request_context(), app.extensions["db"].write_transaction() as session:
        create_grant(session, SYSTEM, user_id=practice.newcomer,
                     study_uid=practice.doe_studies[1], expires_at=soon, reason="rota")
        doctor = user_principal(session.get(User, practice.house), "session")
        service.create_share(session, doctor, share_policy(), study_uid=practice.doe_studies[0],
                             expires_at=soon)
        locked = service.create_share(session, doctor, share_policy(),
                                      study_uid=practice.roe_study, days=30).token
    _lock(app, locked)
    report_id = _failed_notice(app, practice.doe_studies[0])

    counts = _counts(manager)
    assert counts["referrers in studies match nobody"][0] == 1  # Dr Wilson
    assert counts["grants end within 7 days"][0] == 1
    assert counts["share links end within 7 days"][0] == 1
    assert counts["share links locked (wrong PINs)"][0] == 1
    assert counts["security alerts this week"][0] == 1  # the lock
    assert counts["report notices not delivered this week"][0] == 1

    def listed(words: str) -> str:
        return manager.get(counts[words][1]).get_data(as_text=True)

    assert "JAMES WILSON" in listed("referrers in studies match nobody")
    assert "Nina Newcomer" in listed("grants end within 7 days")
    assert "Jane Doe" in listed("grants end within 7 days")
    expiring = listed("share links end within 7 days")
    assert "Jane Doe" in expiring and "CT chest" in expiring and "Richard Roe" not in expiring
    locked_list = listed("share links locked (wrong PINs)")
    assert "Richard Roe" in locked_list and "Jane Doe" not in locked_list
    assert "Access changed (refused or failed)" in listed("security alerts this week")
    failures = listed("report notices not delivered this week")
    assert "Report notices not delivered" in failures
    assert "E-mail \u201creport ready\u201d to Gregory House not delivered" in failures
    assert "Jane Doe" in failures and "CT chest" in failures
    # the UID only inside the details, never as the line a person reads
    assert failures.split(practice.doe_studies[0])[0].count("<details") >= 1
    assert "Signed in" not in failures  # only failed deliveries, not the whole trail

    with app.extensions["db"].new_session() as session:
        [kept] = session.scalars(select(AuditEvent).where(AuditEvent.who == NOTICE_WHO)).all()
    assert kept.outcome != 0 and kept.study_instance_uid == practice.doe_studies[0]
    assert kept.details == {"notice": "email", "report": report_id, "user": practice.house}
    assert "@" not in str(kept.details)  # the address stays out of the trail
    api = manager.get("/api/attention").get_json()
    assert api["failed_deliveries"] == 1 and api["links_locked"] == 1
