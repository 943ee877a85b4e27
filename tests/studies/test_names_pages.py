"""Person names appear as people write them on every page that shows one (the study list, the
study page, the viewer, the share pages, the console), never in the DICOM form with carets."""

from __future__ import annotations

import re

import pytest
from flask import Flask
from pydicom.uid import generate_uid

from portal.access.grants import create_grant
from portal.access.models import User
from portal.access.principal import Principal, user_principal
from portal.archive import current_archive
from portal.sharing import service
from portal.sharing.routes import share_policy
from tests.browser import chromium, loopback_only, phone
from tests.conftest import IdentityProvider, LiveServer, add_person, signed_in
from tests.factories import make_instance
from tests.sharing.conftest import open_link
from tests.studies.support import shot, sign_in_browser

ADMIN = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t", subject="t")
PATIENT = "Doe^John^^Mr^Jr"
REFERRER = "House^Gregory^^Dr"


def _whos(html: str) -> list[str]:
    return re.findall(r'class="who"[^>]*>([^<]*)<', html)


def test_names_are_written_as_people_write_them_everywhere(oidc_app: Flask,
                                                            idp: IdentityProvider) -> None:
    study, series = generate_uid(), generate_uid()
    with oidc_app.app_context():
        for n in (1, 2, 3):
            current_archive().ingest(make_instance(
                study=study, series=series, patient_id="NAMES-1", patient_name=PATIENT,
                ReferringPhysicianName=REFERRER, InstanceNumber=n), who="test")
    doctor = add_person(oidc_app, idp, "names-doc", ["physician"])
    add_person(oidc_app, idp, "names-om", ["office_manager"], "Clinic")
    with oidc_app.extensions["db"].write_transaction() as session:
        create_grant(session, ADMIN, user_id=doctor, study_uid=study)
    client = signed_in(oidc_app, idp, "names-doc")
    pages = {
        "list": client.get("/studies").get_data(as_text=True),
        "study": client.get(f"/studies/{study}").get_data(as_text=True),
        "share": client.get(f"/studies/{study}/share").get_data(as_text=True),
    }
    viewer = client.get(f"/studies/{study}/view/{series}").get_data(as_text=True)

    # A patient's share link: the page it opens names the patient too.
    with oidc_app.test_request_context(), \
            oidc_app.extensions["db"].write_transaction() as session:
        principal = user_principal(session.get(User, doctor), "session")
        made = service.create_share(session, principal, share_policy(), study_uid=study)
    visitor = oidc_app.test_client()
    assert open_link(visitor, made.token, made.pin).status_code == 303
    pages["shared"] = visitor.get("/shared").get_data(as_text=True)

    for name, html in pages.items():
        assert "John Doe" in html, name
        assert "^" not in html, (name, html[html.index("^") - 80:html.index("^") + 40])
    assert "Mr John Doe, Jr" in pages["study"] and "Mr John Doe, Jr" in pages["list"]
    assert "Dr Gregory House" in pages["study"]  # the referrer

    # The viewer: the written name on the image, and nowhere the DICOM form with its carets.
    assert "Mr John Doe, Jr" in viewer and "^" not in viewer

    # The console lists the referrer the studies name (a key to link) by the written name.
    console = signed_in(oidc_app, idp, "names-om").get("/admin/identifiers")
    assert console.status_code == 200
    whos = _whos(console.get_data(as_text=True))
    assert "GREGORY HOUSE" in whos and not any("^" in who for who in whos), whos


@pytest.mark.parametrize("scheme", ("light", "dark"))
def test_written_names_on_a_360_px_phone(oidc_app: Flask, idp: IdentityProvider,
                                         scheme: str) -> None:
    """The list and the study page with written names: no caret on screen, nothing wider
    than a 360 px screen, and axe finds nothing serious, in light and dark."""
    from axe_playwright_python.sync_playwright import Axe

    study = generate_uid()
    with oidc_app.app_context():
        current_archive().ingest(make_instance(
            study=study, patient_id="NAMES-2", ReferringPhysicianName=REFERRER,
            patient_name="Wolfeschlegelsteinhausenbergerdorff^Hubert Blaine^^Prof. Dr.^MD"),
            who="test")
    doctor = add_person(oidc_app, idp, "names-phone", ["physician"])
    with oidc_app.extensions["db"].write_transaction() as session:
        create_grant(session, ADMIN, user_id=doctor, study_uid=study)
    with LiveServer(oidc_app) as server, chromium() as (playwright, browser):
        context = browser.new_context(**{**phone(playwright, "iPhone 13"),
                                         "viewport": {"width": 360, "height": 780}},
                                      color_scheme=scheme)
        loopback_only(context)
        page = context.new_page()
        sign_in_browser(page, server.url, sub="names-phone")
        for name, path in (("list", "/studies"), ("study", f"/studies/{study}")):
            page.goto(server.url + path)
            text = page.locator("main").inner_text()
            assert "Prof. Dr. Hubert Blaine Wolfeschlegelsteinhausenbergerdorff, MD" in text
            assert "^" not in text
            assert page.evaluate("document.documentElement.scrollWidth") <= 360, name
            results = Axe().run(page, options={"runOnly": {"type": "tag", "values": [
                "wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}})
            assert [(v["id"], [n["target"] for n in v["nodes"]][:3])
                    for v in results.response["violations"]
                    if v["impact"] in ("serious", "critical")] == [], name
            shot(page, f"names-{name}-{scheme}")
        context.close()
