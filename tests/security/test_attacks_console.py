"""Attacks on the office-manager console and /api that other tests do not name."""

from __future__ import annotations

from datetime import timedelta

from flask import Flask
from sqlalchemy import select, update

from portal.access.models import Grant, User
from portal.auth.models import UserSession
from portal.db import utcnow
from tests.access.test_console import count, setup
from tests.conftest import IdentityProvider, csrf_of


def _stale(app: Flask) -> None:
    with app.extensions["db"].write_transaction() as session:
        session.execute(update(UserSession).values(auth_time=utcnow() - timedelta(hours=1)))


def test_api_changes_from_a_browser_need_a_recent_sign_in(oidc_app: Flask,
                                                          idp: IdentityProvider) -> None:
    """docs/security.md 8: the JSON API must not be a way around the console's re-sign-in."""
    manager, doctor, study = setup(oidc_app, idp)
    headers = {"X-CSRF-Token": csrf_of(manager)}
    made = manager.post("/api/grants", json={"user_id": doctor, "study_uid": study},
                        headers=headers)
    assert made.status_code == 201
    grant_id = made.get_json()["id"]
    _stale(oidc_app)
    attempts = [
        manager.post("/api/grants", json={"user_id": doctor, "study_uid": study},
                     headers=headers),
        manager.post("/api/grants/revoke", json={"ids": [grant_id]}, headers=headers),
        manager.patch(f"/api/users/{doctor}", json={"roles": ["office_manager"]},
                      headers=headers),
        manager.post("/api/invitations", json={"roles": ["office_manager"]}, headers=headers),
        manager.post("/api/identifiers", json={"user_id": doctor, "key": "npi:1234567893"},
                     headers=headers),
    ]
    for response in attempts:
        assert response.status_code == 401, (response.request.path, response.data)
        assert "/auth/login?reauth=1" in response.get_json()["login"]
    assert count(oidc_app, Grant) == 1
    with oidc_app.extensions["db"].new_session() as session:
        assert session.get(Grant, grant_id).revoked_at is None
        assert session.get(User, doctor).roles == ["physician"]
    # Reading stays possible with an older sign-in.
    assert manager.get("/api/grants").status_code == 200
    assert manager.get("/api/users").status_code == 200


def test_api_share_revocation_from_a_browser_needs_a_recent_sign_in(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    manager, _doctor, study = setup(oidc_app, idp)
    headers = {"X-CSRF-Token": csrf_of(manager)}
    # An office manager may see the study only by grant: give himself none; use a grant.
    with oidc_app.extensions["db"].new_session() as session:
        me = session.scalars(select(User).where(User.subject.like("om-%"))).one().id
    assert manager.post("/api/grants", json={"user_id": me, "study_uid": study},
                        headers=headers).status_code == 201
    share = manager.post("/api/shares", json={"study_uid": study, "days": 3}, headers=headers)
    assert share.status_code == 201, share.data
    public_id = share.get_json()["id"]
    _stale(oidc_app)
    one = manager.post(f"/api/shares/{public_id}/revoke", headers=headers)
    every = manager.post("/api/shares/revoke", json={"study_uid": study}, headers=headers)
    assert one.status_code == 401 and every.status_code == 401
    assert manager.get(f"/api/shares/{public_id}").get_json()["state"] == "active"


def test_api_choices_are_json_booleans_never_truthy_strings(oidc_app: Flask,
                                                           idp: IdentityProvider) -> None:
    """"false" as a string is true in Python: it must not widen a share (download, whole
    patient) or open emergency access."""
    manager, doctor, study = setup(oidc_app, idp)
    headers = {"X-CSRF-Token": csrf_of(manager)}
    with oidc_app.extensions["db"].new_session() as session:
        me = session.scalars(select(User).where(User.subject.like("om-%"))).one().id
    assert manager.post("/api/grants", json={"user_id": me, "study_uid": study},
                        headers=headers).status_code == 201
    for key in ("download", "whole_patient", "requires_sign_in", "pin", "notify_sender"):
        for value in ("false", 0, 1, None, "no"):
            answer = manager.post("/api/shares", json={"study_uid": study, key: value},
                                  headers=headers)
            assert answer.status_code == 400, (key, value, answer.data)
    assert manager.post("/api/shares", json={"study_uid": study, "days": True},
                        headers=headers).status_code == 400
    assert manager.get("/api/shares").get_json() == []
    glass = manager.post("/api/grants", json={
        "user_id": doctor, "study_uid": study, "break_glass": "false",
        "reason": "a routine grant, not an emergency"}, headers=headers)
    assert glass.status_code == 400
    assert count(oidc_app, Grant) == 1
    made = manager.post("/api/shares", json={"study_uid": study, "download": False,
                                             "pin": True}, headers=headers)
    assert made.status_code == 201 and made.get_json()["download"] is False
