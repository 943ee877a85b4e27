"""After ingest: every way in (STOW-RS, C-STORE, ``archive import``) runs the same steps once
its new instances are committed: the audit record, pre-rendering, the header of each new
series' middle image, and reports from SR and encapsulated-PDF objects with their
report-ready notice (a real SMTP server, aiosmtpd on 127.0.0.1) and unread badge."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import select

from portal.access.grants import link_identifier
from portal.access.models import AuditEvent
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.archive.dimse import serve
from portal.index.models import Instance
from portal.reports.models import Report
from portal.reports.pdf import report_pdf
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    add_person,
    basic_auth,
    close_app,
    free_port,
    make_app,
    make_client,
    signed_in,
    wait_for,
)
from tests.dicomweb.test_stow import headers, multipart
from tests.factories import make_dataset, make_instance, to_bytes
from tests.reports.test_sources import pdf_document, sr_document
from tests.sharing import test_delivery
from tests.sharing.test_delivery import Mailbox

ADMIN = Principal("user", 0, "test", roles=frozenset({"office_manager"}), issuer="test",
                  subject="setup")
STORESCU = "/usr/bin/storescu"  # Debian's DCMTK, not pynetdicom's look-alike in .venv/bin
CALLED = "PORTAL"
mailbox = test_delivery.mailbox  # the real SMTP server fixture


def audit_rows(app: Flask, event_id: str) -> list[AuditEvent]:
    """The audit records of one event type, oldest first."""
    with app.extensions["db"].new_session() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.event_id == event_id)
                                    .order_by(AuditEvent.id)))


def reports_of(app: Flask, accession: str) -> list[Report]:
    """The reports stored for an accession number."""
    with app.extensions["db"].new_session() as session:
        return list(session.scalars(select(Report).where(Report.accession_number == accession)))


# -- the CLI import's audit record -----------------------------------------------------------

def test_cli_import_of_one_instance_writes_one_audit_record(runner: Any, app: Flask,
                                                            tmp_path: Path) -> None:
    study = generate_uid()
    path = tmp_path / "one.dcm"
    path.write_bytes(make_instance(study=study))
    result = runner.invoke(args=["archive", "import", str(path)])
    assert result.exit_code == 0, result.output
    rows = audit_rows(app, "110107")
    assert len(rows) == 1, [(r.event_id, r.outcome, r.who) for r in rows]
    row = rows[0]
    assert (row.event_name, row.action, row.outcome) == ("Import", "C", 0)
    assert (row.who, row.source_address, row.study_instance_uid) == ("cli:import", "cli", study)
    assert row.details == {"instances": 1}
    again = runner.invoke(args=["archive", "import", str(path)])  # already stored: no record
    assert "already stored: 1" in again.output
    assert len(audit_rows(app, "110107")) == 1


def test_every_way_in_runs_the_same_steps_in_order(app: Flask) -> None:
    with app.app_context():
        assert current_archive().after.names == ["audit", "headers", "prerender", "reports"]


def test_the_middle_image_header_is_kept_at_ingest(app: Flask, tmp_path: Path,
                                                   runner: Any) -> None:
    study, series = generate_uid(), generate_uid()
    folder = tmp_path / "series"
    folder.mkdir()
    datasets = [make_dataset(study=study, series=series, InstanceNumber=i + 1)
                for i in range(3)]
    for number, ds in enumerate(datasets):
        (folder / f"{number}.dcm").write_bytes(to_bytes(ds))
    assert runner.invoke(args=["archive", "import", str(folder)]).exit_code == 0
    with app.extensions["db"].new_session() as session:
        kept = dict(session.execute(select(Instance.sop_instance_uid, Instance.header)).all())
    middle = str(datasets[1].SOPInstanceUID)
    assert kept[middle] is not None and kept[middle]["0020000D"]["Value"] == [study]
    assert [uid for uid, header in kept.items() if header is not None] == [middle]



def test_stow_keeps_the_middle_header_without_making_the_sender_wait(app: Flask) -> None:
    """Issue 17: instances sent one a request move the series' middle image nearly every
    time; its header is made in the background (the answer does not wait for it), and the
    middle image's of the whole series is kept in the end."""
    study, series = generate_uid(), generate_uid()
    datasets = [make_dataset(study=study, series=series, InstanceNumber=i + 1)
                for i in range(5)]
    auth = basic_auth(*make_client(app, "modality"))
    client = app.test_client()
    for ds in datasets:
        assert client.post("/dicomweb/studies", headers=headers(auth),
                           data=multipart(to_bytes(ds))).status_code == 200
    middle = str(datasets[2].SOPInstanceUID)

    def kept() -> dict[str, Any]:
        with app.extensions["db"].new_session() as session:
            rows = session.execute(select(Instance.sop_instance_uid, Instance.header)).all()
        return {uid: header for uid, header in rows if header is not None}

    assert wait_for(lambda: middle in kept(), timeout=20)
    assert kept()[middle]["0020000D"]["Value"] == [study]


def test_a_series_sent_one_instance_a_request_is_prerendered_once_while_it_waits(
        app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17: while the pre-render lane is busy (a volume being built), the instances of a
    series sent one a request queue one warm-up of it, not one a request (each would render
    again and rebuild the growing series' volume, taking the CPU from the senders)."""
    import threading

    from portal import jobs
    from portal.imaging import prerender

    study, series = generate_uid(), generate_uid()
    runs: list[list[str]] = []
    real = prerender.warm_series

    def counted(series_uids: list[str], images: bool) -> None:
        runs.append(list(series_uids))
        real(series_uids, images)

    monkeypatch.setattr(prerender, "warm_series", counted)
    busy = threading.Event()
    jobs._lane("prerender").submit(busy.wait, 30)
    auth = basic_auth(*make_client(app, "modality"))
    client = app.test_client()
    try:
        for number in range(1, 6):
            ds = make_dataset(study=study, series=series, InstanceNumber=number)
            assert client.post("/dicomweb/studies", headers=headers(auth),
                               data=multipart(to_bytes(ds))).status_code == 200
    finally:
        busy.set()
    assert wait_for(lambda: bool(runs), timeout=20)
    done = threading.Event()
    jobs._lane("prerender").submit(done.set)
    assert done.wait(30)
    assert runs == [[series]]

# -- reports from SR and PDF objects, at once ------------------------------------------------

@pytest.fixture
def portal(tmp_path: Path, idp: IdentityProvider,
           mailbox: tuple[Mailbox, int]) -> Iterator[Flask]:
    """Sign-in, e-mail, and the C-STORE SCP accepting DCMTK's storescu from 127.0.0.1."""
    application = make_app(tmp_path / "instance", OIDC_ISSUER=idp.issuer, **OIDC_SETTINGS,
                           SMTP_URL=f"smtp://127.0.0.1:{mailbox[1]}",
                           SMTP_FROM="portal@clinic.test", PUBLIC_URL="https://portal.test",
                           DIMSE_HOST="127.0.0.1", DIMSE_PORT=free_port(),
                           DIMSE_AE_TITLE=CALLED, DIMSE_ALLOWED_PEERS=["STORESCU@127.0.0.1"])
    yield application
    close_app(application)


def doctor(app: Flask, idp: IdentityProvider) -> str:
    """A physician whose referrer identifier the test studies name (Wilson^James)."""
    subject = "wilson-" + generate_uid()[-8:]
    user = add_person(app, idp, subject, ["physician"])
    with app.extensions["db"].write_transaction() as session:
        link_identifier(session, ADMIN, user, "Wilson^James")
    return subject


def image(study: str, accession: str) -> bytes:
    """An image of the study, referred by Wilson^James."""
    return to_bytes(make_dataset(study=study, patient_id="P-S", AccessionNumber=accession,
                                 ReferringPhysicianName="Wilson^James"))


def assert_notified_and_badged(app: Flask, idp: IdentityProvider, subject: str, study: str,
                               box: Mailbox) -> None:
    """One report-ready e-mail went to the physician, and the study list shows the study as
    having a new report: before anyone opened the study."""
    assert wait_for(lambda: len(box.messages) == 1, timeout=30), box.messages
    mail = box.messages[0]
    assert (mail["To"], mail["Subject"]) == (f"{subject}@demo.example", "A report is ready")
    assert "https://portal.test/studies?report=new" in mail.get_payload()
    browser = signed_in(app, idp, subject)
    listing = browser.get("/studies?report=new").get_data(as_text=True)
    assert study in listing and "New report" in listing


def test_an_sr_sent_by_stow_is_a_report_at_once_with_its_notice(
        portal: Flask, idp: IdentityProvider, mailbox: tuple[Mailbox, int]) -> None:
    box, _port = mailbox
    subject = doctor(portal, idp)
    study, accession = generate_uid(), "SR" + generate_uid()[-6:]
    auth = basic_auth(*make_client(portal, "modality"))
    answer = portal.test_client().post("/dicomweb/studies", headers=headers(auth),
                                       data=multipart(image(study, accession),
                                                      sr_document(study, accession)))
    assert answer.status_code == 200, answer.get_data(as_text=True)
    [report] = reports_of(portal, accession)
    assert (report.source, report.status, report.impression) == ("sr", "final",
                                                                 "No focal lesion.")
    assert report.notified_at is not None
    assert_notified_and_badged(portal, idp, subject, study, box)
    [row] = audit_rows(portal, "110104")  # STOW-RS keeps its 110104 record
    assert (row.study_instance_uid, row.details) == (study, {"instances": 2})


def test_an_unverified_sr_is_a_preliminary_report_without_a_notice(
        portal: Flask, idp: IdentityProvider, mailbox: tuple[Mailbox, int]) -> None:
    box, _port = mailbox
    doctor(portal, idp)
    study, accession = generate_uid(), "SP" + generate_uid()[-6:]
    auth = basic_auth(*make_client(portal, "modality"))
    answer = portal.test_client().post("/dicomweb/studies", headers=headers(auth),
                                       data=multipart(image(study, accession),
                                                      sr_document(study, accession,
                                                                  verified=False)))
    assert answer.status_code == 200
    [report] = reports_of(portal, accession)
    assert report.status == "preliminary" and report.notified_at is None
    assert box.messages == []


def test_a_pdf_sent_by_c_store_is_a_report_at_once_with_its_notice(
        portal: Flask, idp: IdentityProvider, mailbox: tuple[Mailbox, int],
        tmp_path: Path) -> None:
    from portal.index.models import Patient, Study

    box, _port = mailbox
    subject = doctor(portal, idp)
    study, accession = generate_uid(), "PDF" + generate_uid()[-6:]
    original = report_pdf(Report(title="Outside", status="final", findings="From PDF",
                                 impression="", author="", version=1),
                          Study(study_date="20260301", accession_number=accession,
                                patient=Patient(patient_id="P-S", patient_name="A^B")))
    files = [tmp_path / "image.dcm", tmp_path / "report.dcm"]
    files[0].write_bytes(image(study, accession))
    files[1].write_bytes(pdf_document(study, accession, original))
    with portal.app_context():
        server = serve(current_archive(), portal.config["PORTAL"], block=False)
    assert server is not None
    try:
        done = subprocess.run(
            [STORESCU, "-aet", "STORESCU", "-aec", CALLED, "-to", "10", "-ta", "10", "-td", "30",
             "127.0.0.1", str(portal.config["PORTAL"]["DIMSE_PORT"]), *map(str, files)],
            capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        # The steps run when the association ends, in the SCP's thread.
        assert wait_for(lambda: len(reports_of(portal, accession)) == 1, timeout=30)
        [report] = reports_of(portal, accession)
        assert (report.source, report.status, report.pdf) == ("pdf", "final", original)
        assert_notified_and_badged(portal, idp, subject, study, box)
        # One 110104 record per C-STORE, committed with its index row.
        rows = audit_rows(portal, "110104")
        assert [(r.who, r.study_instance_uid, r.details) for r in rows] == [
            ("dimse:STORESCU", study, {"instances": 1})] * 2
    finally:
        server.shutdown()


def test_a_report_that_came_before_its_study_is_announced_when_the_study_arrives(
        portal: Flask, idp: IdentityProvider, mailbox: tuple[Mailbox, int]) -> None:
    from portal.reports import inbound
    from portal.reports.notify import notifier
    from tests.reports.test_hl7 import msa, oru

    box, _port = mailbox
    subject = doctor(portal, idp)
    study, accession = generate_uid(), "EA" + generate_uid()[-6:]
    # The RIS's final report first, as `flask hl7 serve` hands it over: nobody to tell yet.
    with portal.app_context():
        ack = inbound.handle(oru(accession, "F", "IMP:Early read.", patient="P-S").encode(),
                             portal.extensions["db"], peer_address="127.0.0.1",
                             allowed=inbound.parse_senders(["RIS@127.0.0.1"]),
                             max_bytes=1 << 20, notify=notifier(portal))
    assert msa(ack.decode())[0] == "AA" and box.messages == []
    auth = basic_auth(*make_client(portal, "modality"))
    client = portal.test_client()
    assert client.post("/dicomweb/studies", headers=headers(auth),
                       data=multipart(image(study, accession))).status_code == 200
    assert_notified_and_badged(portal, idp, subject, study, box)
    # A later series of the same study announces nothing again.
    assert client.post("/dicomweb/studies", headers=headers(auth),
                       data=multipart(image(study, accession))).status_code == 200
    assert len(box.messages) == 1


def test_an_sr_synced_from_the_external_archive_is_a_report_and_audited(
        tmp_path: Path) -> None:
    from tests.archive.test_external import portal_for, start_pacs, sync, upload

    orthanc = start_pacs(tmp_path / "pacs")
    try:
        app = portal_for(tmp_path, orthanc.dicomweb_url)
        try:
            study, accession = generate_uid(), "SY" + generate_uid()[-6:]
            upload(orthanc, image(study, accession))
            upload(orthanc, sr_document(study, accession))
            report = sync(app, full=True)
            assert report.instances_added == 2
            [stored] = reports_of(app, accession)  # the SR was fetched to be read
            assert (stored.source, stored.impression) == ("sr", "No focal lesion.")
            [row] = audit_rows(app, "110104")
            assert (row.who, row.study_instance_uid, row.details) == (
                "archive:sync", study, {"instances": 2})
            assert sync(app, full=True).instances_added == 0  # nothing new: no record
            assert len(audit_rows(app, "110104")) == 1
        finally:
            close_app(app)
    finally:
        orthanc.stop()
