"""Issue 8's "done when": with PORTAL_ARCHIVE_URL pointing at a real Orthanc that holds a CT,
the demo's Dr House signs in on a phone-sized Debian Chromium, finds the study and sees its images,
fetched from Orthanc on first view. Screenshots go to tests/artifacts/."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
from flask import Flask

from demo.people import register_demo_people
from demo.studies import write_ct_series
from tests.archive.test_external import portal_for, start_pacs, sync, upload
from tests.browser import chromium, loopback_only, phone
from tests.conftest import OIDC_SETTINGS, IdentityProvider, LiveServer, close_app
from tests.studies.support import shot, sign_in_browser


def test_physician_views_a_study_that_lives_in_orthanc_on_a_phone(
        tmp_path: Path, idp: IdentityProvider) -> None:
    pacs = start_pacs(tmp_path / "orthanc")
    app: Flask | None = None
    try:
        files = write_ct_series(tmp_path / "ct", slices=12, size=256, uid_seed="pacs-browser")
        for path in files:
            upload(pacs, path.read_bytes())
        header = pydicom.dcmread(io.BytesIO(files[0].read_bytes()), stop_before_pixels=True)
        app = portal_for(tmp_path, pacs.dicomweb_url, OIDC_ISSUER=idp.issuer, **OIDC_SETTINGS)
        sync(app)
        with app.extensions["db"].write_transaction() as session:
            # The demo's people: Dr House is the demo CT's referrer (name and NPI).
            register_demo_people(session, issuer=idp.issuer)
        with LiveServer(app) as server, chromium() as (playwright, browser):
            context = browser.new_context(**phone(playwright, "iPhone 13"))
            loopback_only(context)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            sign_in_browser(page, server.url, "house")
            page.locator("a.study").first.click()
            page.wait_for_url(f"**/studies/{header.StudyInstanceUID}")
            thumb = page.locator("img.thumb").first
            thumb.scroll_into_view_if_needed()
            page.wait_for_function(
                "img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle(),
                timeout=30_000)
            assert page.evaluate(
                "document.documentElement.scrollWidth - window.innerWidth") <= 0
            shot(page, "external-archive-study-iPhone_13")
            assert errors == []
            context.close()
    finally:
        if app is not None:
            close_app(app)
        pacs.stop()
