"""A study of an external archive (a real Orthanc over DICOMweb): its cached copies are the
temporary tier, never re-encoded, and it loses only its local copies
when retention deletes it: its index rows stay (the hospital's archive keeps the study), the
cached files and their rows go, one 110105 record says so, and the study is fetched again on
the next read."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import select

from portal.access.models import AuditEvent, Grant, Practice, User
from portal.archive import current_archive
from portal.archive.compress import compress_stored
from portal.archive.models import CachedCopy, ExternalInstance, StoredObject
from portal.index.models import Study
from portal.retention.models import RetentionRule
from portal.retention.service import apply_approved, approve, practice_principal, refresh_due
from tests.archive.test_external import count, load_studies, portal_for, sop_uids, sync
from tests.conftest import close_app
from tests.support.orthanc import OrthancServer

LATER = date(2100, 1, 1)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    from tests.archive.test_external import start_pacs

    server = start_pacs(tmp_path / "orthanc")
    yield server
    server.stop()


@pytest.fixture
def portal(tmp_path: Path, orthanc: OrthancServer) -> Iterator[Flask]:
    app = portal_for(tmp_path, orthanc.dicomweb_url)
    yield app
    close_app(app)


def test_external_study_loses_only_its_local_copies(portal: Flask,
                                                    orthanc: OrthancServer) -> None:
    [study] = load_studies(orthanc, 1, instances=3)
    sync(portal)
    uids = sop_uids(portal, study)
    assert len(uids) == 3
    with portal.app_context():
        archive = current_archive()
        paths = [archive.locate(uid).path for uid in uids]  # fetched: cached copies now
    assert count(portal, CachedCopy) == 3
    with portal.app_context():  # the temporary tier is never re-encoded
        assert compress_stored(archive.store, archive.database, older_than_days=0,
                               syntax="jpeg-ls").done == 0
    with portal.extensions["db"].write_transaction() as session:
        practice = Practice(name="North")
        session.add(practice)
        session.flush()
        doctor = User(issuer="t", subject="doc", roles=["physician"], practice_fk=practice.id)
        session.add(doctor)
        session.flush()
        session.add(Grant(user_fk=doctor.id, study_instance_uid=study.study_uid))
        session.add(RetentionRule(practice_fk=practice.id, keep_years=10))
        practice_id = practice.id
    with portal.app_context():
        with portal.extensions["db"].write_transaction() as session:
            assert [d.study_instance_uid for d in refresh_due(session, LATER)] == [
                study.study_uid]
            approve(session, practice_principal(practice_id), "user:t|om", None)
        [deleted] = apply_approved(portal.extensions["db"], who="test", today=LATER)
        assert deleted.local_copies_only
        assert not any(Path(path).exists() for path in paths)
        with portal.extensions["db"].write_transaction() as session:
            assert refresh_due(session, LATER) == []  # nothing local left to delete
        assert [problem for _uid, problem in archive.verify() if problem] == []
    assert count(portal, CachedCopy) == 0 and count(portal, StoredObject) == 0
    assert count(portal, ExternalInstance) == 3 and count(portal, Study) == 1
    with portal.extensions["db"].new_session() as session:
        [record] = session.scalars(select(AuditEvent).where(AuditEvent.event_id == "110105"))
        assert record.study_instance_uid == study.study_uid
        assert record.details["local_copies_only"] is True
        assert session.scalars(select(Grant)).one()  # the index rows, grants included, stay
    with portal.app_context():
        assert current_archive().read(uids[0])  # fetched from the hospital's archive again
    assert count(portal, CachedCopy) == 1
