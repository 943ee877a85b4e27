"""Measuring a region in the viewer on phones (Debian Chromium, iPhone 13 and Pixel 7): a finger
draws an ellipse on a CT slice, the server reads the stored pixels, and the mean HU shown
equals numpy's over the same pixels of the stored file (within 0.5 HU); an angle; the
measurements saved with the study come back after a reload. Screenshots in tests/artifacts/."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from playwright.sync_api import CDPSession, Page, Request
from pydicom import dcmread

from portal.archive import current_archive
from portal.imaging.measure import parse_shape, region_mask
from tests.browser import PHONES, chromium, loopback_only, phone
from tests.conftest import IdentityProvider, LiveServer, close_app
from tests.studies.support import CtSite, build_ct_site, shot, sign_in_browser


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, idp: IdentityProvider) -> Iterator[Any]:
    ct = build_ct_site(tmp_path_factory.mktemp("measure"), idp, slices=12, size=256)
    with LiveServer(ct.app) as server:
        yield ct, server
    close_app(ct.app)


def _touch(cdp: CDPSession, kind: str, points: list[tuple[float, float]]) -> None:
    cdp.send("Input.dispatchTouchEvent", {
        "type": kind, "touchPoints": [{"x": x, "y": y, "id": i} for i, (x, y) in
                                      enumerate(points)]})


def _drag(cdp: CDPSession, path: list[tuple[float, float]]) -> None:
    _touch(cdp, "touchStart", [path[0]])
    for point in path[1:]:
        _touch(cdp, "touchMove", [point])
        time.sleep(0.016)
    _touch(cdp, "touchEnd", [])


def _shape(page: Page, value: str) -> None:
    page.get_by_role("button", name="More").click()
    page.locator("select[name=shape]").select_option(value)


def _viewer(page: Page, key: str) -> str:
    return str(page.eval_on_selector("#viewer", f"v => v.dataset.{key} || ''"))


def _expected_mean(ct: CtSite, sent: dict[str, Any], url: str) -> float:
    """numpy's mean HU over the pixels the request named, from the stored file."""
    sop = url.split("/instances/")[1].split("/")[0]
    with ct.app.app_context():
        ds = dcmread(io.BytesIO(current_archive().read(sop)))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    mask = region_mask(parse_shape(sent), int(ds.Rows), int(ds.Columns))
    assert mask.sum() > 50
    return float(hu[mask].mean())


@pytest.mark.parametrize("device", PHONES)
def test_a_region_drawn_on_a_phone_reads_the_stored_hu(site: tuple[CtSite, LiveServer],
                                                      device: str) -> None:
    ct, server = site
    tag = f"measure-{device.replace(' ', '_')}"
    with chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, device))
        loopback_only(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        sign_in_browser(page, server.url, next_path=f"/studies/{ct.study}/view/{ct.series}")
        page.wait_for_function("() => document.querySelector('#viewer').dataset.quality"
                               " === 'full'", timeout=30_000)
        cdp = context.new_cdp_session(page)
        box = page.locator(".stage").bounding_box()
        assert box
        sent: list[Request] = []
        page.on("request", lambda r: sent.append(r) if r.url.endswith("/roi") else None)

        # An ellipse in the middle of the body (soft tissue and vessels).
        _shape(page, "ellipse")
        cx, cy = box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5
        _drag(cdp, [(cx - 30 + 6 * i, cy - 20 + 4 * i) for i in range(11)])
        page.wait_for_function("() => document.querySelector('#viewer').dataset.measured"
                               " === '1'", timeout=15_000)
        text = page.locator("svg.marks text.value:not(.saved)").first.text_content() or ""
        assert text.startswith("mean ") and " HU" in text and "cm²" in text, text
        shown = float(text.split()[1])
        assert len(sent) == 1
        body = json.loads(sent[0].post_data or "{}")
        assert body["kind"] == "ellipse"
        assert abs(shown - _expected_mean(ct, body, sent[0].url)) <= 0.5
        assert "Ellipse: mean" in (page.locator(".status").text_content() or "")
        shot(page, f"{tag}-ellipse")

        # A freehand region: a triangle traced with one finger.
        _shape(page, "polygon")
        path = [(cx - 40 + 4 * i, cy + 30) for i in range(21)] + \
            [(cx + 40 - 2 * i, cy + 30 - 3 * i) for i in range(1, 21)] + \
            [(cx - 2 * i, cy - 30 + 3 * i) for i in range(1, 20)]
        _drag(cdp, path)
        page.wait_for_function("() => document.querySelector('#viewer').dataset.measured"
                               " === '2'", timeout=15_000)
        body = json.loads(sent[1].post_data or "{}")
        region = page.locator("svg.marks text.value:not(.saved)").nth(1).text_content() or ""
        assert body["kind"] == "polygon" and len(body["points"]) >= 3
        assert abs(float(region.split()[1]) - _expected_mean(ct, body, sent[1].url)) <= 0.5

        # An angle: one arm, then the other from the corner (a right angle on screen).
        _shape(page, "angle")
        _drag(cdp, [(cx + 60, cy - 60 + 6 * i) for i in range(11)])  # down to the corner
        _drag(cdp, [(cx + 60 + 6 * i, cy) for i in range(11)])  # then sideways
        angle = page.locator("svg.marks text.value:not(.saved)").nth(2).text_content() or ""
        assert angle.endswith("°") and abs(float(angle[:-1]) - 90) < 3, angle

        # Saved with the study, and back after a reload (drawn as saved marks).
        page.get_by_role("button", name="More").click()
        page.get_by_role("button", name="Save measurements").click()
        page.wait_for_function("() => document.querySelector('#viewer').dataset.saved === '3'")
        page.reload()
        page.wait_for_function("() => +document.querySelector('#viewer').dataset.savedShown"
                               " >= 3", timeout=15_000)
        assert page.locator("svg.marks .shape.saved").count() >= 3
        shot(page, f"{tag}-saved")
        assert errors == []
        context.close()
