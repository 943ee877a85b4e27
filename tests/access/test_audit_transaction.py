"""The record of an arrival is in the transaction of the rows it records (issue 16 item 3,
docs/security.md 40): STOW-RS, C-STORE and the CLI import write their 110104 / 110107 record
with the index rows of the instances it counts. So an instance acknowledged is recorded at
once (not when the association or the import run ends), and a transaction that fails after
both were added leaves neither the rows nor the record.

The failure is PostgreSQL's own: a deferred constraint trigger on ``stored_object`` refuses
one poisoned SOP Instance UID at COMMIT, that is after the index rows and the audit record
were both inserted (``Archive._index`` then ``_record_arrival``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import func, select, text

from portal.access.models import AuditEvent
from portal.archive import current_archive
from portal.archive.dimse import serve
from portal.archive.importer import Source, import_sources
from portal.archive.models import StoredObject
from portal.archive.store import ArchiveUnavailable
from portal.index.models import Instance
from tests.archive.test_dimse import CALLED, PEERS
from tests.conftest import PostgresCluster, basic_auth, close_app, free_port, make_app, make_client
from tests.factories import make_dataset, make_instance, to_bytes

pytestmark = pytest.mark.postgres

POISON_TRIGGER = """
CREATE FUNCTION refuse_poisoned() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF right(NEW.sop_instance_uid, 4) = '.666' THEN
    RAISE EXCEPTION 'poisoned instance' USING ERRCODE = 'serialization_failure';
  END IF;
  RETURN NEW;
END $$;
CREATE CONSTRAINT TRIGGER refuse_poisoned AFTER INSERT ON stored_object
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_poisoned();
"""


@pytest.fixture
def pg_app(tmp_path: Path, postgres: PostgresCluster) -> Iterator[Flask]:
    port = free_port()
    app = make_app(tmp_path / "instance", postgres.new_database(), DIMSE_HOST="127.0.0.1",
                   DIMSE_PORT=port, DIMSE_AE_TITLE=CALLED, DIMSE_ALLOWED_PEERS=PEERS)
    with app.extensions["db"].engine.begin() as connection:
        connection.exec_driver_sql(POISON_TRIGGER)
    yield app
    close_app(app)


def poisoned() -> str:
    return generate_uid(prefix=None) + ".666"


def kept(app: Flask, sop: str) -> tuple[int, int]:
    """Index rows of the instance: (instance rows, stored objects)."""
    with app.extensions["db"].new_session() as session:
        return (session.scalar(select(func.count()).select_from(Instance).where(
                    Instance.sop_instance_uid == sop)) or 0,
                session.scalar(select(func.count()).select_from(StoredObject).where(
                    StoredObject.sop_instance_uid == sop)) or 0)


def records(app: Flask, event_id: str, study: str) -> list[dict[str, object]]:
    """The successful records of the event for the study (their details)."""
    with app.extensions["db"].new_session() as session:
        return [e.details for e in session.scalars(select(AuditEvent).where(
            AuditEvent.event_id == event_id, AuditEvent.outcome == 0,
            AuditEvent.study_instance_uid == study))]


def test_stow_rs_rows_and_record_commit_or_fail_together(pg_app: Flask) -> None:
    name, secret = make_client(pg_app, "modality")
    client = pg_app.test_client()
    headers = {**basic_auth(name, secret),
               "Content-Type": 'multipart/related; type="application/dicom"; boundary=b0'}

    def stow(*instances: bytes) -> int:
        body = b"".join(b"--b0\r\n\r\n" + data + b"\r\n" for data in instances) + b"--b0--\r\n"
        return client.post("/dicomweb/studies", data=body, headers=headers).status_code

    study, good, bad = generate_uid(), generate_uid(), poisoned()
    assert stow(make_instance(study=study, sop=good), make_instance(study=study, sop=bad)) \
        == 503
    assert kept(pg_app, good) == kept(pg_app, bad) == (0, 0)
    assert records(pg_app, "110104", study) == []
    assert stow(make_instance(study=study, sop=good)) == 200
    assert kept(pg_app, good) == (1, 1)
    assert records(pg_app, "110104", study) == [{"instances": 1}]


def test_c_store_records_each_instance_with_its_rows(pg_app: Flask) -> None:
    with pg_app.app_context():
        server = serve(current_archive(), pg_app.config["PORTAL"], block=False)
    assert server is not None
    ae = AE(ae_title="STORESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", pg_app.config["PORTAL"]["DIMSE_PORT"], ae_title=CALLED)
    try:
        assert assoc.is_established
        study, good, bad = generate_uid(), generate_uid(), poisoned()
        status = assoc.send_c_store(make_dataset(study=study, sop=good)).Status
        assert status == 0x0000
        # Acknowledged, association still open: the record is already committed.
        assert kept(pg_app, good) == (1, 1)
        assert records(pg_app, "110104", study) == [{"instances": 1}]
        status = assoc.send_c_store(make_dataset(study=study, sop=bad)).Status
        assert status == 0xA700  # out of resources: the transaction failed at commit
        assert kept(pg_app, bad) == (0, 0)
        assoc.release()
        # Nothing more is recorded for the association when it ends.
        assert records(pg_app, "110104", study) == [{"instances": 1}]
    finally:
        if assoc.is_established:
            assoc.release()
        server.shutdown()


def test_cli_import_records_each_file_with_its_rows(pg_app: Flask) -> None:
    study, good, bad = generate_uid(), generate_uid(), poisoned()
    files = {good: make_instance(study=study, sop=good), bad: make_instance(study=study, sop=bad)}
    with pg_app.app_context():
        archive = current_archive()
        summary = import_sources(archive, [Source(good, lambda: files[good])], "cli:import")
        # Stored, and recorded before any after-ingest step ran.
        assert summary.counts["stored"] == 1
        assert kept(pg_app, good) == (1, 1)
        assert records(pg_app, "110107", study) == [{"instances": 1}]
        with pytest.raises(ArchiveUnavailable):
            import_sources(archive, [Source(bad, lambda: files[bad])], "cli:import")
    assert kept(pg_app, bad) == (0, 0)
    assert records(pg_app, "110107", study) == [{"instances": 1}]


def test_the_cli_import_command_records_what_it_stored(pg_app: Flask, tmp_path: Path) -> None:
    study = generate_uid()
    folder = tmp_path / "in"
    folder.mkdir()
    for n in range(3):
        (folder / f"{n}.dcm").write_bytes(to_bytes(make_dataset(study=study)))
    result = pg_app.test_cli_runner().invoke(args=["archive", "import", str(folder)])
    assert result.exit_code == 0, result.output
    assert records(pg_app, "110107", study) == [{"instances": 1}] * 3
    with pg_app.extensions["db"].engine.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM audit_event WHERE "
                                      "event_id = '110104'")) == 0
