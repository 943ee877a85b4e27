"""Sign-in against a real OIDC provider: PKCE, state, nonce, sessions, logout
(docs/security.md A)."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from flask import Flask
from sqlalchemy import select, update

from portal.access.models import AuditEvent, User
from portal.auth.models import UserSession
from portal.db import utcnow
from tests.conftest import IdentityProvider, access_token, sign_in


def cookie(client: object) -> str | None:
    found = client.get_cookie("portal")  # type: ignore[attr-defined]
    return found.value if found else None


def users(app: Flask) -> list[User]:
    with app.extensions["db"].new_session() as session:
        return list(session.scalars(select(User).order_by(User.id)))


def test_authorization_request_uses_pkce_state_and_nonce(oidc_app: Flask) -> None:
    response = oidc_app.test_client().get("/auth/login")
    query = parse_qs(urlsplit(response.headers["Location"]).query)
    assert query["code_challenge_method"] == ["S256"]
    assert len(query["code_challenge"][0]) >= 43
    assert len(query["state"][0]) >= 20 and len(query["nonce"][0]) >= 20
    assert query["response_type"] == ["code"]


def test_sign_in_creates_a_user_keyed_by_issuer_and_subject(oidc_app: Flask,
                                                            idp: IdentityProvider) -> None:
    idp.set_user("dr-house", email="house@demo.example", name="Gregory House",
                 portal_roles=["physician", "superuser"])
    client = oidc_app.test_client()
    done = sign_in(client, idp, "dr-house")
    assert done.status_code == 302 and done.headers["Location"] == "/studies"
    [user] = users(oidc_app)
    assert (user.issuer, user.subject) == (idp.issuer, "dr-house")
    assert user.roles == ["physician"]  # unknown roles from the provider are ignored
    page = client.get("/studies")
    assert page.status_code == 200
    with oidc_app.extensions["db"].new_session() as session:
        events = list(session.scalars(select(AuditEvent)))
    assert any(e.event_id == "110114" and e.outcome == 0 and "dr-house" in e.who
               for e in events)


def test_a_role_the_provider_stops_asserting_is_taken_away(oidc_app: Flask,
                                                           idp: IdentityProvider) -> None:
    """The hospital removes a role in its identity provider: the next sign-in takes it away,
    ends the person's other sessions and is audited; roles given in the portal stay."""
    from portal.access.users import set_roles

    idp.set_user("dr-moved", email="moved@demo.example",
                 portal_roles=["physician", "office_manager"])
    first = oidc_app.test_client()
    sign_in(first, idp, "dr-moved")
    assert first.get("/admin/users").status_code == 200
    with oidc_app.extensions["db"].write_transaction() as session:
        user = session.scalars(select(User).where(User.subject == "dr-moved")).one()
        assert user.roles == ["office_manager", "physician"]
        set_roles(session, user, [*user.roles, "staff"])  # given in the portal
    sign_in(first, idp, "dr-moved")

    idp.set_user("dr-moved", email="moved@demo.example", portal_roles=["physician"])
    second = oidc_app.test_client()
    sign_in(second, idp, "dr-moved")
    [user] = [u for u in users(oidc_app) if u.subject == "dr-moved"]
    assert user.roles == ["physician", "staff"]
    assert second.get("/admin/users").status_code == 403
    assert second.get("/studies").status_code == 200
    assert first.get("/studies").status_code == 302  # the older session has ended
    with oidc_app.extensions["db"].new_session() as session:
        changes = [e.details for e in session.scalars(select(AuditEvent))
                   if e.details.get("type") == "110137" and "dr-moved" in str(e.details)]
    assert changes and changes[-1]["roles"] == ["physician", "staff"], changes

    # A provider that asserts no role at all (the claim left out) takes away the rest of its.
    idp.set_user("dr-moved", email="moved@demo.example")
    sign_in(oidc_app.test_client(), idp, "dr-moved")
    [user] = [u for u in users(oidc_app) if u.subject == "dr-moved"]
    assert user.roles == ["staff"]


def test_same_email_two_subjects_are_two_people(oidc_app: Flask, idp: IdentityProvider) -> None:
    idp.set_user("sub-a", email="shared@demo.example")
    idp.set_user("sub-b", email="shared@demo.example")
    sign_in(oidc_app.test_client(), idp, "sub-a")
    sign_in(oidc_app.test_client(), idp, "sub-b")
    assert [u.subject for u in users(oidc_app)] == ["sub-a", "sub-b"]


def test_session_id_changes_at_sign_in_and_a_planted_cookie_is_useless(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    client = oidc_app.test_client()
    client.set_cookie("portal", "attacker-chosen-value")
    client.get("/auth/login")
    before = cookie(client)
    sign_in(client, idp, "dr-fixation")
    after = cookie(client)
    assert after and after not in (before, "attacker-chosen-value")
    planted = oidc_app.test_client()
    planted.set_cookie("portal", before or "x")
    assert planted.get("/studies").status_code == 302


def test_session_cookie_attributes_and_contents(tmp_path: object, idp: IdentityProvider) -> None:
    from tests.conftest import OIDC_SETTINGS, make_app

    app = make_app(tmp_path / "i", OIDC_ISSUER=idp.issuer,  # type: ignore[operator]
                   PUBLIC_URL="https://portal.test", **OIDC_SETTINGS)
    client = app.test_client()
    response = client.get("/auth/login", base_url="https://portal.test")
    header = response.headers["Set-Cookie"]
    assert header.startswith("__Host-portal=")
    for attribute in ("Secure", "HttpOnly", "SameSite=Lax", "Path=/"):
        assert attribute in header
    assert "Domain" not in header
    value = header.split(";")[0].split("=", 1)[1]
    assert len(value) >= 43 and "." not in value  # an opaque random id, nothing inside


def test_replayed_callback_is_refused(oidc_app: Flask, idp: IdentityProvider) -> None:
    victim = oidc_app.test_client()
    start = victim.get("/auth/login")
    chosen = requests.post(start.headers["Location"], data={"sub": "dr-replay"},
                           allow_redirects=False, timeout=10)
    callback = urlsplit(chosen.headers["Location"])
    url = f"{callback.path}?{callback.query}"
    attacker = oidc_app.test_client()
    replay = attacker.get(url)
    assert replay.status_code == 400
    assert attacker.get("/studies").status_code == 302
    assert victim.get(url).status_code == 302  # the right browser still completes
    assert victim.get(url).status_code == 400  # but only once
    with oidc_app.extensions["db"].new_session() as session:
        failures = [e for e in session.scalars(select(AuditEvent)) if e.outcome != 0]
    assert len(failures) >= 2


@pytest.mark.parametrize("target", [
    "https://evil.test", "//evil.test", "/\\evil.test", "\\/evil.test", "https:evil.test",
    "%2F%2Fevil.test", "javascript:alert(1)", "/%0d%0aLocation:%20https://evil.test",
    "/%5Cevil.test"])
def test_open_redirects_after_sign_in_go_home(oidc_app: Flask, idp: IdentityProvider,
                                              target: str) -> None:
    done = sign_in(oidc_app.test_client(), idp, "dr-redirect", next_path=target)
    assert done.status_code == 302
    assert done.headers["Location"] == "/"


def test_logout_needs_csrf_ends_the_session_and_clears_site_data(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    client = oidc_app.test_client()
    sign_in(client, idp, "dr-logout")
    stolen = cookie(client)
    assert client.post("/auth/logout").status_code == 403
    assert client.get("/auth/logout").status_code == 405
    client.get("/studies")
    with client.session_transaction() as session:
        token = session["csrf"]
    out = client.post("/auth/logout", data={"csrf_token": token})
    assert out.status_code == 302
    assert out.headers["Location"].startswith(f"{idp.issuer}/oauth2/end_session")
    assert out.headers["Clear-Site-Data"] == '"cache", "cookies", "storage"'
    thief = oidc_app.test_client()
    thief.set_cookie("portal", stolen or "")
    assert thief.get("/studies").status_code == 302


@pytest.mark.parametrize("column", ["last_seen_at", "expires_at"])
def test_idle_and_absolute_timeouts_end_sessions(oidc_app: Flask, idp: IdentityProvider,
                                                 column: str) -> None:
    client = oidc_app.test_client()
    sign_in(client, idp, f"dr-{column}")
    assert client.get("/studies").status_code == 200
    moved = utcnow() - (timedelta(minutes=16) if column == "last_seen_at" else timedelta(0))
    with oidc_app.extensions["db"].write_transaction() as session:
        session.execute(update(UserSession).values({column: moved}))
    assert client.get("/studies").status_code == 302


def test_deactivation_ends_every_session_at_once(oidc_app: Flask, idp: IdentityProvider) -> None:
    phone, desktop = oidc_app.test_client(), oidc_app.test_client()
    sign_in(phone, idp, "dr-two-devices")
    sign_in(desktop, idp, "dr-two-devices")
    assert phone.get("/studies").status_code == 200
    from portal.access.users import set_active

    with oidc_app.extensions["db"].write_transaction() as session:
        user = session.scalars(select(User)).one()
        set_active(session, user, False)
    assert phone.get("/studies").status_code == 302
    assert desktop.get("/studies").status_code == 302


def test_bearer_access_tokens_from_the_issuer_work_for_dicomweb(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    # The mock provider offers no introspection: only an opt-in accepts its opaque tokens
    # (tests/security/test_attacks_bearer.py shows they are refused by default).
    oidc_app.config["PORTAL"]["OIDC_ACCEPT_UNPROVEN_AUDIENCE"] = True
    token = access_token(oidc_app, idp, "script-user")
    client = oidc_app.test_client()
    ok = client.get("/dicomweb/studies", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 204  # signed in, nothing visible yet
    bad = client.get("/dicomweb/studies", headers={"Authorization": "Bearer not-a-token"})
    assert bad.status_code == 401
    assert [u.subject for u in users(oidc_app)] == ["script-user"]
