"""Reports can never land on the wrong patient (issue 18 item 1), with the real senders: HL7
ORU^R01 through the PyPI ``hl7`` package's MLLP client (another process) and FHIR R4
DiagnosticReports built and read back with ``fhir.resources``.

A report is matched on its study AND its patient: another patient's identifier (PID-3, with
its assigning authority) or name (PID-5, folded) gets AE / 422 with the reason, a security
alert, and nothing stored. A retransmitted message (same MSH-10) is acknowledged but not
applied twice, and a version made before the stored one never replaces it. A cancelled
report stays visible in FHIR with its status.
"""

from __future__ import annotations

import base64
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.operationoutcome import OperationOutcome
from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import select

from portal.access.grants import link_identifier
from portal.access.models import AuditEvent
from portal.archive import current_archive
from portal.reports.models import Report, ReportVersion
from tests.conftest import IdentityProvider, add_person, basic_auth, make_client, signed_in
from tests.factories import make_dataset, to_bytes
from tests.reports.test_hl7 import ADMIN, Ris, msa, people, segment, send
from tests.reports.test_hl7 import ris as ris

CR = "\r"


def oru(accession: str, status: str, impression: str, *, control: str = "",
        pid3: str = "P-R^^^HOSP^MR", name: str = "Roe^Richard",
        made: str = "20260301101000", study_uid: str = "") -> str:
    """An ORU^R01 from RIS: ``pid3`` and ``name`` as PID-3 and PID-5, ``made`` as OBR-22."""
    control = control or generate_uid()[-12:]
    segments = [f"MSH|^~\\&|RIS|HOSP|PORTAL|HOSP|20260301101500||ORU^R01|{control}|P|2.5.1",
                f"PID|||{pid3}||{name}||19600101|M",
                segment("OBR", {1: "1", 2: f"PL{accession}", 3: f"FI{accession}",
                                4: "CTCHEST^CT chest^L", 7: "20260301100000",
                                16: "^House^Gregory", 18: accession, 22: made, 24: "CT",
                                25: status, 32: "1234^Chase^Robert"})]
    if study_uid:
        segments.append(f"ZDS|{study_uid}^HOSP^Application^DICOM")
    segments.append(f"OBX|1|TX|&IMP||{impression}||||||{status}")
    return CR.join(segments) + CR


def store_study(app: Flask, accession: str, patient: str = "P-R", name: str = "Roe^Richard",
                issuer: str = "HOSP") -> str:
    """One CT study of ``patient`` (issuer ``issuer``) referred by Wilson^James."""
    study = generate_uid()
    ds = make_dataset(study=study, patient_id=patient, patient_name=name,
                      AccessionNumber=accession, ReferringPhysicianName="Wilson^James",
                      IssuerOfPatientID=issuer)
    with app.app_context():
        current_archive().ingest(to_bytes(ds), who="test")
    return study


def reports_of(app: Flask, accession: str) -> list[tuple[Report, list[ReportVersion]]]:
    """The stored reports with this accession number and their versions."""
    with app.extensions["db"].new_session() as session:
        found = session.scalars(select(Report).where(Report.accession_number == accession))
        return [(r, list(r.versions)) for r in found]


def alerts(app: Flask, study: str) -> list[AuditEvent]:
    """Security alerts about reports refused for another patient, naming this study."""
    with app.extensions["db"].new_session() as session:
        return [e for e in session.scalars(select(AuditEvent).where(
            AuditEvent.event_id == "110113", AuditEvent.study_instance_uid == study))
            if e.details.get("type") == "report for another patient"]


# -- HL7 ----------------------------------------------------------------------------------------

def test_an_oru_naming_another_patient_is_refused_and_alerted(ris: Ris,
                                                             idp: IdentityProvider) -> None:
    """WRONG-PID / Other^Patient on a known accession: AE, an alert, the report unchanged."""
    app = ris.app
    subjects = people(app, idp)
    accession = "W" + generate_uid()[-8:]
    study = store_study(app, accession)
    (first,) = send(ris.port, oru(accession, "F", "Right patient's report."))
    assert msa(first) == ("AA", "")
    wrong = send(ris.port,
                 oru(accession, "C", "Wrong patient A.", pid3="WRONG-PID^^^HOSP^MR",
                     name="Other^Patient"),
                 oru(accession, "C", "Wrong patient B.", name="Other^Patient"),
                 oru(accession, "C", "Wrong patient C.", pid3="P-R^^^ELSEWHERE^MR"))
    for ack in wrong:
        code, text = msa(ack)
        assert code == "AE" and "another patient" in text, ack
    ((report, versions),) = reports_of(app, accession)
    assert report.version == 1 and report.patient_id == "P-R"
    assert [v.impression for v in versions] == ["Right patient's report."]
    assert len(alerts(app, study)) == 3
    assert {a.patient_id for a in alerts(app, study)} == {"P-R"}
    # A new report (another order number) for another patient naming the accession.
    other = oru(accession, "F", "Lands nowhere.", pid3="WRONG-PID^^^HOSP^MR",
                name="Other^Patient").replace(f"FI{accession}", f"FX{accession}")
    (ack,) = send(ris.port, other)
    assert msa(ack)[0] == "AE"
    assert len(reports_of(app, accession)) == 1
    page = signed_in(app, idp, subjects["doctor"]).get(f"/studies/{study}").get_data(
        as_text=True)
    assert "Right patient" in page and "Wrong patient" not in page and "Lands nowhere" \
        not in page


def test_pid3_repetitions_names_with_accents_and_a_missing_pid3(ris: Ris) -> None:
    """Any PID-3 repetition may carry the study's Patient ID; names compare folded (case,
    accents, order, a missing middle name); a name without any PID-3 is refused."""
    app = ris.app
    accession = "X" + generate_uid()[-8:]
    study = store_study(app, accession, name="Müller^Hans^Peter")
    (ack,) = send(ris.port, oru(accession, "F", "Named twice.",
                                pid3="123-45-6789^^^SSA^SS~P-R^^^HOSP^MR",
                                name="MULLER^hans"))
    assert msa(ack) == ("AA", ""), ack
    ((report, _),) = reports_of(app, accession)
    assert report.patient_id == "P-R"
    (ack,) = send(ris.port, oru(accession, "C", "No identifier.", pid3="",
                                name="Müller^Hans^Peter"))
    code, text = msa(ack)
    assert code == "AE" and "PID-3" in text
    (ack,) = send(ris.port, oru(accession, "C", "Study UID of another accession.",
                                study_uid=store_study(app, "Y" + accession)))
    assert msa(ack)[0] == "AE"  # the study named by UID has another accession number
    assert reports_of(app, accession)[0][0].version == 1
    assert alerts(app, study) == []  # refusals for a missing identifier are not alerts


def test_a_report_before_its_images_shows_only_on_its_patients_study(
        ris: Ris, idp: IdentityProvider) -> None:
    """A report kept while its study is missing does not attach to a study of another
    patient that arrives with its study UID."""
    app = ris.app
    subjects = people(app, idp)
    accession, uid = "E" + generate_uid()[-8:], generate_uid()
    (ack,) = send(ris.port, oru(accession, "F", "Early report.", study_uid=uid))
    assert msa(ack)[0] == "AA"
    ds = make_dataset(study=uid, patient_id="P-OTHER", patient_name="Other^Patient",
                      AccessionNumber=accession, ReferringPhysicianName="Wilson^James")
    with app.app_context():
        current_archive().ingest(to_bytes(ds), who="test")
    page = signed_in(app, idp, subjects["doctor"]).get(f"/studies/{uid}").get_data(
        as_text=True)
    assert "Early report." not in page


def test_a_retransmitted_or_older_message_never_replaces_a_correction(ris: Ris) -> None:
    """The first message again (same MSH-10) after a correction is acknowledged but changes
    nothing; so does a message made (OBR-22) before the stored version."""
    app = ris.app
    accession = "R" + generate_uid()[-8:]
    store_study(app, accession)
    first = oru(accession, "F", "Nodule 6 mm.", control="MSG-1-" + accession)
    correction = oru(accession, "C", "Nodule 8 mm (corrected).", made="20260301111500",
                     control="MSG-2-" + accession)
    acks = send(ris.port, first, correction, first)
    assert [msa(a) for a in acks] == [("AA", ""), ("AA", ""), ("AA", "already received")]
    late = oru(accession, "F", "Nodule 7 mm (an older draft).", made="20260301104500")
    (ack,) = send(ris.port, late)
    assert msa(ack)[0] == "AA" and "newer version" in msa(ack)[1]
    ((report, versions),) = reports_of(app, accession)
    assert report.version == 2 and report.impression == "Nodule 8 mm (corrected)."
    assert [(v.status, v.message_id) for v in versions] == [
        ("final", "MSG-1-" + accession), ("amended", "MSG-2-" + accession)]
    # A newer version still gets in.
    (ack,) = send(ris.port, oru(accession, "C", "Nodule 9 mm.", made="20260301120000"))
    assert msa(ack) == ("AA", "")
    assert reports_of(app, accession)[0][0].version == 3


# -- FHIR ---------------------------------------------------------------------------------------

def diagnostic_report(study: str, accession: str, status: str, conclusion: str,
                      subject: dict[str, Any] | None, issued: str) -> dict[str, Any]:
    """A DiagnosticReport as a RIS sends it, validated by fhir.resources."""
    body: dict[str, Any] = {
        "resourceType": "DiagnosticReport", "status": status,
        "identifier": [{"system": "urn:ris:report", "value": f"R-{accession}"},
                       {"type": {"coding": [{"system": "http://terminology.hl7.org/"
                                             "CodeSystem/v2-0203", "code": "ACSN"}]},
                        "value": accession}],
        "code": {"text": "CT abdomen"},
        "imagingStudy": [{"reference": f"ImagingStudy/{study}"}],
        "issued": issued}
    if conclusion:  # a cancellation carries no text
        body["conclusion"] = conclusion
        body["presentedForm"] = [{"contentType": "text/plain", "data": base64.b64encode(
            conclusion.encode()).decode()}]
    if subject is not None:
        body["subject"] = subject
    return DiagnosticReport.model_validate(body).model_dump(mode="json")


def doctor(app: Flask, idp: IdentityProvider) -> str:
    """A physician who referred the studies (Wilson^James)."""
    subject = "wilson-" + generate_uid()[-8:]
    user = add_person(app, idp, subject, ["physician"])
    with app.extensions["db"].write_transaction() as session:
        link_identifier(session, ADMIN, user, "Wilson^James")
    return subject


def test_a_fhir_report_whose_subject_is_another_patient_is_refused(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    """422 with the reason (an OperationOutcome), a security alert, nothing stored or served."""
    accession = "FW" + generate_uid()[-6:]
    study = store_study(oidc_app, accession, patient="P-F", name="Fhir^Fiona")
    ris = {**basic_auth(*make_client(oidc_app, "ris", can_read=False, can_store=True)),
           "Content-Type": "application/fhir+json"}
    client = oidc_app.test_client()
    issued = "2026-03-01T12:00:00+00:00"
    for subject, reason in (
            ({"identifier": {"value": "WRONG-PID"}, "display": "Other Patient"},
             "another patient"),
            ({"identifier": {"value": "P-F"}, "display": "Other Patient"}, "another patient"),
            ({"identifier": {"value": "P-F", "assigner": {"display": "ELSEWHERE"}}},
             "another patient"),
            ({"reference": "Patient/123"}, "subject.identifier"),
            (None, "subject.identifier")):
        answer = client.post("/fhir/DiagnosticReport", headers=ris, json=diagnostic_report(
            study, accession, "final", "Wrong patient's text.", subject, issued))
        assert answer.status_code == 422, answer.data
        outcome = OperationOutcome.model_validate(answer.get_json())
        assert reason in outcome.issue[0].diagnostics
    assert reports_of(oidc_app, accession) == []
    assert len(alerts(oidc_app, study)) == 3
    browser = signed_in(oidc_app, idp, doctor(oidc_app, idp))
    bundle = Bundle.model_validate(browser.get(f"/fhir/DiagnosticReport?study={study}")
                                   .get_json())
    assert bundle.total == 0
    # The right patient, named as people write it, gets in.
    right = client.post("/fhir/DiagnosticReport", headers=ris, json=diagnostic_report(
        study, accession, "final", "Right text.",
        {"identifier": {"value": "P-F", "assigner": {"display": "hosp"}},
         "display": "Fiona Fhir"}, issued))
    assert right.status_code == 201, right.data


def test_a_cancelled_report_stays_in_fhir_with_its_status(oidc_app: Flask,
                                                          idp: IdentityProvider) -> None:
    """A final report withdrawn later is entered-in-error, one never final is cancelled; an
    older version sent late does not bring either back."""
    accession = "FC" + generate_uid()[-6:]
    study = store_study(oidc_app, accession, patient="P-F", name="Fhir^Fiona")
    ris = {**basic_auth(*make_client(oidc_app, "ris-c", can_read=False, can_store=True)),
           "Content-Type": "application/fhir+json"}
    client = oidc_app.test_client()
    subject = {"identifier": {"value": "P-F"}}

    def post(status: str, text: str, issued: str, number: str = "") -> int:
        body = diagnostic_report(study, accession, status, text, subject, issued)
        if number:
            body["identifier"][0]["value"] = number
        answer = client.post("/fhir/DiagnosticReport", headers=ris, json=body)
        assert answer.status_code in (200, 201), answer.data
        return int(answer.status_code)

    post("final", "Released text.", "2026-03-01T12:00:00+00:00")
    post("entered-in-error", "", "2026-03-01T13:00:00+00:00")
    post("final", "Released text.", "2026-03-01T12:00:00+00:00")  # late: not applied
    post("preliminary", "Draft.", "2026-03-01T12:00:00+00:00", number="DRAFT-" + accession)
    post("cancelled", "", "2026-03-01T12:30:00+00:00", number="DRAFT-" + accession)
    browser = signed_in(oidc_app, idp, doctor(oidc_app, idp))
    bundle = Bundle.model_validate(browser.get(f"/fhir/DiagnosticReport?study={study}")
                                   .get_json())
    statuses = sorted(entry.resource.status for entry in bundle.entry)
    assert statuses == ["cancelled", "entered-in-error"]
    withdrawn = next(e.resource for e in bundle.entry if e.resource.status == "entered-in-error")
    read = browser.get(f"/fhir/DiagnosticReport/{withdrawn.id}")
    assert read.status_code == 200
    back = DiagnosticReport.model_validate(read.get_json())
    assert back.status == "entered-in-error" and back.conclusion is None
    assert not any(f.contentType == "application/pdf" for f in back.presentedForm or [])
