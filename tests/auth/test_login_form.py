"""One complete sign-in with a real login form: npm ``oidc-provider`` in Node, Debian Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.browser import chromium, loopback_only, phone
from tests.conftest import LiveServer, add_person, free_port, make_app, wait_for

PROVIDER = Path(__file__).resolve().parents[1] / "support" / "oidc-provider"
USERS = {"dr-form": {"password": "correct horse battery staple", "email": "form@demo.example",
                     "name": "Dr Form"}}


def _install() -> None:
    if not (PROVIDER / "node_modules" / "oidc-provider").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=PROVIDER, check=True,
                       capture_output=True, timeout=300)


# Another application registered at the same provider (say, the hospital's scheduling app).
OTHER = ("scheduling-app", "another-long-secret-of-another-application-98765",
         "http://127.0.0.1:9/scheduling/callback")


@pytest.fixture
def portal_and_provider(tmp_path: Path) -> Iterator[tuple[LiveServer, str]]:
    assert shutil.which("node"), "Node.js is needed for the npm oidc-provider test"
    _install()
    port = free_port()
    issuer = f"http://localhost:{port}"
    app = make_app(tmp_path / "instance", OIDC_ISSUER=issuer, OIDC_CLIENT_ID="portal-form",
                   OIDC_CLIENT_SECRET="a-long-test-secret-for-the-form-provider-0123456789")
    with LiveServer(app) as server:
        env = {**os.environ, "PORT": str(port), "USERS": json.dumps(USERS),
               "CLIENT_ID": "portal-form",
               "CLIENT_SECRET": "a-long-test-secret-for-the-form-provider-0123456789",
               "REDIRECT_URI": f"{server.url}/auth/callback",
               "POST_LOGOUT_URI": f"{server.url}/", "OTHER_CLIENT_ID": OTHER[0],
               "OTHER_CLIENT_SECRET": OTHER[1], "OTHER_REDIRECT_URI": OTHER[2]}
        node = subprocess.Popen(["node", "server.mjs"], cwd=PROVIDER, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            def ready() -> bool:
                try:
                    return requests.get(f"{issuer}/.well-known/openid-configuration",
                                        timeout=1).ok
                except requests.ConnectionError:
                    return False

            assert wait_for(ready, timeout=20), "oidc-provider did not start"
            add_person(app, _FakeIdp(issuer), "dr-form", ["physician"])
            yield server, issuer
        finally:
            node.terminate()
            node.wait(timeout=10)
            app.extensions["db"].dispose()


class _FakeIdp:
    """``add_person`` needs only the issuer here; the users live in the Node provider."""

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer

    def set_user(self, sub: str, **claims: object) -> None:
        """Users are configured when the provider starts."""


def test_sign_in_with_a_password_form_in_chromium(
        portal_and_provider: tuple[LiveServer, str]) -> None:
    server, issuer = portal_and_provider
    with chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, "Pixel 7"))
        loopback_only(context)
        page = context.new_page()
        page.goto(server.url + "/studies")  # not signed in: off to the provider
        page.wait_for_url(f"{issuer}/interaction/**")
        page.get_by_label("User name").fill("dr-form")
        page.get_by_label("Password").fill("wrong password")
        page.get_by_role("button", name="Sign in").click()
        assert "Wrong user name or password" in page.locator("[role=alert]").inner_text()
        page.get_by_label("User name").fill("dr-form")
        page.get_by_label("Password").fill(USERS["dr-form"]["password"])
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{server.url}/studies")
        assert page.locator("h1").inner_text() == "Studies"
        assert "Nothing to show yet" in page.content()  # a physician with nothing linked
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url(f"{issuer}/**", wait_until="commit")
        page.get_by_role("button", name="Yes, sign me out").click()
        page.wait_for_url(f"{server.url}/")
        page.goto(server.url + "/studies")
        page.wait_for_url(f"{issuer}/interaction/**")  # the session really ended
        context.close()


def _access_token(issuer: str, client: tuple[str, str, str]) -> str:
    """dr-form signs in at the provider's form for ``client`` (id, secret, redirect URI),
    as that application would; its opaque access token."""
    import base64
    import hashlib
    import secrets
    from urllib.parse import parse_qs, urljoin, urlsplit

    client_id, secret, redirect_uri = client
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()
                                         ).rstrip(b"=").decode()
    browser = requests.Session()
    response = browser.get(f"{issuer}/auth", allow_redirects=False, timeout=10, params={
        "client_id": client_id, "response_type": "code", "scope": "openid email profile",
        "redirect_uri": redirect_uri, "state": secrets.token_urlsafe(16),
        "nonce": secrets.token_urlsafe(16), "code_challenge": challenge,
        "code_challenge_method": "S256"})
    for _ in range(10):
        assert "Location" in response.headers, (response.request.method, response.url,
                                                 response.status_code, response.text[:200])
        location = urljoin(response.url, response.headers["Location"])
        if location.startswith(redirect_uri):
            break
        response = browser.get(location, allow_redirects=False, timeout=10)
        if response.status_code == 200:  # the login form
            response = browser.post(f"{location}/login", allow_redirects=False, timeout=10,
                                    data={"username": "dr-form",
                                          "password": USERS["dr-form"]["password"]})
    else:
        raise AssertionError("the provider never sent the browser back")
    code = parse_qs(urlsplit(location).query)["code"][0]
    answer = requests.post(f"{issuer}/token", auth=(client_id, secret), timeout=10, data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
        "code_verifier": verifier})
    answer.raise_for_status()
    token = str(answer.json()["access_token"])
    assert token.count(".") != 2  # opaque: only the provider can say what it is for
    return token


def test_an_opaque_token_of_another_application_is_refused(
        portal_and_provider: tuple[LiveServer, str]) -> None:
    """RFC 7662 introspection tells the portal whom a token was issued to: the portal's own
    client's token reads; a token the same person gave another application of the same
    provider (which its userinfo endpoint would accept just as well) does not."""
    server, issuer = portal_and_provider
    own = _access_token(issuer, ("portal-form",
                                 "a-long-test-secret-for-the-form-provider-0123456789",
                                 f"{server.url}/auth/callback"))
    foreign = _access_token(issuer, OTHER)
    assert requests.get(f"{issuer}/me", headers={"Authorization": f"Bearer {foreign}"},
                        timeout=10).status_code == 200  # live, as far as userinfo goes
    read = requests.get(f"{server.url}/dicomweb/studies", timeout=10,
                        headers={"Authorization": f"Bearer {own}"})
    assert read.status_code in (200, 204), read.text[:200]
    refused = requests.get(f"{server.url}/dicomweb/studies", timeout=10,
                           headers={"Authorization": f"Bearer {foreign}"})
    assert refused.status_code == 401
