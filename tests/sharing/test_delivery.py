"""Delivery through real local servers: an aiosmtpd SMTP server and an HTTP receiver for the
SMS webhook, both on 127.0.0.1. Messages are neutral; a link and its PIN never share one."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiosmtpd.controller import Controller
from flask import Flask
from flask.testing import FlaskClient
from pydicom.uid import generate_uid

from portal import notify
from portal.access.grants import create_grant
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.sharing import messages
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    add_person,
    close_app,
    csrf_of,
    free_port,
    make_app,
    signed_in,
    wait_for,
)
from tests.factories import make_instance
from tests.sharing.conftest import link_row, open_link


class Mailbox:
    """An aiosmtpd handler that keeps every message it is given."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


class SmsReceiver(BaseHTTPRequestHandler):
    """Records each webhook call: its JSON body and Authorization header."""

    calls: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        SmsReceiver.calls.append({"json": json.loads(body),
                                  "auth": self.headers.get("Authorization", ""),
                                  "type": self.headers.get("Content-Type", "")})
        self.send_response(202)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        """Quiet."""


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    """A real SMTP server on 127.0.0.1."""
    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield box, port
    controller.stop()


@pytest.fixture
def sms() -> Iterator[tuple[list[dict[str, Any]], int]]:
    """A local HTTP receiver standing in for an SMS gateway."""
    SmsReceiver.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), SmsReceiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield SmsReceiver.calls, server.server_port
    server.shutdown()
    thread.join(timeout=10)


@pytest.fixture
def portal(tmp_path: Path, idp: IdentityProvider, mailbox: tuple[Mailbox, int],
           sms: tuple[list[dict[str, Any]], int]) -> Iterator[Flask]:
    """Sign-in, e-mail and text messages configured."""
    application = make_app(tmp_path / "instance", OIDC_ISSUER=idp.issuer,
                           SMTP_URL=f"smtp://127.0.0.1:{mailbox[1]}",
                           SMTP_FROM="portal@clinic.test",
                           SMS_WEBHOOK_URL=f"http://127.0.0.1:{sms[1]}/send",
                           SMS_WEBHOOK_TOKEN="gateway-secret", **OIDC_SETTINGS)
    yield application
    close_app(application)


def _doctor_with_study(app: Flask, idp: IdentityProvider) -> tuple[FlaskClient, str]:
    sub = f"doc-{generate_uid()[-8:]}"
    user_id = add_person(app, idp, sub, ["physician"], "Clinic", name="Dr Wilson")
    study = generate_uid()
    with app.app_context():
        current_archive().ingest(make_instance(study=study, patient_id="PAT-SECRET-9",
                                               patient_name="Secretname^Anna",
                                               StudyDescription="MRI knee left"), who="t")
    with app.extensions["db"].write_transaction() as session:
        create_grant(session, Principal("user", 0, "setup"), user_id=user_id, study_uid=study)
    return signed_in(app, idp, sub), study


def _make(doctor: FlaskClient, study: str, **extra: str) -> tuple[str, str, str, str]:
    page = doctor.post(f"/studies/{study}/share", data={
        "csrf_token": csrf_of(doctor), "days": "5", "pin": "on", **extra})
    assert page.status_code == 201
    html = page.get_data(as_text=True)
    token = re.search(r'name="token" value="([^"]+)"', html)
    pin = re.search(r'id="share-pin">(\d+)<', html)
    public_id = re.search(r'/shares/([0-9a-f-]{36})"', html)
    url = re.search(r'id="share-url"[^>]*value="([^"]+)"', html) or re.search(
        r'value="([^"]+)" readonly', html)
    assert token and pin and public_id and url
    return token.group(1), pin.group(1), public_id.group(1), url.group(1)


def _send(doctor: FlaskClient, public_id: str, **form: str) -> Any:
    return doctor.post(f"/shares/{public_id}/send", data={"csrf_token": csrf_of(doctor),
                                                         **form})


PHI = ("Secretname", "Anna", "PAT-SECRET-9", "MRI knee", "Wilson")


def test_link_by_email_is_neutral(portal: Flask, idp: IdentityProvider,
                                  mailbox: tuple[Mailbox, int]) -> None:
    doctor, study = _doctor_with_study(portal, idp)
    token, pin, public_id, url = _make(doctor, study)
    assert url.endswith(f"/s?lang=en#{token}")  # the link names its language
    sent = _send(doctor, public_id, token=token, pin=pin, what="link", channel="email",
                 to="patient@example.test")
    assert sent.status_code == 200 and "The link was sent." in sent.get_data(as_text=True)
    assert wait_for(lambda: len(mailbox[0].messages) == 1)
    message = mailbox[0].messages[0]
    assert message["To"] == "patient@example.test" and message["From"] == "portal@clinic.test"
    text = message.get_payload(decode=True).decode()
    assert url in text and "PIN you receive separately" in text
    assert pin not in text.replace(token, "")
    for word in PHI:
        assert word not in text and word not in message["Subject"], word
    row = link_row(portal, public_id)
    assert row.deliveries[0]["channel"] == "email"
    assert row.deliveries[0]["to_sha256"] == notify.address_digest("patient@example.test")
    assert "patient@example.test" not in json.dumps(row.deliveries)


def test_link_and_pin_by_text_message_never_together(portal: Flask, idp: IdentityProvider,
                                                     sms: tuple[list[dict[str, Any]], int]
                                                     ) -> None:
    doctor, study = _doctor_with_study(portal, idp)
    token, pin, public_id, url = _make(doctor, study)
    assert _send(doctor, public_id, token=token, pin=pin, what="link", channel="sms",
                 to="+49 170 0000001").status_code == 200
    calls = sms[0]
    assert calls[0]["json"] == {"to": "+491700000001", "kind": "share_link",
                                "text": calls[0]["json"]["text"]}
    assert url in calls[0]["json"]["text"] and pin not in calls[0]["json"]["text"]
    assert calls[0]["auth"] == "Bearer gateway-secret"
    assert calls[0]["type"] == "application/json"
    same = _send(doctor, public_id, token=token, pin=pin, what="pin", channel="sms",
                 to="+491700000001")
    assert same.status_code == 400 and len(calls) == 1
    assert _send(doctor, public_id, token=token, pin=pin, what="pin", channel="sms",
                 to="+491700000002").status_code == 200
    assert calls[1]["json"]["kind"] == "share_pin" and pin in calls[1]["json"]["text"]
    assert token not in calls[1]["json"]["text"]
    for call in calls:
        for word in PHI:
            assert word not in call["json"]["text"]


def test_only_the_real_link_and_pin_can_be_sent(portal: Flask, idp: IdentityProvider,
                                                sms: tuple[list[dict[str, Any]], int]) -> None:
    doctor, study = _doctor_with_study(portal, idp)
    token, pin, public_id, _url = _make(doctor, study)
    forged = _send(doctor, public_id, token="A" * 43, pin=pin, what="link", channel="sms",
                   to="+491700000001")
    assert forged.status_code == 400
    wrong_pin = _send(doctor, public_id, token=token, pin="123", what="pin", channel="sms",
                      to="+491700000003")
    assert wrong_pin.status_code == 400
    assert _send(doctor, public_id, token=token, pin=pin, what="link", channel="sms",
                 to="not a number").status_code == 400
    assert sms[0] == []


def test_sender_is_told_of_the_first_use_only(portal: Flask, idp: IdentityProvider,
                                              mailbox: tuple[Mailbox, int]) -> None:
    doctor, study = _doctor_with_study(portal, idp)
    token, pin, public_id, _url = _make(doctor, study, notify="on")
    assert open_link(portal.test_client(), token, pin).status_code == 303
    assert wait_for(lambda: len(mailbox[0].messages) == 1)
    notice = mailbox[0].messages[0]
    assert notice["Subject"] == "Your share link was opened"
    assert notice["To"].endswith("@demo.example")
    text = notice.get_payload(decode=True).decode()
    assert f"/shares/{public_id}" in text and token not in text
    for word in PHI:
        assert word not in text
    assert open_link(portal.test_client(), token, pin).status_code == 303
    assert not wait_for(lambda: len(mailbox[0].messages) > 1, timeout=1.5)


def test_qr_code_is_an_inline_svg_of_the_link() -> None:
    from urllib.parse import unquote

    uri = messages.qr_data_uri("https://portal.example/s#" + "A" * 43)
    assert uri.startswith("data:image/svg+xml")
    svg = unquote(uri.split(",", 1)[1])
    assert "<svg" in svg and "<path" in svg
    assert "href" not in svg and "<script" not in svg  # nothing to fetch, nothing to run


@pytest.mark.parametrize(("agent", "expected"), [
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148", "phone"),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 7) Mobile Safari/537.36", "phone"),
    ("Mozilla/5.0 (iPad; CPU OS 17_0 like Mac OS X)", "tablet"),
    ("Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0", "computer"),
    ("", "unknown")])
def test_device_classes(agent: str, expected: str) -> None:
    assert messages.device_class(agent) == expected


def test_sender_is_told_when_wrong_pins_lock_the_link(portal: Flask, idp: IdentityProvider,
                                                      mailbox: tuple[Mailbox, int]) -> None:
    doctor, study = _doctor_with_study(portal, idp)
    token, pin, public_id, _url = _make(doctor, study)
    wrong = "0" * len(pin) if pin != "0" * len(pin) else "1" * len(pin)
    visitor = portal.test_client()
    answers = [open_link(visitor, token, wrong).status_code for _ in range(10)]
    assert answers[-1] == 403 and answers[:-1] == [401] * 9
    assert wait_for(lambda: len(mailbox[0].messages) == 1)
    notice = mailbox[0].messages[0]
    assert notice["Subject"] == "Your share link was locked"
    text = notice.get_payload(decode=True).decode()
    assert f"/shares/{public_id}" in text and token not in text and pin not in text
    for word in PHI:
        assert word not in text
    assert open_link(visitor, token, wrong).status_code == 404  # locked: the uniform answer
    assert not wait_for(lambda: len(mailbox[0].messages) > 1, timeout=1.0)
