"""Retention (issue 19 item 3): rules per practice and modality, the minors rule, a legal hold
that overrides everything, approval before any deletion, and a deletion that removes the
files, index rows, cached copies, grants and share links of the study with one 110105
record; on SQLite and PostgreSQL, through the service, the CLI and the console."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from portal.access.models import AuditEvent, Grant, Practice, User
from portal.archive import current_archive
from portal.archive.models import StoredObject
from portal.imaging.service import volume_files
from portal.imaging.volume import content_key
from portal.index.models import Instance, Patient, Series, Study
from portal.retention.models import LegalHold, RetentionDue, RetentionRule
from portal.retention.service import (
    apply_approved,
    approve,
    due_studies,
    practice_principal,
    refresh_due,
)
from portal.sharing.models import ShareLink, ShareLinkStudy
from tests.conftest import close_app, make_app
from tests.factories import make_dataset, to_bytes

TODAY = date(2026, 12, 6)


@pytest.fixture
def app(tmp_path: Path, database_url: str) -> Iterator[Flask]:
    made = make_app(tmp_path / "instance", database_url)
    try:
        yield made
    finally:
        close_app(made)


def _study(app: Flask, *, patient: str, birth: str, day: str, modality: str = "CT",
           images: int = 2) -> str:
    study, series = f"2.25.{uuid.uuid4().int}", f"2.25.{uuid.uuid4().int}"
    with app.app_context():
        for number in range(images):
            ds = make_dataset(study=study, series=series, patient_id=patient,
                              modality=modality, value=number + 1)
            ds.PatientBirthDate, ds.StudyDate, ds.InstanceNumber = birth, day, number + 1
            current_archive().ingest(to_bytes(ds), who="test")
    return study


def _practice(app: Flask, patients: list[str]) -> tuple[int, int]:
    """A practice whose physician was given every study of these patients; (practice id,
    its office manager's id)."""
    with app.extensions["db"].new_session() as session:
        practice = Practice(name="North")
        session.add(practice)
        session.flush()
        doctor = User(issuer="t", subject="doc", roles=["physician"], practice_fk=practice.id)
        manager = User(issuer="t", subject="om", roles=["office_manager"],
                       practice_fk=practice.id)
        session.add_all([doctor, manager])
        session.flush()
        for patient in patients:
            record = session.scalars(select(Patient).where(Patient.patient_id == patient)).one()
            session.add(Grant(user_fk=doctor.id, patient_fk=record.id))
        session.commit()
        return practice.id, manager.id


def _rule(app: Flask, practice: int, **fields: Any) -> None:
    with app.extensions["db"].new_session() as session:
        session.add(RetentionRule(practice_fk=practice, **fields))
        session.commit()


def _due(app: Flask, today: date = TODAY) -> set[str]:
    with app.extensions["db"].new_session() as session:
        return {due.study_instance_uid for due in due_studies(session, today)}


def test_rules_minors_holds_and_modalities(app: Flask) -> None:
    adult_old = _study(app, patient="A", birth="19700101", day="20080301")
    adult_last = _study(app, patient="A", birth="19700101", day="20120301")
    minor = _study(app, patient="B", birth="20050601", day="20100101")
    held = _study(app, patient="C", birth="19600101", day="20000101")
    mr = _study(app, patient="D", birth="19600101", day="20000101", modality="MR")
    unseen = _study(app, patient="E", birth="19600101", day="20000101")
    no_birth = _study(app, patient="F", birth="", day="20000101")
    practice, _manager = _practice(app, ["A", "B", "C", "D", "F"])
    assert _due(app) == set()  # no rule: kept for ever
    _rule(app, practice, modality="CT", keep_years=10, basis="last_study", minors_until_age=28)
    with app.extensions["db"].new_session() as session:
        patient_c = session.scalars(select(Patient).where(Patient.patient_id == "C")).one()
        session.add(LegalHold(patient_fk=patient_c.id, reason="court case 12/26"))
        session.commit()
    due = _due(app)
    # 10 years after the patient's last study (2012): both of A's studies; B was 5 at his
    # study: kept until his 28th birthday (2033); C is held; D's MR has no rule; E is not
    # the practice's; F's birth date is unknown, so the minors rule keeps the study.
    assert due == {adult_old, adult_last}
    assert held not in due and mr not in due and unseen not in due and no_birth not in due
    assert minor in _due(app, date(2033, 6, 2)) and minor not in _due(app, date(2033, 5, 31))
    # Counted from the study itself, A's older study goes before the last one.
    with app.extensions["db"].new_session() as session:
        session.execute(RetentionRule.__table__.update().values(basis="study"))
        session.commit()
    assert adult_old in _due(app, date(2019, 1, 1)) and adult_last not in _due(
        app, date(2019, 1, 1))


def _setup_due(app: Flask) -> tuple[str, str, int, int]:
    gone = _study(app, patient="A", birth="19700101", day="20000101", images=3)
    kept = _study(app, patient="K", birth="19700101", day="20250101")
    practice, manager = _practice(app, ["A", "K"])
    _rule(app, practice, modality="", keep_years=10, basis="last_study")
    return gone, kept, practice, manager


def _count(app: Flask, model: Any, *where: Any) -> int:
    with app.extensions["db"].new_session() as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def test_nothing_is_deleted_without_approval_then_everything_of_the_study(app: Flask) -> None:
    gone, kept, practice, manager_id = _setup_due(app)
    database = app.extensions["db"]
    with app.app_context():
        archive = current_archive()
        with database.new_session() as session:
            uids = list(session.scalars(
                select(Instance.sop_instance_uid).join(Series).join(Study)
                .where(Study.study_instance_uid == gone)))
            files = [archive.store.path_of(key) for key in session.scalars(
                select(StoredObject.storage_key).where(StoredObject.sop_instance_uid.in_(uids)))]
            shas = list(session.scalars(select(StoredObject.sha256)
                                        .where(StoredObject.sop_instance_uid.in_(uids))))
            manager = session.get(User, manager_id)
            assert manager is not None
            # A grant on the study, a link to it alone, a link to it and another study.
            session.add(Grant(user_fk=manager.id, study_instance_uid=gone))
            now = datetime.now(UTC)
            for name, studies in (("only", [gone]), ("both", [gone, kept])):
                link = ShareLink(public_id=name, token_sha256=name * 8, created_at=now,
                                 not_before=now, expires_at=now + timedelta(days=7))
                link.studies = [ShareLinkStudy(study_instance_uid=uid) for uid in studies]
                session.add(link)
            session.commit()
        volume = volume_files().folder / f"{content_key(shas)}.npz"
        volume.parent.mkdir(parents=True, exist_ok=True)
        volume.write_bytes(b"a built volume")
        with database.write_transaction() as session:
            assert [d.study_instance_uid for d in refresh_due(session, TODAY)] == [gone]
        assert apply_approved(database, who="test", today=TODAY) == []  # not approved
        assert all(path.exists() for path in files)
        with database.write_transaction() as session:
            assert approve(session, practice_principal(practice), "user:t|om", None) == 1
        [deleted] = apply_approved(database, who="test", today=TODAY)
        assert deleted.study_instance_uid == gone and deleted.instances == 3
        assert not any(path.exists() for path in files) and not volume.exists()
        assert [problem for _uid, problem in archive.verify() if problem] == []
    assert _count(app, Study, Study.study_instance_uid == gone) == 0
    assert _count(app, Instance, Instance.sop_instance_uid.in_(uids)) == 0
    assert _count(app, StoredObject, StoredObject.sop_instance_uid.in_(uids)) == 0
    assert _count(app, Grant, Grant.study_instance_uid == gone) == 0
    assert _count(app, ShareLink, ShareLink.public_id == "only") == 0
    assert _count(app, ShareLinkStudy, ShareLinkStudy.study_instance_uid == gone) == 0
    assert _count(app, ShareLinkStudy, ShareLinkStudy.study_instance_uid == kept) == 1
    assert _count(app, Study, Study.study_instance_uid == kept) == 1
    assert _count(app, RetentionDue) == 0
    with database.new_session() as session:
        [record] = session.scalars(select(AuditEvent).where(AuditEvent.event_id == "110105"))
    assert (record.event_name, record.action, record.study_instance_uid, record.patient_id) == (
        "DICOM Study Deleted", "D", gone, "A")
    assert record.details["approved_by"] == "user:t|om" and record.details["instances"] == 3


def test_a_hold_placed_after_approval_keeps_the_study(app: Flask) -> None:
    gone, _kept, practice, _manager = _setup_due(app)
    database = app.extensions["db"]
    with app.app_context():
        with database.write_transaction() as session:
            refresh_due(session, TODAY)
            approve(session, practice_principal(practice), "user:t|om", [gone])
            patient = session.scalars(select(Patient).where(Patient.patient_id == "A")).one()
            session.add(LegalHold(patient_fk=patient.id, reason="litigation"))
        assert apply_approved(database, who="test", today=TODAY) == []
    assert _count(app, Study, Study.study_instance_uid == gone) == 1
    assert _count(app, RetentionDue) == 0  # the approval went with the listing
    assert _count(app, AuditEvent, AuditEvent.event_id == "110105") == 0


def test_cli_lists_and_applies_only_approved(app: Flask) -> None:
    gone, _kept, practice, _manager = _setup_due(app)
    runner = app.test_cli_runner()
    listed = runner.invoke(args=["retention", "due"])
    assert listed.exit_code == 0, listed.output
    assert gone in listed.output and "waiting for approval" in listed.output
    assert "1 study due for deletion" in listed.output
    refused = runner.invoke(args=["retention", "apply"])
    assert refused.exit_code == 2 and "--approved" in refused.output
    assert "0 studies deleted" in runner.invoke(args=["retention", "apply", "--approved"]).output
    with app.extensions["db"].write_transaction() as session:
        approve(session, practice_principal(practice), "user:t|om", None)
    done = runner.invoke(args=["retention", "apply", "--approved"])
    assert done.exit_code == 0 and f"deleted study {gone}: 3 instances" in done.output
    assert _count(app, Study, Study.study_instance_uid == gone) == 0


def test_rendered_images_in_redis_go_with_the_study(tmp_path: Path, redis_url: str) -> None:
    """The thumbnails and default renditions a look (or pre-rendering) put into the shared
    render cache are removed with the study."""
    import redis

    from portal.imaging.rendition import parse_rendition
    from portal.imaging.service import rendered_image

    app = make_app(tmp_path / "instance", REDIS_URL=redis_url, JOBS="process")
    try:
        gone, kept, practice, _manager = _setup_due(app)
        renditions = [parse_rendition({}, "", thumbnail=True), parse_rendition({}, "")]
        keys: dict[str, list[str]] = {gone: [], kept: []}
        with app.test_request_context(), app.extensions["db"].new_session() as session:
            for uid in (gone, kept):
                for instance in session.scalars(
                        select(Instance).join(Series).join(Study)
                        .where(Study.study_instance_uid == uid)):
                    for rendition in renditions:
                        image = rendered_image(session, instance, 1, rendition)
                        image.body()  # rendered now and kept in Redis
                        keys[uid].append(image.key)
        client = redis.Redis.from_url(redis_url)
        assert client.exists(*keys[gone]) == len(keys[gone]) == 6
        with app.app_context():
            with app.extensions["db"].write_transaction() as session:
                refresh_due(session, TODAY)
                approve(session, practice_principal(practice), "user:t|om", None)
            assert len(apply_approved(app.extensions["db"], who="test", today=TODAY)) == 1
        assert client.exists(*keys[gone]) == 0
        assert client.exists(*keys[kept]) == len(keys[kept])  # another study's stay
    finally:
        close_app(app)


REFUSE_DELETION = """
CREATE FUNCTION refuse_deletion_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.event_id = '110105' THEN
    RAISE EXCEPTION 'the audit repository refuses' USING ERRCODE = 'serialization_failure';
  END IF;
  RETURN NEW;
END $$;
CREATE CONSTRAINT TRIGGER refuse_deletion_record AFTER INSERT ON audit_event
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_deletion_record();
"""


@pytest.mark.postgres
def test_a_deletion_whose_commit_fails_keeps_everything(tmp_path: Path,
                                                        postgres: Any) -> None:
    """All or nothing: the COMMIT itself fails (a deferred trigger on the 110105 record), so
    the rows, the files and the approval all stay."""
    app = make_app(tmp_path / "instance", postgres.new_database())
    try:
        with app.extensions["db"].engine.begin() as connection:
            connection.exec_driver_sql(REFUSE_DELETION)
        gone, _kept, practice, _manager = _setup_due(app)
        database = app.extensions["db"]
        with app.app_context():
            with database.write_transaction() as session:
                refresh_due(session, TODAY)
                approve(session, practice_principal(practice), "user:t|om", None)
            failed: list[str] = []
            assert apply_approved(database, who="test", today=TODAY, failed=failed) == []
            assert failed == [gone]
            assert [problem for _uid, problem in current_archive().verify() if problem] == []
        assert _count(app, Study, Study.study_instance_uid == gone) == 1
        assert _count(app, Instance) == 5 and _count(app, StoredObject) == 5
        assert _count(app, RetentionDue, RetentionDue.approved_at.is_not(None)) == 1
    finally:
        close_app(app)


def test_a_crash_after_the_commit_leaves_only_files_that_verify_reports(app: Flask) -> None:
    """The rows go in the commit, the files after it: a process that dies in between leaves
    files no row names, which ``archive verify`` reports and ``archive reap`` removes."""
    from portal.retention.service import delete_study

    gone, _kept, _practice, _manager = _setup_due(app)
    with app.app_context():
        archive = current_archive()
        with app.extensions["db"].write_transaction() as session:
            deleted = delete_study(session, gone, who="test")
        assert deleted is not None  # ... and the process dies before removing the files
        problems = [problem for _key, problem in archive.verify() if problem]
        assert problems == ["unreferenced file (left by an interrupted write)"] * 3
        assert archive.reap(older_than=0) == (0, 3)
        assert [problem for _key, problem in archive.verify() if problem] == []
