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
               "POST_LOGOUT_URI": f"{server.url}/"}
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
