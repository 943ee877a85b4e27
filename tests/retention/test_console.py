"""The console's retention page through a real sign-in: rules added and changed (bad input a
400 with the reason), a legal hold placed on a patient of the practice only, and an approval
that deletes the study (the in-process job) unless a hold protects it."""

from __future__ import annotations

import uuid

from flask import Flask
from sqlalchemy import func, select

from portal import jobs
from portal.access.models import AuditEvent
from portal.archive import current_archive
from portal.index.models import Patient, Study
from portal.retention.models import LegalHold, RetentionDue, RetentionRule
from portal.retention.service import refresh_due
from tests.conftest import IdentityProvider, add_person, csrf_of, signed_in
from tests.factories import make_dataset, to_bytes


def _study(app: Flask, patient: str, day: str) -> str:
    study = f"2.25.{uuid.uuid4().int}"
    ds = make_dataset(study=study, patient_id=patient, ReferringPhysicianName="")
    ds.StudyDate = day
    with app.app_context():
        current_archive().ingest(to_bytes(ds), who="test")
    return study


def _count(app: Flask, *what: object) -> int:
    with app.extensions["db"].new_session() as session:
        return int(session.scalar(select(func.count()).select_from(what[0])  # type: ignore
                                  .where(*what[1:])) or 0)  # type: ignore


def test_office_manager_sets_rules_holds_and_approves(oidc_app: Flask,
                                                      idp: IdentityProvider) -> None:
    app = oidc_app
    old, held, foreign = (_study(app, "P-OLD", "20000101"), _study(app, "P-HELD", "20000101"),
                          _study(app, "P-FOREIGN", "20000101"))
    add_person(app, idp, "ret-om", ["office_manager"], "North")
    doctor = add_person(app, idp, "ret-doc", ["physician"], "North")
    from portal.access.models import Grant

    with app.extensions["db"].write_transaction() as session:
        for uid in (old, held):
            session.add(Grant(user_fk=doctor, study_instance_uid=uid))
    manager = signed_in(app, idp, "ret-om")
    token = csrf_of(manager)

    page = manager.get("/admin/retention/")
    assert page.status_code == 200 and "No rules: your practice keeps every study" in page.text
    bad = manager.post("/admin/retention/rules", data={
        "csrf_token": token, "modality": "C T", "keep_years": "10"})
    assert bad.status_code == 400 and "modality" in bad.text
    bad = manager.post("/admin/retention/rules", data={
        "csrf_token": token, "modality": "CT", "keep_years": "ten"})
    assert bad.status_code == 400 and _count(app, RetentionRule) == 0
    made = manager.post("/admin/retention/rules", data={
        "csrf_token": token, "modality": "ct", "keep_years": "12", "basis": "study",
        "minors_until_age": "28"})
    assert made.status_code == 302
    with app.extensions["db"].new_session() as session:
        rule = session.scalars(select(RetentionRule)).one()
        assert (rule.modality, rule.keep_years, rule.basis, rule.minors_until_age) == (
            "CT", 12, "study", 28)
    changed = manager.post(f"/admin/retention/rules/{rule.id}", data={
        "csrf_token": token, "modality": "", "keep_years": "10", "basis": "last_study"})
    assert changed.status_code == 302
    assert "Every modality: 10 years after the patient" in manager.get(
        "/admin/retention/").text

    # A hold only on a patient the practice sees (another one is a 404 like a missing one).
    assert manager.post("/admin/retention/holds", data={
        "csrf_token": token, "patient_id": "P-FOREIGN", "reason": "x"}).status_code == 404
    assert manager.post("/admin/retention/holds", data={
        "csrf_token": token, "patient_id": "P-HELD", "reason": ""}).status_code == 400
    assert manager.post("/admin/retention/holds", data={
        "csrf_token": token, "patient_id": "P-HELD", "reason": "court case"}).status_code == 302

    # Every change is in the audit trail (rules: software configuration; the hold).
    assert _count(app, AuditEvent, AuditEvent.event_id == "110113",
                  AuditEvent.patient_id == "P-HELD") == 1
    assert _count(app, AuditEvent, AuditEvent.event_id == "110113",
                  AuditEvent.who.like("%ret-om")) == 3  # two rule changes and the hold
    with app.app_context(), app.extensions["db"].write_transaction() as session:
        listed = {due.study_instance_uid for due in refresh_due(session)}
    assert listed == {old}  # held: not listed; foreign: not the practice's
    page = manager.get("/admin/retention/").text
    assert "court case" in page and "Delete the ticked studies" in page

    assert manager.post("/admin/retention/approve",
                        data={"csrf_token": token}).status_code == 400  # nothing ticked
    assert manager.post("/admin/retention/approve", data={
        "csrf_token": token, "study": [old, held, foreign]}).status_code == 302
    jobs.wait_for_lanes()
    assert _count(app, Study, Study.study_instance_uid == old) == 0
    assert _count(app, Study, Study.study_instance_uid.in_([held, foreign])) == 2
    assert _count(app, AuditEvent, AuditEvent.event_id == "110105",
                  AuditEvent.study_instance_uid == old) == 1
    assert _count(app, RetentionDue) == 0

    # A hold on another practice's patient who has the same Patient ID under another issuer:
    # this office manager cannot release it (the hold's own patient is checked, not the ID).
    with app.extensions["db"].write_transaction() as session:
        twin = Patient(patient_id="P-HELD", issuer_of_patient_id="OTHER-HOSPITAL")
        session.add(twin)
        session.flush()
        other_hold = LegalHold(patient_fk=twin.id, reason="their court case", placed_by="x")
        session.add(other_hold)
        session.flush()
        other_hold_id, twin_id = other_hold.id, twin.id
    assert manager.post(f"/admin/retention/holds/{other_hold_id}/release",
                        data={"csrf_token": token}).status_code == 404
    with app.extensions["db"].write_transaction() as session:
        assert session.get(LegalHold, other_hold_id).released_at is None  # type: ignore[union-attr]
        session.delete(session.get(LegalHold, other_hold_id))
        session.flush()
        session.delete(session.get(Patient, twin_id))

    # Releasing the hold lets the rules apply again at the next daily run.
    with app.extensions["db"].new_session() as session:
        hold = session.scalars(select(LegalHold)).one()
        patient = session.scalars(select(Patient).where(Patient.patient_id == "P-HELD")).one()
        assert hold.patient_fk == patient.id
    assert manager.post(f"/admin/retention/holds/{hold.id}/release",
                        data={"csrf_token": token}).status_code == 302
    with app.app_context(), app.extensions["db"].write_transaction() as session:
        assert {due.study_instance_uid for due in refresh_due(session)} == {held}


def test_only_office_managers_reach_the_page(oidc_app: Flask, idp: IdentityProvider) -> None:
    add_person(oidc_app, idp, "ret-doc2", ["physician"], "North")
    doctor = signed_in(oidc_app, idp, "ret-doc2")
    assert doctor.get("/admin/retention/").status_code in (403, 404)
    assert oidc_app.test_client().get("/admin/retention/").status_code in (302, 401, 403)
