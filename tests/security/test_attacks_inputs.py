"""Malformed input that other tests do not name: NUL characters (which PostgreSQL refuses in
a query), type-confused and deeply nested JSON, negative paging, reflected URL parameters and
spreadsheet formulas in the audit export. Each must be a clear 4xx, never a 500."""

from __future__ import annotations

import base64
import csv
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from pydicom.uid import generate_uid

from portal.access.models import AuditEvent
from portal.audit import record
from tests.access.test_console import setup
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    add_person,
    basic_auth,
    close_app,
    csrf_of,
    make_app,
    make_client,
    signed_in,
)


@pytest.fixture
def any_db_oidc_app(tmp_path: Path, database_url: str, idp: IdentityProvider
                    ) -> Iterator[Flask]:
    """Signed-in people on SQLite and on PostgreSQL."""
    application = make_app(tmp_path / "instance", database_url, OIDC_ISSUER=idp.issuer,
                           **OIDC_SETTINGS)
    yield application
    close_app(application)


def test_nul_characters_anywhere_are_a_bad_request(any_db_oidc_app: Flask,
                                                   idp: IdentityProvider) -> None:
    app = any_db_oidc_app
    manager, doctor, study = setup(app, idp)
    headers = {"X-CSRF-Token": csrf_of(manager)}
    for path in ("/dicomweb/studies/1.2%00.3", f"/dicomweb/studies/{study}/series/1%00",
                 "/studies/1.2%00", "/studies?q=%00", "/dicomweb/studies?PatientID=%00",
                 "/fhir/DiagnosticReport?patient=%00", "/fhir/ImagingStudy?_id=%00",
                 "/admin/audit?who=%00", "/api/shares?study=%00", "/shares/ab%00cd"):
        response = manager.get(path)
        assert response.status_code == 400, (path, response.status_code)
    form = manager.post("/admin/grants", data={"user_id": doctor, "study_uid": "1.2\x00",
                                              "csrf_token": headers["X-CSRF-Token"]})
    assert form.status_code == 400
    api = manager.post("/api/grants", json={"user_id": doctor, "study_uid": "1.2\x00"},
                       headers=headers)
    assert api.status_code == 400
    share = manager.post("/api/shares", json={"study_uid": study, "note": "a\x00b"},
                         headers=headers)
    assert share.status_code == 400
    anonymous = app.test_client()
    assert anonymous.post("/s/exchange", data={"token": "a\x00b", "pin": "1"}
                          ).status_code == 400
    name, secret = make_client(app, "nul-reader")
    assert anonymous.get("/dicomweb/studies", headers=basic_auth(name + "\x00", secret)
                         ).status_code == 401
    assert anonymous.get("/dicomweb/studies", headers={"Authorization": "Basic " + base64.
                         b64encode(b"x\x00y:z").decode()}).status_code == 401


def test_type_confused_and_deeply_nested_json_is_a_bad_request(oidc_app: Flask,
                                                               idp: IdentityProvider) -> None:
    manager, doctor, study = setup(oidc_app, idp)
    headers = {"X-CSRF-Token": csrf_of(manager)}
    for body in ({"user_id": "abc", "key": "npi:1234567893"},
                 {"user_id": [doctor], "key": "npi:1234567893"},
                 {"user_id": doctor, "key": {"a": 1}}):
        response = manager.post("/api/identifiers", json=body, headers=headers)
        assert response.status_code == 400, (body, response.data)
    for body in ({"user_id": {"id": doctor}, "study_uid": study},
                 {"user_id": doctor, "study_uid": 12345},
                 {"user_id": doctor, "patient_id": ["P"]}):
        response = manager.post("/api/grants", json=body, headers=headers)
        assert response.status_code == 400, (body, response.data)
    assert manager.patch(f"/api/users/{doctor}", json={"practice": ["x"]},
                         headers=headers).status_code == 400
    assert manager.post("/api/invitations", json={"roles": [], "email": {"x": 1}},
                        headers=headers).status_code == 400
    deep = "[" * 100_000 + "]" * 100_000
    nested = manager.post("/api/grants", data=deep, headers={
        **headers, "Content-Type": "application/json"})
    assert nested.status_code == 400
    ris = basic_auth(*make_client(oidc_app, "ris", can_read=False, can_store=True))
    fhir = oidc_app.test_client().post("/fhir/DiagnosticReport", data=deep, headers={
        **ris, "Content-Type": "application/fhir+json"})
    assert fhir.status_code == 400
    assert fhir.get_json()["resourceType"] == "OperationOutcome"


def test_audit_paging_cannot_be_turned_around(oidc_app: Flask, idp: IdentityProvider) -> None:
    """A negative limit means "no limit" in SQLite (the whole trail) and an offset below
    zero is an error in PostgreSQL: both are refused."""
    manager, _doctor, _study = setup(oidc_app, idp)
    for query in ("limit=-1", "limit=0", "offset=-1"):
        assert manager.get(f"/api/audit?{query}").status_code == 400, query
    assert len(manager.get("/api/audit?limit=1").get_json()) == 1


def test_audit_page_links_carry_only_the_filters(oidc_app: Flask,
                                                 idp: IdentityProvider) -> None:
    """Query parameters of the audit page are not passed on to url_for: no absolute URL on
    another scheme or host, no 500 for a parameter named like url_for's own."""
    manager, _doctor, _study = setup(oidc_app, idp)
    page = manager.get("/admin/audit?_external=1&_scheme=javascript&_anchor=x&who=a%0Ab")
    assert page.status_code == 200
    links = re.findall(r'href="([^"]*audit\.csv[^"]*)"', page.get_data(as_text=True))
    assert links and all(link.startswith("/admin/audit.csv") for link in links), links
    assert "_external" not in links[0] and "_anchor" not in links[0] and "#" not in links[0]
    assert manager.get("/admin/audit?endpoint=x").status_code == 200
    # The pager's links too (page 2 has a "Newer" link back): never javascript: or absolute.
    paged = manager.get("/admin/audit?page=2&_external=1&_scheme=javascript&_anchor=x"
                        "&who=%0Aalert(1)").get_data(as_text=True)
    pager = re.findall(r'href="([^"]*)"[^>]*>(?:Newer|More)<', paged)
    assert pager and all(link.startswith("/admin/audit?") and "#" not in link
                         for link in pager), pager


def test_audit_export_neutralises_formulas_in_every_text_column(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    # The installation's manager (of no practice) reads every record, this one too (about
    # no study a practice sees, by nobody of a practice).
    installation = f"om-none-{generate_uid()[-6:]}"
    add_person(oidc_app, idp, installation, ["office_manager"])
    manager = signed_in(oidc_app, idp, installation)
    formula = '=HYPERLINK("http://evil.example","x")'
    record(oidc_app.extensions["db"], ("110113", "Security Alert"), action="E", outcome=4,
           who="probe", source_address="+1+cmd", study_instance_uid="@SUM(1+1)",
           patient_id=formula, details={})
    text = manager.get("/admin/audit.csv?who=probe").get_data(as_text=True)
    rows = [r for r in csv.reader(io.StringIO(text)) if r and r[6] == "probe"]
    assert rows
    for cell in rows[0]:
        assert cell[:1] not in ("=", "+", "-", "@"), rows[0]
    with oidc_app.extensions["db"].new_session() as session:
        assert session.query(AuditEvent).filter(AuditEvent.who == "probe").count() == 1


def test_fhir_reports_with_fields_of_the_wrong_type_are_refused_with_a_reason(
        app: Flask) -> None:
    ris = basic_auth(*make_client(app, "ris", can_read=True, can_store=True))
    client = app.test_client()
    base = {"resourceType": "DiagnosticReport", "status": "final"}
    for wrong in ({"subject": {"identifier": "P-1"}}, {"subject": {"identifier": 7}},
                  {"identifier": [{"type": "ACSN", "value": "1"}]},
                  {"identifier": [{"type": {"coding": 5}, "value": "1"}]},
                  {"identifier": 5}, {"imagingStudy": [{"identifier": "1.2.3"}]},
                  {"imagingStudy": 5}, {"presentedForm": 5}, {"resultsInterpreter": 5}):
        answer = client.post("/fhir/DiagnosticReport", json={**base, **wrong}, headers=ris)
        assert 400 <= answer.status_code < 500, (wrong, answer.status_code)
        assert answer.get_json()["resourceType"] == "OperationOutcome"
    # Errors under /fhir are JSON for the machine that called, not an HTML page.
    missing = client.get("/fhir/DiagnosticReport/abc", headers=ris)
    assert missing.status_code == 404 and missing.is_json
