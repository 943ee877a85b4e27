"""The viewer when the session ends (issue 13, item 7), in a real Chromium on phones: choosing
a view then says so, instead of a black screen; "Sign in again" comes back to the same study,
series, image and view. A share visitor hears that his viewing time has ended."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import update

from portal.access.models import User
from portal.access.principal import user_principal
from portal.auth.models import UserSession
from portal.db import utcnow
from portal.sharing import service
from portal.sharing.models import ShareSession
from portal.sharing.routes import share_policy
from portal.sharing.sessions import forget_cached_visits
from tests.browser import chromium, loopback_only, phone
from tests.conftest import IdentityProvider, LiveServer, close_app
from tests.studies.support import PHYSICIAN, CtSite, build_ct_site, shot

SLICE = 12  # the image the reader had come to (1-based, as the viewer counts)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, idp: IdentityProvider) -> Iterator[Any]:
    """A portal with a small demo CT (reformats possible) for every test of this module."""
    ct = build_ct_site(tmp_path_factory.mktemp("session"), idp, slices=24, size=128)
    with LiveServer(ct.app) as server:
        yield ct, server
    close_app(ct.app)


def _open_at_slice(page: Page, url: str) -> None:
    """Open the viewer and move to SLICE with the keyboard, all images loaded."""
    page.goto(url)
    page.wait_for_function("() => document.querySelector('#viewer').dataset.quality === 'full'",
                           timeout=30_000)
    page.locator(".stage").focus()
    for _ in range(SLICE - 1):
        page.keyboard.press("ArrowDown")
    page.wait_for_function(f"() => document.querySelector('#viewer').dataset.frame === '{SLICE}'")
    page.wait_for_load_state("networkidle")


def _choose(page: Page, view: str) -> None:
    """Choose a view in the "More" sheet (phones) or the bar."""
    more = page.locator("button[data-action=more]")
    if more.is_visible() and more.get_attribute("aria-expanded") != "true":
        more.click()
    page.locator("select[name=view]").select_option(view)


def _watch_refusals(page: Page) -> list[dict[str, str]]:
    """The headers of every 401 the page receives."""
    refusals: list[dict[str, str]] = []
    page.on("response", lambda r: refusals.append(r.all_headers()) if r.status == 401 else None)
    return refusals


def _accessible(page: Page, name: str) -> None:
    """The dialog in light and dark: axe finds nothing serious; a screenshot of each."""
    from axe_playwright_python.sync_playwright import Axe

    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        results = Axe().run(page, options={"runOnly": {"type": "tag", "values": [
            "wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}})
        assert [(v["id"], [n["target"] for n in v["nodes"]][:3])
                for v in results.response["violations"]
                if v["impact"] in ("serious", "critical")] == [], (name, scheme)
        shot(page, f"{name}-{scheme}")
    page.emulate_media(color_scheme="light")


@pytest.mark.parametrize("device", ["iPhone 13", "Pixel 7"])
def test_an_ended_session_says_so_and_signing_in_returns_to_the_same_image(
        site: tuple[CtSite, LiveServer], device: str) -> None:
    ct, server = site
    tag = device.replace(" ", "_")
    with chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, device))
        loopback_only(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        viewer = f"/studies/{ct.study}/view/{ct.series}"
        page.goto(f"{server.url}/auth/login?next={viewer}")
        page.fill("input[name=sub]", PHYSICIAN)
        page.get_by_role("button", name="Authorize").click()
        page.wait_for_url(f"{server.url}{viewer}")
        _open_at_slice(page, f"{server.url}{viewer}")
        sop = page.evaluate(f"JSON.parse(document.getElementById('viewer-data').textContent)"
                            f".frames[{SLICE - 1}][0]")
        refusals = _watch_refusals(page)

        # Fifteen minutes without use: the session has ended on the server.
        with ct.app.extensions["db"].write_transaction() as session:
            session.execute(update(UserSession).values(
                last_seen_at=utcnow() - timedelta(minutes=16)))
        _choose(page, "coronal")

        dialog = page.get_by_role("alertdialog", name="You have been signed out")
        expect(dialog).to_be_visible(timeout=15_000)
        again = dialog.get_by_role("link", name="Sign in again")
        expect(again).to_be_focused()
        box = again.bounding_box()
        assert box is not None and box["width"] >= 44 and box["height"] >= 44
        assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
        # No password dialog: the refused images carry no Basic challenge.
        assert refusals and all("basic" not in h.get("www-authenticate", "").lower()
                                for h in refusals)
        _accessible(page, f"session-ended-{tag}")

        again.click()
        page.fill("input[name=sub]", PHYSICIAN)
        page.get_by_role("button", name="Authorize").click()
        page.wait_for_url(f"{server.url}{viewer}?**")
        assert f"image={sop}" in page.url and "view=coronal" in page.url
        page.wait_for_function("() => document.querySelector('#viewer').dataset.view"
                               " === 'coronal'", timeout=15_000)
        expect(page.get_by_role("alertdialog")).to_have_count(0)
        _choose(page, "stack")
        page.wait_for_function(f"() => document.querySelector('#viewer').dataset.frame"
                               f" === '{SLICE}'")
        shot(page, f"session-back-{tag}")
        assert errors == []
        context.close()


def test_a_share_visitor_hears_that_his_viewing_time_has_ended(
        site: tuple[CtSite, LiveServer]) -> None:
    ct, server = site
    with ct.app.test_request_context(), \
            ct.app.extensions["db"].write_transaction() as session:
        doctor = session.query(User).filter_by(subject=PHYSICIAN).one()
        made = service.create_share(session, user_principal(doctor, "session"), share_policy(),
                                    study_uid=ct.study, with_pin=False)
    with chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, "iPhone 13"))
        loopback_only(context)
        page = context.new_page()
        page.goto(f"{server.url}/s#{made.token}")
        page.get_by_role("button", name="Show my images").click()
        page.wait_for_url(f"{server.url}/studies/{ct.study}")
        _open_at_slice(page, f"{server.url}/studies/{ct.study}/view/{ct.series}")

        with ct.app.extensions["db"].write_transaction() as session:
            session.execute(update(ShareSession).values(
                last_seen_at=utcnow() - timedelta(minutes=16)))
        forget_cached_visits()
        _choose(page, "coronal")

        dialog = page.get_by_role("alertdialog", name="Your viewing time has ended")
        expect(dialog).to_be_visible(timeout=15_000)
        expect(dialog).to_contain_text("open the link you received")
        expect(dialog.get_by_role("link", name="Sign in again")).to_have_count(0)
        _accessible(page, "session-ended-share-iPhone_13")
        context.close()
