"""The upload inbox over HTTP (issue 19 items 1 and 2): upload links follow share links' rules
(PIN, lock, expiry, revocation) and show nothing; every file is validated as STOW-RS
validates and refused in plain words; ZIPs are checked as a whole; a dropped connection
resumes; quarantined studies are invisible until an office manager accepts them with local
identifiers (originals kept, PS3.3 C.12.1) or rejects them (files deleted, audited)."""

from __future__ import annotations

import io
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from portal.access.models import AuditEvent
from portal.archive import current_archive
from portal.db import utcnow
from portal.inbox.models import InboxInstance, InboxStudy, UploadLink
from portal.index.models import Instance, Patient, Series, Study
from tests.conftest import IdentityProvider, csrf_of, signed_in
from tests.inbox.conftest import (
    LOCAL_ID,
    Inbox,
    make_upload_link,
    open_link,
    outside_instance,
    upload,
    zip_of,
)


def _patient_client(app: Flask, inbox: Inbox) -> tuple[object, str]:
    made = make_upload_link(app, inbox.doctor)
    client = app.test_client()
    answer = open_link(client, made.token, made.pin)
    assert answer.status_code == 303 and answer.headers["Location"].endswith("/u/upload")
    return client, made.link.public_id


def _kept_files(app: Flask) -> list[str]:
    root = app.extensions["inbox"].root / "kept"
    return sorted(p.name for p in root.rglob("*.dcm")) if root.exists() else []


def _waiting(app: Flask) -> list[InboxStudy]:
    with app.extensions["db"].new_session() as session:
        rows = list(session.scalars(select(InboxStudy).where(InboxStudy.state == "waiting")))
        for row in rows:
            _ = row.instances
        return rows


def test_wrong_pin_counts_and_locks_expired_and_revoked_links_refuse(
        any_db_inbox: Inbox) -> None:
    inbox = any_db_inbox
    app = inbox.app
    made = make_upload_link(app, inbox.manager)
    client = app.test_client()
    assert open_link(client, made.token, "").status_code == 401  # no PIN: not counted
    first = open_link(client, made.token, "000000" if made.pin != "000000" else "111111")
    assert first.status_code == 401 and b"2 more times" in first.data
    assert open_link(client, "x" * 43, made.pin).status_code == 404  # unknown token
    # The upload page without an upload session is a plain "ended" page, no upload form.
    assert client.get("/u/upload").status_code == 401
    wrong = "000000" if made.pin != "000000" else "111111"
    open_link(client, made.token, wrong)
    locked = open_link(client, made.token, wrong)
    assert locked.status_code == 403 and b"locked" in locked.data
    assert open_link(client, made.token, made.pin).status_code == 404  # the right PIN, too late
    # Expired and revoked links answer like unknown ones.
    expired = make_upload_link(app, inbox.manager)
    with app.extensions["db"].write_transaction() as session:
        session.execute(update(UploadLink).where(UploadLink.id == expired.link.id)
                        .values(expires_at=utcnow() - timedelta(minutes=1)))
    assert open_link(app.test_client(), expired.token, expired.pin).status_code == 404
    revoked = make_upload_link(app, inbox.manager)
    visitor = app.test_client()
    assert open_link(visitor, revoked.token, revoked.pin).status_code == 303
    assert visitor.get("/u/upload").status_code == 200
    with app.extensions["db"].write_transaction() as session:
        session.execute(update(UploadLink).where(UploadLink.id == revoked.link.id)
                        .values(revoked_at=utcnow()))
    # An open upload session ends with its link: the page and the API refuse at once.
    assert visitor.get("/u/upload").status_code == 401
    refused = visitor.post("/inbox/api/files", json={"name": "a.dcm", "size": 10},
                           headers={"Accept": "application/json"})
    assert refused.status_code == 401 and refused.json["error"]
    assert open_link(app.test_client(), revoked.token, revoked.pin).status_code == 404
    with app.extensions["db"].new_session() as session:
        reasons = [e.details.get("reason") for e in session.scalars(
            select(AuditEvent).where(AuditEvent.who.like("upload:%")))]
    assert reasons.count("wrong PIN") == 3 and "link locked after 3 wrong PINs" in reasons


def test_revoking_through_the_page_ends_the_link(inbox: Inbox, idp: IdentityProvider) -> None:
    app = inbox.app
    made = make_upload_link(app, inbox.manager)
    visitor = app.test_client()
    assert open_link(visitor, made.token, made.pin).status_code == 303
    manager = signed_in(app, idp, "om")
    assert manager.get("/inbox/links").status_code == 200
    answer = manager.post(f"/inbox/links/{made.link.public_id}/revoke",
                          data={"csrf_token": csrf_of(manager)})
    assert answer.status_code == 303
    assert visitor.get("/u/upload").status_code == 401
    # Another practice's office manager cannot revoke (or see) this practice's links.
    again = make_upload_link(app, inbox.manager)
    other = signed_in(app, idp, "other-om")
    assert other.post(f"/inbox/links/{again.link.public_id}/revoke",
                      data={"csrf_token": csrf_of(other)}).status_code == 404


def test_each_file_is_validated_and_refused_in_plain_words(inbox: Inbox) -> None:
    app = inbox.app
    client, _ = _patient_client(app, inbox)
    good = outside_instance()
    kept = upload(client, "CD/DICOM/IM0001", good)
    assert kept["state"] == "done" and kept["results"] == [
        {"name": "CD/DICOM/IM0001", "outcome": "kept", "reason": ""}]
    # The viewer program and the autorun file of a CD: not images.
    exe = upload(client, "CD/viewer.exe", b"MZ\x90\x00" + bytes(300))
    assert exe["results"][0]["outcome"] == "refused"
    assert exe["results"][0]["reason"].startswith("not a medical image file")
    # A DICOM file cut short: damaged (the structural walk STOW-RS uses).
    cut = upload(client, "CD/DICOM/IM0002", good[: len(good) - 100])
    assert cut["results"][0]["outcome"] == "refused"
    assert cut["results"][0]["reason"].startswith("the file is damaged or incomplete")
    # The CD's DICOMDIR is skipped, not refused.
    dicomdir = upload(client, "CD/DICOMDIR", b"\x00" * 200)
    assert dicomdir["results"][0]["outcome"] == "skipped"
    # Nothing reached the archive: the index has only the local study.
    with app.extensions["db"].new_session() as session:
        assert session.scalar(select(func.count(Study.id))) == 1
    [waiting] = _waiting(app)
    assert waiting.patient_id == "EXT-991" and len(waiting.instances) == 1
    assert len(_kept_files(app)) == 1
    with app.extensions["db"].new_session() as session:
        imports = list(session.scalars(select(AuditEvent).where(
            AuditEvent.event_id == "110107")))
    assert len(imports) == 4 and {e.details["refused"] for e in imports} == {0, 1}


def test_a_zip_is_unpacked_and_unsafe_zips_are_refused_whole(inbox: Inbox) -> None:
    app = inbox.app
    client, _ = _patient_client(app, inbox)
    study = generate_uid()
    entries = {f"DICOM/IM{n}": outside_instance(study=study, InstanceNumber=n)
               for n in range(1, 4)}
    answer = upload(client, "cd.zip", zip_of({**entries, "DICOMDIR": b"\x00" * 10,
                                              "README.TXT": b"Viewer inside"}))
    outcomes = {r["name"]: r["outcome"] for r in answer["results"]}
    assert outcomes == {"DICOM/IM1": "kept", "DICOM/IM2": "kept", "DICOM/IM3": "kept",
                        "DICOMDIR": "skipped", "README.TXT": "refused"}
    # Path traversal: the whole ZIP is refused, nothing of it kept.
    before = _kept_files(app)
    evil = upload(client, "evil.zip", zip_of({"../../etc/cron.d/x": outside_instance(),
                                              "ok.dcm": outside_instance()}))
    assert [r["outcome"] for r in evil["results"]] == ["refused"]
    assert "path traversal" in evil["results"][0]["reason"]
    # A bomb: 50 MiB of zeros compress far beyond the allowed ratio.
    bomb = upload(client, "bomb.zip", zip_of({"zeros.dcm": bytes(50 << 20)}),
                  chunk=1 << 20)
    assert [r["outcome"] for r in bomb["results"]] == ["refused"]
    assert "zip bomb" in bomb["results"][0]["reason"]
    assert _kept_files(app) == before
    assert not any((app.extensions["inbox"].root / "parts").iterdir())


def _patched_zip(entries: dict[str, bytes], name: str, *, flags: int | None = None,
                 method: int | None = None, data_byte: bool = False) -> bytes:
    """A stored (uncompressed) ZIP whose entry ``name`` is made unreadable: its central
    directory flags (bit 0: encrypted) or compression method changed, or one byte of its data
    changed (its CRC then fails)."""
    raw = bytearray(zip_of(entries, compression=zipfile.ZIP_STORED))
    header = raw.index(b"PK\x01\x02")
    while raw[header + 46:header + 46 + len(name)] != name.encode():
        header = raw.index(b"PK\x01\x02", header + 4)
    if flags is not None:
        raw[header + 8:header + 10] = flags.to_bytes(2, "little")
    if method is not None:
        raw[header + 10:header + 12] = method.to_bytes(2, "little")
    if data_byte:
        local = int.from_bytes(raw[header + 42:header + 46], "little")
        start = local + 30 + int.from_bytes(raw[local + 26:local + 28], "little") \
            + int.from_bytes(raw[local + 28:local + 30], "little")
        raw[start + 200] ^= 0xFF
    return bytes(raw)


@pytest.mark.parametrize("damage", [{"flags": 1}, {"method": 9}, {"data_byte": True}],
                         ids=["encrypted", "deflate64", "bad-crc"])
def test_an_unreadable_zip_entry_is_refused_in_words_and_the_rest_kept(
        inbox: Inbox, damage: dict[str, Any]) -> None:
    """An encrypted entry, an unsupported method (Deflate64) or a damaged entry (bad CRC): that
    entry is refused with a reason, the others kept; never a 500, no part file left."""
    client, _ = _patient_client(inbox.app, inbox)
    study = generate_uid()
    entries = {"IM1": outside_instance(study=study, InstanceNumber=1),
               "IM2": outside_instance(study=study, InstanceNumber=2)}
    answer = upload(client, "cd.zip", _patched_zip(entries, "IM2", **damage))
    outcomes = {r["name"]: r for r in answer["results"]}
    assert outcomes["IM1"]["outcome"] == "kept"
    assert outcomes["IM2"]["outcome"] == "refused"
    assert "ZIP entry" in outcomes["IM2"]["reason"]
    assert not any((inbox.app.extensions["inbox"].root / "parts").iterdir())


def test_a_dropped_upload_resumes_where_the_server_stopped(inbox: Inbox) -> None:
    app = inbox.app
    client, _ = _patient_client(app, inbox)
    data = outside_instance(rows=256, columns=256)  # 128 KiB of pixels
    headers = {"Accept": "application/json"}
    made = client.post("/inbox/api/files", json={"name": "IM1", "size": len(data)},
                       headers=headers)
    url = f"/inbox/api/files/{made.json['id']}"

    def put(start: int, end: int) -> object:
        return client.put(url, data=data[start:end], headers={
            **headers, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"})

    assert put(0, 50_000).status_code == 200
    # The connection drops: the client does not know whether its next piece arrived.
    assert client.get(url, headers=headers).json["received"] == 50_000
    # A piece that does not start where the server stopped is refused (409), nothing added.
    skipped = put(60_000, 70_000)
    assert skipped.status_code == 409 and "50000" in skipped.json["error"]
    # A lying Content-Range is a 400.
    lying = client.put(url, data=data[50_000:50_010], headers={
        **headers, "Content-Range": f"bytes 50000-50099/{len(data)}"})
    assert lying.status_code == 400
    assert client.get(url, headers=headers).json["received"] == 50_000
    done = put(50_000, len(data))
    assert done.status_code == 200 and done.json["state"] == "done"
    assert [r["outcome"] for r in done.json["results"]] == ["kept"]
    assert len(_waiting(app)) == 1
    with app.extensions["db"].new_session() as session:
        sha = session.scalars(select(InboxInstance.sha256)).one()
    kept = app.extensions["inbox"].read(sha)
    assert pydicom.dcmread(io.BytesIO(kept)).PixelData == pydicom.dcmread(
        io.BytesIO(data)).PixelData


def test_nobody_reaches_someone_elses_uploads_or_inbox(inbox: Inbox,
                                                       idp: IdentityProvider) -> None:
    app = inbox.app
    patient, _ = _patient_client(app, inbox)
    stranger, _ = _patient_client(app, inbox)
    headers = {"Accept": "application/json"}
    data = outside_instance()
    made = patient.post("/inbox/api/files", json={"name": "IM1", "size": len(data)},
                        headers=headers)
    url = f"/inbox/api/files/{made.json['id']}"
    # Another link's visitor and a signed-in physician: no such upload.
    assert stranger.get(url, headers=headers).status_code == 404
    assert stranger.put(url, data=data, headers={
        **headers, "Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"}).status_code == 404
    doctor = signed_in(app, idp, "doc")
    assert doctor.get(url, headers=headers).status_code == 404
    # Nobody without a link or a sign-in uploads.
    assert app.test_client().post("/inbox/api/files", json={"name": "x", "size": 1},
                                  headers=headers).status_code == 401
    upload(patient, "IM1", data)
    [waiting] = _waiting(app)
    # An upload session sees nothing: no study list, no study, no inbox.
    assert patient.get("/studies").status_code in (302, 401)
    assert patient.get(f"/studies/{inbox.local_study}").status_code in (302, 401, 404)
    assert patient.get("/inbox").status_code in (302, 401, 404)
    # The inbox is the practice's office managers' only.
    assert doctor.get("/inbox").status_code == 404
    assert doctor.get(f"/inbox/studies/{waiting.public_id}").status_code == 404
    other = signed_in(app, idp, "other-om")
    assert b"Nothing waits" in other.get("/inbox").data
    assert other.get(f"/inbox/studies/{waiting.public_id}").status_code == 404
    token = csrf_of(other)
    with app.extensions["db"].new_session() as session:
        local = session.scalars(select(Patient.id).where(Patient.patient_id == LOCAL_ID)).one()
    assert other.post(f"/inbox/studies/{waiting.public_id}/accept",
                      data={"csrf_token": token, "patient": local}).status_code == 404
    assert other.post(f"/inbox/studies/{waiting.public_id}/reject",
                      data={"csrf_token": token}).status_code == 404
    assert len(_waiting(app)) == 1 and len(_kept_files(app)) == 1


def test_accepting_reconciles_identity_and_rejecting_deletes(
        any_db_inbox: Inbox, idp: IdentityProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    from portal.inbox import reconcile

    monkeypatch.setattr(reconcile, "ACCEPT_BATCH", 1)  # the two images in two batches
    inbox = any_db_inbox
    app = inbox.app
    patient, _ = _patient_client(app, inbox)
    first, second = generate_uid(), generate_uid()
    for n in (1, 2):
        upload(patient, f"A/IM{n}", outside_instance(study=first, InstanceNumber=n))
    upload(patient, "B/IM1", outside_instance(study=second, patient_id="NOBODY-1",
                                              name="Stranger^Sam", birth="19990101"))
    by_uid = {s.study_instance_uid: s for s in _waiting(app)}
    manager = signed_in(app, idp, "om")
    page = manager.get(f"/inbox/studies/{by_uid[first].public_id}").data.decode()
    # The local patient is suggested (same birth date, the same name written otherwise).
    assert "LOCAL-77" in page and "same birth date" in page and "same family name" in page
    with app.extensions["db"].new_session() as session:
        local = session.scalars(select(Patient.id).where(Patient.patient_id == LOCAL_ID)).one()
    # Not the practice's patient: refused.
    with app.extensions["db"].new_session() as session:
        foreign = session.scalar(select(func.max(Patient.id))) + 1000
    token = csrf_of(manager)
    assert manager.post(f"/inbox/studies/{by_uid[first].public_id}/accept",
                        data={"csrf_token": token, "patient": foreign}).status_code == 400
    answer = manager.post(f"/inbox/studies/{by_uid[first].public_id}/accept",
                          data={"csrf_token": token, "patient": local,
                                "accession": "LOC-2026-1", "give_to": inbox.doctor})
    assert answer.status_code == 303
    with app.extensions["db"].new_session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == first)).one()
        assert study.patient.patient_id == LOCAL_ID
        assert study.accession_number == "LOC-2026-1"
        sops = list(session.scalars(select(Instance.sop_instance_uid).join(Series).where(
            Series.study_fk == study.id)))
    assert len(sops) == 2
    with app.app_context():
        ds = pydicom.dcmread(io.BytesIO(current_archive().read(sops[0])))
    assert ds.PatientID == LOCAL_ID and str(ds.PatientName) == "Müller^Anna"
    assert ds.AccessionNumber == "LOC-2026-1" and "IssuerOfPatientID" not in ds
    [other_id] = ds.OtherPatientIDsSequence
    assert (other_id.PatientID, other_id.IssuerOfPatientID) == ("EXT-991", "OTHER-HOSPITAL")
    [changed] = ds.OriginalAttributesSequence
    assert changed.ReasonForTheAttributeModification == "COERCE"
    [original] = changed.ModifiedAttributesSequence
    assert (original.PatientID, original.AccessionNumber,
            str(original.PatientName)) == ("EXT-991", "EXT-ACC-5", "MUELLER^ANNA")
    # The physician sees it now, with the local patient ID.
    doctor = signed_in(app, idp, "doc")
    shown = doctor.get(f"/studies/{first}")
    assert shown.status_code == 200 and LOCAL_ID in shown.data.decode()
    # Reject the other: its files are gone, it never reached the index.
    assert manager.post(f"/inbox/studies/{by_uid[second].public_id}/reject",
                        data={"csrf_token": token, "reason": "not our patient"}
                        ).status_code == 303
    assert _waiting(app) == [] and _kept_files(app) == []
    assert doctor.get(f"/studies/{second}").status_code == 404
    with app.extensions["db"].new_session() as session:
        assert session.scalar(select(func.count(Study.id)).where(
            Study.study_instance_uid == second)) == 0
        events = {(e.event_id, e.study_instance_uid): e for e in session.scalars(
            select(AuditEvent).where(AuditEvent.study_instance_uid.in_([first, second])))}
    assert events[("110105", second)].details["reason"] == "not our patient"
    assert events[("110107", first)].details["original_patient_id"] == "EXT-991"
    assert ("110104", first) in events  # the normal ingest path recorded its arrival
    listing = manager.get("/inbox").data.decode()
    assert "accepted as patient LOCAL-77" in listing and "rejected, files deleted" in listing


def test_a_signed_in_physician_uploads_into_his_practices_inbox(inbox: Inbox,
                                                                idp: IdentityProvider) -> None:
    app = inbox.app
    doctor = signed_in(app, idp, "doc")
    assert doctor.get("/inbox/upload").status_code == 200
    data = outside_instance()
    # The session cookie rides along: without the CSRF token nothing is announced.
    refused = doctor.post("/inbox/api/files", json={"name": "IM1", "size": len(data)},
                          headers={"Accept": "application/json"})
    assert refused.status_code == 403
    answer = upload(doctor, "IM1", data, headers={"X-CSRF-Token": csrf_of(doctor)})
    assert [r["outcome"] for r in answer["results"]] == ["kept"]
    [waiting] = _waiting(app)
    assert waiting.uploaded_by.startswith("user:") and waiting.uploaded_by.endswith("|doc")
    assert waiting.link_fk is None
    # Patients and people of no practice upload nothing: there is no inbox of theirs.
    from tests.conftest import add_person

    add_person(app, idp, "loner", ["physician"], None, name="Dr Loner")
    loner = signed_in(app, idp, "loner")
    assert loner.get("/inbox/upload").status_code == 404
    assert loner.post("/inbox/api/files", json={"name": "IM1", "size": len(data)},
                      headers={"Accept": "application/json",
                               "X-CSRF-Token": csrf_of(loner)}).status_code == 401


def test_an_upload_link_cannot_fill_the_disk(inbox: Inbox) -> None:
    app = inbox.app
    client, _ = _patient_client(app, inbox)
    headers = {"Accept": "application/json"}
    most = app.extensions["inbox"].max_upload_bytes
    too_big = client.post("/inbox/api/files", json={"name": "dvd.iso", "size": most + 1},
                          headers=headers)
    assert too_big.status_code == 400 and "larger than" in too_big.json["error"]
    assert client.post("/inbox/api/files", json={"name": "a.zip", "size": most},
                       headers=headers).status_code == 201
    # Announced is counted: the link has taken all it may, even before the bytes come.
    more = client.post("/inbox/api/files", json={"name": "b.dcm", "size": 1},
                       headers=headers)
    assert more.status_code == 400 and "new one" in more.json["error"]
    for body in ({"name": "x"}, {"name": 1, "size": 1}, {"name": "x", "size": True}, []):
        assert client.post("/inbox/api/files", json=body,
                           headers=headers).status_code == 400


def test_a_complete_file_whose_check_died_is_checked_on_request(inbox: Inbox) -> None:
    """The request carrying the last piece wrote it, then died before checking (a worker's
    timeout): the page asks with ``Content-Range: bytes */total`` and gets the outcome; while
    another request is checking, the answer is a 409 to ask again."""
    import fcntl

    app = inbox.app
    client, _ = _patient_client(app, inbox)
    data = outside_instance(rows=128, columns=128)
    headers = {"Accept": "application/json"}
    made = client.post("/inbox/api/files", json={"name": "IM1", "size": len(data)},
                       headers=headers)
    url = f"/inbox/api/files/{made.json['id']}"
    half = len(data) // 2
    assert client.put(url, data=data[:half], headers={
        **headers, "Content-Range": f"bytes 0-{half - 1}/{len(data)}"}).status_code == 200
    early = client.put(url, data=b"", headers={**headers,
                                               "Content-Range": f"bytes */{len(data)}"})
    assert early.status_code == 400  # not complete: nothing to check
    part = app.extensions["inbox"].root / "parts" / made.json["id"]
    with part.open("ab") as fh:  # the died request's last piece, on disk
        fh.write(data[half:])
    status = client.get(url, headers=headers).json
    assert status["received"] == len(data) and status["state"] == "receiving"
    with part.open("rb") as busy:
        fcntl.flock(busy.fileno(), fcntl.LOCK_EX)
        checking = client.put(url, data=b"", headers={
            **headers, "Content-Range": f"bytes */{len(data)}"})
        assert checking.status_code == 409
    done = client.put(url, data=b"", headers={**headers,
                                              "Content-Range": f"bytes */{len(data)}"})
    assert done.status_code == 200 and done.json["state"] == "done"
    assert [r["outcome"] for r in done.json["results"]] == ["kept"]
    assert not part.exists() and len(_kept_files(app)) == 1
    again = client.put(url, data=b"", headers={**headers,
                                               "Content-Range": f"bytes */{len(data)}"})
    assert again.status_code == 200 and len(_kept_files(app)) == 1


def test_abandoned_uploads_are_swept(inbox: Inbox) -> None:
    app = inbox.app
    client, _ = _patient_client(app, inbox)
    headers = {"Accept": "application/json"}
    data = outside_instance()
    made = client.post("/inbox/api/files", json={"name": "IM1", "size": len(data)},
                       headers=headers)
    url = f"/inbox/api/files/{made.json['id']}"
    assert client.put(url, data=data[:100], headers={
        **headers, "Content-Range": f"bytes 0-99/{len(data)}"}).status_code == 200
    part = app.extensions["inbox"].root / "parts" / made.json["id"]
    assert part.stat().st_size == 100
    from portal.inbox.models import InboxFile

    with app.extensions["db"].write_transaction() as session:
        session.execute(update(InboxFile).values(created_at=utcnow() - timedelta(days=8)))
    # The next announcement, by anybody, sweeps it.
    client.post("/inbox/api/files", json={"name": "IM2", "size": 10}, headers=headers)
    assert not part.exists()
    gone = client.get(url, headers=headers).json
    assert gone["state"] == "abandoned" and "send it again" in gone["results"][0]["reason"]
    assert client.put(url, data=data[100:200], headers={
        **headers, "Content-Range": f"bytes 100-199/{len(data)}"}).json["state"] == "abandoned"


def test_a_patient_new_to_the_practice_gets_a_local_id(inbox: Inbox,
                                                      idp: IdentityProvider) -> None:
    app = inbox.app
    patient, _ = _patient_client(app, inbox)
    study = generate_uid()
    upload(patient, "IM1", outside_instance(study=study, patient_id="EXT-5", name="New^Nora",
                                            birth="20010203", accession="X-1"))
    [waiting] = _waiting(app)
    manager = signed_in(app, idp, "om")
    page = manager.get(f"/inbox/studies/{waiting.public_id}").data.decode()
    assert "No patient of the practice matches" in page
    token = csrf_of(manager)
    url = f"/inbox/studies/{waiting.public_id}/accept"
    # A taken ID (the archive's patient LOCAL-77) and a malformed one are refused.
    for taken in (LOCAL_ID, "../x", ""):
        assert manager.post(url, data={"csrf_token": token, "patient": "new",
                                       "new_patient_id": taken}).status_code == 400
    assert len(_waiting(app)) == 1
    answer = manager.post(url, data={"csrf_token": token, "patient": "new",
                                     "new_patient_id": "LOCAL-NEW-1",
                                     "give_to": inbox.doctor})
    assert answer.status_code == 303
    with app.extensions["db"].new_session() as session:
        row = session.scalars(select(Study).where(Study.study_instance_uid == study)).one()
        assert (row.patient.patient_id, row.patient.patient_name,
                row.patient.patient_birth_date) == ("LOCAL-NEW-1", "New^Nora", "20010203")
        assert row.accession_number == ""
    doctor = signed_in(app, idp, "doc")
    assert "LOCAL-NEW-1" in doctor.get(f"/studies/{study}").data.decode()


def test_uploads_stop_cleanly_before_the_disk_is_full(inbox: Inbox) -> None:
    """ARCHIVE_MIN_FREE holds for the inbox's disk too: 507 with the reason, nothing kept; a
    link's visitor is told no sizes of the practice's disk."""
    import dataclasses

    from portal.archive.space import SpaceRule
    from portal.inbox.models import InboxFile

    app = inbox.app
    client, _ = _patient_client(app, inbox)
    q = app.extensions["inbox"]
    assert q.space_rule == app.extensions["archive"].store.space_rule  # the archive's rule
    app.extensions["inbox"] = dataclasses.replace(q, space_rule=SpaceRule("99.9%", "99.9%"))
    full = client.post("/inbox/api/files", json={"name": "IM1", "size": 1000},
                       headers={"Accept": "application/json"})
    assert full.status_code == 507
    assert full.json["error"] == "the practice cannot take files now; try again later"
    with app.extensions["db"].new_session() as session:
        assert session.scalar(select(func.count(InboxFile.id))) == 0


def test_openings_from_one_address_are_limited(tmp_path: Path,
                                               idp: IdentityProvider) -> None:
    """As share links: more openings from one address than SHARE_ATTEMPTS_PER_ADDRESS within
    ten minutes are refused (429) before any PIN is compared."""
    from tests.conftest import OIDC_SETTINGS, close_app, make_app
    from tests.inbox.conftest import build_inbox

    app = make_app(tmp_path / "instance", OIDC_ISSUER=idp.issuer,
                   SHARE_ATTEMPTS_PER_ADDRESS=2, **OIDC_SETTINGS)
    try:
        inbox = build_inbox(app, idp)
        made = make_upload_link(app, inbox.manager)
        client = app.test_client()
        assert open_link(client, "y" * 43, "123456").status_code == 404
        assert open_link(client, "z" * 43, "123456").status_code == 404
        refused = open_link(client, made.token, made.pin)  # the right PIN, too many tries
        assert refused.status_code == 429 and b"Too many tries" in refused.data
        with app.extensions["db"].new_session() as session:
            link = session.get(UploadLink, made.link.id)
            assert link is not None and link.failed_attempts == 0 and link.use_count == 0
    finally:
        close_app(app)


def test_hostile_files_never_leave_quarantine_as_sent(inbox: Inbox) -> None:
    """A polyglot (an executable in the preamble, CVE-2019-11687) is kept only with its
    preamble zeroed; an object of a class the archive does not store is refused."""
    app = inbox.app
    client, _ = _patient_client(app, inbox)
    clean = outside_instance()
    polyglot = b"MZ\x90\x00This program cannot be run in DOS mode".ljust(128, b"\x00") \
        + clean[128:]
    assert upload(client, "IM1", polyglot)["results"][0]["outcome"] == "kept"
    with app.extensions["db"].new_session() as session:
        sha = session.scalars(select(InboxInstance.sha256)).one()
    kept = app.extensions["inbox"].read(sha)
    assert kept[:128] == bytes(128) and kept[128:] == clean[128:]
    directory = outside_instance(SOPClassUID="1.2.840.10008.1.3.10")  # a Media Storage Directory
    ds = pydicom.dcmread(io.BytesIO(directory))
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    refused = upload(client, "DIR2", buffer.getvalue())["results"][0]
    assert refused["outcome"] == "refused"
    assert refused["reason"].startswith("this kind of DICOM object is not taken")
