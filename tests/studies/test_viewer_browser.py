"""The phone viewer in a real Chromium (iPhone 13, Pixel 7, desktop): sign in, search, open a
study, swipe through slices, pinch-zoom, window, reformat, measure. Screenshots go to
tests/artifacts/."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import BrowserContext, CDPSession, Page, expect
from playwright.sync_api import Error as PlaywrightError

from tests.browser import PHONES, chromium, loopback_only, phone
from tests.conftest import IdentityProvider, LiveServer, close_app
from tests.studies.support import CtSite, build_ct_site, shot, sign_in_browser

DEVICES = (*PHONES, "desktop")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, idp: IdentityProvider) -> Iterator[Any]:
    """One portal with the 150-slice demo CT for every device of this module."""
    ct = build_ct_site(tmp_path_factory.mktemp("viewer"), idp)
    with LiveServer(ct.app) as server:
        yield ct, server
    close_app(ct.app)


def _context(playwright: Any, browser: Any, device: str) -> BrowserContext:
    if device == "desktop":
        context = browser.new_context(viewport={"width": 1366, "height": 860})
    else:
        context = browser.new_context(**phone(playwright, device))
    loopback_only(context)
    return context


def _touch(cdp: CDPSession, kind: str, points: list[tuple[float, float]]) -> None:
    cdp.send("Input.dispatchTouchEvent", {
        "type": kind, "touchPoints": [{"x": x, "y": y, "id": i} for i, (x, y) in
                                      enumerate(points)]})


def _swipe(page: Page, cdp: CDPSession | None, box: dict[str, float], dy: float) -> None:
    """One finger (or the mouse) dragged vertically over the middle of the image."""
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2 - dy / 2
    if cdp is None:
        page.mouse.move(x, y)
        page.mouse.down()
        for i in range(1, 11):
            page.mouse.move(x, y + dy * i / 10)
        page.mouse.up()
        return
    _touch(cdp, "touchStart", [(x, y)])
    for i in range(1, 11):
        _touch(cdp, "touchMove", [(x, y + dy * i / 10)])
        time.sleep(0.016)
    time.sleep(0.15)  # hold still: no fling, so the test knows where it stops
    _touch(cdp, "touchEnd", [])


def _pinch(cdp: CDPSession, box: dict[str, float], spread: float) -> None:
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    _touch(cdp, "touchStart", [(cx - 40, cy), (cx + 40, cy)])
    for i in range(1, 11):
        d = 40 + spread * i / 10
        _touch(cdp, "touchMove", [(cx - d, cy), (cx + d, cy)])
        time.sleep(0.016)
    _touch(cdp, "touchEnd", [])


def _data(page: Page, key: str) -> str:
    return str(page.eval_on_selector("#viewer", f"v => v.dataset.{key} || ''"))


def _until(page: Page, key: str, test: str, timeout: float = 10_000) -> str:
    """Wait until the viewer's ``data-<key>`` passes ``test`` (a JavaScript predicate of ``v``);
    the viewer draws, and so updates its data attributes, on the next animation frame."""
    page.wait_for_function(
        f"() => (v => {test})(document.querySelector('#viewer').dataset.{key} || '')",
        timeout=timeout)
    return _data(page, key)


def _more(page: Page) -> None:
    """Open the "More" sheet when the bar has one (phones), where views and presets are."""
    more = page.locator("button[data-action=more]")
    if more.is_visible() and more.get_attribute("aria-expanded") != "true":
        more.click()


def _wait_full(page: Page, timeout: float = 30_000) -> None:
    page.wait_for_function("() => document.querySelector('#viewer').dataset.quality === 'full'",
                           timeout=timeout)


@pytest.mark.parametrize("device", DEVICES)
def test_find_read_scroll_zoom_window_reformat_measure(site: tuple[CtSite, LiveServer],
                                                       device: str) -> None:
    ct, server = site
    tag = device.replace(" ", "_")
    with chromium() as (playwright, browser):
        context = _context(playwright, browser, device)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        sign_in_browser(page, server.url)  # (the provider's page asks a CDN; that may fail)
        page.on("console", lambda m: errors.append(f"{m.text} {m.location}")
                if m.type == "error" else None)
        page.on("requestfailed", lambda r: errors.append(f"{r.url} {r.failure}"))
        shot(page, f"{tag}-1-list")

        # Search by patient name, then open the study.
        page.get_by_label("Patient name, ID or accession").fill("doe")
        page.get_by_role("button", name="Search").click()
        page.wait_for_url("**/studies?s=**")
        # The searched name stays out of the address: only an opaque, random token (which
        # may hold the letters "doe" by chance, 1 in about 8,000) is in it.
        address = urlsplit(page.url)
        assert list(parse_qs(address.query)) == ["s"] and "doe" not in address.path.lower()
        assert len(parse_qs(address.query)["s"][0]) >= 8
        rows = page.locator("a.study")
        assert rows.count() == 2  # the CT and the earlier study of the same patient
        assert "2024-11-18" in rows.first.inner_text()  # newest first
        rows.first.click()
        page.wait_for_url(f"**/studies/{ct.study}")
        expect(page.get_by_role("heading", name="Report")).to_be_visible()
        assert "2019-03-04" in page.locator("#history-heading + ul").inner_text()
        page.wait_for_function("() => [...document.querySelectorAll('img.thumb')]"
                               ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
        assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
        shot(page, f"{tag}-2-study")

        page.locator("a.series-card").first.click()
        page.wait_for_url(f"**/view/{ct.series}")
        _wait_full(page)
        assert _data(page, "frame") == "1"
        shot(page, f"{tag}-3-viewer")
        stage = page.locator(".stage")
        box = stage.bounding_box()
        assert box is not None and box["height"] > 200
        cdp = context.new_cdp_session(page) if device != "desktop" else None

        # Swipe up through slices: the frame shown changes.
        _swipe(page, cdp, box, -box["height"] * 0.4)
        frame = int(_until(page, "frame", "+v > 5"))
        _wait_full(page)
        shot(page, f"{tag}-4-swiped")

        # Pinch to zoom (phones: two touch points through CDP; desktop: Ctrl+wheel and keys).
        if cdp is not None:
            _pinch(cdp, box, 90)
        else:
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.keyboard.down("Control")
            page.mouse.wheel(0, -200)
            page.keyboard.up("Control")
        page.wait_for_function("() => +document.querySelector('#viewer').dataset.zoom > 1.3")
        assert _data(page, "frame") == str(frame)  # zooming does not move through slices
        shot(page, f"{tag}-5-zoomed")

        # Window: a preset, then the exact server rendering replaces the approximation.
        _more(page)
        page.locator("select[name=preset]").select_option(label="Lung (1500/-600)")
        _until(page, "window", "v === '-600,1500'")
        page.wait_for_timeout(300)
        _wait_full(page)
        page.wait_for_function("() => !document.querySelector('.wl').textContent.includes('…')",
                               timeout=30_000)
        shot(page, f"{tag}-6-lung-window")
        # ... and a W/L drag.
        page.get_by_role("button", name="Window", exact=True).click()
        _swipe(page, cdp, box, 80)
        _until(page, "window", "v !== '-600,1500'")
        page.keyboard.press("r")
        page.wait_for_function("() => +document.querySelector('#viewer').dataset.zoom === 1")

        # Measure a length: the label is in millimetres (CT pixel spacing is in the patient).
        page.get_by_role("button", name="Measure", exact=True).click()
        x0, y0 = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5
        if cdp is None:
            page.mouse.move(x0, y0)
            page.mouse.down()
            page.mouse.move(x0 + box["width"] * 0.4, y0, steps=8)
            page.mouse.up()
        else:
            _touch(cdp, "touchStart", [(x0, y0)])
            for i in range(1, 9):
                _touch(cdp, "touchMove", [(x0 + box["width"] * 0.4 * i / 8, y0)])
            _touch(cdp, "touchEnd", [])
        label = page.locator("svg.marks text").first.text_content() or ""
        assert label.endswith(" mm") and "approx" not in label, label
        assert 20 < float(label.split()[0]) < 400
        assert "Length" in (page.locator(".status").text_content() or "")
        shot(page, f"{tag}-7-measure")

        # A reformat: coronal, from the volume endpoint.
        page.get_by_role("button", name="Slices").click()
        _more(page)
        page.locator("select[name=view]").select_option("coronal")
        try:
            _until(page, "view", "v === 'coronal'", 3_000)
        except PlaywrightError:
            # Known issue: under heavy load Chromium can fail to decode a reformat image the
            # server sent (200), and the viewer then goes back to the slices; choose again.
            _more(page)
            page.locator("select[name=view]").select_option("coronal")
        _until(page, "view", "v === 'coronal'")
        _wait_full(page, 60_000)
        shot(page, f"{tag}-8-coronal")
        _more(page)
        page.locator("select[name=view]").select_option("mip")
        _wait_full(page, 60_000)
        before = page.locator(".slice").text_content()
        x, y = box["x"] + box["width"] / 2 - 60, box["y"] + box["height"] / 2
        if cdp is None:  # a mouse drag sideways turns the MIP too
            page.mouse.move(x, y)
            page.mouse.down()
            page.mouse.move(x + 120, y, steps=8)
            page.mouse.up()
        else:
            _touch(cdp, "touchStart", [(x, y)])
            for i in range(1, 9):
                _touch(cdp, "touchMove", [(x + 15 * i, y)])
                time.sleep(0.016)
            time.sleep(0.15)
            _touch(cdp, "touchEnd", [])
        assert page.locator(".slice").text_content() != before
        _wait_full(page, 60_000)
        shot(page, f"{tag}-9-mip")
        assert errors == []
        context.close()


PAGES = {"home": "/", "list": "/studies", "study": "/studies/{study}",
         "viewer": "/studies/{study}/view/{series}", "missing": "/studies/1.2.3.404"}


@pytest.mark.parametrize("device", ("iPhone 13", "desktop"))
def test_axe_finds_no_serious_violation(site: tuple[CtSite, LiveServer], device: str) -> None:
    """WCAG 2.1 AA (axe-core, bundled with axe-playwright-python): nothing serious or critical."""
    from axe_playwright_python.sync_playwright import Axe

    ct, server = site
    axe = Axe()
    with chromium() as (playwright, browser):
        context = _context(playwright, browser, device)
        page = context.new_page()
        sign_in_browser(page, server.url)
        found = {}
        for name, path in PAGES.items():
            page.goto(server.url + path.format(study=ct.study, series=ct.series))
            if name == "viewer":
                _wait_full(page)
            results = axe.run(page, options={"runOnly": {"type": "tag", "values": [
                "wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}})
            assert len(results.response["passes"]) > 10, name  # axe really ran its rules
            bad = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3])
                   for v in results.response["violations"]
                   if v["impact"] in ("serious", "critical")]
            if bad:
                found[name] = bad
            shot(page, f"{device.replace(' ', '_')}-axe-{name}")
        assert found == {}
        context.close()


def test_every_slice_scrolls_at_full_size_once_loaded(site: tuple[CtSite, LiveServer]) -> None:
    """The 150-slice CT: once loaded, stepping one slice per animation frame shows each at
    full size, at well over 20 slices per second (phone profile)."""
    ct, server = site
    with chromium() as (playwright, browser):
        context = _context(playwright, browser, "Pixel 7")
        page = context.new_page()
        sign_in_browser(page, server.url, next_path=f"/studies/{ct.study}/view/{ct.series}")
        page.wait_for_function(
            f"() => +document.querySelector('#viewer').dataset.loadedFull === {ct.slices}",
            timeout=120_000)
        result = page.evaluate("""async (count) => {
            const viewer = document.querySelector('#viewer');
            const frame = () => new Promise(r => requestAnimationFrame(r));
            let full = 0; const seen = new Set();
            const start = performance.now();
            for (let i = 0; i < count - 1; i++) {
                document.querySelector('.stage').dispatchEvent(
                    new KeyboardEvent('keydown', {key: 'ArrowDown', bubbles: true}));
                await frame(); await frame();
                if (viewer.dataset.quality === 'full') full++;
                seen.add(viewer.dataset.frame);
            }
            return {seconds: (performance.now() - start) / 1000, full, seen: seen.size};
        }""", ct.slices)
        assert result["seen"] == ct.slices - 1 and result["full"] == ct.slices - 1, result
        assert (ct.slices - 1) / result["seconds"] >= 20, result
        context.close()


def test_desktop_keys_invert_save_jpeg_and_landscape(site: tuple[CtSite, LiveServer]) -> None:
    """Keyboard on a desktop (arrows, Page Down, +/-, i, r), the current view saved as a
    JPEG, and a phone turned sideways keeps the image and the tools on screen."""
    ct, server = site
    with chromium() as (playwright, browser):
        context = browser.new_context(viewport={"width": 1280, "height": 800},
                                      accept_downloads=True)
        loopback_only(context)
        page = context.new_page()
        sign_in_browser(page, server.url, next_path=f"/studies/{ct.study}/view/{ct.series}")
        _wait_full(page)
        page.locator(".stage").focus()
        page.keyboard.press("ArrowDown")
        page.keyboard.press("PageDown")
        _until(page, "frame", "v === '12'")
        page.keyboard.press("+")
        _until(page, "zoom", "+v > 1.2")
        page.keyboard.press("i")
        expect(page.get_by_role("button", name="Invert")).to_have_attribute("aria-pressed", "true")
        page.mouse.move(640, 400)
        page.mouse.wheel(0, 300)
        _until(page, "frame", "+v > 12")
        _wait_full(page)
        with page.expect_download() as info:
            page.get_by_role("button", name="Save JPEG").click()
        download = info.value
        assert download.suggested_filename.endswith(".jpg")
        assert download.path().read_bytes()[:3] == b"\xff\xd8\xff"  # a JPEG
        page.keyboard.press("r")
        _until(page, "zoom", "v === '1.000'")
        expect(page.get_by_role("button", name="Invert")).to_have_attribute("aria-pressed", "false")
        context.close()

        context = browser.new_context(**{**phone(playwright, "Pixel 7"),
                                         "viewport": {"width": 915, "height": 412}})
        loopback_only(context)
        page = context.new_page()
        sign_in_browser(page, server.url, next_path=f"/studies/{ct.study}/view/{ct.series}")
        _wait_full(page)
        stage = page.locator(".stage").bounding_box()
        tools = page.locator(".toolbar").bounding_box()
        assert stage and tools and stage["height"] > 300 and tools["x"] >= stage["width"] - 1
        shot(page, "Pixel_7-landscape")
        context.close()


def test_study_list_loads_older_studies_while_scrolling(oidc_app: Any,
                                                          idp: IdentityProvider) -> None:
    """Without a click, the next page's rows join the list as it scrolls (the "Older" link
    remains the way without JavaScript)."""
    from pydicom.uid import generate_uid

    from portal.access.grants import create_grant
    from portal.access.principal import Principal
    from portal.archive import current_archive
    from tests.conftest import add_person
    from tests.factories import make_instance

    user = add_person(oidc_app, idp, "viewer-doc", ["physician"])
    admin = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t",
                      subject="t")
    uids = [generate_uid() for _ in range(60)]
    with oidc_app.app_context():
        for n, uid in enumerate(uids):
            current_archive().ingest(make_instance(
                study=uid, patient_id=f"S{n}", patient_name=f"Scroll^{n:02d}",
                StudyDate=f"2024{n % 12 + 1:02d}{n % 28 + 1:02d}"), who="test")
    with oidc_app.extensions["db"].write_transaction() as session:
        for uid in uids:
            create_grant(session, admin, user_id=user, study_uid=uid)
    with LiveServer(oidc_app) as server, chromium() as (playwright, browser):
        context = _context(playwright, browser, "iPhone 13")
        page = context.new_page()
        sign_in_browser(page, server.url)
        assert page.locator("a.study").count() == 25
        for expected in (50, 60):
            page.mouse.wheel(0, 20_000)
            page.wait_for_function(
                f"() => document.querySelectorAll('a.study').length === {expected}")
        assert page.locator("a[rel=next]").count() == 0
        assert page.locator("#study-rows > li").count() == 60
        names = page.locator("a.study .who").all_inner_texts()
        assert len(set(names)) == 60  # no page twice
        shot(page, "iPhone_13-list-scrolled")
        context.close()


def test_cine_plays_a_multiframe_series_at_the_chosen_speed(oidc_app: Any,
                                                              idp: IdentityProvider) -> None:
    """A multi-frame ultrasound clip: Play runs through its frames, Pause stops them."""
    import numpy as np
    from pydicom.uid import generate_uid

    from portal.access.grants import create_grant
    from portal.access.principal import Principal
    from portal.archive import current_archive
    from tests.conftest import add_person
    from tests.factories import make_dataset, to_bytes

    study, series = generate_uid(), generate_uid()
    ds = make_dataset(study=study, series=series, rows=64, columns=64, modality="US",
                      SOPClassUID="1.2.840.10008.5.1.4.1.1.3.1")
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.NumberOfFrames, ds.FrameTime = 24, 100.0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    del ds.RescaleIntercept, ds.RescaleSlope
    ds.PixelData = (np.arange(24 * 64 * 64) // 97 % 256).astype(np.uint8).tobytes()
    with oidc_app.app_context():
        current_archive().ingest(to_bytes(ds), who="test")
    user = add_person(oidc_app, idp, "viewer-doc", ["physician"])
    admin = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t",
                      subject="t")
    with oidc_app.extensions["db"].write_transaction() as session:
        create_grant(session, admin, user_id=user, study_uid=study)
    with LiveServer(oidc_app) as server, chromium() as (playwright, browser):
        context = _context(playwright, browser, "Pixel 7")
        page = context.new_page()
        sign_in_browser(page, server.url, next_path=f"/studies/{study}/view/{series}")
        page.wait_for_function(
            "() => +document.querySelector('#viewer').dataset.loadedFull === 24")
        assert page.locator("select[name=speed]").input_value() == "10"  # FrameTime 100 ms
        # With Play the bar holds five tools: on a 360 px screen each label still fits.
        page.set_viewport_size({"width": 360, "height": 780})
        assert page.locator(".toolbar > button").all_inner_texts() == [
            "Slices", "Window", "Measure", "Play", "More"]
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
        assert page.eval_on_selector_all(".toolbar > button", "bs => bs.every(b =>"
                                         " b.scrollWidth <= b.clientWidth && b.offsetHeight >= 44"
                                         " && b.getBoundingClientRect().right <= 360)")
        page.set_viewport_size({"width": 412, "height": 915})
        _more(page)
        page.locator("select[name=speed]").select_option("25")
        play = page.get_by_role("button", name="Play")
        play.click()
        page.wait_for_function("() => +document.querySelector('#viewer').dataset.frame > 12")
        shot(page, "Pixel_7-cine")
        page.get_by_role("button", name="Pause").click()
        page.wait_for_timeout(100)  # the frame already advanced is drawn on the next paint
        stopped = _data(page, "frame")
        page.wait_for_timeout(300)
        assert _data(page, "frame") == stopped
        context.close()
