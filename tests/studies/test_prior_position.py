"""The prior beside the current, linked by the Frame of Reference (portal/studies/prior.py,
static/js/viewer/compare.js): two CT series of the same patient that share a Frame of Reference
but differ in slice spacing, count and start. Scrolling the current in Debian Chromium on an
iPhone 13 (a finger, then keys) moves the earlier one to the slice nearest in position along
the slice normal (Image Position Patient . normal, PS3.3 C.7.6.2.1.1), which is neither the
same index nor the same fraction of the stack; keys on the earlier one move the current
likewise. Screenshots in tests/artifacts/."""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from flask import Flask
from playwright.sync_api import Page
from pydicom import dcmread
from pydicom.uid import generate_uid

from demo.studies import write_ct_series
from portal.access.grants import create_grant
from portal.archive import current_archive
from tests.browser import chromium, loopback_only, phone
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    LiveServer,
    add_person,
    close_app,
    make_app,
)
from tests.studies.support import shot, sign_in_browser
from tests.studies.test_measure import ADMIN
from tests.studies.test_prior import _index, _touch

DOCTOR = "prior-position-doc"
PRIOR_SLICES = 10
PRIOR_TOP = -110.0  # mm: the earlier scan starts 70 mm below the current one's first slice
PRIOR_STEP = -22.5  # mm between its slices (the current: 375 mm / 23 = 16.3 mm)


@dataclass
class Site:
    app: Flask
    current: str
    prior: str
    now: list[tuple[str, float]]  # each slice's SOP Instance UID and place along the normal
    then: list[tuple[str, float]]


def _along(ds: object) -> float:
    """Image Position Patient along the normal of Image Orientation Patient."""
    orientation = [float(v) for v in ds.ImageOrientationPatient]  # type: ignore[attr-defined]
    normal = np.cross(orientation[:3], orientation[3:])
    return float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient]))  # type: ignore[attr-defined]


def build(folder: Path, idp: IdentityProvider) -> Site:
    app = make_app(folder / "instance", OIDC_ISSUER=idp.issuer, **OIDC_SETTINGS)
    prior_study, prior_series = generate_uid(), generate_uid()
    with tempfile.TemporaryDirectory() as scratch:
        now_paths = write_ct_series(Path(scratch) / "now", slices=24, size=128,
                                    uid_seed="position-now")
        then_paths = write_ct_series(Path(scratch) / "then", slices=PRIOR_SLICES, size=128,
                                     uid_seed="position-then")
        current = [dcmread(p) for p in now_paths]
        earlier = [dcmread(p) for p in then_paths]
    head = current[0]
    for j, ds in enumerate(earlier):
        # The same patient and Frame of Reference (the same scanner's frame, e.g. a planned
        # follow-up); another table offset in the plane, other slices along the normal.
        ds.PatientID, ds.PatientName = head.PatientID, head.PatientName
        ds.FrameOfReferenceUID = head.FrameOfReferenceUID
        ds.StudyDate = ds.SeriesDate = "20230105"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = prior_study, prior_series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [-190.0, -201.5, PRIOR_TOP + PRIOR_STEP * j]
        ds.SliceLocation = PRIOR_TOP + PRIOR_STEP * j
        ds.SliceThickness = ds.SpacingBetweenSlices = abs(PRIOR_STEP)
        ds.SeriesDescription = f"AXIAL {abs(PRIOR_STEP)}MM SOFT TISSUE"
    files = []
    for ds in current + earlier:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append(buffer.getvalue())
    with app.app_context():
        current_archive().ingest_many(files, who="test")
    user = add_person(app, idp, DOCTOR, ["physician"], name="Dr Position")
    with app.extensions["db"].write_transaction() as session:
        for uid in (str(head.StudyInstanceUID), prior_study):
            create_grant(session, ADMIN, user_id=user, study_uid=uid)
    return Site(app, str(head.StudyInstanceUID), prior_study,
                [(str(ds.SOPInstanceUID), _along(ds)) for ds in current],
                [(str(ds.SOPInstanceUID), _along(ds)) for ds in earlier])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, idp: IdentityProvider) -> Iterator[Site]:
    built = build(tmp_path_factory.mktemp("prior-position"), idp)
    yield built
    close_app(built.app)


def _nearest(slices: list[tuple[str, float]], place: float) -> int:
    return int(np.argmin([abs(p - place) for _, p in slices]))


def _shown(page: Page, pane: int) -> str:
    return str(page.eval_on_selector(f'.cpane[data-pane="{pane}"] img', "i => i.src"))


def _linked(page: Page, site: Site, moved: int) -> tuple[int, int]:
    """Both panes' indexes; the other one shows the slice nearest to ``moved``'s place."""
    now, then = _index(page, 0), _index(page, 1)
    if moved == 0:
        assert then == _nearest(site.then, site.now[now][1]), (now, then)
    else:
        assert now == _nearest(site.now, site.then[then][1]), (now, then)
    assert f"/instances/{site.now[now][0]}/" in _shown(page, 0)
    assert f"/instances/{site.then[then][0]}/" in _shown(page, 1)
    return now, then


def test_the_prior_follows_by_position_in_the_shared_frame_of_reference(site: Site) -> None:
    with LiveServer(site.app) as server, chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, "iPhone 13"))
        loopback_only(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        sign_in_browser(page, server.url, sub=DOCTOR,
                        next_path=f"/studies/{site.current}/compare/{site.prior}")
        page.wait_for_function("() => document.querySelector('#compare').classList"
                               ".contains('ready')")
        assert page.eval_on_selector("#compare", "c => c.dataset.linked") == "position"
        seen = [_linked(page, site, 0)]  # the middle of the current, at the start

        # A finger drags the current stack up (onwards), a few slices at a time.
        top = page.locator('.cpane[data-pane="0"] .cstage').bounding_box()
        assert top
        cdp = context.new_cdp_session(page)
        x, y = top["x"] + top["width"] / 2, top["y"] + top["height"] * 0.8
        for _ in range(2):
            before = _index(page, 0)
            _touch(cdp, "touchStart", [(x, y)])
            for i in range(1, 6):
                _touch(cdp, "touchMove", [(x, y - 8 * i)])
                time.sleep(0.016)
            _touch(cdp, "touchEnd", [])
            assert _index(page, 0) > before
            seen.append(_linked(page, site, 0))
        # Keys on the current: to its first slice (above the earlier scan's start), then one
        # by one down through it.
        page.locator('.cpane[data-pane="0"] .cstage').focus()
        page.keyboard.press("Home")
        seen.append(_linked(page, site, 0))
        for _ in range(len(site.now) - 1):
            page.keyboard.press("ArrowDown")
            seen.append(_linked(page, site, 0))
        # Neither the same index nor the same fraction of the stack, but the same place: the
        # earlier scan stays on its first slice above it and on its last below it.
        fraction = [round(n / (len(site.now) - 1) * (PRIOR_SLICES - 1)) for n, _ in seen]
        assert any(t != min(n, PRIOR_SLICES - 1) for n, t in seen)
        assert any(t != f for (_, t), f in zip(seen, fraction, strict=True))
        assert {t for n, t in seen if site.now[n][1] > PRIOR_TOP + 8} == {0}
        assert {t for _, t in seen} == set(range(PRIOR_SLICES))
        # The place in mm is on each pane.
        then = seen[-1][1]
        assert f"{site.then[then][1]:.1f} mm" in (page.locator(
            '.cpane[data-pane="1"] .cpos').text_content() or "")
        # Keys on the earlier one move the current to the slice nearest to it.
        page.locator('.cpane[data-pane="1"] .cstage').focus()
        page.keyboard.press("Home")
        _linked(page, site, 1)
        for _ in range(PRIOR_SLICES - 1):
            page.keyboard.press("ArrowDown")
            _linked(page, site, 1)
        page.wait_for_function("() => [...document.querySelectorAll('.cstage img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        shot(page, "prior-position-iPhone_13")
        assert errors == []
        context.close()
