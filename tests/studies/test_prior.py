"""The prior beside the current (portal/studies/prior.py, /studies/<uid>/compare/<prior>): the
study page offers the same patient's earlier study of the same modality in one tap, only
priors the reader may see; on phones (Debian Chromium, iPhone 13 and Pixel 7) scrolling the
current stack moves the earlier one to the same place in the patient, one window serves both,
and the prior's report is one tap away. Screenshots in tests/artifacts/."""

from __future__ import annotations

import io
import json
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask import Flask
from playwright.sync_api import CDPSession, Page
from pydicom import dcmread
from pydicom.uid import generate_uid

from demo.studies import write_ct_series
from portal.access.grants import create_grant
from portal.access.principal import Principal
from portal.archive import current_archive
from tests.browser import PHONES, chromium, loopback_only, phone
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    LiveServer,
    add_person,
    close_app,
    make_app,
    signed_in,
)
from tests.factories import make_instance
from tests.studies.support import shot, sign_in_browser

ADMIN = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t", subject="t")
DOCTOR = "prior-doc"


@dataclass
class Site:
    app: Flask
    current: str
    prior: str
    hidden_prior: str  # an earlier CT of the same patient the doctor was not granted
    mr_prior: str  # an earlier study of another modality
    current_slices: int
    prior_slices: int


def _series(folder: Path, seed: str, slices: int, date: str | None, study: str | None,
            new_reference: bool) -> list[bytes]:
    """A demo CT; an earlier one gets its own date, study (and Frame of Reference)."""
    paths = write_ct_series(folder / seed, slices=slices, size=128, uid_seed=seed)
    out = []
    series, reference = generate_uid(), generate_uid()
    for path in paths:
        ds = dcmread(path)
        if date:
            ds.StudyDate = ds.SeriesDate = date
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            if new_reference:
                ds.FrameOfReferenceUID = reference
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def build(folder: Path, idp: IdentityProvider) -> Site:
    app = make_app(folder / "instance", OIDC_ISSUER=idp.issuer, **OIDC_SETTINGS)
    prior, hidden = generate_uid(), generate_uid()
    with tempfile.TemporaryDirectory() as scratch:
        current = _series(Path(scratch), "now", 24, None, None, False)
        earlier = _series(Path(scratch), "then", 12, "20230105", prior, True)
        older = _series(Path(scratch), "older", 3, "20200105", hidden, True)
    header = dcmread(io.BytesIO(current[0]), stop_before_pixels=True)
    mr = make_instance(patient_id=str(header.PatientID), patient_name=str(header.PatientName),
                       IssuerOfPatientID=str(header.get("IssuerOfPatientID", "")),
                       modality="MR", StudyDate="20220101", rows=32, columns=32)
    mr_study = str(dcmread(io.BytesIO(mr), stop_before_pixels=True).StudyInstanceUID)
    with app.app_context():
        archive = current_archive()
        for files in (current, earlier, older):
            archive.ingest_many(files, who="test")
        archive.ingest(mr, who="test")
    user = add_person(app, idp, DOCTOR, ["physician"], name="Dr Prior")
    add_person(app, idp, "prior-stranger", ["physician"])
    with app.extensions["db"].write_transaction() as session:
        for uid in (str(header.StudyInstanceUID), prior, mr_study):
            create_grant(session, ADMIN, user_id=user, study_uid=uid)
    return Site(app, str(header.StudyInstanceUID), prior, hidden, mr_study, 24, 12)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, idp: IdentityProvider) -> Iterator[Site]:
    built = build(tmp_path_factory.mktemp("prior"), idp)
    yield built
    close_app(built.app)


def test_the_study_page_offers_the_visible_prior_of_the_same_modality(
        site: Site, idp: IdentityProvider) -> None:
    doctor = signed_in(site.app, idp, DOCTOR)
    page = doctor.get(f"/studies/{site.current}").get_data(as_text=True)
    assert f'/studies/{site.current}/compare/{site.prior}"' in page
    assert "Compare with 2023-01-05" in page
    assert f"/compare/{site.hidden_prior}" not in page  # not granted: never offered
    assert f"/compare/{site.mr_prior}" not in page  # another modality
    shown = doctor.get(f"/studies/{site.current}/compare/{site.prior}")
    assert shown.status_code == 200
    text = shown.get_data(as_text=True)
    assert f'/studies/{site.prior}#report' in text and "Report of 2023-01-05" in text
    # Each side: its frames with their place along the slice normal (mm) and its Frame of
    # Reference; the earlier study has its own, so compare.js links by relative position.
    found = re.search(r'<script type="application/json" id="compare-data"[^>]*>(.*?)</script>',
                      text, re.S)
    assert found
    panes = json.loads(found.group(1))["panes"]
    assert [len(p["frames"]) for p in panes] == [site.current_slices, site.prior_slices]
    for pane in panes:
        steps = [b - a for a, b in zip(pane["positions"], pane["positions"][1:], strict=False)]
        assert steps and (all(d > 0 for d in steps) or all(d < 0 for d in steps))
    assert panes[0]["frameOfReference"] and \
        panes[0]["frameOfReference"] != panes[1]["frameOfReference"]
    # Not granted, or another patient's study, or no images of the kind: 404.
    assert doctor.get(f"/studies/{site.current}/compare/{site.hidden_prior}").status_code == 404
    assert doctor.get(f"/studies/{site.current}/compare/{site.mr_prior}").status_code == 404
    stranger = signed_in(site.app, idp, "prior-stranger")
    assert stranger.get(f"/studies/{site.current}/compare/{site.prior}").status_code == 404


def _touch(cdp: CDPSession, kind: str, points: list[tuple[float, float]]) -> None:
    cdp.send("Input.dispatchTouchEvent", {
        "type": kind, "touchPoints": [{"x": x, "y": y, "id": i} for i, (x, y) in
                                      enumerate(points)]})


def _index(page: Page, pane: int) -> int:
    return int(page.eval_on_selector(f'.cpane[data-pane="{pane}"]', "p => p.dataset.index"))


@pytest.mark.parametrize("device", PHONES)
def test_scrolling_the_current_moves_the_prior_to_the_same_place(site: Site,
                                                                  device: str) -> None:
    from axe_playwright_python.sync_playwright import Axe

    tag = f"prior-{device.replace(' ', '_')}"
    with LiveServer(site.app) as server, chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, device))
        loopback_only(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        sign_in_browser(page, server.url, sub=DOCTOR, next_path=f"/studies/{site.current}")
        page.get_by_role("link", name="Compare with 2023-01-05").click()  # one tap
        page.wait_for_url(f"**/compare/{site.prior}")
        page.wait_for_function("() => document.querySelector('#compare').classList"
                               ".contains('ready')")
        assert page.eval_on_selector("#compare", "c => c.dataset.linked") == "relative-position"
        # Upright: the current study above the earlier one, both full width, no sideways scroll.
        top = page.locator('.cpane[data-pane="0"] .cstage').bounding_box()
        bottom = page.locator('.cpane[data-pane="1"] .cstage').bounding_box()
        assert top and bottom and top["y"] + top["height"] <= bottom["y"] + 1
        assert page.evaluate("document.documentElement.scrollWidth") <= page.viewport_size["width"]  # type: ignore[index]
        page.wait_for_function("() => [...document.querySelectorAll('.cstage img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        start = (_index(page, 0), _index(page, 1))
        # One finger drags the current stack up (onwards): the prior follows.
        cdp = context.new_cdp_session(page)
        x, y = top["x"] + top["width"] / 2, top["y"] + top["height"] * 0.8
        _touch(cdp, "touchStart", [(x, y)])
        for i in range(1, 11):
            _touch(cdp, "touchMove", [(x, y - 12 * i)])
            time.sleep(0.016)
        _touch(cdp, "touchEnd", [])
        now, then = _index(page, 0), _index(page, 1)
        assert now > start[0] and then > start[1]
        # The same place in the patient: the same fraction of the span (both span 375 mm).
        expected = round(now / (site.current_slices - 1) * (site.prior_slices - 1))
        assert abs(then - expected) <= 1, (now, then, expected)
        # Keys on the earlier stack move the current one back too.
        page.locator('.cpane[data-pane="1"] .cstage').focus()
        page.keyboard.press("Home")
        assert (_index(page, 0), _index(page, 1)) == (0, 0)
        # One window for both.
        page.locator("select[name=preset]").select_option(label="Lung")
        page.wait_for_function("() => [...document.querySelectorAll('.cstage img')]"
                               ".every(i => i.src.includes('window=-600,1500'))")
        page.wait_for_function("() => [...document.querySelectorAll('.cstage img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        shot(page, f"{tag}-linked")
        for scheme in ("light", "dark"):
            page.emulate_media(color_scheme=scheme)
            results = Axe().run(page, options={"runOnly": {"type": "tag", "values": [
                "wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}})
            bad = [(v["id"], [n["target"] for n in v["nodes"]][:3])
                   for v in results.response["violations"]
                   if v["impact"] in ("serious", "critical")]
            assert bad == [], (scheme, bad)
        for control in page.locator("a, select, .cstage").all():
            box = control.bounding_box()
            assert box and box["width"] >= 44 and box["height"] >= 44, control
        # The prior's report: one tap.
        page.get_by_role("link", name="Report of 2023-01-05").click()
        page.wait_for_url(f"**/studies/{site.prior}#report")
        assert errors == []
        context.close()
