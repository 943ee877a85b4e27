""""Report ready" by text message: an ORU^R01 over real MLLP, the SMS webhook a local HTTP
receiver, e-mail a real SMTP server (all on 127.0.0.1). The text names no patient or study."""

from __future__ import annotations

import json
from typing import Any

from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import select

from portal.access.grants import update_user
from portal.access.models import User
from portal.reports.models import Report
from tests.conftest import IdentityProvider, free_port
from tests.reports import test_hl7
from tests.reports.test_hl7 import ADMIN, Ris, msa, oru, people, send, store_study
from tests.sharing import test_delivery
from tests.sharing.test_delivery import Mailbox

ris = test_hl7.ris  # the MLLP listener wired as `flask hl7 serve` wires it
mailbox = test_delivery.mailbox  # aiosmtpd on 127.0.0.1
sms = test_delivery.sms  # an HTTP receiver standing in for the SMS gateway

PUBLIC_URL = "https://portal.example"


def configure(app: Flask, smtp_port: int, sms_port: int) -> None:
    settings = app.config["PORTAL"]
    settings["SMTP_URL"] = f"smtp://127.0.0.1:{smtp_port}"
    settings["SMS_WEBHOOK_URL"] = f"http://127.0.0.1:{sms_port}/send"
    settings["PUBLIC_URL"] = PUBLIC_URL


def choose_sms(app: Flask, subject: str, phone: str, chosen: bool = True) -> None:
    with app.extensions["db"].write_transaction() as session:
        user = session.scalars(select(User).where(User.subject == subject)).one()
        update_user(session, ADMIN, user.id, phone_number=phone, notify_by_sms=chosen)


def report_of(app: Flask, accession: str) -> Report:
    with app.extensions["db"].new_session() as session:
        return session.scalars(select(Report).where(Report.accession_number == accession)).one()


def test_final_report_texts_the_referrer_who_chose_sms_with_the_link_only(
        ris: Ris, idp: IdentityProvider, mailbox: tuple[Mailbox, int],
        sms: tuple[list[dict[str, Any]], int]) -> None:
    calls, sms_port = sms
    box, smtp_port = mailbox
    app = ris.app
    configure(app, smtp_port, sms_port)
    subjects = people(app, idp)
    choose_sms(app, subjects["doctor"], "+49 170 1234567")
    choose_sms(app, subjects["other"], "+4917099999999")  # not this study's referrer
    accession = "S" + generate_uid()[-8:]
    study = store_study(app, accession)
    [ack] = send(ris.port, oru(accession, "P", "IMP:Preliminary read."))
    assert msa(ack)[0] == "AA" and calls == []  # preliminary: no notice
    send(ris.port, oru(accession, "F", "IMP:Final read of the chest."))
    assert len(calls) == 1, calls
    sent = calls[0]["json"]
    assert sent == {"to": "+491701234567", "kind": "notice",
                    "text": "The referrer portal: a new report is ready. Sign in to read it: "
                            f"{PUBLIC_URL}/studies?report=new"}
    whole = json.dumps(calls[0])
    for secret in ("Roe", "Richard", "P-R", accession, study, "CT chest", "CTCHEST",
                   "Final read", "chest", "Wilson", "19600101"):
        assert secret not in whole, secret
    assert len(box.messages) == 1  # the e-mail goes as before
    assert report_of(app, accession).notified_at is not None

    send(ris.port, oru(accession, "F", "IMP:Final read of the chest."))  # a resend: nothing
    assert len(calls) == 1
    send(ris.port, oru(accession, "C", "IMP:Amended read."))  # an amendment: a new notice
    assert len(calls) == 2 and calls[1]["json"]["to"] == "+491701234567"


def test_no_text_message_for_a_referrer_who_did_not_choose_one(
        ris: Ris, idp: IdentityProvider, mailbox: tuple[Mailbox, int],
        sms: tuple[list[dict[str, Any]], int]) -> None:
    calls, sms_port = sms
    box, smtp_port = mailbox
    app = ris.app
    configure(app, smtp_port, sms_port)
    subjects = people(app, idp)
    choose_sms(app, subjects["doctor"], "+491701234567", chosen=False)  # a number, no choice
    accession = "T" + generate_uid()[-8:]
    store_study(app, accession)
    send(ris.port, oru(accession, "F", "IMP:Final read."))
    assert calls == []
    assert [m["To"] for m in box.messages] == [f"{subjects['doctor']}@demo.example"]


def test_a_gateway_that_is_down_loses_neither_the_email_nor_the_report(
        ris: Ris, idp: IdentityProvider, mailbox: tuple[Mailbox, int],
        caplog: Any) -> None:
    box, smtp_port = mailbox
    app = ris.app
    configure(app, smtp_port, free_port())  # nothing listens there
    subjects = people(app, idp)
    choose_sms(app, subjects["doctor"], "+491701234567")
    accession = "U" + generate_uid()[-8:]
    store_study(app, accession)
    [ack] = send(ris.port, oru(accession, "F", "IMP:Final read."))
    assert msa(ack)[0] == "AA"
    assert [m["To"] for m in box.messages] == [f"{subjects['doctor']}@demo.example"]
    report = report_of(app, accession)
    assert report.status == "final" and report.impression == "Final read."
    assert report.notified_at is not None  # the e-mail went
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("report-ready text message to user" in w for w in warnings), warnings
    assert not any("+491701234567" in w for w in warnings)


def test_text_messages_go_without_email_configured(
        ris: Ris, idp: IdentityProvider, sms: tuple[list[dict[str, Any]], int]) -> None:
    calls, sms_port = sms
    app = ris.app
    app.config["PORTAL"]["SMS_WEBHOOK_URL"] = f"http://127.0.0.1:{sms_port}/send"
    subjects = people(app, idp)
    choose_sms(app, subjects["doctor"], "+491701234567")
    accession = "V" + generate_uid()[-8:]
    store_study(app, accession)
    send(ris.port, oru(accession, "F", "IMP:Final read."))
    assert [c["json"]["to"] for c in calls] == ["+491701234567"]
    assert report_of(app, accession).notified_at is not None
