"""Share-link attacks that other tests do not name: a forged Host header steering the link
sender's notice e-mail to another site, and PHI pages of the share flow read without a
trace in the audit trail."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from portal.access.models import AuditEvent
from tests.conftest import OIDC_SETTINGS, IdentityProvider, close_app, make_app, wait_for
from tests.sharing.conftest import build_world, make_share, open_link
from tests.sharing.test_delivery import (  # noqa: F401 (fixtures)
    Mailbox,
    _doctor_with_study,
    _make,
    mailbox,
    sms,
)

PUBLIC = "http://portal.clinic.test"


@pytest.fixture
def public_portal(tmp_path: Path, idp: IdentityProvider, mailbox: tuple[Mailbox, int]  # noqa: F811
                  ) -> Iterator[Flask]:
    application = make_app(tmp_path / "instance", OIDC_ISSUER=idp.issuer, PUBLIC_URL=PUBLIC,
                           SMTP_URL=f"smtp://127.0.0.1:{mailbox[1]}",
                           SMTP_FROM="portal@clinic.test", **OIDC_SETTINGS)
    yield application
    close_app(application)


def _exchange_from(app: Flask, host: str, token: str, pin: str) -> Any:
    return app.test_client().post("/s/exchange", data={"token": token, "pin": pin},
                                  base_url=f"http://{host}")


def test_a_forged_host_never_reaches_the_senders_mail(public_portal: Flask,
                                                      idp: IdentityProvider,
                                                      mailbox: tuple[Mailbox, int]  # noqa: F811
                                                      ) -> None:
    doctor, study = _doctor_with_study(public_portal, idp)
    token, pin, public_id, url = _make(doctor, study, notify="on")
    assert url.startswith(f"{PUBLIC}/s?lang=en#")
    # First use, from a request whose Host names the attacker's site.
    assert _exchange_from(public_portal, "evil.example", token, pin).status_code == 303
    assert wait_for(lambda: len(mailbox[0].messages) == 1)
    text = mailbox[0].messages[0].get_payload(decode=True).decode()
    assert f"{PUBLIC}/shares/{public_id}" in text and "evil.example" not in text
    # Ten wrong PINs from that site lock the link: the lock notice is not steered either.
    wrong = "000000" if pin != "000000" else "111111"
    for _ in range(10):
        _exchange_from(public_portal, "evil.example", token, wrong)
    assert wait_for(lambda: len(mailbox[0].messages) == 2)
    text = mailbox[0].messages[1].get_payload(decode=True).decode()
    assert f"{PUBLIC}/shares/{public_id}" in text and "evil.example" not in text


def _events(app: Flask, event_id: str) -> list[AuditEvent]:
    with app.extensions["db"].new_session() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.event_id == event_id)
                                    .order_by(AuditEvent.id)))


def test_the_visitors_study_list_is_audited(app: Flask) -> None:
    world = build_world(app)
    made = make_share(world, whole_patient=True)
    visitor = app.test_client()
    assert open_link(visitor, made.token, made.pin).status_code == 303
    before = len(_events(app, "110112"))
    page = visitor.get("/shared")
    assert page.status_code == 200
    queries = _events(app, "110112")[before:]
    assert len(queries) == 1
    assert queries[0].who == f"share:{made.link.public_id}" and queries[0].outcome == 0
    assert queries[0].details["results"] == 2


def test_the_share_form_is_audited_as_a_study_view(public_portal: Flask,
                                                   idp: IdentityProvider) -> None:
    doctor, study = _doctor_with_study(public_portal, idp)
    page = doctor.get(f"/studies/{study}/share")
    assert page.status_code == 200 and b"Secretname" in page.data
    views = [e for e in _events(public_portal, "110103") if e.details.get("view") == "share form"]
    assert len(views) == 1
    assert views[0].study_instance_uid == study and views[0].patient_id == "PAT-SECRET-9"


def test_closing_a_shared_view_clears_the_browser_and_ends_the_session(app: Flask) -> None:
    world = build_world(app)
    made = make_share(world)
    visitor = app.test_client()
    assert open_link(visitor, made.token, made.pin).status_code == 303
    cookie = visitor.get_cookie("share")
    assert cookie is not None
    assert visitor.get(f"/studies/{world.study}").status_code == 200
    closed = visitor.post("/shared/close")
    assert closed.status_code == 303
    assert closed.headers["Clear-Site-Data"] == '"cache", "cookies", "storage"'
    replay = app.test_client()
    replay.set_cookie("share", cookie.value)
    assert replay.get(f"/studies/{world.study}").status_code == 401
    assert replay.get(f"/dicomweb/studies/{world.study}/metadata").status_code == 401
