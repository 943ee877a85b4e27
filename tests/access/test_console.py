"""The office-manager console and /api: guarded, CSRF-proof, recent sign-in, audited."""

from __future__ import annotations

from datetime import timedelta

from flask import Flask
from flask.testing import FlaskClient
from pydicom.uid import generate_uid
from sqlalchemy import func, select, text, update

from portal.access.models import AuditEvent, Grant, ReferrerIdentifier, User
from portal.archive import current_archive
from portal.audit import verify_chain
from portal.auth.models import UserSession
from portal.db import utcnow
from portal.index.referrers import parse_key
from tests.conftest import (
    IdentityProvider,
    add_person,
    basic_auth,
    csrf_of,
    make_client,
    signed_in,
)
from tests.factories import make_instance


def setup(app: Flask, idp: IdentityProvider) -> tuple[FlaskClient, int, str]:
    """A signed-in office manager of "Clinic", a physician of it (id) and a study the practice
    sees (a colleague of the practice referred it) but the physician does not."""
    suffix = generate_uid()[-6:]
    add_person(app, idp, f"om-{suffix}", ["office_manager"], "Clinic")
    doctor = add_person(app, idp, f"doc-{suffix}", ["physician"], "Clinic")
    referrer_of_practice(app, "Clinic", f"Who^Doc{suffix}")
    study = generate_uid()
    with app.app_context():
        current_archive().ingest(make_instance(
            study=study, ReferringPhysicianName=f"Who^Doc{suffix}"), who="test")
    return signed_in(app, idp, f"om-{suffix}"), doctor, study


def practice_study(app: Flask, practice: str) -> str:
    """A new study that ``practice`` sees (one of its physicians referred it); its UID."""
    name, study = f"Practice^Colleague{generate_uid()[-8:]}", generate_uid()
    referrer_of_practice(app, practice, name)
    with app.app_context():
        current_archive().ingest(make_instance(study=study, ReferringPhysicianName=name),
                                 who="test")
    return study


def referrer_of_practice(app: Flask, practice: str, name: str) -> int:
    """A physician of ``practice`` whose studies name him as ``name`` (a DICOM PN): what
    he refers, his practice's office managers see and may grant. He never signs in."""
    from portal.access.users import get_or_create_practice

    with app.extensions["db"].write_transaction() as session:
        colleague = User(issuer="https://referrers.test", subject=f"ref-{generate_uid()}",
                         email="", display_name=name, roles=["physician"], active=True,
                         security_epoch=0,
                         practice_fk=get_or_create_practice(session, practice).id)
        session.add(colleague)
        session.flush()
        session.add(ReferrerIdentifier(user_fk=colleague.id, key=parse_key(name),
                                       created_by="test", created_at=utcnow()))
        return colleague.id



def granted_viewer(app: Flask, idp: IdentityProvider) -> tuple[FlaskClient, str, str]:
    """A physician given one study by the office manager, signed in: (client, subject, study)."""
    manager, doctor, study = setup(app, idp)
    manager.post("/api/grants", json={"user_id": doctor, "study_uid": study},
                 headers={"X-CSRF-Token": csrf_of(manager)})
    with app.extensions["db"].new_session() as session:
        subject = session.get(User, doctor).subject
    return signed_in(app, idp, subject), subject, study

def count(app: Flask, model: type) -> int:
    with app.extensions["db"].new_session() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def test_console_is_for_office_managers_only(oidc_app: Flask, idp: IdentityProvider) -> None:
    manager, _doctor, _study = setup(oidc_app, idp)
    for page in ("/admin/", "/admin/users", "/admin/identifiers", "/admin/grants",
                 "/admin/audit"):
        assert manager.get(page).status_code == 200, page
    add_person(oidc_app, idp, "plain-doc", ["physician"])
    doctor = signed_in(oidc_app, idp, "plain-doc")
    assert doctor.get("/admin/users").status_code == 403
    assert doctor.get("/api/users").status_code == 403


def test_grant_from_the_console_with_csrf(oidc_app: Flask, idp: IdentityProvider) -> None:
    manager, doctor, study = setup(oidc_app, idp)
    form = {"user_id": doctor, "study_uid": study, "reason": "second opinion"}
    assert manager.post("/admin/grants", data=form).status_code == 403  # no token
    other = signed_in(oidc_app, idp, "plain-other")
    form_other = {**form, "csrf_token": csrf_of(other)}
    assert manager.post("/admin/grants", data=form_other).status_code == 403
    cross = manager.post("/admin/grants", data={**form, "csrf_token": csrf_of(manager)},
                         headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403
    evil = manager.post("/admin/grants", data={**form, "csrf_token": csrf_of(manager)},
                        headers={"Origin": "https://evil.test"})
    assert evil.status_code == 403
    assert count(oidc_app, Grant) == 0
    ok = manager.post("/admin/grants", data={**form, "csrf_token": csrf_of(manager)})
    assert ok.status_code == 302
    assert count(oidc_app, Grant) == 1
    assert manager.get("/admin/grants/1/revoke").status_code == 405


def test_changes_need_a_recent_sign_in(oidc_app: Flask, idp: IdentityProvider) -> None:
    manager, doctor, study = setup(oidc_app, idp)
    with oidc_app.extensions["db"].write_transaction() as session:
        session.execute(update(UserSession).values(auth_time=utcnow() - timedelta(hours=1)))
    response = manager.post("/admin/grants", data={
        "user_id": doctor, "study_uid": study, "csrf_token": csrf_of(manager)},
        headers={"Referer": "http://localhost/admin/grants"})
    assert response.status_code == 302
    assert "/auth/login?reauth=1" in response.headers["Location"]
    assert count(oidc_app, Grant) == 0


def test_identifiers_with_suggestions(oidc_app: Flask, idp: IdentityProvider) -> None:
    manager, doctor, _study = setup(oidc_app, idp)
    with oidc_app.app_context():
        current_archive().ingest(make_instance(study=generate_uid(),
                                               ReferringPhysicianName="Doc^Who"), who="test")
    linked = count(oidc_app, ReferrerIdentifier)
    page = manager.get("/admin/identifiers")
    assert b"name:DOC^WHO" in page.data  # seen in a study, linked to nobody yet
    manager.post("/admin/identifiers", data={"user_id": doctor, "key": "name:Doc^Who",
                                             "csrf_token": csrf_of(manager)})
    assert count(oidc_app, ReferrerIdentifier) == linked + 1
    assert b"Every referrer in the archive is linked" in manager.get("/admin/identifiers").data


def test_api_with_openapi_and_all_or_nothing_bulk_revoke(oidc_app: Flask,
                                                         idp: IdentityProvider) -> None:
    manager, doctor, study = setup(oidc_app, idp)
    spec = oidc_app.test_client().get("/api/openapi.json").get_json()
    assert spec["openapi"].startswith("3.") and "/api/grants" in spec["paths"]
    headers = {"X-CSRF-Token": csrf_of(manager)}
    created = manager.post("/api/grants", json={"user_id": doctor, "study_uid": study},
                           headers=headers)
    assert created.status_code == 201, created.data
    grant_id = created.get_json()["id"]
    bad = manager.post("/api/grants", json={"user_id": doctor}, headers=headers)
    assert bad.status_code == 400 and "either one study or one patient" in bad.get_json()["error"]
    refused = manager.post("/api/grants/revoke", json={"ids": [grant_id, 999]}, headers=headers)
    assert refused.status_code == 403
    with oidc_app.extensions["db"].new_session() as session:
        assert session.get(Grant, grant_id).revoked_at is None
    assert manager.post("/api/grants/revoke", json={"ids": [grant_id]},
                        headers=headers).status_code == 200
    users = manager.get("/api/users").get_json()
    assert {u["subject"] for u in users} >= {"doc-" + users[1]["subject"][-6:]}
    patched = manager.patch(f"/api/users/{doctor}", json={"roles": ["physician", "staff"]},
                            headers=headers)
    assert patched.get_json()["roles"] == ["physician", "staff"]
    nope = manager.patch(f"/api/users/{doctor}", json={"roles": ["god"]}, headers=headers)
    assert nope.status_code == 400


def test_break_glass_needs_a_reason_is_time_limited_and_audited(oidc_app: Flask,
                                                                idp: IdentityProvider) -> None:
    manager, doctor, study = setup(oidc_app, idp)
    headers = {"X-CSRF-Token": csrf_of(manager)}
    short = manager.post("/api/grants", json={"user_id": doctor, "study_uid": study,
                                              "break_glass": True, "reason": "urgent"},
                         headers=headers)
    assert short.status_code == 400
    ok = manager.post("/api/grants", json={
        "user_id": doctor, "study_uid": study, "break_glass": True,
        "reason": "patient unconscious in the ED, referrer unreachable",
        "expires_at": (utcnow() + timedelta(days=30)).isoformat()}, headers=headers)
    assert ok.status_code == 201
    grant = ok.get_json()
    from datetime import datetime

    assert datetime.fromisoformat(grant["expires_at"]) <= utcnow() + timedelta(hours=24)
    with oidc_app.extensions["db"].new_session() as session:
        assert session.scalars(select(AuditEvent).where(AuditEvent.event_id == "110127")).one()
    # Ending the emergency access early is recorded as the override stopping.
    ended = manager.post("/api/grants/revoke", json={"ids": [grant["id"]]}, headers=headers)
    assert ended.status_code == 200
    with oidc_app.extensions["db"].new_session() as session:
        stopped = session.scalars(select(AuditEvent).where(AuditEvent.event_id == "110138")).one()
        assert stopped.study_instance_uid == study and stopped.details["grant"] == grant["id"]


def test_audit_trail_is_chained_exported_and_tamper_evident(oidc_app: Flask,
                                                            idp: IdentityProvider) -> None:
    manager, doctor, study = setup(oidc_app, idp)
    manager.post("/api/grants", json={"user_id": doctor, "study_uid": study},
                 headers={"X-CSRF-Token": csrf_of(manager)})
    csv = manager.get("/admin/audit.csv")
    assert csv.status_code == 200 and csv.mimetype == "text/csv"
    assert "attachment" in csv.headers["Content-Disposition"]
    assert b"110113" in csv.data and b"110114" in csv.data
    with oidc_app.extensions["db"].new_session() as session:
        checked, bad = verify_chain(session)
        assert bad is None and checked >= 4
        assert session.scalars(select(AuditEvent).where(AuditEvent.event_id == "110101")
                               ).first() is not None  # reading the trail is audited
    runner = oidc_app.test_cli_runner()
    assert runner.invoke(args=["audit", "verify"]).exit_code == 0
    with oidc_app.extensions["db"].write_transaction() as session:
        session.execute(update(AuditEvent).where(AuditEvent.id == 2).values(who="someone else"))
    broken = runner.invoke(args=["audit", "verify"])
    assert broken.exit_code == 1 and "record 2 was altered" in broken.output


def test_phi_is_not_served_when_the_audit_cannot_be_written(oidc_app: Flask,
                                                           idp: IdentityProvider) -> None:
    manager, doctor, study = setup(oidc_app, idp)
    with oidc_app.extensions["db"].write_transaction() as session:
        session.execute(update(User).where(User.id == doctor).values(roles=["physician"]))
    manager.post("/api/grants", json={"user_id": doctor, "study_uid": study},
                 headers={"X-CSRF-Token": csrf_of(manager)})
    from portal.access.models import User as UserModel

    with oidc_app.extensions["db"].new_session() as session:
        subject = session.get(UserModel, doctor).subject
    viewer = signed_in(oidc_app, idp, subject)
    assert viewer.get(f"/studies/{study}").status_code == 200
    with oidc_app.extensions["db"].write_transaction() as session:
        session.execute(text("CREATE TRIGGER audit_full BEFORE INSERT ON audit_event "
                             "BEGIN SELECT RAISE(ABORT, 'audit store unavailable'); END"))
    oidc_app.config["PROPAGATE_EXCEPTIONS"] = False
    refused = viewer.get(f"/studies/{study}")
    assert refused.status_code >= 500
    assert b"Test" not in refused.data and study.encode() not in refused.data


def test_reads_are_audited_once_per_study_per_session(oidc_app: Flask,
                                                      idp: IdentityProvider) -> None:
    viewer, subject, study = granted_viewer(oidc_app, idp)
    base = f"/dicomweb/studies/{study}"
    for path in (base, f"{base}/metadata", base, f"{base}/series"):
        assert viewer.get(path).status_code == 200, path
    assert viewer.get("/dicomweb/studies?PatientID=*").status_code == 200

    def events(event_id: str) -> list[AuditEvent]:
        with oidc_app.extensions["db"].new_session() as session:
            return list(session.scalars(select(AuditEvent).where(
                AuditEvent.event_id == event_id, AuditEvent.who.contains(subject))))

    reads = events("110103")
    assert len(reads) == 1 and reads[0].study_instance_uid == study
    assert reads[0].action == "R" and reads[0].occurred_at.tzinfo is not None
    assert len(events("110112")) == 2  # the series search and the study search



def test_no_image_leaves_before_its_read_is_recorded(oidc_app: Flask,
                                                     idp: IdentityProvider) -> None:
    """The read record is written beside the rendering; a failed write still means a 503
    without the image, and the next request records the read again."""
    viewer, _subject, study = granted_viewer(oidc_app, idp)
    rendered = viewer.get(f"/dicomweb/studies/{study}/series").get_json()
    series = rendered[0]["0020000E"]["Value"][0]
    instances = viewer.get(f"/dicomweb/studies/{study}/series/{series}/instances").get_json()
    sop = instances[0]["00080018"]["Value"][0]
    image = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/rendered"
    raw = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"

    def reads() -> int:
        with oidc_app.extensions["db"].new_session() as session:
            return len(session.scalars(select(AuditEvent).where(
                AuditEvent.event_id == "110103", AuditEvent.study_instance_uid == study)).all())

    with oidc_app.extensions["db"].write_transaction() as session:
        session.execute(text("CREATE TRIGGER audit_full BEFORE INSERT ON audit_event "
                             "BEGIN SELECT RAISE(ABORT, 'audit store unavailable'); END"))
    machine = basic_auth(*make_client(oidc_app, "reader"))  # a sessionless principal
    for path, headers in ((image, {}), (raw, {}), (image, machine)):
        # a rendered image, a streamed WADO-RS retrieve, an image for a machine client
        accept = "image/jpeg" if path == image else "multipart/related; type=application/dicom"
        client = oidc_app.test_client() if headers else viewer
        refused = client.get(path, headers={"Accept": accept, **headers})
        assert refused.status_code == 503, path
        assert refused.headers["Retry-After"] and refused.is_json
        assert b"\xff\xd8" not in refused.data and b"DICM" not in refused.data
    assert reads() == 0
    with oidc_app.extensions["db"].write_transaction() as session:
        session.execute(text("DROP TRIGGER audit_full"))
    served = viewer.get(image, headers={"Accept": "image/jpeg"})
    assert served.status_code == 200 and served.data.startswith(b"\xff\xd8")
    assert reads() == 1
    viewer.get(image, headers={"Accept": "image/jpeg"})
    assert reads() == 1  # once per study per session
    again = oidc_app.test_client().get(image, headers={"Accept": "image/jpeg", **machine})
    assert again.status_code == 200 and reads() == 2  # the machine client's failed read


def test_an_invitation_gives_its_roles_once(oidc_app: Flask, idp: IdentityProvider) -> None:
    from tests.conftest import sign_in

    manager, _doctor, _study = setup(oidc_app, idp)
    made = manager.post("/api/invitations", json={"email": "new@demo.example",
                                                  "roles": ["physician"], "practice": "Clinic"},
                        headers={"X-CSRF-Token": csrf_of(manager)})
    assert made.status_code == 201
    link = made.get_json()["link"]
    path = link[link.index("/auth/invitation"):]
    invitee = oidc_app.test_client()
    assert b"You have been invited" in invitee.get(path).data
    idp.set_user("invited-person", email="whatever@elsewhere.example")
    sign_in(invitee, idp, "invited-person")
    page = invitee.get("/studies")
    assert b"invitation has been accepted" in page.data
    with oidc_app.extensions["db"].new_session() as session:
        user = session.scalars(select(User).where(User.subject == "invited-person")).one()
        assert user.roles == ["physician"] and user.practice_fk is not None
    second = oidc_app.test_client()
    second.get(path)
    idp.set_user("second-person")
    sign_in(second, idp, "second-person")
    assert b"already used or has expired" in second.get("/studies").data
    with oidc_app.extensions["db"].new_session() as session:
        other = session.scalars(select(User).where(User.subject == "second-person")).one()
        assert other.roles == []
