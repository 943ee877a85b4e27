"""Token replay that other tests do not name: the ID token the portal receives at sign-in
travels in the provider's logout URL (id_token_hint), where browser history and logs keep
it; it must not open the DICOMweb API as a bearer token, before or after sign-out."""

from __future__ import annotations

import time

from flask import Flask

from portal.auth.bearer import forget_cached_tokens
from tests.auth.test_forged_tokens import forge_app, forger  # noqa: F401 (fixtures)
from tests.conftest import IdentityProvider, add_person, csrf_of, signed_in
from tests.support.forging_idp import CLIENT_ID, ForgingProvider


def test_the_id_token_from_the_logout_url_is_no_bearer_token(oidc_app: Flask,
                                                             idp: IdentityProvider) -> None:
    add_person(oidc_app, idp, "replay-doc", ["physician"])
    browser = signed_in(oidc_app, idp, "replay-doc")
    with browser.session_transaction() as session:
        id_token = session["id_token"]
    forget_cached_tokens()
    before = oidc_app.test_client().get("/dicomweb/studies",
                                        headers={"Authorization": f"Bearer {id_token}"})
    assert before.status_code == 401
    out = browser.post("/auth/logout", headers={"X-CSRF-Token": csrf_of(browser)})
    assert out.status_code == 302
    forget_cached_tokens()
    after = oidc_app.test_client().get("/dicomweb/studies",
                                       headers={"Authorization": f"Bearer {id_token}"})
    assert after.status_code == 401


def test_access_token_jwts_still_work_and_id_token_claims_are_refused(
        forge_app: Flask, forger: ForgingProvider) -> None:  # noqa: F811
    from joserfc import jwt

    now = int(time.time())
    base = {"iss": forger.issuer, "sub": "script", "aud": CLIENT_ID, "iat": now,
            "exp": now + 300}
    for extra, status in (({}, 204), ({"nonce": "n"}, 401), ({"at_hash": "x"}, 401),
                          ({"c_hash": "y"}, 401)):
        token = jwt.encode({"alg": "RS256", "kid": "good"}, {**base, **extra}, forger.key,
                           algorithms=["RS256"])
        forget_cached_tokens()
        answer = forge_app.test_client().get("/dicomweb/studies",
                                             headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == status, extra
