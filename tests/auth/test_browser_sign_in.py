"""A complete sign-in in a phone-sized Chromium against a real provider, then sign-out."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask

from tests.browser import PHONES, chromium, loopback_only, phone
from tests.conftest import IdentityProvider, LiveServer, add_person

SCREENSHOTS = Path(__file__).resolve().parents[2] / "instance" / "screenshots"


@pytest.mark.parametrize("device", PHONES)
def test_sign_in_see_studies_and_sign_out(oidc_app: Flask, idp: IdentityProvider,
                                          device: str) -> None:
    add_person(oidc_app, idp, f"browser-{device[:4].lower()}", ["office_manager"], "Clinic")
    with LiveServer(oidc_app) as server, chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, device))
        loopback_only(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        page.get_by_role("link", name="Sign in with your hospital account").click()
        page.wait_for_url(f"{idp.issuer}/**", wait_until="commit")
        page.fill("input[name=sub]", f"browser-{device[:4].lower()}")
        page.get_by_role("button", name="Authorize").click()
        page.wait_for_url(f"{server.url}/studies")
        assert page.locator("h1").inner_text() == "Studies"
        assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
        cookies = {c["name"]: c for c in context.cookies()}
        assert cookies["portal"]["httpOnly"] and cookies["portal"]["sameSite"] == "Lax"
        page.get_by_role("link", name="Console").click()
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for tab, heading in (("People", "People"), ("Referrer identifiers",
                                                    "Referrer identifiers"),
                             ("Grants", "Grants"), ("Audit trail", "Audit trail")):
            page.locator("nav.tabs").get_by_role("link", name=tab).click()
            assert page.locator("h1").inner_text() == heading
            # Every console page fits the phone's width: no sideways scrolling.
            assert page.evaluate(
                "document.documentElement.scrollWidth - window.innerWidth") <= 0, tab
            name = f"console-{tab.split()[0].lower()}-{device.replace(' ', '_')}.png"
            page.screenshot(path=str(SCREENSHOTS / name), full_page=True)
        page.get_by_role("button", name="Sign out").click()
        # RP-initiated logout continues at the provider ...
        page.wait_for_url(f"{idp.issuer}/**", wait_until="commit")
        page.goto(server.url + "/studies")
        # ... and here the session is gone: the portal sends the browser to sign in again.
        page.wait_for_url(f"{idp.issuer}/**", wait_until="commit")
        assert errors == []
        context.close()
