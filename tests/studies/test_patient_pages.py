"""Issue 13 item 8: a signed-in patient gets his own pages, in plain words: his scans (no
modality filter, no "New reports only"), his final reports, his appointments (from SIU),
who opened his images (only records about his own studies), and a "Share with a doctor"
button that makes a link under the same rules as a physician's (PIN, expiry, revocation,
audit). The home page names no DICOM service. Debian Chromium, iPhone 13 and Pixel 7, light
and dark."""

from __future__ import annotations

import re
from typing import Any

import pytest
from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import select

from portal import audit
from portal.access.grants import create_grant, link_patient
from portal.access.models import AuditEvent, User
from portal.access.principal import user_principal
from portal.archive import current_archive
from portal.sharing.models import ShareLink
from tests.browser import PHONES, chromium, loopback_only, phone
from tests.conftest import IdentityProvider, LiveServer, csrf_of, signed_in
from tests.factories import make_dataset, to_bytes
from tests.reports.test_hl7 import ADMIN, Ris, msa, people, send, siu, store_study
from tests.reports.test_hl7 import ris as ris
from tests.sharing.conftest import open_link
from tests.studies.support import shot, sign_in_browser
from tests.studies.test_report_first import ZONE, page_problems, signed_oru

# Words a patient should not have to know (issue 13 item 8).
JARGON = re.compile(r"\b(modality|modalities|accession|dicom\w*|series|stow|qido|wado)\b", re.I)


def _patient_world(app: Flask, idp: IdentityProvider, ris_port: int) -> dict[str, Any]:
    """Patient P-R with a CT (final report) and an X-ray, an appointment from SIU, and a
    physician who opened the CT and another patient's study."""
    subjects = people(app, idp)
    accession = "M" + generate_uid()[-8:]
    ct = store_study(app, accession)
    xray = generate_uid()
    with app.app_context():
        current_archive().ingest(to_bytes(make_dataset(
            study=xray, patient_id="P-R", patient_name="Roe^Richard", modality="DX",
            AccessionNumber="X" + accession, StudyDescription="Chest X-ray",
            StudyDate="20250101")), who="test")
    other = store_study(app, "O" + accession, patient="P-OTHER")
    with app.extensions["db"].write_transaction() as session:
        patient_id = session.scalars(select(User.id).where(
            User.subject == subjects["patient"])).one()
        link_patient(session, ADMIN, patient_id, "P-R")
    acks = send(ris_port, signed_oru(accession, "Nothing to worry about.", "Lungs are clear."),
                     siu("N" + accession, "S12", "203001151030"))
    assert [msa(a)[0] for a in acks] == ["AA", "AA"]
    doctor = signed_in(app, idp, subjects["doctor"])
    assert doctor.get(f"/studies/{ct}").status_code == 200
    return {"subjects": subjects, "ct": ct, "xray": xray, "other": other,
            "accession": accession, "patient_id": patient_id}


@pytest.fixture
def world(ris: Ris, idp: IdentityProvider) -> dict[str, Any]:
    """The patient's world on the RIS-connected app."""
    return _patient_world(ris.app, idp, ris.port)


def test_appointments_of_another_hospitals_patient_with_his_id_stay_hidden(
        ris: Ris, idp: IdentityProvider, world: dict[str, Any]) -> None:
    """Orders keep no issuer: a RIS appointment for "P-R" at another hospital, naming
    another person, is not his, though his own appointment still shows."""
    stranger = siu("Z" + world["accession"], "S12", "203002011200").replace(
        "PID|||P-R^^^HOSP^MR||Roe^Richard", "PID|||P-R^^^OTHERHOSP^MR||Stranger^Sam").replace(
        "CTCHEST^CT chest", "MRKNEE^MR knee")
    assert [msa(a)[0] for a in send(ris.port, stranger)] == ["AA"]
    page = signed_in(ris.app, idp, world["subjects"]["patient"]).get(
        "/my/appointments").get_data(as_text=True)
    assert "CT chest" in page and "MR knee" not in page


def test_patient_sees_only_records_about_his_own_studies_and_shares_with_a_doctor(
        ris: Ris, idp: IdentityProvider, world: dict[str, Any]) -> None:
    from portal.studies.patients import image_openings

    app = ris.app
    subjects = world["subjects"]
    # The physician also opened another patient's study: that is not the patient's business.
    other_doctor = signed_in(app, idp, subjects["doctor"])
    with app.extensions["db"].write_transaction() as session:
        doctor_id = session.scalars(select(User.id).where(
            User.subject == subjects["doctor"])).one()
        create_grant(session, ADMIN, user_id=doctor_id, study_uid=world["other"])
    assert other_doctor.get(f"/studies/{world['other']}").status_code == 200
    with app.test_request_context(), app.extensions["db"].new_session() as session:
        patient = user_principal(session.get(User, world["patient_id"]), "session")
        rows = image_openings(session, patient)
        uids = {e.study_instance_uid for e in session.scalars(select(AuditEvent))}
    assert world["other"] in uids  # recorded, but not shown to this patient
    assert rows and all(r.scan in ("CT scan", "X-ray") for r in rows)
    assert any(r.who == subjects["doctor"] and r.what == "looked at your images" for r in rows)

    patient_client = signed_in(app, idp, subjects["patient"])
    page = patient_client.get("/my/openings").get_data(as_text=True)
    assert subjects["doctor"] in page and world["other"] not in page
    for path in ("/my/reports", "/my/appointments", "/my/openings", "/my/links"):
        assert signed_in(app, idp, subjects["doctor"]).get(path).status_code == 404, path

    # He shares his own CT with a doctor: a view link with a PIN, audited as any link.
    token = csrf_of(patient_client)
    made = patient_client.post(f"/studies/{world['ct']}/share", data={
        "csrf_token": token, "audience": "physician", "scope": "study", "days": "3",
        "pin": "on"})
    assert made.status_code == 201, made.get_data(as_text=True)[:500]
    html = made.get_data(as_text=True)
    link_token = re.search(r'id="share-url"[^>]*value="[^"#]*#([^"]+)"', html).group(1)
    pin = re.search(r'id="share-pin">(\d+)<', html).group(1)
    visitor = app.test_client()
    assert open_link(visitor, link_token, "000000" if pin != "000000" else "111111"
                     ).status_code == 401  # wrong PIN: counted, as for any link
    assert open_link(visitor, link_token, pin).status_code == 303
    assert visitor.get(f"/studies/{world['ct']}").status_code == 200
    assert visitor.get(f"/studies/{world['xray']}").status_code == 404  # only what he chose
    # Not for another patient's study, not for a patient, not a sign-in link.
    for study, form in ((world["other"], {}), (world["ct"], {"audience": "patient"}),
                        (world["ct"], {"colleague": "sign_in"})):
        refused = patient_client.post(f"/studies/{study}/share", data={
            "csrf_token": token, "audience": "physician", "scope": "study", "days": "3",
            **form})
        assert refused.status_code in (302, 404), (study, form)
    with app.extensions["db"].new_session() as session:
        links = session.scalars(select(ShareLink).where(
            ShareLink.created_by_fk == world["patient_id"])).all()
        assert len(links) == 1 and links[0].audience == "physician"
        assert not links[0].requires_sign_in and links[0].pin_hash
        created = session.scalars(select(AuditEvent).where(
            AuditEvent.event_id == audit.SECURITY_ALERT[0],
            AuditEvent.study_instance_uid == world["ct"])).all()
        assert any((e.details or {}).get("share") == links[0].public_id for e in created)
        public_id = links[0].public_id
    # Who opened my images now names the doctor he shared with; he then stops the link.
    page = patient_client.get("/my/openings").get_data(as_text=True)
    assert "The doctor you shared your images with" in page
    stopped = patient_client.post(f"/shares/{public_id}/revoke", data={"csrf_token": token},
                                  headers={"Referer": "http://localhost/my/links"})
    assert stopped.status_code == 302 and stopped.headers["Location"].endswith("/my/links")
    assert visitor.get(f"/studies/{world['ct']}").status_code == 401
    # A physician may not manage the patient's link.
    assert signed_in(app, idp, subjects["other"]).get(f"/shares/{public_id}").status_code \
        == 404


@pytest.mark.parametrize("scheme", ("light", "dark"))
@pytest.mark.parametrize("device", PHONES)
def test_patient_pages_on_a_phone(ris: Ris, idp: IdentityProvider, world: dict[str, Any],
                                  device: str, scheme: str) -> None:
    app = ris.app
    subjects = world["subjects"]
    name = f"{device.replace(' ', '_')}-{scheme}"
    with LiveServer(app) as server, chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, device), color_scheme=scheme,
                                      timezone_id=ZONE, locale="en-US")
        loopback_only(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        width = page.viewport_size["width"]

        def check(label: str) -> str:
            text = page.locator("main").inner_text()
            assert JARGON.findall(text) == [], (label, JARGON.findall(text))
            assert page_problems(page, width) == [], label
            shot(page, f"patient-{label}-{name}")
            return text

        sign_in_browser(page, server.url, subjects["patient"])
        # His scans: plain words, no search by modality, no "New reports only".
        page.locator("#my-scans").wait_for()
        text = check("scans")
        assert page.locator("h1").inner_text() == "My scans"
        assert "CT scan" in text and "X-ray" in text
        assert page.locator("select[name=modality]").count() == 0
        assert "New reports only" not in text
        nav = page.locator("nav.nav").inner_text()
        assert "Reports" in nav and "Appointments" in nav and "Orders" not in nav

        # The home page names no DICOM service.
        page.goto(server.url + "/")
        assert "STOW" not in page.content() and "DICOMweb" not in page.content()
        check("home")

        # A scan: the report, plain words, and a Share button that leads to a real form.
        page.goto(f"{server.url}/studies/{world['ct']}")
        page.locator("#report .impression").wait_for()
        text = check("scan")
        assert "Nothing to worry about." in text
        page.get_by_role("link", name="Share with a doctor").click()
        page.locator("#patient-share").wait_for()
        text = check("share")
        assert "Only physicians" not in text

        # His reports and his appointment (10:30 UTC on 15 January is 05:30 in New York).
        page.goto(f"{server.url}/my/reports")
        assert "Nothing to worry about." in check("reports")
        page.goto(f"{server.url}/my/appointments")
        when = page.locator("#appointments time")
        page.wait_for_function("() => document.querySelector('#appointments time')"
                               ".textContent.indexOf('UTC') < 0")
        assert "05:30" in when.inner_text() and "Jan" in when.inner_text()
        assert "Booked" in check("appointments")
        page.goto(f"{server.url}/my/openings")
        assert subjects["doctor"] in check("openings")
        page.goto(f"{server.url}/my/links")
        check("links")
        assert errors == []
        context.close()
