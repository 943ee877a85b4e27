"""Security review of share links: attacks and patient paths that the first tests missed."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from flask import Flask
from pydicom.uid import generate_uid

from portal.access.grants import create_grant
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.db import utcnow
from portal.reports.service import IncomingReport, receive_report
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    add_person,
    close_app,
    csrf_of,
    make_app,
    signed_in,
)
from tests.factories import make_instance, to_bytes
from tests.reports.test_sources import sr_document
from tests.sharing import test_delivery
from tests.sharing.conftest import World, link_row, make_share, open_link
from tests.sharing.test_delivery import _doctor_with_study as _delivery_doctor
from tests.sharing.test_delivery import _make, _send


@pytest.fixture
def portal(oidc_app: Flask) -> Flask:
    """Sign-in at the mock provider."""
    return oidc_app


def _doctor_with_study(app: Flask, idp: IdentityProvider, sub: str) -> tuple[int, str]:
    user_id = add_person(app, idp, sub, ["physician"], "Clinic", name=f"Dr {sub}")
    study = generate_uid()
    with app.app_context():
        current_archive().ingest(make_instance(study=study, patient_id="PAT-R"), who="test")
    with app.extensions["db"].write_transaction() as session:
        create_grant(session, Principal("user", 0, "setup"), user_id=user_id, study_uid=study)
    return user_id, study


def _hidden_fields(html: str, action: str = "/s/exchange") -> dict[str, str]:
    """The hidden inputs of the form that posts to ``action``, as a browser sends them."""
    form = html.split(f'action="{action}"', 1)[1].split("</form>", 1)[0]
    return dict(re.findall(r'<input type="hidden" name="([^"]+)"[^>]*value="([^"]*)"', form))


# -- a colleague who is already signed in opens a link -------------------------------------

def test_signed_in_colleague_can_open_and_close_a_link(portal: Flask,
                                                       idp: IdentityProvider) -> None:
    """The landing and shared pages' forms carry the CSRF token when a portal session exists:
    a physician who is signed in (the usual case on his phone) can open a link and close it."""
    _user_id, study = _doctor_with_study(portal, idp, "cameron")
    sender = signed_in(portal, idp, "cameron")
    made = sender.post("/api/shares", json={"study_uid": study, "audience": "physician",
                                            "pin": False},
                       headers={"X-CSRF-Token": csrf_of(sender)}).get_json()
    token = made["link"].split("#", 1)[1]
    add_person(portal, idp, "foreman", ["physician"], "Other clinic", name="Dr Foreman")
    colleague = signed_in(portal, idp, "foreman")
    # The browser submits the landing page's form as it is (the script fills in the token).
    landing = colleague.get("/s")
    assert landing.status_code == 200
    opened = colleague.post("/s/exchange", data={**_hidden_fields(landing.get_data(
        as_text=True)), "token": token, "pin": ""})
    assert opened.status_code == 303, opened.get_data(as_text=True)[:300]
    page = colleague.get(f"/studies/{study}")
    assert page.status_code == 200
    closed = colleague.post("/shared/close", data=_hidden_fields(
        page.get_data(as_text=True), "/shared/close"))
    assert closed.status_code == 303, closed.get_data(as_text=True)[:300]
    # Back to his own account.
    assert colleague.get("/studies").status_code == 200


def test_landing_page_makes_no_session_for_anonymous_visitors(app: Flask) -> None:
    """The CSRF field must not give preview bots a server-side session (no side effects)."""
    page = app.test_client().get("/s")
    assert page.status_code == 200
    assert "Set-Cookie" not in page.headers
    assert 'name="csrf_token"' not in page.get_data(as_text=True)


# -- report release rules reach the DICOM report objects too --------------------------------

def test_patient_visitor_cannot_read_an_unreleased_sr_through_dicomweb(app: Flask,
                                                                       world: World) -> None:
    """An unverified SR (a preliminary report) in the shared study is hidden from the report
    card; its text must not come out of /metadata or QIDO either."""
    with app.app_context():
        unverified = pydicom.dcmread(io.BytesIO(sr_document(world.study, "", verified=False)))
        unverified.PatientID = "PAT-1"
        current_archive().ingest(to_bytes(unverified), who="test")
    made = make_share(world)
    client = app.test_client()
    assert open_link(client, made.token, made.pin).status_code == 303
    page = client.get(f"/studies/{world.study}").get_data(as_text=True)
    assert "No focal lesion." not in page  # the release rules hide it here
    for path in (f"/dicomweb/studies/{world.study}/metadata",
                 f"/dicomweb/studies/{world.study}/instances?includefield=all",
                 "/dicomweb/instances?includefield=all&Modality=SR"):
        answer = client.get(path)
        assert answer.status_code in (200, 204), path
        assert b"No focal lesion." not in answer.data, path
        assert b"1.2.840.10008.5.1.4.1.1.88.33" not in answer.data, path
    series = client.get(f"/dicomweb/studies/{world.study}/series").get_json()
    sr_series = [s["0020000E"]["Value"][0] for s in series
                 if s.get("00080060", {}).get("Value") == ["SR"]]
    assert sr_series
    for uid in sr_series:
        for path in (f"/dicomweb/studies/{world.study}/series/{uid}/metadata",
                     f"/dicomweb/studies/{world.study}/series?includefield=0040A730",
                     f"/dicomweb/studies?includefield=0040A730&StudyInstanceUID={world.study}"):
            assert b"No focal lesion." not in client.get(path).data, path


def _report(app: Flask, study: str, status: str, text: str, final_days_ago: int = 0) -> None:
    with app.app_context(), app.extensions["db"].write_transaction() as session:
        report, _ = receive_report(session, IncomingReport(
            source="hl7", source_id="ORD-1", status=status, study_instance_uid=study,
            findings=text, impression=text))
        if final_days_ago and report.final_at is not None:
            report.final_at = utcnow() - timedelta(days=final_days_ago)


def test_report_reopened_as_preliminary_is_not_shown_to_a_patient(app: Flask,
                                                                  world: World) -> None:
    """A final report released long ago that comes back as preliminary (reopened in the RIS)
    shows the patient neither the new preliminary text nor a 'preliminary' report."""
    _report(app, world.study, "final", "Released final text", final_days_ago=30)
    made = make_share(world)
    client = app.test_client()
    open_link(client, made.token, made.pin)
    assert "Released final text" in client.get(f"/studies/{world.study}").get_data(
        as_text=True)
    _report(app, world.study, "preliminary", "Draft not for the patient")
    page = client.get(f"/studies/{world.study}").get_data(as_text=True)
    assert "Draft not for the patient" not in page
    assert link_row(app, made.link.public_id).revoked_at is None


# -- a link and its PIN never reach the same phone ------------------------------------------

sms = test_delivery.sms  # the local SMS webhook receiver fixture


@pytest.fixture
def sms_portal(tmp_path: Path, idp: IdentityProvider,
               sms: tuple[list[dict[str, Any]], int]) -> Iterator[Flask]:
    """Sign-in and text messages through a local webhook receiver."""
    application = make_app(tmp_path / "instance", OIDC_ISSUER=idp.issuer,
                           SMS_WEBHOOK_URL=f"http://127.0.0.1:{sms[1]}/send", **OIDC_SETTINGS)
    yield application
    close_app(application)


@pytest.mark.parametrize(("pin_to", "link_to"), [("+491700000001", "+49 170 0000001"),
                                                 ("0049 170 0000001", "+491700000001")])
def test_pin_first_then_link_to_the_same_phone_is_refused(
        sms_portal: Flask, idp: IdentityProvider, sms: tuple[list[dict[str, Any]], int],
        pin_to: str, link_to: str) -> None:
    doctor, study = _delivery_doctor(sms_portal, idp)
    token, pin, public_id, _url = _make(doctor, study)
    assert _send(doctor, public_id, token=token, pin=pin, what="pin", channel="sms",
                 to=pin_to).status_code == 200
    same = _send(doctor, public_id, token=token, pin=pin, what="link", channel="sms",
                 to=link_to)
    assert same.status_code == 400 and len(sms[0]) == 1
    assert _send(doctor, public_id, token=token, pin=pin, what="link", channel="sms",
                 to="+491700000002").status_code == 200


# -- the report PDF button on a shared study page ---------------------------------------------

def test_report_pdf_for_share_visitors_follows_the_download_permission(app: Flask,
                                                                       world: World) -> None:
    """The report card's PDF button works for a link with the download permission (under
    the release rules) and is not offered, and refused, on a view-only link."""
    _report(app, world.study, "final", "Released final text", final_days_ago=30)
    downloads = make_share(world, can_download=True)
    client = app.test_client()
    open_link(client, downloads.token, downloads.pin)
    page = client.get(f"/studies/{world.study}").get_data(as_text=True)
    pdf_path = re.search(r'href="(/studies/[^"]+/reports/\d+\.pdf)"', page)
    assert pdf_path is not None
    pdf = client.get(pdf_path.group(1))
    assert pdf.status_code == 200 and pdf.data.startswith(b"%PDF-")
    view_only = make_share(world, can_download=False)
    viewer = app.test_client()
    open_link(viewer, view_only.token, view_only.pin)
    page = viewer.get(f"/studies/{world.study}").get_data(as_text=True)
    assert "Released final text" in page and ".pdf" not in page
    assert viewer.get(pdf_path.group(1)).status_code == 403
    # A draft is not released as a PDF either.
    _report(app, world.study, "preliminary", "Draft not for the patient")
    assert client.get(pdf_path.group(1)).status_code == 404
