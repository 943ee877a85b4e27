"""The 3D view on phones in a real Chromium: a finger turns it about two axes (quick small
images while it moves, the full one on release; the image and the letters change), a pinch
zooms it, the style changes it (bone, skin, a MIP with a slab), and the viewer still passes
the page sweep in it (axe, no page wider than the screen, controls of 44 px).
Screenshots go to tests/artifacts/."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import CDPSession, Page, expect

from tests.browser import chromium, loopback_only, phone
from tests.conftest import IdentityProvider, LiveServer, close_app
from tests.studies.support import CtSite, build_ct_site, shot, sign_in_browser
from tests.studies.test_viewer_browser import _more, _pinch, _touch

CASES = [("iPhone 13", "light", None), ("Pixel 7", "dark", None), ("Pixel 7", "light", 360)]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, idp: IdentityProvider) -> Iterator[Any]:
    ct = build_ct_site(tmp_path_factory.mktemp("view3d"), idp, slices=40, size=256)
    with LiveServer(ct.app) as server:
        yield ct, server
    close_app(ct.app)


def _data(page: Page, key: str) -> str:
    return str(page.eval_on_selector("#viewer", f"v => v.dataset.{key} || ''"))


def _letters(page: Page) -> dict[str, str]:
    return {side: page.locator(f".om-{side}").inner_text()
            for side in ("top", "right", "bottom", "left")}


def _shown_full(page: Page, part: str, unlike: str = "", timeout: float = 60_000) -> str:
    """Wait until the 3D image on screen is a full one whose address has ``part`` (and is
    not ``unlike``)."""
    page.wait_for_function(
        "([part, unlike]) => { const v = document.querySelector('#viewer').dataset;"
        " const src = v.turnSrc || '';"
        " return src.includes(part) && src !== unlike && v.turnDetail === 'full'; }",
        arg=[part, unlike], timeout=timeout)
    return _data(page, "turnSrc")


def _drag(cdp: CDPSession, box: dict[str, float], dx: float, dy: float) -> None:
    x, y = box["x"] + box["width"] / 2 - dx / 2, box["y"] + box["height"] / 2 - dy / 2
    _touch(cdp, "touchStart", [(x, y)])
    for i in range(1, 16):
        _touch(cdp, "touchMove", [(x + dx * i / 15, y + dy * i / 15)])
        time.sleep(0.03)
    time.sleep(0.1)
    _touch(cdp, "touchEnd", [])


def _pixels(page: Page) -> str:
    """What the 3D image on screen looks like, as a data URL of its pixels."""
    return str(page.eval_on_selector(".turn3d img", """img => {
        const c = document.createElement('canvas'); c.width = 64; c.height = 64;
        const x = c.getContext('2d'); x.drawImage(img, 0, 0, 64, 64);
        return c.toDataURL(); }"""))


@pytest.mark.parametrize(("device", "scheme", "width"), CASES,
                         ids=[f"{d}-{s}-{w or 'own'}" for d, s, w in CASES])
def test_a_finger_turns_the_3d_view_and_the_letters_follow(
        site: tuple[CtSite, LiveServer], device: str, scheme: str, width: int | None) -> None:
    from axe_playwright_python.sync_playwright import Axe

    ct, server = site
    tag = f"{device.replace(' ', '_')}-{scheme}-{width or 'own'}"
    with chromium() as (playwright, browser):
        options = phone(playwright, device)
        if width:
            options["viewport"] = {"width": width, "height": 780}
        context = browser.new_context(**options, color_scheme=scheme)
        loopback_only(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        asked: list[str] = []
        page.on("request", lambda r: asked.append(r.url) if "/volume/" in r.url else None)
        sign_in_browser(page, server.url, next_path=f"/studies/{ct.study}/view/{ct.series}")
        # (after the sign-in: the test identity provider's page links a stylesheet off-line)
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.wait_for_function(
            "() => document.querySelector('#viewer').dataset.quality === 'full'", timeout=30_000)
        _more(page)
        page.locator("select[name=view]").select_option("3d")
        first = _shown_full(page, "/volume/3d?")
        assert "style=bone" in first and "angle=0&elevation=0" in first
        assert _letters(page) == {"top": "H", "right": "L", "bottom": "F", "left": "R"}
        assert page.locator(".slice").inner_text().startswith("3D Bone")
        before = _pixels(page)
        shot(page, f"{tag}-3d-front")

        stage = page.locator(".stage").bounding_box()
        assert stage
        cdp = context.new_cdp_session(page)
        _drag(cdp, stage, 120, 0)  # sideways: about the patient's vertical axis
        turned = _shown_full(page, "/volume/3d?", first)
        assert turned != first and "angle=0&" not in turned
        assert any("detail=low" in url for url in asked)  # quick images while it turned
        sideways = _letters(page)
        assert sideways["top"] == "H" and sideways["left"] != "R" and sideways["right"] != "L"
        assert "R" in sideways["left"] and "L" in sideways["right"]  # turned, not mirrored
        page.wait_for_function("(b) => { const img = document.querySelector('.turn3d img');"
                               " const c = document.createElement('canvas'); c.width = 64;"
                               " c.height = 64; c.getContext('2d').drawImage(img, 0, 0, 64, 64);"
                               " return c.toDataURL() !== b; }", arg=before)
        shot(page, f"{tag}-3d-turned")
        _drag(cdp, stage, 0, 100)  # down: over the head
        over = _shown_full(page, "/volume/3d?", turned)
        assert "elevation=0&" not in over and _letters(page)["top"] != "H"

        _pinch(cdp, stage, 80)
        zoomed = _shown_full(page, "/volume/3d?", over)
        assert "zoom=1&" not in zoomed

        _more(page)
        style = page.get_by_label("3D style")
        expect(style).to_be_visible()
        box = style.bounding_box()
        assert box and box["width"] >= 44 and box["height"] >= 44
        style.select_option("skin")
        skin = _shown_full(page, "style=skin")
        assert skin != zoomed
        shot(page, f"{tag}-3d-skin")
        _more(page)
        page.get_by_label("3D style").select_option("mip:20")
        slab = _shown_full(page, "/volume/mip?")
        assert "slab=20" in slab and "style=" not in slab
        assert page.locator(".slice").inner_text().startswith("3D MIP 20 mm")
        shot(page, f"{tag}-3d-mip-slab")

        screen = page.evaluate("window.innerWidth")
        assert page.evaluate("document.documentElement.scrollWidth") <= screen
        assert page.evaluate("document.body.scrollWidth") <= screen
        results = Axe().run(page, options={"runOnly": {"type": "tag", "values": [
            "wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}})
        bad = [(v["id"], [n["target"] for n in v["nodes"]][:3])
               for v in results.response["violations"] if v["impact"] in ("serious", "critical")]
        assert bad == []
        # Back to the slices: the 3D layer and its style go away.
        _more(page)
        page.locator("select[name=view]").select_option("stack")
        expect(page.locator(".turn3d")).to_be_hidden()
        _more(page)
        expect(page.get_by_label("3D style")).to_be_hidden()
        assert errors == []
        context.close()
