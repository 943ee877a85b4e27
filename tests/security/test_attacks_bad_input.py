"""Input that used to end in a server error (issue 12, item 5): integers past what the
database holds in paths, queries, forms and JSON; control characters in STOW part headers
(echoed into a ``Warning`` header that gunicorn refuses); sending a link one may not manage.
Each is a clear 4xx with a reason, on SQLite and on PostgreSQL, and leaves nothing stored."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from portal.access.models import Grant, ReferrerIdentifier, User
from portal.archive import current_archive
from portal.index.models import Instance
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
from tests.factories import make_instance
from tests.support.gunicorn import served

HUGE = "99999999999999999999999"  # past 64 bits
JUST_PAST_32 = str(2**31)  # past PostgreSQL's integer


@pytest.fixture
def any_db_oidc_app(tmp_path: Path, database_url: str, idp: IdentityProvider
                    ) -> Iterator[Flask]:
    """Signed-in people on SQLite and on PostgreSQL."""
    application = make_app(tmp_path / "instance", database_url, OIDC_ISSUER=idp.issuer,
                           **OIDC_SETTINGS)
    yield application
    close_app(application)


def _count(app: Flask, model: type) -> int:
    with app.extensions["db"].new_session() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


@pytest.mark.parametrize("number", [HUGE, JUST_PAST_32])
def test_huge_integers_in_paths_are_not_found(any_db_oidc_app: Flask, idp: IdentityProvider,
                                              number: str) -> None:
    app = any_db_oidc_app
    manager, _doctor, _study = setup(app, idp)
    token = csrf_of(manager)
    headers = {"X-CSRF-Token": token}
    reader = basic_auth(*make_client(app, "reader"))
    machine = app.test_client()
    answer = machine.get(f"/fhir/DiagnosticReport/{number}", headers=reader)
    assert answer.status_code == 404 and answer.is_json, answer.data
    answer = manager.patch(f"/api/users/{number}", json={"active": False}, headers=headers)
    assert answer.status_code == 404 and answer.is_json, answer.data
    assert manager.delete(f"/api/identifiers/{number}", headers=headers).status_code == 404
    for form in (f"/admin/users/{number}", f"/admin/identifiers/{number}/delete",
                 f"/admin/grants/{number}/revoke"):
        assert manager.post(form, data={"csrf_token": token}).status_code == 404, form
    assert manager.get(f"/studies/1.2.3/reports/{number}.pdf").status_code == 404
    assert manager.get(f"/dicomweb/studies/1.2/series/1.3/instances/1.4/frames/{number}"
                       "/rendered").status_code == 404


@pytest.mark.parametrize("number", [HUGE, JUST_PAST_32, "-" + HUGE])
def test_huge_integers_in_queries_are_a_bad_request_with_the_bounds(
        any_db_oidc_app: Flask, idp: IdentityProvider, number: str) -> None:
    app = any_db_oidc_app
    manager, _doctor, study = setup(app, idp)
    reader = basic_auth(*make_client(app, "reader"))
    machine = app.test_client()
    for query in ("offset", "limit"):
        answer = machine.get(f"/dicomweb/studies?{query}={number}", headers=reader)
        assert answer.status_code == 400, (query, answer.data)
        assert f"{query} must be" in answer.get_json()["error"]
        answer = manager.get(f"/api/audit?{query}={number}")
        assert answer.status_code == 400, (query, answer.data)
        assert f"{query} must be an integer between" in answer.get_json()["error"]
    for key, path in (("NumberOfStudyRelatedSeries", "/dicomweb/studies"),
                      ("SeriesNumber", f"/dicomweb/studies/{study}/series"),
                      ("InstanceNumber", f"/dicomweb/studies/{study}/instances")):
        answer = machine.get(f"{path}?{key}={number}", headers=reader)
        assert answer.status_code == 400, (path, answer.status_code)
        assert f"{key} must be an integer between" in answer.get_json()["error"]
    # Counts and pages are capped rather than refused; what matters is no server error.
    for path in (f"/fhir/DiagnosticReport?_count={number}",
                 f"/fhir/ImagingStudy?_count={number}", f"/studies?page={number}"):
        client = manager if path.startswith("/studies") else machine
        assert client.get(path, headers=reader).status_code == 200, path


@pytest.mark.parametrize("number", [int(HUGE), 2**31, -(2**63) - 1])
def test_huge_integers_in_json_and_forms_are_a_bad_request(
        any_db_oidc_app: Flask, idp: IdentityProvider, number: int) -> None:
    app = any_db_oidc_app
    manager, doctor, study = setup(app, idp)
    token = csrf_of(manager)
    headers = {"X-CSRF-Token": token}
    grants, identifiers = _count(app, Grant), _count(app, ReferrerIdentifier)
    for path, body in (("/api/grants", {"user_id": number, "study_uid": study}),
                       ("/api/grants/revoke", {"ids": [number]}),
                       ("/api/grants/revoke", {"ids": [1, number]}),
                       ("/api/identifiers", {"user_id": number, "key": "npi:1234567893"})):
        answer = manager.post(path, json=body, headers=headers)
        assert answer.status_code == 400, (path, body, answer.status_code, answer.data)
        assert "must be" in answer.get_json()["error"]
    for path, form in (("/admin/grants", {"user_id": str(number), "study_uid": study}),
                       ("/admin/identifiers", {"user_id": str(number),
                                               "key": "npi:1234567893"})):
        answer = manager.post(path, data={**form, "csrf_token": token})
        assert answer.status_code == 400, (path, answer.status_code)
        assert "user_id must be an integer between" in answer.get_data(as_text=True)
    assert (_count(app, Grant), _count(app, ReferrerIdentifier)) == (grants, identifiers)
    # The ordinary cases still work.
    made = manager.post("/api/grants", json={"user_id": doctor, "study_uid": study},
                        headers=headers)
    assert made.status_code == 201


def test_sending_a_missing_or_foreign_link_is_not_found(oidc_app: Flask,
                                                        idp: IdentityProvider) -> None:
    app = oidc_app
    owner_sub, other_sub = f"own-{generate_uid()[-8:]}", f"oth-{generate_uid()[-8:]}"
    owner_id = add_person(app, idp, owner_sub, ["physician"], "Clinic")
    add_person(app, idp, other_sub, ["physician"], "Other")
    study = generate_uid()
    with app.app_context():
        current_archive().ingest(make_instance(study=study), who="test")
    from portal.access.grants import create_grant
    from portal.access.principal import Principal

    with app.extensions["db"].write_transaction() as session:
        create_grant(session, Principal("user", 0, "setup"), user_id=owner_id,
                     study_uid=study)
    owner = signed_in(app, idp, owner_sub)
    page = owner.post(f"/studies/{study}/share", data={"csrf_token": csrf_of(owner),
                                                       "days": "5", "pin": "on"})
    assert page.status_code == 201
    import re

    public_id = re.search(r'/shares/([0-9a-f-]{36})"', page.get_data(as_text=True))
    assert public_id
    other = signed_in(app, idp, other_sub)
    form = {"channel": "email", "to": "x@example.test", "token": "t"}
    for client, link in ((other, public_id.group(1)), (owner, "no-such-link"),
                         (owner, "0" * 36)):
        answer = client.post(f"/shares/{link}/send", data={**form,
                                                           "csrf_token": csrf_of(client)})
        assert answer.status_code == 404, (link, answer.status_code)


# -- STOW part headers with control characters, through a real gunicorn -------------------

BOUNDARY = "bad-input-boundary"


def _stow_body(part_types: list[bytes]) -> bytes:
    chunks = [b"--" + BOUNDARY.encode() + b"\r\nContent-Type: " + t + b"\r\n\r\nnot dicom\r\n"
              for t in part_types]
    return b"".join(chunks) + b"--" + BOUNDARY.encode() + b"--\r\n"


CONTROL_TYPES = [b"text/pl\x00ain", b"text/pl\x7fain", b"text/\x1b[31mred", b"text/a\rb",
                 b"text/\x01\x02\x08", b"text/caf\xe9\x85"]


def _check_warnings(status: int, warnings: list[str]) -> None:
    assert status == 409, status
    assert len(warnings) == len(CONTROL_TYPES), warnings
    for text in warnings:
        assert all(c == "\t" or " " <= c <= "~" for c in text), repr(text)
        assert "is not application/dicom" in text


def test_stow_part_headers_with_control_characters_under_gunicorn(tmp_path: Path) -> None:
    with served(tmp_path / "instance", "stower") as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("POST", "/dicomweb/studies", body=_stow_body(CONTROL_TYPES),
                           headers={**basic_auth(server.client, server.secret),
                                    "Content-Type": 'multipart/related; type="application/'
                                                   f'dicom"; boundary={BOUNDARY}',
                                    "Accept": "application/dicom+json"})
        response = connection.getresponse()
        response.read()
        _check_warnings(response.status, response.headers.get_all("Warning") or [])
        connection.close()


def test_stow_part_headers_with_control_characters_in_process(client: FlaskClient,
                                                              app: Flask) -> None:
    auth = basic_auth(*make_client(app, "stower"))
    answer = client.post("/dicomweb/studies", data=_stow_body(CONTROL_TYPES), headers={
        **auth, "Content-Type": f'multipart/related; type="application/dicom"; '
                                f"boundary={BOUNDARY}", "Accept": "application/dicom+json"})
    _check_warnings(answer.status_code, answer.headers.getlist("Warning"))
    assert _count(app, Instance) == 0


def test_a_csrf_token_with_non_ascii_characters_is_refused(oidc_app: Flask,
                                                           idp: IdentityProvider) -> None:
    """hmac.compare_digest raises TypeError for text with non-ASCII characters."""
    manager, doctor, study = setup(oidc_app, idp)
    csrf_of(manager)
    for token in ("\x80", "é" * 43, "токен"):
        form = manager.post("/admin/grants", data={"user_id": str(doctor), "study_uid": study,
                                                   "csrf_token": token})
        assert form.status_code == 403, (token, form.status_code)
        api = manager.post("/api/grants", json={"user_id": doctor, "study_uid": study},
                           headers={"X-CSRF-Token": token.encode().decode("latin-1")})
        assert api.status_code == 403, (token, api.status_code)
    assert _count(oidc_app, Grant) == 0


def test_a_value_the_database_cannot_hold_is_a_bad_request(tmp_path: Path,
                                                           database_url: str) -> None:
    """The net under the bounded parsing: PostgreSQL's DataError ("bigint out of range") and
    SQLite's OverflowError answer 400 with a reason, and the transaction is rolled back."""
    from portal.access.policy import public
    from portal.db import db

    app = make_app(tmp_path / "instance", database_url)
    try:
        def unbounded() -> str:
            """A route that forgot to bound its number."""
            from flask import request

            from portal.access.models import Practice

            db.session.add(Practice(name="row-" + request.args["n"][:20]))
            db.session.flush()
            db.session.execute(select(User).offset(int(request.args["n"])))
            db.session.commit()
            return "ok"

        app.add_url_rule("/unbounded", view_func=public(unbounded))
        client = app.test_client()
        assert client.get("/unbounded?n=1").status_code == 200
        answer = client.get(f"/unbounded?n={HUGE}", headers={"Accept": "application/json"})
        assert answer.status_code == 400, answer.data
        assert "out of the range" in answer.get_json()["error"]
        with app.extensions["db"].new_session() as session:
            from portal.access.models import Practice

            names = list(session.scalars(select(Practice.name)))
        assert names == ["row-1"]  # nothing half-stored by the refused call
    finally:
        close_app(app)


def test_modalities_in_study_matches_at_every_level(any_db_oidc_app: Flask) -> None:
    """Found by the route walk: at the series and instance levels the study-level key's
    subquery lost its FROM clause (a 500); it now matches the study's series."""
    app = any_db_oidc_app
    study = generate_uid()
    with app.app_context():
        current_archive().ingest(make_instance(study=study, modality="MR"), who="test")
    reader = basic_auth(*make_client(app, "reader"))
    client = app.test_client()
    for level in ("studies", "series", "instances", f"studies/{study}/series",
                  f"studies/{study}/instances"):
        for value, found in (("MR", True), ("M*", True), ("CT\\MR", True), ("US", False)):
            answer = client.get(f"/dicomweb/{level}?ModalitiesInStudy={value}",
                                headers=reader)
            assert answer.status_code == (200 if found else 204), (level, value, answer.data)
