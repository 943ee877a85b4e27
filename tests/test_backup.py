"""`flask --app app backup DIR` and `restore DIR`: a round trip on SQLite and PostgreSQL onto a
fresh instance, a backup taken while uploads run, and damaged backups refused whole; studies
waiting in the upload inbox travel with their quarantined files and are accepted afterwards."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import inspect, select

from portal import create_app
from portal.access.models import AuditEvent
from portal.archive.models import CachedCopy, StoredObject
from portal.inbox.models import InboxStudy
from portal.index.models import Instance, Patient, Series, Study
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    PostgresCluster,
    close_app,
    csrf_of,
    make_app,
    signed_in,
    wait_for,
)
from tests.factories import make_instance
from tests.inbox.conftest import (
    LOCAL_ID,
    build_inbox,
    make_upload_link,
    open_link,
    outside_instance,
    upload,
)

KEY = "k" * 40  # AUDIT_CHECKPOINT_KEY: the checkpoint file travels with the backup


def _uids(app: Flask) -> set[tuple[str, str, str]]:
    with app.extensions["db"].new_session() as session:
        return {tuple(row) for row in session.execute(
            select(Study.study_instance_uid, Series.series_instance_uid,
                   Instance.sop_instance_uid)
            .join(Series, Series.study_fk == Study.id)
            .join(Instance, Instance.series_fk == Series.id))}


def _bytes(app: Flask) -> dict[str, bytes]:
    archive = app.extensions["archive"]
    with app.extensions["db"].new_session() as session:
        uids = list(session.scalars(select(StoredObject.sop_instance_uid)))
    return {uid: archive.read(uid) for uid in uids}


def _events(app: Flask, event_id: str) -> list[dict[str, Any]]:
    with app.extensions["db"].new_session() as session:
        return [e.details for e in session.scalars(
            select(AuditEvent).where(AuditEvent.event_id == event_id).order_by(AuditEvent.id))]


def _fill(app: Flask, studies: int = 2, per_study: int = 3) -> None:
    archive = app.extensions["archive"]
    for _ in range(studies):
        study, series = generate_uid(), generate_uid()
        answers = archive.ingest_many([make_instance(study=study, series=series, value=i)
                                       for i in range(per_study)], who="test")
        assert all(a.outcome == "stored" for a in answers)


def _fresh(tmp_path: Path, name: str, url: str | None, **extra: Any) -> Flask:
    """A fresh machine: an empty instance folder and an empty (not even migrated) database."""
    settings: dict[str, Any] = {"INSTANCE_PATH": str(tmp_path / name), "ENV": "test",
                                "SECRET_KEY": "test-secret-key-that-is-long-enough-123456",
                                "AUDIT_CHECKPOINT_KEY": KEY, **extra}
    if url:
        settings["DATABASE_URL"] = url
    (tmp_path / name).mkdir()
    return create_app(settings)


@pytest.fixture
def source(tmp_path: Path, database_url: str) -> Iterator[Flask]:
    app = make_app(tmp_path / "source", database_url, AUDIT_CHECKPOINT_KEY=KEY)
    yield app
    close_app(app)


def _target_url(tmp_path: Path, source: Flask, request: pytest.FixtureRequest) -> str | None:
    if source.extensions["db"].engine.dialect.name == "sqlite":
        return None
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.new_database()


def test_round_trip_onto_a_fresh_machine(source: Flask, tmp_path: Path,
                                         request: pytest.FixtureRequest) -> None:
    _fill(source)
    # One instance is only a local copy of an external archive's: its row goes, not its file.
    with source.extensions["db"].write_transaction() as session:
        copy = session.scalars(select(StoredObject).limit(1)).one()
        session.add(CachedCopy(sop_instance_uid=copy.sop_instance_uid, size=copy.size))
        left_out = copy.sop_instance_uid
    runner = source.test_cli_runner()
    assert runner.invoke(args=["audit", "checkpoint"]).exit_code == 0
    result = runner.invoke(args=["backup", str(tmp_path / "backup")])
    assert result.exit_code == 0, result.output
    assert "2 studies, 6 instances, 5 files" in result.output
    assert "1 local copies of the external archive's instances left out" in result.output
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    assert manifest["format"] == "portal-backup/1" and len(manifest["files"]) == 5
    assert manifest["audit_chain_head"]["count"] > 0
    expected_uids, expected_bytes = _uids(source), _bytes(source)
    del expected_bytes[left_out]

    target = _fresh(tmp_path, "target", _target_url(tmp_path, source, request))
    try:
        runner = target.test_cli_runner()
        result = runner.invoke(args=["restore", str(tmp_path / "backup")])
        assert result.exit_code == 0, result.output
        assert "restored 2 studies, 6 instances, 5 files" in result.output
        assert _uids(target) == expected_uids
        assert _bytes(target) == expected_bytes
        verify = runner.invoke(args=["archive", "verify"])
        assert verify.exit_code == 0 and "0 problem(s) found" in verify.output, verify.output
        trail = runner.invoke(args=["audit", "verify"])
        assert trail.exit_code == 0 and "audit trail intact" in trail.output, trail.output
        assert "newest signed checkpoint" in trail.output  # the checkpoint file came along
        # The backup is in the source's trail, the restore in the target's.
        assert _events(source, "110106")[-1]["type"] == "backup"
        assert _events(target, "110100")[-1]["type"] == "restore"
        # The same backup again onto the restored machine: refused, it is not empty.
        again = runner.invoke(args=["restore", str(tmp_path / "backup")])
        assert again.exit_code == 1
        assert "will not overwrite: the database holds data" in again.output
    finally:
        close_app(target)


def test_a_backup_taken_while_uploads_run_is_consistent(source: Flask, tmp_path: Path,
                                                        request: pytest.FixtureRequest) -> None:
    app = source
    _fill(app, studies=1)
    stop = threading.Event()
    errors: list[BaseException] = []

    def upload() -> None:
        study = generate_uid()
        try:
            for i in range(10_000):
                if stop.is_set():
                    return
                app.extensions["archive"].ingest(make_instance(study=study, value=i),
                                                 who="test")
        except BaseException as exc:  # reported below
            errors.append(exc)

    uploader = threading.Thread(target=upload)
    uploader.start()
    try:
        assert wait_for(lambda: len(_uids(app)) >= 5)  # uploads are running
        result = app.test_cli_runner().invoke(args=["backup", str(tmp_path / "backup")])
        assert result.exit_code == 0, result.output
        manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
        # ... and go on after the snapshot: those are not in the backup
        assert wait_for(lambda: len(_uids(app)) > manifest["counts"]["instance"] + 2)
    finally:
        stop.set()
        uploader.join()
    assert not errors
    on_disk = {p.relative_to(tmp_path / "backup" / "archive" / "objects").as_posix()
               for p in (tmp_path / "backup" / "archive" / "objects").glob("??/*.dcm")}
    assert on_disk == set(manifest["files"])  # exactly the files the snapshot names
    assert manifest["counts"]["instance"] == len(manifest["files"]) >= 3

    target = _fresh(tmp_path, "target", _target_url(tmp_path, source, request))
    try:
        runner = target.test_cli_runner()
        restored = runner.invoke(args=["restore", str(tmp_path / "backup")])
        assert restored.exit_code == 0, restored.output
        verify = runner.invoke(args=["archive", "verify"])
        assert verify.exit_code == 0, verify.output
        assert len(_uids(target)) == manifest["counts"]["instance"]
    finally:
        close_app(target)


def test_a_study_waiting_in_the_inbox_is_restored_and_accepted(
        tmp_path: Path, database_url: str, idp: IdentityProvider,
        request: pytest.FixtureRequest) -> None:
    """An outside study uploaded through a patient's upload link waits in quarantine; after
    backup and restore onto a fresh machine the office manager's inbox shows it and accepting
    it moves it into the archive. An upload still arriving is left out, and the manifest says
    so."""
    signin = {"OIDC_ISSUER": idp.issuer, **OIDC_SETTINGS}
    source = make_app(tmp_path / "source", database_url, AUDIT_CHECKPOINT_KEY=KEY, **signin)
    try:
        inbox = build_inbox(source, idp)
        patient = source.test_client()
        made = make_upload_link(source, inbox.doctor)
        assert open_link(patient, made.token, made.pin).status_code == 303
        outside = generate_uid()
        answer = upload(patient, "CD/IM1", outside_instance(study=outside))
        assert [r["outcome"] for r in answer["results"]] == ["kept"]
        # A second file only half sent: its part file is not in the backup.
        unfinished = patient.post("/inbox/api/files", json={"name": "CD/IM2", "size": 100},
                                  headers={"Accept": "application/json"})
        assert unfinished.status_code == 201
        assert patient.put(f"/inbox/api/files/{unfinished.json['id']}", data=b"x" * 40,
                           headers={"Accept": "application/json",
                                    "Content-Range": "bytes 0-39/100"}).status_code == 200
        quarantine = source.extensions["inbox"]
        [kept] = list((quarantine.root / "kept").glob("??/*.dcm"))
        with source.extensions["db"].new_session() as session:
            [waiting] = session.scalars(select(InboxStudy.public_id).where(
                InboxStudy.state == "waiting")).all()
        result = source.test_cli_runner().invoke(args=["backup", str(tmp_path / "backup")])
        assert result.exit_code == 0, result.output
        assert "upload inbox: 1 waiting studies, 1 quarantined files" in result.output
        assert "1 uploads still arriving left out" in result.output
        target_url = _target_url(tmp_path, source, request)
        refused_url = _target_url(tmp_path, source, request)
    finally:
        close_app(source)
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    assert manifest["inbox"] == {"files": [kept.stem], "waiting_studies": 1,
                                 "unfinished_uploads_left_out": 1}
    copied = tmp_path / "backup" / "inbox" / "kept" / kept.parent.name / kept.name
    assert copied.read_bytes() == kept.read_bytes()
    assert [p.name for p in (tmp_path / "backup").rglob("*") if p.is_file()
            and p.name == unfinished.json["id"]] == []

    # A damaged quarantined file: the restore is refused before anything is written.
    shutil.copytree(tmp_path / "backup", tmp_path / "bad")
    bad = tmp_path / "bad" / "inbox" / "kept" / kept.parent.name / kept.name
    bad.write_bytes(bad.read_bytes()[:-1] + bytes([bad.read_bytes()[-1] ^ 1]))
    refused_target = _fresh(tmp_path, "refused", refused_url)
    try:
        refused = refused_target.test_cli_runner().invoke(args=["restore", str(tmp_path / "bad")])
        assert refused.exit_code == 1
        assert f"quarantined file {kept.stem} does not match its SHA-256" in refused.output
        assert not (refused_target.extensions["inbox"].root / "kept").exists()
    finally:
        close_app(refused_target)

    target = _fresh(tmp_path, "target", target_url, **signin)
    try:
        restored = target.test_cli_runner().invoke(args=["restore", str(tmp_path / "backup")])
        assert restored.exit_code == 0, restored.output
        assert "1 quarantined inbox files" in restored.output
        assert target.extensions["inbox"].kept_path(kept.stem).read_bytes() == kept.read_bytes()
        manager = signed_in(target, idp, "om")
        page = manager.get("/inbox")
        assert page.status_code == 200 and f"/inbox/studies/{waiting}" in page.data.decode()
        with target.extensions["db"].new_session() as session:
            local = session.scalars(select(Patient.id)
                                    .where(Patient.patient_id == LOCAL_ID)).one()
        accepted = manager.post(f"/inbox/studies/{waiting}/accept",
                                data={"csrf_token": csrf_of(manager), "patient": local})
        assert accepted.status_code == 303
        with target.extensions["db"].new_session() as session:
            study = session.scalars(select(Study).where(
                Study.study_instance_uid == outside)).one()
            assert study.patient.patient_id == LOCAL_ID
            [sop] = session.scalars(select(Instance.sop_instance_uid).join(Series)
                                    .where(Series.study_fk == study.id)).all()
        assert target.extensions["archive"].read(sop)  # its bytes are in the archive
        assert not target.extensions["inbox"].kept_path(kept.stem).exists()
        verify = target.test_cli_runner().invoke(args=["archive", "verify"])
        assert verify.exit_code == 0 and "0 problem(s) found" in verify.output, verify.output
    finally:
        close_app(target)


def _damage_one_byte(backup: Path) -> None:
    victim = sorted((backup / "archive" / "objects").glob("??/*.dcm"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))


def _remove_a_file(backup: Path) -> None:
    sorted((backup / "archive" / "objects").glob("??/*.dcm"))[-1].unlink()


def _other_format(backup: Path) -> None:
    path = backup / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format"] = "portal-backup/2"
    path.write_text(json.dumps(manifest))


def _newer_schema(backup: Path) -> None:
    path = backup / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["migration_head"] = "0999_from_the_future"
    path.write_text(json.dumps(manifest))


def _files_not_a_table(backup: Path) -> None:
    path = backup / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"] = list(manifest["files"])
    path.write_text(json.dumps(manifest))


def _database_elsewhere(backup: Path) -> None:
    """The manifest points the database's checksum at a copy outside the backup while the
    portal.db restore would read is changed."""
    path = backup / "manifest.json"
    manifest = json.loads(path.read_text())
    elsewhere = backup.parent / "untouched.db"
    elsewhere.write_bytes((backup / "portal.db").read_bytes())
    manifest["database"]["file"] = "../untouched.db"
    path.write_text(json.dumps(manifest))
    _damaged_database(backup)


def _damaged_database(backup: Path) -> None:
    with (backup / "portal.db").open("r+b") as f:
        f.seek(200)
        f.write(b"\xff")


@pytest.mark.parametrize(("damage", "reason"), [
    (_damage_one_byte, "does not match its SHA-256: the backup was changed or damaged"),
    (_remove_a_file, "is missing from the backup"),
    (_other_format, "the backup is of format 'portal-backup/2'"),
    (_newer_schema, "schema revision '0999_from_the_future' is unknown to this portal"),
    (_damaged_database, "portal.db does not match the manifest's SHA-256"),
    (_files_not_a_table, "manifest.json lacks 'files'"),
    (_database_elsewhere, "the manifest names '../untouched.db' as the database"),
])
def test_a_damaged_backup_is_refused_and_nothing_is_restored(
        app: Flask, tmp_path: Path, damage: Any, reason: str) -> None:
    _fill(app)
    assert app.test_cli_runner().invoke(args=["backup", str(tmp_path / "b")]).exit_code == 0
    damage(tmp_path / "b")
    target = _fresh(tmp_path, "target", None)
    try:
        result = target.test_cli_runner().invoke(args=["restore", str(tmp_path / "b")])
        assert result.exit_code == 1
        assert reason in result.output, result.output
        assert list(target.extensions["archive"].store.keys()) == []
        assert inspect(target.extensions["db"].engine).get_table_names() == []
    finally:
        close_app(target)


def test_backup_into_a_folder_in_use_and_an_incomplete_backup_are_refused(
        app: Flask, tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    runner = app.test_cli_runner()
    result = runner.invoke(args=["backup", str(tmp_path / "used")])
    assert result.exit_code == 1 and "is not empty" in result.output
    result = runner.invoke(args=["restore", str(tmp_path / "used")])
    assert result.exit_code == 1 and "holds no manifest.json" in result.output


def test_force_replaces_what_is_there(source: Flask, tmp_path: Path) -> None:
    app = source
    _fill(app, studies=1)
    runner = app.test_cli_runner()
    assert runner.invoke(args=["backup", str(tmp_path / "b")]).exit_code == 0
    expected = _uids(app)
    _fill(app, studies=1)  # after the backup: gone again after the restore
    store = app.extensions["archive"].store  # a live file the backup holds goes bad
    victim = store.path_of(sorted(json.loads((tmp_path / "b" / "manifest.json").read_text())
                                  ["files"])[0])
    damaged = bytearray(victim.read_bytes())
    damaged[-1] ^= 0x01
    victim.write_bytes(bytes(damaged))
    assert runner.invoke(args=["archive", "verify"]).exit_code == 1
    refused = runner.invoke(args=["restore", str(tmp_path / "b")])
    assert refused.exit_code == 1 and "pass --force" in refused.output
    result = runner.invoke(args=["restore", "--force", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert _uids(app) == expected
    verify = runner.invoke(args=["archive", "verify"])
    assert verify.exit_code == 0, verify.output


def test_hard_linked_backup_shares_the_files_and_restores(app: Flask, tmp_path: Path) -> None:
    _fill(app, studies=1)
    result = app.test_cli_runner().invoke(args=["backup", "--link", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    copies = list((tmp_path / "b" / "archive" / "objects").glob("??/*.dcm"))
    assert len(copies) == 3 and all(p.stat().st_nlink == 2 for p in copies)
    target = _fresh(tmp_path, "target", None)
    try:
        runner = target.test_cli_runner()
        assert runner.invoke(args=["restore", str(tmp_path / "b")]).exit_code == 0
        assert _bytes(target) == _bytes(app)
    finally:
        close_app(target)


def test_restore_into_a_migrated_empty_database(source: Flask, tmp_path: Path,
                                                request: pytest.FixtureRequest) -> None:
    """The operator ran `db upgrade` on the new machine first: empty tables are no data."""
    _fill(source, studies=1)
    assert source.test_cli_runner().invoke(args=["backup", str(tmp_path / "b")]).exit_code == 0
    target = make_app(tmp_path / "target", _target_url(tmp_path, source, request),
                      AUDIT_CHECKPOINT_KEY=KEY)
    try:
        runner = target.test_cli_runner()
        result = runner.invoke(args=["restore", str(tmp_path / "b")])
        assert result.exit_code == 0, result.output
        assert _uids(target) == _uids(source)
        assert runner.invoke(args=["archive", "verify"]).exit_code == 0
        assert runner.invoke(args=["audit", "verify"]).exit_code == 0
    finally:
        close_app(target)
