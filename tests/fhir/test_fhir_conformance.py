"""FHIR R4 conformance, checked with the PyPI ``fhir.resources`` models (8.x: the R4B
package, the R4-compatible one it ships; 4.3.0 differs from 4.0.1 in none of the elements the
portal emits or reads): every resource the portal emits (a walk of a seeded archive through
the CapabilityStatement's resources, following paging links) and accepts, each declared
search parameter filtering, unknown parameters refused, and OperationOutcome error bodies."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient as FhirPatient
from flask import Flask
from flask.testing import FlaskClient
from pydicom.uid import generate_uid

from portal.access.grants import link_identifier, link_patient
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.archive.validate import Rejected
from portal.index.referrers import name_key
from portal.reports.models import Report
from portal.reports.service import IncomingOrder, receive_order
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    add_person,
    basic_auth,
    close_app,
    make_app,
    make_client,
    sample_paths,
    signed_in,
)
from tests.factories import make_dataset, to_bytes

ADMIN = Principal("user", 0, "test", roles=frozenset({"office_manager"}), issuer="test",
                  subject="setup")
FHIR = "application/fhir+json"
LOINC_REPORT = "http://loinc.org|18748-4"
WILSON = name_key("Wilson^James")  # the orders' ordering provider: the physician below


def _ingest(app: Flask, data: bytes) -> None:
    with app.app_context():
        current_archive().ingest(data, who="test")


def _report(study: str, accession: str, patient: str, *, status: str = "final",
            title: str = "CT abdomen", issued: str = "2026-03-01T12:00:00+00:00",
            source_id: str = "") -> dict[str, Any]:
    resource = DiagnosticReport.model_validate({
        "resourceType": "DiagnosticReport", "status": status,
        "identifier": [{"system": "urn:ris:report", "value": source_id or f"R-{accession}"},
                       {"type": {"coding": [{"system": "http://terminology.hl7.org/"
                                             "CodeSystem/v2-0203", "code": "ACSN"}]},
                        "value": accession}],
        "code": {"text": title},
        "subject": {"identifier": {"value": patient}},
        "imagingStudy": [{"reference": f"ImagingStudy/{study}"}],
        "issued": issued, "conclusion": f"{title}: normal.",
        "presentedForm": [{"contentType": "text/plain",
                           "data": base64.b64encode(b"No findings.").decode()}]})
    return resource.model_dump(mode="json")


class World:
    """A seeded archive: the pydicom sample files, a legacy-dated study, three studies of
    two patients with reports, orders and appointments; a physician, a patient and a
    reading machine."""

    def __init__(self, app: Flask, idp: IdentityProvider, *, samples: bool = False) -> None:
        self.app = app
        stored = 0
        for path in sample_paths() if samples else []:
            try:
                _ingest(app, path.read_bytes())
                stored += 1
            except Rejected:
                continue  # refused samples are the validation tests' business
        assert stored > 80 or not samples
        self.legacy = generate_uid()
        _ingest(app, to_bytes(make_dataset(study=self.legacy, patient_id="P-LEGACY",
                                           StudyDate="1997.04.24", AccessionNumber="")))
        self.ct, self.mr, self.other = generate_uid(), generate_uid(), generate_uid()
        _ingest(app, to_bytes(make_dataset(
            study=self.ct, patient_id="P-W1", patient_name="Walker^Anna",
            AccessionNumber="A-CT", StudyDate="20260110", PatientBirthDate="19800202",
            ReferringPhysicianName="Wilson^James", modality="CT")))
        _ingest(app, to_bytes(make_dataset(
            study=self.mr, patient_id="P-W1", patient_name="Walker^Anna",
            AccessionNumber="A-MR", StudyDate="20260220", PatientBirthDate="19800202",
            ReferringPhysicianName="Wilson^James", modality="MR")))
        _ingest(app, to_bytes(make_dataset(
            study=self.other, patient_id="P-O2", patient_name="Other^Otto",
            AccessionNumber="A-OT", StudyDate="20251201", PatientBirthDate="19501111",
            ReferringPhysicianName="House^Gregory", modality="CT")))
        self.machine = basic_auth(*make_client(app, "fhir-reader", can_read=True,
                                               can_store=False))
        self.ris = basic_auth(*make_client(app, "fhir-ris", can_read=False, can_store=True))
        client = app.test_client()
        for study, accession, patient, status, title, issued in (
                (self.ct, "A-CT", "P-W1", "final", "CT abdomen", "2026-01-11T09:00:00Z"),
                (self.mr, "A-MR", "P-W1", "preliminary", "MR knee", "2026-02-21T09:00:00Z"),
                (self.other, "A-OT", "P-O2", "final", "CT head", "2025-12-02T09:00:00Z")):
            answer = client.post("/fhir/DiagnosticReport", json=_report(
                study, accession, patient, status=status, title=title, issued=issued),
                headers={**self.ris, "Content-Type": FHIR})
            assert answer.status_code == 201, answer.data
        with app.extensions["db"].write_transaction() as session:
            for number, (patient, name, accession, provider, when, status) in enumerate((
                    ("P-W1", "Walker^Anna", "A-CT", WILSON, None, "performed"),
                    ("P-W1", "Walker^Anna", "A-NEXT", WILSON,
                     datetime(2027, 1, 5, 8, 30, tzinfo=UTC), "scheduled"),
                    ("P-O2", "Other^Otto", "A-OT2", "npi:999",
                     datetime(2026, 12, 24, 10, 0, tzinfo=UTC), "scheduled"),
                    ("P-O2", "Other^Otto", "A-OT3", "npi:999", None, "cancelled"))):
                receive_order(session, IncomingOrder(
                    placer_order_number=f"PL-{number}", filler_order_number=f"FI-{number}",
                    accession_number=accession, patient_id=patient, patient_name=name,
                    procedure="Imaging", modality="CT", ordering_provider=provider,
                    ordering_provider_key=provider, status=status, scheduled_at=when))
        # The physician: referrer of the Walker studies and ordering provider of their orders.
        self.doctor_sub = "wilson-" + generate_uid()[-8:]
        doctor = add_person(app, idp, self.doctor_sub, ["physician"])
        # The patient: Anna Walker's own account.
        self.patient_sub = "anna-" + generate_uid()[-8:]
        patient = add_person(app, idp, self.patient_sub, ["patient"])
        with app.extensions["db"].write_transaction() as session:
            link_identifier(session, ADMIN, doctor, "Wilson^James")
            link_patient(session, ADMIN, patient, "P-W1")
        self.idp = idp

    def machine_get(self, url: str, **headers: str) -> Any:
        return self.app.test_client().get(url, headers={**self.machine, **headers})


@pytest.fixture
def world(tmp_path: Path, database_url: str, idp: IdentityProvider) -> Iterator[World]:
    """The seeded world on SQLite and on PostgreSQL (the searches are SQL)."""
    app = make_app(tmp_path / "instance", database_url, OIDC_ISSUER=idp.issuer,
                   **OIDC_SETTINGS)
    yield World(app, idp)
    close_app(app)


def _path(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


def _walk(get: Any, resource_type: str, query: str = "", count: int = 7) -> list[Any]:
    """Every resource of a search, following ``next`` links to the end; each page a valid
    R4 searchset Bundle whose total stays the same."""
    url = f"/fhir/{resource_type}?_count={count}{'&' + query if query else ''}"
    found: list[Any] = []
    total = None
    while url:
        answer = get(url)
        assert answer.status_code == 200, (url, answer.data[:300])
        assert answer.mimetype == FHIR
        bundle = Bundle.model_validate(answer.get_json())  # nested resources validated too
        assert bundle.type == "searchset"
        total = bundle.total if total is None else total
        assert bundle.total == total
        links = {link.relation: link.url for link in bundle.link}
        assert "self" in links
        for entry in bundle.entry or []:
            assert entry.search.mode == "match"
            assert entry.fullUrl.endswith(f"/fhir/{resource_type}/{entry.resource.id}")
            assert entry.resource.__resource_type__ == resource_type
            found.append(entry.resource)
        url = _path(links["next"]) if "next" in links else ""
    assert len(found) == total
    ids = [r.id for r in found]
    assert len(ids) == len(set(ids)), "a resource came twice across pages"
    return found


def test_every_resource_the_portal_emits_is_valid_r4(oidc_app: Flask,
                                                    idp: IdentityProvider) -> None:
    """Walk every resource type the CapabilityStatement lists, page by page, and read each
    resource back: all parse with fhir.resources (the old ImagingStudy of a 1997.04.24 study
    had started "1997-.0-4." and an empty subject identifier, and failed)."""
    world = World(oidc_app, idp, samples=True)
    answer = world.app.test_client().get("/fhir/metadata")  # no credentials needed
    assert answer.status_code == 200 and answer.mimetype == FHIR
    statement = CapabilityStatement.model_validate(answer.get_json())
    assert statement.fhirVersion == "4.0.1"
    kinds = [r.type for r in statement.rest[0].resource]
    assert set(kinds) == {"DiagnosticReport", "ImagingStudy", "Patient", "ServiceRequest",
                          "Appointment"}
    walked: dict[str, list[Any]] = {}
    for kind in kinds:
        walked[kind] = _walk(world.machine_get, kind)
        for resource in walked[kind]:
            read = world.machine_get(f"/fhir/{kind}/{resource.id}")
            assert read.status_code == 200 and read.mimetype == FHIR
            again = type(resource).model_validate(read.get_json())
            assert again.id == resource.id
    with world.app.app_context():
        from portal.db import db
        from portal.index.models import Patient, Study

        assert len(walked["ImagingStudy"]) == db.session.query(Study).count() >= 40
        assert len(walked["Patient"]) == db.session.query(Patient).count()
    assert len(walked["DiagnosticReport"]) == 3
    assert len(walked["ServiceRequest"]) == 4 and len(walked["Appointment"]) == 2
    legacy = next(s for s in walked["ImagingStudy"] if s.id == world.legacy)
    assert str(legacy.started)[:10] == "1997-04-24"
    patients = {f"Patient/{p.id}" for p in walked["Patient"]}
    for study in walked["ImagingStudy"]:
        assert study.subject.reference in patients
    for report in walked["DiagnosticReport"]:
        assert report.subject.reference in patients


def _ids(get: Any, resource_type: str, query: str) -> set[str]:
    return {r.id for r in _walk(get, resource_type, query, count=50)}


def test_each_search_parameter_filters(world: World) -> None:
    """Every declared parameter narrows the result (ignoring it would return more)."""
    get = world.machine_get
    studies = _ids(get, "ImagingStudy", "")
    patients = {p.identifier[0].value: p.id for p in _walk(get, "Patient", "", 50)
                if p.identifier}
    walker, other = patients["P-W1"], patients["P-O2"]
    reports = {r.imagingStudy[0].reference.split("/")[1]: r.id
               for r in _walk(get, "DiagnosticReport", "")}
    ct, mr, ot = reports[world.ct], reports[world.mr], reports[world.other]
    cases = [
        ("ImagingStudy", f"_id={world.ct}", {world.ct}),
        ("ImagingStudy", f"patient=Patient/{walker}", {world.ct, world.mr}),
        ("ImagingStudy", "patient:identifier=P-O2", {world.other}),
        ("ImagingStudy", f"identifier=urn:dicom:uid|urn:oid:{world.mr}", {world.mr}),
        ("ImagingStudy", "identifier=A-CT", {world.ct}),
        ("ImagingStudy", "started=2026-01-10", {world.ct}),
        ("ImagingStudy", "started=1997-04", {world.legacy}),
        ("ImagingStudy", f"started=ge2026-02-01&patient=Patient/{walker}", {world.mr}),
        ("ImagingStudy", f"modality=MR&patient=Patient/{walker}", {world.mr}),
        ("DiagnosticReport", f"_id={ct}", {ct}),
        ("DiagnosticReport", f"patient=Patient/{walker}", {ct, mr}),
        ("DiagnosticReport", f"subject=Patient/{other}", {ot}),
        ("DiagnosticReport", "patient:identifier=P-O2", {ot}),
        ("DiagnosticReport", "status=preliminary", {mr}),
        ("DiagnosticReport", "status=final,preliminary", {ct, mr, ot}),
        ("DiagnosticReport", "date=ge2026-01-01", {ct, mr}),
        ("DiagnosticReport", "date=lt2026-01-01", {ot}),
        ("DiagnosticReport", "date=2026-02", {mr}),
        ("DiagnosticReport", "date=gt2026-01-11T09:00:00Z&date=le2026-02-21", {mr}),
        ("DiagnosticReport", f"code={LOINC_REPORT}", {ct, mr, ot}),
        ("DiagnosticReport", "code=http://loinc.org|11111-1", set()),
        ("DiagnosticReport", "code:text=mr", {mr}),
        ("DiagnosticReport", "identifier=A-OT", {ot}),
        ("DiagnosticReport", "identifier=urn:portal:fhir|R-A-CT", {ct}),
        ("DiagnosticReport", f"study=ImagingStudy/{world.mr}", {mr}),
        ("Patient", f"_id={walker}", {walker}),
        ("Patient", "identifier=P-O2", {other}),
        ("Patient", "name=walk", {walker}),
        ("Patient", "name=anna walker", {walker}),
        ("Patient", "birthdate=1950-11-11", {other}),
        ("Patient", "birthdate=lt1960", {other}),
    ]
    orders = {o.identifier[0].value: o.id for o in _walk(get, "ServiceRequest", "", 50)}
    cases += [
        ("ServiceRequest", f"_id={orders['PL-0']}", {orders["PL-0"]}),
        ("ServiceRequest", f"patient=Patient/{other}", {orders["PL-2"], orders["PL-3"]}),
        ("ServiceRequest", "patient:identifier=P-W1", {orders["PL-0"], orders["PL-1"]}),
        ("ServiceRequest", "identifier=FI-1", {orders["PL-1"]}),
        ("ServiceRequest", "identifier=A-OT2", {orders["PL-2"]}),
        ("ServiceRequest", "status=revoked", {orders["PL-3"]}),
        ("ServiceRequest", "status=completed", {orders["PL-0"]}),
        ("Appointment", f"_id={orders['PL-1']}", {orders["PL-1"]}),
        ("Appointment", f"patient=Patient/{walker}", {orders["PL-1"]}),
        ("Appointment", "date=ge2027-01-01", {orders["PL-1"]}),
        ("Appointment", "date=2026-12-24T10:00:00Z", {orders["PL-2"]}),
        ("Appointment", "status=booked", {orders["PL-1"], orders["PL-2"]}),
        ("Appointment", "status=cancelled", set()),
    ]
    assert len(studies) > 3
    for kind, query, expected in cases:
        assert _ids(get, kind, query) == expected, (kind, query)
    # Each declared parameter has at least one case above.
    statement = get("/fhir/metadata").get_json()
    for resource in statement["rest"][0]["resource"]:
        for param in resource["searchParam"]:
            assert any(kind == resource["type"] and (f"{param['name']}=" in query
                                                     or f"{param['name']}:" in query)
                       for kind, query, _ in cases), (resource["type"], param["name"])


def _outcome(answer: Any, status: int) -> OperationOutcome:
    assert answer.status_code == status, (status, answer.status_code, answer.data[:300])
    assert answer.mimetype == FHIR
    body = OperationOutcome.model_validate(answer.get_json())
    assert body.issue[0].severity == "error" and body.issue[0].diagnostics
    return body


def test_unknown_parameters_are_refused_unless_lenient(world: World) -> None:
    answer = world.machine_get("/fhir/DiagnosticReport?category=RAD")
    assert "category" in _outcome(answer, 400).issue[0].diagnostics
    _outcome(world.machine_get("/fhir/ImagingStudy?patient:missing=true"), 400)
    _outcome(world.machine_get("/fhir/Patient?birthdate=sa2000"), 400)
    _outcome(world.machine_get("/fhir/Patient?birthdate=2000-13"), 400)
    for edge in ("0000", "9999", "9999-12-31", "0001-01-01T00:00:00%2B14:00"):
        _outcome(world.machine_get(f"/fhir/Appointment?date={edge}"), 400)
    _outcome(world.machine_get("/fhir/Patient?_count=many"), 400)
    lenient = world.machine_get("/fhir/DiagnosticReport?category=RAD&status=preliminary",
                                Prefer="handling=lenient")
    assert lenient.status_code == 200
    bundle = Bundle.model_validate(lenient.get_json())
    assert bundle.total == 1  # status still applied
    said = [e for e in bundle.entry if e.search.mode == "outcome"]
    assert len(said) == 1 and "category" in said[0].resource.issue[0].diagnostics
    self_link = next(link.url for link in bundle.link if link.relation == "self")
    assert "category" not in self_link and "status=preliminary" in self_link


def test_paging_gives_every_result_once_in_both_directions(world: World) -> None:
    """next links from the first page and previous links from the last one both give every
    result exactly once, in the same order."""
    forward = [s.id for s in _walk(world.machine_get, "ImagingStudy", count=3)]
    assert len(forward) == 4
    url = f"/fhir/ImagingStudy?_count=3&_offset={(len(forward) - 1) // 3 * 3}"
    back: list[str] = []
    while url:
        page = world.machine_get(url).get_json()
        back = [e["resource"]["id"] for e in page["entry"]] + back
        url = next((_path(link["url"]) for link in page["link"]
                    if link["relation"] == "previous"), "")
    assert back == forward
    only_total = Bundle.model_validate(world.machine_get("/fhir/ImagingStudy?_count=0")
                                       .get_json())
    assert only_total.total == len(forward) and not only_total.entry


def test_errors_under_fhir_are_operation_outcomes(world: World) -> None:
    client = world.app.test_client()
    unauthenticated = client.get("/fhir/Patient")
    _outcome(unauthenticated, 401)
    assert unauthenticated.headers.get_all("WWW-Authenticate")
    _outcome(client.get("/fhir/Patient", headers={"Authorization": "Basic eDp5"}), 401)
    _outcome(world.machine_get("/fhir/DiagnosticReport/999999"), 404)
    _outcome(world.machine_get("/fhir/ImagingStudy/1.2.3.4"), 404)
    _outcome(world.machine_get("/fhir/Observation"), 404)
    _outcome(client.delete("/fhir/Patient/1", headers=world.machine), 405)
    _outcome(client.post("/fhir/ImagingStudy", headers=world.machine, json={}), 405)
    _outcome(world.machine_get("/fhir/Patient", Accept="application/fhir+xml"), 406)
    assert world.machine_get("/fhir/Patient", Accept="application/fhir+json").status_code == 200
    _outcome(world.machine_get("/fhir/Patient?_format=xml"), 400)
    assert world.machine_get(f"/fhir/ImagingStudy/{world.ct}?_format=json").status_code == 200
    _outcome(world.machine_get(f"/fhir/ImagingStudy/{world.ct}?patient=1"), 400)
    _outcome(client.post("/fhir/DiagnosticReport", headers=world.machine, json=_report(
        world.ct, "A-CT", "P-W1")), 403)
    _outcome(client.post("/fhir/DiagnosticReport", headers={**world.ris,
                                                            "Content-Type": "text/plain"},
                         data=b"{}"), 415)
    _outcome(client.post("/fhir/DiagnosticReport", data=b"{not json",
                         headers={**world.ris, "Content-Type": FHIR}), 400)


def test_only_valid_r4_diagnostic_reports_are_accepted(world: World) -> None:
    """A DiagnosticReport fhir.resources refuses (no ``code``, a wrong status) is a 422 and
    stores nothing; what is accepted parses and comes back valid."""
    client = world.app.test_client()
    headers = {**world.ris, "Content-Type": FHIR}
    with world.app.app_context():
        from portal.db import db

        before = db.session.query(Report).count()
    good = _report(world.other, "A-OT", "P-O2", title="CT head", source_id="R-NEW")
    DiagnosticReport.model_validate(good)  # what the test sends is itself valid R4
    for broken in ({k: v for k, v in good.items() if k != "code"},
                   {**good, "status": "done"},
                   {**good, "issued": "yesterday"},
                   {**good, "subject": {"reference": 7}}):
        answer = client.post("/fhir/DiagnosticReport", json=broken, headers=headers)
        _outcome(answer, 422)
    missing_code = client.post("/fhir/DiagnosticReport", headers=headers,
                               json={k: v for k, v in good.items() if k != "code"})
    assert "code" in _outcome(missing_code, 422).issue[0].diagnostics
    with world.app.app_context():
        from portal.db import db

        assert db.session.query(Report).count() == before
    created = client.post("/fhir/DiagnosticReport", json=good, headers=headers)
    assert created.status_code == 201
    DiagnosticReport.model_validate(created.get_json())
    read = world.machine_get(_path(created.headers["Location"]))
    assert DiagnosticReport.model_validate(read.get_json()).code.text == "CT head"


def test_the_time_of_the_examination_goes_out_as_the_reports_effective_time(
        world: World) -> None:
    """The time a sender names (``effectiveDateTime``, or ``effectivePeriod.start``) comes
    back as ``effectiveDateTime``, not the signing time, and the ``date`` search finds the
    report by it; ``issued`` stays the signing time."""
    client = world.app.test_client()
    headers = {**world.ris, "Content-Type": FHIR}
    timed = _report(world.other, "A-OT", "P-O2", source_id="R-TIMED")
    timed["effectiveDateTime"] = "2026-02-27T08:30:00+01:00"
    period = _report(world.mr, "A-MR", "P-W1", source_id="R-PERIOD")
    period["effectivePeriod"] = {"start": "2026-02-20T10:00:00Z", "end": "2026-02-20T10:40:00Z"}
    for resource, expected in ((timed, datetime(2026, 2, 27, 7, 30, tzinfo=UTC)),
                               (period, datetime(2026, 2, 20, 10, tzinfo=UTC))):
        DiagnosticReport.model_validate(resource)  # what the test sends is itself valid R4
        created = client.post("/fhir/DiagnosticReport", json=resource, headers=headers)
        assert created.status_code == 201, created.data
        read = DiagnosticReport.model_validate(
            world.machine_get(_path(created.headers["Location"])).get_json())
        assert read.effectiveDateTime == expected
        assert read.issued == datetime(2026, 3, 1, 12, tzinfo=UTC)
    found = _walk(world.machine_get, "DiagnosticReport", "date=2026-02-27")
    assert [r.identifier[0].value for r in found] == ["R-TIMED"]
    # A correction of the time alone is a new version, not "already stored".
    timed["effectiveDateTime"] = "2026-02-26T08:30:00+01:00"
    corrected = client.post("/fhir/DiagnosticReport", json=timed, headers=headers)
    assert corrected.status_code in (200, 201), corrected.data
    assert [r.identifier[0].value for r in _walk(world.machine_get, "DiagnosticReport",
                                                 "date=2026-02-26")] == ["R-TIMED"]
    assert _walk(world.machine_get, "DiagnosticReport", "date=2026-02-27") == []
    # A resource is the whole report: sent again without effective[x], it has no such time
    # (the date search falls back to the signing time).
    del timed["effectiveDateTime"]
    timed["conclusion"] = "Corrected without a time."
    updated = client.post("/fhir/DiagnosticReport", json=timed, headers=headers)
    assert updated.status_code in (200, 201), updated.data
    read = DiagnosticReport.model_validate(
        world.machine_get(_path(updated.headers["Location"])).get_json())
    assert read.effectiveDateTime == datetime(2026, 3, 1, 12, tzinfo=UTC)  # issued
    assert _walk(world.machine_get, "DiagnosticReport", "date=2026-02-26") == []


def test_an_effective_date_without_a_time_is_the_practices_day() -> None:
    """FHIR allows a date alone (a time needs its offset): that day starts in the practice's
    zone; a year or a month alone is no time."""
    from zoneinfo import ZoneInfo

    from portal.fhir.resources import report_from_resource

    resource = _report("1.2.3", "A-D", "P-D")
    berlin = ZoneInfo("Europe/Berlin")
    for given, expected in (("2026-02-25", datetime(2026, 2, 24, 23, tzinfo=UTC)),
                            ("2026-02", None), ("2026", None)):
        resource["effectiveDateTime"] = given
        assert report_from_resource(resource, berlin).clinical_at == expected, given


def _languages(world: World, patient_id: str) -> list[tuple[str, bool | None]]:
    """The communication of the Patient with this Patient ID, searched and read (both valid
    R4 and the same)."""
    [found] = _walk(world.machine_get, "Patient", f"identifier={patient_id}")
    read = world.machine_get(f"/fhir/Patient/{found.id}")
    assert FhirPatient.model_validate(read.get_json()) == found
    for entry in found.communication or []:
        assert [c.system for c in entry.language.coding] == ["urn:ietf:bcp:47"]
    return [(entry.language.coding[0].code, entry.preferred)
            for entry in found.communication or []]


def test_the_patients_language_comes_with_a_report_and_goes_out_with_the_patient(
        world: World) -> None:
    """A DiagnosticReport whose subject is a contained Patient brings his language: the
    communication marked preferred, read as HL7 PID-15 is ("es-MX" is Spanish). FHIR Patient
    then names it as his preferred communication; an order updated later with another
    language wins; a report with a code that is no language changes nothing."""
    client = world.app.test_client()
    headers = {**world.ris, "Content-Type": FHIR}
    assert _languages(world, "P-W1") == [] and _languages(world, "P-O2") == []
    spoken = _report(world.ct, "A-CT", "P-W1", source_id="R-SPOKEN")
    spoken["contained"] = [{
        "resourceType": "Patient", "id": "walker",
        "communication": [
            {"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "en"}]}},
            {"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "es-MX"}],
                          "text": "Spanish (Mexico)"}, "preferred": True}]}]
    spoken["subject"] = {"reference": "#walker", "identifier": {"value": "P-W1"}}
    DiagnosticReport.model_validate(spoken)  # what the test sends is itself valid R4
    answer = client.post("/fhir/DiagnosticReport", json=spoken, headers=headers)
    assert answer.status_code == 201, answer.data
    assert _languages(world, "P-W1") == [("es", True)]
    assert _languages(world, "P-O2") == []  # another patient's report says nothing of him

    with world.app.extensions["db"].write_transaction() as session:
        receive_order(session, IncomingOrder(
            placer_order_number="PL-0", filler_order_number="FI-0", accession_number="A-CT",
            patient_id="P-W1", patient_name="Walker^Anna", patient_language="de"))
    assert _languages(world, "P-W1") == [("de", True)]

    unknown = _report(world.mr, "A-MR", "P-W1", source_id="R-UNKNOWN")
    unknown["contained"] = [{"resourceType": "Patient", "id": "w", "communication": [
        {"language": {"coding": [{"code": "qqq-not-a-language"}]}, "preferred": True}]}]
    unknown["subject"] = {"reference": "#w", "identifier": {"value": "P-W1"}}
    answer = client.post("/fhir/DiagnosticReport", json=unknown, headers=headers)
    assert answer.status_code == 201, answer.data
    assert _languages(world, "P-W1") == [("de", True)]
    with world.app.app_context():
        from portal.db import db

        assert {r.source_id: r.patient_language for r in db.session.query(Report).filter(
            Report.source_id.in_(("R-SPOKEN", "R-UNKNOWN")))} == {"R-SPOKEN": "es",
                                                                 "R-UNKNOWN": ""}


def test_the_patients_language_comes_only_from_studies_the_caller_may_see(
        world: World) -> None:
    """A language given with the report of a study the physician may not see (another
    referrer) is not told to him on the Patient he does see; the machine, which sees every
    study, is told it (security.md 11: what a list says is filtered per item)."""
    hidden = generate_uid()
    _ingest(world.app, to_bytes(make_dataset(
        study=hidden, patient_id="P-W1", patient_name="Walker^Anna", AccessionNumber="A-HID",
        StudyDate="20260301", PatientBirthDate="19800202",
        ReferringPhysicianName="House^Gregory", modality="CT")))
    spoken = _report(hidden, "A-HID", "P-W1", source_id="R-HIDDEN")
    spoken["contained"] = [{"resourceType": "Patient", "id": "w", "communication": [
        {"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "fr"}]}}]}]
    spoken["subject"] = {"reference": "#w", "identifier": {"value": "P-W1"}}
    answer = world.app.test_client().post("/fhir/DiagnosticReport", json=spoken,
                                          headers={**world.ris, "Content-Type": FHIR})
    assert answer.status_code == 201, answer.data
    assert _languages(world, "P-W1") == [("fr", True)]
    doctor = signed_in(world.app, world.idp, world.doctor_sub)
    [seen] = _walk(lambda url: doctor.get(url), "Patient")
    assert seen.identifier[0].value == "P-W1" and not seen.communication


def test_people_see_only_their_own(world: World) -> None:
    """The physician sees his referred patient's studies, reports, patient and orders; the
    patient his own; neither the other patient's."""
    doctor = signed_in(world.app, world.idp, world.doctor_sub)
    patient = signed_in(world.app, world.idp, world.patient_sub)

    def get(client: FlaskClient) -> Any:
        return lambda url: client.get(url)

    for who in (doctor, patient):
        assert {s.id for s in _walk(get(who), "ImagingStudy")} == {world.ct, world.mr}
        names = {p.identifier[0].value for p in _walk(get(who), "Patient")}
        assert names == {"P-W1"}
        appointments = _walk(get(who), "Appointment")
        assert [a.basedOn[0].reference.startswith("ServiceRequest/") for a in appointments] \
            == [True]
        orders = {o.identifier[0].value for o in _walk(get(who), "ServiceRequest")}
        assert orders == {"PL-0", "PL-1"}
    # Reports: the physician reads the preliminary one too; the patient only final ones
    # after the release delay (none yet with the default delay, or the final CT).
    assert len(_walk(get(doctor), "DiagnosticReport")) == 2
    seen = _walk(get(patient), "DiagnosticReport")
    assert all(r.status == "final" for r in seen)
    other = world.machine_get("/fhir/DiagnosticReport?patient:identifier=P-O2").get_json()
    other_id = other["entry"][0]["resource"]["id"]
    _outcome(doctor.get(f"/fhir/DiagnosticReport/{other_id}"), 404)
    _outcome(patient.get(f"/fhir/ImagingStudy/{world.other}"), 404)
