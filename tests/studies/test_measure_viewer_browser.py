"""What the viewer shows of measurements beyond drawing them (issue 20), on an iPhone 13 in
Debian Chromium: the saved JPEG carries every kind the viewer measures (an angle, an ellipse and
a freehand region with its values; the saved ones in their own colour), read back from the
JPEG's pixels where each shape and its words are on screen; and an office manager, who is not
shown the sets physicians saved, reads how many there are, in his language. Screenshots in
tests/artifacts/."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page
from sqlalchemy import func, select

from portal.access.grants import create_grant
from portal.index.models import Instance, Series
from portal.studies.models import SavedMeasurements
from tests.browser import chromium, loopback_only, phone
from tests.conftest import (
    IdentityProvider,
    LiveServer,
    add_person,
    close_app,
    csrf_of,
    signed_in,
)
from tests.studies.support import PHYSICIAN, CtSite, build_ct_site, shot, sign_in_browser
from tests.studies.test_measure import ADMIN
from tests.studies.test_measure_browser import _drag, _shape, _viewer

Rgb = np.ndarray
MANAGER = "withheld-om"
NOTE = "Saved measurements by others, not shown: "


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, idp: IdentityProvider) -> Iterator[Any]:
    ct = build_ct_site(tmp_path_factory.mktemp("measure-jpeg"), idp, slices=6, size=256)
    with LiveServer(ct.app) as server:
        yield ct, server
    close_app(ct.app)


def _yellow(px: Rgb) -> np.ndarray:
    """#ffd400, the colour of marks not saved yet (grey CT pixels have R = G = B)."""
    r, g, b = (px[..., i].astype(int) for i in range(3))
    return (r > 180) & (g > 150) & (b < 110)


def _cyan(px: Rgb) -> np.ndarray:
    """#7fdcff, the colour of saved marks."""
    r, g, b = (px[..., i].astype(int) for i in range(3))
    return (b > 190) & (g > 160) & (b - r > 50)


def _saved_jpeg(page: Page) -> tuple[Rgb, float]:
    """Save JPEG through "More": the pixels and device pixels per CSS pixel."""
    page.get_by_role("button", name="More").click()
    with page.expect_download() as info:
        page.get_by_role("button", name="Save JPEG").click()
    data = Path(info.value.path()).read_bytes()
    assert data[:3] == b"\xff\xd8\xff"
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    box = page.locator(".stage").bounding_box()
    assert box
    return pixels, pixels.shape[1] / box["width"]


def _outline(page: Page, selector: str) -> list[tuple[float, float]]:
    """Points on the outline of the marks' SVG shapes, in the stage's CSS pixels."""
    found: list[list[float]] = page.eval_on_selector_all(selector, """els => els.flatMap(el => {
        if (el.tagName === 'ellipse') {
          const [cx, cy, rx, ry] = ['cx', 'cy', 'rx', 'ry'].map(a => +el.getAttribute(a));
          return [...Array(16).keys()].map(i => [cx + rx * Math.cos(i * Math.PI / 8),
                                                  cy + ry * Math.sin(i * Math.PI / 8)]);
        }
        const p = [...el.points].map(q => [q.x, q.y]);
        const out = [];
        for (let i = 0; i + 1 < p.length; i++) {
          for (const t of [0.25, 0.5, 0.75]) out.push([p[i][0] + t * (p[i + 1][0] - p[i][0]),
                                                       p[i][1] + t * (p[i + 1][1] - p[i][1])]);
        }
        return out;
    })""")
    assert found, selector
    return [(x, y) for x, y in found]


def _on_outline(pixels: Rgb, scale: float, points: list[tuple[float, float]],
                colour: Callable[[Rgb], np.ndarray]) -> float:
    """The share of ``points`` with a pixel of ``colour`` within 2 CSS px in the JPEG."""
    near = max(2, math.ceil(2 * scale))
    hits = 0
    for x, y in points:
        cx, cy = round(x * scale), round(y * scale)
        patch = pixels[max(0, cy - near):cy + near + 1, max(0, cx - near):cx + near + 1]
        hits += bool(colour(patch).any())
    return hits / len(points)


def _words(pixels: Rgb, scale: float, page: Page, selector: str,
           colour: Callable[[Rgb], np.ndarray]) -> list[int]:
    """For each of the marks' words on screen, how many JPEG pixels of ``colour`` lie where
    they are."""
    boxes: list[list[float]] = page.eval_on_selector_all(selector, """els => els.map(el => {
        const s = document.querySelector('.stage').getBoundingClientRect();
        const b = el.getBoundingClientRect();
        return [b.left - s.left, b.top - s.top, b.right - s.left, b.bottom - s.top];
    })""")
    assert boxes, selector
    return [int(colour(pixels[round(t * scale):round(b * scale) + 1,
                              round(left * scale):round(r * scale) + 1]).sum())
            for left, t, r, b in boxes]


def test_the_saved_jpeg_draws_angles_ellipses_and_regions_with_their_values(
        site: tuple[CtSite, LiveServer]) -> None:
    ct, server = site
    with chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, "iPhone 13"), accept_downloads=True)
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
        cx, cy = box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.55
        # An ellipse left of the middle, a freehand triangle right of it, an angle below.
        _shape(page, "ellipse")
        _drag(cdp, [(cx - 110 + 6 * i, cy - 20 + 4 * i) for i in range(11)])
        page.wait_for_function("() => document.querySelector('#viewer').dataset.measured"
                               " === '1'", timeout=15_000)
        _shape(page, "polygon")
        _drag(cdp, [(cx + 20 + 4 * i, cy + 30) for i in range(16)]
              + [(cx + 80 - 2 * i, cy + 30 - 3 * i) for i in range(1, 16)]
              + [(cx + 50 - 2 * i, cy - 15 + 3 * i) for i in range(1, 15)])
        page.wait_for_function("() => document.querySelector('#viewer').dataset.measured"
                               " === '2'", timeout=15_000)
        _shape(page, "angle")
        _drag(cdp, [(cx - 60, cy + 60 + 6 * i) for i in range(11)])
        _drag(cdp, [(cx - 60 + 6 * i, cy + 120) for i in range(11)])
        page.wait_for_function("() => document.querySelectorAll("
                               "'svg.marks text.value:not(.saved)').length === 3")
        values = page.locator("svg.marks text.value:not(.saved)")
        assert all(t.startswith("mean ") for t in values.all_text_contents()[:2])
        assert values.nth(2).text_content().endswith("°")  # type: ignore[union-attr]
        shot(page, "measure-jpeg-iPhone_13-screen")

        pixels, scale = _saved_jpeg(page)
        assert scale > 2  # the JPEG has the screen's device pixels (3 on an iPhone 13)
        Image.fromarray(pixels).save(Path(__file__).resolve().parents[1] / "artifacts"
                                     / "measure-jpeg-iPhone_13-saved.png")
        for kind in ("ellipse", "polygon", "polyline"):  # the angle is a polyline
            points = _outline(page, f"svg.marks {kind}.shape:not(.saved)")
            assert _on_outline(pixels, scale, points, _yellow) >= 0.9, kind
        # Inside the ellipse, away from its edge, is the image, not paint.
        ellipse = _outline(page, "svg.marks ellipse.shape")
        mx = sum(x for x, _ in ellipse) / len(ellipse)
        my = sum(y for _, y in ellipse) / len(ellipse)
        assert _on_outline(pixels, scale, [(mx, my)], _yellow) == 0
        # Every shape's words (the regions' values, the angle's degrees) are in the JPEG.
        assert all(n > 40 for n in _words(pixels, scale, page, "svg.marks text.value", _yellow))

        # Saved with the study and back after a reload: drawn in the saved colour.
        page.get_by_role("button", name="More").click()
        page.get_by_role("button", name="Save measurements").click()
        page.wait_for_function("() => document.querySelector('#viewer').dataset.saved === '3'")
        page.reload()
        page.wait_for_function("() => +document.querySelector('#viewer').dataset.savedShown"
                               " >= 3 && document.querySelector('#viewer').dataset.quality"
                               " === 'full'", timeout=30_000)
        assert _viewer(page, "savedShown") == "3"
        pixels, scale = _saved_jpeg(page)
        for kind in ("ellipse", "polygon", "polyline"):
            points = _outline(page, f"svg.marks {kind}.shape.saved")
            assert _on_outline(pixels, scale, points, _cyan) >= 0.9, kind
            assert _on_outline(pixels, scale, points, _yellow) < 0.2, kind
        assert all(n > 40 for n in _words(pixels, scale, page, "svg.marks text.value.saved",
                                          _cyan))
        assert errors == []
        context.close()


def _withheld(page: Page) -> str:
    note = page.locator(".withheld")
    return (note.text_content() or "") if note.is_visible() else ""


def test_an_office_manager_reads_how_many_sets_are_not_shown(
        site: tuple[CtSite, LiveServer], idp: IdentityProvider) -> None:
    from axe_playwright_python.sync_playwright import Axe

    ct, server = site
    add_person(ct.app, idp, MANAGER, ["office_manager"], practice="Withheld")
    other = add_person(ct.app, idp, "withheld-doc", ["physician"], practice="Withheld")
    with ct.app.extensions["db"].write_transaction() as session:
        create_grant(session, ADMIN, user_id=other, study_uid=ct.study)
    # A set saved by each physician (one of the practice, one not), over HTTP as the viewer
    # saves; with those of the test above, every set of the study is withheld from him.
    with ct.app.extensions["db"].new_session() as session:
        sop = session.scalars(select(Instance.sop_instance_uid).join(
            Series, Series.id == Instance.series_fk).where(
            Series.series_instance_uid == ct.series).order_by(Instance.instance_number)).first()
    for sub in (PHYSICIAN, "withheld-doc"):
        client = signed_in(ct.app, idp, sub)
        saved = client.post(f"/studies/{ct.study}/measurements", headers={
            "X-CSRF-Token": csrf_of(client)}, json={"measurements": [
                {"sop": sop, "frame": 1, "kind": "length", "points": [[10, 10], [60, 10]],
                 "text": "25 mm"}]})
        assert saved.status_code == 201, saved.data
    with ct.app.extensions["db"].new_session() as session:
        count = session.scalar(select(func.count()).select_from(SavedMeasurements)) or 0
    assert count >= 2

    with chromium() as (playwright, browser):
        german = f"Gespeicherte Messungen anderer, nicht angezeigt: {count}"
        for locale, words in (("en-US", f"{NOTE}{count}"), ("de-DE", german)):
            context = browser.new_context(**phone(playwright, "iPhone 13"), locale=locale)
            loopback_only(context)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e, seen=errors: seen.append(str(e)))
            sign_in_browser(page, server.url, sub=MANAGER,
                            next_path=f"/studies/{ct.study}/view/{ct.series}")
            page.wait_for_function("() => document.querySelector('#viewer').dataset.savedShown"
                                   " !== undefined", timeout=15_000)
            assert _viewer(page, "savedShown") == "0"  # none drawn
            page.wait_for_function("() => !document.querySelector('.withheld').hidden")
            assert _withheld(page) == words
            # On the screen, clear of the tools, and read by axe like the rest of the viewer.
            note = page.locator(".withheld").bounding_box()
            stage = page.locator(".stage").bounding_box()
            assert note and stage and note["x"] >= 0 and note["x"] + note["width"] <= 390
            assert stage["y"] <= note["y"] and note["y"] + note["height"] <= stage["y"] + 200
            for scheme in ("light", "dark"):
                page.emulate_media(color_scheme=scheme)
                results = Axe().run(page, options={"runOnly": {"type": "tag", "values": [
                    "wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}})
                bad = [(v["id"], [n["target"] for n in v["nodes"]][:3])
                       for v in results.response["violations"]
                       if v["impact"] in ("serious", "critical")]
                assert bad == [], (scheme, bad)
            shot(page, f"measure-withheld-{locale}")
            assert errors == []
            context.close()

        # The physician who saved sees his own set and no such note.
        context = browser.new_context(**phone(playwright, "iPhone 13"))
        loopback_only(context)
        page = context.new_page()
        sign_in_browser(page, server.url, next_path=f"/studies/{ct.study}/view/{ct.series}")
        page.wait_for_function("() => +document.querySelector('#viewer').dataset.savedShown"
                               " >= 1", timeout=15_000)
        assert _withheld(page) == ""
        context.close()
