"""Reports from the archive (DICOM SR, Encapsulated PDF) and from FHIR R4 (DiagnosticReport
built and checked with the PyPI ``fhir.resources`` models), shown only to who may read them."""

from __future__ import annotations

import base64

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from flask import Flask
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from portal.access.grants import link_identifier
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.reports.pdf import report_pdf
from tests.conftest import IdentityProvider, add_person, basic_auth, make_client, signed_in
from tests.factories import make_dataset, to_bytes

ADMIN = Principal("user", 0, "test", roles=frozenset({"office_manager"}), issuer="test",
                  subject="setup")


def _code(value: str, meaning: str, scheme: str = "DCM") -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _item(kind: str, meaning: str, **values: object) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = kind
    item.ConceptNameCodeSequence = Sequence([_code("1", meaning)])
    for key, value in values.items():
        setattr(item, key, value)
    return item


def _document(study: str, accession: str, sop_class: str, patient_id: str = "P-S") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientID, ds.PatientName = patient_id, "Sr^Patient"
    ds.AccessionNumber, ds.StudyDate, ds.ReferringPhysicianName = accession, "20260301", \
        "Wilson^James"
    ds.SeriesNumber, ds.InstanceNumber = 99, 1
    return ds


def sr_document(study: str, accession: str, verified: bool = True,
                patient_id: str = "P-S") -> bytes:
    ds = _document(study, accession, "1.2.840.10008.5.1.4.1.1.88.33", patient_id)
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "Diagnostic imaging report",
                                                 "LN")])
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED" if verified else "UNVERIFIED"
    if verified:
        observer = Dataset()
        observer.VerifyingObserverName = "Chase^Robert"
        observer.VerificationDateTime = "20260301120000"
        observer.VerifyingOrganization = "Radiology"
        ds.VerifyingObserverSequence = Sequence([observer])
    findings = _item("CONTAINER", "Findings", ContinuityOfContent="SEPARATE")
    findings.ContentSequence = Sequence([
        _item("TEXT", "Finding", TextValue="<b>Liver</b> normal <script>x()</script>"),
        _item("NUM", "Diameter", MeasuredValueSequence=Sequence([_measured("12", "mm")]))])
    impression = _item("CONTAINER", "Impression", ContinuityOfContent="SEPARATE")
    impression.ContentSequence = Sequence([_item("TEXT", "Impression",
                                                 TextValue="No focal lesion.")])
    ds.ContentSequence = Sequence([findings, impression])
    return to_bytes(ds)


def _measured(value: str, unit: str) -> Dataset:
    measured = Dataset()
    measured.NumericValue = value
    measured.MeasurementUnitsCodeSequence = Sequence([_code(unit, unit, "UCUM")])
    return measured


def pdf_document(study: str, accession: str, pdf: bytes) -> bytes:
    ds = _document(study, accession, "1.2.840.10008.5.1.4.1.1.104.1")
    ds.Modality = "DOC"
    ds.DocumentTitle = "Outside report"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.BurnedInAnnotation = "YES"
    ds.ConceptNameCodeSequence = Sequence([])
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    return to_bytes(ds)


@pytest.fixture
def doctor(oidc_app: Flask, idp: IdentityProvider) -> str:
    subject = "wilson-" + generate_uid()[-8:]
    user = add_person(oidc_app, idp, subject, ["physician"])
    with oidc_app.extensions["db"].write_transaction() as session:
        link_identifier(session, ADMIN, user, "Wilson^James")
    return subject


def ingest(app: Flask, data: bytes) -> None:
    """Store a file as a way in does: then the after-ingest steps (SR and PDF objects become
    reports there, never when a page is read)."""
    with app.app_context():
        archive = current_archive()
        archive.after_ingest([archive.ingest(data, who="test")], via="import", who="test",
                             source_address="", wait=True)


def test_structured_report_in_the_archive_becomes_the_report_card(
        oidc_app: Flask, idp: IdentityProvider, doctor: str) -> None:
    study, accession = generate_uid(), "SR" + generate_uid()[-6:]
    ingest(oidc_app, to_bytes(make_dataset(study=study, patient_id="P-S",
                                           AccessionNumber=accession,
                                           ReferringPhysicianName="Wilson^James")))
    ingest(oidc_app, sr_document(study, accession))
    page = signed_in(oidc_app, idp, doctor).get(f"/studies/{study}").get_data(as_text=True)
    assert "No focal lesion." in page and "Diameter: 12 mm" in page
    assert "Robert Chase" in page and "Preliminary" not in page
    assert "<script>x()</script>" not in page and "&lt;b&gt;Liver&lt;/b&gt;" in page


def test_encapsulated_pdf_is_the_downloadable_report(
        oidc_app: Flask, idp: IdentityProvider, doctor: str) -> None:
    from portal.index.models import Patient, Study
    from portal.reports.models import Report

    study, accession = generate_uid(), "PDF" + generate_uid()[-6:]
    ingest(oidc_app, to_bytes(make_dataset(study=study, patient_id="P-S",
                                           AccessionNumber=accession,
                                           ReferringPhysicianName="Wilson^James")))
    original = report_pdf(Report(title="Outside", status="final", findings="From PDF",
                                 impression="", author="", version=1),
                          Study(study_date="20260301", accession_number=accession,
                                patient=Patient(patient_id="P-S", patient_name="A^B")))
    ingest(oidc_app, pdf_document(study, accession, original))
    browser = signed_in(oidc_app, idp, doctor)
    page = browser.get(f"/studies/{study}").get_data(as_text=True)
    assert "Outside report" in page
    start = page.index(f"/studies/{study}/reports/")
    url = page[start:page.index('"', start)]
    answer = browser.get(url)
    assert answer.status_code == 200 and answer.data == original
    assert answer.headers["Content-Type"] == "application/pdf"
    assert answer.headers["Content-Disposition"].startswith('inline; filename="report-')
    assert answer.headers["X-Content-Type-Options"] == "nosniff"


def fhir_report(study: str, accession: str, status: str, conclusion: str) -> dict:
    resource = DiagnosticReport.model_validate({
        "resourceType": "DiagnosticReport", "status": status,
        "identifier": [{"system": "urn:ris:report", "value": f"R-{accession}"},
                       {"type": {"coding": [{"system": "http://terminology.hl7.org/"
                                             "CodeSystem/v2-0203", "code": "ACSN"}]},
                        "value": accession}],
        "code": {"text": "CT abdomen"},
        "subject": {"identifier": {"value": "P-F"}},
        "imagingStudy": [{"reference": f"ImagingStudy/{study}"}],
        "issued": "2026-03-01T12:00:00+00:00",
        "resultsInterpreter": [{"display": "Chase^Robert"}],
        "conclusion": conclusion,
        "presentedForm": [{"contentType": "text/html", "data": base64.b64encode(
            b"<p>Liver <i>normal</i></p><script>alert(1)</script>").decode()}]})
    return resource.model_dump(mode="json")


def test_fhir_diagnostic_report_in_and_out(oidc_app: Flask, idp: IdentityProvider,
                                           doctor: str) -> None:
    study, accession = generate_uid(), "F" + generate_uid()[-7:]
    ingest(oidc_app, to_bytes(make_dataset(study=study, patient_id="P-F",
                                           AccessionNumber=accession,
                                           ReferringPhysicianName="Wilson^James")))
    ris = basic_auth(*make_client(oidc_app, "ris", can_read=False, can_store=True))
    reader = basic_auth(*make_client(oidc_app, "reader", can_read=True, can_store=False))
    client = oidc_app.test_client()
    created = client.post("/fhir/DiagnosticReport", json=fhir_report(
        study, accession, "final", "Normal CT."), headers={
        **ris, "Content-Type": "application/fhir+json"})
    assert created.status_code == 201, created.data
    back = DiagnosticReport.model_validate(created.get_json())
    assert back.status == "final" and back.conclusion == "Normal CT."
    assert created.headers["Location"].endswith(f"/fhir/DiagnosticReport/{back.id}")
    # A reader without the store right may not send; a bad resource gets an OperationOutcome.
    refused = client.post("/fhir/DiagnosticReport", json=fhir_report(
        study, accession, "final", "x"), headers=reader)
    assert refused.status_code == 403
    bad = client.post("/fhir/DiagnosticReport", json={"resourceType": "Patient"}, headers=ris)
    assert bad.status_code == 400 and bad.get_json()["resourceType"] == "OperationOutcome"
    # Read back through FHIR search as the referring physician (browser session).
    browser = signed_in(oidc_app, idp, doctor)
    bundle = Bundle.model_validate(
        browser.get("/fhir/DiagnosticReport?patient:identifier=P-F").get_json())
    assert bundle.total == 1 and bundle.entry[0].resource.conclusion == "Normal CT."
    studies = Bundle.model_validate(
        browser.get("/fhir/ImagingStudy?patient:identifier=P-F").get_json())
    assert [e.resource.id for e in studies.entry] == [study]
    page = browser.get(f"/studies/{study}").get_data(as_text=True)
    assert "Liver normal" in page and "alert(1)" not in page
    # Someone who may not see the study gets nothing.
    other = "cuddy-" + generate_uid()[-8:]
    add_person(oidc_app, idp, other, ["physician"])
    stranger = signed_in(oidc_app, idp, other)
    assert Bundle.model_validate(stranger.get("/fhir/DiagnosticReport").get_json()).total == 0
    assert stranger.get(f"/fhir/DiagnosticReport/{back.id}").status_code == 404
    # The generated PDF opens as a PDF.
    pdf = browser.get(f"/studies/{study}/reports/{back.id}.pdf")
    assert pdf.status_code == 200 and pdf.data.startswith(b"%PDF-")


def test_fhir_reports_from_a_bearer_token_need_the_report_sender_role(
        oidc_app: Flask, idp: IdentityProvider, doctor: str) -> None:
    from sqlalchemy import select

    from portal.access.models import User
    from tests.conftest import access_token

    study, accession = generate_uid(), "BT" + generate_uid()[-6:]
    ingest(oidc_app, to_bytes(make_dataset(study=study, patient_id="P-F",
                                           AccessionNumber=accession,
                                           ReferringPhysicianName="Wilson^James")))
    oidc_app.config["PORTAL"]["OIDC_ACCEPT_UNPROVEN_AUDIENCE"] = True  # no introspection
    token = access_token(oidc_app, idp, "ris-service")
    client = oidc_app.test_client()
    body = fhir_report(study, accession, "final", "From the RIS service.")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    assert client.post("/fhir/DiagnosticReport", json=body, headers=headers).status_code == 403
    with oidc_app.extensions["db"].write_transaction() as session:
        service = session.scalars(select(User).where(User.subject == "ris-service")).one()
        service.roles = ["report_sender"]
    created = client.post("/fhir/DiagnosticReport", json=body, headers=headers)
    assert created.status_code == 201, created.data
    page = signed_in(oidc_app, idp, doctor).get(f"/studies/{study}").get_data(as_text=True)
    assert "From the RIS service." in page


def test_report_objects_leave_in_a_study_zip_only_for_clinicians(
        oidc_app: Flask, idp: IdentityProvider, doctor: str) -> None:
    import io
    import zipfile

    from sqlalchemy import select

    from portal.access.grants import link_patient
    from portal.access.models import User

    study, accession = generate_uid(), "Z" + generate_uid()[-7:]
    ingest(oidc_app, to_bytes(make_dataset(study=study, patient_id="P-Z",
                                           AccessionNumber=accession,
                                           ReferringPhysicianName="Wilson^James")))
    ingest(oidc_app, sr_document(study, accession, verified=False, patient_id="P-Z"))
    patient_sub = "zip-patient-" + generate_uid()[-6:]
    add_person(oidc_app, idp, patient_sub, ["patient"])
    with oidc_app.extensions["db"].write_transaction() as session:
        user = session.scalars(select(User).where(User.subject == patient_sub)).one()
        link_patient(session, ADMIN, user.id, "P-Z")

    def members(subject: str) -> int:
        answer = signed_in(oidc_app, idp, subject).get(f"/studies/{study}/download.zip")
        assert answer.status_code == 200
        return len([n for n in zipfile.ZipFile(io.BytesIO(answer.data)).namelist()
                    if n != "DICOMDIR"])

    assert members(doctor) == 2  # the image and the draft report
    assert members(patient_sub) == 1  # the image only


def test_fhir_bodies_are_bounded(oidc_app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    from portal.fhir import routes

    monkeypatch.setattr(routes, "MAX_FHIR_BYTES", 1000)
    ris = basic_auth(*make_client(oidc_app, "ris-big", can_read=False, can_store=True))
    answer = oidc_app.test_client().post(
        "/fhir/DiagnosticReport", data=b'{"resourceType": "DiagnosticReport", "x": "'
        + b"a" * 2000 + b'"}', headers={**ris, "Content-Type": "application/fhir+json"})
    assert answer.status_code == 413
    assert answer.get_json()["issue"][0]["code"] == "too-costly"
