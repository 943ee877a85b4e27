"""DICOM text is shown as text, never run: XSS payloads in every field (docs/security.md 23, 14)."""

from __future__ import annotations

from flask import Flask
from pydicom.uid import generate_uid

from portal.access.grants import create_grant
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.index.names import person_name
from tests.browser import chromium, loopback_only, phone
from tests.conftest import IdentityProvider, LiveServer, add_person
from tests.factories import make_instance

PAYLOADS = ["<img src=x onerror=alert(1)>", '"><svg onload=alert(2)>',
            "javascript:alert(3)", "</script><script>alert(4)</script>"]


def test_payloads_in_dicom_fields_render_as_text(oidc_app: Flask, idp: IdentityProvider) -> None:
    study = generate_uid()
    data = make_instance(study=study, patient_name=f"Evil^{PAYLOADS[0]}={PAYLOADS[1]}",
                         patient_id=PAYLOADS[3][:64], StudyDescription=PAYLOADS[1][:64],
                         SeriesDescription=PAYLOADS[0], ReferringPhysicianName=PAYLOADS[2],
                         AccessionNumber="<b>x</b>", InstitutionName=PAYLOADS[0])
    with oidc_app.app_context():
        current_archive().ingest(data, who="test")
    user = add_person(oidc_app, idp, "xss-viewer", ["physician"])
    admin = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t",
                      subject="t")
    with oidc_app.extensions["db"].write_transaction() as session:
        create_grant(session, admin, user_id=user, study_uid=study)
    with LiveServer(oidc_app) as server, chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, "iPhone 13"))
        loopback_only(context)
        page = context.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        # Sign in through the provider with the browser's own cookies.
        page.goto(server.url + "/auth/login?next=/studies")
        page.fill("input[name=sub]", "xss-viewer")
        page.get_by_role("button", name="Authorize").click()
        page.wait_for_url(f"{server.url}/studies")
        # The list shows the name as people write it (PN groups split at "="), as text.
        shown = person_name(f"Evil^{PAYLOADS[0]}={PAYLOADS[1]}")
        assert shown.startswith("<img src")
        assert shown in page.locator(".study .who").first.inner_text()
        page.locator("a.study").first.click()
        page.wait_for_load_state()
        body = page.locator("main").inner_text()
        assert PAYLOADS[0] in body and "javascript:alert(3)" in body
        # The only images are the portal's own series previews; no injected element exists.
        assert page.locator("main svg, main script, main img:not(.thumb)").count() == 0
        page.wait_for_function(
            "() => { const i = document.querySelector('img.thumb');"
            " return i && i.complete && i.naturalWidth > 0; }", timeout=30_000)
        assert dialogs == []
        context.close()
