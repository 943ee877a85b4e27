"""Refused accesses leave a trace (SECURITY.md 40, (b) 1 and 24): a request for another
patient's object, a missing one, refused credentials and a share visitor's forbidden
download each add one failed record to the audit trail, and the answers stay uniform."""

from __future__ import annotations

from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import select

from portal.access.models import AuditEvent
from tests.access.test_policy import World, browser, world  # noqa: F401 (fixture)
from tests.conftest import basic_auth, make_client
from tests.sharing.conftest import build_world, make_share, open_link


def _failures(app: Flask, event_id: str = "110103") -> list[AuditEvent]:
    with app.extensions["db"].new_session() as session:
        return list(session.scalars(select(AuditEvent).where(
            AuditEvent.event_id == event_id, AuditEvent.outcome != 0).order_by(AuditEvent.id)))


def test_foreign_and_missing_objects_are_recorded_as_refused(world: World) -> None:  # noqa: F811
    house = browser(world, "house")
    foreign, foreign_series, foreign_sop = world.studies["s3"]
    own = world.studies["s1"][0]
    missing = generate_uid()
    paths = [
        (f"/studies/{foreign}", foreign),
        (f"/dicomweb/studies/{foreign}/metadata", foreign),
        (f"/dicomweb/studies/{foreign}/series/{foreign_series}/instances/{foreign_sop}"
         "/rendered", foreign),
        (f"/studies/{foreign}/view/{foreign_series}", foreign),
        (f"/dicomweb/studies/{own}/series/{foreign_series}/metadata", own),  # hierarchy mix
        (f"/studies/{foreign}/download.zip", foreign),
        (f"/studies/{missing}", missing),
        (f"/dicomweb/studies/{missing}/metadata", missing),
    ]
    bodies = set()
    for path, _study in paths:
        response = house.get(path)
        assert response.status_code == 404, path
        if path.startswith("/dicomweb"):
            bodies.add(response.data.replace(b"series", b"study"))
    rows = _failures(world.app)
    assert len(rows) == len(paths), [(r.study_instance_uid, r.details) for r in rows]
    for row, (path, study) in zip(rows, paths, strict=True):
        assert row.who.startswith("user:") and "|house-" in row.who, row.who
        assert row.action == "R" and row.outcome == 4, path
        assert row.study_instance_uid == study, path
        assert row.source_address == "127.0.0.1"
    # Existence is not revealed: a denied study and a missing one read the same.
    assert house.get(f"/studies/{foreign}").data.count(b"no such") == house.get(
        f"/studies/{missing}").data.count(b"no such")
    # A garbage UID is refused without being copied into the trail.
    assert house.get("/studies/=HYPERLINK(1)").status_code == 404
    assert _failures(world.app)[-1].study_instance_uid == ""


def test_foreign_report_reads_are_recorded(world: World) -> None:  # noqa: F811
    house = browser(world, "house")
    own = world.studies["s1"][0]
    assert house.get(f"/studies/{own}/reports/999999.pdf").status_code == 404
    assert house.get("/fhir/DiagnosticReport/999999").status_code == 404
    rows = _failures(world.app)
    assert [r.details["refused"] for r in rows] == ["report", "report"]
    assert rows[0].study_instance_uid == own


def test_refused_credentials_are_recorded_as_failed_authentication(app: Flask) -> None:
    name, _secret = make_client(app, "reader")
    client = app.test_client()
    attempts = [basic_auth(name, "wrong-secret"), basic_auth("nobody", "x"),
                {"Authorization": "Bearer not-a-token"},
                {"Authorization": "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."}]
    for headers in attempts:
        assert client.get("/dicomweb/studies", headers=headers).status_code == 401
    rows = _failures(app, "110114")
    assert len(rows) == len(attempts)
    assert [r.details["scheme"] for r in rows] == ["basic", "basic", "bearer", "bearer"]
    assert all(r.details["type"] == "110122" and r.who == "unknown" for r in rows)
    # Nothing of the secret reaches the trail.
    assert not any("wrong-secret" in str(r.details) for r in rows)


def test_a_share_visitors_refused_download_is_recorded(app: Flask) -> None:
    shared = build_world(app)
    made = make_share(shared, can_download=False)
    visitor = app.test_client()
    assert open_link(visitor, made.token, made.pin).status_code == 303
    assert visitor.get(f"/studies/{shared.study}/download.zip").status_code == 403
    assert visitor.get("/orders").status_code == 404
    rows = _failures(app)
    assert [r.details["refused"] for r in rows] == ["download", "page"]
    assert rows[0].who == f"share:{made.link.public_id}"
    assert rows[0].study_instance_uid == shared.study
