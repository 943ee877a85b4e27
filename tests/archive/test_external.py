"""The external archive against a real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``).

Each test starts its own Orthanc on 127.0.0.1 with HTTP authentication on (the harness user of
``tests/support/orthanc.py`` plus a ``portal`` user the portal signs in as), loads small
synthetic CT instances into it over its REST API, and points the portal at its DICOMweb root.
Failures are real too: Orthanc is stopped mid-sync and restarted on a new port behind a small
loopback TCP relay, and made slow by the same relay holding its answers back.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from flask import Flask
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from portal import audit
from portal.archive import current_archive
from portal.archive.external import ExternalUnavailable, query_string
from portal.archive.models import CachedCopy, ExternalInstance, StoredObject, SyncState
from portal.archive.sync import sync_index
from portal.index.models import Instance, Study
from tests.conftest import basic_auth, close_app, make_app, make_client
from tests.support.orthanc import OrthancServer, start_orthanc

PORTAL_USER, PORTAL_PASSWORD = "portal", "portal-pacs-password-1234"
JPEG_MAGIC = b"\xff\xd8\xff"


# -- synthetic instances ----------------------------------------------------------------------

@dataclass
class SyntheticStudy:
    """UIDs and patient of a small CT study made for a test."""

    patient_id: str
    patient_name: str = "Doe^Jane"
    study_date: str = "20240102"
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)


def ct_instance(study: SyntheticStudy, number: int, size: int = 32,
                sop_instance_uid: str | None = None, patient_id: str | None = None) -> bytes:
    """One small CT slice as Part 10 bytes (a gradient, so it renders to a real image)."""
    ds = Dataset()
    sop = sop_instance_uid or generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study.study_uid, study.series_uid
    ds.PatientID = patient_id or study.patient_id
    ds.PatientName = study.patient_name
    ds.StudyDate = study.study_date
    ds.StudyTime = "101500"
    ds.AccessionNumber = f"A{study.study_uid[-8:]}"
    ds.StudyDescription = "CT CHEST"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.8, 0.8]
    ds.SliceThickness = 1.0
    pixels = (np.add.outer(np.arange(size), np.arange(size)) * (4000 // (2 * size))
              + number).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def upload(orthanc: OrthancServer, data: bytes) -> None:
    """Store one instance in Orthanc through its REST API."""
    response = requests.post(orthanc.url + "/instances", data=data, auth=orthanc.auth,
                             timeout=30)
    assert response.status_code == 200, response.text


def load_studies(orthanc: OrthancServer, count: int, instances: int = 2,
                 size: int = 32) -> list[SyntheticStudy]:
    """``count`` studies of ``instances`` slices each, alternating between two patients."""
    studies = []
    for index in range(count):
        study = SyntheticStudy(patient_id=f"PID{index % 2}",
                               patient_name=("Doe^Jane", "Roe^Richard")[index % 2],
                               study_date=f"202401{1 + index % 28:02d}")
        for number in range(1, instances + 1):
            upload(orthanc, ct_instance(study, number, size))
        studies.append(study)
    return studies


# -- Orthanc and a relay in front of it ------------------------------------------------------

def start_pacs(workdir: Path, **extra: Any) -> OrthancServer:
    """Orthanc with authentication on and a ``portal`` user for the portal."""
    config: dict[str, Any] = {"RegisteredUsers": {PORTAL_USER: PORTAL_PASSWORD}}
    config.update(extra)
    return start_orthanc(workdir, extra_config=config)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """A fresh Orthanc for one test."""
    server = start_pacs(tmp_path / "orthanc")
    yield server
    server.stop()


class Relay:
    """A loopback TCP relay to a target port that can hold answers back (a slow archive) and
    be pointed at a new port (an archive restarted elsewhere)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, 0.0),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, delay: float | None) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                wait = self.delay if delay is None else delay
                if wait:
                    time.sleep(wait)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def drop_connections(self) -> None:
        """Close every relayed connection (as a restarted archive would)."""
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self._sockets.clear()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.drop_connections()


def portal_for(tmp_path: Path, dicomweb_url: str, **overrides: Any) -> Flask:
    """The portal pointed at an external archive, signing in as the ``portal`` user."""
    settings: dict[str, Any] = {"ARCHIVE_URL": dicomweb_url, "ARCHIVE_USERNAME": PORTAL_USER,
                                "ARCHIVE_PASSWORD": PORTAL_PASSWORD,
                                "ARCHIVE_TIMEOUT_SECONDS": 10, "RENDER_ISOLATION": False}
    settings.update(overrides)
    return make_app(tmp_path / "instance", **settings)


@pytest.fixture
def portal(tmp_path: Path, orthanc: OrthancServer) -> Iterator[Flask]:
    """The portal on an external Orthanc."""
    app = portal_for(tmp_path, orthanc.dicomweb_url)
    yield app
    close_app(app)


def sync(app: Flask, **kwargs: Any) -> Any:
    with app.app_context():
        archive = current_archive()
        assert archive.remote is not None
        return sync_index(archive, archive.remote.client, **kwargs)


def count(app: Flask, model: Any) -> int:
    with app.extensions["db"].new_session() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def instance_url(study: SyntheticStudy, sop_uid: str, suffix: str = "") -> str:
    return (f"/dicomweb/studies/{study.study_uid}/series/{study.series_uid}"
            f"/instances/{sop_uid}{suffix}")


def sop_uids(app: Flask, study: SyntheticStudy) -> list[str]:
    with app.extensions["db"].new_session() as session:
        return list(session.scalars(
            select(ExternalInstance.sop_instance_uid)
            .join(Instance, Instance.sop_instance_uid == ExternalInstance.sop_instance_uid)
            .where(ExternalInstance.study_instance_uid == study.study_uid)
            .order_by(Instance.instance_number)))


# -- tests ------------------------------------------------------------------------------------

def test_query_values_keep_qido_syntax_raw_for_orthanc(orthanc: OrthancServer) -> None:
    """Orthanc 1.10 does not decode %2C or %2A: UID lists and wildcards must travel raw."""
    assert query_string({"StudyInstanceUID": "1.2,1.3", "PatientName": "Doe^J*",
                         "StudyDate": "20240101-20240131", "x": "a b&c"}) == (
        "StudyInstanceUID=1.2,1.3&PatientName=Doe^J*&StudyDate=20240101-20240131&x=a%20b%26c")
    first, second, _third = load_studies(orthanc, 3, instances=1)
    from portal.archive.external import DicomWebArchive, ExternalSettings

    client = DicomWebArchive(ExternalSettings(url=orthanc.dicomweb_url, auth="basic",
                                              username=PORTAL_USER, password=PORTAL_PASSWORD))
    try:
        found = client.search_studies(
            {"StudyInstanceUID": f"{first.study_uid},{second.study_uid}"}, limit=10)
        assert sorted(item["0020000D"]["Value"][0] for item in found) == sorted(
            [first.study_uid, second.study_uid])
        assert len(client.search_studies({"PatientName": "Roe*"}, limit=10)) == 1
    finally:
        client.close()


def test_sync_indexes_studies_without_copying_images(portal: Flask,
                                                     orthanc: OrthancServer) -> None:
    studies = load_studies(orthanc, 5, instances=3)
    runner = portal.test_cli_runner()
    result = runner.invoke(args=["archive", "sync"])
    assert result.exit_code == 0, result.output
    assert "5 studies seen, 5 synced, 15 instances added" in result.output
    assert count(portal, Study) == 5
    assert count(portal, Instance) == 15
    assert count(portal, ExternalInstance) == 15
    assert count(portal, StoredObject) == 0  # nothing copied yet
    with portal.extensions["db"].new_session() as session:
        row = session.scalars(select(Instance).where(
            Instance.sop_instance_uid == sop_uids(portal, studies[0])[0])).one()
        assert (row.rows, row.columns, row.pixel_spacing) == (32, 32, [0.8, 0.8])
        assert row.image_orientation_patient == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        assert row.header is not None and "7FE00010" not in row.header
        study = session.scalars(select(Study).where(
            Study.study_instance_uid == studies[0].study_uid)).one()
        assert (study.number_of_instances, study.modalities_in_study) == (3, "CT")

    # The portal's own QIDO-RS answers from the index (a machine client sees everything).
    headers = basic_auth(*make_client(portal, "reader"))
    client = portal.test_client()
    answer = client.get("/dicomweb/studies", query_string={"PatientID": "PID1"}, headers=headers)
    assert answer.status_code == 200
    assert sorted(i["0020000D"]["Value"][0] for i in answer.json) == sorted(
        s.study_uid for s in studies if s.patient_id == "PID1")
    metadata = client.get(f"/dicomweb/studies/{studies[0].study_uid}/metadata", headers=headers)
    assert metadata.status_code == 200 and len(metadata.json) == 3
    assert count(portal, StoredObject) == 0  # metadata came from the index too


def test_sync_is_incremental_and_idempotent(portal: Flask, orthanc: OrthancServer) -> None:
    studies = load_studies(orthanc, 3, instances=2)
    assert sync(portal).instances_added == 6
    again = sync(portal)
    assert (again.studies_synced, again.instances_added, again.completed) == (0, 0, True)
    # A new series image in a known study and a new study (dated today) arrive in the PACS.
    upload(orthanc, ct_instance(studies[1], 3))
    fresh = SyntheticStudy(patient_id="PID9", study_date=time.strftime("%Y%m%d"))
    upload(orthanc, ct_instance(fresh, 1))
    third = sync(portal)
    # Incremental: only study dates from the lookback window on, so only the new study.
    assert (third.studies_seen, third.studies_synced, third.instances_added) == (1, 1, 1)
    with portal.extensions["db"].new_session() as session:
        state = session.scalars(select(SyncState)).one()
        assert state.next_offset is None and state.completed_at is not None
        assert state.run_since != ""
    # A full walk finds the old study's new image by its instance count, and only that.
    full = sync(portal, full=True)
    assert (full.studies_seen, full.studies_synced, full.instances_added) == (4, 1, 1)
    assert count(portal, Instance) == count(portal, ExternalInstance) == 8


def test_view_of_an_instance_only_in_orthanc_fetches_and_caches_it(
        portal: Flask, orthanc: OrthancServer) -> None:
    (study,) = load_studies(orthanc, 1, instances=3)
    sync(portal)
    uid, middle, other = sop_uids(portal, study)
    headers = basic_auth(*make_client(portal, "viewer"))
    client = portal.test_client()
    rendered = client.get(instance_url(study, uid, "/rendered"),
                          headers={**headers, "Accept": "image/jpeg"})
    assert rendered.status_code == 200, rendered.json
    assert rendered.mimetype == "image/jpeg" and rendered.data.startswith(JPEG_MAGIC)
    # The image itself, and the series' middle image whose window the series shares.
    with portal.extensions["db"].new_session() as session:
        assert set(session.scalars(select(CachedCopy.sop_instance_uid))) == {uid, middle}

    # The cached copy is byte for byte Orthanc's file, and hash-checked like any other.
    original = requests.get(f"{orthanc.dicomweb_url}/studies/{study.study_uid}/series/"
                            f"{study.series_uid}/instances/{uid}", auth=orthanc.auth,
                            headers={"Accept": "multipart/related; type=\"application/dicom\""},
                            timeout=10)
    with portal.app_context():
        stored = current_archive().locate(uid)
        assert hashlib.sha256(Path(stored.path).read_bytes()).hexdigest() == stored.sha256
        assert Path(stored.path).read_bytes() in original.content
        assert sorted(current_archive().verify()) == sorted([(uid, None), (middle, None)])

    # Orthanc gone: the cached instance still serves, the other one answers 503.
    orthanc.stop()
    wado = client.get(instance_url(study, uid), headers={**headers, "Accept": "*/*"})
    assert wado.status_code == 200 and Path(stored.path).read_bytes() in wado.data
    again = client.get(instance_url(study, uid, "/rendered"),
                       headers={**headers, "Accept": "image/jpeg"})
    assert again.status_code == 200 and again.data == rendered.data
    missing = client.get(instance_url(study, other, "/rendered"),
                         headers={**headers, "Accept": "image/jpeg"})
    assert missing.status_code == 503
    assert int(missing.headers["Retry-After"]) >= 1
    assert count(portal, CachedCopy) == 2


def test_cache_evicts_least_recently_used_copies_never_ingested_ones(
        portal: Flask, orthanc: OrthancServer) -> None:
    (study,) = load_studies(orthanc, 1, instances=4, size=64)
    sync(portal)
    first, second, third, fourth = sop_uids(portal, study)
    local_study = SyntheticStudy(patient_id="LOCAL")
    with portal.app_context():
        archive = current_archive()
        remote = archive.remote
        assert remote is not None
        archive.ingest(ct_instance(local_study, 1, size=64), who="test")
        remote.touch_interval = 0.0
        size = Path(archive.locate(first).path).stat().st_size
        remote.cache_bytes = int(size * 2.5)  # room for two copies
        archive.locate(second)
        time.sleep(0.01)
        archive.locate(first)  # first is now more recent than second
        time.sleep(0.01)
        archive.locate(third)  # over the limit: the least recently used (second) goes
        with archive.database.new_session() as session:
            cached = set(session.scalars(select(CachedCopy.sop_instance_uid)))
        assert cached == {first, third}
        # The copies differ by a few bytes (UIDs of other lengths); third stays the newest.
        third_size = Path(archive.locate(third).path).stat().st_size
        assert remote.usage() == (2, size + third_size)
        archive.locate(fourth)
        with archive.database.new_session() as session:
            cached = set(session.scalars(select(CachedCopy.sop_instance_uid)))
            stored = session.scalar(select(func.count()).select_from(StoredObject))
        assert cached == {third, fourth}
        assert stored == 3  # two cached copies and the ingested instance, never evicted
        # An evicted instance comes back on its next use.
        assert archive.read(second).startswith(b"\0" * 128 + b"DICM")
        assert archive.reap(older_than=0) == (0, 0)  # no files left behind by eviction


def test_orthanc_stopped_mid_sync_resumes_without_duplicates(tmp_path: Path) -> None:
    workdir = tmp_path / "orthanc"
    orthanc = start_pacs(workdir)
    relay = Relay(orthanc.http_port)
    app = portal_for(tmp_path, f"http://127.0.0.1:{relay.port}/dicom-web",
                     ARCHIVE_RETRIES=1, ARCHIVE_BREAKER_FAILURES=100)
    try:
        load_studies(orthanc, 10, instances=2)
        pages: list[int] = []

        def stop_after_two_pages(report: Any) -> None:
            pages.append(report.pages)
            if report.pages == 2:
                orthanc.stop()
                relay.drop_connections()

        with pytest.raises(ExternalUnavailable):
            sync(app, page_size=3, progress=stop_after_two_pages)
        with app.extensions["db"].new_session() as session:
            state = session.scalars(select(SyncState)).one()
            assert state.next_offset == 6 and state.completed_at is None
            assert state.last_error
        assert count(app, Study) == 6

        # Orthanc comes back (same storage, another port behind the same address).
        orthanc = start_pacs(workdir)
        relay.target_port = orthanc.http_port
        report = sync(app, page_size=3)
        assert report.completed and report.resumed_from == 3
        assert count(app, Study) == 10
        assert count(app, Instance) == count(app, ExternalInstance) == 20
        with app.extensions["db"].new_session() as session:
            assert set(session.scalars(select(Study.number_of_instances))) == {2}
        assert sync(app, page_size=3, full=True).instances_added == 0
    finally:
        close_app(app)
        relay.close()
        orthanc.stop()


def test_slow_archive_times_out_and_the_breaker_answers_503_at_once(
        tmp_path: Path, orthanc: OrthancServer) -> None:
    relay = Relay(orthanc.http_port)
    app = portal_for(tmp_path, f"http://127.0.0.1:{relay.port}/dicom-web",
                     ARCHIVE_TIMEOUT_SECONDS=1, ARCHIVE_RETRIES=0,
                     ARCHIVE_BREAKER_FAILURES=2, ARCHIVE_BREAKER_RESET_SECONDS=30)
    try:
        (study,) = load_studies(orthanc, 1, instances=3)
        sync(app)
        uids = sop_uids(app, study)
        headers = {**basic_auth(*make_client(app, "viewer")), "Accept": "image/jpeg"}
        client = app.test_client()
        assert client.get("/readyz").json["external_archive"]["state"] == "ok"
        relay.delay = 3.0  # every answer now takes 3 s; the portal waits at most 1 s
        # /readyz is public: it probes the archive at most every few seconds, and does not
        # say where the archive is.
        started = time.monotonic()
        again = client.get("/readyz").json["external_archive"]
        assert time.monotonic() - started < 0.5 and again["state"] == "ok"
        assert "source" not in again and "127.0.0.1" not in str(again)
        timings = []
        for uid in uids:
            started = time.monotonic()
            answer = client.get(instance_url(study, uid, "/rendered"), headers=headers)
            timings.append(time.monotonic() - started)
            assert answer.status_code == 503
            assert answer.json["error"]
            assert int(answer.headers["Retry-After"]) >= 1
        assert timings[0] < 2.5 and timings[1] < 2.5  # bounded by the timeout
        assert timings[2] < 0.2  # the breaker is open: no wait at all
        assert int(answer.headers["Retry-After"]) > 20
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json["status"] == "degraded"
        assert ready.json["external_archive"]["state"] == "unavailable"
        assert ready.json["external_archive"]["breaker"] == "open"
        assert count(app, CachedCopy) == 0  # nothing partial was kept
        # A page for people says so plainly.
        with app.test_request_context("/studies", headers={"Accept": "text/html"}):
            from portal.errors import error_response

            page = error_response(503, "the image archive is temporarily unavailable")
            assert b"Temporarily unavailable" in page.get_data()
    finally:
        close_app(app)
        relay.close()


def test_an_instance_of_another_patient_is_refused_and_alerted(
        portal: Flask, orthanc: OrthancServer) -> None:
    (study,) = load_studies(orthanc, 1, instances=1)
    sync(portal)
    (uid,) = sop_uids(portal, study)
    # The PACS now holds, under the same UIDs, an image of somebody else.
    for orthanc_study in orthanc.get_json("/studies"):
        orthanc.delete(f"/studies/{orthanc_study}")
    upload(orthanc, ct_instance(study, 1, sop_instance_uid=uid, patient_id="SOMEONE-ELSE"))
    headers = {**basic_auth(*make_client(portal, "viewer")), "Accept": "image/jpeg"}
    answer = portal.test_client().get(instance_url(study, uid, "/rendered"), headers=headers)
    assert answer.status_code == 503
    assert count(portal, StoredObject) == 0 and count(portal, CachedCopy) == 0
    with portal.extensions["db"].new_session() as session:
        alerts = list(session.scalars(select(audit.AuditEvent).where(
            audit.AuditEvent.event_id == audit.SECURITY_ALERT[0])))
    assert any("does not match" in (a.details or {}).get("reason", "") for a in alerts)
    # A metadata-level mix-up is refused by the sync too.
    mixed = SyntheticStudy(patient_id="P-A")
    upload(orthanc, ct_instance(mixed, 1))
    upload(orthanc, ct_instance(mixed, 2, patient_id="P-B"))
    report = sync(portal, full=True)
    assert report.studies_refused >= 1
    with portal.extensions["db"].new_session() as session:
        assert session.scalars(select(Study).where(
            Study.study_instance_uid == mixed.study_uid)).first() is None


def test_stored_file_and_pydicom_agree(portal: Flask, orthanc: OrthancServer) -> None:
    """A fetched copy parses back to the instance that was put into Orthanc."""
    study = SyntheticStudy(patient_id="PIDX")
    data = ct_instance(study, 7)
    upload(orthanc, data)
    sync(portal)
    (uid,) = sop_uids(portal, study)
    with portal.app_context():
        ds = pydicom.dcmread(io.BytesIO(current_archive().read(uid)))
    assert ds.InstanceNumber == 7 and ds.PatientID == "PIDX"
    assert ds.PixelData == pydicom.dcmread(io.BytesIO(data)).PixelData


def test_dimse_find_and_move_from_orthanc(tmp_path: Path) -> None:
    """C-FIND at study, series and image level, then C-MOVE into our C-STORE SCP."""
    from portal.archive.dimse import serve
    from portal.archive.dimse_pull import find, move
    from tests.conftest import free_port

    scp_port = free_port()
    orthanc = start_orthanc(tmp_path / "orthanc",
                            dicom_peers={"portal": ("PORTAL", "127.0.0.1", scp_port)})
    app = make_app(tmp_path / "instance", DIMSE_PORT=scp_port, DIMSE_AE_TITLE="PORTAL",
                   DIMSE_ALLOWED_PEERS=[f"{orthanc.aet}@127.0.0.1"],
                   ARCHIVE_DIMSE_PEER=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                   ARCHIVE_DIMSE_TIMEOUT_SECONDS=10, RENDER_ISOLATION=False)
    server = None
    try:
        first, second = load_studies(orthanc, 2, instances=3)
        settings = app.config["PORTAL"]
        studies = find(settings, "STUDY", {"PatientID": first.patient_id})
        assert [str(s.StudyInstanceUID) for s in studies] == [first.study_uid]
        assert int(studies[0].NumberOfStudyRelatedInstances) == 3
        series = find(settings, "SERIES", {"StudyInstanceUID": second.study_uid})
        assert [str(s.SeriesInstanceUID) for s in series] == [second.series_uid]
        images = find(settings, "IMAGE", {"StudyInstanceUID": second.study_uid,
                                          "SeriesInstanceUID": second.series_uid})
        assert len(images) == 3

        with app.app_context():
            server = serve(current_archive(), settings, block=False)
        result = move(settings, first.study_uid)
        assert result.ok and (result.completed, result.failed) == (3, 0)
        assert count(app, StoredObject) == count(app, Instance) == 3
        with app.extensions["db"].new_session() as session:
            assert session.scalars(select(Study.study_instance_uid)).all() == [first.study_uid]
        # Moving again stores nothing twice.
        assert move(settings, first.study_uid).ok
        assert count(app, StoredObject) == 3
        # Through the CLI, with the SCP run by the command itself.
        server.shutdown()
        server = None
        result_cli = app.test_cli_runner().invoke(
            args=["dimse", "pull", "--with-scp", second.study_uid])
        assert result_cli.exit_code == 0, result_cli.output
        assert "3 received, 0 failed" in result_cli.output
        assert count(app, StoredObject) == 6
    finally:
        if server is not None:
            server.shutdown()
        close_app(app)
        orthanc.stop()


def test_a_search_that_misses_the_index_asks_the_archive(portal: Flask,
                                                         orthanc: OrthancServer) -> None:
    first, _second = load_studies(orthanc, 2, instances=2)
    headers = basic_auth(*make_client(portal, "reader"))
    client = portal.test_client()
    broad = client.get("/dicomweb/studies", query_string={"PatientName": "*"}, headers=headers)
    assert broad.status_code == 204  # broad searches are never forwarded
    assert count(portal, Study) == 0
    found = client.get("/dicomweb/studies", query_string={"StudyInstanceUID": first.study_uid},
                       headers=headers)
    assert found.status_code == 200
    assert [i["0020000D"]["Value"][0] for i in found.json] == [first.study_uid]
    assert count(portal, Study) == 1 and count(portal, ExternalInstance) == 2
    orthanc.stop()  # an unreachable archive leaves a miss empty, never a failed search
    missing = client.get("/dicomweb/studies", query_string={"PatientID": "NOBODY"},
                         headers=headers)
    assert missing.status_code == 204
