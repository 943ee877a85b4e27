"""Inbox fixtures: a practice ("Clinic") with an office manager and a physician who may see
one local patient's study, another practice's office manager, upload links made through the
service, and a helper that uploads a file in chunks as static/js/inbox_upload.js does."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from pydicom.uid import generate_uid

from portal.access.grants import create_grant
from portal.access.models import User
from portal.access.principal import Principal, user_principal
from portal.archive import current_archive
from portal.inbox import links
from portal.sharing.routes import share_policy
from tests.conftest import OIDC_SETTINGS, IdentityProvider, add_person, close_app, make_app
from tests.factories import make_instance

ADMIN = Principal("user", 0, "setup", roles=frozenset({"office_manager"}), issuer="t",
                  subject="t")
LOCAL_ID, LOCAL_NAME, LOCAL_BIRTH = "LOCAL-77", "Müller^Anna", "19800214"


@dataclass
class Inbox:
    """The practice and its people (user ids), and the local patient's study."""

    app: Flask
    manager: int
    doctor: int
    other_manager: int
    local_study: str


@pytest.fixture
def inbox_app(tmp_path: Path, idp: IdentityProvider) -> Iterator[Flask]:
    """The app signing people in at the mock provider, with few PIN attempts."""
    application = make_app(tmp_path / "instance", OIDC_ISSUER=idp.issuer,
                           SHARE_MAX_FAILED_PINS=3, **OIDC_SETTINGS)
    yield application
    close_app(application)


def build_inbox(app: Flask, idp: IdentityProvider, prefix: str = "") -> Inbox:
    """People of two practices; the Clinic's physician may see the local patient's study."""
    manager = add_person(app, idp, f"{prefix}om", ["office_manager"], "Clinic",
                         name="Olga Manager")
    doctor = add_person(app, idp, f"{prefix}doc", ["physician"], "Clinic", name="Dr Gregory")
    other = add_person(app, idp, f"{prefix}other-om", ["office_manager"], "Other",
                       name="Otto Other")
    study = generate_uid()
    with app.app_context():
        current_archive().ingest(make_instance(study=study, patient_id=LOCAL_ID,
                                               patient_name=LOCAL_NAME,
                                               PatientBirthDate=LOCAL_BIRTH), who="test")
    with app.test_request_context(), app.extensions["db"].write_transaction() as session:
        create_grant(session, ADMIN, user_id=doctor, study_uid=study)
    return Inbox(app, manager, doctor, other, study)


@pytest.fixture
def any_db_inbox(tmp_path: Path, idp: IdentityProvider, database_url: str) -> Iterator[Inbox]:
    """The two practices, once on SQLite and once on PostgreSQL."""
    application = make_app(tmp_path / "instance", database_url, OIDC_ISSUER=idp.issuer,
                           SHARE_MAX_FAILED_PINS=3, **OIDC_SETTINGS)
    yield build_inbox(application, idp)
    close_app(application)


@pytest.fixture
def inbox(inbox_app: Flask, idp: IdentityProvider) -> Inbox:
    """The two practices on SQLite."""
    return build_inbox(inbox_app, idp)


def principal_of(app: Flask, user_id: int) -> Principal:
    """The principal of a registered person."""
    with app.extensions["db"].new_session() as session:
        user = session.get(User, user_id)
        assert user is not None
        return user_principal(user, "session")


def make_upload_link(app: Flask, user_id: int, for_whom: str = "Anna Müller",
                     days: int = 7) -> links.NewUploadLink:
    """An upload link made by this person (committed)."""
    actor = principal_of(app, user_id)
    with app.test_request_context(), app.extensions["db"].write_transaction() as session:
        made = links.create_link(session, actor, share_policy(), for_whom=for_whom, days=days)
        session.expunge(made.link)
        return made


def open_link(client: FlaskClient, token: str, pin: str) -> Any:
    """Exchange token and PIN as the landing page's form does."""
    return client.post("/u/exchange", data={"token": token, "pin": pin})


def outside_instance(*, study: str | None = None, patient_id: str = "EXT-991",
                     name: str = "MUELLER^ANNA", birth: str = "19800214",
                     accession: str = "EXT-ACC-5", **extra: Any) -> bytes:
    """A study made at another hospital: its own patient ID and accession number."""
    return make_instance(study=study or generate_uid(), patient_id=patient_id,
                         patient_name=name, PatientBirthDate=birth,
                         AccessionNumber=accession, IssuerOfPatientID="OTHER-HOSPITAL",
                         ReferringPhysicianName="Outside^Doctor", **extra)


def upload(client: FlaskClient, name: str, data: bytes, chunk: int = 64 * 1024,
           headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Announce, then send every chunk with Content-Range; the last answer as JSON."""
    extra = {"Accept": "application/json", **(headers or {})}
    made = client.post("/inbox/api/files", json={"name": name, "size": len(data)},
                       headers=extra)
    assert made.status_code == 201, made.data
    url = f"/inbox/api/files/{made.json['id']}"
    answer: Any = None
    for start in range(0, len(data), chunk):
        piece = data[start:start + chunk]
        answer = client.put(url, data=piece, headers={
            **extra, "Content-Type": "application/octet-stream",
            "Content-Range": f"bytes {start}-{start + len(piece) - 1}/{len(data)}"})
        assert answer.status_code == 200, answer.data
    return dict(json.loads(answer.data))


def zip_of(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A ZIP file with these entries."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()
