"""Accepting a large waiting study is a background job (docs/inbox.md): on a real RQ worker
(``flask jobs worker`` on a real Redis) with its progress on the study's page and a second
accept refused in plain words meanwhile; in process without Redis, where a move that stops
half-way (a quarantined file lost) is resumable with "Continue"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from portal import jobs
from portal.access.models import AuditEvent
from portal.archive import current_archive
from portal.inbox import reconcile
from portal.inbox.models import InboxInstance, InboxStudy
from portal.index.models import Instance, Patient, Series, Study
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    close_app,
    csrf_of,
    make_app,
    signed_in,
    wait_for,
)
from tests.inbox.conftest import (
    LOCAL_ID,
    build_inbox,
    outside_instance,
    principal_of,
    upload,
    zip_of,
)
from tests.inbox.test_inbox_http import _patient_client
from tests.test_jobs import queue_url, worker_of  # noqa: F401  (fixtures)

FILES = reconcile.ACCEPT_INLINE_MAX + 6  # more than a request accepts itself: three batches


def _upload_study(app: Flask, inbox: Any, files: int = FILES) -> tuple[str, str]:
    """A patient sends ``files`` images of one study as one ZIP; (Study UID, inbox id)."""
    patient, _ = _patient_client(app, inbox)
    study = generate_uid()
    answer = upload(patient, "cd.zip", zip_of({  # type: ignore[arg-type]
        f"IM{n}": outside_instance(study=study, InstanceNumber=n) for n in range(files)}))
    assert [r["outcome"] for r in answer["results"]].count("kept") == files
    with app.extensions["db"].new_session() as session:
        public_id = session.scalars(select(InboxStudy.public_id).where(
            InboxStudy.study_instance_uid == study)).one()
    return study, public_id


def _local(app: Flask) -> int:
    with app.extensions["db"].new_session() as session:
        return int(session.scalars(select(Patient.id).where(Patient.patient_id == LOCAL_ID))
                   .one())


def _state(app: Flask, public_id: str) -> tuple[str, int]:
    with app.extensions["db"].new_session() as session:
        study = session.scalars(select(InboxStudy).where(InboxStudy.public_id == public_id)
                                ).one()
        return study.state, len(study.instances)


def _archived(app: Flask, uid: str) -> int:
    with app.extensions["db"].new_session() as session:
        return int(session.scalar(select(func.count(Instance.id)).join(Series).join(Study)
                                  .where(Study.study_instance_uid == uid)) or 0)


def test_a_large_accept_runs_on_the_worker_with_progress(
        tmp_path: Path, idp: IdentityProvider, queue_url: str,  # noqa: F811
        worker_of: Any) -> None:  # noqa: F811
    app = make_app(tmp_path / "instance", REDIS_URL=queue_url, JOBS="queue",
                   OIDC_ISSUER=idp.issuer, **OIDC_SETTINGS)
    try:
        inbox = build_inbox(app, idp)
        uid, public_id = _upload_study(app, inbox)
        manager = signed_in(app, idp, "om")
        token = csrf_of(manager)
        url = f"/inbox/studies/{public_id}"
        answer = manager.post(f"{url}/accept", data={
            "csrf_token": token, "patient": _local(app), "accession": "LOC-9",
            "give_to": inbox.doctor})
        assert answer.status_code == 303 and answer.headers["Location"].endswith(url)
        # Queued, no worker yet: the page shows the progress in words, nothing moved.
        page = manager.get(url).data.decode()
        assert f"Moving the images into the archive: 0 of {FILES} done." in page
        assert "Accept into the archive" not in page
        assert manager.get(f"{url}/progress").json == {
            "state": "accepting", "done": 0, "total": FILES, "failed": False}
        assert "being moved into the archive" in manager.get("/inbox").data.decode()
        # A second accept, or a reject, is refused in plain words while it runs.
        again = manager.post(f"{url}/accept", data={"csrf_token": token,
                                                    "patient": _local(app)})
        assert again.status_code == 409
        assert "being accepted now" in again.data.decode()
        assert manager.post(f"{url}/reject", data={"csrf_token": token, "reason": "x"}
                            ).status_code == 409
        assert _archived(app, uid) == 0
        worker_of(app)
        assert wait_for(lambda: _state(app, public_id) == ("accepted", 0), timeout=120)
        assert _archived(app, uid) == FILES
        page = manager.get(url).data.decode()
        assert "Accepted into the archive as patient LOCAL-77." in page
        assert f"{FILES} images moved." in page
        with app.extensions["db"].new_session() as session:
            imports = list(session.scalars(select(AuditEvent).where(
                AuditEvent.study_instance_uid == uid, AuditEvent.event_id == "110107",
                AuditEvent.details["reconciled"].as_boolean().is_(True))))
            arrivals = session.scalar(select(func.count(AuditEvent.id)).where(
                AuditEvent.study_instance_uid == uid, AuditEvent.event_id == "110104"))
        [record] = imports  # one 110107 for the whole study, as an accept in the request
        assert record.details["stored"] == FILES and record.details["refused"] == 0
        assert record.details["original_patient_id"] == "EXT-991"
        assert arrivals  # the archive's usual 110104
        doctor = signed_in(app, idp, "doc")  # the grant given to the physician chosen
        assert doctor.get(f"/studies/{uid}").status_code == 200
    finally:
        close_app(app)


def test_a_move_that_stops_half_way_continues(inbox_app: Flask,
                                               idp: IdentityProvider) -> None:
    app = inbox_app  # no Redis: the job runs on a thread of this process
    inbox = build_inbox(app, idp)
    uid, public_id = _upload_study(app, inbox)
    q = app.extensions["inbox"]
    with app.extensions["db"].new_session() as session:
        lost = list(session.scalars(select(InboxInstance.sha256).join(InboxStudy).where(
            InboxStudy.public_id == public_id).order_by(InboxInstance.id)))[40]
    kept = q.kept_path(lost)
    data = kept.read_bytes()
    kept.unlink()  # a file of the second batch is gone from the disk
    manager = signed_in(app, idp, "om")
    token = csrf_of(manager)
    url = f"/inbox/studies/{public_id}"
    assert manager.post(f"{url}/accept", data={"csrf_token": token, "patient": _local(app)}
                        ).status_code == 303
    jobs.wait_for_lanes(120)
    # The first batch is in the archive and out of the inbox; the rest waits, nothing twice.
    assert _state(app, public_id) == ("accepting", FILES - reconcile.ACCEPT_BATCH)
    assert _archived(app, uid) == reconcile.ACCEPT_BATCH
    page = manager.get(url).data.decode()
    assert "Moving stopped:" in page and "Continue moving the images" in page
    # In plain words: no path of the instance folder, no file's hash (the log has them).
    assert "a file could not be read or stored" in page
    assert lost not in page and "/inbox/kept/" not in page
    assert f"{reconcile.ACCEPT_BATCH} of {FILES} done" in page
    assert manager.get(f"{url}/progress").json["failed"] is True
    kept.write_bytes(data)  # the disk is mended
    assert manager.post(f"{url}/accept/continue", data={"csrf_token": token}
                        ).status_code == 303
    jobs.wait_for_lanes(120)
    assert _state(app, public_id) == ("accepted", 0)
    assert _archived(app, uid) == FILES
    with app.extensions["db"].new_session() as session:
        [record] = session.scalars(select(AuditEvent).where(
            AuditEvent.study_instance_uid == uid, AuditEvent.event_id == "110107",
            AuditEvent.details["reconciled"].as_boolean().is_(True)))
    assert record.details["stored"] == FILES
    # Nothing stopped now: there is nothing to continue.
    assert manager.post(f"{url}/accept/continue", data={"csrf_token": token}
                        ).status_code == 404


def _mark_accepting(app: Flask, public_id: str) -> None:
    """The study marked "accepting" as start_accept does, on a node whose disk this one
    does not share (or whose progress file was lost): no plan here."""
    with app.extensions["db"].write_transaction() as session:
        session.execute(update(InboxStudy).where(InboxStudy.public_id == public_id)
                        .values(state="accepting", decided_by="someone"))


def _kept(app: Flask, public_id: str) -> list[Path]:
    with app.extensions["db"].new_session() as session:
        return [app.extensions["inbox"].kept_path(sha) for sha in session.scalars(
            select(InboxInstance.sha256).join(InboxStudy).where(
                InboxStudy.public_id == public_id))]


def test_an_accept_without_its_plan_is_not_stuck(inbox_app: Flask,
                                                  idp: IdentityProvider) -> None:
    """It stayed "accepting" for good: the job returned silently, no Continue, Reject 409."""
    app = inbox_app
    inbox = build_inbox(app, idp)
    _, public_id = _upload_study(app, inbox, files=3)
    manager = signed_in(app, idp, "om")
    token = csrf_of(manager)
    url = f"/inbox/studies/{public_id}"
    _mark_accepting(app, public_id)
    page = manager.get(url).data.decode()
    assert "Moving stopped." in page and "Continue moving the images" in page
    # Continue without a plan: the study waits again, to be accepted again.
    answer = manager.post(f"{url}/accept/continue", data={"csrf_token": token},
                          follow_redirects=True)
    assert answer.status_code == 200
    assert "The move stopped. The images not moved yet wait here" in answer.data.decode()
    assert "Accept into the archive" in answer.data.decode()
    assert _state(app, public_id) == ("waiting", 3)
    # The job run where the plan is not: the study waits again too.
    _mark_accepting(app, public_id)
    with app.app_context():
        assert reconcile.run_accept(public_id) == 0
    assert _state(app, public_id) == ("waiting", 3)
    # Reject works on a stopped accept: the files go once the decision is committed.
    _mark_accepting(app, public_id)
    kept = _kept(app, public_id)
    assert all(path.exists() for path in kept)
    assert manager.post(f"{url}/reject", data={"csrf_token": token, "reason": "lost"}
                        ).status_code == 303
    assert _state(app, public_id) == ("rejected", 0)
    assert not any(path.exists() for path in kept)


def test_finishing_without_the_office_manager_still_ends_the_accept(
        inbox_app: Flask, idp: IdentityProvider) -> None:
    """His user row gone before the last step: it returned early, the study "accepting"."""
    app = inbox_app
    inbox = build_inbox(app, idp)
    uid, public_id = _upload_study(app, inbox, files=2)
    _mark_accepting(app, public_id)
    database = app.extensions["db"]
    with database.write_transaction() as session:
        study = session.scalars(select(InboxStudy).where(InboxStudy.public_id == public_id)
                                ).one()
        study_pk = study.id
        study.instances.clear()  # every file moved
    progress = {"actor": 10**9, "who": "user:gone|om", "address": "127.0.0.1",
                "local": {"patient_id": LOCAL_ID, "issuer_of_patient_id": "",
                          "patient_name": "Müller^Anna", "patient_birth_date": "19800214",
                          "patient_sex": "F"},
                "accession": "LOC-1", "referrer_name": "", "referring": None,
                "give_to": inbox.doctor, "stored": 2, "refused": []}
    with app.test_request_context():
        reconcile._finish_accept(database, study_pk, progress)
    assert _state(app, public_id) == ("accepted", 0)
    with database.new_session() as session:
        [record] = session.scalars(select(AuditEvent).where(
            AuditEvent.study_instance_uid == uid, AuditEvent.event_id == "110107"))
    assert record.details["stored"] == 2 and record.details["grants"] is False


def _claimed_meanwhile(app: Flask, public_id: str) -> None:
    """Another request's claim, committed between this one's read and its own claim."""
    with app.extensions["db"].write_transaction() as session:
        session.execute(update(InboxStudy).where(InboxStudy.public_id == public_id)
                        .values(state="accepting", decided_by="other"))
    reconcile._write_progress(app.extensions["inbox"], public_id,
                              {"state": "running", "inline": True})


def test_a_claimed_study_is_not_accepted_or_rejected_twice(
        inbox_app: Flask, idp: IdentityProvider) -> None:
    """Inline accept and reject checked "waiting" and went on: a double-sent form ingested
    and audited twice; a reject deleted what an accept was moving."""
    app = inbox_app
    inbox = build_inbox(app, idp)
    uid, public_id = _upload_study(app, inbox, files=3)
    database, q = app.extensions["db"], app.extensions["inbox"]
    actor = principal_of(app, inbox.manager)
    kept = _kept(app, public_id)
    with app.test_request_context(), database.new_session() as session:
        reconcile.get_waiting(session, actor, public_id)  # this request read "waiting"
        _claimed_meanwhile(app, public_id)
        with pytest.raises(reconcile.AcceptRunning):
            reconcile.accept(session, actor, q, current_archive(), public_id,
                             patient_pk=_local(app), accession="", give_to=None,
                             address="", database=database)
    database_state = _state(app, public_id)
    with database.write_transaction() as session:
        session.execute(update(InboxStudy).where(InboxStudy.public_id == public_id)
                        .values(state="waiting"))
    with app.test_request_context(), database.new_session() as session:
        reconcile.get_study(session, actor, public_id)  # this request read "waiting"
        _claimed_meanwhile(app, public_id)
        with pytest.raises(reconcile.AlreadyHandled):
            reconcile.reject(session, actor, q, public_id, reason="", address="")
    assert database_state == ("accepting", 3)
    assert _archived(app, uid) == 0 and all(path.exists() for path in kept)
    # Over HTTP while it is claimed: 409 both, nothing stored, audited or deleted.
    manager = signed_in(app, idp, "om")
    token = csrf_of(manager)
    url = f"/inbox/studies/{public_id}"
    assert manager.post(f"{url}/accept", data={"csrf_token": token, "patient": _local(app)}
                        ).status_code == 409
    assert manager.post(f"{url}/reject", data={"csrf_token": token}).status_code == 409
    assert _archived(app, uid) == 0 and all(path.exists() for path in kept)
    with database.new_session() as session:
        assert not session.scalar(select(func.count(AuditEvent.id)).where(
            AuditEvent.study_instance_uid == uid, AuditEvent.event_id == "110107"))
    # Let go: one accept stores each file once; a second one is refused.
    with database.write_transaction() as session:
        session.execute(update(InboxStudy).where(InboxStudy.public_id == public_id)
                        .values(state="waiting"))
    assert manager.post(f"{url}/accept", data={"csrf_token": token, "patient": _local(app)}
                        ).status_code == 303
    assert manager.post(f"{url}/accept", data={"csrf_token": token, "patient": _local(app)}
                        ).status_code == 404
    assert _state(app, public_id) == ("accepted", 0) and _archived(app, uid) == 3
    assert not any(path.exists() for path in kept)
    assert not reconcile.progress_path(q, public_id).exists()
