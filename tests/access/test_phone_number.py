"""A physician's mobile number for report-ready text messages: from the provider's verified
``phone_number`` claim at sign-in, or set by an office manager in the console or /api (checked
as share-link numbers are, audited, no session ended); the text-message choice is off until
made."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import select

from portal.access.models import AuditEvent, User
from tests.browser import chromium, loopback_only, phone
from tests.conftest import IdentityProvider, LiveServer, add_person, csrf_of, sign_in, signed_in
from tests.studies.support import shot, sign_in_browser


def user_of(app: Flask, subject: str) -> User:
    with app.extensions["db"].new_session() as session:
        return session.scalars(select(User).where(User.subject == subject)).one()


def changes_of(app: Flask, subject: str) -> list[dict[str, object]]:
    with app.extensions["db"].new_session() as session:
        return [e.details for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))
                if e.details.get("type") == "110137" and subject in str(e.details)]


def test_sign_in_asks_for_the_phone_scope_the_provider_offers(oidc_app: Flask) -> None:
    response = oidc_app.test_client().get("/auth/login")
    scope = parse_qs(urlsplit(response.headers["Location"]).query)["scope"][0].split()
    assert sorted(scope) == ["email", "openid", "phone", "profile"]


def test_a_verified_phone_number_claim_is_kept_an_unverified_one_is_not(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    sub = f"dr-phone-{generate_uid()[-6:]}"
    idp.set_user(sub, email=f"{sub}@demo.example", phone_number="+1 (555) 010-1234",
                 phone_number_verified=True)
    assert sign_in(oidc_app.test_client(), idp, sub).status_code == 302
    user = user_of(oidc_app, sub)
    assert user.phone_number == "+15550101234" and user.notify_by_sms is False

    other = f"dr-unverified-{generate_uid()[-6:]}"
    idp.set_user(other, email=f"{other}@demo.example", phone_number="+15550109999",
                 phone_number_verified=False)
    sign_in(oidc_app.test_client(), idp, other)
    assert user_of(oidc_app, other).phone_number == ""
    idp.set_user(other, email=f"{other}@demo.example", phone_number="+15550109999")
    sign_in(oidc_app.test_client(), idp, other)  # "verified" left out: not verified either
    assert user_of(oidc_app, other).phone_number == ""

    # A later sign-in without a verified number keeps the one there is; a verified value that
    # is no phone number (as share links check them) changes nothing.
    idp.set_user(sub, email=f"{sub}@demo.example", phone_number="+15550107777",
                 phone_number_verified="true")  # a string, not the JSON true
    sign_in(oidc_app.test_client(), idp, sub)
    idp.set_user(sub, email=f"{sub}@demo.example", phone_number="ask reception",
                 phone_number_verified=True)
    sign_in(oidc_app.test_client(), idp, sub)
    assert user_of(oidc_app, sub).phone_number == "+15550101234"


def test_office_manager_sets_checks_and_clears_the_number_through_the_api(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    suffix = generate_uid()[-6:]
    add_person(oidc_app, idp, f"om-{suffix}", ["office_manager"], "Clinic")
    doctor_id = add_person(oidc_app, idp, f"doc-{suffix}", ["physician"], "Clinic")
    doctor = signed_in(oidc_app, idp, f"doc-{suffix}")
    manager = signed_in(oidc_app, idp, f"om-{suffix}")
    headers = {"X-CSRF-Token": csrf_of(manager)}

    bad = manager.patch(f"/api/users/{doctor_id}", json={"phone_number": "+49 170 CALL-ME"},
                        headers=headers)
    assert bad.status_code == 400
    assert "with its country code" in bad.get_json()["error"]
    for wrong in ({"phone_number": 491701234567}, {"notify_by_sms": "true"}):
        assert manager.patch(f"/api/users/{doctor_id}", json=wrong,
                             headers=headers).status_code == 400
    no_number = manager.patch(f"/api/users/{doctor_id}", json={"notify_by_sms": True},
                              headers=headers)
    assert no_number.status_code == 400 and "mobile number" in no_number.get_json()["error"]
    assert user_of(oidc_app, f"doc-{suffix}").notify_by_sms is False

    done = manager.patch(f"/api/users/{doctor_id}", headers=headers,
                         json={"phone_number": "0049 170 123-4567", "notify_by_sms": True})
    assert done.status_code == 200, done.data
    assert done.get_json()["phone_number"] == "+491701234567"
    assert done.get_json()["notify_by_sms"] is True
    assert doctor.get("/studies").status_code == 200  # no session ended for this
    [change] = changes_of(oidc_app, f"doc-{suffix}")
    assert change["phone_number"] == "…567" and change["notify_by_sms"] is True
    assert "1701234567" not in str(change)  # the trail keeps the last digits only

    listed = {u["id"]: u for u in manager.get("/api/users").get_json()}
    assert listed[doctor_id]["phone_number"] == "+491701234567"
    cleared = manager.patch(f"/api/users/{doctor_id}", headers=headers,
                            json={"phone_number": "", "notify_by_sms": False})
    assert cleared.get_json()["phone_number"] == ""
    assert changes_of(oidc_app, f"doc-{suffix}")[-1]["phone_number"] == ""


def test_console_form_sets_the_number_and_refuses_a_bad_one(oidc_app: Flask,
                                                            idp: IdentityProvider) -> None:
    suffix = generate_uid()[-6:]
    add_person(oidc_app, idp, f"om-{suffix}", ["office_manager"], "Clinic")
    doctor_id = add_person(oidc_app, idp, f"doc-{suffix}", ["physician"], "Clinic")
    manager = signed_in(oidc_app, idp, f"om-{suffix}")
    form = {"csrf_token": csrf_of(manager), "role_physician": "on", "practice": "Clinic",
            "active": "on"}
    refused = manager.post(f"/admin/users/{doctor_id}", follow_redirects=True,
                           data={**form, "phone_number": "12", "notify_by_sms": "on"})
    assert "with its country code" in refused.get_data(as_text=True)
    assert user_of(oidc_app, f"doc-{suffix}").phone_number == ""
    saved = manager.post(f"/admin/users/{doctor_id}", follow_redirects=True,
                         data={**form, "phone_number": "+44 7700 900123", "notify_by_sms": "on"})
    page = saved.get_data(as_text=True)
    assert "Saved." in page and "sessions have ended" not in page
    assert 'value="+447700900123"' in page
    user = user_of(oidc_app, f"doc-{suffix}")
    assert (user.phone_number, user.notify_by_sms) == ("+447700900123", True)
    manager.post(f"/admin/users/{doctor_id}", data={**form, "phone_number": "+447700900123"})
    assert user_of(oidc_app, f"doc-{suffix}").notify_by_sms is False  # box unticked


@pytest.mark.parametrize("device", ["iPhone 13"])
def test_console_mobile_field_on_a_phone(oidc_app: Flask, idp: IdentityProvider,
                                         device: str) -> None:
    suffix = generate_uid()[-6:]
    add_person(oidc_app, idp, f"om-{suffix}", ["office_manager"], "Clinic", name="Lisa Cuddy")
    add_person(oidc_app, idp, f"doc-{suffix}", ["physician"], "Clinic", name="James Wilson")
    with LiveServer(oidc_app) as server, chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, device))
        loopback_only(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        sign_in_browser(page, server.url, f"om-{suffix}", "/admin/users")
        person = page.locator("li.study").filter(has_text="James Wilson")
        person.get_by_label("Mobile for notices").fill("+1 555 010 4242")
        person.get_by_label("Report-ready notices also by text message").check()
        person.get_by_role("button", name="Save").click()
        page.get_by_text("Saved.", exact=True).wait_for()
        person = page.locator("li.study").filter(has_text="James Wilson")
        assert person.get_by_label("Mobile for notices").input_value() == "+15550104242"
        assert person.get_by_label("Report-ready notices also by text message").is_checked()
        assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
        person.scroll_into_view_if_needed()
        shot(page, f"admin-user-mobile-{device.replace(' ', '_')}")
        assert errors == []
        context.close()
