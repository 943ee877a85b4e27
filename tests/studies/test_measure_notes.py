"""Key images and notes carried by a share link (issue 20 item 5): a physician marks key images
(a Key Object Selection document made with highdicom, stored in the study, pydicom reads it)
and writes a note for the patient; the visitor of the link sees the note and the marked images
before the report, in plain words. Strangers and visitors cannot mark."""

from __future__ import annotations

import io

from flask.testing import FlaskClient
from pydicom import dcmread
from sqlalchemy import select

from portal.access.models import User
from portal.access.principal import user_principal
from portal.archive import current_archive
from portal.sharing import service
from portal.sharing.routes import share_policy
from tests.browser import PHONES, chromium, loopback_only, phone
from tests.conftest import IdentityProvider, LiveServer, csrf_of, signed_in
from tests.factories import make_dataset, to_bytes
from tests.studies.support import shot
from tests.studies.test_measure import Site, site  # noqa: F401 - the fixture

KO = "1.2.840.10008.5.1.4.1.1.88.59"


def _mark(client: FlaskClient, study: str, sop: str) -> object:
    return client.post(f"/studies/{study}/key-images", json={"sop": sop},
                       headers={"X-CSRF-Token": csrf_of(client)})


def test_marked_key_images_and_the_note_reach_the_visitor_first(site: Site,  # noqa: F811
                                                                idp: IdentityProvider) -> None:
    with site.app.app_context():
        second = make_dataset(study=site.study, series=site.series, rows=64, columns=64,
                              InstanceNumber=2)
        current_archive().ingest(to_bytes(second), who="test")
    doctor = signed_in(site.app, idp, "measure-doc")
    first = _mark(doctor, site.study, site.sop)
    assert first.status_code == 201, first.data  # type: ignore[attr-defined]
    again = _mark(doctor, site.study, str(second.SOPInstanceUID))
    assert again.get_json()["flagged"] == [site.sop, str(second.SOPInstanceUID)]  # type: ignore[attr-defined]
    with site.app.app_context():
        ds = dcmread(io.BytesIO(current_archive().read(again.get_json()["sop"])))  # type: ignore[attr-defined]
    assert ds.SOPClassUID == KO and ds.StudyInstanceUID == site.study
    assert ds.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
    evidence = [r.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence]
    assert sorted(evidence) == sorted([site.sop, str(second.SOPInstanceUID)])
    page = doctor.get(f"/studies/{site.study}").get_data(as_text=True)
    assert "Key images" in page and f"image={second.SOPInstanceUID}" in page
    # The physician: report first (the section's heading; the page's script words name it too).
    assert page.index('id="report"') < page.index('id="key-heading"')
    # The share form asks for the note; a link made with one carries it to the patient.
    form = doctor.get(f"/studies/{site.study}/share").get_data(as_text=True)
    assert 'name="message"' in form
    note = "Dear Jane,\nthe marked pictures show the healed fracture. <b>No</b> worry."
    with site.app.test_request_context(), \
            site.app.extensions["db"].write_transaction() as session:
        user = session.scalars(select(User).where(User.subject == "measure-doc")).one()
        made = service.create_share(session, user_principal(user, "session"), share_policy(),
                                    study_uid=site.study, message=note)
        token, pin = made.token, made.pin
    visitor = site.app.test_client()
    assert visitor.post("/s/exchange", data={"token": token, "pin": pin or ""}).status_code == 303
    seen = visitor.get(f"/studies/{site.study}").get_data(as_text=True)
    assert "A note from Gregory House" in seen
    assert "the marked pictures show the healed fracture. &lt;b&gt;No&lt;/b&gt; worry." in seen
    assert "Pictures your doctor marked" in seen  # plain words for a patient
    assert seen.index("A note from") < seen.index('id="key-heading"') < seen.index('id="report"')
    # Visitors and strangers cannot mark; a bad image is a 400 with the reason.
    assert visitor.post(f"/studies/{site.study}/key-images",
                        json={"sop": site.sop}).status_code == 404
    stranger = signed_in(site.app, idp, "stranger-doc")
    assert _mark(stranger, site.study, site.sop).status_code == 404  # type: ignore[attr-defined]
    refused = _mark(doctor, site.study, site.dx_sop)
    assert refused.status_code == 400 and b"no such image" in refused.data  # type: ignore[attr-defined]


def test_a_link_without_a_note_shows_none(site: Site) -> None:  # noqa: F811
    with site.app.test_request_context(), \
            site.app.extensions["db"].write_transaction() as session:
        user = session.scalars(select(User).where(User.subject == "measure-doc")).one()
        made = service.create_share(session, user_principal(user, "session"), share_policy(),
                                    study_uid=site.study)
        token, pin = made.token, made.pin
    visitor = site.app.test_client()
    assert visitor.post("/s/exchange", data={"token": token, "pin": pin or ""}).status_code == 303
    seen = visitor.get(f"/studies/{site.study}").get_data(as_text=True)
    assert "A note" not in seen


def test_the_visitor_reads_the_note_on_a_phone(site: Site) -> None:  # noqa: F811
    from axe_playwright_python.sync_playwright import Axe

    note = "Dear Jane,\nthe pictures I marked show the healed fracture. No need to worry."
    with site.app.test_request_context(), \
            site.app.extensions["db"].write_transaction() as session:
        user = session.scalars(select(User).where(User.subject == "measure-doc")).one()
        made = service.create_share(session, user_principal(user, "session"), share_policy(),
                                    study_uid=site.study, message=note)
        token, pin = made.token, made.pin
    with LiveServer(site.app) as server, chromium() as (playwright, browser):
        for device in PHONES:
            context = browser.new_context(**phone(playwright, device))
            loopback_only(context)
            opened = context.request.post(f"{server.url}/s/exchange",
                                          form={"token": token, "pin": pin or ""},
                                          max_redirects=0)
            assert opened.status == 303
            page = context.new_page()
            page.goto(f"{server.url}/studies/{site.study}")
            heading = page.get_by_role("heading", name="A note from Gregory House")
            assert heading.is_visible()
            assert page.locator(".note-text").inner_text() == note
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            for scheme in ("light", "dark"):
                page.emulate_media(color_scheme=scheme)
                results = Axe().run(page, options={"runOnly": {"type": "tag", "values": [
                    "wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}})
                bad = [v["id"] for v in results.response["violations"]
                       if v["impact"] in ("serious", "critical")]
                assert bad == [], (device, scheme, bad)
                shot(page, f"note-{device.replace(' ', '_')}-{scheme}")
            context.close()
