"""The viewer's views and tools on phones in a real Chromium: every view (slices, axial,
sagittal, coronal, MIP) draws its own image; every tool is reachable on a 360 px wide
screen without scrolling sideways (the rest behind "More"); keys still work on a desktop.
Screenshots go to tests/artifacts/."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, Page, expect

from tests.browser import PHONES, chromium, loopback_only, phone
from tests.conftest import IdentityProvider, LiveServer, close_app
from tests.studies.support import CtSite, build_ct_site, shot, sign_in_browser

VIEWS = ("axial", "sagittal", "coronal", "mip", "stack")
# (device profile, viewport): the profiles' own screens, the narrowest common phone, and a
# phone turned sideways (the bar is then a column at the right, the sheet opens beside it).
SCREENS: list[tuple[str, tuple[int, int] | None]] = [
    *((name, None) for name in PHONES), ("Pixel 7", (360, 780)), ("Pixel 7", (915, 412))]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, idp: IdentityProvider) -> Iterator[Any]:
    """One portal with a small demo CT (enough slices for reformats)."""
    ct = build_ct_site(tmp_path_factory.mktemp("views"), idp, slices=40, size=256)
    with LiveServer(ct.app) as server:
        yield ct, server
    close_app(ct.app)


def _context(playwright: Any, browser: Any, device: str,
             size: tuple[int, int] | None = None, scheme: str = "light") -> BrowserContext:
    if device == "desktop":
        options: dict[str, Any] = {"viewport": {"width": 1280, "height": 800}}
    else:
        options = phone(playwright, device)
        if size:
            options["viewport"] = {"width": size[0], "height": size[1]}
    context = browser.new_context(**options, color_scheme=scheme, accept_downloads=True)
    loopback_only(context)
    return context


def _open_viewer(page: Page, ct: CtSite, server: LiveServer) -> list[str]:
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    sign_in_browser(page, server.url, next_path=f"/studies/{ct.study}/view/{ct.series}")
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.wait_for_function("() => document.querySelector('#viewer').dataset.quality === 'full'",
                           timeout=30_000)
    return errors


def _viewer(page: Page, key: str) -> str:
    return str(page.eval_on_selector("#viewer", f"v => v.dataset.{key} || ''"))


def _choose_view(page: Page, view: str) -> None:
    """Pick a view as a person would: through "More" when the bar has one."""
    more = page.locator("button[data-action=more]")
    if more.is_visible():
        more.click()
    page.locator("select[name=view]").select_option(view)


@pytest.mark.parametrize("device", ("iPhone 13", "desktop"))
def test_every_view_draws_its_own_image(site: tuple[CtSite, LiveServer], device: str) -> None:
    ct, server = site
    tag = device.replace(" ", "_")
    with chromium() as (playwright, browser):
        context = _context(playwright, browser, device)
        page = context.new_page()
        errors = _open_viewer(page, ct, server)
        assert "/frames/" in _viewer(page, "src")
        for view in VIEWS:
            before = _viewer(page, "src")
            _choose_view(page, view)
            want = "/frames/" if view == "stack" else f"/volume/{view}?"
            # The image drawn is this view's, at full quality (loaded and decoded).
            page.wait_for_function(
                "(want) => { const v = document.querySelector('#viewer').dataset;"
                " return v.src.includes(want) && v.quality === 'full'; }",
                arg=want, timeout=60_000)
            assert _viewer(page, "view") == view and _viewer(page, "src") != before
            label = page.locator(".slice").inner_text()
            assert label.startswith({"stack": "Image", "mip": "3D MIP", "axial": "Axial",
                                     "sagittal": "Sagittal", "coronal": "Coronal"}[view])
            if view != "stack":
                assert page.locator(".loaded").inner_text() == ""  # no stale slice count
            shot(page, f"{tag}-view-{view}")
        assert errors == []
        context.close()


@pytest.mark.parametrize(("device", "size"), SCREENS,
                         ids=[f"{d}-{'x'.join(map(str, s)) if s else 'own'}" for d, s in SCREENS])
def test_every_tool_is_reachable_on_a_phone(site: tuple[CtSite, LiveServer], device: str,
                                            size: tuple[int, int] | None) -> None:
    from axe_playwright_python.sync_playwright import Axe

    ct, server = site
    tag = f"{device.replace(' ', '_')}-{'x'.join(map(str, size)) if size else 'own'}"
    with chromium() as (playwright, browser):
        context = _context(playwright, browser, device, size)
        page = context.new_page()
        errors = _open_viewer(page, ct, server)
        screen, height = page.evaluate("[window.innerWidth, window.innerHeight]")
        assert screen == (size[0] if size else screen) and (screen <= 412 or height <= 412)

        def fits() -> None:
            assert page.evaluate("document.documentElement.scrollWidth") <= screen
            assert page.evaluate("document.body.scrollWidth") <= screen
            bar = page.locator(".toolbar")
            assert bar.evaluate("b => b.scrollWidth <= b.clientWidth")

        def reachable(selector: str) -> None:
            for control in page.locator(selector).all():
                # Hidden itself or inside a hidden part (e.g. the 3D style, shown in the 3D view).
                if control.get_attribute("hidden") is not None or not control.is_visible():
                    continue
                box = control.bounding_box()
                assert box, selector
                assert box["x"] >= 0 and box["x"] + box["width"] <= screen + 0.5, (selector, box)
                assert box["y"] >= 0 and box["y"] + box["height"] <= height + 0.5, (selector, box)
                assert box["width"] >= 44 and box["height"] >= 44, (selector, box)

        fits()
        primary = ".toolbar > button"
        assert page.locator(primary).all_inner_texts() == ["Slices", "Window", "Measure", "More"]
        reachable(primary)
        shot(page, f"{tag}-toolbar")
        expect(page.locator(".sheet")).to_be_hidden()

        more = page.get_by_role("button", name="More")
        expect(more).to_have_attribute("aria-expanded", "false")
        more.click()
        expect(more).to_have_attribute("aria-expanded", "true")
        sheet = page.get_by_role("group", name="More tools")
        expect(sheet).to_be_visible()
        reachable(".sheet button, .sheet select")
        for name in ("Invert", "Reset", "Save JPEG"):
            expect(sheet.get_by_role("button", name=name)).to_be_visible()
        for name in ("View", "Preset"):
            expect(sheet.get_by_label(name)).to_be_visible()
        fits()
        shot(page, f"{tag}-more")
        results = Axe().run(page, options={"runOnly": {"type": "tag", "values": [
            "wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}})
        bad = [(v["id"], [n["target"] for n in v["nodes"]][:3])
               for v in results.response["violations"] if v["impact"] in ("serious", "critical")]
        assert bad == []

        # Invert through "More": it works, and the sheet gives the image back.
        sheet.get_by_role("button", name="Invert").click()
        expect(page.locator("button[data-action=invert]")).to_have_attribute("aria-pressed",
                                                                             "true")
        expect(sheet).to_be_hidden()
        page.wait_for_function("() => document.querySelector('.stage canvas').style.filter"
                               ".includes('invert')")
        # A preset through "More".
        more.click()
        sheet.get_by_label("Preset").select_option(label="Lung (1500/-600)")
        page.wait_for_function("() => document.querySelector('#viewer').dataset.window"
                               " === '-600,1500'")
        expect(sheet).to_be_hidden()
        # Save JPEG through "More".
        more.click()
        with page.expect_download() as info:
            sheet.get_by_role("button", name="Save JPEG").click()
        assert info.value.path().read_bytes()[:3] == b"\xff\xd8\xff"
        # Reset, then Escape closes the sheet and a tap on the image does too.
        more.click()
        sheet.get_by_role("button", name="Reset").click()
        expect(page.locator("button[data-action=invert]")).to_have_attribute("aria-pressed",
                                                                             "false")
        more.click()
        page.keyboard.press("Escape")
        expect(sheet).to_be_hidden()
        expect(more).to_be_focused()
        more.click()
        page.locator(".stage").click(position={"x": 60, "y": 60})
        expect(sheet).to_be_hidden()
        fits()
        assert errors == []
        context.close()


def test_desktop_shows_every_tool_and_keys_still_work(site: tuple[CtSite, LiveServer]) -> None:
    ct, server = site
    with chromium() as (playwright, browser):
        context = _context(playwright, browser, "desktop", scheme="dark")
        page = context.new_page()
        errors = _open_viewer(page, ct, server)
        expect(page.locator("button[data-action=more]")).to_be_hidden()
        for name in ("Slices", "Window", "Measure", "Invert", "Reset", "Save JPEG"):
            expect(page.get_by_role("button", name=name, exact=True)).to_be_visible()
        for name in ("view", "preset"):
            expect(page.locator(f".toolbar select[name={name}]")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        page.locator(".stage").focus()
        for key, check in (("i", "() => document.querySelector('button[data-action=invert]')"
                                 ".getAttribute('aria-pressed') === 'true'"),
                           ("m", "() => document.querySelector('#viewer').dataset.tool"
                                 " === 'measure'"),
                           ("ArrowDown", "() => document.querySelector('#viewer').dataset.frame"
                                         " === '2'"),
                           ("r", "() => document.querySelector('button[data-action=invert]')"
                                 ".getAttribute('aria-pressed') === 'false'")):
            page.keyboard.press(key)
            page.wait_for_function(check)
        shot(page, "desktop-toolbar")
        assert errors == []
        context.close()
