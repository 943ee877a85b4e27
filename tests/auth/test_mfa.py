"""docs/security.md 8: changes need a recent sign-in and, when the portal is told which acr/amr
values mean multi-factor, one that carried them; the re-sign-in asks the provider for them."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from portal.access.models import Grant
from tests.access.test_console import practice_study
from tests.conftest import IdentityProvider, add_person, csrf_of, sign_in, signed_in


def grants(app: Flask) -> int:
    with app.extensions["db"].new_session() as session:
        return session.scalar(select(func.count()).select_from(Grant)) or 0


def test_changes_need_a_multi_factor_sign_in_when_configured(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    oidc_app.config["PORTAL"]["OIDC_MFA_VALUES"] = ["urn:example:loa:2", "otp"]
    suffix = generate_uid()[-6:]
    sub = f"om-mfa-{suffix}"
    add_person(oidc_app, idp, sub, ["office_manager"], "Clinic")
    doctor = add_person(oidc_app, idp, f"doc-mfa-{suffix}", ["physician"], "Clinic")
    study = practice_study(oidc_app, "Clinic")
    manager = signed_in(oidc_app, idp, sub)  # a password-only sign-in, seconds ago
    form = {"user_id": doctor, "study_uid": study}
    refused = manager.post("/admin/grants", data={**form, "csrf_token": csrf_of(manager)},
                           headers={"Referer": "http://localhost/admin/grants"})
    assert refused.status_code == 302 and "reauth=1" in refused.headers["Location"]
    assert grants(oidc_app) == 0
    # The portal asks the provider for a fresh login with one of the multi-factor values.
    login = manager.get(refused.headers["Location"])
    asked = parse_qs(urlsplit(login.headers["Location"]).query)
    assert asked["prompt"] == ["login"] and asked["acr_values"] == ["urn:example:loa:2 otp"]
    # The provider signs the person in again with a second factor (amr names it).
    idp.set_user(sub, email=f"{sub}@demo.example", name=sub, amr=["pwd", "otp"])
    assert sign_in(manager, idp, sub, "/admin/grants").status_code == 302
    done = manager.post("/admin/grants", data={**form, "csrf_token": csrf_of(manager)})
    assert done.status_code == 302 and "reauth" not in done.headers["Location"]
    assert grants(oidc_app) == 1


def test_without_configured_values_a_recent_sign_in_is_enough(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    suffix = generate_uid()[-6:]
    add_person(oidc_app, idp, f"om-plain-{suffix}", ["office_manager"], "Clinic")
    doctor = add_person(oidc_app, idp, f"doc-plain-{suffix}", ["physician"], "Clinic")
    study = practice_study(oidc_app, "Clinic")
    manager = signed_in(oidc_app, idp, f"om-plain-{suffix}")
    done = manager.post("/admin/grants", data={"user_id": doctor, "study_uid": study,
                                               "csrf_token": csrf_of(manager)})
    assert done.status_code == 302 and "reauth" not in done.headers["Location"]
    assert grants(oidc_app) == 1
