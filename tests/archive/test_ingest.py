"""Durable, idempotent, tamper-resistant storage on SQLite and PostgreSQL
(docs/security.md 37-39)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from portal.access.models import AuditEvent
from portal.archive import current_archive
from portal.archive.ingest import Archive
from portal.archive.models import StoredObject
from portal.archive.store import CorruptObject
from portal.archive.validate import DUPLICATE_CONFLICT, Rejected
from portal.index.models import Instance, Patient, Series, Study
from tests.factories import make_instance


def archive_of(app: Flask) -> Archive:
    with app.app_context():
        return current_archive()


def counts(app: Flask) -> dict[str, int]:
    with app.extensions["db"].new_session() as session:
        return {model.__tablename__: session.scalar(select(func.count()).select_from(model))
                for model in (Patient, Study, Series, Instance, StoredObject)}


def files_on_disk(archive: Archive) -> list[Path]:
    return sorted(archive.store.objects.rglob("*.dcm"))


def test_store_writes_a_file_and_index_rows(any_db_app: Flask) -> None:
    archive = archive_of(any_db_app)
    data = make_instance(patient_name="Doe^Jane", StudyDescription="Chest")
    result = archive.ingest(data, who="test")
    assert result.outcome == "stored"
    assert counts(any_db_app) == {"patient": 1, "study": 1, "series": 1, "instance": 1,
                                  "stored_object": 1}
    [path] = files_on_disk(archive)
    assert path.read_bytes() == data
    # The name is made by the server from the content, never from a UID.
    assert result.sop_instance_uid not in str(path)
    assert archive.read(result.sop_instance_uid) == data
    assert not list(archive.store.tmp.glob("*"))
    with any_db_app.extensions["db"].new_session() as session:
        study = session.scalars(select(Study)).one()
        assert study.number_of_instances == 1 and study.modalities_in_study == "CT"
        instance = session.scalars(select(Instance)).one()
        assert instance.header is None  # made on first use, not at ingest
    header = archive.header(result.sop_instance_uid)
    assert "7FE00010" not in header
    assert header["00100010"]["Value"] == [{"Alphabetic": "Doe^Jane"}]
    with any_db_app.extensions["db"].new_session() as session:
        assert session.scalars(select(Instance)).one().header == header


def test_same_bytes_again_is_already_stored(any_db_app: Flask) -> None:
    archive = archive_of(any_db_app)
    data = make_instance()
    assert archive.ingest(data, who="test").outcome == "stored"
    assert archive.ingest(data, who="test").outcome == "already_stored"
    assert counts(any_db_app)["instance"] == 1
    assert len(files_on_disk(archive)) == 1


def test_same_uid_other_content_is_refused_and_alerted(any_db_app: Flask) -> None:
    archive = archive_of(any_db_app)
    sop = generate_uid()
    study = generate_uid()
    original = make_instance(sop=sop, study=study, value=1)
    archive.ingest(original, who="test")
    tampered = make_instance(sop=sop, study=study, value=2)
    with pytest.raises(Rejected) as info:
        archive.ingest(tampered, who="modality-x")
    assert info.value.status == DUPLICATE_CONFLICT
    assert archive.read(sop) == original
    assert len(files_on_disk(archive)) == 1
    with any_db_app.extensions["db"].new_session() as session:
        alert = session.scalars(select(AuditEvent)).one()
    assert alert.event_id == "110113" and alert.who == "modality-x"
    assert alert.study_instance_uid == study


def test_a_study_cannot_move_to_another_patient(any_db_app: Flask) -> None:
    archive = archive_of(any_db_app)
    study = generate_uid()
    archive.ingest(make_instance(study=study, patient_id="A"), who="test")
    with pytest.raises(Rejected) as info:
        archive.ingest(make_instance(study=study, patient_id="B"), who="test")
    assert "different patient" in info.value.reason
    assert counts(any_db_app)["instance"] == 1
    assert len(files_on_disk(archive)) == 1


def test_twenty_threads_sending_one_study_five_times_leave_fifty_instances(
        any_db_app: Flask) -> None:
    archive = archive_of(any_db_app)
    study, series = generate_uid(), generate_uid()
    study_files = [make_instance(study=study, series=series, InstanceNumber=i + 1, value=i)
                   for i in range(50)]
    errors: list[BaseException] = []
    outcomes: list[str] = []
    lock = threading.Lock()

    def sender() -> None:
        for _ in range(5):
            for data in study_files:
                try:
                    result = archive.ingest(data, who="thread")
                    with lock:
                        outcomes.append(result.outcome)
                except BaseException as exc:
                    with lock:
                        errors.append(exc)

    threads = [threading.Thread(target=sender) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert outcomes.count("stored") == 50
    assert outcomes.count("already_stored") == 50 * 100 - 50
    assert counts(any_db_app) == {"patient": 1, "study": 1, "series": 1, "instance": 50,
                                  "stored_object": 50}
    assert len(files_on_disk(archive)) == 50
    total = sum(len(d) for d in study_files)
    assert sum(p.stat().st_size for p in files_on_disk(archive)) == total
    with any_db_app.extensions["db"].new_session() as session:
        study_row = session.scalars(select(Study)).one()
        assert study_row.number_of_instances == 50 and study_row.number_of_series == 1


def test_a_corrupted_file_is_never_served(app: Flask) -> None:
    archive = archive_of(app)
    result = archive.ingest(make_instance(), who="test")
    [path] = files_on_disk(archive)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptObject):
        archive.read(result.sop_instance_uid)
    assert list(archive.verify()) == [(result.sop_instance_uid, "SHA-256 mismatch")]


def test_crash_leftovers_are_reaped(app: Flask) -> None:
    archive = archive_of(app)
    kept = archive.ingest(make_instance(), who="test")
    archive.store.ensure()
    temp = archive.store.tmp / "deadbeef.part"
    temp.write_bytes(b"half a file")
    # A file renamed into place whose index row never committed (crash before commit).
    orphan_data = make_instance()
    import hashlib

    orphan_key = archive.store.write(orphan_data, hashlib.sha256(orphan_data).hexdigest())
    fresh = archive.store.tmp / "inflight.part"
    fresh.write_bytes(b"being written right now")
    old = time.time() - 3600
    for path in (temp, archive.store.path_of(orphan_key)):
        os.utime(path, (old, old))
    temps, orphans = archive.reap(older_than=300)
    assert (temps, orphans) == (1, 1)
    assert fresh.exists()  # another process may still be writing it
    assert archive.read(kept.sop_instance_uid)
    assert len(files_on_disk(archive)) == 1


def test_disk_full_is_a_clear_failure_and_nothing_is_indexed(app: Flask,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    import errno

    archive = archive_of(app)
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(Rejected) as info:
        archive.ingest(make_instance(), who="test")
    monkeypatch.setattr(os, "write", real_write)
    assert info.value.status == 0xA700 and info.value.http_status == 507
    assert counts(app)["instance"] == 0
    assert not files_on_disk(archive)
    assert not list(archive.store.tmp.glob("*"))


def test_a_batch_gives_each_instance_its_own_exact_answer(any_db_app: Flask) -> None:
    archive = archive_of(any_db_app)
    study, series = generate_uid(), generate_uid()
    kept = make_instance(study=study, series=series, value=1)
    archive.ingest(kept, who="test")
    import pydicom

    kept_uid = pydicom.dcmread(__import__("io").BytesIO(kept)).SOPInstanceUID
    batch = [make_instance(study=study, series=series, value=i + 10) for i in range(40)]
    batch += [kept,  # already stored, identical
              make_instance(sop=kept_uid, study=study, series=series, value=99),  # conflict
              b"not dicom",
              make_instance(study=study, patient_id="SOMEONE-ELSE")]  # other patient
    answers = archive.ingest_many(batch, who="batch")
    assert [a.outcome for a in answers[:40]] == ["stored"] * 40  # type: ignore[union-attr]
    assert answers[40].outcome == "already_stored"  # type: ignore[union-attr]
    assert isinstance(answers[41], Rejected) and answers[41].status == DUPLICATE_CONFLICT
    assert isinstance(answers[42], Rejected)
    assert isinstance(answers[43], Rejected) and "different patient" in answers[43].reason
    assert counts(any_db_app)["instance"] == 41
    assert len(files_on_disk(archive)) == 41
    assert archive.read(kept_uid) == kept
    with any_db_app.extensions["db"].new_session() as session:
        assert session.scalars(select(Study)).one().number_of_instances == 41


def _store_watching(app: Flask, batch: list[bytes], seen: Callable[..., None]) -> None:
    """Store ``batch`` in one ``ingest_many`` with ``seen`` called before every SQL statement;
    every instance must be stored."""
    from sqlalchemy import event

    engine = app.extensions["db"].engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        answers = archive_of(app).ingest_many(batch, who="batch")
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert [a.outcome for a in answers] == ["stored"] * len(batch)  # type: ignore[union-attr]


def test_one_request_is_one_group_commit(any_db_app: Flask,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17: a request of many instances costs a few statements per series, not a few
    per instance (one transaction, one INSERT of the instance rows per series), and one
    fsync per folder."""
    from portal.archive import store as store_module

    statements: list[str] = []
    folders: list[Path] = []

    caller = threading.get_ident()

    def seen(_conn: object, _cursor: object, sql: str, *_args: object) -> None:
        # Only the request's own statements: the audit sealer and the header warm-up run on
        # threads of their own meanwhile.
        if threading.get_ident() == caller:
            statements.append(sql.split(None, 1)[0].upper())

    real_fsync_dir = store_module._fsync_dir

    def counted(path: Path) -> None:
        folders.append(path)
        real_fsync_dir(path)

    def send(per_series: int) -> tuple[int, list[str]]:
        """Two new studies of two new series each; the statements it took."""
        studies = [generate_uid(), generate_uid()]
        batch = [make_instance(study=study, series=series, patient_id=f"P-{study[-6:]}",
                               InstanceNumber=n, value=n)
                 for study in studies for series in (generate_uid(), generate_uid())
                 for n in range(1, per_series + 1)]
        statements.clear()
        _store_watching(any_db_app, batch, seen)
        return len(statements), studies

    few, _ = send(2)
    monkeypatch.setattr(store_module, "_fsync_dir", counted)
    many, studies = send(12)
    monkeypatch.undo()
    # Before the group commit, each instance cost its own six statements (+240 here).
    assert many <= few + 2, " ".join(statements)
    assert len(folders) == len(set(folders)) <= 48
    with any_db_app.extensions["db"].new_session() as session:
        grown = session.scalars(select(Study).where(Study.study_instance_uid.in_(studies))).all()
        assert [(s.number_of_instances, s.number_of_series) for s in grown] == [(24, 2)] * 2
        assert sorted(s.number_of_instances for s in session.scalars(select(Series))) == \
            [2] * 4 + [12] * 4
        arrivals = session.scalars(select(AuditEvent).where(
            AuditEvent.event_id == "110104",
            AuditEvent.study_instance_uid.in_(studies))).all()
        assert sorted(e.study_instance_uid for e in arrivals) == sorted(studies)
    assert counts(any_db_app) == {"patient": 4, "study": 4, "series": 8, "instance": 56,
                                  "stored_object": 56}


def test_a_batch_fsyncs_every_folder_before_its_index_commit(
        app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/security.md 37 with the folders' fsyncs in the batch's pool: every one of them has
    returned before the transaction that indexes the batch writes a row."""
    from portal.archive import store as store_module

    steps: list[str] = []
    lock = threading.Lock()
    real_fsync_dir = store_module._fsync_dir

    def counted(path: Path) -> None:
        real_fsync_dir(path)
        with lock:
            steps.append("folder")

    def seen(_conn: object, _cursor: object, sql: str, *_args: object) -> None:
        if sql.lstrip().upper().startswith("INSERT INTO INSTANCE"):
            with lock:
                steps.append("index")

    study = generate_uid()
    batch = [make_instance(study=study, value=n, InstanceNumber=n) for n in range(1, 13)]
    monkeypatch.setattr(store_module, "_fsync_dir", counted)
    _store_watching(app, batch, seen)
    assert "index" in steps and steps.count("folder") >= 1
    assert "folder" not in steps[steps.index("index"):], steps


def test_a_failed_folder_fsync_refuses_the_request_and_keeps_nothing(
        app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name not made durable is not acknowledged: every instance of the group is refused
    (507), no row is committed and the files are gone."""
    import errno

    from portal.archive import store as store_module

    archive = archive_of(app)

    def failing(_path: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store_module, "_fsync_dir", failing)
    answers = archive.ingest_many([make_instance(value=i) for i in range(3)], who="batch")
    monkeypatch.undo()
    assert all(isinstance(a, Rejected) and a.http_status == 507 for a in answers)
    assert counts(app)["instance"] == 0 and counts(app)["stored_object"] == 0
    assert not files_on_disk(archive)
