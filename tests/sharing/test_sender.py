"""The sender's side with real sign-in: the share page and /api/shares (CSRF, recent sign-in,
per-user limit, only who may see the study), management, the console, colleague links."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from portal.access.grants import create_grant
from portal.access.models import AuditEvent, Grant
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.auth.models import UserSession
from portal.db import utcnow
from portal.sharing.models import ShareLink
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    add_person,
    close_app,
    csrf_of,
    make_app,
    signed_in,
)
from tests.factories import make_instance
from tests.sharing.conftest import link_row, open_link


@pytest.fixture
def portal(tmp_path: Path, idp: IdentityProvider) -> Iterator[Flask]:
    """Sign-in at the mock provider; at most three new links per person and hour."""
    application = make_app(tmp_path / "instance", OIDC_ISSUER=idp.issuer,
                           SHARE_CREATE_PER_HOUR=3, **OIDC_SETTINGS)
    yield application
    close_app(application)


def _study(app: Flask, patient: str = "PAT-9") -> str:
    uid = generate_uid()
    with app.app_context():
        current_archive().ingest(make_instance(study=uid, patient_id=patient), who="test")
    return uid


def _grant(app: Flask, user_id: int, study: str) -> None:
    with app.extensions["db"].write_transaction() as session:
        create_grant(session, Principal("user", 0, "setup"), user_id=user_id, study_uid=study)


def _doctor(app: Flask, idp: IdentityProvider) -> tuple[FlaskClient, int, str]:
    sub = f"doc-{generate_uid()[-8:]}"
    user_id = add_person(app, idp, sub, ["physician"], "Clinic", name="Dr Wilson")
    study = _study(app)
    _grant(app, user_id, study)
    return signed_in(app, idp, sub), user_id, study


def _links(app: Flask) -> int:
    with app.extensions["db"].new_session() as session:
        return session.scalar(select(func.count()).select_from(ShareLink)) or 0


def test_sharing_from_the_study_page(portal: Flask, idp: IdentityProvider) -> None:
    doctor, _user_id, study = _doctor(portal, idp)
    page = doctor.get(f"/studies/{study}")
    assert f"/studies/{study}/share" in page.get_data(as_text=True)
    form_page = doctor.get(f"/studies/{study}/share")
    assert form_page.status_code == 200
    made = doctor.post(f"/studies/{study}/share", data={
        "csrf_token": csrf_of(doctor), "audience": "patient", "scope": "study", "days": "7",
        "pin": "on"})
    assert made.status_code == 201
    html = made.get_data(as_text=True)
    assert "/s?lang=en#" in html and 'src="data:image/svg+xml' in html
    assert made.headers["Cache-Control"] == "no-store"
    assert _links(portal) == 1
    listed = doctor.get("/shares").get_data(as_text=True)
    assert "Patient link" in listed and "active" in listed


def test_creation_is_csrf_protected(portal: Flask, idp: IdentityProvider) -> None:
    doctor, _user_id, study = _doctor(portal, idp)
    form = {"audience": "patient", "days": "7"}
    assert doctor.post(f"/studies/{study}/share", data=form).status_code == 403
    other, _, _ = _doctor(portal, idp)
    assert doctor.post(f"/studies/{study}/share",
                       data={**form, "csrf_token": csrf_of(other)}).status_code == 403
    assert doctor.post(f"/studies/{study}/share", data={**form, "csrf_token": csrf_of(doctor)},
                       headers={"Origin": "https://evil.test"}).status_code == 403
    assert doctor.post("/api/shares", json={"study_uid": study},
                       headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert _links(portal) == 0


def test_only_who_may_see_the_study_can_share_it(portal: Flask, idp: IdentityProvider) -> None:
    doctor, _user_id, _study_uid = _doctor(portal, idp)
    foreign = _study(portal, "PAT-OTHER")
    csrf = csrf_of(doctor)
    assert doctor.get(f"/studies/{foreign}/share").status_code == 404
    assert doctor.post(f"/studies/{foreign}/share", data={"csrf_token": csrf}).status_code == 404
    assert doctor.post("/api/shares", json={"study_uid": foreign},
                       headers={"X-CSRF-Token": csrf}).status_code == 404
    assert _links(portal) == 0


def test_creation_needs_a_recent_sign_in(portal: Flask, idp: IdentityProvider) -> None:
    doctor, _user_id, study = _doctor(portal, idp)
    csrf = csrf_of(doctor)
    with portal.extensions["db"].write_transaction() as session:
        session.execute(update(UserSession).values(auth_time=utcnow() - timedelta(hours=1)))
    response = doctor.post(f"/studies/{study}/share", data={"csrf_token": csrf, "days": "7"})
    assert response.status_code == 302
    assert "/auth/login?reauth=1" in response.headers["Location"]
    api = doctor.post("/api/shares", json={"study_uid": study}, headers={"X-CSRF-Token": csrf})
    assert api.status_code == 401
    assert _links(portal) == 0


def test_creation_is_limited_per_person(portal: Flask, idp: IdentityProvider) -> None:
    doctor, _user_id, study = _doctor(portal, idp)
    csrf = csrf_of(doctor)
    statuses = [doctor.post("/api/shares", json={"study_uid": study},
                            headers={"X-CSRF-Token": csrf}).status_code for _ in range(3)]
    assert statuses == [201, 201, 201]
    assert doctor.post(f"/studies/{study}/share", data={"csrf_token": csrf}).status_code == 429
    assert doctor.post("/api/shares", json={"study_uid": study},
                       headers={"X-CSRF-Token": csrf}).status_code == 429
    assert _links(portal) == 3
    colleague, _, other_study = _doctor(portal, idp)  # the limit is per person
    assert colleague.post("/api/shares", json={"study_uid": other_study},
                          headers={"X-CSRF-Token": csrf_of(colleague)}).status_code == 201


def test_api_lifecycle(portal: Flask, idp: IdentityProvider) -> None:
    doctor, _user_id, study = _doctor(portal, idp)
    csrf = {"X-CSRF-Token": csrf_of(doctor)}
    for bad in ({"study_uid": study, "days": 31}, {"study_uid": study, "days": 0},
                {"study_uid": study, "expires_at": "2099-01-01T00:00:00"},
                {"study_uid": study, "audience": "everyone"}):
        assert doctor.post("/api/shares", json=bad, headers=csrf).status_code == 400, bad
    created = doctor.post("/api/shares", json={"study_uid": study, "days": 2, "note": "x"},
                          headers=csrf)
    assert created.status_code == 201
    body = created.get_json()
    assert body["state"] == "active" and body["pin"] and len(body["pin_code"]) == 6
    token = body["link"].split("#", 1)[1]
    assert len(token) == 43
    listed = doctor.get("/api/shares").get_json()
    assert [s["id"] for s in listed] == [body["id"]] and "pin_code" not in listed[0]
    visitor = portal.test_client()
    assert open_link(visitor, token, body["pin_code"]).status_code == 303
    detail = doctor.get(f"/api/shares/{body['id']}").get_json()
    assert detail["uses"] == 1 and detail["accesses"][0]["what"] == "opened the link"
    assert doctor.get(f"/api/shares/{body['id']}/revoke").status_code == 405
    assert doctor.post(f"/api/shares/{body['id']}/revoke").status_code == 403  # no CSRF
    revoked = doctor.post(f"/api/shares/{body['id']}/revoke", headers=csrf)
    assert revoked.get_json()["state"] == "revoked"
    assert visitor.get(f"/studies/{study}").status_code == 401
    again = doctor.post("/api/shares", json={"study_uid": study}, headers=csrf).get_json()
    assert doctor.post("/api/shares/revoke", json={"study_uid": study, "scope": "patient"},
                       headers=csrf).get_json() == {"revoked": 1}
    assert link_row(portal, again["id"]).revoked_at is not None
    paths = doctor.get("/api/openapi.json").get_json()["paths"]
    for path in ("/api/shares", "/api/shares/{id}", "/api/shares/{id}/revoke",
                 "/api/shares/revoke"):
        assert path in paths


def test_senders_see_their_own_links_office_managers_every_link(portal: Flask,
                                                                idp: IdentityProvider) -> None:
    doctor, _user_id, study = _doctor(portal, idp)
    colleague, _, other_study = _doctor(portal, idp)
    mine = doctor.post("/api/shares", json={"study_uid": study},
                       headers={"X-CSRF-Token": csrf_of(doctor)}).get_json()
    theirs = colleague.post("/api/shares", json={"study_uid": other_study},
                            headers={"X-CSRF-Token": csrf_of(colleague)}).get_json()
    assert [s["id"] for s in doctor.get("/api/shares").get_json()] == [mine["id"]]
    assert doctor.get(f"/shares/{theirs['id']}").status_code == 404
    assert doctor.post(f"/shares/{theirs['id']}/revoke",
                       data={"csrf_token": csrf_of(doctor)}).status_code == 404
    add_person(portal, idp, "cuddy", ["office_manager"], "Clinic", name="Dr Cuddy")
    manager = signed_in(portal, idp, "cuddy")
    console = manager.get("/admin/shares")
    assert console.status_code == 200
    html = console.get_data(as_text=True)
    assert mine["id"] in html and theirs["id"] in html
    assert manager.get(f"/shares/{theirs['id']}").status_code == 200
    response = manager.post(f"/shares/{theirs['id']}/revoke",
                            data={"csrf_token": csrf_of(manager)})
    assert response.status_code == 302
    assert link_row(portal, theirs["id"]).revoked_at is not None
    assert link_row(portal, mine["id"]).revoked_at is None
    with portal.extensions["db"].new_session() as session:
        audits = list(session.scalars(select(AuditEvent).where(
            AuditEvent.event_id == "110113", AuditEvent.who.like("user:%cuddy"))))
    assert any(a.details.get("share") == theirs["id"] and a.details.get("revoked")
               for a in audits)


def test_colleague_link_asks_for_sign_in_and_gives_a_grant(portal: Flask,
                                                           idp: IdentityProvider) -> None:
    doctor, _user_id, study = _doctor(portal, idp)
    made = doctor.post("/api/shares", json={"study_uid": study, "audience": "physician",
                                            "requires_sign_in": True, "pin": False},
                       headers={"X-CSRF-Token": csrf_of(doctor)}).get_json()
    token = made["link"].split("#", 1)[1]
    colleague_id = add_person(portal, idp, "chase", ["physician"], "Other clinic",
                              name="Dr Chase")
    browser = portal.test_client()
    opened = open_link(browser, token, "")
    assert opened.status_code == 303 and opened.headers["Location"].endswith("/shared/claim")
    # The claim-only session shows nothing by itself.
    assert browser.get(f"/dicomweb/studies/{study}/metadata").status_code == 401
    from tests.conftest import sign_in

    assert sign_in(browser, idp, "chase", next_path="/shared/claim").status_code == 302
    assert browser.get("/shared/claim").status_code == 200
    assert browser.get(f"/studies/{study}").status_code == 404  # not yet
    accepted = browser.post("/shared/claim", data={"csrf_token": csrf_of(browser)})
    assert accepted.status_code == 303
    assert browser.get(f"/studies/{study}").status_code == 200
    with portal.extensions["db"].new_session() as session:
        grants = list(session.scalars(select(Grant).where(Grant.user_fk == colleague_id)))
        audit_rows = list(session.scalars(select(AuditEvent).where(
            AuditEvent.who == f"share:{made['id']}", AuditEvent.event_id == "110113")))
    assert [g.study_instance_uid for g in grants] == [study]
    assert grants[0].granted_by == f"share:{made['id']}"
    assert grants[0].expires_at == link_row(portal, made["id"]).expires_at  # not for ever
    assert audit_rows and audit_rows[0].details["grant"] == grants[0].id
    assert link_row(portal, made["id"]).revoked_at is not None  # one-time
    assert open_link(portal.test_client(), token, "").status_code == 404


def test_colleague_view_link_works_like_a_patient_link(portal: Flask,
                                                       idp: IdentityProvider) -> None:
    doctor, _user_id, study = _doctor(portal, idp)
    made: dict[str, Any] = doctor.post(
        "/api/shares", json={"study_uid": study, "audience": "physician", "pin": False},
        headers={"X-CSRF-Token": csrf_of(doctor)}).get_json()
    assert made["pin_code"] is None
    visitor = portal.test_client()
    opened = open_link(visitor, made["link"].split("#", 1)[1], "")
    assert opened.headers["Location"].endswith(f"/studies/{study}")
    assert visitor.get(f"/studies/{study}").status_code == 200
