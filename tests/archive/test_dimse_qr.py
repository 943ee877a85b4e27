"""DIMSE Query/Retrieve and Storage Commitment against real peers.

DCMTK findscu, movescu, getscu and storescp as subprocesses; pynetdicom as the Storage
Commitment SCU (DCMTK has no such tool). The SCP binds 127.0.0.1 on a free port and is shut
down after each test. docs/conformance/dimse.md is checked against the code at the end.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from flask import Flask
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from portal.access.models import Grant, User
from portal.archive import current_archive
from portal.archive.dimse import _SYNTAXES, make_ae, serve
from portal.archive.ingest import Archive
from portal.dicomweb.dimse_qr import COMMITMENT_INSTANCE, MATCHING_KEYS, offer
from tests.conftest import free_port, make_app, make_client, wait_for
from tests.factories import make_dataset, to_bytes

FINDSCU = "/usr/bin/findscu"
MOVESCU = "/usr/bin/movescu"
GETSCU = "/usr/bin/getscu"
STORESCP = "/usr/bin/storescp"
CALLED = "PORTAL"
TIMEOUTS = ("-to", "10", "-ta", "10", "-td", "30")
CONFORMANCE = Path(__file__).resolve().parents[2] / "docs" / "conformance" / "dimse.md"


@dataclass(frozen=True)
class Scp:
    """A running SCP, its archive and the data it holds."""

    app: Flask
    archive: Archive
    port: int
    dest_port: int
    sent: dict[str, Dataset]  # SOP Instance UID -> data set stored
    study_a: str
    study_b: str
    series_a1: str


def _data() -> list[Dataset]:
    study_a, study_b = generate_uid(), generate_uid()
    series_a1, series_a2, series_b = generate_uid(), generate_uid(), generate_uid()
    a = {"study": study_a, "patient_id": "PAT-1", "patient_name": "Doe^Jane"}
    b = {"study": study_b, "patient_id": "PAT-2", "patient_name": "Roe^Richard",
         "StudyDate": "20250615", "StudyDescription": "MR knee", "AccessionNumber": "ACC2"}
    return [make_dataset(series=series_a1, value=1, InstanceNumber=1, **a),
            make_dataset(series=series_a1, value=2, InstanceNumber=2, **a),
            make_dataset(series=series_a2, value=3, SeriesNumber=2, **a),
            make_dataset(series=series_b, value=4, modality="MR", **b)]


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Scp]:
    """The SCP with two studies (two patients), readers and one move destination."""
    port, dest_port = free_port(), free_port()
    peers = [f"{t}@127.0.0.1" for t in ("FINDSCU", "MOVESCU", "GETSCU", "LIMITED", "NOREAD",
                                        "COMMITSCU")]
    app = make_app(tmp_path / "instance", DIMSE_HOST="127.0.0.1", DIMSE_PORT=port,
                   DIMSE_AE_TITLE=CALLED, DIMSE_ALLOWED_PEERS=peers,
                   DIMSE_QUERY_CLIENTS=["FINDSCU=reader", "MOVESCU=reader", "GETSCU=reader",
                                        "COMMITSCU=reader", "NOREAD=storer",
                                        "LIMITED=user:limited@example.org"],
                   DIMSE_MOVE_DESTINATIONS=[f"STORESCP@127.0.0.1:{dest_port}"])
    make_client(app, "reader", can_read=True)
    make_client(app, "storer", can_read=False)
    with app.app_context():
        archive = current_archive()
    datasets = _data()
    for ds in datasets:
        assert archive.ingest(to_bytes(ds), who="test").outcome == "stored"
    study_a, study_b = datasets[0].StudyInstanceUID, datasets[3].StudyInstanceUID
    database = app.extensions["db"]
    with database.write_transaction() as session:
        user = User(issuer="https://idp.test", subject="limited", email="limited@example.org",
                    display_name="Dr Limited", roles=["physician"], active=True)
        session.add(user)
        session.flush()
        session.add(Grant(user_fk=user.id, study_instance_uid=study_b, granted_by="test"))
    # The services create_app registers for `dimse serve`.
    assert app.extensions["dimse_services"] == [offer]
    server = serve(archive, app.config["PORTAL"], block=False,
                   services=app.extensions["dimse_services"])
    assert server is not None
    try:
        yield Scp(app, archive, port, dest_port, {d.SOPInstanceUID: d for d in datasets},
                  study_a, study_b, datasets[0].SeriesInstanceUID)
    finally:
        server.shutdown()
        app.extensions["db"].dispose()


def output(done: subprocess.CompletedProcess[str]) -> str:
    """Everything a DCMTK tool printed."""
    return done.stdout + done.stderr


def findscu(scp: Scp, out: Path, keys: list[str], *, root: str = "-S",
            aet: str = "FINDSCU") -> tuple[subprocess.CompletedProcess[str], list[Dataset]]:
    """Run DCMTK findscu; return its run and the response identifiers it extracted."""
    out.mkdir(exist_ok=True)
    args = [a for key in keys for a in ("-k", key)]
    done = subprocess.run([FINDSCU, "-v", "-aet", aet, "-aec", CALLED, *TIMEOUTS, root, "-X",
                           "-od", str(out), *args, "127.0.0.1", str(scp.port)],
                          capture_output=True, text=True, timeout=60, check=False)
    answers = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return done, answers


def values(answers: list[Dataset], keyword: str) -> list[str]:
    """One attribute of every response, as sorted strings."""
    return sorted(str(a.get(keyword, "")) for a in answers)


# -- C-FIND ----------------------------------------------------------------------------------

def test_study_root_study_level_wildcard(scp: Scp, tmp_path: Path) -> None:
    """A wildcard on the patient's name finds that patient's study, with the asked keys."""
    done, answers = findscu(scp, tmp_path / "r", [
        "QueryRetrieveLevel=STUDY", "PatientName=doe*", "StudyInstanceUID",
        "StudyDescription", "NumberOfStudyRelatedInstances", "ModalitiesInStudy"])
    assert done.returncode == 0, output(done)
    assert values(answers, "StudyInstanceUID") == [scp.study_a]
    answer = answers[0]
    assert answer.StudyDescription == "CT chest"
    assert str(answer.PatientName) == "Doe^Jane"
    assert int(answer.NumberOfStudyRelatedInstances) == 3
    assert answer.RetrieveAETitle == CALLED


def test_study_date_range_both_roots(scp: Scp, tmp_path: Path) -> None:
    """Date ranges match as in QIDO, under the Study Root and the Patient Root models."""
    for root in ("-S", "-P"):
        keys = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"]
        if root == "-P":
            keys.append("PatientID=PAT-2")
        done, answers = findscu(scp, tmp_path / f"r{root}", [*keys, "StudyDate=20250101-20251231"],
                                root=root)
        assert done.returncode == 0, output(done)
        assert values(answers, "StudyInstanceUID") == [scp.study_b], root
    done, answers = findscu(scp, tmp_path / "open", [
        "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "StudyDate=20260101-"])
    assert values(answers, "StudyInstanceUID") == [scp.study_a]


def test_patient_root_patient_level(scp: Scp, tmp_path: Path) -> None:
    """PATIENT level: one answer per patient, with the patient-related counts."""
    done, answers = findscu(scp, tmp_path / "r", [
        "QueryRetrieveLevel=PATIENT", "PatientID", "PatientName",
        "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances"], root="-P")
    assert done.returncode == 0, output(done)
    assert values(answers, "PatientID") == ["PAT-1", "PAT-2"]
    first = next(a for a in answers if a.PatientID == "PAT-1")
    assert int(first.NumberOfPatientRelatedStudies) == 1
    assert int(first.NumberOfPatientRelatedInstances) == 3


def test_series_and_image_levels(scp: Scp, tmp_path: Path) -> None:
    """SERIES and IMAGE levels under a study, and a series, with exact and wildcard keys."""
    done, answers = findscu(scp, tmp_path / "s", [
        "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={scp.study_a}", "SeriesInstanceUID",
        "SeriesNumber", "Modality=C?"])
    assert done.returncode == 0, output(done)
    assert values(answers, "SeriesNumber") == ["1", "2"]
    done, answers = findscu(scp, tmp_path / "i", [
        "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={scp.study_a}",
        f"SeriesInstanceUID={scp.series_a1}", "SOPInstanceUID", "InstanceNumber"])
    assert done.returncode == 0, output(done)
    assert values(answers, "InstanceNumber") == ["1", "2"]
    assert set(values(answers, "SOPInstanceUID")) <= set(scp.sent)
    # The Study Root model has no PATIENT level: a failure, not an empty answer.
    done, answers = findscu(scp, tmp_path / "p", ["QueryRetrieveLevel=PATIENT", "PatientID"])
    assert answers == []
    assert "Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in output(done), \
        output(done)


def test_a_limited_client_sees_only_its_studies(scp: Scp, tmp_path: Path) -> None:
    """A user granted study B alone finds study B alone, at every level."""
    done, answers = findscu(scp, tmp_path / "st", ["QueryRetrieveLevel=STUDY",
                                                  "StudyInstanceUID"], aet="LIMITED")
    assert done.returncode == 0, output(done)
    assert values(answers, "StudyInstanceUID") == [scp.study_b]
    done, answers = findscu(scp, tmp_path / "im", [
        "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={scp.study_a}", "SOPInstanceUID"],
        aet="LIMITED")
    assert answers == []
    done, answers = findscu(scp, tmp_path / "pa", ["QueryRetrieveLevel=PATIENT", "PatientID"],
                            root="-P", aet="LIMITED")
    assert values(answers, "PatientID") == ["PAT-2"]


def test_a_storer_without_read_rights_gets_a_failure(scp: Scp, tmp_path: Path) -> None:
    """Allowed to store, mapped to a client without the read right: no answers, 0xC000."""
    done, answers = findscu(scp, tmp_path / "r", ["QueryRetrieveLevel=STUDY",
                                                 "StudyInstanceUID"], aet="NOREAD")
    assert answers == []
    text = output(done)
    assert "Final Find Response (Failed: UnableToProcess)" in text, text


def test_unknown_calling_ae_is_refused(scp: Scp, tmp_path: Path) -> None:
    """A calling AE title that is not configured is refused at association."""
    done, answers = findscu(scp, tmp_path / "r", ["QueryRetrieveLevel=STUDY",
                                                 "StudyInstanceUID"], aet="INTRUDER")
    assert done.returncode != 0
    assert answers == []
    assert "Association Rejected" in output(done), output(done)


# -- C-MOVE ----------------------------------------------------------------------------------

def movescu(scp: Scp, destination: str, keys: list[str]) -> subprocess.CompletedProcess[str]:
    """Run DCMTK movescu (Study Root) asking to move to ``destination``."""
    args = [a for key in keys for a in ("-k", key)]
    return subprocess.run([MOVESCU, "-v", "-d", "-aet", "MOVESCU", "-aec", CALLED, "-aem",
                           destination, *TIMEOUTS, "-S", *args, "127.0.0.1", str(scp.port)],
                          capture_output=True, text=True, timeout=90, check=False)


def final_response(text: str) -> str:
    """movescu's debug print of the final C-MOVE response."""
    assert "Received Final Move Response" in text, text
    return text.split("Received Final Move Response", 1)[1]


def test_move_to_an_unknown_destination_fails(scp: Scp) -> None:
    """Only configured destinations: another AE title gets 0xA801."""
    done = movescu(scp, "ELSEWHERE", ["QueryRetrieveLevel=STUDY",
                                      f"StudyInstanceUID={scp.study_a}"])
    text = output(done)
    assert "DIMSE Status                  : 0xa801" in final_response(text), text


@contextmanager
def storescp(scp: Scp, received: Path) -> Iterator[None]:
    """DCMTK storescp as the move destination STORESCP, on 127.0.0.1, writing to
    ``received``; it accepts the uncompressed transfer syntaxes only (its default)."""
    received.mkdir()
    # storescp 3.6.7 has no option to bind one address: the loopback shim Orthanc runs with
    # (tests/support/orthanc.py) turns its wildcard bind into 127.0.0.1.
    from tests.support.orthanc import build_preload_library, listening_addresses

    env = {**os.environ, "LD_PRELOAD": str(build_preload_library())}
    listener = subprocess.Popen([STORESCP, "-aet", "STORESCP", "-od", str(received),
                                 str(scp.dest_port)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: listening_addresses(listener.pid), timeout=10)
        assert {address for address, _port in listening_addresses(listener.pid)} \
            == {"127.0.0.1"}
        yield
    finally:
        listener.terminate()
        listener.wait(timeout=10)


def test_move_study_to_storescp(scp: Scp, tmp_path: Path) -> None:
    """C-MOVE of a study reaches a DCMTK storescp with every instance, pixels byte-equal."""
    received = tmp_path / "received"
    with storescp(scp, received):
        done = movescu(scp, "STORESCP", ["QueryRetrieveLevel=STUDY",
                                         f"StudyInstanceUID={scp.study_a}"])
    text = output(done)
    assert done.returncode == 0, text
    files = [pydicom.dcmread(p) for p in received.iterdir()]
    assert len(files) == 3, text
    for ds in files:
        original = scp.sent[ds.SOPInstanceUID]
        assert ds.StudyInstanceUID == scp.study_a
        assert ds.PixelData == original.PixelData
    final = final_response(text)
    assert re.search(r"Completed Suboperations +: 3\n", final), text
    assert re.search(r"Failed Suboperations +: 0\n", final), text
    assert "DIMSE Status                  : 0x0000" in final, text


def test_a_destination_taking_none_of_the_instances_counts_them_failed(
        scp: Scp, tmp_path: Path) -> None:
    """A known destination that accepts none of the study's contexts (JPEG, where storescp
    takes uncompressed data only): every sub-operation failed (0xA702), not 0xA801."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    study = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = "PAT-J"
    assert scp.archive.ingest(to_bytes(ds), who="test").outcome == "stored"
    received = tmp_path / "received"
    with storescp(scp, received):
        done = movescu(scp, "STORESCP", ["QueryRetrieveLevel=STUDY",
                                         f"StudyInstanceUID={study}"])
    text = output(done)
    final = final_response(text)
    assert "DIMSE Status                  : 0xa702" in final, text
    assert re.search(r"Failed Suboperations +: 1\n", final), text
    assert ds.SOPInstanceUID in final, text  # the Failed SOP Instance UID List
    assert not list(received.iterdir())


# -- C-GET -----------------------------------------------------------------------------------

def test_get_series_into_a_directory(scp: Scp, tmp_path: Path) -> None:
    """C-GET of one series: its two instances arrive on the same association."""
    out = tmp_path / "got"
    out.mkdir()
    done = subprocess.run([GETSCU, "-v", "-aet", "GETSCU", "-aec", CALLED, *TIMEOUTS, "-S",
                           "-k", "QueryRetrieveLevel=SERIES",
                           "-k", f"StudyInstanceUID={scp.study_a}",
                           "-k", f"SeriesInstanceUID={scp.series_a1}",
                           "-od", str(out), "127.0.0.1", str(scp.port)],
                          capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, output(done)
    files = [pydicom.dcmread(p) for p in out.iterdir()]
    assert sorted(int(ds.InstanceNumber) for ds in files) == [1, 2], output(done)
    for ds in files:
        assert ds.SeriesInstanceUID == scp.series_a1
        assert ds.PixelData == scp.sent[ds.SOPInstanceUID].PixelData


# -- Storage Commitment ----------------------------------------------------------------------

def test_storage_commitment_reports_what_is_safely_stored(scp: Scp) -> None:
    """N-ACTION: stored instances are committed; unknown, wrong-class and corrupted ones fail."""
    stored = list(scp.sent)
    corrupted = stored[1]
    path = Path(scp.archive.locate(corrupted).path)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")  # same size, other content
    unknown = generate_uid()
    wrong_class = stored[2]
    request = Dataset()
    request.TransactionUID = generate_uid()
    request.ReferencedSOPSequence = []
    for uid, sop_class in ((stored[0], scp.sent[stored[0]].SOPClassUID),
                           (corrupted, scp.sent[corrupted].SOPClassUID),
                           (unknown, scp.sent[stored[0]].SOPClassUID),
                           (wrong_class, MRImageStorage)):
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        request.ReferencedSOPSequence.append(item)
    reports: list[tuple[int, Dataset]] = []
    arrived = threading.Event()

    def on_report(event: evt.Event) -> tuple[int, None]:
        reports.append((int(event.event_type or 0), event.event_information))
        arrived.set()
        return 0x0000, None

    ae = AE(ae_title="COMMITSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=CALLED,
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    assert assoc.is_established
    try:
        status, _reply = assoc.send_n_action(request, 1, StorageCommitmentPushModel,
                                             COMMITMENT_INSTANCE)
        assert status.Status == 0x0000
        assert arrived.wait(15), "no N-EVENT-REPORT"
    finally:
        assoc.release()
    event_type, info = reports[0]
    assert event_type == 2  # some failed
    assert info.TransactionUID == request.TransactionUID
    assert [i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence] == [stored[0]]
    failed = {i.ReferencedSOPInstanceUID: int(i.FailureReason) for i in info.FailedSOPSequence}
    assert failed == {corrupted: 0x0110, unknown: 0x0112, wrong_class: 0x0119}


# -- the conformance statement ---------------------------------------------------------------

def _section(text: str, title: str) -> str:
    start = text.index(title)
    rest = text[start + len(title):]
    depth = len(title) - len(title.lstrip("#"))
    end = re.search(rf"^#{{1,{depth}}} ", rest, re.MULTILINE)  # the next heading as high
    return rest[:end.start()] if end else rest


def test_conformance_statement_matches_the_code(tmp_path: Path) -> None:
    """docs/conformance/dimse.md lists exactly the SCP's SOP classes, transfer syntaxes of
    storage and the C-FIND matching keys per level."""
    text = CONFORMANCE.read_text()
    uid = re.compile(r"`(1\.2\.840\.10008\.[0-9.]+)`")
    app = make_app(tmp_path / "instance")
    try:
        ae = make_ae(app.config["PORTAL"])
        with app.app_context():
            offer(ae, current_archive(), app.config["PORTAL"])
    finally:
        app.extensions["db"].dispose()
    supported = {str(cx.abstract_syntax) for cx in ae.supported_contexts}
    assert set(uid.findall(_section(text, "## SOP classes"))) == supported
    assert set(uid.findall(_section(text, "## Transfer syntaxes"))) == set(_SYNTAXES)
    for level, tags in MATCHING_KEYS.items():
        listed = set(re.findall(r"\| `([A-Za-z]+)` \|", _section(text, f"### {level} level")))
        assert listed == {keyword_for_tag(int(t, 16)) for t in tags}, level

