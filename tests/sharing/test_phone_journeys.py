"""Share links on phones (issue 13, items 7, 9 and 10), in a real Chromium as iPhone 13 and
Pixel 7, light and dark: the patient's link survives a reload, a wrong PIN is not sent again,
"Close" ends on a clear page that Back does not leave for the staff sign-in; the doctor's share
form asks one question per group with large targets, keeps its choices across a fresh sign-in,
offers the phone's share sheet, prints the QR code and the PIN apart, and tells local times."""

from __future__ import annotations

from datetime import timedelta

import pytest
from flask import Flask
from playwright.sync_api import Page, expect
from pydicom.uid import generate_uid
from sqlalchemy import update

from portal.access.grants import create_grant
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.auth.models import UserSession
from portal.db import utcnow
from tests.browser import PHONES, chromium, loopback_only, phone
from tests.conftest import IdentityProvider, LiveServer, add_person
from tests.factories import make_instance
from tests.sharing.conftest import World, link_row, make_share
from tests.studies.support import shot

CODE_KEY = "share-link-code"


def _fits(page: Page) -> None:
    assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0


def _targets(page: Page) -> None:
    """Every visible button and choice row is at least 44 x 44 CSS px; boxes at least 24."""
    for control in page.locator("main button, main .button, main label.check").all():
        if not control.is_visible():
            continue
        box = control.bounding_box()
        assert box and box["width"] >= 44 and box["height"] >= 44, (control.inner_text(), box)
    for box_input in page.locator("main input[type=radio], main input[type=checkbox]").all():
        if box_input.is_visible():
            box = box_input.bounding_box()
            assert box and box["width"] >= 24 and box["height"] >= 24, box


def _inspect(page: Page, name: str) -> None:
    """Light and dark: axe finds nothing serious, nothing wider than the screen (also 360 px),
    targets large enough; a screenshot of each."""
    from axe_playwright_python.sync_playwright import Axe

    size = page.viewport_size
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        results = Axe().run(page, options={"runOnly": {"type": "tag", "values": [
            "wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}})
        assert [(v["id"], [n["target"] for n in v["nodes"]][:3])
                for v in results.response["violations"]
                if v["impact"] in ("serious", "critical")] == [], (name, scheme)
        _fits(page)
        _targets(page)
        shot(page, f"{name}-{scheme}")
    assert size is not None
    page.set_viewport_size({"width": 360, "height": size["height"]})
    _fits(page)
    page.set_viewport_size(size)
    page.emulate_media(color_scheme="light")


@pytest.mark.parametrize("device", PHONES)
def test_a_link_survives_reloads_and_close_ends_on_a_clear_page(app: Flask, world: World,
                                                               device: str) -> None:
    made = make_share(world)
    assert made.pin
    tag = f"journey-landing-{device.replace(' ', '_')}"
    with LiveServer(app) as live, chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, device))
        loopback_only(context)
        page = context.new_page()
        posts: list[str] = []
        page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
        missing = page.get_by_text("This page was opened without its link code")
        pin = page.get_by_label("PIN, if you were given one")

        page.goto(f"{live.url}/s#{made.token}")
        assert page.url == f"{live.url}/s"  # the code left the address bar at once
        expect(pin).to_be_visible()
        expect(missing).to_be_hidden()
        _inspect(page, f"{tag}-1")

        # A reload, or the phone reopening a dropped tab at /s: the link still opens.
        for again in (page.reload, lambda: page.goto(f"{live.url}/s")):
            again()
            expect(pin).to_be_visible()
            expect(missing).to_be_hidden()
            assert page.locator("#token").input_value() == made.token
        assert made.token not in page.url

        # A wrong PIN: one message; a reload shows the form again and sends nothing.
        pin.fill("000000" if made.pin != "000000" else "111111")
        page.get_by_role("button", name="Show my images").click()
        expect(page.get_by_text("You can try 9 more times")).to_be_visible()
        expect(missing).to_be_hidden()
        assert page.url == f"{live.url}/s"
        shot(page, f"{tag}-2-wrong-pin")
        assert len(posts) == 1
        page.reload()
        expect(pin).to_be_visible()
        expect(missing).to_be_hidden()
        expect(page.get_by_text("You can try")).to_have_count(0)
        assert len(posts) == 1 and link_row(app, made.link.public_id).failed_attempts == 1

        pin.fill(made.pin)
        page.get_by_role("button", name="Show my images").click()
        page.wait_for_url(f"{live.url}/studies/{world.study}")
        # Exchanged: the browser keeps the code no longer.
        assert page.evaluate(f"sessionStorage.getItem('{CODE_KEY}')") is None

        page.get_by_role("button", name="Close").click()
        page.wait_for_url(f"{live.url}/s/closed")
        heading = page.get_by_role("heading", name="The images are closed")
        expect(heading).to_be_visible()
        _inspect(page, f"{tag}-3-closed")

        # Back: the study's address again, but no images and no staff sign-in.
        page.go_back()
        page.wait_for_url(f"{live.url}/studies/{world.study}")
        expect(heading).to_be_visible()
        assert page.locator("img.thumb").count() == 0
        page.go_back()
        page.wait_for_url(f"{live.url}/s")
        expect(missing).to_be_visible()  # the code went with the closed session
        expect(pin).to_be_hidden()
        assert made.token not in str(posts[:1]) and "/auth/" not in page.url
        context.close()


def _doctor_site(oidc_app: Flask, idp: IdentityProvider) -> str:
    """A physician granted a two-series study; returns the study UID."""
    study = generate_uid()
    with oidc_app.app_context():
        for number in (1, 2):
            current_archive().ingest(make_instance(study=study, series=generate_uid(),
                                                   SeriesNumber=number,
                                                   SeriesDescription=f"Part {number}"),
                                     who="test")
    user = add_person(oidc_app, idp, "journey-doc", ["physician"])
    admin = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t",
                      subject="t")
    with oidc_app.extensions["db"].write_transaction() as session:
        create_grant(session, admin, user_id=user, study_uid=study)
    return study


# The phone's share sheet and printing, observed (headless Chromium opens neither).
SPIES = """
Object.defineProperty(Navigator.prototype, 'share', {configurable: true,
  value: function (data) { window.__shared = data; return Promise.resolve(); }});
window.print = function () { window.__printed = (window.__printed || []).concat(
  [document.body.dataset.print]); };
"""


def _authorize(page: Page) -> None:
    page.fill("input[name=sub]", "journey-doc")
    page.get_by_role("button", name="Authorize").click()


def _visible(page: Page, selector: str) -> bool:
    return bool(page.eval_on_selector(
        selector, "e => getComputedStyle(e).display !== 'none' && e.offsetParent !== null"))


@pytest.mark.parametrize("device", PHONES)
def test_the_share_form_on_a_phone(oidc_app: Flask, idp: IdentityProvider, device: str) -> None:
    study = _doctor_site(oidc_app, idp)
    tag = f"journey-form-{device.replace(' ', '_')}"
    form_url = f"/studies/{study}/share"
    with LiveServer(oidc_app) as server, chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, device), timezone_id="Asia/Tokyo",
                                      locale="en-US")
        loopback_only(context)
        context.add_init_script(SPIES)
        page = context.new_page()
        page.goto(f"{server.url}/auth/login?next={form_url}")
        _authorize(page)
        page.wait_for_url(f"{server.url}{form_url}")

        # One question per group: every visible group asks one thing, one answer chosen.
        def questions() -> list[tuple[str, list[str], int]]:
            return page.eval_on_selector_all(
                "#share-form fieldset", """sets => sets.filter(f => f.offsetParent !== null)
                  .map(f => { const r = [...f.querySelectorAll(':scope > label input[type=radio]')];
                    return [f.querySelector('legend').textContent,
                            [...new Set(r.map(i => i.name))],
                            r.filter(i => i.checked).length]; })""")
        asked = questions()
        assert [q[0] for q in asked] == ["With whom?", "What?", "Options"]
        assert all(len(names) <= 1 and (not names or checked == 1)
                   for _legend, names, checked in asked), asked
        hint = page.locator("#expiry-hint")
        expect(hint).to_contain_text("GMT+9")  # the doctor's own time zone, not UTC
        _inspect(page, f"{tag}-1")

        # A colleague: then, and only then, how he opens it.
        page.get_by_label("A colleague (physician)").check()
        expect(page.get_by_role("group", name="How does the colleague open it?")).to_be_visible()
        page.get_by_label("Only some series of this study").check()
        expect(page.get_by_role("group", name="Which series?")).to_be_visible()
        page.get_by_label("This study", exact=True).check()
        expect(page.get_by_role("group", name="Which series?")).to_be_hidden()
        page.get_by_label("Valid for").fill("3")
        page.get_by_label("E-mail me when the link is first opened").check()
        page.get_by_label("Note for yourself").fill("for Dr Wilson")
        page.get_by_label("Language of the message").select_option("es")
        shot(page, f"{tag}-2-colleague")

        # The sign-in is too old for a change: sign in again, and the choices are still there.
        with oidc_app.extensions["db"].write_transaction() as session:
            session.execute(update(UserSession).values(auth_time=utcnow() - timedelta(hours=2)))
        page.get_by_role("button", name="Make the link").click()
        page.wait_for_url("**/oauth2/authorize?**")
        _authorize(page)
        page.wait_for_url(f"{server.url}{form_url}")
        expect(page.get_by_text("Your choices were kept")).to_be_visible()
        expect(page.get_by_label("A colleague (physician)")).to_be_checked()
        expect(page.get_by_label("Like a patient, no account needed")).to_be_checked()
        expect(page.get_by_label("E-mail me when the link is first opened")).to_be_checked()
        expect(page.get_by_label("Valid for")).to_have_value("3")
        expect(page.get_by_label("Note for yourself")).to_have_value("for Dr Wilson")
        expect(page.get_by_label("Language of the message")).to_have_value("es")
        shot(page, f"{tag}-3-kept")

        page.get_by_role("button", name="Make the link").click()
        page.locator("#share-url").wait_for()
        link = page.locator("#share-url").input_value()
        pin = page.locator("#share-pin").inner_text()
        assert "/s?lang=es#" in link  # the link's messages and pages in Spanish
        page.wait_for_load_state()
        page.wait_for_function("() => !Object.keys(sessionStorage).some(k => k.startsWith("
                               "'share-draft'))")  # the draft is done with
        until = page.locator("main time[data-local]").first
        expect(until).to_contain_text("GMT+9")
        expect(until).not_to_contain_text("UTC")
        _inspect(page, f"{tag}-4-created")

        # Beside Copy, the phone's share sheet, with the link only (never the PIN).
        page.get_by_role("button", name="Share…").click()
        page.wait_for_function("() => window.__shared !== undefined")
        shared = page.evaluate("window.__shared")
        assert shared["url"] == link and pin not in str(shared)

        # Printing: the QR code and the PIN each on a slip of its own, nothing else.
        page.get_by_role("button", name="Print QR code").click()
        page.emulate_media(media="print")
        assert _visible(page, "#slip-qr") and not _visible(page, "#slip-pin")
        assert not _visible(page, "#share-pin") and not _visible(page, "header.bar")
        page.emulate_media(media="screen")
        page.get_by_role("button", name="Print PIN").click()
        page.emulate_media(media="print")
        assert _visible(page, "#slip-pin") and not _visible(page, "#slip-qr")
        assert not _visible(page, ".qr img")
        shot(page, f"{tag}-5-print-pin")
        page.emulate_media(media="screen")
        assert page.evaluate("window.__printed") == ["qr", "pin"]
        context.close()


def test_a_link_that_cannot_be_opened_leaves_no_code_in_the_tab(app: Flask,
                                                                world: World) -> None:
    """An unknown (or ended, or locked) link: its code does not stay in sessionStorage."""
    with LiveServer(app) as live, chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, "iPhone 13"))
        loopback_only(context)
        page = context.new_page()
        page.goto(f"{live.url}/s#{'x' * 43}")
        assert page.evaluate(f"sessionStorage.getItem('{CODE_KEY}')") == "x" * 43
        page.get_by_role("button", name="Show my images").click()
        expect(page.get_by_role("heading", name="This link cannot be opened")).to_be_visible()
        # A function, not an expression: Playwright evals an expression in the page, which the CSP
        # refuses once the first check has not already passed.
        page.wait_for_function(f"() => sessionStorage.getItem('{CODE_KEY}') === null")
