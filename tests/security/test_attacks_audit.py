"""Refused accesses leave a trace (docs/security.md 40, (b) 1 and 24): a request for another
patient's object, a missing one, refused credentials and a share visitor's forbidden
download each add one failed record to the audit trail, and the answers stay uniform.
So does every refused upload (STOW-RS part, C-STORE, imported file): one 110107 Import
record with a failed outcome, its reason without the file's content, nothing stored."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from pydicom.uid import generate_uid
from pynetdicom.association import Association
from sqlalchemy import func, select

from portal.access.models import AuditEvent
from portal.archive.models import StoredObject
from tests.access.test_policy import World, browser, world  # noqa: F401 (fixture)
from tests.archive.test_dimse import Scp, association, c_store, scp  # noqa: F401 (fixtures)
from tests.conftest import basic_auth, make_client
from tests.factories import make_dataset, make_instance, to_bytes
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


def _stored(app: Flask) -> int:
    with app.extensions["db"].new_session() as session:
        return session.scalar(select(func.count()).select_from(StoredObject)) or 0


def _short_pixels(**kwargs: Any) -> bytes:
    ds = make_dataset(**kwargs)
    ds.Rows = ds.Columns = 100
    ds.PixelData = bytes(10)
    return to_bytes(ds)


def _without_phi(rows: list[AuditEvent]) -> None:
    for row in rows:
        text = f"{row.details} {row.patient_id} {row.who}"
        assert "Doe" not in text and "PAT-1" not in text and "19700101" not in text, text


def test_every_refused_stow_part_is_audited_and_nothing_is_stored(
        client: FlaskClient, auth: dict[str, str], app: Flask) -> None:
    study = generate_uid()
    good = make_instance(study=study)
    truncated = make_instance(study=study)[:900]
    parts = [("application/dicom", good),
             ("application/dicom", b"Doe^Jane PAT-1 is not a DICOM file" * 5),
             ("text/plain", b"Doe^Jane"),
             ("application/dicom", truncated),
             ("application/dicom", _short_pixels(study=study)),
             ("application/dicom", make_instance())]  # another study than the URL names
    body = b"".join(f"--b0\r\nContent-Type: {kind}\r\n\r\n".encode() + data + b"\r\n"
                    for kind, data in parts) + b"--b0--\r\n"
    response = client.post(f"/dicomweb/studies/{study}", data=body, headers={
        **auth, "Content-Type": 'multipart/related; type="application/dicom"; boundary=b0'})
    assert response.status_code == 202
    rows = _failures(app, "110107")
    assert [r.details["reason"] for r in rows] == [
        "part type text/plain is not application/dicom",
        "not a DICOM Part 10 file (no 'DICM' prefix after the preamble)",
        "malformed DICOM",  # what the parser said after the colon may quote the data
        "pixel data has 10 bytes but 100x100x1 needs 20000",
        "the instance belongs to a different study than the URL names"]
    assert all(r.who == "machine:tester" and r.source_address == "127.0.0.1"
               and r.action == "C" and r.outcome == 4 for r in rows)
    assert rows[0].details == {"reason": rows[0].details["reason"], "status": "0xC000",
                               "received_sha256": hashlib.sha256(b"Doe^Jane").hexdigest(),
                               "size": 8}
    assert rows[3].details["status"] == "0xA900" and rows[3].details["sop_instance_uid"]
    _without_phi(rows)
    assert _stored(app) == 1
    assert len(list(app.extensions["archive"].store.keys())) == 1


def test_a_conflict_stays_one_security_alert(client: FlaskClient, auth: dict[str, str],
                                             app: Flask) -> None:
    sop, study, series = generate_uid(), generate_uid(), generate_uid()
    headers = {**auth, "Content-Type": 'multipart/related; type="application/dicom"; '
                                       "boundary=b0"}
    for value in (0, 1):
        data = make_instance(sop=sop, study=study, series=series, value=value)
        client.post("/dicomweb/studies", headers=headers,
                    data=b"--b0\r\n\r\n" + data + b"\r\n--b0--\r\n")
    assert len(_failures(app, "110113")) == 1 and _failures(app, "110107") == []


def test_a_refused_c_store_is_audited(scp: Scp, association: Association) -> None:  # noqa: F811
    assert c_store(association, make_dataset(rows=100, columns=100, PixelData=bytes(10))) \
        == 0xA900
    rows = _failures(scp.app, "110107")
    assert len(rows) == 1
    assert rows[0].who == "dimse:STORESCU" and rows[0].source_address == "127.0.0.1"
    assert rows[0].details["reason"].startswith("pixel data has 10 bytes")
    _without_phi(rows)
    assert _stored(scp.app) == 0 and list(scp.archive.store.keys()) == []


def test_every_refused_imported_file_is_audited(tmp_path: Path) -> None:
    from tests.conftest import close_app, make_app

    app = make_app(tmp_path / "instance", MAX_INSTANCE_BYTES=64 << 10)
    try:
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "Doe^Jane.dcm").write_bytes(b"not DICOM")
        (tmp_path / "in" / "cut.dcm").write_bytes(make_instance()[:900])
        (tmp_path / "in" / "big.dcm").write_bytes(make_instance(rows=256, columns=256))
        (tmp_path / "in" / "good.dcm").write_bytes(make_instance())
        with zipfile.ZipFile(tmp_path / "in" / "evil.zip", "w") as zf:
            zf.writestr("../Doe^Jane/escape.dcm", make_instance())
        result = app.test_cli_runner().invoke(args=["archive", "import", str(tmp_path / "in")])
        assert result.exit_code == 1 and "rejected: 4" in result.output
        rows = _failures(app, "110107")
        assert sorted(r.details["reason"] for r in rows) == [
            "file is larger than the instance size limit", "malformed DICOM",
            "not a DICOM Part 10 file (no 'DICM' prefix after the preamble)",
            "unsafe entry name (an entry) (path traversal)"]
        assert all(r.who == "cli:import" and r.source_address == "cli" for r in rows)
        _without_phi(rows)  # the file's name (here a patient's) is not recorded either
        assert _stored(app) == 1
    finally:
        close_app(app)
