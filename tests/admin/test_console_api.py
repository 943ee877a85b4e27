"""The console's searches and bulk actions through /api (the same functions as /admin)."""

from __future__ import annotations

import re

from flask import Flask
from sqlalchemy import select

from portal.access.models import AuditEvent, Grant
from portal.db import utcnow
from portal.index.models import Patient, Study
from tests.admin.conftest import Practice
from tests.conftest import IdentityProvider, csrf_of, signed_in


def test_searches_stay_within_the_practice(practice: Practice, idp: IdentityProvider) -> None:
    manager = signed_in(practice.app, idp, practice.manager)
    found = manager.get("/api/search/studies?q=jane%20do").get_json()["studies"]
    assert sorted(s["description"] for s in found) == ["CT chest", "MR knee"]
    assert found[0]["patient_name"] == "Jane Doe"
    assert [s["description"] for s in manager.get(
        "/api/search/studies?q=jane&sort=oldest").get_json()["studies"]] == ["CT chest",
                                                                             "MR knee"]
    assert manager.get("/api/search/studies?q=ACC-D1").get_json()["studies"][0][
        "description"] == "MR knee"
    assert manager.get("/api/search/studies?q=olga").get_json()["studies"] == []  # not theirs
    assert manager.get("/api/search/people?q=").get_json() == []  # nobody by default
    people = manager.get("/api/search/people?q=nina").get_json()
    assert [p["id"] for p in people] == [practice.newcomer]
    spec = practice.app.test_client().get("/api/openapi.json").get_json()
    assert {"/api/search/studies", "/api/search/people", "/api/grants/bulk",
            "/api/shares/revoke-many", "/api/attention"} <= set(spec["paths"])


def test_bulk_grant_is_one_record_per_grant_and_all_or_nothing(practice: Practice,
                                                               idp: IdentityProvider) -> None:
    manager = signed_in(practice.app, idp, practice.manager)
    headers = {"X-CSRF-Token": csrf_of(manager)}
    with practice.app.extensions["db"].new_session() as session:
        olga = session.scalars(select(Patient).where(Patient.patient_id == "OTHER-1")).one()
    refused = manager.post("/api/grants/bulk", headers=headers, json={
        "user_ids": [practice.newcomer], "study_uids": practice.doe_studies,
        "patient_records": [olga.id]})
    assert refused.status_code == 400 and "nothing was granted" in refused.get_json()["error"]
    made = manager.post("/api/grants/bulk", headers=headers, json={
        "user_ids": [practice.newcomer, practice.house], "study_uids": practice.doe_studies,
        "expires_at": "2099-01-01T00:00:00+00:00", "reason": "rota"})
    assert made.status_code == 201 and len(made.get_json()) == 4
    with practice.app.extensions["db"].new_session() as session:
        records = [e for e in session.scalars(select(AuditEvent)) if
                   isinstance(e.details, dict) and "grant" in e.details]
    assert sorted(e.details["grant"] for e in records) == sorted(
        g["id"] for g in made.get_json())

    taken = manager.post(f"/api/users/{practice.newcomer}/grants/revoke", headers=headers)
    assert len(taken.get_json()["revoked"]) == 2
    back = manager.post("/api/grants/restore", headers=headers,
                        json={"ids": taken.get_json()["revoked"]})
    assert back.status_code == 201 and len(back.get_json()) == 2
    with practice.app.extensions["db"].new_session() as session:
        live = [g for g in session.scalars(select(Grant).where(
            Grant.user_fk == practice.newcomer)) if g.revoked_at is None]
    assert len(live) == 2 and all(g.reason == "rota" for g in live)


def test_undo_gives_back_only_what_this_manager_revoked_in_his_practice(
        practice: Practice, idp: IdentityProvider) -> None:
    """A grant someone else revoked (here on another practice's patient) is not the
    manager's to give back: guessing its id changes nothing."""
    manager = signed_in(practice.app, idp, practice.manager)
    headers = {"X-CSRF-Token": csrf_of(manager)}
    with practice.app.extensions["db"].write_transaction() as session:
        olga = session.scalars(select(Patient).where(Patient.patient_id == "OTHER-1")).one()
        foreign = Grant(user_fk=practice.newcomer, patient_fk=olga.id, reason="theirs",
                        revoked_at=utcnow(), revoked_by="user:elsewhere|manager")
        session.add(foreign)
        session.flush()
        foreign_id = foreign.id
    for answer in (manager.post("/api/grants/restore", headers=headers,
                                json={"ids": [foreign_id]}),
                   manager.post("/admin/grants/restore", data={
                       "grant": str(foreign_id), "csrf_token": csrf_of(manager)})):
        assert answer.status_code in (302, 400), answer.status_code
    with practice.app.extensions["db"].new_session() as session:
        assert session.scalars(select(Grant).where(
            Grant.user_fk == practice.newcomer, Grant.revoked_at.is_(None))).all() == []


def test_invitation_links_the_picked_identifiers(practice: Practice, idp: IdentityProvider,
                                                 oidc_app: Flask) -> None:
    manager = signed_in(practice.app, idp, practice.manager)
    made = manager.post("/admin/invitations", data={
        "email": "wilson@example.org", "role_physician": "on", "key": "name:WILSON^JAMES",
        "from": "invite", "csrf_token": csrf_of(manager)})
    assert made.status_code == 302 and made.headers["Location"].endswith("/admin/invite")
    page = manager.get("/admin/invite").get_data(as_text=True)
    link = re.search(r"/auth/invitation\?t=[A-Za-z0-9_-]+", page)
    assert link is not None
    idp.set_user("wilson-new", email="wilson@example.org", name="James Wilson")
    newcomer = oidc_app.test_client()
    assert newcomer.get(link.group(0)).status_code == 200
    from tests.conftest import sign_in

    sign_in(newcomer, idp, "wilson-new")
    listed = newcomer.get("/studies").get_data(as_text=True)
    assert "Olga Other" in listed  # the study that names him, now his


def test_naming_another_practices_study_reveals_nothing(practice: Practice,
                                                        idp: IdentityProvider) -> None:
    """/admin/give?study=<uid> names only studies the practice may see."""
    manager = signed_in(practice.app, idp, practice.manager)
    with practice.app.extensions["db"].new_session() as session:
        uid = session.scalars(select(Study.study_instance_uid).join(Patient).where(
            Patient.patient_id == "OTHER-1")).first()
    page = manager.get(f"/admin/give?study={uid}")
    assert page.status_code == 200 and "Olga" not in page.get_data(as_text=True)
    mine = manager.get(f"/admin/give?study={practice.doe_studies[0]}")
    assert "Jane Doe" in mine.get_data(as_text=True)


def test_another_practices_share_links_are_out_of_sight(practice: Practice,
                                                         idp: IdentityProvider) -> None:
    """A link to a study the practice may not see is neither listed nor revocable by its
    office manager; a link to one of its own studies is."""
    from portal.access.models import User
    from portal.access.principal import user_principal
    from portal.sharing import service
    from portal.sharing.routes import share_policy

    app = practice.app
    with app.test_request_context(), app.extensions["db"].write_transaction() as session:
        olga_study = session.scalars(select(Study.study_instance_uid).join(Patient).where(
            Patient.patient_id == "OTHER-1")).first()
        doctor = user_principal(session.get(User, practice.house), "session")
        # Olga's physician belongs to no practice of this manager; he was given her study.
        far = User(issuer="elsewhere", subject="far", roles=["physician"], active=True)
        session.add(far)
        session.flush()
        session.add(Grant(user_fk=far.id, study_instance_uid=olga_study, reason="his"))
        session.flush()
        theirs = service.create_share(session, user_principal(far, "session"), share_policy(),
                                      study_uid=olga_study)
        ours = service.create_share(session, doctor, share_policy(),
                                    study_uid=practice.doe_studies[0])
        theirs_id, ours_id = theirs.link.public_id, ours.link.public_id
    manager = signed_in(app, idp, practice.manager)
    page = manager.get("/admin/shares").get_data(as_text=True)
    assert ours_id in page and theirs_id not in page and "Olga" not in page
    headers = {"X-CSRF-Token": csrf_of(manager)}
    refused = manager.post("/api/shares/revoke-many", headers=headers, json={"ids": [theirs_id]})
    assert refused.status_code in (400, 404)
    assert manager.get(f"/admin/shares/revoke?link={theirs_id}").status_code == 404
    done = manager.post("/api/shares/revoke-many", headers=headers, json={"ids": [ours_id]})
    assert done.status_code == 200 and done.get_json()["revoked"] == 1
    # The grant that let Olga's physician share her study is not this practice's either.
    assert "Olga" not in manager.get("/admin/grants").get_data(as_text=True)
