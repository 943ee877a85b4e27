"""Issue 12 items 2 and 3: bearer tokens must prove they were issued to this portal, and a
change made with one needs a recent (and, when configured, multi-factor) sign-in.

Item 2 uses the mock provider on loopback, which offers no introspection: a token it issued
to another application is live at its userinfo endpoint, which cannot say whom the token is
for. Item 3 uses signed JWT access tokens of the loopback provider in tests/support (verified
against its JWKS), whose ``auth_time`` the test chooses.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.test import TestResponse

from portal.access.grants import create_grant
from portal.access.models import Grant, User
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.auth.bearer import forget_cached_tokens
from portal.sharing.models import ShareLink
from tests.access.test_console import practice_study
from tests.auth.test_forged_tokens import forge_app, forger  # noqa: F401 (fixtures)
from tests.auth.test_login_form import _access_token, portal_and_provider  # noqa: F401
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    LiveServer,
    access_token,
    add_person,
    basic_auth,
    close_app,
    make_app,
    make_client,
)
from tests.factories import make_instance
from tests.support.forging_idp import CLIENT_ID, ForgingProvider

OTHER_APP = ("other-app", "the-other-applications-secret")


def bearer_challenge(response: TestResponse | requests.Response) -> dict[str, str]:
    """The parameters of the ``Bearer`` challenge of a 401 (empty when there is none)."""
    # requests joins repeated headers into one line; urllib3 keeps them apart.
    headers = response.raw.headers if isinstance(response, requests.Response) \
        else response.headers
    for header in headers.getlist("WWW-Authenticate"):
        parsed = WWWAuthenticate.from_header(header)
        if parsed is not None and parsed.type == "bearer":
            return {k: v for k, v in parsed.parameters.items() if v is not None}
    return {}


def count(app: Flask, model: Any) -> int:
    """How many rows of ``model`` are stored."""
    with app.extensions["db"].new_session() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def physician_with_a_study(app: Flask, idp: Any, sub: str) -> str:
    """A physician granted one study; the study's UID."""
    study = generate_uid()
    with app.app_context():
        current_archive().ingest(make_instance(study=study), who="test")
    doctor = add_person(app, idp, sub, ["physician"], "Clinic")
    admin = Principal("user", 0, "setup", roles=frozenset({"office_manager"}))
    with app.extensions["db"].write_transaction() as session:
        create_grant(session, admin, user_id=doctor, study_uid=study)
    return study


# -- item 2: tokens issued to other applications ------------------------------------------

def test_a_token_issued_to_another_application_neither_reads_nor_shares(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    sub = "dr-other-app-" + generate_uid()[-6:]
    study = physician_with_a_study(oidc_app, idp, sub)
    foreign = access_token(oidc_app, idp, sub, client=OTHER_APP)
    client = oidc_app.test_client()
    headers = {"Authorization": f"Bearer {foreign}"}
    forget_cached_tokens()
    read = client.get("/dicomweb/studies", headers=headers)
    assert read.status_code == 401
    challenge = bearer_challenge(read)
    assert challenge["error"] == "invalid_token"
    assert "cannot prove" in challenge["error_description"]
    assert "cannot prove" in read.get_json()["error"]
    shared = client.post("/api/shares", json={"study_uid": study}, headers=headers)
    assert shared.status_code == 401
    assert bearer_challenge(shared)["error"] == "invalid_token"
    assert count(oidc_app, ShareLink) == 0
    for path in ("/api/grants", "/api/shares", "/fhir/DiagnosticReport", f"/studies/{study}"):
        assert client.get(path, headers=headers).status_code == 401, path  # every route
    # Closed by default: userinfo cannot prove the portal's own tokens either.
    own = access_token(oidc_app, idp, sub)
    assert client.get("/dicomweb/studies",
                      headers={"Authorization": f"Bearer {own}"}).status_code == 401


def test_accepting_unproven_audiences_is_an_opt_in_with_a_warning(
        tmp_path: Path, idp: IdentityProvider, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="portal.auth.oidc"):
        app = make_app(tmp_path / "instance", OIDC_ISSUER=idp.issuer,
                       OIDC_ACCEPT_UNPROVEN_AUDIENCE=True, **OIDC_SETTINGS)
    try:
        warnings = [r.getMessage() for r in caplog.records if r.name == "portal.auth.oidc"]
        assert len(warnings) == 1 and "OIDC_ACCEPT_UNPROVEN_AUDIENCE" in warnings[0]
        sub = "dr-opt-in-" + generate_uid()[-6:]
        study = physician_with_a_study(app, idp, sub)
        headers = {"Authorization": f"Bearer {access_token(app, idp, sub, client=OTHER_APP)}"}
        forget_cached_tokens()
        client = app.test_client()
        assert client.get("/dicomweb/studies", headers=headers).status_code == 200
        # Userinfo says nothing about when its holder signed in: no changes with it.
        shared = client.post("/api/shares", json={"study_uid": study}, headers=headers)
        assert shared.status_code == 401
        assert bearer_challenge(shared)["error"] == "insufficient_user_authentication"
        assert count(app, ShareLink) == 0
    finally:
        close_app(app)


# -- item 3: a recent sign-in for changes made with a bearer token ---------------------------

class _Issuer:
    """``add_person`` for people of the loopback JWT provider (its users need no setup)."""

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer

    def set_user(self, sub: str, **claims: object) -> None:
        """The provider signs whatever the test asks; nothing to register."""


def api_changes(app: Flask) -> list[tuple[str, str]]:
    """Every state-changing /api route as (method, path), with 1 for each parameter."""
    changes = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/"):
            continue
        path = rule.build(dict.fromkeys(rule.arguments, 1))
        assert path is not None
        changes += [(method, path[1]) for method in sorted(rule.methods or ())
                    if method in ("POST", "PUT", "PATCH", "DELETE")]
    return changes


def jwt_for(forger: ForgingProvider, sub: str, **claims: Any) -> str:  # noqa: F811
    """A signed access token for ``sub`` (``None`` values leave a claim out)."""
    from joserfc import jwt

    now = int(time.time())
    body = {"iss": forger.issuer, "sub": sub, "aud": CLIENT_ID, "iat": now, "exp": now + 300,
            **claims}
    return jwt.encode({"alg": "RS256", "kid": "good"},
                      {k: v for k, v in body.items() if v is not None}, forger.key,
                      algorithms=["RS256"])


@pytest.fixture
def manager_and_study(forge_app: Flask, forger: ForgingProvider  # noqa: F811
                      ) -> tuple[str, int, str]:
    """An office manager of the JWT provider, a physician of the same practice, a study."""
    suffix = generate_uid()[-6:]
    issuer = _Issuer(forger.issuer)
    add_person(forge_app, issuer, f"om-{suffix}", ["office_manager"], "Clinic")
    doctor = add_person(forge_app, issuer, f"doc-{suffix}", ["physician"], "Clinic")
    return f"om-{suffix}", doctor, practice_study(forge_app, "Clinic")


@pytest.mark.parametrize(("name", "claims"), [
    ("auth_time an hour old", {"auth_time": -3600}),
    ("no auth_time, iat an hour old", {"iat": -3600}),
    ("no auth_time, no iat", {"iat": None}),
    ("auth_time in the future", {"auth_time": 3600}),
])
def test_changes_with_a_bearer_token_need_a_recent_sign_in(
        forge_app: Flask, forger: ForgingProvider,  # noqa: F811
        manager_and_study: tuple[str, int, str], name: str, claims: dict[str, int | None]
) -> None:
    manager, doctor, study = manager_and_study
    now = int(time.time())
    token = jwt_for(forger, manager, **{k: None if v is None else now + v
                                        for k, v in claims.items()})
    headers = {"Authorization": f"Bearer {token}"}
    forget_cached_tokens()
    client = forge_app.test_client()
    refused = client.post("/api/grants", json={"user_id": doctor, "study_uid": study},
                          headers=headers)
    assert refused.status_code == 401, name
    challenge = bearer_challenge(refused)
    assert challenge["error"] == "insufficient_user_authentication", name
    assert challenge["max_age"] == "900" and challenge["error_description"], name
    assert refused.get_json()["error"] == challenge["error_description"]
    assert count(forge_app, Grant) == 0
    changes = api_changes(forge_app)
    assert ("DELETE", "/api/identifiers/1") in changes and len(changes) >= 8
    for method, path in changes:
        answer = client.open(path, method=method, json={}, headers=headers)
        assert answer.status_code == 401, (method, path)
    # Reading needs no recent sign-in.
    assert client.get("/api/grants", headers=headers).status_code == 200


def test_a_fresh_bearer_sign_in_makes_changes_and_machines_keep_their_rules(
        forge_app: Flask, forger: ForgingProvider,  # noqa: F811
        manager_and_study: tuple[str, int, str]) -> None:
    manager, doctor, study = manager_and_study
    token = jwt_for(forger, manager, auth_time=int(time.time()) - 60)
    forget_cached_tokens()
    client = forge_app.test_client()
    made = client.post("/api/grants", json={"user_id": doctor, "study_uid": study},
                       headers={"Authorization": f"Bearer {token}"})
    assert made.status_code == 201, made.data
    # A machine client (HTTP Basic) is no person: no sign-in to ask for, its role decides.
    robot = client.post("/api/grants", json={"user_id": doctor, "study_uid": study},
                        headers=basic_auth(*make_client(forge_app, "pacs-robot")))
    assert robot.status_code == 403
    assert count(forge_app, Grant) == 1


def test_bearer_changes_need_a_multi_factor_sign_in_when_configured(
        forge_app: Flask, forger: ForgingProvider,  # noqa: F811
        manager_and_study: tuple[str, int, str]) -> None:
    forge_app.config["PORTAL"]["OIDC_MFA_VALUES"] = ["urn:example:loa:2", "otp"]
    manager, doctor, study = manager_and_study
    fresh = int(time.time()) - 30
    client = forge_app.test_client()
    body = {"user_id": doctor, "study_uid": study}
    weak = jwt_for(forger, manager, auth_time=fresh, amr=["pwd"], acr="urn:example:loa:1")
    forget_cached_tokens()
    refused = client.post("/api/grants", json=body, headers={"Authorization": f"Bearer {weak}"})
    assert refused.status_code == 401
    challenge = bearer_challenge(refused)
    assert challenge["error"] == "insufficient_user_authentication"
    assert challenge["acr_values"] == "urn:example:loa:2 otp"
    assert count(forge_app, Grant) == 0
    strong = jwt_for(forger, manager, auth_time=fresh, amr=["pwd", "otp"])
    made = client.post("/api/grants", json=body, headers={"Authorization": f"Bearer {strong}"})
    assert made.status_code == 201, made.data


def test_share_pages_ask_a_bearer_token_for_a_recent_sign_in_too(
        forge_app: Flask, forger: ForgingProvider) -> None:  # noqa: F811
    """The share form's route (not under /api) is no way around the rule."""
    sub = "dr-form-post-" + generate_uid()[-6:]
    study = physician_with_a_study(forge_app, _Issuer(forger.issuer), sub)
    old = jwt_for(forger, sub, auth_time=int(time.time()) - 3600)
    forget_cached_tokens()
    answer = forge_app.test_client().post(f"/studies/{study}/share", data={"audience": "patient"},
                                          headers={"Authorization": f"Bearer {old}"})
    assert answer.status_code == 401
    assert bearer_challenge(answer)["error"] == "insufficient_user_authentication"
    assert count(forge_app, ShareLink) == 0


def test_an_introspected_token_brings_the_sign_in_behind_it(
        portal_and_provider: tuple[LiveServer, str]) -> None:  # noqa: F811
    """npm oidc-provider: an opaque token whose introspection answer carries ``auth_time``,
    ``acr`` and ``amr`` of the person's sign-in at its login form."""
    server, issuer = portal_and_provider
    app = server.app
    study = generate_uid()
    with app.app_context():
        current_archive().ingest(make_instance(study=study), who="test")
    admin = Principal("user", 0, "setup", roles=frozenset({"office_manager"}))
    with app.extensions["db"].write_transaction() as session:
        doctor = session.scalars(select(User).where(User.subject == "dr-form")).one()
        create_grant(session, admin, user_id=doctor.id, study_uid=study)
    token = _access_token(issuer, ("portal-form",
                                   "a-long-test-secret-for-the-form-provider-0123456789",
                                   f"{server.url}/auth/callback"))
    headers = {"Authorization": f"Bearer {token}"}
    made = requests.post(f"{server.url}/api/shares", json={"study_uid": study},
                         headers=headers, timeout=30)
    assert made.status_code == 201, made.text[:300]  # signed in seconds ago
    # The password-only sign-in is not the multi-factor one the portal now asks for.
    app.config["PORTAL"]["OIDC_MFA_VALUES"] = ["otp"]
    refused = requests.post(f"{server.url}/api/shares", json={"study_uid": study},
                            headers=headers, timeout=30)
    assert refused.status_code == 401
    challenge = bearer_challenge(refused)
    assert challenge["error"] == "insufficient_user_authentication"
    assert challenge["acr_values"] == "otp"
    assert count(app, ShareLink) == 1
